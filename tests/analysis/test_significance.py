"""Per-unit significance from merged moments, against scipy on the raw samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inntrospect.analysis.nap_kernels import chunk_moments, merge_moments
from inntrospect.analysis.significance import (
    SERIES_COEFFICIENTS,
    bh_qvalues,
    contrast_statistics,
    hedges_g,
    merge_pair,
    rest_moments,
    student_two_sided,
    welch,
)
from inntrospect.errors import ParameterError

scipy_stats = pytest.importorskip("scipy.stats")


def moments_by_chunks(x: np.ndarray, codes: np.ndarray, n_groups: int, chunk: int):
    """count, mean, M2 per group as the NAP pass gets them: chunk by chunk, then merged."""
    parts = [chunk_moments(x[i : i + chunk], codes[i : i + chunk], std=True) for i in range(0, len(x), chunk)]
    merged = merge_moments(*parts)
    count = np.array([merged[g][0] for g in range(n_groups)], float)
    mean = np.stack([merged[g][1] / merged[g][0] for g in range(n_groups)]).reshape(n_groups, *x.shape[1:])
    m2 = np.stack([merged[g][2] for g in range(n_groups)]).reshape(n_groups, *x.shape[1:])
    return count, mean, m2


@st.composite
def samples(draw):
    n_groups = draw(st.integers(2, 4))
    sizes = [draw(st.integers(2, 12)) for _ in range(n_groups)]
    shape = draw(st.sampled_from([(3,), (2, 3), (2, 2, 2)]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.repeat(np.arange(n_groups), sizes))
    scale = rng.uniform(0.1, 10, size=n_groups)[codes].reshape(-1, *([1] * len(shape)))
    x = (rng.standard_normal((len(codes), *shape)) * scale + rng.normal(size=shape)).astype(np.float32)
    return x, codes, n_groups, draw(st.integers(1, 9))


@settings(max_examples=80, deadline=None)
@given(samples())
def test_welch_equals_scipy_on_the_raw_samples(case):
    x, codes, n_groups, chunk = case
    count, mean, m2 = moments_by_chunks(x, codes, n_groups, chunk)
    n_r, mean_r, m2_r = rest_moments(count, mean, m2)
    t, _, p = welch(count, mean, m2, n_r, mean_r, m2_r)
    g = hedges_g(count, mean, m2, n_r, mean_r, m2_r)
    x64 = x.astype(np.float64)
    for k in range(n_groups):
        ref = scipy_stats.ttest_ind(x64[codes == k], x64[codes != k], equal_var=False, axis=0)
        np.testing.assert_allclose(t[k], ref.statistic, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(p[k], ref.pvalue, rtol=1e-8, atol=1e-300)
        a, b = x64[codes == k], x64[codes != k]
        sp = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(a) + len(b) - 2))
        d = (a.mean(0) - b.mean(0)) / sp
        np.testing.assert_allclose(g[k], d * (1 - 3 / (4 * (len(a) + len(b)) - 9)), rtol=1e-10)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(1, 3))
def test_bh_qvalues_equal_scipy(ps, groups):
    rng = np.random.default_rng(len(ps))
    p = np.stack([rng.permutation(np.array(ps)) for _ in range(groups)]).reshape(groups, 1, -1)
    q = bh_qvalues(p)
    for k in range(groups):
        np.testing.assert_allclose(q[k].ravel(), scipy_stats.false_discovery_control(p[k].ravel()),
                                   rtol=1e-12, atol=0)


def test_nan_p_values_stay_out_of_the_count():
    q = bh_qvalues(np.array([[0.01, np.nan, 0.04]]))
    np.testing.assert_allclose(q, [[0.02, np.nan, 0.04]])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([0.0, 0.5, 1.0, np.nan]), st.floats(0, 1)), min_size=1, max_size=40))
def test_bh_qvalues_with_zeros_ties_and_nan_equal_scipy_on_the_rest(ps):
    p = np.array(ps)[None, :]
    q = bh_qvalues(p)
    kept = ~np.isnan(p[0])
    assert np.isnan(q[0][~kept]).all()
    if kept.any():
        np.testing.assert_allclose(q[0][kept], scipy_stats.false_discovery_control(p[0][kept]), rtol=1e-12, atol=0)
    assert (q[0][p[0] == 0] == 0).all()


def test_negative_p_values_are_refused():
    with pytest.raises(ParameterError, match="cannot be negative"):
        bh_qvalues(np.array([[0.01, -0.2]]))


def test_rest_moments_merge_the_other_groups_exactly():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5))
    codes = np.repeat([0, 1, 2, 3], 10)
    count, mean, m2 = moments_by_chunks(x, codes, 4, 7)
    n_r, mean_r, m2_r = rest_moments(count, mean, m2)
    for k in range(4):
        rest = x[codes != k]
        assert n_r[k] == len(rest)
        np.testing.assert_allclose(mean_r[k], rest.mean(0), rtol=1e-12)
        np.testing.assert_allclose(m2_r[k], ((rest - rest.mean(0)) ** 2).sum(0), rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 7), st.sampled_from([(), (5,), (3, 4)]), st.integers(0, 2**31 - 1))
def test_rest_moments_are_the_merges_of_prefix_and_suffix_bit_for_bit(n_groups, shape, seed):
    """rest_moments merges in place; the same bits as the chains of merge_pair it stands for: the
    groups after g pooled from the last one down, merged into the groups before g pooled in order."""
    rng = np.random.default_rng(seed)
    count = rng.integers(0, 50, n_groups).astype(float)
    mean = rng.normal(size=(n_groups, *shape)) * rng.uniform(0.1, 1e3)
    m2 = rng.uniform(0, 5, size=(n_groups, *shape)) * np.maximum(count.reshape(-1, *([1] * len(shape))) - 1, 0)
    zero = (0.0, np.zeros(shape), np.zeros(shape))
    suffix = [zero]
    for g in range(n_groups - 1, 0, -1):
        suffix.append(merge_pair(count[g], mean[g], m2[g], *suffix[-1]))
    suffix.reverse()
    prefix, want = zero, []
    for g in range(n_groups):
        want.append(merge_pair(*prefix, *suffix[g]))
        prefix = merge_pair(*prefix, count[g], mean[g], m2[g])
    n_r, mean_r, m2_r = rest_moments(count, mean, m2)
    assert n_r.shape == (n_groups,) and mean_r.shape == m2_r.shape == mean.shape
    for g, (n, mu, sq) in enumerate(want):
        assert n_r[g] == n
        np.testing.assert_array_equal(mean_r[g], mu)
        np.testing.assert_array_equal(m2_r[g], sq)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.sampled_from([(5,), (3, 4), (40, 50)]), st.integers(0, 2**31 - 1), st.booleans(),
       st.sampled_from([7, 64, 1 << 14]))
def test_statistics_are_each_groups_own_in_any_blocks(n_groups, shape, seed, small_group, block):
    """Each group's statistics, bit for bit, as welch and bh_qvalues give them for that group alone,
    whatever the blocks they are computed in (a block of whole rows, or pieces of one), with a
    group too small to test (NaN, out of the q-values) anywhere."""
    from inntrospect.analysis import significance

    rng = np.random.default_rng(seed)
    count = rng.integers(2, 50, n_groups).astype(float)
    if small_group:
        count[rng.integers(n_groups)] = 1
    mean = rng.normal(size=(n_groups, *shape))
    m2 = rng.uniform(0, 5, size=(n_groups, *shape)) * (count.reshape(-1, *([1] * len(shape))) - 1)
    saved = significance.BLOCK
    significance.BLOCK = block
    try:
        got = significance.contrast_statistics(count, mean, m2)
    finally:
        significance.BLOCK = saved
    n_r, mean_r, m2_r = rest_moments(count, mean, m2)
    np.testing.assert_array_equal(got["rest_count"], n_r)
    for g in np.flatnonzero((count >= 2) & (n_r >= 2)):  # each testable group as welch gives it alone
        t, _, p = welch(count[g : g + 1], mean[g : g + 1], m2[g : g + 1], n_r[g : g + 1], mean_r[g : g + 1],
                        m2_r[g : g + 1])
        np.testing.assert_array_equal(got["t"][g], t[0])
        np.testing.assert_array_equal(got["p"][g], p[0])
        np.testing.assert_array_equal(got["q"][g], bh_qvalues(p)[0])
        np.testing.assert_array_equal(got["effect"][g], hedges_g(count[g], mean[g], m2[g], n_r[g], mean_r[g],
                                                                 m2_r[g]))
    for g in np.flatnonzero((count < 2) | (n_r < 2)):
        assert all(np.isnan(got[k][g]).all() for k in ("t", "p", "q", "effect"))


def test_statistics_of_a_layer_without_values_are_empty():
    got = contrast_statistics(np.array([5.0, 6.0]), np.zeros((2, 0)), np.zeros((2, 0)))
    assert all(got[k].shape == (2, 0) for k in ("t", "p", "q", "effect"))
    np.testing.assert_array_equal(got["rest_count"], [6, 5])


def test_series_coefficients_are_those_of_the_expansion():
    """d_n of (sinh(w/2) / (w/2))^(-1/2) = sum d_n w^(2n), derived exactly here by multiplying series."""
    import math
    from fractions import Fraction

    n = len(SERIES_COEFFICIENTS)
    c = [Fraction(1, 4**k * math.factorial(2 * k + 1)) for k in range(n)]  # sinh(z)/z in x = w²

    def times(a, b):
        return [sum(a[j] * b[k - j] for j in range(k + 1)) for k in range(n)]

    d = [Fraction(x) for x in SERIES_COEFFICIENTS]
    square = times(d, d)  # g² = 1 / (sinh(w/2) / (w/2)): g² times that series is 1
    one = times(square, c)
    assert abs(one[0] - 1) < Fraction(1, 10**15)
    assert all(abs(x) < Fraction(1, 10**15) for x in one[1:])
    assert all(a * b < 0 for a, b in zip(SERIES_COEFFICIENTS, SERIES_COEFFICIENTS[1:]))  # alternating


def student_cases():
    """(df, t) across the series' domain and its edges (df = 100, log(1 + t²/df) = 1, (df/2 - 1/4)
    log(1 + t²/df) = 700 and 750) and outside it, with both signs, 0, NaN and infinities."""
    rng = np.random.default_rng(7)
    df = np.exp(rng.uniform(np.log(1.0), np.log(1e9), 20000))
    t = rng.uniform(0, 1, 20000) ** 3 * np.sqrt(df) * 40 * rng.choice([-1, 1], 20000)
    edge_df, edge_t = [], []
    for nu in (99.999, 100.0, 100.001, 150.0, 1e3, 3e3, 1e5, 1e9, 1e12):
        T = nu / 2 - 0.25
        ts = [0.0, 1e-8, 0.5, 3.0, np.sqrt(nu * (np.e - 1)) * (1 - 1e-12), np.sqrt(nu * (np.e - 1)) * (1 + 1e-12)]
        ts += [np.sqrt(nu * np.expm1(u / T)) for u in (699.999, 700.001, 744.0, 746.0, 749.999, 750.001)
               if u / T < 50]
        edge_df += [nu] * 2 * len(ts)
        edge_t += ts + [-x for x in ts]
    edge_df += [50.0, 1.0, 3.5, np.nan, 200.0, 200.0, 200.0, np.inf]
    edge_t += [3.0, 2.0, 10.0, 1.0, np.nan, np.inf, -np.inf, 2.0]
    return np.concatenate([df, edge_df]), np.concatenate([t, edge_t])


def test_student_two_sided_equals_scipy_stdtr():
    """The series where it applies, stdtr elsewhere: 1e-12 relative everywhere, the same zeros and
    NaNs (the target is 1e-8 on p; stdtr itself is within ~5e-14 of the exact value there)."""
    from scipy.special import stdtr

    df, t = student_cases()
    ref = 2 * stdtr(df, -np.abs(t))
    p = student_two_sided(df, t)
    np.testing.assert_array_equal(np.isnan(p), np.isnan(ref))
    np.testing.assert_array_equal(p == 0, ref == 0)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=0)
    assert (p[~np.isnan(p)] <= 1).all()
    series = (df >= 100) & (np.log1p(t * t / df) <= 1) & (ref > 0)
    assert series.sum() > 2000  # the series itself was checked, not only stdtr


def test_student_two_sided_against_exact_values():
    """mpmath's incomplete beta function at 40 digits, where the series applies."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    df = np.array([100.0, 120.5, 2000.0, 6780.4, 39998.0, 1e6, 3500.0, 18601.0])
    t = np.array([1.5, -9.0, 30.0, 6.87, -2.359, 50.0, 39.0, -25.293])
    p = student_two_sided(df, t)
    for d, x, got in zip(df, t, p):
        exact = mpmath.betainc(mpmath.mpf(d) / 2, mpmath.mpf(1) / 2, 0,
                               mpmath.mpf(d) / (mpmath.mpf(d) + mpmath.mpf(x) ** 2), regularized=True)
        assert abs(got - float(exact)) <= 1e-12 * float(exact), (d, x, got, exact)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40000), st.integers(0, 2**31 - 1), st.booleans())
