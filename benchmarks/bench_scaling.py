"""Do NAPs scale with dask workers? ``inntrospect.naps`` on 1 and 2 worker processes, side by side.

What is compared
----------------
``inntrospect.naps(store)`` (all layers, plain NAPs, computed in one
``dask.compute``) on

* ``LocalCluster(n_workers=1, threads_per_worker=1, processes=True)``
* ``LocalCluster(n_workers=2, threads_per_worker=1, processes=True)``
* ``LocalCluster(n_workers=1, threads_per_worker=2, processes=True)`` (threads instead of processes)
* dask's threaded scheduler with 1 and 2 threads (no cluster),

printing GB/s of uncompressed activations and the speed-up of 2 workers over 1.
Every cluster is started once and warmed up with one untimed run (the workers
import inntrospect and load the numba kernels); then ``--repeats`` timed runs,
each with the page cache of the store's files evicted first (``common.evict``,
``posix_fadvise(DONTNEED)``; ``fincore`` checks that it worked) and, with the
same count, runs with the page cache warm. The results of every run are
checked against the first threaded one (``np.allclose``).

The store: bench_naps.py's (real MNIST CNN samples of ``--source`` repeated and
shuffled, the extraction's chunk plan (32 MiB chunks) and codec rule (zstd-1 on
all activations), built once and cached in /tmp/inntrospect-bench/ and shared
with bench_naps.py when the sample counts match); without ``--source``, or with
``--quick``, a synthetic ReLU-like store from ``store_from_arrays``.

Run::

    python benchmarks/bench_scaling.py              # 40,000 samples, 4.9 GB of activations (bench_naps' store)
    python benchmarks/bench_scaling.py --samples 24000   # 3.0 GB
    python benchmarks/bench_scaling.py --quick      # tiny synthetic store, < 20 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import evict  # noqa: E402  (benchmarks/common.py, beside this script)

SOURCE = Path("/tmp/cnn.zarr")


def synthetic_store(path: Path, n: int, chunk: int) -> None:
    """A small ReLU-like store (80 % zeros), 10 groups, zstd-1, no model needed."""
    from inntrospect.testing import store_from_arrays

    rng = np.random.default_rng(0)
    shapes = {"conv": (13, 13, 32), "pool": (6, 6, 32), "dense": (256,)}
    acts = {k: np.maximum(rng.standard_normal((n, *s), dtype=np.float32) - 0.85, 0) for k, s in shapes.items()}
    groups = np.array([str(g) for g in rng.integers(0, 10, n)])
    store_from_arrays(path, acts, groups, chunks=chunk, codec={"name": "zstd", "level": 1})


def acts_files(path: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs
            if f"{os.sep}acts{os.sep}" in d + os.sep and f != "zarr.json"]


def resident(files: list[str]) -> tuple[int, int] | None:
    """(bytes in the page cache, bytes) of ``files``, by util-linux ``fincore``; None without it."""
    if not shutil.which("fincore"):
        return None
    res, total = 0, 0
    for i in range(0, len(files), 200):
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *files[i:i + 200]],
                             capture_output=True, text=True).stdout
        for line in out.split("\n"):
            if line.strip():
                r, s = line.split()
                res, total = res + int(r), total + int(s)
    return res, total


def compute(lazy: dict, client=None, threads: int | None = None, workers: list | None = None) -> dict:
    """All layers in one computation: the threaded scheduler, or ``client`` (restricted to ``workers``)."""
    import dask

    if client is None:
        (out,) = dask.compute(lazy, scheduler="threads", num_workers=threads)
        return out
    keys = list(lazy)
    return dict(zip(keys, client.gather(client.compute([lazy[k] for k in keys], workers=workers))))


def timed_runs(path: Path, label: str, repeats: int, modes: list[str], files: list[str], check: list,
               t_start=None, **kw) -> dict:
    """Warm-up once, then ``repeats`` rounds of (cold, warm) runs; seconds per mode, load, eviction check."""
    import inntrospect

    ts = {m: [] for m in modes}
    evicted = []
    t0 = time.perf_counter()
    out = compute(inntrospect.naps(str(path)), **kw)  # warm-up: imports, kernels, page cache
    t_warmup = time.perf_counter() - t0
    check.append((label, out))
    load0 = os.getloadavg()[0]
    for _ in range(repeats):
        for m in modes:
            if m == "cold":
                evict(path)
                r = resident(files)
                if r is not None:
                    evicted.append(r[0] / max(r[1], 1))
            t0 = time.perf_counter()
            out = compute(inntrospect.naps(str(path)), **kw)
            ts[m].append(time.perf_counter() - t0)
            check.append((label, out))
    load1 = os.getloadavg()[0]
    return {"label": label, "ts": ts, "start": t_start, "warmup": t_warmup, "load": (load0, load1),
            "resident_after_evict": max(evicted) if evicted else None}


def cluster_runs(path: Path, cluster: dict, labels: dict, repeats: int, modes: list[str], files: list[str],
                 check: list) -> list[dict]:
    """Start a LocalCluster; ``labels``: ``{label: number of its workers the tasks may use (None: all)}``."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.logging.distributed": "error"}):
        t0 = time.perf_counter()
        with LocalCluster(processes=True, dashboard_address=None, **cluster) as lc, Client(lc) as client:
            client.wait_for_workers(cluster["n_workers"])
            t_start = time.perf_counter() - t0
            addrs = sorted(client.scheduler_info()["workers"])
            return [timed_runs(path, label, repeats, modes, files, check, t_start, client=client,
                               workers=None if k is None else addrs[:k]) for label, k in labels.items()]


