"""Topomap values, images and topographic quality (REFERENCE.md §7, §9): numpy kernels."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.interpolate import griddata

from inntrospect.errors import InntrospectError, NonFiniteError
from inntrospect.topomap import images as im
from inntrospect.topomap import quality as tq

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _griddata_images(xy, values, resolution, fill=np.nan):
    """The reference: ``griddata`` per group (with one BLAS thread, its fastest setting)."""
    gx, gy = im.grid(xy, resolution)
    with im.one_blas_thread():
        return np.stack(
            [griddata(xy, v, (gx, gy), method="linear", fill_value=fill) for v in values]
        )


# -- unit_values ---------------------------------------------------------------
@SETTINGS
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=5, max_side=5),
        elements=st.floats(-100, 100, width=32),
    )
)
def test_unit_values_is_the_mean_over_spatial_axes(nap):
    got = im.unit_values(nap)
    want = nap.astype(np.float64).mean(axis=tuple(range(1, nap.ndim - 1)))
    assert got.shape == (nap.shape[0], nap.shape[-1])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_unit_values_unit_axis():
    nap = np.random.default_rng(0).normal(size=(3, 4, 5, 6))
    np.testing.assert_allclose(im.unit_values(nap, unit_axis=1), nap.mean(axis=(2, 3)))
    np.testing.assert_allclose(
        im.unit_values(np.moveaxis(nap, 3, 1), unit_axis=1), im.unit_values(nap)
    )
    with pytest.raises(ValueError, match="group axis"):
        im.unit_values(nap, unit_axis=0)
    with pytest.raises(ValueError, match="at least 2"):
        im.unit_values(np.ones(3))


# -- interpolate = griddata per group ------------------------------------------
points = st.integers(3, 30).flatmap(
    lambda n: st.one_of(
        # a coarse integer lattice: duplicates, collinear triples, points on grid lines
        hnp.arrays(np.float64, (n, 2), elements=st.integers(-3, 3).map(float)),
        hnp.arrays(np.float64, (n, 2), elements=st.floats(-1e3, 1e3, width=32)),
    )
)


@SETTINGS
@given(points, st.integers(2, 30), st.integers(0, 2**32 - 1), st.sampled_from([np.nan, 0.0]))
def test_interpolate_equals_griddata_per_group(xy, resolution, seed, fill):
    values = np.random.default_rng(seed).normal(size=(3, len(xy)))
    try:
        want = _griddata_images(xy, values, resolution, fill)
    except Exception:  # qhull: no area
        with pytest.raises(ValueError, match="no area"):
            im.interpolate(xy, values, resolution, fill=fill)
        return
    got = im.interpolate(xy, values, resolution, fill=fill)
    assert got.shape == (3, resolution, resolution)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got, want)  # bit for bit: the same LinearNDInterpolator


def test_interpolate_single_image_and_reused_triangulation():
    rng = np.random.default_rng(1)
    xy, values = rng.random((50, 2)), rng.normal(size=(4, 50))
    tri = im.triangulate(xy)
    np.testing.assert_array_equal(
        im.interpolate(xy, values, 30, triangulation=tri), im.interpolate(xy, values, 30)
    )
    np.testing.assert_array_equal(
        im.interpolate(xy, values[2], 30), im.interpolate(xy, values, 30)[2]
    )
    with pytest.raises(ValueError, match="other coordinates"):
        im.interpolate(xy[:-1], values[:, :-1], 20, triangulation=tri)


def test_outside_the_hull_is_nan_or_fill():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # lower-left triangle of the box
    img = im.interpolate(xy, [[1.0, 2.0, 3.0]], resolution=11)[0]
    assert np.isnan(img[0, -1])  # top-right corner: x = 1, y = 1, outside
    assert img[-1, 0] == 1.0 and img[-1, -1] == 2.0 and img[0, 0] == 3.0
    ref = im.interpolate(xy, [[1.0, 2.0, 3.0]], resolution=11, fill=0.0)[0]
    assert ref[0, -1] == 0.0
    np.testing.assert_array_equal(ref[np.isfinite(img)], img[np.isfinite(img)])


# -- orientation ----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_orientation_x_left_to_right_y_bottom_to_top(seed):
    rng = np.random.default_rng(seed)
    xy = np.vstack([[[0, 0], [3, 0], [0, 2], [3, 2]], rng.random((40, 2)) * [3, 2]])
    gx, gy = im.grid(xy, 25)
    by_x, by_y = im.interpolate(xy, np.stack([xy[:, 0], xy[:, 1]]), 25)
    # linear values are reproduced exactly (the hull is the whole box here)
    np.testing.assert_allclose(by_x, gx, atol=1e-12)
    np.testing.assert_allclose(by_y, gy, atol=1e-12)
    # values increasing with x grow left to right, along columns; constant down a column
    assert (np.diff(by_x, axis=1) > 0).all() and np.allclose(np.diff(by_x, axis=0), 0)
    # values increasing with y grow bottom to top: row 0 is the top (largest y)
    assert (np.diff(by_y, axis=0) < 0).all() and np.allclose(np.diff(by_y, axis=1), 0)
    assert by_x[0, 0] == pytest.approx(0) and by_x[0, -1] == pytest.approx(3)
    assert by_y[0, 0] == pytest.approx(2) and by_y[-1, 0] == pytest.approx(0)
    # imshow(origin="upper", extent=image_extent(xy)): left, right, bottom, top
    left, right, bottom, top = im.image_extent(xy)
    assert (gx[0, 0], gx[0, -1], gy[-1, 0], gy[0, 0]) == (left, right, bottom, top)


def test_orientation_of_a_single_bump():
    """A unit with a large value in the upper-right shows up top right in the image."""
    xy = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.8, 0.9]], dtype=float)
    img = im.interpolate(xy, [[0, 0, 0, 0, 1.0]], resolution=11)[0]
    row, col = np.unravel_index(np.argmax(img), img.shape)
    assert (row, col) == (1, 8)  # y = 0.9 -> row 1 from the top; x = 0.8 -> column 8


# -- degenerate input ----------------------------------------------------------
def test_degenerate_input_errors():
    good = np.array([[0, 0], [1, 0], [0, 1]], dtype=float)
    with pytest.raises(ValueError, match="at least 3 units"):
        im.interpolate(good[:2], np.ones((1, 2)))
    with pytest.raises(ValueError, match="no area"):
        im.interpolate([[0, 0], [1, 1], [2, 2], [3, 3]], np.ones((1, 4)))
    with pytest.raises(ValueError, match="no area"):
        im.interpolate(np.ones((5, 2)), np.ones((1, 5)))
    with pytest.raises(NonFiniteError, match="unit 1"):
        im.interpolate(np.vstack([good, [np.nan, 0]])[[0, 3, 1, 2]], np.ones((1, 4)))
    with pytest.raises(NonFiniteError, match="group 0, unit 2") as err:
        im.interpolate(good, [[1.0, 2.0, np.nan]])
    assert isinstance(err.value, InntrospectError) and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="one value per unit"):
        im.interpolate(good, np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"\(unit, 2\)"):
        im.interpolate(np.ones((4, 3)), np.ones((1, 4)))
    with pytest.raises(ValueError, match="resolution"):
        im.interpolate(good, np.ones((1, 3)), resolution=1)


def test_faster_than_griddata_per_group():
    """One triangulation for all groups (REFERENCE: 4608 units x 10 groups, measured ~10x)."""
    rng = np.random.default_rng(0)
    xy, values = rng.random((1000, 2)), rng.normal(size=(6, 1000))
    t = time.perf_counter()
    want = _griddata_images(xy, values, 100)
    t_griddata = time.perf_counter() - t
    t = time.perf_counter()
    got = im.interpolate(xy, values)
    t_ours = time.perf_counter() - t
    np.testing.assert_array_equal(got, want)
    assert t_ours < t_griddata


# -- topographic quality -------------------------------------------------------
def _smooth(n=100, seed=0):
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    return np.sin(3 * xx + 2 * yy + seed) + 0.5 * np.cos(4 * yy - seed)


def test_constant_image_scores_zero():
    q = tq.topographic_quality(np.full((2, 40, 40), 3.5))
    np.testing.assert_allclose(np.r_[q.resize, q.blur, q.resize_errors.ravel()], 0, atol=1e-25)
    assert q.resize.shape == q.blur.shape == (2,)
    assert q.resize_errors.shape == q.blur_errors.shape == (2, 10)


def test_smooth_scores_lower_than_noisy():
    smooth = _smooth()
    noisy = smooth + np.random.default_rng(0).normal(0, 0.3, smooth.shape)
    q = tq.topographic_quality(np.stack([smooth, noisy]), normalize=False)
    assert q.resize[0] < q.resize[1] and q.blur[0] < q.blur[1]
    # more detail removed at later steps: error curves rise
    assert (np.diff(q.blur_errors, axis=1) > 0).all()
    assert (np.diff(q.resize_errors[0]) >= 0).all()
    assert q.resize_mean == pytest.approx(q.resize.mean())
    # the mean of the areas is the area under the mean curve (the paper's code)
    assert q.blur_mean == pytest.approx(np.trapezoid(q.blur_errors.mean(axis=0)))


@SETTINGS
@given(
    st.integers(0, 1000),
    st.floats(-1e3, 1e3).filter(lambda a: abs(a) > 1e-3),
    st.floats(-10, 10),
)
def test_quality_invariances(seed, scale, shift):
    img = np.random.default_rng(seed).normal(size=(2, 24, 24))
    img[:, :5, 17:] = np.nan
    base = tq.topographic_quality(img, normalize=False)
    # normalised: invariant to scaling (either sign)
    a, b = tq.topographic_quality(img), tq.topographic_quality(img * scale)
    np.testing.assert_allclose(a.resize, b.resize, rtol=1e-9)
    np.testing.assert_allclose(a.blur, b.blur, rtol=1e-9)
    # raw: invariant to adding a constant (filters are weighted means), squares with scale
    c = tq.topographic_quality(img + shift, normalize=False)
    np.testing.assert_allclose(c.resize, base.resize, rtol=1e-8)
    np.testing.assert_allclose(c.blur, base.blur, rtol=1e-8)
    d = tq.topographic_quality(img * scale, normalize=False)
    np.testing.assert_allclose(d.blur, base.blur * scale**2, rtol=1e-9)
    # transposing a square image changes nothing (same filter on rows and columns)
    e = tq.topographic_quality(img.transpose(0, 2, 1), normalize=False)
    np.testing.assert_allclose(e.resize, base.resize, rtol=1e-9)
    np.testing.assert_allclose(e.blur, base.blur, rtol=1e-9)
    # groups are scored independently
    f = tq.topographic_quality(img[1], normalize=False)
    np.testing.assert_allclose(f.resize, base.resize[1:], rtol=1e-12)


@SETTINGS
@given(st.integers(0, 1000), st.integers(2, 60), st.floats(0.5, 20))
def test_filters_are_weighted_means(seed, size, sigma):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(30, 37))
    img[rng.random(img.shape) < 0.3] = np.nan
    for out in (tq.shrink_restore(img, size), tq.blur(img, sigma)):
        assert out.shape == img.shape
        fin = out[np.isfinite(img)]
        assert np.isfinite(fin).all()  # every finite pixel gets a value
        assert np.nanmin(img) - 1e-12 <= fin.min() and fin.max() <= np.nanmax(img) + 1e-12


def test_nan_pixels_are_ignored_not_zero():
    """Blank pixels neither count as 0 nor pull their neighbours toward 0."""
    img = np.full((60, 60), 2.0)
    img[:, 40:] = np.nan
    q = tq.topographic_quality(img)
    np.testing.assert_allclose(np.r_[q.resize, q.blur], 0, atol=1e-25)
    filled = tq.topographic_quality(np.nan_to_num(img, nan=0.0))  # the reference's 0 fill
    assert filled.blur[0] > 0.01
    # a NaN region changes the score only through the pixels it hides
    smooth = _smooth(60)
    holed = smooth.copy()
    holed[:8, :8] = np.nan
    a = tq.topographic_quality(smooth, normalize=False).blur[0]
    b = tq.topographic_quality(holed, normalize=False).blur[0]
    assert np.isfinite(b) and abs(a - b) < 0.2 * a


def test_shrink_restore_without_nan_is_two_matrix_products():
    img = np.random.default_rng(3).normal(size=(2, 50, 40))
    a_r = tq.resample_matrix(20, 50) @ tq.resample_matrix(50, 20)
    a_c = tq.resample_matrix(20, 40) @ tq.resample_matrix(40, 20)
    np.testing.assert_allclose(tq.shrink_restore(img, 20), a_r @ img @ a_c.T, atol=1e-12)
    np.testing.assert_allclose(tq.resample_matrix(50, 20).sum(axis=1), 1)


def test_resampling_is_pil_bilinear():
    Image = pytest.importorskip("PIL.Image")
    x = np.random.default_rng(4).random((100, 100)).astype(np.float32)
    for s in (55, 10):
        small = np.asarray(Image.fromarray(x).resize((s, s), Image.BILINEAR))
        ours = tq.resample_matrix(100, s) @ x @ tq.resample_matrix(100, s).T
        np.testing.assert_allclose(small, ours, atol=1e-6)


def test_blur_is_scipy_gaussian_filter():
    from scipy.ndimage import gaussian_filter

    img = np.random.default_rng(5).normal(size=(40, 40))
    np.testing.assert_allclose(tq.blur(img, 4.0), gaussian_filter(img, 4.0, mode="nearest"))
    np.testing.assert_array_equal(tq.shrink_sizes(), [55, 50, 45, 40, 35, 30, 25, 20, 15, 10])
    np.testing.assert_array_equal(tq.blur_sigmas(), np.arange(2, 21, 2))


def test_quality_errors():
    with pytest.raises(NonFiniteError, match="no finite pixel"):
        tq.topographic_quality(np.stack([np.ones((5, 5)), np.full((5, 5), np.nan)]))
    with pytest.raises(NonFiniteError, match="infinite"):
        tq.topographic_quality(np.where(np.eye(5) > 0, np.inf, 1.0))
    with pytest.raises(ValueError, match="shaped"):
        tq.topographic_quality(np.ones(5))


def test_interpolated_maps_end_to_end():
    """A smooth layout map scores lower than the same units with shuffled values."""
    rng = np.random.default_rng(6)
    xy = rng.random((400, 2))
    values = np.stack([np.sin(4 * xy[:, 0]) + xy[:, 1], np.cos(3 * xy[:, 1])])
    smooth = im.interpolate(xy, values)
    shuffled = im.interpolate(xy, values[:, rng.permutation(400)])
    a, b = tq.topographic_quality(smooth), tq.topographic_quality(shuffled)
    assert np.isnan(smooth).any()  # the hull does not fill the box
    assert (a.resize < b.resize).all() and (a.blur < b.blur).all()