def test_student_two_sided_is_the_same_value_however_it_is_cut(n, seed, big):
    """Whole arrays, pieces, single values, into ``out``: the same bits (each value's terms run
    until the next is below the last bit, whichever block it falls in)."""
    rng = np.random.default_rng(seed)
    df = np.exp(rng.uniform(np.log(100 if big else 2), np.log(1e6), n))
    t = rng.normal(0, 1, n) * rng.choice([1.0, 10.0, 40.0], n)
    whole = student_two_sided(df, t)
    cut = rng.integers(0, n + 1)
    parts = np.concatenate([student_two_sided(df[:cut], t[:cut]), student_two_sided(df[cut:], t[cut:])])
    np.testing.assert_array_equal(parts, whole)
    some = rng.choice(n, size=min(n, 5), replace=False)
    np.testing.assert_array_equal([student_two_sided(df[i], t[i]) for i in some], whole[some])
    out = np.full((2, n), -1.0)
    row = out[1]
    assert student_two_sided(df, t, out=row) is row
    np.testing.assert_array_equal(out[1], whole)
    np.testing.assert_array_equal(out[0], -1.0)
    strided = np.full(2 * n, -1.0)[::2]
    student_two_sided(df, t, out=strided)
    np.testing.assert_array_equal(strided, whole)


