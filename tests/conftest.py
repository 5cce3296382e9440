"""Shared fixtures: the real MNIST models and data from ../shared, small corpora."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# CI runs the same property-based examples every time (a red CI must mean a change broke
# something, not that a new random example was drawn); locally they are drawn afresh
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

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


def nan_corpus(folder: Path) -> Path:
    """A corpus of 130 random MNIST-shaped images in ``a.npy``, sample 100 holding a NaN."""
    folder.mkdir()
    x = np.random.default_rng(0).random((130, 28, 28, 1), dtype=np.float32)
    x[100, 3, 3, 0] = np.nan
    np.save(folder / "a.npy", x)
    (folder / "corpus.csv").write_text("a.npy,g\n")
    return folder


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


class S3Server:
    """A real S3-compatible server (moto) on loopback, and where tests put their stores in it."""

    KEY, SECRET, REGION = "inntrospect-test", "inntrospect-secret", "us-east-1"

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self._n = 0

    @property
    def storage_options(self) -> dict:
        """fsspec (s3fs) options that reach this server."""
        return {"key": self.KEY, "secret": self.SECRET, "endpoint_url": self.endpoint,
                "client_kwargs": {"region_name": self.REGION}}

    def bucket(self) -> str:
        """A new, empty bucket's name (S3 has no folders to make: s3fs.mkdir is refused by moto)."""
        import boto3

        self._n += 1
        name = f"bkt-{self._n}-{os.getpid()}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.KEY,
                     aws_secret_access_key=self.SECRET, region_name=self.REGION).create_bucket(Bucket=name)
        return name

    def location(self, name: str = "run.zarr"):
        """An :class:`inntrospect.store.backends.Location` ``s3://<new bucket>/<name>`` with this server's options."""
        from inntrospect.store.backends import Location

        return Location(f"s3://{self.bucket()}/{name}", self.storage_options)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A moto S3 server, a process of its own (own session) on a free loopback port, for the session.

    Yields an :class:`S3Server`; the server is ended at the end (SIGTERM, then SIGKILL).
    """
    import signal
    import subprocess
    import time
    import urllib.error
    import urllib.request

    for module in ("moto.server", "s3fs", "boto3"):
        pytest.importorskip(module, reason=f"{module} is needed for the object-storage tests "
                                           "(pip install -e '.[test]')")
    log_path = tmp_path_factory.mktemp("s3") / "moto.log"
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=S3Server.KEY, AWS_SECRET_ACCESS_KEY=S3Server.SECRET)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)

    def stop() -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                pass

    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(endpoint, timeout=2):
                    break
            except urllib.error.HTTPError:  # it answers (an error status is an answer)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the moto S3 server did not start on {endpoint}:\n"
                                       f"{log_path.read_text(errors='replace')[-4000:]}") from None
                time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        stop()
