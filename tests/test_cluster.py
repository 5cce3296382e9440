"""A real ``dask.distributed`` cluster: a scheduler and two workers, each a process of its own, on loopback.

``inntrospect run --scheduler`` gives what a local run gives, its analysis
tasks run on the workers, a worker killed in the middle of the NAPs changes
nothing in them, and the dashboard link printed is the scheduler's. Extraction runs on the workers
(each loads the model once) and resumes after its client is killed. The
workers share this machine's disk, so stores are given by their local paths
(``test_s3.py`` puts the store in object storage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from dask.utils import key_split

import inntrospect
from inntrospect import registry
from inntrospect.pipeline import run
from inntrospect.testing import store_from_arrays

from .conftest import (
    BATCH,
    CNN,
    CNN_LAYERS,
    nan_corpus,
    needs_shared,
    pipeline_sections,
    python_env,
    write_config,
)

distributed = pytest.importorskip("distributed")

#: every wait of this file is bounded by this many seconds
TIMEOUT = 60
#: the analysis steps: what the run on the cluster redoes, and what is compared
STEPS = ("naps", "exemplars", "contrast", "layout", "topomap", "projection")
#: steps left out where a test is about the cluster, not them: the figures and the
#: report (drawn in this process from the store; ``test_pipeline.py`` tests them)
FIGURES = ("plots", "report")


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes (no nanny: a worker is the process we start)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}
        self.client = None
        self.scheduler_file = folder / "s.json"
        self.scheduler = self._spawn("scheduler", [
            "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
            "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(self.scheduler_file),
            "--idle-timeout", "900s"])  # outlives no test process by long, even one killed itself
        deadline = time.monotonic() + TIMEOUT
        while not self._scheduler_info():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the scheduler did not start:\n{self.log('scheduler')}")
            time.sleep(0.05)
        self.info = self._scheduler_info()
        self.address = self.info["address"]

    def _scheduler_info(self) -> dict | None:
        try:
            return json.loads(self.scheduler_file.read_text())
        except (OSError, ValueError):  # not there yet, or half written
            return None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with open(self.folder / f"{name}.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=python_env(), start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_worker(self, name: str) -> subprocess.Popen:
        (self.folder / name).mkdir(exist_ok=True)
        proc = self._spawn(name, [
            "distributed.cli.dask_worker", "--scheduler-file", str(self.scheduler_file),
            "--nthreads", "1", "--memory-limit", "3GiB",  # room for TensorFlow and a model "--no-dashboard", "--no-nanny",
            "--host", "127.0.0.1", "--name", name, "--local-directory", str(self.folder / name),
            "--death-timeout", str(TIMEOUT)])  # gone when the scheduler is
        self.workers[name] = proc
        return proc

    def connect(self, n_workers: int) -> None:
        from distributed import Client

        if self.client is None:  # not the default client: other tests' dask work stays local
            self.client = Client(self.address, timeout=TIMEOUT, set_as_default=False)
        try:
            self.client.wait_for_workers(n_workers, timeout=TIMEOUT)
        except TimeoutError:
            logs = "\n".join(f"-- {k}:\n{self.log(k)}" for k in self.workers)
            raise RuntimeError(f"{n_workers} workers did not connect within {TIMEOUT} s:\n{logs}") from None

    def worker_addresses(self) -> dict[str, str]:
        """``{name: address}`` of the workers connected now."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        return {w["name"]: addr for addr, w in workers.items()}

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""

    def close(self) -> None:
        """Close the client, then end every process started here: SIGTERM, then SIGKILL."""
        if self.client is not None:
            try:
                self.client.close(timeout=10)
            except Exception:  # noqa: BLE001 - the processes go in any case
                pass
        for proc in self.procs:
            if proc.poll() is None:
                _signal(proc, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait(timeout=10)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """Signal the process group of ``proc`` (its own session: it and any children it made)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    cluster = None
    try:
        cluster = Cluster(tmp_path_factory.mktemp("cluster"))
        for name in ("w0", "w1"):
            cluster.start_worker(name)
        cluster.connect(2)
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()


@pytest.fixture
def two_workers(dask_cluster):
    """The cluster, with two workers on entry (and again on exit)."""
    dask_cluster.connect(2)
    yield dask_cluster
    dask_cluster.connect(2)


def _config(folder: Path, corpus) -> Path:
    return write_config(folder, pipeline_sections(CNN, corpus))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mnist_corpus, dask_cluster):
    """The MNIST CNN config run locally, then on the cluster into another store.

    The cluster run does every step from scratch into its own store, the
    extraction included (its blocks computed on the workers), its tasks
    recorded by the scheduler.
    """
    pytest.importorskip("tensorflow")
    from distributed import get_task_stream

    base = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        for step in FIGURES:
            mp.setitem(registry.RUNNERS, step, _skip)
        return _two_runs(base, mnist_corpus, dask_cluster, get_task_stream)


def _skip(*args, **kwargs) -> None:
    """A step left out (see :data:`FIGURES`)."""


def _two_runs(base, mnist_corpus, dask_cluster, get_task_stream) -> dict:
    local_cfg, remote_cfg = _config(base / "local", mnist_corpus), _config(base / "remote", mnist_corpus)
    t0 = time.perf_counter()
    local_done = run(local_cfg, progress=False, echo=lambda line: print("local:", line))
    t1 = time.perf_counter()
    dask_cluster.connect(2)
    with get_task_stream(dask_cluster.client) as stream:
        remote_done = run(remote_cfg, scheduler=dask_cluster.address, progress=False,
                          echo=lambda line: print("cluster:", line))
    t2 = time.perf_counter()
    print(f"\nlocal run {t1 - t0:.1f} s; run on the cluster {t2 - t1:.1f} s")
    return {"local": base / "local", "remote": base / "remote", "local_done": local_done,
            "remote_done": remote_done, "stream": stream.data, "remote_cfg": remote_cfg}


def _assert_same_extraction(a, b) -> None:
    """The opened stores ``a`` and ``b`` hold bit-equal acts, grads and predictions in every layer."""
    for layer in a.attrs["layers"]:
        for var in ("acts", "grads", "prediction"):
            if var in a[f"layers/{layer}"]:
                np.testing.assert_array_equal(a[f"layers/{layer}"][var].values, b[f"layers/{layer}"][var].values,
                                              err_msg=f"{layer} {var}")


def _assert_same_results(a, b, what: str) -> None:
    """Every analysis step's results in the stores at ``a`` and ``b`` agree (see :func:`_assert_same`)."""
    for step in STEPS:
        x, y = inntrospect.load(a, step), inntrospect.load(b, step)
        assert list(x) == list(y) and x, step
        for layer in x:
            # NAPs are float64 sums of the same chunks merged in the same tree:
            # equal to rounding; UMAP with a seed, given the same rows, exactly
            _assert_same(x[layer], y[layer], f"{step} {layer}{what}")


def _assert_same(a, b, what: str, rtol: float = 1e-12, atol: float = 1e-12) -> None:
    assert set(a.data_vars) == set(b.data_vars), what
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        assert x.shape == y.shape, f"{what} {name}"
        if x.dtype.kind in "fc":
            np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=f"{what} {name}")
        else:
            np.testing.assert_array_equal(x, y, err_msg=f"{what} {name}")
    for name in a.coords:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=f"{what} coord {name}")


