"""Topomaps of a store: layouts, images and layout comparisons (``REFERENCE.md`` §6–9).

Thin wrappers over the kernels of this package. Two steps write into the store:

* :func:`topomap_layout` — ``layout/<layer>``: the units' coordinates ``xy``,
  computed from the current contrastive NAPs (or NAPs), one layout per layer
  with more than :data:`~inntrospect.topomap.layout.MIN_UNITS` units;
* :func:`topomap_images` — ``topomap/<layer>``: ``xy``, the unit values per
  group and the interpolated images, with the layer's shared colour scale and
  its topographic quality in the attributes.

A new layout makes old images stale, and new NAPs make both stale
(:mod:`inntrospect.store.steps`). :func:`compare_layouts` runs several methods on
the same profiles without writing anything.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Literal

import numpy as np

from .. import store as st
from ..checks import check_bool, check_choice
from ..errors import ParameterError
from ..store import steps
from . import circle
from .images import fade_insignificant, image_extent, interpolate, triangulate, unit_values
from .layout import METHODS, MIN_UNITS, Layout, profile_matrix
from .quality import topographic_quality

__all__ = ["topomap_layout", "topomap_images", "compare_layouts", "SOURCES"]

log = logging.getLogger("inntrospect")

#: where the profiles of a layout come from
SOURCES = ("contrast", "naps")


def _profiles(store: st.Store, source: str, layers: Sequence[str] | None) -> tuple[dict, dict]:
    """The current source results ``{layer: Dataset}`` and their record."""
    check_choice("source", source, SOURCES)
    results = steps.load(store, source)  # checks the results are current
    rec = store.records[source]
    names = steps.select_layers(results, layers, f"the {source} results")
    return {name: results[name] for name in names}, rec


def _split(results: dict) -> tuple[dict, dict]:
    """Layers that get a layout, and why the others do not."""
    keep, skipped = {}, {}
    for layer, ds in results.items():
        n = ds.sizes["unit"]
        if n <= MIN_UNITS:
            skipped[layer] = f"{n} units (layouts need more than {MIN_UNITS})"
        else:
            keep[layer] = ds
    for layer, why in skipped.items():
        log.warning("no topomap for layer %r: %s.", layer, why)
    return keep, skipped


def layout_units(nap, method: str = "umap", metric: str = "euclidean", seed: int = 0,
                 distribute_in_circle: bool = True) -> tuple[np.ndarray, float, float]:
    """One layer's layout from its NAP ``(group, *spatial, unit)``: ``(xy, layout s, circle s)``."""
    t0 = time.perf_counter()
    xy = Layout(method, metric, seed).fit(profile_matrix(nap)).xy_
    t1 = time.perf_counter()
    if distribute_in_circle:
        xy = circle.distribute_in_circle(xy, seed=seed)
    return xy, t1 - t0, time.perf_counter() - t1


def topomap_layout(
    store,
    method: Literal["umap", "tsne", "pca", "som", "graph", "random"] = "umap",
    metric: Literal["euclidean", "cosine"] = "euclidean",
    seed: int = 0,
    distribute_in_circle: bool = True,
    source: Literal["contrast", "naps"] = "contrast",
    *,
    layers: Sequence[str] | None = None,
    persist: bool = True,
    progress: bool = False,
) -> dict:
    """Lay out each layer's units in 2-D by the similarity of their profiles (``REFERENCE.md`` §6).

    Parameters
    ----------
    store : str or os.PathLike
        Path of a store with current contrastive NAPs (or NAPs, see ``source``).
    method : {"umap", "tsne", "pca", "som", "graph", "random"}
        Layout method (see :mod:`inntrospect.topomap.layout`).
    metric : {"euclidean", "cosine"}
        Distance between unit profiles.
    seed : int
        Same inputs and seed, same coordinates.
    distribute_in_circle : bool, default True
        Spread the coordinates over a disc (§6 step 5; compiled, approximate above
        :data:`~inntrospect.topomap.circle.AUTO_THRESHOLD` units).
    source : {"contrast", "naps"}
        Profiles from the contrastive NAPs (default) or the plain NAPs.
    layers : list of str, optional
        Only these layers (default: all with more than 15 units; the others are
        skipped with a message).
    persist : bool, default True
        Write ``layout/<layer>`` into the store, replacing earlier layouts (the
        topomap images made from them become stale).

    Returns
    -------
    dict of xarray.Dataset
        ``{layer: Dataset}`` with ``xy`` (``unit``, ``coord``) in [0, 1]; the
        attributes hold the parameters and the runtime in seconds.

    Raises
    ------
    StepNotFoundError, StaleResultError
        The profiles are missing or stale; the message names the command to run.
    LayerNotFoundError
        A name in ``layers`` has no profiles.

    Examples
    --------
    >>> xy = inntrospect.topomap_layout("run.zarr", method="pca", seed=0)["dense"].xy  # doctest: +SKIP
    """
    import xarray as xr

    from ..scheduler import progress_bar

    check_bool(distribute_in_circle=distribute_in_circle, persist=persist, progress=progress)
    store = steps.writable(store, "topomap_layout")
    check_choice("method", method, METHODS)
    check_choice("metric", metric, ("euclidean", "cosine"))
    params = {"method": method, "metric": metric, "seed": int(seed),
              "distribute_in_circle": bool(distribute_in_circle), "source": source}

    def compute(results, source_id):
        out = {}
        for layer, ds in progress_bar(results.items(), progress, "layout", len(results)):
            xy, t_layout, t_circle = layout_units(ds["nap"].values, method, metric, seed,
                                                  distribute_in_circle)
            out[layer] = xr.Dataset(
                {"xy": (("unit", "coord"), xy)},
                coords={"unit": np.arange(len(xy)), "coord": ["x", "y"]},
                attrs={"step": "layout", "layer": layer, "params": params,
                       "inputs": {source: source_id},
                       "seconds": {"layout": t_layout, "circle": t_circle}},
            )
        return out

    if not persist:
        results, rec = _profiles(store, source, layers)
        keep, _ = _split(results)
        return compute(keep, rec["id"])
    with store.writing():
        results, rec = _profiles(store, source, layers)
        keep, skipped = _split(results)
        return steps.persist(store, "layout", params, {source: rec["id"]}, compute(keep, rec["id"]),
                             skipped=skipped)


