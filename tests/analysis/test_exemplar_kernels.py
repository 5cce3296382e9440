"""Top exemplars: the chunk / merge / finalize kernels against a plain-loop reference."""

from __future__ import annotations

import pickle

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from inntrospect.analysis.compiled import kernels
from inntrospect.analysis.exemplar_kernels import (
    Exemplars,
    RunningExemplars,
    chunk_exemplars,
    finalize_exemplars,
    merge_exemplars,
)
from inntrospect.errors import ParameterError


def reference(x, codes, k, n_groups):
    """The definition, one group and unit at a time: scores, lexsort, first k."""
    n, spatial, units = len(x), x.shape[1:-1], x.shape[-1]
    flat = x.reshape(n, -1, units)
    score, arg = flat.max(axis=1), flat.argmax(axis=1)
    sample = np.full((2, n_groups, k, units), -1, np.int64)
    value = np.full((2, n_groups, k, units), np.nan)
    position = np.full((2, n_groups, k, units, len(spatial)), -1, np.int32)
    for g in range(n_groups):
        idx = np.flatnonzero(codes == g)
        for u in range(units):
            s = score[idx, u]
            for end, o in enumerate([np.lexsort((idx, -s)), np.lexsort((idx, s))]):
                o = o[:k]
                sample[end, g, : len(o), u] = idx[o]
                value[end, g, : len(o), u] = s[o]
                if spatial:
                    position[end, g, : len(o), u] = np.stack(np.unravel_index(arg[idx[o], u], spatial), axis=-1)
    return sample, value, position


def finalize(part, x, k, n_groups):
    return finalize_exemplars(part, n_groups, k, x.shape[1:-1], x.shape[-1])


def assert_same(got, want):
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def assert_identical(a, b):
    """Bit for bit (NaN included)."""
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert u.tobytes() == v.tobytes()


def random_tree_merge(parts, rnd):
    """Merge parts in a random order and tree shape (fan-in 2 or 3)."""
    parts = list(parts)
    rnd.shuffle(parts)
    while len(parts) > 1:
        m = rnd.randint(2, min(3, len(parts)))
        at = rnd.randrange(len(parts) - m + 1)
        merged = merge_exemplars(*parts[at : at + m])
        parts[at : at + m] = [merged]
    return parts[0]


def chunked(x, codes, k, cuts):
    bounds = [0, *sorted(set(cuts)), len(x)]
    return [chunk_exemplars(x[a:b], codes[a:b], a, k) for a, b in zip(bounds[:-1], bounds[1:])]


@st.composite
def layers(draw, max_n=40):
    n = draw(st.integers(1, max_n))
    spatial = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)))
    units = draw(st.integers(1, 4))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if draw(st.booleans()):  # many ties: integer values from a small range
        elements = st.integers(-2, 2).map(float)
    else:
        elements = st.floats(-1e3, 1e3, width=32)
    x = draw(hnp.arrays(dtype, (n, *spatial, units), elements=elements))
    n_groups = draw(st.integers(1, 5))  # some groups may have no sample at all
    codes = np.array(draw(st.lists(st.integers(0, n_groups - 1), min_size=n, max_size=n)), np.int16)
    if draw(st.booleans()):  # a corpus sorted by group
        codes = np.sort(codes)
    k = draw(st.integers(1, 6))
    cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=6)) if n > 1 else []
    return x, codes, k, n_groups, cuts


@settings(max_examples=150, deadline=None)
@given(layers())
def test_single_chunk_matches_reference(layer):
    x, codes, k, n_groups, _ = layer
    got = finalize(chunk_exemplars(x, codes, 0, k), x, k, n_groups)
    assert_same(got, reference(x, codes, k, n_groups))


@settings(max_examples=150, deadline=None)
@given(layers(), st.randoms(use_true_random=False))
def test_any_chunking_and_merge_tree_is_bit_identical(layer, rnd):
    x, codes, k, n_groups, cuts = layer
    whole = finalize(chunk_exemplars(x, codes, 0, k), x, k, n_groups)
    parts = chunked(x, codes, k, cuts)
    got = finalize(random_tree_merge(parts, rnd), x, k, n_groups)
    assert_identical(got, whole)
    assert_same(got, reference(x, codes, k, n_groups))


def test_ties_go_to_the_lowest_sample_index():
    # one unit, every score equal but one: ranks follow sample order, across chunks too
    x = np.zeros((9, 1), np.float32)
    x[4] = 1.0
    codes = np.zeros(9, np.int16)
    for cuts in ([], [3], [2, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8]):
        parts = chunked(x, codes, 3, cuts)
        sample, value, _ = finalize(merge_exemplars(*parts[::-1]), x, 3, 1)
        np.testing.assert_array_equal(sample[0, 0, :, 0], [4, 0, 1])
        np.testing.assert_array_equal(sample[1, 0, :, 0], [0, 1, 2])
        np.testing.assert_array_equal(value[0, 0, :, 0], [1, 0, 0])


