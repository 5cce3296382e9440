"""Topographic quality of topomap images (``REFERENCE.md`` §9): pure numpy/scipy kernels.

How smooth a topomap is, measured by how little it changes when its detail is
removed. For each group image and each step ``p = 0..9``:

* **resize**: shrink the image to ``s = 55 - 5p`` pixels a side (55, 50, ..., 10)
  and scale it back to its original size;
* **blur**: blur it with a Gaussian of standard deviation ``2p + 2`` pixels
  (2, 4, ..., 20);

each gives the mean squared error against the original. A method's score is
the area under its error curve over ``p`` (trapezoidal rule, unit spacing, as
``sklearn.metrics.auc(range(10), errors)`` in the paper's code). **Lower is
smoother**: a smooth map loses little when blurred or shrunk. A constant image
scores 0. Scores are given per group and as their mean (the mean of the
per-group areas equals the area under the mean error curve, which is what the
paper's code reports).

Choices, and why (the paper's code works on rendered RGB pictures with PIL):

* Resampling: linear (triangle filter) resampling that, when shrinking,
  stretches the triangle over ``n_in / n_out`` input pixels, i.e. averages them
  (antialiased), with pixel centres at ``(i + 0.5) * n_in / n_out``. This is
  PIL's ``Image.resize(..., Image.BILINEAR)`` on float images, written as two
  small matrices per size. (The paper's call uses PIL's default filter, bicubic
  in Pillow >= 7; bilinear is chosen because its weights are non-negative, so
  a resampled image never overshoots its range and the NaN-aware weighting
  below stays a weighted mean. ``scipy.ndimage.zoom(order=1)`` was not chosen:
  it does not average when shrinking, so a shrunk image aliases instead of
  losing detail.)
* Gaussian: ``scipy.ndimage.gaussian_filter`` with ``sigma = 2p + 2``,
  ``mode="nearest"`` and ``truncate=4``. PIL's ``GaussianBlur(radius)`` takes
  the radius as the standard deviation and extends edge pixels, which this
  matches (PIL approximates the Gaussian with three box blurs; this is exact).
* Values: the error is computed on float values (**differs**: the reference
  computes it on uint8 pixels, where differences wrap around modulo 256).
  With ``normalize=True`` (default) all images are first divided by the
  largest absolute value over all groups: the shared symmetric colour scale
  of the layer's maps (§7), as the reference's colour-mapped pixels were. So
  scores compare across layers and are invariant to scaling the values.
* NaN pixels (outside the convex hull, see
  :func:`inntrospect.topomap.images.interpolate`) carry no value: every
  filter is applied as a normalised convolution, ``F(x * m) / F(m)`` with ``m``
  the mask of finite pixels, i.e. a weighted mean over finite pixels only
  (without NaN this is the plain filter); and the error is averaged over the
  finite pixels of the original only. Blank pixels therefore neither count as
  0 nor pull their neighbours toward 0.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..errors import NonFiniteError, ParameterError

__all__ = [
    "STEPS",
    "shrink_sizes",
    "blur_sigmas",
    "resample_matrix",
    "shrink_restore",
    "blur",
    "Quality",
    "topographic_quality",
]

#: the steps p of the error curves
STEPS = np.arange(10)


def shrink_sizes() -> np.ndarray:
    """Side of the shrunk image per step: ``55 - 5p`` = 55, 50, ..., 10."""
    return 55 - 5 * STEPS


def blur_sigmas() -> np.ndarray:
    """Standard deviation of the Gaussian per step: ``2p + 2`` = 2, 4, ..., 20 pixels."""
    return 2.0 * STEPS + 2.0


@lru_cache(maxsize=64)
def _resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    support = max(scale, 1.0)  # the triangle's half-width, in input pixels
    centre = (np.arange(n_out) + 0.5) * scale
    x = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centre[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    w.flags.writeable = False
    return w


def resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of linear, antialiased 1-D resampling.

    Output pixel ``i`` (centre at ``(i + 0.5) * n_in / n_out`` in input pixels)
    is the mean of the input pixels weighted by a triangle of half-width
    ``max(n_in / n_out, 1)`` input pixels, truncated at the edges and
    renormalised: PIL's bilinear ``resize``. Rows sum to 1.
    """
    if n_in < 1 or n_out < 1:
        raise ParameterError(f"sizes must be >= 1 pixel; got {n_in} -> {n_out}. Pass the sizes "
                             f"in pixels of the image side and of the resized side.")
    return _resample_matrix(int(n_in), int(n_out))


def _check_images(images) -> tuple[np.ndarray, bool]:
    x = np.asarray(images, dtype=np.float64)
    single = x.ndim == 2
    if single:
        x = x[None]
    if x.ndim != 3 or min(x.shape[1:]) < 2:
        raise ParameterError(
            f"images must be shaped (group, row, col) or (row, col), at least 2 x 2 "
            f"pixels; got shape {np.shape(images)}. Make them with "
            f"inntrospect.topomap.images.interpolate."
        )
    if np.isinf(x).any():
        raise NonFiniteError(
            f"images hold {int(np.isinf(x).sum())} infinite pixels; only NaN (blank, "
            f"outside the convex hull) is allowed. Check the unit values."
        )
    empty = ~np.isfinite(x).reshape(len(x), -1).any(axis=1)
    if empty.any():
        raise NonFiniteError(
            f"image(s) {np.flatnonzero(empty).tolist()} have no finite pixel, so they "
            f"have no quality; interpolate them from at least 3 non-collinear units."
        )
    return x, single


