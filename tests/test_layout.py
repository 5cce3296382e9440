"""Topographic layouts: every method separates clearly different units, reproducibly, in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

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