def test_position_is_first_maximum_in_c_order():
    x = np.zeros((2, 2, 3, 1))
    x[0, 1, 0, 0] = x[0, 1, 2, 0] = 5.0  # two maxima: the first in C order
    x[1] = -1.0  # all equal: position (0, 0)
    sample, value, position = finalize(chunk_exemplars(x, [0, 0], 10, 2), x, 2, 1)
    np.testing.assert_array_equal(sample[0, 0, :, 0], [10, 11])
    np.testing.assert_array_equal(value[0, 0, :, 0], [5.0, -1.0])
    np.testing.assert_array_equal(position[0, 0, :, 0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(position[1, 0, :, 0], [[0, 0], [1, 0]])


def test_k_larger_than_groups_and_absent_groups():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    codes = np.array([2, 0, 2, 2])  # group 1 has no sample, group 0 one
    sample, value, position = finalize(chunk_exemplars(x, codes, 0, 5), x, 5, 3)
    assert sample.shape == value.shape == (2, 3, 5, 3) and position.shape == (2, 3, 5, 3, 0)
    assert (sample[:, 1] == -1).all() and np.isnan(value[:, 1]).all()
    np.testing.assert_array_equal(sample[:, 0, 0], [[1, 1, 1], [1, 1, 1]])
    assert (sample[:, 0, 1:] == -1).all()
    np.testing.assert_array_equal(sample[0, 2, :, 0], [3, 2, 0, -1, -1])
    np.testing.assert_array_equal(sample[1, 2, :, 0], [0, 2, 3, -1, -1])
    np.testing.assert_array_equal(value[1, 2, :3, 2], [2.0, 8.0, 11.0])


def test_groups_absent_from_some_chunks():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3, 4)).astype(np.float32)
    codes = np.repeat(np.arange(6), 10).astype(np.int16)  # sorted: most chunks see few groups
    parts = chunked(x, codes, 4, [7, 13, 25, 31, 50])
    assert [len(p.codes) for p in parts] == [1, 2, 2, 2, 2, 1]
    got = finalize(merge_exemplars(*parts), x, 4, 8)
    assert_same(got, reference(x, codes, 4, 8))


def test_float32_values_are_exact_in_float64():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(50, 2, 2, 5)) * 1e3).astype(np.float32)
    codes = rng.integers(0, 3, 50)
    sample, value, _ = finalize(chunk_exemplars(x, codes, 0, 4), x, 4, 3)
    assert value.dtype == np.float64
    got = value[0, :, 0, :]  # the best score of each group and unit
    want = np.stack([x[codes == g].max(axis=(1, 2)).max(axis=0) for g in range(3)]).astype(np.float64)
    np.testing.assert_array_equal(got, want)
    assert (got.astype(np.float32).astype(np.float64) == got).all()


def test_single_sample():
    x = np.array([[[3.0, -1.0], [7.0, -2.0]]], np.float32)  # (1, 2, 2): one spatial axis
    part = chunk_exemplars(x, np.array([0]), 41, 3)
    sample, value, position = finalize(part, x, 3, 1)
    np.testing.assert_array_equal(sample[:, 0, 0], [[41, 41], [41, 41]])
    np.testing.assert_array_equal(value[:, 0, 0], [[7.0, -1.0], [7.0, -1.0]])
    np.testing.assert_array_equal(position[:, 0, 0], [[[1], [0]], [[1], [0]]])
    assert (sample[:, :, 1:] == -1).all() and (position[:, :, 1:] == -1).all()


def test_negative_zero_ties_with_zero():
    x = np.array([[0.0], [-0.0], [0.0], [-1.0]], np.float32)
    sample, value, _ = finalize(chunk_exemplars(x, np.zeros(4, np.int16), 0, 2), x, 2, 1)
    np.testing.assert_array_equal(sample[:, 0, :, 0], [[0, 1], [3, 0]])


