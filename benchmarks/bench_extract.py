"""Is extraction as fast as its parts? Model alone, Zarr writes alone, and the real thing.

What is compared
----------------
On the MNIST CNN (``../shared/models/mnist_cnn_shallow``) with layers
``conv2d_24``, ``conv2d_25``, ``flatten_8`` (inntrospect adds the input and
output layers), batch 128, the first ``--samples`` MNIST test images, in one run:

(a) model only: ``KerasModel.compute(x)`` per batch over the corpus (already in
    memory), storing nothing; the same compiled ``tf.function`` the extraction
    calls. Its first call (tracing) is timed apart.
(b) Zarr only: the same arrays written exactly as the extraction writes them
    (its chunk plan, its per-array codec choice: zstd-1 where the first batch
    compresses >= 1.25x, else none; fill value NaN; ``write_empty_chunks=True``),
    no model in the loop. A few batches' arrays are computed once; every array
    is then written chunk-aligned region by region, block by block, until
    ``--samples`` samples are written: by a pool of 2 writer threads as in the
    extraction (b), and one region at a time in the main thread (b1). (b2) is
    the naive set-up for reference: zstd-1 on every array and Zarr's default
    check of every chunk against the fill value.
(c) ``run_extraction`` of ``prepare_extraction(...)`` into a fresh temp store,
    timed without model load and tracing (both printed apart); plus one
    end-to-end ``inntrospect.extract(...)`` call for reference.

Printed: samples/s of a, b, c; s = 1 / (1/a + 1/b), the rate of doing a then b
with no overlap; c/s (target >= 1.0) and c/min(a, b) (1.0 = perfect overlap);
the store's size on disk and compression ratio; and a breakdown of one extra
instrumented extraction run (time in the model, waiting for writes, creating
the store, ...), with ``--cprofile`` also a cProfile of the main thread.

Each timed phase starts after ``os.sync()`` and is the median of ``--repeats``.

Run::

    python benchmarks/bench_extract.py                 # 10000 samples
    python benchmarks/bench_extract.py --samples 4096 --cprofile
    python benchmarks/bench_extract.py --quick         # tiny smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
from common import (  # benchmarks/common.py, beside this script
    print_main_thread,
    print_plan,
    print_rates,
    print_store_size,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "mnist_cnn_shallow"
IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
LABELS = ROOT.parent / "shared" / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
LAYERS = ["conv2d_24", "conv2d_25", "flatten_8"]


def du(path: Path) -> tuple[int, int]:
    """(allocated bytes as ``du`` counts them, apparent bytes) of everything under ``path``."""
    alloc = apparent = 0
    for d, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(d, f))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    os.sync()
    return path


def arrays_of(layers):
    """``(layer, variable, index)`` of every array the extraction writes."""
    for i, info in enumerate(layers):
        yield info, "acts", i
        if info.has_grads:
            yield info, "grads", i


# -- (a) ----------------------------------------------------------------------
def bench_model(m, x: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(x), batch):
        m.compute(x[lo : lo + batch])
    return time.perf_counter() - t0


# -- (b) ----------------------------------------------------------------------
def precompute(m, x: np.ndarray, batch: int, plan, n_pre: int) -> dict:
    """Arrays of the first ``n_pre`` samples, tiled to at least one chunk per array."""
    parts: dict = {}
    for lo in range(0, n_pre, batch):
        acts, grads, _ = m.compute(x[lo : lo + batch])
        for info, var, i in arrays_of(m.layers):
            parts.setdefault((info.name, var), []).append((acts if var == "acts" else grads)[i])
    src = {}
    for (name, var), ps in parts.items():
        a = np.concatenate(ps)
        c = plan.chunks[name]
        if len(a) < c:
            a = np.concatenate([a] * -(-c // len(a)))[:c]
        src[(name, var)] = np.ascontiguousarray(a, dtype=np.float32)
    return src


def create_arrays(base: Path, layers, plan, n: int, codecs: dict, write_empty_chunks: bool) -> dict:
    """Arrays like the store's: fill value NaN, the given codec record per array."""
    import zarr

    from inntrospect.store import zarr_codecs

    root = zarr.open_group(str(base), mode="w", zarr_format=3)
    out = {}
    for info, var, _ in arrays_of(layers):
        out[(info.name, var)] = root.create_array(
            f"layers/{info.name}/{var}", shape=(n, *info.shape), chunks=(plan.chunks[info.name], *info.shape),
            dtype="float32", compressors=zarr_codecs(codecs[info.name][var]), fill_value=np.nan,
            config={"write_empty_chunks": write_empty_chunks},
        )
    return out


