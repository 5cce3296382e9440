"""Shared fixtures: the real MNIST models and data from ../shared, small corpora."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MNIST = SHARED / "data" / "mnist"
CNN = SHARED / "models" / "mnist_cnn_shallow"
MLP = SHARED / "models" / "mnist_mlp"
CNN_LAYERS = ["conv2d_24", "conv2d_25", "flatten_8"]
BATCH = 50  # batches straddle the 77-sample files of the test corpora and the chunks
MLP_LAYERS = ["layer_2"]

needs_shared = pytest.mark.skipif(
    not (MNIST.is_dir() and CNN.is_dir() and MLP.is_dir()),
    reason=f"../shared (MNIST data and models) not found at {SHARED}; these tests use the "
    "real MNIST models and data that sit beside the checkout",
)


def _load_example(name: str, rel: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


mnist_example = _load_example("mnist_make_corpus", "examples/mnist/make_corpus.py")


def python_env() -> dict:
    """Environment for subprocesses: this interpreter's packages, quiet TensorFlow."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="session")
def mnist_arrays():
    if not MNIST.is_dir():
        pytest.skip(f"MNIST data not found at {MNIST}")
    x = mnist_example.read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    y = mnist_example.read_idx(MNIST / "t10k-labels-idx1-ubyte.gz")
    return x, y


def write_mnist_corpus(out: Path, x, y, n: int, batch: int) -> Path:
    return mnist_example.write_mnist_corpus(x[:n], y[:n], out, batch=batch)


@pytest.fixture(scope="session")
def mnist_corpus(tmp_path_factory, mnist_arrays):
    """600 MNIST test images, 10 groups, batch files of 77 (ragged), with targets."""
    x, y = mnist_arrays
    return write_mnist_corpus(tmp_path_factory.mktemp("mnist600"), x, y, 600, 77)


@pytest.fixture(scope="session")
def mnist_corpus_no_target(tmp_path_factory, mnist_corpus):
    out = tmp_path_factory.mktemp("mnist600_nt")
    lines = []
    for line in mnist_corpus.read_text().splitlines():
        f, g, _ = line.split(",")
        lines.append(f"{(mnist_corpus.parent / f).resolve()},{g}")
    (out / "corpus.csv").write_text("\n".join(lines) + "\n")
    return out / "corpus.csv"


def corpus_inputs(csv: Path) -> np.ndarray:
    """All samples of a corpus in corpus order (a plain reference reader)."""
    parts = []
    for line in csv.read_text().splitlines():
        parts.append(np.load(csv.parent / line.split(",")[0]))
    return np.concatenate(parts)


@pytest.fixture(scope="session")
def cnn_store(tmp_path_factory, mnist_corpus):
    """The MNIST CNN's store of the 600-sample corpus (chunks of 1 MiB: 10 blocks)."""
    pytest.importorskip("tensorflow")
    import inntrospect

    path = tmp_path_factory.mktemp("cnn") / "cnn.zarr"
    inntrospect.extract(CNN, mnist_corpus, path, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    return path


class NoCompute:
    """A dask scheduler that fails: use it where building a graph must compute nothing."""

    def __call__(self, dsk, keys, **kwargs):
        raise AssertionError("something computed while the graph was being built")