def _normalised(filt, x: np.ndarray) -> np.ndarray:
    """``filt(x * m) / filt(m)``, ``m`` the finite pixels; NaN where no weight reaches."""
    m = np.isfinite(x)
    if m.all():
        return filt(x)
    num = filt(np.where(m, x, 0.0))
    den = filt(m.astype(np.float64))
    out = np.full_like(num, np.nan)
    np.divide(num, den, out=out, where=den > 1e-12)
    return out


def shrink_restore(images, size: int) -> np.ndarray:
    """Shrink each image to ``size x size`` pixels and scale it back (NaN-aware).

    Parameters
    ----------
    images : array_like
        ``(group, row, col)`` or ``(row, col)``; NaN marks blank pixels.
    size : int
        Side of the shrunk image.

    Returns
    -------
    numpy.ndarray
        Same shape as ``images``: ``A_r @ image @ A_c.T`` with
        ``A = resample_matrix(size, n) @ resample_matrix(n, size)``, as a
        normalised convolution over the finite pixels (see the module notes).
    """
    x, single = _check_images(images)
    _, h, w = x.shape
    a_r = resample_matrix(size, h) @ resample_matrix(h, size)
    a_c = resample_matrix(size, w) @ resample_matrix(w, size)
    out = _normalised(lambda y: np.einsum("ij,gjk,lk->gil", a_r, y, a_c, optimize=True), x)
    return out[0] if single else out


def blur(images, sigma: float) -> np.ndarray:
    """Blur each image with a Gaussian of standard deviation ``sigma`` pixels (NaN-aware).

    ``scipy.ndimage.gaussian_filter(image, sigma, mode="nearest", truncate=4.0)``
    as a normalised convolution over the finite pixels (see the module notes).
    """
    from scipy.ndimage import gaussian_filter

    x, single = _check_images(images)
    out = _normalised(
        lambda y: gaussian_filter(y, sigma=(0.0, sigma, sigma), mode="nearest", truncate=4.0), x
    )
    return out[0] if single else out


def _mse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image, the mean squared difference over the pixels finite in both."""
    d = np.square(y - x).reshape(len(x), -1)
    ok = np.isfinite(d)
    return np.where(ok, d, 0.0).sum(axis=1) / ok.sum(axis=1)


class Quality(NamedTuple):
    """Topographic quality scores (lower = smoother).

    Attributes
    ----------
    resize, blur : numpy.ndarray
        ``(group,)`` area under each group's error curve, per method.
    resize_errors, blur_errors : numpy.ndarray
        ``(group, 10)`` the error curves: mean squared error per step ``p``.
    resize_mean, blur_mean : float
        Mean of the per-group areas (= area under the mean error curve).
    """

    resize: np.ndarray
    blur: np.ndarray
    resize_errors: np.ndarray
    blur_errors: np.ndarray
    resize_mean: float
    blur_mean: float


def topographic_quality(images, normalize: bool = True) -> Quality:
    """Topographic quality of a layer's topomap images (``REFERENCE.md`` §9).

    Parameters
    ----------
    images : array_like
        ``(group, row, col)`` images of one layer (or one ``(row, col)`` image),
        as made by :func:`inntrospect.topomap.images.interpolate`; NaN pixels
        are blank (outside the convex hull) and are ignored.
    normalize : bool, default True
        Divide all images by their largest absolute value (over all groups,
        the layer's shared colour scale) first, so that scores compare across
        layers and do not depend on the values' units. ``False`` keeps the
        values' units (errors in squared units).

    Returns
    -------
    Quality
        Per-group areas under the resize and blur error curves, the curves,
        and the means over groups. Lower is smoother; a constant image scores 0.

    Raises
    ------
    inntrospect.errors.ParameterError
        (a ``ValueError``) Images of the wrong shape.
    inntrospect.errors.NonFiniteError
        Infinite pixels, or an image without any finite pixel.

    Examples
    --------
    >>> yy, xx = np.mgrid[0:100, 0:100] / 99.0
    >>> smooth = topographic_quality(np.sin(3 * xx + 2 * yy)[None])
    >>> noisy = np.sin(3 * xx + 2 * yy) + np.random.default_rng(0).normal(0, 0.3, xx.shape)
    >>> bool(smooth.blur_mean < topographic_quality(noisy[None]).blur_mean)
    True
    """
    x, _ = _check_images(images)
    if normalize:
        peak = np.nanmax(np.abs(x))
        if peak > 0:
            x = x / peak
    resize_err = np.stack([_mse(x, shrink_restore(x, int(s))) for s in shrink_sizes()], axis=1)
    blur_err = np.stack([_mse(x, blur(x, float(s))) for s in blur_sigmas()], axis=1)
    resize_auc = np.trapezoid(resize_err, dx=1.0, axis=1)
    blur_auc = np.trapezoid(blur_err, dx=1.0, axis=1)
    return Quality(
        resize=resize_auc,
        blur=blur_auc,
        resize_errors=resize_err,
        blur_errors=blur_err,
        resize_mean=float(resize_auc.mean()),
        blur_mean=float(blur_auc.mean()),
    )