def test_huge_sample_indices_and_mixed_dtypes():
    # indices beyond 2**32 (and near 2**62) take the slower exact paths; the ranking must not change
    rng = np.random.default_rng(6)
    x = rng.integers(-2, 3, size=(80, 2, 3)).astype(np.float32)  # many ties
    codes = rng.integers(0, 3, 80).astype(np.int16)
    want = finalize(merge_exemplars(*chunked(x, codes, 4, [20, 50])), x, 4, 3)
    for offset, dtype in [(2**33, np.float32), (2**60, np.float64), (0, np.float64)]:
        parts = [chunk_exemplars(x[a:b].astype(dtype), codes[a:b], offset + a, 4) for a, b in [(0, 20), (20, 50), (50, 80)]]
        sample, value, position = finalize(merge_exemplars(*parts), x, 4, 3)
        np.testing.assert_array_equal(np.where(sample < 0, -1, sample - offset), want[0])
        assert_identical((value, position), want[1:])
    # a float32 part merged with a float64 part
    parts = [chunk_exemplars(x[:40], codes[:40], 0, 4), chunk_exemplars(x[40:].astype(np.float64), codes[40:], 40, 4)]
    assert_identical(finalize(merge_exemplars(*parts), x, 4, 3), want)


def test_non_contiguous_input():
    rng = np.random.default_rng(7)
    big = rng.normal(size=(30, 5, 4, 6)).astype(np.float32)
    x = big[:, ::2, :, ::2]  # (30, 3, 4, 3), a strided view
    codes = rng.integers(0, 2, 30)
    assert_identical(finalize(chunk_exemplars(x, codes, 0, 3), x, 3, 2), finalize(chunk_exemplars(x.copy(), codes, 0, 3), x, 3, 2))
    assert_same(finalize(chunk_exemplars(x, codes, 0, 3), x, 3, 2), reference(x, codes, 3, 2))


def test_empty_chunk_and_single_part():
    x = np.ones((0, 2, 3))
    empty = chunk_exemplars(x, np.array([], np.int16), 0, 2)
    assert empty.value.shape == (2, 3, 0) and empty.k == 2
    y = np.arange(6.0).reshape(2, 1, 3)
    part = chunk_exemplars(y, np.array([1, 1]), 0, 2)
    assert merge_exemplars(part) is part
    assert_identical(finalize(merge_exemplars(empty, part, empty), y, 2, 2), finalize(part, y, 2, 2))


def test_partial_is_small_and_does_not_reference_the_chunk():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4, 4, 6)).astype(np.float32)
    codes = rng.integers(0, 4, 500).astype(np.int16)
    part = chunk_exemplars(x, codes, 1000, 3)
    assert isinstance(part, Exemplars) and part.k == 3 and part.n_units == 6
    np.testing.assert_array_equal(part.codes, [0, 1, 2, 3])
    np.testing.assert_array_equal(part.counts, [3, 3, 3, 3])
    for a in (part.value, part.sample, part.position):
        assert a.shape == (2, 6, 12) and not np.shares_memory(a, x)
    before = finalize(part, x, 3, 4)
    x[:] = 0  # a reused buffer
    assert_identical(finalize(part, x, 3, 4), before)
    assert_identical(finalize(pickle.loads(pickle.dumps(part)), x, 3, 4), before)
    assert (before[0] >= 1000).all() and (before[0] < 1500).all()  # global indices


def test_many_groups_and_unsorted_codes():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 4, size=(600, 3, 8)).astype(np.float32)  # many ties
    codes = rng.integers(0, 250, 600).astype(np.int16)  # most groups smaller than k in a chunk
    parts = chunked(x, codes, 5, [100, 200, 333, 450])
    got = finalize(merge_exemplars(merge_exemplars(*parts[:2]), merge_exemplars(*parts[2:])), x, 5, 250)
    assert_same(got, reference(x, codes, 5, 250))


