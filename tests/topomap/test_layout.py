"""Topographic layouts: every method separates clearly different units, reproducibly, in [0, 1]."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given, settings

from inntrospect.topomap.layout import METHODS, Layout, minmax, profile_matrix


def two_clusters(n=60, features=12, seed=0):
    """Units of two kinds: their profiles differ far more between kinds than within."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2, features)) * 4
    kind = np.arange(n) % 2
    return centres[kind] + rng.standard_normal((n, features)) * 0.3, kind


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_every_method_keeps_the_clusters_apart(method, metric):
    from sklearn.metrics import silhouette_score

    x, kind = two_clusters()
    xy = Layout(method, metric, seed=1).fit(x).xy_
    assert xy.shape == (60, 2) and xy.min() >= 0 and xy.max() <= 1
    assert silhouette_score(xy, kind) > 0.5, method


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_coordinates(method):
    x, _ = two_clusters(40)
    a = Layout(method, seed=3).fit(x).xy_
    np.testing.assert_array_equal(a, Layout(method, seed=3).fit(x).xy_)


def test_random_layout_is_the_baseline():
    from sklearn.metrics import silhouette_score

    x, kind = two_clusters()
    assert abs(silhouette_score(Layout("random").fit(x).xy_, kind)) < 0.2


def test_profile_matrix_and_its_column_filter():
    nap = np.zeros((2, 3, 4))  # (group, spatial, unit)
    nap[0, 1, :] = [1, 2, 3, 4]
    nap[1, 2, :] = [0.005, 0.0, -0.009, 0.001]  # every |value| <= 0.01: dropped
    p = profile_matrix(nap)
    assert p.shape == (4, 1)
    np.testing.assert_array_equal(p[:, 0], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="NaN"):
        profile_matrix(np.full((2, 20), np.nan))


def test_small_layers_and_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="15"):
        Layout("pca").fit(np.ones((15, 3)))
    with pytest.raises(ValueError, match="unknown layout method 'umop'"):
        Layout("umop").fit(np.ones((20, 3)))
    np.testing.assert_array_equal(minmax(np.array([[1.0, 2], [3, 2]])), [[0, 0.5], [1, 0.5]])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 300), density=st.floats(0, 0.5), seed=st.integers(0, 2**16))
def test_compiled_graph_forces_equal_numpy(n, density, seed):
    from scipy.sparse import csr_matrix

    from inntrospect.analysis.compiled import kernels
    from inntrospect.topomap.layout import fr_displacement

    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2))
    pos[rng.integers(n)] = pos[0]  # coincident points hit the 0.01 floor
    adj = rng.random((n, n)) < density
    adj = (adj | adj.T) & ~np.eye(n, dtype=bool)
    k = np.sqrt(1.0 / n)
    edges = csr_matrix(adj)
    got = np.empty_like(pos)
    kernels().fr_displacement(pos, edges.indptr.astype(np.int64), edges.indices.astype(np.int64), k, got)
    want = fr_displacement(pos, adj, k)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())


def test_graph_layout_without_numba_keeps_the_clusters_apart(monkeypatch):
    from sklearn.metrics import silhouette_score

    import inntrospect.analysis.compiled as compiled

    monkeypatch.setattr(compiled, "KERNELS", [None])
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 6)), rng.normal(3, 0.1, (20, 6))])
    xy = Layout("graph", seed=0).fit(x).xy_
    assert silhouette_score(xy, np.repeat([0, 1], 20)) > 0.5