@needs_shared
def test_run_on_the_cluster_equals_the_local_run(runs):
    assert runs["local_done"] == runs["remote_done"] == {s: "ran" for s in (
        "extract", "align", *STEPS, "plots", "report")}
    local, remote = runs["local"] / "run.zarr", runs["remote"] / "run.zarr"
    # extracted in this process, and on the workers
    _assert_same_extraction(inntrospect.store.open_store(local), inntrospect.store.open_store(remote))
    _assert_same_results(local, remote, "")
    aligned_a, aligned_b = inntrospect.load(local, "align"), inntrospect.load(remote, "align")
    for layer in aligned_a:
        np.testing.assert_array_equal(aligned_a[layer].values, aligned_b[layer].values)


@needs_shared
def test_the_analysis_tasks_ran_on_the_workers(runs, dask_cluster):
    workers = set(dask_cluster.worker_addresses().values())
    stream = runs["stream"]
    assert stream and {t["worker"] for t in stream} <= workers
    prefixes = {}
    for t in stream:
        key = t["key"][0] if isinstance(t["key"], tuple) else t["key"]
        prefix = "-".join(p for p in str(key).split("-") if not (len(p) == 32 and p.isalnum()))
        prefixes[prefix] = prefixes.get(prefix, 0) + 1
    # the extraction's blocks were computed there
    n_blocks = inntrospect.store.store_attrs(runs["remote"] / "run.zarr")["extraction"]["n_blocks"]
    assert sum(key_split(t["key"]) == "extract-block" for t in stream) == n_blocks, prefixes
    # the NAP pass read its chunk files on the workers, and reduced there
    assert prefixes.get("naps-chunk", 0) >= 10 and any(p.startswith("naps-merge") for p in prefixes), prefixes
    # the alignment wrote its chunks there, and the projection read its rows there
    assert any(p.startswith("store-map") for p in prefixes), prefixes
    assert len(stream) > 50, prefixes


