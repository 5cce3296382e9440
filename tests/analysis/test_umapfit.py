"""umapfit: exact neighbours handed to UMAP give umap-learn's own exact-neighbour graph."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from inntrospect.analysis.umapfit import exact_knn, fit_umap, import_umap


def _brute(x, k, metric):
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        d = np.clip(1 - u @ u.T, 0, 2)
    else:
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :k]


@settings(max_examples=30, deadline=None)
@given(hst.integers(2, 80), hst.integers(1, 6), hst.integers(0, 2**32 - 1),
       hst.sampled_from(["euclidean", "cosine"]))
def test_exact_knn_are_the_nearest_rows(n, dims, seed, metric):
    x = np.random.default_rng(seed).normal(size=(n, dims)) + 0.1
    k = min(15, n)
    idx, dist = exact_knn(x, k, metric)
    assert idx.shape == dist.shape == (n, k)
    np.testing.assert_allclose(dist, _brute(x, k, metric), atol=1e-5)
    assert (dist[:, 0] < 1e-5).all()  # each row is its own nearest, as in UMAP's own neighbours


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_given_neighbours_give_umaps_own_graph(metric):
    """Below SMALL_DATA umap-learn finds exact neighbours itself: the fuzzy graphs agree."""
    umap = import_umap()
    x = np.random.default_rng(3).normal(size=(300, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = umap.UMAP(n_neighbors=15, metric=metric, random_state=0, n_epochs=5).fit(x).graph_
        idx, dist = exact_knn(x, 15, metric)
        given_ = umap.UMAP(n_neighbors=15, metric=metric, random_state=0, n_epochs=5,
                           precomputed_knn=(idx, dist, None)).fit(x).graph_
    assert (own != 0).nnz == (given_ != 0).nnz
    np.testing.assert_allclose(own.toarray(), given_.toarray(), atol=1e-5)


def test_fit_umap_is_reproducible_on_both_routes():
    x = np.random.default_rng(4).normal(size=(200, 5))
    for given_neighbors in (False, True):
        a = fit_umap(x, seed=1, n_epochs=20, given_neighbors=given_neighbors)
        b = fit_umap(x, seed=1, n_epochs=20, given_neighbors=given_neighbors)
        assert a.shape == (200, 2) and a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