def test_a_group_of_one_sample_is_refused():
    with pytest.raises(ParameterError, match="at least two samples"):
        welch(np.array([1.0]), np.zeros((1, 2)), np.zeros((1, 2)), np.array([5.0]), np.zeros((1, 2)),
              np.ones((1, 2)))


# -- the contrast step's statistics, on stores ---------------------------------------------
def scipy_statistics(x: np.ndarray, labels: np.ndarray, group: str):
    """Welch's t and p of ``group`` against the rest, BH q across units and positions, Hedges' g."""
    x = np.asarray(x, dtype=np.float64)
    a, b = x[labels == group], x[labels != group]
    ref = scipy_stats.ttest_ind(a, b, equal_var=False, axis=0)
    flat, q = ref.pvalue.ravel(), np.full(ref.pvalue.size, np.nan)
    ok = ~np.isnan(flat)  # units constant in both sets (dead units) are untestable: left out
    q[ok] = scipy_stats.false_discovery_control(flat[ok])
    q = q.reshape(ref.pvalue.shape)
    sp = np.sqrt(((len(a) - 1) * a.var(0, ddof=1) + (len(b) - 1) * b.var(0, ddof=1)) / (len(x) - 2))
    g = (a.mean(0) - b.mean(0)) / sp * (1 - 3 / (4 * len(x) - 9))
    return ref.statistic, ref.pvalue, q, g


