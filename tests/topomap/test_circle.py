"""distribute_in_circle (REFERENCE.md §6 step 5): compiled and particle-mesh against the numpy definition."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from inntrospect.topomap.circle import (
    AUTO_THRESHOLD,
    distribute_in_circle,
    distribute_reference,
)

from ..conftest import ROOT, python_env


def minmax(p):
    lo, hi = p.min(axis=0), p.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (p - lo) / span


def clusters(n, k=6, seed=0):
    """A UMAP-like layout: a few Gaussian clusters of unequal sizes, min-max scaled."""
    rng = np.random.default_rng(seed)
    centres = rng.random((k, 2))
    sd = rng.uniform(0.01, 0.06, k)
    label = rng.choice(k, n, p=rng.dirichlet(np.full(k, 2.0)))
    return minmax(centres[label] + rng.standard_normal((n, 2)) * sd[label, None])


def min_pair_distance(p):
    d = np.sqrt(((p[:, None] - p[None]) ** 2).sum(-1))
    return d[np.triu_indices(len(p), 1)].min()


@st.composite
def layouts(draw):
    """2..60 points in [0, 1]^2 (min-max scaled), with duplicates and points closer than 0.01."""
    n = draw(st.integers(2, 60))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    p = rng.random((n, 2))
    kind = draw(st.sampled_from(["uniform", "duplicates", "close", "grid", "line"]))
    if kind == "duplicates":
        m = draw(st.integers(1, n))
        p[rng.integers(0, n, m)] = p[rng.integers(0, n, m)]
    elif kind == "close":
        m = draw(st.integers(1, n))
        i = rng.integers(0, n, m)
        p[i] = p[rng.integers(0, n, m)] + rng.uniform(-0.007, 0.007, (m, 2))
    elif kind == "grid":
        p = np.round(p * 3) / 3  # many exact duplicates, exact equal distances
    elif kind == "line":
        p[:, 1] = 0.5  # a constant column
    return minmax(p)


@settings(max_examples=200, deadline=None)
@given(layouts(), st.integers(0, 40))
def test_exact_equals_reference(p, n_steps):
    # Coincident points are pushed apart by the last bits of each one's force sum, which
    # depend on the summation order; from there the two formulations may drift by ~1e-6.
    assume(len(np.unique(p, axis=0)) == len(p))
    ref = distribute_reference(p, n_steps=n_steps, jitter=0)
    out = distribute_in_circle(p, n_steps=n_steps, jitter=0, method="exact")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n", [2, 17, 300])
def test_exact_equals_reference_full_steps_with_jitter(n):
    p = clusters(n, seed=n)
    ref = distribute_reference(p, jitter=1e-6, seed=3)
    out = distribute_in_circle(p, jitter=1e-6, seed=3, method="exact")
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "approx"])
def test_output_in_unit_square_and_reproducible(method):
    p = clusters(400, seed=1)
    a = distribute_in_circle(p, n_steps=40, seed=7, method=method, grid=128)
    b = distribute_in_circle(p, n_steps=40, seed=7, method=method, grid=128)
    c = distribute_in_circle(p, n_steps=40, seed=8, method=method, grid=128)
    assert a.shape == p.shape and a.dtype == np.float64
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a.min(axis=0), [0, 0])
    np.testing.assert_array_equal(a.max(axis=0), [1, 1])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a - c).max() < 1e-3  # jitter of 1e-6 moves little
    np.testing.assert_array_equal(p, clusters(400, seed=1))  # input untouched


def test_exact_independent_of_thread_count():
    import numba

    p = clusters(500, seed=2)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = distribute_in_circle(p, n_steps=20, seed=1, method="exact")
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        many = distribute_in_circle(p, n_steps=20, seed=1, method="exact")
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(one, many)


def test_approx_close_to_exact():
    # Bound measured on clustered layouts of 4,608 and 25,000 units (benchmarks/bench_circle.py):
    # max displacement ~3e-4, median ~6e-5 of the unit square with the default 256 grid.
    p = clusters(1500, seed=4)
    exact = distribute_in_circle(p, seed=0, method="exact")
    approx = distribute_in_circle(p, seed=0, method="approx")
    d = np.hypot(*(approx - exact).T)
    assert d.max() < 1e-3
    assert np.median(d) < 2e-4
    # and the error falls with the grid (second order)
    coarse = np.hypot(*(distribute_in_circle(p, seed=0, method="approx", grid=64) - exact).T)
    assert np.median(coarse) > 4 * np.median(d)


def test_spreads_clusters():
    p = clusters(300, k=3, seed=5)
    out = distribute_in_circle(p, seed=0)
    assert min_pair_distance(out) > 3 * min_pair_distance(p)
    # a disc: fewer units far from the centre than in the corners of a square would hold
    r = np.hypot(*(out - 0.5).T)
    assert np.quantile(r, 0.99) < 0.55


def test_auto_and_arguments():
    p = clusters(50)
    np.testing.assert_array_equal(
        distribute_in_circle(p, seed=1), distribute_in_circle(p, seed=1, method="exact")
    )
    assert AUTO_THRESHOLD > 4608
    with pytest.raises(ValueError, match="method"):
        distribute_in_circle(p, method="fast")
    with pytest.raises(ValueError, match="shape"):
        distribute_in_circle(np.zeros((5, 3)))
    np.testing.assert_array_equal(distribute_in_circle(np.array([[0.3, 0.7]])), [[0.0, 0.0]])
    assert distribute_in_circle(np.zeros((0, 2))).shape == (0, 2)
    # zero steps: only the final scaling
    np.testing.assert_allclose(distribute_in_circle(p, n_steps=0), minmax(p))


def test_import_does_not_import_numba():
    code = "import sys, inntrospect.topomap.circle; assert 'numba' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=python_env())


def test_bench_circle_quick():
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_circle.py"), "--quick"],
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("numpy reference", "exact", "approx (particle-mesh)", "err vs exact"):
        assert label in res.stdout, res.stdout
