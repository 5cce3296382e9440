"""Are NAPs as fast as reading the store? Raw reads, NAPs, aligned NAPs, xarray, in one run.

What is compared
----------------
A store of real MNIST CNN activations (layers ``conv2d_24`` (13, 13, 128),
``conv2d_25`` (6, 6, 128) and ``flatten_8`` (4608), with their gradients, 10
digit groups in every chunk), several GB: the real samples of a small
extraction (``--source``, default ``/tmp/cnn.zarr``; extracted from the first
2000 MNIST test images when missing, which needs TensorFlow) repeated with
their groups to ``--samples`` samples by :func:`inntrospect.testing.store_from_arrays`,
chunked and compressed as the extraction does (its chunk plan; zstd-1 for the
arrays whose first batch compresses >= 1.25x, raw for the others). The store is
built once and kept at ``--store``; re-runs reuse it.

All on dask's threaded scheduler with ``--threads`` threads (2 = the cores):

(a) read only, the ceiling: every chunk of every ``acts`` array read and
    dropped, three honest ways, the fastest one is the ceiling:
    a1 ``da.from_zarr(...)`` blocks mapped to nothing, computed by dask;
    a2 ``zarr`` region reads of whole chunks from a pool of threads;
    a3 the chunk files read and decoded into a buffer per thread, reused (what
       :func:`inntrospect.naps` does).
(b) ``inntrospect.naps(store)`` computed: GB/s of activations (uncompressed
    bytes of ``acts`` / s), b / a (target >= 0.8).
(c) ``inntrospect.naps(store, aligned=True)``: alignment from the gradients,
    fused, on the fly; its reads include the gradients (also printed as a read
    ceiling of acts + grads), c / b (target >= 0.9).
(d) the obvious xarray route: ``tree["layers/<l>"].acts.groupby("group").mean()``
    (flox), per layer.
(e) NAPs on a ``dask.distributed.LocalCluster`` of worker processes with
    ``--memory-limit`` each, the store's activations >= 4x that limit, computed
    twice (the first run includes the workers' imports and kernel loading): the
    peak RSS of each worker since it started (``VmHWM``; cross-checked by a
    thread sampling RSS every 5 ms), deaths/restarts (worker addresses and pids
    before and after), spilling (keys in the workers' ``data.slow``, bytes
    spilled to disk) and the workers' warnings, vs. the limit and the store size.

Each of a-d is the median of ``--repeats`` runs, run in rounds (each method
once per round) so that the shared machine's changing load hits them alike.
The page cache is warm (the store was read before), the same for all of
them; ``--cold`` evicts the store's files from it before every run
(``posix_fadvise``). b is checked against d (float32 means) and against e.

Run::

    python benchmarks/bench_naps.py                 # 40,000 samples, 4.9 GB of activations
    python benchmarks/bench_naps.py --quick         # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import evict  # benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "mnist_cnn_shallow"
IMAGES = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
LABELS = SHARED / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
LAYERS = ["conv2d_24", "conv2d_25", "flatten_8"]
SOURCE = Path("/tmp/cnn.zarr")
STORE = Path(tempfile.gettempdir()) / "inntrospect-bench" / "naps_{n}.zarr"
STORE_QUICK = Path(tempfile.gettempdir()) / "inntrospect-bench" / "naps_quick_{n}.zarr"


# -- the store -------------------------------------------------------------------
def extract_source(tmp: Path, n: int = 2000) -> Path:
    """A small real extraction of the MNIST CNN (needs TensorFlow and ../shared)."""
    import inntrospect

    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import write_mnist_corpus

    csv = write_mnist_corpus(IMAGES, LABELS, tmp / "corpus", limit=n, batch=500)
    path = tmp / "source.zarr"
    inntrospect.extract(str(MODEL), csv, path, layers=LAYERS, overwrite=True)
    return path


class Tiled:
    """Rows ``index`` of ``a`` (``index`` maps store samples to source samples), sliced lazily."""

    def __init__(self, a: np.ndarray, index: np.ndarray):
        self.a, self.index, self.shape = a, index, (len(index), *a.shape[1:])

    def __getitem__(self, key: slice) -> np.ndarray:
        return self.a[self.index[key]]


def tiling(m: int, n: int, seed: int = 0) -> np.ndarray:
    """Source sample of each of ``n`` samples: the ``m`` source samples, shuffled anew in each repeat.

    The source corpus is sorted by group (its batch files are per digit); shuffled,
    every chunk holds all 10 groups, as in a corpus that is not sorted.
    """
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.permutation(m) for _ in range(-(-n // m))])[:n]


def build_store(path: Path, source: Path, n: int, chunk_mib: float | None) -> dict:
    """Write the benchmark store from the real samples of ``source``; return its description."""
    import numcodecs
    import zarr

    from inntrospect.store import plan_chunks
    from inntrospect.store.codecs import CODEC, MIN_RATIO
    from inntrospect.testing import store_from_arrays

    src = zarr.open_group(str(source), mode="r")
    acts, grads, codecs = {}, {}, {}
    zstd = numcodecs.Zstd(level=CODEC["level"])
    for layer in LAYERS:
        node = src[f"layers/{layer}"]
        acts[layer] = np.ascontiguousarray(node["acts"][:], dtype=np.float32)
        grads[layer] = np.ascontiguousarray(node["grads"][:], dtype=np.float32)
        codecs[layer] = {}
        for var, a in (("acts", acts[layer]), ("grads", grads[layer])):
            first = np.ascontiguousarray(a[:128])  # the extraction's rule, on its first batch
            codecs[layer][var] = dict(CODEC) if first.nbytes >= MIN_RATIO * len(zstd.encode(first)) else None
    groups = np.array([str(g) for g in src[f"layers/{LAYERS[0]}/group"][:]])
    plan = plan_chunks({k: a[0].nbytes for k, a in acts.items()}, chunk_mib)
    m = len(groups)
    index = tiling(m, n)
    t0 = time.perf_counter()
    store_from_arrays(
        path, {k: Tiled(a, index) for k, a in acts.items()}, groups[index],
        grads={k: Tiled(a, index) for k, a in grads.items()}, chunks=plan.chunks, codec=codecs,
    )
    desc = {"n": n, "source": str(source), "source_samples": m, "layers": LAYERS, "order": "shuffled",
            "chunk_mib": plan.chunk_mib, "chunks": plan.chunks, "codecs": codecs,
            "build_s": time.perf_counter() - t0}
    from inntrospect.store import update_attrs

    update_attrs(path, bench_naps=desc)
    return desc


def get_store(path: Path, source: Path, n: int, chunk_mib: float | None, rebuild: bool) -> dict:
    """The cached store's description; (re)built when missing, different or incomplete."""
    from inntrospect.store import is_store, store_attrs

    if is_store(path) and not rebuild:
        attrs = store_attrs(path)
        desc = attrs.get("bench_naps")
        want_mib = 32.0 if chunk_mib is None else chunk_mib
        if desc and desc["n"] == n and desc["layers"] == LAYERS and desc["chunk_mib"] == want_mib \
                and desc.get("order") == "shuffled" \
                and attrs["extraction"]["state"] == "complete":
            return {**desc, "cached": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    if not source.exists():
        tmp = Path(tempfile.mkdtemp(prefix="bench_naps-src-"))
        print(f"{source} not found: extracting 2000 MNIST test images with the CNN ...", flush=True)
        source = extract_source(tmp)
    try:
        print(f"building {path} ({n} samples) ...", flush=True)
        return {**build_store(path, source, n, chunk_mib), "cached": False}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# -- helpers ---------------------------------------------------------------------
def du(path: Path) -> int:
    return sum(os.stat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def timed(methods: dict, repeats: int, cold: bool, path: Path) -> dict:
    """``{name: (seconds of each run, largest RSS increase, last result)}``.

    The methods run in rounds, each once per round, so that the machine's
    changing load (it is shared) affects them alike.
    """
    out = {name: ([], 0, None) for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            ts, extra, _ = out[name]
            out[name] = (ts, extra, None)
            if cold:
                evict(path)
            with PeakRSS() as m:
                t0 = time.perf_counter()
                res = fn()
                ts.append(time.perf_counter() - t0)
            out[name] = (ts, max(extra, m.peak - m.base), res)
    return out


# -- (a) read only ---------------------------------------------------------------
def arrays(path: Path, var: str = "acts") -> list:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return [root[f"layers/{layer}/{var}"] for layer in LAYERS if var in root[f"layers/{layer}"]]


def read_dask_from_zarr(path: Path, threads: int) -> None:
    """(a1) ``da.from_zarr`` of every array, each block mapped to a 1-element array."""
    import dask
    import dask.array as da

    outs = []
    for a in arrays(path):
        x = da.from_zarr(a)
        outs.append(x.map_blocks(lambda b: np.zeros((1,) * b.ndim, b.dtype),
                                 chunks=tuple((1,) * len(c) for c in x.chunks), dtype=x.dtype).sum())
    dask.compute(*outs, scheduler="threads", num_workers=threads)


def read_zarr_pool(path: Path, threads: int) -> None:
    """(a2) Zarr region reads of whole chunks, from a pool of threads."""
    jobs = [(a, lo) for a in arrays(path) for lo in range(0, a.shape[0], a.chunks[0])]
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda j: j[0][j[1] : j[1] + j[0].chunks[0]].shape, jobs):
            pass


_tls = threading.local()


def _aligned_buffer(slot: str, nbytes: int) -> np.ndarray:
    bufs = _tls.__dict__.setdefault("b", {})
    b = bufs.get(slot)
    if b is None or b.nbytes < nbytes:
        raw = np.empty(nbytes + 4096, np.uint8)
        start = -raw.ctypes.data % 4096
        b = bufs[slot] = raw[start : start + nbytes]
    return b[:nbytes]


def _read_decode(file: str, nbytes: int, zstd: bool, tail: int = 0) -> int:
    """Read one chunk file and decode it into this thread's (page-aligned) buffer (a crc32c
    ``tail`` after a zstd frame is skipped, not checked: the ceiling reads and decodes only)."""
    import numcodecs

    out = _aligned_buffer("out", nbytes)
    with open(file, "rb", buffering=0) as fh:
        if zstd:
            size = os.fstat(fh.fileno()).st_size
            raw = _aligned_buffer("raw", size)
            got = fh.readinto(raw)
            numcodecs.Zstd().decode(raw[: got - tail], out=out)
        else:
            view, got = memoryview(out), 0
            while got < nbytes:
                got += fh.readinto(view[got:])
    return int(out[0])


def chunk_files(path: Path, var: str = "acts") -> list:
    """``(file, bytes, zstd?, checksum bytes)`` of every chunk of every array ``var``, from the Zarr metadata."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    jobs = []
    for a in arrays(path, var):
        zstd = any(isinstance(c, ZstdCodec) for c in a.metadata.codecs)
        tail = 4 if any(isinstance(c, Crc32cCodec) for c in a.metadata.codecs) else 0
        nbytes = int(np.prod(a.chunks)) * a.dtype.itemsize
        for k in range(-(-a.shape[0] // a.chunks[0])):
            key = a.metadata.encode_chunk_key((k,) + (0,) * (a.ndim - 1))
            jobs.append((os.path.join(str(path), a.path, *key.split("/")), nbytes, zstd, tail))
    return jobs


def read_decode_dask(path: Path, threads: int, variables=("acts",)) -> None:
    """(a3) Every chunk file read and decoded into a reused buffer per thread, as dask tasks."""
    import dask

    task = dask.delayed(_read_decode, pure=True)
    dask.compute([task(*j) for var in variables for j in chunk_files(path, var)],
                 scheduler="threads", num_workers=threads)


# -- (b), (c), (d) ----------------------------------------------------------------
def run_naps(path: Path, threads: int, aligned: bool) -> tuple[dict, float]:
    import dask

    import inntrospect

    t0 = time.perf_counter()
    lazy = inntrospect.naps(str(path), aligned=aligned)
    t_graph = time.perf_counter() - t0
    (out,) = dask.compute(lazy, scheduler="threads", num_workers=threads)
    return out, t_graph


def persisted_aligned(path: Path, threads: int, repeats: int, cold: bool) -> tuple[float, list, int, dict]:
    """Persist the alignment, time aligned NAPs reading it, then remove it from the store."""
    import dask
    import zarr

    import inntrospect
    from inntrospect import store as st

    with dask.config.set(scheduler="threads", num_workers=threads):
        t0 = time.perf_counter()
        inntrospect.align(str(path), persist=True)
        t_persist = time.perf_counter() - t0
    assert st.store_attrs(path)["steps"]["align"]["state"] == "complete"
    runs = timed({"c2": lambda: run_naps(path, threads, True)}, repeats, cold, path)
    ts, mem, (res, _) = runs["c2"]
    root = zarr.open_group(str(path), mode="r+")
    for layer in LAYERS:
        if "aligned" in root[f"layers/{layer}"]:
            del root[f"layers/{layer}/aligned"]
    steps = dict(st.store_attrs(path).get("steps", {}))
    steps.pop("align", None)
    st.update_attrs(path, steps=steps)
    return t_persist, ts, mem, res


def run_xarray(path: Path, threads: int) -> dict:
    import dask

    import inntrospect

    tree = inntrospect.open_store(str(path))
    lazy = {layer: tree[f"layers/{layer}"].acts.groupby("group").mean() for layer in LAYERS}
    (out,) = dask.compute(lazy, scheduler="threads", num_workers=threads)
    return out


# -- (e) distributed ----------------------------------------------------------------
def _hwm() -> int:
    """The kernel's high-water mark of this process's RSS (``VmHWM``), bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _start_sampler(dask_worker=None):
    """In a worker: a thread recording its RSS every 5 ms (a cross-check of ``VmHWM``)."""
    import psutil

    proc = psutil.Process()
    state = {"peak": proc.memory_info().rss, "stop": threading.Event()}

    def sample():
        while not state["stop"].wait(0.005):
            state["peak"] = max(state["peak"], proc.memory_info().rss)

    threading.Thread(target=sample, daemon=True, name="peak-rss").start()
    dask_worker._bench_peak = state
    return state["peak"]


def _worker_report(dask_worker=None):
    """In a worker: pid, peak RSS (VmHWM and sampled), RSS now, and what was spilled to disk.

    ``VmHWM`` is the peak of the worker process since it started (imports and
    compiled kernels included); ``ru_maxrss`` would be no use: a process
    started by fork + exec inherits its parent's peak there.
    """
    import psutil

    state = dask_worker._bench_peak
    state["stop"].set()
    data = dask_worker.data
    slow = getattr(data, "slow", None)
    spilled = getattr(data, "spilled_total", None)
    return {
        "pid": os.getpid(),
        "peak": state["peak"],
        "hwm": _hwm(),
        "rss": psutil.Process().memory_info().rss,
        "slow_keys": len(slow) if slow is not None else 0,
        "spilled_disk_bytes": int(getattr(spilled, "disk", 0)) if spilled is not None else 0,
        "paused": str(dask_worker.status),
    }


def run_cluster(path: Path, workers: int, threads: int, limit: int) -> dict:
    """NAPs of every layer on a LocalCluster of worker processes with ``limit`` bytes each."""
    import dask
    from distributed import Client, LocalCluster

    import inntrospect

    with dask.config.set({"distributed.logging.distributed": "error"}), \
            LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                         memory_limit=limit, dashboard_address=None) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        idle = client.run(lambda: __import__("psutil").Process().memory_info().rss)
        client.run(_start_sampler)
        t0 = time.perf_counter()
        out = {k: ds.compute() for k, ds in inntrospect.naps(str(path)).items()}
        first = time.perf_counter() - t0  # imports, numba kernels loaded in each worker
        t0 = time.perf_counter()
        out = {k: ds.compute() for k, ds in inntrospect.naps(str(path)).items()}
        seconds = time.perf_counter() - t0
        reports = client.run(_worker_report)
        after = client.run(os.getpid)
        logs = client.get_worker_logs()
        warnings = [line for w in logs.values() for level, line in w
                    if level in ("WARNING", "ERROR", "CRITICAL")]
    return {"seconds": seconds, "first": first, "pids": pids, "after": after, "idle": idle, "reports": reports,
            "warnings": warnings, "result": out}


# -- main -------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=40000, help="store size in samples (default 40000: 4.9 GB of acts)")
    p.add_argument("--store", type=Path, default=None, help=f"the cached store (default {STORE})")
    p.add_argument("--source", type=Path, default=SOURCE, help="store of real samples to repeat")
    p.add_argument("--chunk-mib", type=float, default=None, help="chunk size (default: the extraction's, 32 MiB)")
    p.add_argument("--rebuild", action="store_true", help="build the store even if it is cached")
    p.add_argument("--threads", type=int, default=2, help="dask threads of a-d (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of a-d (median)")
    p.add_argument("--cold", action="store_true", help="evict the store from the page cache before every run")
    p.add_argument("--workers", type=int, default=2, help="(e) worker processes")
    p.add_argument("--worker-threads", type=int, default=1, help="(e) threads per worker")
    p.add_argument("--memory-limit", type=float, default=0.75, help="(e) memory limit per worker, GB (default 0.75)")
    p.add_argument("--skip-xarray", action="store_true", help="leave (d) out (the slowest)")
    p.add_argument("--quick", action="store_true", help="tiny run (1000 samples, 4 MiB chunks, 1 repeat)")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats = 1000, 1
        a.chunk_mib = a.chunk_mib or 4.0
        a.workers, a.memory_limit = 1, min(a.memory_limit, 0.5)
    store = a.store or Path(str(STORE_QUICK if a.quick else STORE).format(n=a.samples))
    load0 = os.getloadavg()

    desc = get_store(store, a.source, a.samples, a.chunk_mib, a.rebuild)
    acts = arrays(store)
    acts_bytes = sum(x.nbytes for x in acts)
    grads_bytes = sum(x.nbytes for x in arrays(store, "grads"))
    disk = {v: sum(du(store / "layers" / k / v) for k in LAYERS) for v in ("acts", "grads")}
    R, T = a.repeats, a.threads
    med = statistics.median

    import dask  # noqa: F401  (imports and the numba kernels warmed up outside the timings)

    import inntrospect  # noqa: F401

    t0 = time.perf_counter()
    from inntrospect.analysis.compiled import kernels

    kernels()
    t_numba = time.perf_counter() - t0
    warm_b, _ = run_naps(store, T, False)  # first call: numba kernels compiled or loaded
    warm_c, _ = run_naps(store, T, True)
    del warm_b, warm_c

    graph_b, graph_c = [], []

    def nb():
        out, tgr = run_naps(store, T, False)
        graph_b.append(tgr)
        return out

    def nc():
        out, tgr = run_naps(store, T, True)
        graph_c.append(tgr)
        return out

    methods = {
        "a1": lambda: read_dask_from_zarr(store, T),
        "a2": lambda: read_zarr_pool(store, T),
        "a3": lambda: read_decode_dask(store, T),
        "b": nb,
        "c": nc,
        "g": lambda: read_decode_dask(store, T, ("acts", "grads")),
    }
    if not a.skip_xarray:
        methods["d"] = lambda: run_xarray(store, T)
    runs = timed(methods, R, a.cold, store)
    (ta1, ma1, _), (ta2, ma2, _), (ta3, ma3, _) = runs["a1"], runs["a2"], runs["a3"]
    (tb, mb, res_b), (tc, mc, res_c), (tg, mg, _) = runs["b"], runs["c"], runs["g"]
    td, md, res_d = runs.get("d", (None, 0, None))

    # checks: b against the xarray route (float32 means), c's counts against b's
    for layer in LAYERS:
        b, c = res_b[layer], res_c[layer]
        np.testing.assert_array_equal(b["count"].values, c["count"].values)
        if res_d is not None:
            np.testing.assert_allclose(b.nap.values, res_d[layer].values, rtol=1e-4, atol=1e-6)

    # (c2) the other route to aligned NAPs: align once into the store (`inntrospect align`),
    # then NAPs read the persisted `aligned` arrays; removed again afterwards (cached store)
    tp, tc2, mc2, res_c2 = persisted_aligned(store, T, R, a.cold)
    for layer in LAYERS:  # the same aligned NAPs either way
        np.testing.assert_allclose(res_c2[layer].nap.values, res_c[layer].nap.values, rtol=1e-9, atol=1e-12)
    reads = {"a1": ta1, "a2": ta2, "a3": ta3}
    best = max(reads, key=lambda k: acts_bytes / med(reads[k]))
    ceiling = acts_bytes / med(reads[best])
    rb, rc = acts_bytes / med(tb), acts_bytes / med(tc)
    rg = (acts_bytes + grads_bytes) / med(tg)

    def rate(ts, nbytes=acts_bytes):
        return nbytes / med(ts) / 1e9

    def spread(ts, nbytes=acts_bytes):
        return f"{nbytes / max(ts) / 1e9:.2f}-{nbytes / min(ts) / 1e9:.2f}"

    built = " (cached)" if desc["cached"] else f" (built in {desc['build_s']:.0f} s)"
    print(f"\nstore {store}{built}")
    print(f"  {a.samples} samples: the {desc['source_samples']} real MNIST CNN samples of {desc['source']}, "
          f"repeated, shuffled ({desc['order']}), with their groups")
    print(f"  layers {', '.join(LAYERS)}; chunks {desc['chunks']} samples ({desc['chunk_mib']:g} MiB)")
    print("  codecs (the extraction's rule): " + ", ".join(
        f"{k}/{v}: {'zstd-1' if c else 'raw'}" for k, d in desc["codecs"].items() for v, c in d.items()))
    print(f"  acts {acts_bytes / 1e9:.2f} GB uncompressed, {disk['acts'] / 1e9:.2f} GB on disk "
          f"(ratio {acts_bytes / disk['acts']:.1f}); grads {grads_bytes / 1e9:.2f} GB, "
          f"{disk['grads'] / 1e9:.2f} GB on disk")
    print(f"  page cache: {'evicted before every run (--cold)' if a.cold else 'warm (the store was read before)'}; "
          f"load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; {R} repeats; "
          f"dask threaded scheduler, {T} threads; numba kernels ready in {t_numba:.2f} s (not timed)")
    print(f"\n{'':<62} {'median s':>8} {'GB/s':>6} {'range':>11} {'ratio':>12} {'peak +MB':>9}")

    def row(label, ts, mem, ratio="", nbytes=acts_bytes):
        print(f"{label:<62} {med(ts):>8.2f} {rate(ts, nbytes):>6.2f} {spread(ts, nbytes):>11} {ratio:>12} "
              f"{mem / 1e6:>9.0f}")

    row("(a1) read: da.from_zarr blocks, dropped", ta1, ma1)
    row("(a2) read: zarr reads of whole chunks, thread pool", ta2, ma2)
    row("(a3) read: chunk files read + decoded, reused buffers", ta3, ma3)
    print(f"{'     ceiling a = the fastest: ' + best:<62}")
    row("(b)  inntrospect.naps(store)", tb, mb, f"b/a = {rb / ceiling:.2f}")
    row("(c)  inntrospect.naps(store, aligned=True)", tc, mc, f"c/b = {rc / rb:.2f}")
    row("     read acts + grads (a3 way), GB/s of acts + grads", tg, mg, "", acts_bytes + grads_bytes)
    row("(c2) naps(store, aligned=True), aligned persisted before", tc2, mc2,
        f"c2/b = {acts_bytes / med(tc2) / rb:.2f}")
    print(f"     (persisting them, inntrospect.align(store, persist=True): {tp:.1f} s = "
          f"{acts_bytes / tp / 1e9:.2f} GB/s of acts, once)")
    if td is not None:
        row("(d)  xarray .groupby('group').mean() (flox)", td, md, f"d/b = {acts_bytes / med(td) / rb:.2f}")
    print(f"\nb/a = {rb / ceiling:.2f}  (target >= 0.8)    c/b = {rc / rb:.2f}  (target >= 0.9)")
    print(f"graph building (in b, c): {med(graph_b):.2f} s, {med(graph_c):.2f} s; "
          f"c reads acts + grads: {(acts_bytes + grads_bytes) / med(tc) / 1e9:.2f} GB/s of both, "
          f"{(acts_bytes + grads_bytes) / med(tc) / rg:.2f} of reading them alone")

    # (e)
    limit = int(a.memory_limit * 1e9)
    print(f"\n(e) LocalCluster: {a.workers} worker process(es) x {a.worker_threads} thread(s), "
          f"memory_limit {limit / 1e9:.2f} GB each; acts {acts_bytes / 1e9:.2f} GB = "
          f"{acts_bytes / limit:.1f}x the limit{'' if acts_bytes >= 4 * limit else ' (NOT >= 4x: --quick)'}")
    e = run_cluster(store, a.workers, a.worker_threads, limit)
    for layer in LAYERS:
        np.testing.assert_allclose(e["result"][layer].nap.values, res_b[layer].nap.values, rtol=1e-12)
    print(f"  naps computed twice: {e['first']:.2f} s (first, workers importing and loading the "
          f"kernels), then {e['seconds']:.2f} s = {acts_bytes / e['seconds'] / 1e9:.2f} GB/s (same results as b)")
    for addr, r in e["reports"].items():
        print(f"  worker {addr}: idle {e['idle'][addr] / 1e6:.0f} MB; peak RSS {r['hwm'] / 1e6:.0f} MB "
              f"= {r['hwm'] / limit:.0%} of the limit (VmHWM since it started; sampled every 5 ms: "
              f"{r['peak'] / 1e6:.0f} MB); "
              f"spilled: {r['slow_keys']} keys, {r['spilled_disk_bytes']} bytes on disk; "
              f"pid {e['pids'][addr]} -> {e['after'].get(addr)}")
    same = e["pids"] == e["after"]
    print(f"  workers alive throughout (same addresses and pids): {same}; "
          f"worker log warnings/errors: {len(e['warnings'])}")
    for line in e["warnings"][:10]:
        print("    " + line)


if __name__ == "__main__":
    main()