def assert_statistics(ds, x, labels):
    for group in ds.group.values:
        t, p, q, g = scipy_statistics(x, labels, str(group))
        sel = ds.sel(group=group)
        np.testing.assert_allclose(sel["t"].values, t, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(sel["p"].values, p, rtol=1e-8, atol=1e-300)
        np.testing.assert_allclose(sel["q"].values, q, rtol=1e-8, atol=1e-300)
        np.testing.assert_allclose(sel["effect"].values, g, rtol=1e-10, atol=1e-12)
        assert int(sel["rest_count"]) == int((labels != group).sum())


@st.composite
def grouped_store(draw):
    x, codes, n_groups, chunk = draw(samples())
    labels = np.array([f"g{c}" for c in codes])
    names = sorted(set(labels))
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    return x, labels, chunk, chosen


@settings(max_examples=25, deadline=None)
@given(grouped_store())
def test_persisted_contrast_statistics_equal_scipy_on_the_raw_arrays(case):
    import tempfile

    import inntrospect
    from inntrospect.testing import store_from_arrays

    x, labels, chunk, chosen = case
    with tempfile.TemporaryDirectory() as tmp:
        path = store_from_arrays(f"{tmp}/s.zarr", {"a": x}, labels, chunks=chunk)
        inntrospect.naps(path, std=True, persist=True)
        result = inntrospect.contrastive_naps(path, chosen, persist=True)["a"]
        stored = inntrospect.load(path, "contrast")["a"].compute()
        codecs = {var: [c["name"] for c in json.loads((Path(path) / "contrast" / "a" / var / "zarr.json").read_text())
                        ["codecs"]] for var in ("nap", "t", "p", "q", "effect")}
    assert codecs == {"nap": ["bytes", "zstd", "crc32c"],  # the statistics without compression, checksummed
                      **{var: ["bytes", "crc32c"] for var in ("t", "p", "q", "effect")}}
    assert list(result.group.values) == sorted(chosen)
    assert_statistics(result, x, labels)
    for var in ("t", "p", "q", "effect", "rest_count"):
        np.testing.assert_array_equal(stored[var].values, result[var].values)
    assert stored.attrs["params"]["significance"] is True


def test_lazy_contrast_statistics_equal_the_eager_ones(tmp_path):
    import inntrospect
    from inntrospect.testing import store_from_arrays

    rng = np.random.default_rng(3)
    x = rng.standard_normal((90, 2, 3)).astype(np.float32)
    labels = np.repeat(["a", "b", "c"], 30)
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, labels, chunks=16)
    lazy = inntrospect.contrastive_naps(path, ["c", "a"], naps=inntrospect.naps(path, std=True))["l"]
    assert lazy["t"].chunks is not None  # nothing computed yet
    assert_statistics(lazy.compute(), x, labels)