@needs_shared
def test_the_dashboard_link_printed_is_the_schedulers(runs, dask_cluster, capsys, monkeypatch):
    for step in FIGURES:
        monkeypatch.setitem(registry.RUNNERS, step, _skip)
    capsys.readouterr()
    run(runs["remote_cfg"], scheduler=dask_cluster.address, progress=True, echo=lambda _: None)
    first = capsys.readouterr().out.splitlines()[0]
    port = dask_cluster.info["services"]["dashboard"]
    assert first == f"dask: {dask_cluster.address}; dashboard: http://127.0.0.1:{port}/status"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as page:
        assert page.status == 200 and b"Dask" in page.read()


@needs_shared
def test_run_connects_to_the_config_s_cluster_address(runs, dask_cluster, monkeypatch):
    from distributed import get_task_stream

    for step in (*FIGURES, "projection"):  # UMAP runs in this process: tested above
        monkeypatch.setitem(registry.RUNNERS, step, _skip)
    folder = runs["remote"]
    cfg = write_config(folder, {**tomllib.loads(runs["remote_cfg"].read_text()),
                                "cluster": {"address": dask_cluster.address}}, name="address.toml")
    clients_before = _connections(dask_cluster)
    with get_task_stream(dask_cluster.client) as stream:
        done = run(cfg, from_step="contrast", progress=False, echo=lambda _: None)
    assert done["contrast"] == done["projection"] == "ran" and done["naps"] == "current"
    assert _connections(dask_cluster) == clients_before + 1
    assert stream.data and {t["worker"] for t in stream.data} <= set(dask_cluster.worker_addresses().values())


def _connections(cluster) -> int:
    """How many clients have connected to the scheduler so far."""
    events = cluster.client.get_events("all")
    return sum(1 for _, e in events if isinstance(e, dict) and e.get("action") == "add-client")


def _finished(prefix: str, since: float, dask_scheduler=None) -> int:
    """In the scheduler: how many times a task whose key starts with ``prefix`` finished since the time
    ``since`` (the log is bounded: older tests' entries drop out of it, so counts are taken by time)."""
    return sum(1 for t in list(dask_scheduler.transition_log)
               if t.finish == "memory" and t.timestamp >= since
               and str(t.key[0] if isinstance(t.key, tuple) else t.key).startswith(prefix))


