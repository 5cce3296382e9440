"""Shared fixtures: the real MNIST models and data from ../shared, small corpora."""

from __future__ import annotations

import importlib.util
import math
import os
import re
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


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    """A TOML basic string: quoted, with what must be escaped escaped."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value) -> str:
    """``value`` as a TOML value: strings (and paths), ints, floats, bools, lists, inline tables."""
    if isinstance(value, bool):  # before int: a bool is an int
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return _toml_string(os.fspath(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML value for {type(value).__name__}: {value!r}")


def toml_text(sections: dict) -> str:
    """``sections`` as TOML text: each dict a ``[section]`` table, in order.

    Values that are not dicts are top-level keys and come first (TOML wants them
    before any table); a dict inside a section is an inline table.
    """
    lines = [f"{_toml_key(k)} = {toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"[{_toml_key(name)}]")
            lines.extend(f"{_toml_key(k)} = {toml_value(v)}" for k, v in table.items())
    return "".join(line + "\n" for line in lines)


def write_config(folder: Path, sections: dict | None = None, *, text: str | None = None,
                 name: str = "c.toml") -> Path:
    """Write a config ``folder / name`` (the folder made if need be); its path.

    ``sections`` is ``{"store": {"path": "s.zarr"}, "naps": {"aligned": True}, ...}``,
    written as TOML (see :func:`toml_text`); ``text`` is raw text written after
    it, for the configs a test means to be malformed or odd.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(toml_text(sections or {}) + (text or ""))
    return path


def pipeline_sections(model, corpus, method: str = "pca", layers=("conv2d_25",)) -> dict:
    """The config of the whole pipeline (``inntrospect run``) on a model and corpus: a new dict."""
    return {
        "model": {"path": model, "layers": list(layers)},
        "corpus": {"path": corpus},
        "store": {"path": "run.zarr", "chunk_mib": 1},
        "naps": {"aligned": True},
        "topomap": {"method": method, "resolution": 40},
        "projection": {"samples_per_group": 20},
        "plot": {"output": "out"},
    }


def write_mnist_corpus(out: Path, x, y, n: int, batch: int) -> Path:
    return mnist_example.write_mnist_corpus(x[:n], y[:n], out, batch=batch)


@pytest.fixture(scope="session")
def mnist_corpus(tmp_path_factory, mnist_arrays):
    """600 MNIST test images, 10 groups, batch files of 77 (ragged), with targets."""
    x, y = mnist_arrays
    return write_mnist_corpus(tmp_path_factory.mktemp("mnist600"), x, y, 600, 77)


@pytest.fixture(scope="session")
def mnist_corpus_no_target(tmp_path_factory, mnist_corpus):
    import shutil

    out = tmp_path_factory.mktemp("mnist600_nt")
    lines = []
    for line in mnist_corpus.read_text().splitlines():
        f, g, _ = line.split(",")
        shutil.copyfile(mnist_corpus.parent / f, out / f)  # batch files stay inside the corpus folder
        lines.append(f"{f},{g}")
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


def counting_reads(monkeypatch) -> list[str]:
    """The chunk files the direct chunk reads open from now on (``chunkio.read_chunk``), in order."""
    from inntrospect.store import chunkio

    reads: list[str] = []
    real = chunkio.read_chunk

    def counted(f, what):
        reads.append(f.file)
        return real(f, what)

    monkeypatch.setattr(chunkio, "read_chunk", counted)
    return reads
