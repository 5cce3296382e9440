"""What do the chunks' checksums cost? NAPs and extraction with and without crc32c, side by side.

What is compared
----------------
Every array inntrospect writes carries Zarr v3's ``crc32c`` codec (4 bytes after
each encoded chunk, verified on every read). Stores without it (written before
checksums) are what ``inntrospect.store.codecs.CHECKSUM = None`` writes; this
script builds both, in one run, and compares:

(n) the NAP pass: two stores of real MNIST CNN activations built as
    ``bench_naps.py`` builds its store (the samples of a small extraction,
    ``--source``, repeated with their groups to ``--samples``; the extraction's
    chunk plan and codec rule: zstd-1 for every ``acts`` and the dense
    gradients, raw for ``conv2d_24``'s), one with checksums, one without.
    ``inntrospect.naps(store)`` (reads acts) and ``naps(store, aligned=True)``
    (reads acts and grads, 70 % of the gradients' bytes raw: the checksum's
    worst case, computed over every raw byte) on each, dask threaded
    scheduler, ``--threads`` threads, page cache warm; in rounds (each once per
    round, which goes first alternating), median of ``--repeats``. GB/s of uncompressed activations.
(v) ``inntrospect.verify(store)`` of the checksummed store (every chunk of every
    array read and checked), GB/s of all its uncompressed arrays; for reference.
(x) extraction: ``run_extraction`` of the MNIST CNN on the first
    ``--extract-samples`` MNIST test images into a fresh store, with and without
    checksums, in rounds (alternating), median; samples/s (model load and tracing excluded).

Targets: with / without >= 0.95 for (n) and (x).

Run::

    python benchmarks/bench_checksum.py                 # 20,000 samples for (n), 10,000 images for (x)
    python benchmarks/bench_checksum.py --quick         # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_naps import IMAGES, LABELS, LAYERS, MODEL, ROOT, SOURCE, build_store, extract_source  # noqa: E402


def checksum(value):
    """Set what new arrays carry (``"crc32c"`` or None); returns the setting before."""
    from inntrospect.store import codecs

    before, codecs.CHECKSUM = codecs.CHECKSUM, value
    return before


def alternate(r: int) -> tuple[str, str]:
    """The order of round ``r``: with checksums first in even rounds, last in odd ones."""
    return ("with", "without") if r % 2 == 0 else ("without", "with")


def timed_naps(path: Path, threads: int, aligned: bool) -> float:
    import dask

    import inntrospect

    t0 = time.perf_counter()
    dask.compute(inntrospect.naps(str(path), aligned=aligned), scheduler="threads", num_workers=threads)
    return time.perf_counter() - t0


def stored_bytes(path: Path, var: str) -> int:
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return sum(root[f"layers/{layer}/{var}"].nbytes for layer in LAYERS)


def bench_naps(tmp: Path, source: Path, n: int, chunk_mib, threads: int, repeats: int) -> dict:
    stores = {}
    for label, value in (("with", "crc32c"), ("without", None)):
        before = checksum(value)
        try:
            t0 = time.perf_counter()
            build_store(tmp / f"naps_{label}.zarr", source, n, chunk_mib)
            stores[label] = (tmp / f"naps_{label}.zarr", time.perf_counter() - t0)
        finally:
            checksum(before)
    acts = stored_bytes(stores["with"][0], "acts")
    grads = stored_bytes(stores["with"][0], "grads")
    for path, _ in stores.values():  # warm: page cache, numba kernels
        timed_naps(path, threads, False)
        timed_naps(path, threads, True)
    ts = {(label, aligned): [] for label in stores for aligned in (False, True)}
    for r in range(repeats):
        for aligned in (False, True):
            for label in alternate(r):
                ts[label, aligned].append(timed_naps(stores[label][0], threads, aligned))
    import inntrospect

    inntrospect.verify(stores["with"][0])  # warm
    tv = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        report = inntrospect.verify(stores["with"][0])
        tv.append(time.perf_counter() - t0)
    assert report.ok and not report.unchecked, report
    import zarr

    root = zarr.open_group(str(stores["with"][0]), mode="r")
    everything = sum(node.nbytes for _, node in root.members(max_depth=None) if isinstance(node, zarr.Array))
    return {"ts": ts, "tv": tv, "acts": acts, "grads": grads, "all": everything, "report": report,
            "build": {k: v[1] for k, v in stores.items()}}


def bench_extract(tmp: Path, samples: int, batch: int, chunk_mib, repeats: int) -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from inntrospect.extraction.local import prepare_extraction, run_extraction

    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import write_mnist_corpus

    csv = write_mnist_corpus(IMAGES, LABELS, tmp / "corpus", limit=samples, batch=500)
    ex = prepare_extraction(str(MODEL), csv, tmp / "x.zarr", layers=LAYERS, batch_size=batch,
                            chunk_mib=chunk_mib)
    x = ex.corpus.read(0, min(batch, ex.corpus.n_samples))
    ex.model.compute(x)  # tracing, not timed
    ts = {"with": [], "without": []}
    for r in range(repeats):
        for label in alternate(r):
            value = "crc32c" if label == "with" else None
            path = tmp / f"x_{label}.zarr"
            shutil.rmtree(path, ignore_errors=True)
            before = checksum(value)
            try:
                os.sync()
                t0 = time.perf_counter()
                run_extraction(dataclasses.replace(ex, path=path), overwrite=True)
                ts[label].append(time.perf_counter() - t0)
            finally:
                checksum(before)
    import zarr

    codecs_with = [type(c).__name__ for c in
                   zarr.open_array(str(tmp / "x_with.zarr"), path=f"layers/{LAYERS[0]}/acts").metadata.codecs]
    codecs_without = [type(c).__name__ for c in
                      zarr.open_array(str(tmp / "x_without.zarr"), path=f"layers/{LAYERS[0]}/acts").metadata.codecs]
    assert codecs_with[-1] == "Crc32cCodec" and "Crc32cCodec" not in codecs_without
    return {"ts": ts, "n": ex.corpus.n_samples}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20000, help="(n) store size in samples (default 20000)")
    p.add_argument("--source", type=Path, default=SOURCE, help="store of real samples to repeat")
    p.add_argument("--chunk-mib", type=float, default=None, help="chunk size (default: the extraction's)")
    p.add_argument("--threads", type=int, default=2, help="dask threads of (n) (default 2)")
    p.add_argument("--extract-samples", type=int, default=10000, help="(x) MNIST images (default 10000)")
    p.add_argument("--batch", type=int, default=128, help="(x) inference batch size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (median)")
    p.add_argument("--skip-extract", action="store_true", help="leave (x) out")
    p.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="parent of the temp dir")
    p.add_argument("--quick", action="store_true", help="tiny run: 1000 samples, 512 images, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.extract_samples, a.repeats = 1000, 512, 1
        a.chunk_mib = a.chunk_mib or 1.0
    load0 = os.getloadavg()
    med = statistics.median
    tmp = Path(tempfile.mkdtemp(prefix="bench_checksum-", dir=a.tmp))
    try:
        source = a.source
        if not source.exists():
            print(f"{source} not found: extracting 2000 MNIST test images with the CNN ...", flush=True)
            source = extract_source(tmp)
        n = bench_naps(tmp, source, a.samples, a.chunk_mib, a.threads, a.repeats)
        for label in ("with", "without"):
            shutil.rmtree(tmp / f"naps_{label}.zarr", ignore_errors=True)
        x = None if a.skip_extract else bench_extract(tmp, a.extract_samples, a.batch, a.chunk_mib, a.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n(n) NAP pass, {a.samples} samples of {source} (layers {', '.join(LAYERS)}): acts "
          f"{n['acts'] / 1e9:.2f} GB, grads {n['grads'] / 1e9:.2f} GB uncompressed; stores built in "
          f"{n['build']['with']:.0f} s (with) and {n['build']['without']:.0f} s (without checksums); "
          f"{a.threads} threads, warm page cache, {a.repeats} repeats; load average {load0[0]:.2f} at start")
    print(f"\n{'':<48} {'median s':>9} {'GB/s':>6} {'range GB/s':>12}")

    def line(label, ts, nbytes):
        print(f"{label:<48} {med(ts):>9.2f} {nbytes / med(ts) / 1e9:>6.2f} "
              f"{nbytes / max(ts) / 1e9:>5.2f}-{nbytes / min(ts) / 1e9:<5.2f}")

    for aligned, what in ((False, "naps(store)"), (True, "naps(store, aligned=True)")):
        for label in ("with", "without"):
            line(f"{what}, {label} checksums", n["ts"][label, aligned], n["acts"])
    line("verify(store), GB/s of all its arrays", n["tv"], n["all"])
    r = med(n["ts"]["without", False]) / med(n["ts"]["with", False])
    ra = med(n["ts"]["without", True]) / med(n["ts"]["with", True])
    print(f"\nnaps with/without checksums = {r:.2f}   (target >= 0.95)")
    print(f"aligned naps with/without checksums = {ra:.2f}   (target >= 0.95)")
    print(f"verify: {n['report'].chunks} chunks of {n['report'].arrays} arrays, {med(n['tv']):.2f} s, "
          f"{n['all'] / med(n['tv']) / 1e9:.2f} GB/s")
    if x is not None:
        print(f"\n(x) extraction, MNIST CNN, {x['n']} images, batch {a.batch}, {a.repeats} repeats "
              "(model load and tracing excluded)")
        print(f"\n{'':<48} {'median s':>9} {'samples/s':>10}")
        for label in ("with", "without"):
            ts = x["ts"][label]
            print(f"{'run_extraction, ' + label + ' checksums':<48} {med(ts):>9.2f} {x['n'] / med(ts):>10,.0f}")
        rx = med(x["ts"]["without"]) / med(x["ts"]["with"])
        print(f"\nextract with/without checksums = {rx:.2f}   (target >= 0.95)")


if __name__ == "__main__":
    main()