def test_significance_needs_std_and_is_skipped_without_it(tmp_path):
    import inntrospect
    from inntrospect.testing import store_from_arrays

    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, np.repeat(["a", "b"], 10))
    inntrospect.naps(path, persist=True)
    with pytest.raises(ParameterError, match="std=True"):
        inntrospect.contrastive_naps(path, significance=True)
    plain = inntrospect.contrastive_naps(path)["l"]
    assert "t" not in plain and plain.attrs["params"]["significance"] is False


def test_a_group_of_one_sample_gets_nan_statistics_and_the_others_are_kept(tmp_path):
    import inntrospect
    from inntrospect.testing import store_from_arrays

    rng = np.random.default_rng(1)
    x = rng.standard_normal((21, 4)).astype(np.float32)
    labels = np.array(["a"] * 10 + ["b"] * 10 + ["c"])
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, labels)
    ds = inntrospect.contrastive_naps(path, naps=inntrospect.naps(path, std=True))["l"].compute()
    assert np.isnan(ds["t"].sel(group="c")).all() and np.isnan(ds["q"].sel(group="c")).all()
    t, p, q, g = scipy_statistics(x, labels, "a")
    np.testing.assert_allclose(ds["t"].sel(group="a").values, t, rtol=1e-10)
    np.testing.assert_allclose(ds["q"].sel(group="a").values, q, rtol=1e-8)


@pytest.mark.usefixtures("cnn_store")
def test_contrast_statistics_on_the_mnist_cnn_store_equal_scipy(cnn_store, tmp_path):
    """Aligned NAPs of the real CNN store (aligned on the fly): statistics against scipy on the
    activations aligned by the plain reference."""
    import shutil

    import zarr

    import inntrospect
    from inntrospect.analysis.alignment import align_reference

    path = tmp_path / "cnn.zarr"
    shutil.copytree(cnn_store, path)
    inntrospect.naps(path, aligned=True, std=True, persist=True)
    result = inntrospect.contrastive_naps(path, persist=True)
    root = zarr.open_group(str(path), mode="r")
    labels = np.asarray(root["layers/conv2d_25/group"][:]).astype(object).astype(str)
    for layer in ("conv2d_25", "flatten_8"):
        acts = np.asarray(root[f"layers/{layer}/acts"][:])
        if acts.ndim > 2:
            acts = align_reference(acts, np.asarray(root[f"layers/{layer}/grads"][:]))
        assert_statistics(result[layer], acts, labels)
