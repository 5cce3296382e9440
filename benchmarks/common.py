"""Helpers the benchmark scripts share (they import it as a sibling module)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def evict(path: Path) -> None:
    """Flush the files under ``path`` to disk and drop them (only them) from the page cache."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def mirror_store(src: Path, dst: Path) -> Path:
    """``src`` copied to ``dst`` but for its layers' arrays, which are linked: the same activations,
    with the results written on ``dst``'s file system (e.g. a journaled ext4 or tmpfs beside a disk)."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        shutil.rmtree(dst)
    layers = src / "layers"
    shutil.copytree(src, dst, symlinks=True,
                    ignore=lambda folder, names: names if Path(folder).parent == layers else [])
    for layer in (p for p in layers.iterdir() if p.is_dir()):
        for entry in layer.iterdir():
            (dst / "layers" / layer.name / entry.name).symlink_to(entry.resolve())
    return dst


def print_store_size(c_alloc: int, c_apparent: int, raw: float) -> None:
    """The extraction's store on disk, allocated and apparent, and its compression ratio."""
    print(f"\nstore on disk (c): {c_alloc / 1e9:.3f} GB allocated (du), {c_apparent / 1e9:.3f} GB apparent; "
          f"compression ratio {raw / c_alloc:.2f} (du), {raw / c_apparent:.2f} (apparent)")


def print_main_thread(timers, t_inst: float, n: int) -> None:
    """Where one instrumented ``run_extraction`` spent its main thread's time (``timers.t``, ``.calls``)."""
    print(f"\none instrumented run_extraction: {t_inst:.2f} s ({n / t_inst:,.0f} samples/s); main thread:")
    accounted = 0.0
    for label in sorted(timers.t, key=timers.t.get, reverse=True):
        t = timers.t[label]
        if "incl." not in label:
            accounted += t
        print(f"  {label:<44} {t:7.2f} s  {t / t_inst:6.1%}  ({timers.calls[label]} calls)")
    print(f"  {'rest (buffer copies, submit, prediction, block records)':<44} {t_inst - accounted:7.2f} s  "
          f"{(t_inst - accounted) / t_inst:6.1%}")


def print_plan(codecs: dict, plan, raw_per_sample: float, raw: float, load_at_start: float, repeats: int) -> None:
    """The extraction benchmarks' setup lines: the codecs chosen, the chunk plan, the data's size, the load."""
    from inntrospect.store.codecs import CODEC

    print(f"codec {CODEC} where it compresses >= 1.25x on the first batch; chosen: "
          + ", ".join(f"{k}/{v}" for k, d in codecs.items() for v, c in d.items() if c is None)
          + " uncompressed")
    print(f"chunks {plan.chunks} samples; block {plan.block} ({plan.chunk_mib:g} MiB chunks)")
    print(f"uncompressed acts+grads: {raw_per_sample / 1e3:.1f} kB/sample, {raw / 1e9:.2f} GB; "
          f"load average {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; {repeats} repeats")


def print_rates(rows, n: int, s: float, raw_per_sample: float) -> None:
    """The extraction benchmarks' table: per ``(label, seconds of each run, samples/s)`` row, the
    median seconds, the rate, the range of rates and the uncompressed GB/s; then the serial bound ``s``."""
    import statistics

    print(f"\n{'':<44} {'median s':>9} {'samples/s':>10} {'range samples/s':>17} {'GB/s unc.':>10}")
    for label, ts, rate in rows:
        spread = f"{n / max(ts):>7,.0f}-{n / min(ts):<7,.0f}"
        print(f"{label:<44} {statistics.median(ts):>9.2f} {rate:>10,.0f} {spread:>17} "
              f"{rate * raw_per_sample / 1e9:>10.2f}")
    print(f"{'s = 1/(1/a + 1/b)  (a then b, no overlap)':<44} {n / s:>9.2f} {s:>10,.0f} {'':>17} "
          f"{s * raw_per_sample / 1e9:>10.2f}")
