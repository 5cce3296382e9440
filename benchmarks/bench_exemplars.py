"""Do exemplars ride along the NAP pass for free, and the statistics along the contrasts? Side by side.

What is compared
----------------
On ``bench_naps.py``'s store (real MNIST CNN activations repeated to
``--samples`` samples, 40,000 by default: 4.9 GB of activations in chunks of
32 MiB; built once by that script's code and cached), on dask's threaded
scheduler with ``--threads`` threads:

(b)  the NAP pass alone: ``inntrospect.naps(store)`` computed;
(x)  the exemplars alone: ``inntrospect.exemplars(store, k)`` computed (a read of its own);
(bx) both from one pass: ``inntrospect.naps_and_exemplars(store, k=k, persist=False)``
     computed together. Target: b / bx >= 0.8 (one pass for both at >= 0.8 of
     the NAP pass alone); b + x is what two passes would cost.
(ba), (bax) the same with ``aligned=True`` (alignment fused, on the fly).
(c)  the contrast step persisted (``contrastive_naps(store, persist=True)``),
     without and with ``significance`` (the NAPs persisted with ``std=True``
     first), in this warm process;
(c') the same as a user runs it: ``inntrospect contrast CONFIG`` in a fresh
     process (imports included), ``[contrast] significance = false`` and
     ``true`` in each of ``--cli-repeats`` rounds, alternating which goes
     first; wall and CPU time (the child's user + system), the medians and
     the median of the rounds' differences (paired: the VM's drift between
     rounds cancels). The statistics' extra time, target < 5 %, is measured
     on (c'): the step a user waits for. ``--results-on DIR`` runs (c) and
     (c') on a copy of the store in DIR with its layers linked, so the
     contrast is written on DIR's file system: on ext4 *without a journal*
     each new file or folder is found by stepping past every inode freed in
     the last seconds (``recently_deleted``), which these back-to-back runs
     free by the thousand; a journaled ext4 (the default) or tmpfs does not.

Each is the median of ``--repeats`` runs in rounds (each method once per
round). The page cache is warm; ``--cold`` evicts the store before each run.
The exemplars of (x) and (bx) are checked to be equal, and the NAPs of (b)
and (bx) to agree to 1e-12 (the same sums, merged in another tree: exemplar
passes use fewer, longer tasks).

Run::

    python benchmarks/bench_exemplars.py              # 40,000 samples (builds the store once)
    python benchmarks/bench_exemplars.py --quick      # tiny (1,000 samples, 4 MiB chunks)
    python benchmarks/bench_exemplars.py --contrast-only   # (c) and (c') alone
    python benchmarks/bench_exemplars.py --contrast-only --results-on /dev/shm   # written on tmpfs
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_naps import SOURCE, STORE, STORE_QUICK, arrays, get_store, timed  # beside this script
from common import mirror_store  # beside this script


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--store", type=Path, default=None, help="the cached store (default: bench_naps.py's)")
    p.add_argument("--source", type=Path, default=SOURCE)
    p.add_argument("--chunk-mib", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("-k", type=int, default=16, help="exemplars per unit, group and end (default 16)")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--contrast-only", action="store_true", help="only (c) and (c'): the statistics' cost")
    p.add_argument("--cli-repeats", type=int, default=15, help="rounds of (c') (default 15: a 1 s command varies by +-10 % here)")
    p.add_argument("--results-on", type=Path, default=None,
                   help="run (c) and (c') on a copy of the store in this folder, its layers linked: the "
                        "contrast's files are written on that folder's file system")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats, a.chunk_mib, a.cli_repeats = 1000, 1, a.chunk_mib or 4.0, 1
    store = a.store or Path(str(STORE_QUICK if a.quick else STORE).format(n=a.samples))
    get_store(store, a.source, a.samples, a.chunk_mib, False)
    acts_gb = sum(x.nbytes for x in arrays(store)) / 1e9

    import dask

    import inntrospect

    T, k = a.threads, a.k

    def go(*lazy):
        return dask.compute(*lazy, scheduler="threads", num_workers=T)

    if a.contrast_only:
        print(f"store {store}: {a.samples} samples")
        contrast_step(results_store(store, a.results_on), T, a.repeats, a.cli_repeats)
        return

    methods = {
        "b": lambda: go(inntrospect.naps(str(store))),
        "x": lambda: go(inntrospect.exemplars(str(store), k)),
        "bx": lambda: go(*inntrospect.naps_and_exemplars(str(store), k=k, persist=False)),
        "ba": lambda: go(inntrospect.naps(str(store), aligned=True)),
        "bax": lambda: go(*inntrospect.naps_and_exemplars(str(store), aligned=True, k=k, persist=False)),
    }
    for fn in methods.values():  # warm: kernels compiled or loaded, imports done
        fn()
    runs = timed(methods, a.repeats, a.cold, store)
    med = {name: statistics.median(r[0]) for name, r in runs.items()}

    (b_naps,), (x_ex,), (bx_naps, bx_ex) = runs["b"][2], runs["x"][2], runs["bx"][2]
    for layer in b_naps:
        np.testing.assert_allclose(b_naps[layer].nap.values, bx_naps[layer].nap.values, rtol=1e-12, atol=1e-15)
        for var in ("sample", "value"):
            np.testing.assert_array_equal(x_ex[layer][var].values, bx_ex[layer][var].values)

    gbs = {name: acts_gb / t for name, t in med.items()}
    print(f"store {store}: {a.samples} samples, {acts_gb:.2f} GB of activations; k = {k}; "
          f"{T} threads; {'cold' if a.cold else 'warm'} page cache; median of {a.repeats}")
    print(f"{'':<44} {'seconds':>8} {'GB/s':>7}")
    rows = [("(b)   NAP pass alone", "b"), ("(x)   exemplars alone", "x"),
            ("(bx)  NAPs + exemplars, one pass", "bx"), ("(ba)  aligned NAP pass alone", "ba"),
            ("(bax) aligned NAPs + exemplars, one pass", "bax")]
    for label, name in rows:
        print(f"{label:<44} {med[name]:>8.2f} {gbs[name]:>7.2f}")
    print(f"one pass vs NAPs alone: b / bx = {med['b'] / med['bx']:.2f} (target >= 0.8); "
          f"aligned: ba / bax = {med['ba'] / med['bax']:.2f}")
    print(f"two passes would take b + x = {med['b'] + med['x']:.2f} s; one pass saves "
          f"{med['b'] + med['x'] - med['bx']:.2f} s")
    contrast_step(results_store(store, a.results_on), T, a.repeats, a.cli_repeats)


def results_store(store: Path, folder: Path | None) -> Path:
    """The store (c) and (c') run on: ``store``, or its mirror in ``folder`` (:func:`common.mirror_store`)."""
    if folder is None:
        return store
    mirror = mirror_store(store, folder / store.name)
    print(f"(c) and (c') on {mirror}: the store's results copied there, its layers linked")
    return mirror


def contrast_step(store: Path, threads: int, repeats: int, cli_repeats: int) -> None:
    """(c) in this process and (c') as ``inntrospect contrast CONFIG`` in fresh processes; prints both."""
    import dask

    import inntrospect

    with dask.config.set(scheduler="threads", num_workers=threads):
        inntrospect.naps(str(store), std=True, persist=True)
        contrast: dict[bool, list[float]] = {}
        for _ in range(max(repeats, 3)):
            for sig in (False, True):
                t0 = time.perf_counter()
                inntrospect.contrastive_naps(str(store), significance=sig, persist=True)
                contrast.setdefault(sig, []).append(time.perf_counter() - t0)
    c0, c1 = statistics.median(contrast[False]), statistics.median(contrast[True])
    print(f"(c)  contrast step in this process: {c0:.3f} s without statistics, {c1:.3f} s with "
          f"(+{(c1 - c0) * 1e3:.0f} ms, +{(c1 / c0 - 1) * 100:.1f} %)")
    rounds: list[dict[bool, tuple[float, float]]] = []  # per round: {significance: (wall, CPU)}
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for sig in (False, True):
            configs[sig] = Path(tmp) / f"significance_{str(sig).lower()}.toml"
            configs[sig].write_text(f'[store]\npath = "{store}"\n'
                                    f"[contrast]\nsignificance = {str(sig).lower()}\n")
        command = [str(Path(sys.executable).with_name("inntrospect")), "contrast"]
        # as a user's install runs it: Python's bytecode of the package cached (an environment that sets
        # PYTHONDONTWRITEBYTECODE would compile every module of an editable install on every run)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([*command, str(configs[True])], check=True, capture_output=True, env=env)  # caches warm
        for i in range(cli_repeats):
            done = {}
            for sig in ((False, True) if i % 2 == 0 else (True, False)):  # alternating which goes first
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                subprocess.run([*command, str(configs[sig])], check=True, capture_output=True, env=env)
                wall = time.perf_counter() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                done[sig] = (wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            rounds.append(done)
    for j, what in enumerate(("wall", "CPU")):
        d0 = statistics.median(r[False][j] for r in rounds)
        d1 = statistics.median(r[True][j] for r in rounds)
        paired = statistics.median(r[True][j] - r[False][j] for r in rounds)
        print(f"(c') inntrospect contrast CONFIG, fresh processes, {what}, {cli_repeats} rounds: {d0:.3f} s "
              f"without statistics, {d1:.3f} s with; paired median difference +{paired * 1e3:.0f} ms, "
              f"+{paired / d0 * 100:.1f} %" + (" (target < 5 %)" if what == "wall" else ""))


if __name__ == "__main__":
    main()
