"""Topomap values and images (``REFERENCE.md`` §7): pure numpy/scipy kernels.

* :func:`unit_values` — the value of each unit per group: the (contrastive)
  NAP averaged over its spatial axes, ``(group, *spatial, unit) -> (group, unit)``.
* :func:`interpolate` — the images: the unit values, placed at their layout
  coordinates, linearly interpolated onto a square grid spanning the
  coordinates' bounding box, ``(group, unit) -> (group, resolution, resolution)``.
* :func:`image_extent` — the ``extent`` that puts those images over a scatter
  of the coordinates in ``imshow``.
* :func:`fade_insignificant` — the unit values with those of units whose
  contrast is not significant set to 0 (an option of the topomaps).

The images equal ``scipy.interpolate.griddata(xy, values[g], grid,
method="linear")`` for each group ``g``, to the last bit (it is the same
``scipy.interpolate.LinearNDInterpolator``), but the Delaunay triangulation
and its barycentric transforms are computed once and shared by all groups
(``griddata`` redoes both per group), and the transforms are computed with
one BLAS thread (see :func:`one_blas_thread`). Measured on 4608 units, 10
groups and the default 100 x 100 grid, on a busy 2-core machine (medians of 5):
35-90 ms, against 330-670 ms for ``griddata`` per group run with one BLAS
thread too (x7.5-9.4), and 1.2-3.8 s with OpenBLAS' default threads (x30-50).

**Differs** from the reference toolbox: pixels outside the convex hull of the
coordinates are NaN (left blank by ``imshow``), not 0; ``fill=0.0``
reproduces the reference. Row/column orientation: see :func:`interpolate`.
"""

from __future__ import annotations

import contextlib

import numpy as np

from ..errors import NonFiniteError, ParameterError

__all__ = ["unit_values", "fade_insignificant", "interpolate", "triangulate", "image_extent", "grid"]


def unit_values(nap: np.ndarray, unit_axis: int = -1) -> np.ndarray:
    """The value of each unit for each group: the NAP averaged over its spatial axes.

    Parameters
    ----------
    nap : numpy.ndarray
        A (contrastive) NAP, shaped ``(group, *spatial, unit)``: group axis first,
        zero or more spatial axes, and the unit (channel) axis at ``unit_axis``.
    unit_axis : int, default -1
        Position of the unit axis. It must not be the group axis (0).

    Returns
    -------
    numpy.ndarray
        ``(group, unit)``, float64 (the mean is accumulated in float64).

    Examples
    --------
    >>> nap = np.arange(2 * 3 * 3 * 4, dtype=float).reshape(2, 3, 3, 4)
    >>> unit_values(nap).shape
    (2, 4)
    >>> unit_values(np.ones((5, 7))).shape  # no spatial axes: returned as is
    (5, 7)
    """
    nap = np.asarray(nap)
    if nap.ndim < 2:
        raise ParameterError(
            f"unit_values expects a NAP shaped (group, *spatial, unit) with at least 2 "
            f"axes; got shape {nap.shape}. Add the group axis (e.g. nap[None]) for a "
            f"single group."
        )
    axis = unit_axis + nap.ndim if unit_axis < 0 else unit_axis
    if not 0 < axis < nap.ndim:
        raise ParameterError(
            f"unit_axis={unit_axis} is not a unit axis of a NAP with {nap.ndim} axes "
            f"(shape {nap.shape}): axis 0 is the group axis; pass -1 when the units "
            f"come last."
        )
    nap = np.moveaxis(nap, axis, -1)
    spatial = tuple(range(1, nap.ndim - 1))
    if not spatial:
        return nap.astype(np.float64, copy=False)
    return nap.mean(axis=spatial, dtype=np.float64)