def bench_writes(base: Path, layers, plan, n: int, src: dict, threads: int, codecs: dict,
                 write_empty_chunks: bool = True) -> float:
    """Write ``n`` samples of every array, chunk-aligned, block by block; return seconds."""
    arrays = create_arrays(base, layers, plan, n, codecs, write_empty_chunks)  # not timed
    os.sync()

    def write(key, lo, hi):
        arrays[key][lo:hi] = src[key][: hi - lo]

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    try:
        for blo in range(0, n, plan.block):
            bhi = min(n, blo + plan.block)
            jobs = []
            for key in arrays:
                c = plan.chunks[key[0]]
                jobs += [(lo, key, min(lo + c, bhi)) for lo in range(blo, bhi, c)]
            jobs.sort(key=lambda j: j[0])  # in sample order, as a batch loop produces them
            if pool is None:
                for lo, key, hi in jobs:
                    write(key, lo, hi)
            else:
                futures = [pool.submit(write, key, lo, hi) for lo, key, hi in jobs]
                wait(futures)
                for f in futures:
                    f.result()
    finally:
        if pool is not None:
            pool.shutdown()
    return time.perf_counter() - t0


# -- (c) ----------------------------------------------------------------------
class Timers:
    """Accumulated wall time of a few functions of one extraction run (main thread)."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.t[label] = self.t.get(label, 0.0) + time.perf_counter() - t0
                self.calls[label] = self.calls.get(label, 0) + 1

        return timed


def time_extractions(ex, tmp: Path, repeats: int, run_extraction) -> tuple[list[float], tuple[int, int]]:
    """(c): seconds of each of ``repeats`` whole extractions into fresh stores under ``tmp``, and
    the first store's size on disk (:func:`du`); the stores are removed."""
    seconds, size = [], None
    for r in range(repeats):
        path = fresh(tmp / f"c{r}.zarr")
        t0 = time.perf_counter()
        run_extraction(dataclasses.replace(ex, path=path), overwrite=True)
        seconds.append(time.perf_counter() - t0)
        size = size or du(path)
        shutil.rmtree(path)
    return seconds, size


def instrumented_run(ex, run_extraction) -> tuple[float, Timers]:
    """One extraction with timers around its steps (patched for this call only)."""
    xm = importlib.import_module("inntrospect.extraction.writer")
    sm = importlib.import_module("inntrospect.store.nodes")
    cm = importlib.import_module("inntrospect.extraction.corpus")
    timers = Timers()
    saved = [
        (xm._Writes, "wait", xm._Writes.wait), (xm._Writes, "shutdown", xm._Writes.shutdown),
        (xm, "check_finite", xm.check_finite),
        (sm, "create_store", sm.create_store), (sm, "consolidate", sm.consolidate),
        (cm.Corpus, "read", cm.Corpus.read),
    ]
    compute = ex.model.compute
    # the caller's waits for the writes, in which it writes queued chunks itself
    xm._Writes.wait = timers.wrap("wait for writes, writing queued chunks", xm._Writes.wait)
    xm._Writes.shutdown = timers.wrap("close: the last writes, writing queued chunks", xm._Writes.shutdown)
    xm.check_finite = timers.wrap("check_finite", xm.check_finite)
    sm.create_store = timers.wrap("store.create_store", sm.create_store)
    st_pkg = importlib.import_module("inntrospect.store")
    saved.append((st_pkg, "create_store", st_pkg.create_store))
    st_pkg.create_store = sm.create_store
    sm.consolidate = timers.wrap("store.consolidate (incl. in create_store)", sm.consolidate)
    cm.Corpus.read = timers.wrap("Corpus.read (batches)", cm.Corpus.read)
    ex.model.compute = timers.wrap("model.compute", compute)
    try:
        t0 = time.perf_counter()
        run_extraction(ex, overwrite=True)
        total = time.perf_counter() - t0
    finally:
        for obj, name, fn in saved:
            setattr(obj, name, fn)
        del ex.model.compute
    return total, timers