def test_a_worker_killed_in_the_middle_of_the_naps_changes_nothing(two_workers, tmp_path):
    cluster = two_workers
    rng = np.random.default_rng(0)
    n, shape, groups = 4096, (12, 12, 64), np.array(list("abcdefg"))
    codes = rng.integers(0, len(groups), n)
    acts = rng.standard_normal((n, *shape), dtype=np.float32)
    t0 = time.perf_counter()
    path = store_from_arrays(tmp_path / "s.zarr", {"conv": acts}, groups[codes], chunks=8)
    t1 = time.perf_counter()

    result, errors = {}, []

    def nap_pass():
        try:
            with cluster.client.as_current():  # dask.compute in this thread: the cluster
                result.update(inntrospect.naps(path, persist=True))
        except BaseException as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    since = time.time()  # the scheduler runs on this machine: the same clock
    thread = threading.Thread(target=nap_pass, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while (done := cluster.client.run_on_scheduler(_finished, "naps-chunk", since)) < 4:
        assert thread.is_alive() and time.monotonic() < deadline, (errors, done)
        time.sleep(0.01)
    victim = cluster.workers["w1"]
    os.kill(victim.pid, signal.SIGKILL)
    finals_at_kill = cluster.client.run_on_scheduler(_finished, "naps-final", since)
    thread.join(TIMEOUT)
    t2 = time.perf_counter()
    assert not thread.is_alive(), "the NAP pass did not finish"
    assert not errors, errors
    assert victim.wait(timeout=10) == -signal.SIGKILL
    # killed while the pass was running: it finished on the other worker alone
    assert "w1" not in cluster.worker_addresses()
    assert finals_at_kill == 0  # the pass had not finished when the worker was killed
    n_chunk_tasks = cluster.client.run_on_scheduler(_finished, "naps-chunk", since)
    print(f"\nstore of {acts.nbytes / 1e6:.0f} MB built in {t1 - t0:.1f} s; NAP pass {t2 - t1:.1f} s; "
          f"worker killed after {done} of {n_chunk_tasks} chunk tasks finished (some twice)")

    ds = inntrospect.load(path, "naps")["conv"]
    assert list(ds.group.values) == list(groups)
    np.testing.assert_array_equal(ds["count"].values, np.bincount(codes, minlength=len(groups)))
    want = np.stack([acts[codes == g].mean(0, dtype=np.float64) for g in range(len(groups))])
    np.testing.assert_allclose(ds.nap.values, want, rtol=1e-10, atol=1e-12)

    cluster.start_worker("w2")  # a replacement, for the tests after this one


def _loads(dask_worker=None) -> int:
    """In a worker: how many times it has prepared an extraction (loaded a model)."""
    from inntrospect.extraction import distributed as distributed_extract

    return distributed_extract.MODEL_LOADS["count"]


def _recorded_so_far(path: Path) -> set[int]:
    """:func:`_recorded`, or nothing while the store is still being created."""
    try:
        return _recorded(path)
    except Exception:  # noqa: BLE001 - not there yet, or half written
        return set()


def _recorded(path: Path) -> set[int]:
    import zarr

    done = zarr.open_array(str(path), path="extraction/block_done", mode="r")[:]
    return set(np.flatnonzero(done).tolist())


@needs_shared
def test_extraction_on_the_workers_resumes_after_the_client_is_killed(two_workers, tmp_path, mnist_corpus):
    """``inntrospect extract --scheduler`` is SIGKILLed once a few blocks are recorded.

    Its running blocks finish and record themselves; the store stays
    incomplete. The same extraction run again (from this process, on the
    cluster) submits exactly the blocks not recorded, each worker loaded the
    model once for both runs, and the result equals an extraction in this process.
    """
    pytest.importorskip("tensorflow")
    from distributed import get_task_stream

    cluster = two_workers
    path = tmp_path / "remote.zarr"
    loads_before = cluster.client.run(_loads)
    cfg = write_config(tmp_path, {  # the extraction whose client (inntrospect extract --scheduler) is killed
        "model": {"path": CNN, "layers": CNN_LAYERS}, "corpus": {"path": mnist_corpus},
        "store": {"path": "remote.zarr", "chunk_mib": 0.25}, "extract": {"batch_size": BATCH}},
        name="extract.toml")
    log = open(tmp_path / "client.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "inntrospect", "extract", str(cfg), "--scheduler",
                             cluster.address, "--no-progress"], stdout=log, stderr=subprocess.STDOUT,
                            env=python_env(), start_new_session=True)
    deadline = time.monotonic() + 3 * TIMEOUT  # TensorFlow starts in the client and in each worker
    try:  # killed once 3 blocks are recorded in the store
        while len(_recorded_so_far(path)) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "client.log").read_text()[-3000:]
            time.sleep(0.02)
        reported = _recorded(path)
        _signal(proc, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            _signal(proc, signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
    assert f"dask: {cluster.address}; dashboard:" in (tmp_path / "client.log").read_text()
    n_blocks = inntrospect.store.store_attrs(path)["extraction"]["n_blocks"]
    with pytest.raises(inntrospect.errors.IncompleteStoreError):
        inntrospect.store.open_store(path)
    assert not inntrospect.store.is_locked(path)  # the killed client's lock went with it
    stable, before = 0, None  # the blocks running when the client died finish and record themselves
    while stable < 20:
        now = _recorded(path)
        stable = stable + 1 if now == before else 0
        before = now
        time.sleep(0.1)
    assert reported <= before and 3 <= len(before) < n_blocks, (reported, before, n_blocks)

    computed = []
    with cluster.client.as_current(), get_task_stream(cluster.client) as stream:
        tree = inntrospect.extract(CNN, mnist_corpus, path, layers=CNN_LAYERS, chunk_mib=0.25,
                                   batch_size=BATCH, on_block=lambda b, n: computed.append(b))
    assert sorted(computed) == sorted(set(range(n_blocks)) - before)  # only what was not recorded
    assert _recorded(path) == set(range(n_blocks))
    assert tree.attrs["extraction"]["state"] == "complete"
    blocks = [t for t in stream.data if key_split(t["key"]) == "extract-block"]
    assert len(blocks) == len(computed)
    assert {t["worker"] for t in blocks} <= set(cluster.worker_addresses().values())
    loads = {w: n - loads_before.get(w, 0) for w, n in cluster.client.run(_loads).items()}
    assert set(loads.values()) <= {0, 1} and sum(loads.values()) >= 1, loads  # the model, once per worker

    local = inntrospect.extract(CNN, mnist_corpus, tmp_path / "local.zarr", layers=CNN_LAYERS,
                                chunk_mib=0.25, batch_size=BATCH, where="local")
    assert set(CNN_LAYERS) < set(tree.attrs["layers"])
    _assert_same_extraction(tree, local)


@needs_shared
def test_run_on_the_cluster_with_the_store_in_s3_equals_the_local_run(runs, dask_cluster, s3, tmp_path,
                                                                       monkeypatch):
    """``[store] path = "s3://…"``: the workers extract into and analyse a store on a real S3 server.

    Nothing is written to a local disk, and every result equals the local run's.
    """
    from distributed import get_task_stream

    for step in FIGURES:
        monkeypatch.setitem(registry.RUNNERS, step, _skip)
    loc = s3.location()
    sections = tomllib.loads(runs["remote_cfg"].read_text())
    assert sections["store"]["path"] == "run.zarr"
    sections["store"].update(path=loc.url, storage_options=s3.storage_options)
    cfg = write_config(tmp_path, sections, name="s3.toml")
    dask_cluster.connect(2)
    with get_task_stream(dask_cluster.client) as stream:
        done = run(cfg, scheduler=dask_cluster.address, progress=False, echo=lambda line: print("s3:", line))
    assert done == runs["remote_done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s3.toml"]  # no local store, no lock file
    assert not inntrospect.store.is_locked(loc) and loc.read_text("zarr.json") is not None
    n_blocks = inntrospect.store.store_attrs(loc)["extraction"]["n_blocks"]
    blocks = [t for t in stream.data if key_split(t["key"]) == "extract-block"]
    assert len(blocks) == n_blocks and {t["worker"] for t in blocks} <= set(dask_cluster.worker_addresses().values())

    local = runs["local"] / "run.zarr"
    _assert_same_extraction(inntrospect.store.open_store(local), inntrospect.store.open_store(loc))
    _assert_same_results(local, loc, " (s3)")


@needs_shared
def test_a_bad_sample_on_a_worker_raises_the_same_error_in_the_client(two_workers, tmp_path):
    """A NaN input met on a worker stops the extraction with the local error; nothing claims completion."""
    pytest.importorskip("tensorflow")
    nan = nan_corpus(tmp_path / "nan")
    path = tmp_path / "nan.zarr"
    with two_workers.client.as_current(), pytest.raises(
            inntrospect.errors.NonFiniteError, match=r"input of sample 100 \(a.npy, index 100\)"):
        inntrospect.extract(CNN, nan, path, chunk_mib=0.1, batch_size=32, where="cluster")
    assert inntrospect.store.store_attrs(path)["extraction"]["state"] == "incomplete"
    block = inntrospect.store.store_attrs(path)["extraction"]["block"]
    assert 100 // block not in _recorded(path)  # the block with the NaN is not recorded
    with pytest.raises(inntrospect.errors.ConfigError, match="needs an active dask.distributed client"):
        inntrospect.extract(CNN, nan, path, chunk_mib=0.1, batch_size=32, where="cluster")
