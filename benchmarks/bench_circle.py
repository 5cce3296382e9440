"""distribute_in_circle: numpy definition vs compiled exact vs particle-mesh approx, side by side.

Inputs are UMAP-like layouts (a few Gaussian clusters of unequal sizes in the
unit square, min-max scaled). Prints, for 100 steps:

- the numpy reference (:func:`distribute_reference`) and ``method="exact"`` on
  4,608 units; the reference is timed on ``--ref-steps`` steps and
  extrapolated linearly to 100 (each step costs the same), and the two are
  compared on those steps;
- ``method="approx"`` on 4,608 and 25,000 units with its error against exact
  after the full 100 steps (displacement in units of the [0, 1] square);
- exact and approx times over unit counts, for ``method="auto"``'s threshold
  (exact timed on a few steps and extrapolated beyond 4,608 units).

No model or data needed::

    python benchmarks/bench_circle.py          # ~3 min on an idle 2-core machine
    python benchmarks/bench_circle.py --quick  # seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from inntrospect.topomap import circle
from inntrospect.topomap.circle import distribute_in_circle, distribute_reference

STEPS = 100


def clusters(n, k=8, seed=0):
    """A few Gaussian clusters of unequal sizes and widths, min-max scaled to [0, 1]."""
    rng = np.random.default_rng(seed)
    centres = rng.random((k, 2))
    sd = rng.uniform(0.01, 0.06, k)
    label = rng.choice(k, n, p=rng.dirichlet(np.full(k, 2.0)))
    p = centres[label] + rng.standard_normal((n, 2)) * sd[label, None]
    return (p - p.min(0)) / (p.max(0) - p.min(0))


def timed(repeats, fn, *args, **kwargs):
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def error(a, b):
    d = np.hypot(*(a - b).T)
    return d.max(), np.median(d)


def row(name, n, steps, t, t100, ratio="", err=""):
    print(f"{name:<44} {n:>7,} {steps:>6} {t:>9.3f} {t100:>10.2f} {ratio:>9} {err:>22}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that it works")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-steps", type=int, default=5, help="reference steps timed (then x 100/k)")
    ap.add_argument(
        "--skip-exact-large",
        action="store_true",
        help="time exact on the large layer for a few steps only (no approx error)",
    )
    a = ap.parse_args(argv)
    n_small, n_large, sweep = 4608, 25_000, [2000, 4608, 8000, 12_000, 16_000]
    grid = circle.APPROX_GRID
    if a.quick:
        n_small, n_large, sweep, a.repeats, a.ref_steps, grid = 300, 1000, [500], 1, 5, 64

    t0 = time.perf_counter()
    circle.compiled_kernels()
    print(
        f"numba kernels compiled or loaded from cache in {time.perf_counter() - t0:.2f} s "
        f"(first call only); approx grid {grid}, auto threshold "
        f"{circle.AUTO_THRESHOLD:,} units\n"
    )
    hdr = f"{'method':<44} {'units':>7} {'steps':>6} {'time s':>9} {'s / 100 st':>10} {'speed-up':>9} "
    print(hdr + f"{'err vs exact max / med':>22}")
    print("-" * len(hdr + " " * 22))

    # 1. reference vs exact, 4,608 units
    p = clusters(n_small, seed=1)
    k = a.ref_steps
    t_ref, ref_k = timed(1, distribute_reference, p, n_steps=k, seed=0)
    ref100 = t_ref * STEPS / k
    row(
        f"numpy reference ({k} steps, x{STEPS / k:g} extrapolated)",
        n_small,
        k,
        t_ref,
        ref100,
        "1.0x",
    )
    t_ex_k, ex_k = timed(a.repeats, distribute_in_circle, p, n_steps=k, seed=0, method="exact")
    dk = np.abs(ex_k - ref_k).max()
    assert dk < 1e-6, f"exact differs from the reference by {dk}"
    row(
        f"exact, same {k} steps (max |diff| {dk:.1e})",
        n_small,
        k,
        t_ex_k,
        t_ex_k * STEPS / k,
        f"{t_ref / t_ex_k:.1f}x",
    )
    t_ex, ex = timed(a.repeats, distribute_in_circle, p, n_steps=STEPS, seed=0, method="exact")
    row("exact", n_small, STEPS, t_ex, t_ex, f"{ref100 / t_ex:.1f}x")
    t_ap, ap_ = timed(
        a.repeats, distribute_in_circle, p, n_steps=STEPS, seed=0, method="approx", grid=grid
    )
    emax, emed = error(ap_, ex)
    row(
        "approx (particle-mesh)",
        n_small,
        STEPS,
        t_ap,
        t_ap,
        f"{ref100 / t_ap:.1f}x",
        f"{emax:.1e} / {emed:.1e}",
    )

    # 2. large layer
    p = clusters(n_large, seed=2)
    t_ap, ap_ = timed(
        a.repeats, distribute_in_circle, p, n_steps=STEPS, seed=0, method="approx", grid=grid
    )
    ref_large = ref100 * (n_large / n_small) ** 2
    if a.skip_exact_large:
        k = 5
        t_k, _ = timed(1, distribute_in_circle, p, n_steps=k, seed=0, method="exact")
        t_ex = t_k * STEPS / k
        row(
            f"exact ({k} steps, x{STEPS / k:g} extrapolated)",
            n_large,
            k,
            t_k,
            t_ex,
            f"{ref_large / t_ex:.1f}x",
        )
        err = "(not measured)"
    else:
        t_ex, ex = timed(1, distribute_in_circle, p, n_steps=STEPS, seed=0, method="exact")
        row("exact", n_large, STEPS, t_ex, t_ex, f"{ref_large / t_ex:.1f}x")
        emax, emed = error(ap_, ex)
        err = f"{emax:.1e} / {emed:.1e}"
    row("approx (particle-mesh)", n_large, STEPS, t_ap, t_ap, f"{ref_large / t_ap:.1f}x", err)
    print(
        f"(speed-ups on {n_large:,} units are against the reference extrapolated as n^2 from "
        f"{n_small:,}: {ref_large:.0f} s; it would need "
        f"~{n_large**2 * 8 * 5 / 1e9:.0f} GB for its n x n arrays)"
    )

    # 3. threshold for auto
    print(f"\nexact vs approx over unit counts (exact: 5 steps x 20 beyond {n_small:,} units)")
    print(f"{'units':>7} {'exact s':>9} {'approx s':>9}")
    for n in sweep:
        p = clusters(n, seed=3)
        if n <= n_small:
            te, _ = timed(1, distribute_in_circle, p, n_steps=STEPS, seed=0, method="exact")
        else:
            te, _ = timed(1, distribute_in_circle, p, n_steps=5, seed=0, method="exact")
            te *= STEPS / 5
        ta, _ = timed(1, distribute_in_circle, p, n_steps=STEPS, seed=0, method="approx", grid=grid)
        print(f"{n:>7,} {te:>9.2f} {ta:>9.2f}")


if __name__ == "__main__":
    main()