def cprofile_run(ex, run_extraction, top: int) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    run_extraction(ex, overwrite=True)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000, help="corpus size (default 10000, all of MNIST test)")
    p.add_argument("--batch", type=int, default=128, help="inference batch size")
    p.add_argument("--chunk-mib", type=float, default=None, help="chunk size (default: the extraction's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of a, b, c (median)")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    p.add_argument("--cprofile", action="store_true", help="also cProfile one extraction (main thread)")
    p.add_argument("--quick", action="store_true", help="tiny run: 512 samples, chunks of 1 MiB, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats = 512, 1
        a.chunk_mib = a.chunk_mib or 1.0
    R = a.repeats
    load0 = os.getloadavg()

    t0 = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow  # noqa: F401  (timed here so that nothing later pays for it)
    t_tf = time.perf_counter() - t0

    import inntrospect
    from inntrospect.extraction.corpus import read_corpus
    from inntrospect.extraction.local import prepare_extraction, run_extraction
    from inntrospect.extraction.prepare import measure_ratios
    from inntrospect.store.codecs import CODEC, choose_codecs

    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import write_mnist_corpus

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract-", dir=a.tmp))
    try:
        t0 = time.perf_counter()
        csv = write_mnist_corpus(IMAGES, LABELS, tmp / "corpus", limit=a.samples, batch=500)
        t_corpus = time.perf_counter() - t0
        corpus = read_corpus(csv)
        n = corpus.n_samples
        x = corpus.read(0, n)  # the corpus's own samples, in its order

        t0 = time.perf_counter()
        ex = prepare_extraction(str(a.model), csv, tmp / "c0.zarr", layers=LAYERS, batch_size=a.batch,
                                chunk_mib=a.chunk_mib)
        t_load = time.perf_counter() - t0
        m, plan = ex.model, ex.plan  # the extraction's own model object and chunk plan
        codecs = choose_codecs(measure_ratios(ex))  # as a fresh extraction chooses them
        zstd_all = {name: {var: dict(CODEC) for var in v} for name, v in codecs.items()}
        raw_per_sample = sum(info.bytes_per_sample for info, _, _ in arrays_of(m.layers))
        raw = n * raw_per_sample

        # (a)
        t0 = time.perf_counter()
        m.compute(x[: a.batch])
        t_trace = time.perf_counter() - t0
        ta = []
        for _ in range(R):
            os.sync()
            ta.append(bench_model(m, x, a.batch))

        # (b)
        n_pre = min(n, max(8 * a.batch, max(c for c in plan.chunks.values() if c < plan.block) if len(set(plan.chunks.values())) > 1 else 0))
        src = precompute(m, x, a.batch, plan, n_pre)
        tb, tb1, tb2 = [], [], []
        for _ in range(R):
            tb.append(bench_writes(fresh(tmp / "b"), m.layers, plan, n, src, 2, codecs))
            tb1.append(bench_writes(fresh(tmp / "b"), m.layers, plan, n, src, 1, codecs))
            tb2.append(bench_writes(fresh(tmp / "b2"), m.layers, plan, n, src, 2, zstd_all, False))
        b_alloc, b_apparent = du(tmp / "b")
        b2_alloc, _ = du(tmp / "b2")
        shutil.rmtree(tmp / "b")
        shutil.rmtree(tmp / "b2")
        del src

        # (c)
        t0 = time.perf_counter()
        ex.model.compute(x[: a.batch])
        t_trace_c = time.perf_counter() - t0
        tc, (c_alloc, c_apparent) = time_extractions(ex, tmp, R, run_extraction)
        t_inst, timers = instrumented_run(dataclasses.replace(ex, path=fresh(tmp / "ci.zarr")), run_extraction)
        shutil.rmtree(tmp / "ci.zarr")
        prof = None
        if a.cprofile:
            prof = cprofile_run(dataclasses.replace(ex, path=fresh(tmp / "cp.zarr")), run_extraction, 25)
            shutil.rmtree(tmp / "cp.zarr")
        del ex

        # end to end, as a user calls it
        fresh(tmp / "e2e.zarr")
        t0 = time.perf_counter()
        inntrospect.extract(str(a.model), csv, tmp / "e2e.zarr", layers=LAYERS, batch_size=a.batch,
                            chunk_mib=a.chunk_mib, overwrite=True)
        t_e2e = time.perf_counter() - t0
        shutil.rmtree(tmp / "e2e.zarr")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # -- report ----------------------------------------------------------------
    med = statistics.median
    ra, rb, rb1, rc = n / med(ta), n / med(tb), n / med(tb1), n / med(tc)
    s = 1.0 / (1.0 / ra + 1.0 / rb)

    print(f"\nMNIST CNN, layers {', '.join(i.name for i in m.layers)}; {n} samples, batch {a.batch}")
    print_plan(codecs, plan, raw_per_sample, raw, load0[0], R)
    print("\nnot counted in a, b, c:")
    print(f"  import tensorflow          {t_tf:6.2f} s")
    print(f"  prepare_extraction         {t_load:6.2f} s  (loads the model, reads the corpus)")
    print(f"  first compute (tracing)    {t_trace:6.2f} s  (a), {t_trace_c:.2f} s (c)")
    print(f"  write_corpus               {t_corpus:6.2f} s")
    print_rates([
        ("(a) model only: compute() per batch", ta, ra),
        ("(b) Zarr writes only, 2 writer threads", tb, rb),
        ("(b1) Zarr writes only, 1 thread", tb1, rb1),
        ("(b2) as b, zstd-1 on all, empty-chunk check", tb2, n / med(tb2)),
        ("(c) run_extraction", tc, rc),
    ], n, s, raw_per_sample)
    print(f"\nc/s        = {rc / s:.2f}   (target >= 1.0)")
    print(f"c/min(a,b) = {rc / min(ra, rb):.2f}   (1.0 = model and writes fully overlapped)")
    print(f"end to end inntrospect.extract(): {t_e2e:.2f} s = {n / t_e2e:,.0f} samples/s "
          "(model load, tracing, store creation, opening included)")
    print_store_size(c_alloc, c_apparent, raw)
    print(f"arrays of (b) on disk: {b_alloc / 1e9:.3f} GB allocated, ratio {raw / b_alloc:.2f}; "
          f"(b2) {b2_alloc / 1e9:.3f} GB, ratio {raw / b2_alloc:.2f}")

    print_main_thread(timers, t_inst, n)
    if prof:
        print("\ncProfile of one run_extraction (main thread only, by tottime):")
        print(prof)


if __name__ == "__main__":
    main()