def topomap_images(store, resolution: int = 100, *, fade: float | None = None, persist: bool = True,
                   progress: bool = False) -> dict:
    """Topomap values and images of every laid-out layer (``REFERENCE.md`` §7, §9).

    The value of a unit for a group is its (contrastive) NAP averaged over
    spatial positions; the image interpolates the values linearly between the
    units' coordinates on a ``resolution`` × ``resolution`` grid spanning them.
    Pixels outside the layout's convex hull are NaN (blank in plots; the
    reference paints them as 0).

    With ``fade``, units whose contrast is not significant for a group (their
    smallest q over positions is ``fade`` or more, or NaN) get the value 0 for
    that group before interpolation, neutral in the diverging colour map
    (:func:`~inntrospect.topomap.images.fade_insignificant`). Off by default,
    so the images stay comparable with the reference toolbox's.

    Parameters
    ----------
    store : str or os.PathLike
        Path of a store with a current layout (:func:`topomap_layout`).
    resolution : int, default 100
        Pixels per side.
    fade : float, optional
        A q-value threshold in (0, 1) (e.g. 0.05; config ``[topomap] fade_q``).
        Needs a layout made from contrasts computed with statistics. Recorded
        in the step's parameters as ``fade_q`` (only when set), so changing
        it makes the images stale.
    persist : bool, default True
        Write ``topomap/<layer>``, replacing earlier images.

    Returns
    -------
    dict of xarray.Dataset
        ``xy`` (``unit``, ``coord``), ``value`` (``group``, ``unit``) and
        ``image`` (``group``, ``row``, ``col``) per layer. Attributes: the
        layout's parameters, ``extent`` (for ``imshow``), ``vmax`` (the
        layer's symmetric colour scale ``[-vmax, vmax]``, over all groups),
        ``quality`` (topographic quality, lower is smoother) and ``seconds``;
        with ``fade``, ``faded`` (units set to 0, per group). ``value`` holds
        the values the images were made from (faded ones 0).

    Raises
    ------
    StepNotFoundError, StaleResultError
        No current layout (or its profiles changed since); the message names
        the command to run.
    ParameterError
        ``fade`` is not in (0, 1), or the layout was made from NAPs or from
        contrasts without statistics; the message names the fix.
    """
    import xarray as xr

    from ..scheduler import progress_bar

    check_bool(persist=persist, progress=progress)
    store = steps.writable(store, "topomap_images")
    if int(resolution) != resolution or resolution < 2:
        raise ParameterError(f"resolution must be an integer >= 2 (pixels per side); got {resolution!r}. "
                             "Pass e.g. 100 (the default).")
    resolution = int(resolution)
    fade = _check_fade(fade)
    extra = {} if fade is None else {"fade_q": fade}  # absent when off: older records stay current

    def compute():
        layout_rec = steps.check_current(store, "layout")
        source = layout_rec["params"]["source"]
        layouts = steps.load(store, "layout")
        profiles = steps.load(store, source)
        if fade is not None:
            _check_fadeable(source, profiles)
        out = {}
        for layer, lay in progress_bar(layouts.items(), progress, "topomap images", len(layouts)):
            xy = lay["xy"].values
            values = unit_values(profiles[layer]["nap"].values)
            faded = {}
            if fade is not None:
                values, mask = fade_insignificant(values, profiles[layer]["q"].values, fade)
                faded = {"faded": [int(n) for n in mask.sum(axis=1)]}
            images = interpolate(xy, values, resolution, triangulation=triangulate(xy))
            q = topographic_quality(images)
            params = {**layout_rec["params"], "resolution": resolution, **extra}
            out[layer] = xr.Dataset(
                {"xy": (("unit", "coord"), xy), "value": (("group", "unit"), values),
                 "image": (("group", "row", "col"), images)},
                coords={"group": profiles[layer].indexes["group"].astype(str),
                        "unit": np.arange(len(xy)), "coord": ["x", "y"]},
                attrs={"step": "topomap", "layer": layer, "params": params,
                       "inputs": {"layout": layout_rec["id"]},
                       "extent": list(image_extent(xy)), "vmax": float(np.abs(values).max()),
                       "quality": {"resize": q.resize_mean, "blur": q.blur_mean},
                       "seconds": lay.attrs.get("seconds", {}), **faded},
            )
        return out, layout_rec

    if not persist:
        return compute()[0]
    with store.writing():
        results, layout_rec = compute()
        return steps.persist(store, "topomap", {**layout_rec["params"], "resolution": resolution,
                                                **extra},
                             {"layout": layout_rec["id"]}, results)