def _l(R: tuple, label: str) -> tuple:
    return (R[0], label, *R[1:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=40000,
                   help="store size (default 40000: 4.9 GB of activations, bench_naps.py's store)")
    p.add_argument("--source", type=Path, default=SOURCE,
                   help="store of real samples to repeat (bench_naps.py's builder); synthetic if missing")
    p.add_argument("--store", type=Path, default=None, help="the cached store (default: bench_naps.py's path)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration and mode (median)")
    p.add_argument("--modes", default="cold,warm", help="page cache: cold (evicted before each run), warm, or both")
    p.add_argument("--quick", action="store_true", help="tiny synthetic store, 1 repeat (< 20 s)")
    a = p.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    tmp = None
    if a.quick:
        a.repeats = 1
        tmp = Path(tempfile.mkdtemp(prefix="bench_scaling-"))
        store = a.store or tmp / "quick.zarr"
        synthetic_store(store, 2000, 256)
        desc = "synthetic ReLU-like, 2000 samples, layers conv (13, 13, 32), pool (6, 6, 32), dense (256), " \
               "256-sample chunks, zstd-1 (--quick)"
    elif a.source.exists():
        import bench_naps

        store = a.store or Path(str(bench_naps.STORE).format(n=a.samples))
        d = bench_naps.get_store(store, a.source, a.samples, None, False)
        build_s = d["build_s"]
        built = " (cached)" if d["cached"] else f" (built in {build_s:.0f} s)"
        desc = (f"bench_naps.py's store{built}: "
                f"{a.samples} samples, the {d['source_samples']} real MNIST CNN samples of {d['source']} repeated "
                f"and shuffled; layers {', '.join(d['layers'])}; chunks {d['chunks']} samples "
                f"({d['chunk_mib']:g} MiB); acts zstd-1")
    else:
        store = a.store or Path(tempfile.gettempdir()) / "inntrospect-bench" / f"scaling_synth_{a.samples}.zarr"
        from inntrospect.store import is_store

        if not is_store(store):
            store.parent.mkdir(parents=True, exist_ok=True)
            synthetic_store(store, a.samples, 2048)
        desc = f"synthetic ReLU-like, {a.samples} samples (no --source {a.source})"

    try:
        import zarr

        root = zarr.open_group(str(store), mode="r")
        layers = list(root["layers"].group_keys())
        acts_bytes = sum(root[f"layers/{k}/acts"].nbytes for k in layers)
        files = acts_files(store)
        disk = sum(os.path.getsize(f) for f in files)
        load_start = os.getloadavg()
        T1, T2 = "threaded scheduler, 1 thread", "threaded scheduler, 2 threads"
        W1, W2, W12 = ("LocalCluster 1 worker x 1 thread", "LocalCluster 2 workers x 1 thread",
                       "LocalCluster 1 worker x 2 threads")
        check: list = []
        R = (store, a.repeats, modes, files, check)
        results = [timed_runs(*_l(R, T1), threads=1), timed_runs(*_l(R, T2), threads=2)]
        one = {"n_workers": 1, "threads_per_worker": 1}
        two = {"n_workers": 2, "threads_per_worker": 1}
        if a.quick:  # one cluster of 2 workers (worker start-up dominates): "1 worker" = tasks restricted to one
            W1 += " (of 2, --quick)"
            results += cluster_runs(store, two, {W1: 1, W2: None}, *R[1:])  # (1 worker x 2 threads left out)
        else:
            results += cluster_runs(store, one, {W1: None}, *R[1:])
            results += cluster_runs(store, two, {W2: None}, *R[1:])
            results += cluster_runs(store, {"n_workers": 1, "threads_per_worker": 2}, {W12: None}, *R[1:])
        ref = check[0][1]
        for label, out in check[1:]:
            for k in layers:
                assert np.array_equal(out[k]["count"].values, ref[k]["count"].values), (label, k)
                assert np.allclose(out[k].nap.values, ref[k].nap.values, rtol=1e-10, atol=1e-12), (label, k)

        import dask
        import distributed

        med = statistics.median
        cores = os.cpu_count()
        print(f"store {store}\n  {desc}")
        print(f"  acts {acts_bytes / 1e9:.2f} GB uncompressed, {disk / 1e9:.2f} GB on disk, {len(files)} chunk files")
        print(f"  {cores} cores; dask {dask.__version__}, distributed {distributed.__version__}; "
              f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}; "
              f"{a.repeats} repeats per mode; GB/s = GB of uncompressed activations / s")
        ev = [r["resident_after_evict"] for r in results if r["resident_after_evict"] is not None]
        if "cold" in modes:
            print("  page cache eviction (common.evict, posix_fadvise DONTNEED): " + (
                f"worked: at most {max(ev):.1%} of the activation files still resident after it (fincore)"
                if ev and max(ev) < 0.05 else
                f"DID NOT fully work: up to {max(ev):.1%} still resident (fincore)" if ev else
                "not checked (no fincore)"))
        hdr = f"{'':<50}" + "".join(f" {m + ' s':>8} {m + ' GB/s':>10} {'range':>11}" for m in modes) \
            + f" {'start s':>7} {'warm-up s':>9} {'load avg':>11}"
        print("\n" + hdr)
        print("-" * len(hdr))
        rate = {}
        for r in results:
            cells = ""
            for m in modes:
                ts = r["ts"][m]
                rate[(r["label"], m)] = acts_bytes / med(ts) / 1e9
                cells += (f" {med(ts):>8.2f} {rate[(r['label'], m)]:>10.2f} "
                          f"{acts_bytes / max(ts) / 1e9:>5.2f}-{acts_bytes / min(ts) / 1e9:<5.2f}")
            start = f"{r['start']:.1f}" if r["start"] is not None else "-"
            print(f"{r['label']:<50}{cells} {start:>7} {r['warmup']:>9.2f} "
                  f"{r['load'][0]:>5.2f}-{r['load'][1]:<5.2f}")
        print()
        for m in modes:
            one, two = rate[(W1, m)], rate[(W2, m)]
            t1, t2 = rate[(T1, m)], rate[(T2, m)]
            thr = f"1 worker x 2 threads / 1 x 1: {rate[(W12, m)] / one:.2f}x; " if (W12, m) in rate else ""
            print(f"{m}: speed-up 2 workers / 1 worker = {two / one:.2f}x   ({thr}"
                  f"threaded 2 / 1 threads: {t2 / t1:.2f}x; 2 workers / threaded 2 threads: {two / t2:.2f}x)")
        print(f"\nresults equal across all {len(check)} runs (np.allclose vs the first threaded run): True")
        print(f"load average at end {os.getloadavg()[0]:.2f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