def fade_insignificant(values, q, fade_q: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit values with the units whose contrast is not significant set to 0, per group.

    A unit is significant for a group when its smallest q over the spatial
    positions is below ``fade_q``; otherwise (including when every q is NaN,
    untestable) its value for that group becomes exactly 0, neutral in the
    topomaps' diverging colour map. The others keep their value bit for bit.

    Parameters
    ----------
    values : array_like
        ``(group, unit)`` unit values (see :func:`unit_values`).
    q : array_like
        ``(group, *spatial, unit)`` q-values of the same groups and units (the
        ``q`` of a ``contrast/<layer>`` node).
    fade_q : float
        The threshold, in (0, 1).

    Returns
    -------
    values : numpy.ndarray
        ``(group, unit)`` float64, a new array.
    faded : numpy.ndarray of bool
        ``(group, unit)``: the units set to 0.

    Examples
    --------
    >>> values = np.array([[1.0, -2.0, 3.0]])
    >>> q = np.array([[[0.01, 0.5, np.nan]], [[0.9, 0.04, np.nan]]]).transpose(1, 0, 2)  # (1, 2, 3)
    >>> fade_insignificant(values, q, 0.05)[0]
    array([[ 1., -2.,  0.]])
    """
    values = np.array(values, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if values.ndim != 2 or q.ndim < 2 or q.shape[0] != values.shape[0] or q.shape[-1] != values.shape[1]:
        raise ParameterError(
            f"values must be (group, unit) and q (group, *spatial, unit) of the same groups and units; "
            f"got {values.shape} and {q.shape}. Pass unit_values(nap) and the 'q' of the same "
            f"contrast/<layer> Dataset."
        )
    if isinstance(fade_q, bool) or not 0 < float(fade_q) < 1:
        raise ParameterError(f"fade_q must be a q-value threshold in (0, 1); got {fade_q!r}. "
                             f"Pass e.g. 0.05.")
    qmin = np.where(np.isnan(q), np.inf, q).min(axis=tuple(range(1, q.ndim - 1)))  # (group, unit)
    faded = ~(qmin < float(fade_q))
    values[faded] = 0.0
    return values, faded


# -- grid and weights ----------------------------------------------------------
def _check_xy(xy) -> np.ndarray:
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ParameterError(
            f"xy must be the units' 2-D coordinates, shaped (unit, 2); got shape "
            f"{xy.shape}. Pass the layout of the layer (one row of x, y per unit)."
        )
    if not np.isfinite(xy).all():
        bad = np.flatnonzero(~np.isfinite(xy).all(axis=1))
        raise NonFiniteError(
            f"xy holds NaN or infinite coordinates for {bad.size} of {len(xy)} units "
            f"(first: unit {bad[0]}); recompute the layout, or drop those units from "
            f"both xy and values."
        )
    if len(xy) < 3:
        raise ParameterError(
            f"a topomap image needs at least 3 units (a triangle) to interpolate; got "
            f"{len(xy)}. Layers this small get no layout (REFERENCE.md §6): plot their "
            f"values directly instead."
        )
    return xy


def image_extent(xy) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` of the images of :func:`interpolate`.

    Pass it as ``imshow(image, origin="upper", extent=image_extent(xy))`` to lay
    an image exactly under ``scatter(xy[:, 0], xy[:, 1])`` (pixel centres on the
    grid points).
    """
    xy = _check_xy(xy)
    (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
    return float(x0), float(x1), float(y0), float(y1)


def grid(xy, resolution: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The grid points of the images: ``(X, Y)``, each ``(resolution, resolution)``.

    ``X[row, col]`` increases with ``col`` from the smallest to the largest x of
    the coordinates; ``Y[row, col]`` decreases with ``row`` from the largest to the
    smallest y. So ``image[row, col]`` is the value at ``(X[row, col], Y[row, col])``
    and ``imshow(image, origin="upper")`` shows it the way a scatter of the
    coordinates is drawn (x to the right, y up).
    """
    xy = _check_xy(xy)
    if int(resolution) != resolution or resolution < 2:
        raise ParameterError(
            f"resolution must be an integer >= 2 (pixels per side); got {resolution!r}."
        )
    resolution = int(resolution)
    (x0, y0), (x1, y1) = xy.min(axis=0), xy.max(axis=0)
    x = np.linspace(x0, x1, resolution)
    y = np.linspace(y1, y0, resolution)
    return np.meshgrid(x, y, indexing="xy")


def one_blas_thread():
    """Limit BLAS/LAPACK to one thread while scipy computes the barycentric transforms.

    ``Delaunay.transform`` makes one tiny LAPACK call per triangle; with a
    multi-threaded OpenBLAS on a busy machine each call pays a thread hand-off:
    measured on 4608 units (9195 triangles), 25 ms with one thread against
    0.3-4 s with two. Uses ``threadpoolctl`` when it is installed (scikit-learn
    brings it), else does nothing.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def triangulate(xy):
    """The Delaunay triangulation of the unit coordinates, ready for :func:`interpolate`.

    Compute it once per layout and pass it to :func:`interpolate` as
    ``triangulation=`` to reuse it across calls (it is reused across groups
    within one call anyway).

    Returns
    -------
    scipy.spatial.Delaunay
        With its barycentric transforms already computed.

    Raises
    ------
    inntrospect.errors.ParameterError
        (a ``ValueError``) Fewer than 3 units, or all units on one line (no triangle
        to interpolate in).
    inntrospect.errors.NonFiniteError
        NaN or infinite coordinates.
    """
    from scipy.spatial import Delaunay, QhullError

    xy = _check_xy(xy)
    try:
        with one_blas_thread():
            tri = Delaunay(xy)
            tri.transform  # noqa: B018 -- computed here, under the thread limit
    except QhullError as err:
        raise ParameterError(
            f"the {len(xy)} unit coordinates span no area (all on one line or one "
            f"point), so there is no triangle to interpolate in: check the layout "
            f"(it should be 2-D, e.g. min-max scaled per column, not constant along "
            f"one axis). Qhull said: {str(err).strip().splitlines()[0]}"
        ) from None
    return tri


def interpolate(
    xy,
    values,
    resolution: int = 100,
    fill: float = np.nan,
    triangulation=None,
) -> np.ndarray:
    """Topomap images: unit values linearly interpolated between their coordinates.

    Parameters
    ----------
    xy : array_like
        ``(unit, 2)`` coordinates of the units (the layer's layout).
    values : array_like
        ``(group, unit)`` values of the units per group (see :func:`unit_values`),
        or ``(unit,)`` for a single image.
    resolution : int, default 100
        Pixels per side. The grid spans the bounding box of ``xy``: column ``c``
        is at ``x = xmin + c * (xmax - xmin) / (resolution - 1)``, row ``r`` at
        ``y = ymax - r * (ymax - ymin) / (resolution - 1)`` (see :func:`grid`).
    fill : float, default NaN
        Value of pixels outside the convex hull of ``xy``. NaN leaves them blank
        in ``imshow``; ``fill=0.0`` reproduces the reference toolbox, which
        paints them as a value of 0 (**differs**: the default does not, since 0
        is a real value and the hull's outside has none).
    triangulation : scipy.spatial.Delaunay, optional
        :func:`triangulate` of these ``xy``, to reuse it across calls.

    Returns
    -------
    numpy.ndarray
        ``(group, resolution, resolution)`` float64 (``(resolution, resolution)``
        for 1-D ``values``). Orientation: ``image[row, col]`` is at x increasing
        with ``col`` and y *decreasing* with ``row``, so
        ``imshow(image, origin="upper", extent=image_extent(xy))`` matches
        ``scatter(xy[:, 0], xy[:, 1])`` (the reference toolbox gets the same
        picture by swapping rows and columns and flipping y). Per group ``g`` it
        equals ``scipy.interpolate.griddata(xy, values[g], grid(xy, resolution),
        method="linear", fill_value=fill)``, bit for bit: it is the same
        ``LinearNDInterpolator``, given all groups at once on one triangulation.

    Raises
    ------
    inntrospect.errors.ParameterError
        (a ``ValueError``) Fewer than 3 units, all units on one line, or mismatched shapes.
    inntrospect.errors.NonFiniteError
        NaN or infinity in ``xy`` or ``values``.

    Examples
    --------
    >>> xy = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> img = interpolate(xy, xy[:, 0][None], resolution=3)  # value = x
    >>> img[0]
    array([[0. , 0.5, 1. ],
           [0. , 0.5, 1. ],
           [0. , 0.5, 1. ]])
    """
    from scipy.interpolate import LinearNDInterpolator

    xy = _check_xy(xy)
    values = np.asarray(values, dtype=np.float64)
    single = values.ndim == 1
    if single:
        values = values[None]
    if values.ndim != 2 or values.shape[1] != len(xy):
        raise ParameterError(
            f"values must be shaped (group, unit) with one value per unit of xy "
            f"({len(xy)} units); got shape {values.shape}. Use unit_values() to reduce "
            f"a NAP (group, *spatial, unit) to (group, unit)."
        )
    if not np.isfinite(values).all():
        g, u = np.argwhere(~np.isfinite(values))[0]
        raise NonFiniteError(
            f"values hold NaN or infinity ({int((~np.isfinite(values)).sum())} of "
            f"{values.size}; first at group {g}, unit {u}); NaN has no place in "
            f"an interpolation: fix the NAPs, or drop those units from xy and values."
        )
    gx, gy = grid(xy, resolution)
    if triangulation is None:
        tri = triangulate(xy)
    else:
        tri = triangulation
        if tri.points.shape != xy.shape or not np.array_equal(tri.points, xy):
            raise ParameterError(
                f"triangulation was made from other coordinates ({tri.points.shape[0]} "
                f"points) than xy ({len(xy)} units); make it with triangulate(xy)."
            )
        with one_blas_thread():
            tri.transform  # noqa: B018 -- cached; computed here if it was not yet
    interp = LinearNDInterpolator(tri, values.T, fill_value=fill)
    out = interp(np.stack([gx.ravel(), gy.ravel()], axis=1))  # (pixel, group)
    out = np.ascontiguousarray(out.T).reshape(len(values), *gx.shape)
    return out[0] if single else out