def _check_fade(fade) -> float | None:
    """``fade`` as a float in (0, 1), or None; else an error naming the fix."""
    import numbers

    if fade is None:
        return None
    if isinstance(fade, bool) or not isinstance(fade, numbers.Real) or not 0 < float(fade) < 1:
        raise ParameterError(f"fade must be a q-value threshold in (0, 1), e.g. 0.05 (or None: no "
                             f"fading); got {fade!r}.")
    return float(fade)


def _check_fadeable(source: str, profiles: dict) -> None:
    """Fading needs contrasts with q-values: an error naming the fix otherwise."""
    if source != "contrast":
        raise ParameterError(
            "fade needs topomaps made from contrasts (their q-values say which units to fade), and "
            "this layout was made from NAPs: lay out from contrasts ([topomap] from = \"contrast\", "
            "or topomap_layout(store, source=\"contrast\")), or leave fade out ([topomap] fade_q).")
    lacking = [layer for layer, ds in profiles.items() if "q" not in ds.variables]
    if lacking:
        raise ParameterError(
            f"fade needs the contrasts' statistics (q-values), and the contrasts of "
            f"{', '.join(map(repr, lacking[:3]))}{' …' if len(lacking) > 3 else ''} have none: compute "
            f"them with inntrospect contrast CONFIG ([contrast] significance = true, with [naps] "
            f"std) then inntrospect layout CONFIG (in Python: inntrospect.naps(store, std=True, "
            f"persist=True), contrastive_naps(store, significance=True, persist=True), "
            f"topomap_layout(store)), or leave fade out.")


def compare_layouts(
    store,
    methods: Sequence[str] = METHODS,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    seed: int = 0,
    distribute_in_circle: bool = True,
    source: Literal["contrast", "naps"] = "contrast",
    resolution: int = 100,
    *,
    layers: Sequence[str] | None = None,
    progress: bool = False,
):
    """Topographic quality and runtime of several layout methods, per layer (nothing is written).

    Each method lays out the same profiles (as :func:`topomap_layout`), its
    images are made as by :func:`topomap_images`, and their topographic
    quality is measured (``REFERENCE.md`` §9, on float values normalised by
    the layer's largest absolute value; lower is smoother).

    Returns
    -------
    pandas.DataFrame
        One row per layer and method: ``layer``, ``units``, ``method``,
        ``metric``, ``layout_s``, ``circle_s``, ``total_s``, ``quality_blur``,
        ``quality_resize``.
    """
    import pandas as pd

    from ..scheduler import progress_bar

    store = steps.writable(store, "compare_layouts")
    for m in methods:
        check_choice("method", m, METHODS)
    if not methods:
        raise ParameterError(f"no layout methods given; choose from {', '.join(METHODS)}.")
    results, _ = _profiles(store, source, layers)
    keep, _ = _split(results)
    rows = []
    jobs = [(layer, m) for layer in keep for m in methods]
    nap = values = None
    for i, (layer, m) in enumerate(progress_bar(jobs, progress, "compare layouts", len(jobs))):
        if i == 0 or jobs[i - 1][0] != layer:  # read each layer's profiles once, for all methods
            nap = keep[layer]["nap"].values
            values = unit_values(nap)
        xy, t_layout, t_circle = layout_units(nap, m, metric, seed, distribute_in_circle)
        q = topographic_quality(interpolate(xy, values, resolution))
        rows.append({"layer": layer, "units": len(xy), "method": m, "metric": metric,
                     "layout_s": t_layout, "circle_s": t_circle, "total_s": t_layout + t_circle,
                     "quality_blur": q.blur_mean, "quality_resize": q.resize_mean})
    return pd.DataFrame(rows)
