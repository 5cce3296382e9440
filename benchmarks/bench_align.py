"""Alignment kernel against the per-sample loop with np.pad and crop, side by side.

Shapes from the issue: (256, 13, 13, 128) and (64, 56, 56, 128) float32,
activations 80 % zeros like ReLU outputs, gradients with one salient blob per
sample at a random position. Prints samples/s, GB/s of activations and the
speed-up of :func:`inntrospect.analysis.alignment.align_kernel` over
:func:`inntrospect.analysis.alignment.align_reference`, with a fresh and with a reused output
(the NAP pipeline reuses its buffers), and two memory limits: a plain copy of the
activations, and that copy plus one streaming read of the gradients (what any
single-threaded kernel must at least do: read grads and acts, write the output).
No model or data needed::

    python benchmarks/bench_align.py
    python benchmarks/bench_align.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from inntrospect.analysis.alignment import align_kernel, align_reference


def make(n, h, w, c, seed=0):
    rng = np.random.default_rng(seed)
    acts = np.maximum(rng.standard_normal((n, h, w, c), dtype=np.float32) - 0.85, 0)
    grads = rng.standard_normal((n, h, w, c), dtype=np.float32) * 0.01
    ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
    grads[np.arange(n), ys, xs] += 1.0
    return acts, grads


def read_and_copy(grad_rows, out, acts):
    """One streaming read of the gradients and one copy of the activations."""
    np.add.reduce(grad_rows, axis=0)
    np.copyto(out, acts)


def timed(repeats, fn, *args, **kwargs):
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, 1 repeat")
    a = p.parse_args(argv)
    shapes = [(256, 13, 13, 128), (64, 56, 56, 128)]
    if a.quick:
        shapes, a.repeats = [(32, 13, 13, 16), (8, 56, 56, 16)], 1
    print(f"{'shape':<22} {'method':<34} {'samples/s':>10} {'GB/s':>6} {'vs loop':>8}")
    for shape in shapes:
        acts, grads = make(*shape)
        expected = align_reference(acts, grads)
        assert np.array_equal(align_kernel(acts, grads), expected)
        out = np.full_like(acts, np.nan)  # a reused buffer holds stale values, not zeros
        assert np.array_equal(align_kernel(acts, grads, out=out), expected)
        grad_rows = grads.reshape(-1, grads.shape[-1])
        rows = [
            ("per-sample loop, np.pad + crop", timed(a.repeats, align_reference, acts, grads)),
            ("align_kernel", timed(a.repeats, align_kernel, acts, grads)),
            ("align_kernel, reused output", timed(a.repeats, align_kernel, acts, grads, out=out)),
            ("copy (np.copyto)", timed(a.repeats, np.copyto, out, acts)),
            ("read grads + copy (memory floor)", timed(a.repeats, read_and_copy, grad_rows, out, acts)),
        ]
        loop = rows[0][1]
        for label, t in rows:
            print(f"{str(shape):<22} {label:<34} {shape[0] / t:>10,.0f} {acts.nbytes / t / 1e9:>6.2f} "
                  f"{loop / t:>7.1f}x")


if __name__ == "__main__":
    main()