def test_realistic_size():
    rng = np.random.default_rng(5)
    x = np.maximum(rng.normal(size=(2000, 7, 7, 32)), 0).astype(np.float32)  # ReLU: many zeros
    x[:, :, :, :4] = 0  # dead units: every score ties at zero
    codes = rng.integers(0, 10, 2000).astype(np.int16)
    want = reference(x, codes, 16, 10)
    assert_same(finalize(chunk_exemplars(x, codes, 0, 16), x, 16, 10), want)
    parts = chunked(x, codes, 16, [500, 1000, 1500])
    assert_same(finalize(merge_exemplars(*parts[::-1]), x, 16, 10), want)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: chunk_exemplars(np.ones((3, 2)), [0, 0, 0], 0, 0), "k >= 1"),
        (lambda: chunk_exemplars(np.ones((3, 2)), [0, 0, 0], 0, 1.5), "positive integer"),
        (lambda: chunk_exemplars(np.ones((3, 2)), [0, 0, 0], 0, True), "positive integer"),
        (lambda: chunk_exemplars(np.ones((3, 2)), [0, 0], 0, 2), "one group code per sample"),
        (lambda: chunk_exemplars(np.ones(3), [0, 0, 0], 0, 2), r"x\[None\]"),
        (lambda: chunk_exemplars(np.ones((3, 0)), [0, 0, 0], 0, 2), "at least one unit"),
        (lambda: chunk_exemplars(np.ones((3, 2), int), [0, 0, 0], 0, 2), "float32"),
        (lambda: chunk_exemplars(np.ones((3, 2)), [0, -1, 0], 0, 2), ">= 0"),
        (lambda: chunk_exemplars(np.ones((3, 2)), [0.0, 1.0, 0.0], 0, 2), "group_codes"),
        (lambda: chunk_exemplars(np.ones((3, 2)), [0, 0, 0], -1, 2), "start"),
        (lambda: merge_exemplars(), "at least one"),
        (
            lambda: merge_exemplars(
                chunk_exemplars(np.ones((3, 2)), [0, 0, 0], 0, 2), chunk_exemplars(np.ones((3, 2)), [0, 0, 0], 3, 3)
            ),
            "same k",
        ),
        (lambda: finalize_exemplars(chunk_exemplars(np.ones((3, 2)), [0, 0, 0], 0, 2), 1, 3, (), 2), "k=3"),
        (lambda: finalize_exemplars(chunk_exemplars(np.ones((3, 2)), [0, 0, 4], 0, 2), 3, 2, (), 2), "n_groups"),
        (lambda: finalize_exemplars(chunk_exemplars(np.arange(30.0).reshape(3, 5, 2), [0, 0, 0], 0, 2), 1, 2, (2,), 2), "spatial"),
    ],
)
def test_errors_name_the_fix(call, match):
    with pytest.raises(ParameterError, match=match):
        call()


@pytest.mark.skipif(kernels() is None, reason="numba is not installed (or INNTROSPECT_NUMBA=0)")
@settings(max_examples=150, deadline=None)
@given(layers(), st.integers(0, 1000), st.randoms(use_true_random=False))
def test_the_compiled_running_top_k_equals_the_numpy_kernels_bit_for_bit(layer, start, rnd):
    """Chunks of a task added one after the other by the compiled loop, then merged with other
    tasks' partials in any order: the same exemplars as the numpy kernels."""
    from inntrospect.analysis import exemplar_kernels
    from inntrospect.analysis.exemplar_kernels import merge_compiled

    x, codes, k, n_groups, cuts = layer
    bounds = [0, *sorted(set(cuts)), len(x)]
    tasks = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(exemplar_kernels, "QUEUE", rnd.choice([1, 7, 1 << 16]))  # ranked in often
        for a, b in zip(bounds[:-1], bounds[1:]):
            running = RunningExemplars(kernels(), codes[a:b], start + a, k)
            half = (a + b) // 2  # a task of two chunks
            for lo, hi in ((a, half), (half, b)):
                if hi > lo:
                    running.add(x[lo:hi])
            tasks.append(running.result())
            assert tasks[-1].ranked
            # a task's ranked result finalized as it is (no sort) equals the sorted route
            alone = finalize(tasks[-1], x, k, n_groups)
            assert_identical(alone, finalize(tasks[-1]._replace(ranked=False), x, k, n_groups))
            assert_identical(alone, finalize(chunk_exemplars(x[a:b], codes[a:b], start + a, k), x, k, n_groups))
    got = finalize(random_tree_merge(tasks, rnd), x, k, n_groups)
    want = finalize(chunk_exemplars(x, codes, start, k), x, k, n_groups)
    assert_identical(got, want)
    # ranked parts merged list by list by the compiled merge, in a random tree: still ranked, the same
    parts = list(tasks)
    rnd.shuffle(parts)
    while len(parts) > 1:
        m = rnd.randint(2, min(3, len(parts)))
        at = rnd.randrange(len(parts) - m + 1)
        parts[at : at + m] = [merge_compiled(kernels(), *parts[at : at + m])]
    assert parts[0].ranked
    assert_identical(finalize(parts[0], x, k, n_groups), want)


@pytest.mark.skipif(kernels() is None, reason="numba is not installed (or INNTROSPECT_NUMBA=0)")
@settings(max_examples=150, deadline=None)
@given(layers(), st.randoms(use_true_random=False))
def test_the_compiled_merge_equals_the_numpy_merge(layer, rnd):
    from inntrospect.analysis.exemplar_kernels import merge_compiled

    x, codes, k, n_groups, cuts = layer
    parts = chunked(x, codes, k, cuts)
    rnd.shuffle(parts)
    got = finalize(merge_compiled(kernels(), *parts), x, k, n_groups)
    want = finalize(merge_exemplars(*parts), x, k, n_groups)
    assert_identical(got, want)
