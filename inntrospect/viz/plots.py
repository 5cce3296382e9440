"""Figures of topomaps and instance projections (``REFERENCE.md`` §7–8).

Two small display objects hold computed data and draw it, the scikit-learn
``*Display`` way (data in, ``plot()`` draws and keeps its artists):

* :class:`TopomapDisplay` — the topomap images of one layer, one panel per
  group, on one symmetric colour scale ``[-vmax, vmax]`` (colour map ``bwr``)
  shared by all panels, with one colour bar.
* :class:`ProjectionDisplay` — the 2-D embedding of sampled instances of one
  layer, coloured by group, with a legend.
* :class:`VolcanoDisplay` — the statistics of one layer's contrasts: effect
  size (Hedges' g) against −log10 q, one point per unit and group, coloured
  by group, with the significance threshold as a dashed line.

And functions that write figure files from a store (or from results already
loaded with :func:`inntrospect.load`):

* :func:`plot_topomaps` — per layer one figure of all groups (``mode="row"``),
  or one file per layer and group (``mode="individual"``).
* :func:`plot_overview` — all layers in one figure, one row per layer.
* :func:`plot_projection` — per layer one scatter of the instance projection.
* :func:`plot_volcano` — per layer one volcano plot of the contrasts' statistics.

Everything uses matplotlib's object-oriented API (:class:`matplotlib.figure.Figure`
on a :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`), never
``pyplot``: no global state, so it works headless and from threads.

Pixels outside the convex hull of the units (NaN in the images) are left
blank, not painted as a value of 0 (**differs** from the reference toolbox,
see :func:`inntrospect.topomap.images.interpolate`).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import GroupNotFoundError, ParameterError, ParameterTypeError

__all__ = [
    "TopomapDisplay",
    "ProjectionDisplay",
    "plot_topomaps",
    "plot_overview",
    "plot_projection",
    "VolcanoDisplay",
    "plot_volcano",
    "most_significant",
    "has_statistics",
    "plot_all",
    "safe_file_stems",
    "FORMATS",
]

#: file formats the plotting functions write
FORMATS = ("png", "pdf", "svg")
#: panels per row before a row figure wraps into the next row
MAX_PER_ROW = 5
#: colour map of the topomaps (symmetric around 0, white at 0)
CMAP = "bwr"

_SOURCES = {"contrast": "contrastive NAPs", "naps": "NAPs"}


# -- helpers -------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float], layout: str | None = "constrained"):
    """A Figure on its own Agg canvas: no pyplot, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout=layout, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def _topomap_cmap(name: str = CMAP):
    """The topomap colour map, with NaN (outside the units' hull) fully transparent."""
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))


def _check_format(format: str) -> str:
    fmt = str(format).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ParameterError(
            f"format must be one of {', '.join(map(repr, FORMATS))}; got {format!r}. "
            f"Pass e.g. format='png' (raster) or format='svg' / 'pdf' (vector)."
        )
    return fmt


def _sanitize(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return safe[:80]


def _short_hash(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode("utf-8")).hexdigest()[:8]


def safe_file_stems(prefix: str, keys: Sequence[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """File name stems ``<prefix>_<part>_<part>`` for ``keys``, safe and distinct.

    Each part (a layer or group name) keeps only letters, digits, ``.``, ``_``
    and ``-``; any other run of characters becomes ``_``. When that changed a
    part, or when two stems would coincide (also when they differ only in
    case, for case-insensitive file systems), the stem gets ``-`` and a short
    hash of the original names, so distinct keys always give distinct stems.

    Examples
    --------
    >>> safe_file_stems("topomap", [("conv2",), ("block 1/conv",)])
    {('conv2',): 'topomap_conv2', ('block 1/conv',): 'topomap_block_1_conv-37a6e381'}
    """
    keys = [tuple(str(p) for p in k) for k in keys]
    stems = {}
    for key in keys:
        parts = [_sanitize(p) for p in key]
        stem = "_".join([prefix, *(p or "_" for p in parts)])
        if any(p != o for p, o in zip(parts, key)):
            stem += "-" + _short_hash(*key)
        stems[key] = stem
    folded: dict[str, list[tuple[str, ...]]] = {}
    for key, stem in stems.items():
        folded.setdefault(stem.casefold(), []).append(key)
    for clash in folded.values():
        if len(clash) > 1:
            for key in clash:
                if not stems[key].endswith("-" + _short_hash(*key)):
                    stems[key] += "-" + _short_hash(*key)
    return stems


def _as_results(results, step: str) -> dict:
    """``{layer: Dataset}`` from a store path (checked current by ``load``) or a mapping."""
    if isinstance(results, str | os.PathLike):
        from ..store.steps import load

        return load(results, step)
    if isinstance(results, Mapping):
        return dict(results)
    raise ParameterTypeError(
        f"results must be a store path or a mapping {{layer: Dataset}} in the {step}/<layer> "
        f"format; got {type(results).__name__}. Pass the store's path, or "
        f"inntrospect.load(store, {step!r})."
    )


def _select_layers(results: dict, layers, step: str) -> dict:
    from ..store.steps import select_layers

    return {la: results[la] for la in select_layers(results, layers, f"the {step} results")}


def _save(fig, path: Path, format: str, dpi: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Date": None} if format in ("pdf", "svg") else None
    fig.savefig(path, format=format, dpi=dpi, facecolor="white", metadata=metadata)
    return path


def _labels(values) -> list[str]:
    """Names as plain ``str`` (store labels come as numpy ``StringDType`` or objects)."""
    return [str(v) for v in np.atleast_1d(np.asarray(values, dtype=object)).ravel().tolist()]


def _scatter_axes(ax, n_groups: int, legend: str, height: float):
    """``(ax, figure, legend outside?)`` of a scatter with one colour per group: a new figure when
    ``ax`` is None, wider when the legend goes outside (``"auto"``: more than 5 groups)."""
    outside = legend == "outside" or (legend == "auto" and n_groups > 5)
    if ax is None:
        ax = _new_figure((6.4 + (1.2 * math.ceil(n_groups / 25) if outside else 0.0), height)).add_subplot()
    return ax, ax.get_figure(root=True), outside


def _finish_scatter(display, ax, fig, outside: bool, n_groups: int, title, kw: dict, *entries):
    """The legend (``entries``: handles and labels, else the artists') and title of a display's
    scatter; the display, with ``legend_``, ``figure_`` and ``ax_`` set."""
    if outside:
        display.legend_ = ax.legend(*entries, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                                    ncols=math.ceil(n_groups / 25), borderaxespad=0.0, **kw)
    else:
        display.legend_ = ax.legend(*entries, loc="best", **kw)
    if title:
        ax.set_title(display.title() if title is True else str(title))
    display.figure_, display.ax_ = fig, ax
    return display


def _what_it_holds(ds):
    """A Dataset's variable names, or the type of whatever was given instead (for messages)."""
    return list(ds.variables) if hasattr(ds, "variables") else type(ds).__name__


def _blank(ax) -> None:
    """No ticks, no frame: a picture, not a chart (axis labels stay usable)."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


# -- topomaps ------------------------------------------------------------------
class TopomapDisplay:
    """Topomap images of one layer: one panel per group, one shared symmetric scale.

    Parameters
    ----------
    images : array_like
        ``(group, row, col)`` images, NaN outside the convex hull of the units
        (the ``image`` variable of a ``topomap/<layer>`` node).
    extent : sequence of 4 floats
        ``[left, right, bottom, top]`` of the images in layout coordinates.
    groups : sequence of str
        Group names, one per image.
    layer : str
        Layer name, for titles.
    vmax : float, optional
        The scale is ``[-vmax, vmax]``; default: the largest ``|image|``.
    source : str, optional
        ``"contrast"`` or ``"naps"``: what the values are, for titles.
    method : str, optional
        Layout method (e.g. ``"umap"``), for titles.
    cmap : str, default "bwr"

    Attributes
    ----------
    figure_ : matplotlib.figure.Figure
    axes_ : list of matplotlib.axes.Axes
        One per drawn group.
    images_ : list of matplotlib.image.AxesImage
        One per drawn group; all share one norm with ``clim == (-vmax, vmax)``.
    colorbar_ : matplotlib.colorbar.Colorbar or None

    Examples
    --------
    >>> from inntrospect.topomap.images import interpolate, image_extent
    >>> xy = np.random.default_rng(0).random((30, 2))
    >>> values = np.random.default_rng(1).normal(size=(2, 30))
    >>> d = TopomapDisplay(interpolate(xy, values, 20), image_extent(xy), ["a", "b"], "dense")
    >>> d.plot().images_[0].get_clim() == (-d.vmax, d.vmax)
    True
    """

    def __init__(self, images, extent, groups, layer: str, vmax: float | None = None, *,
                 source: str | None = None, method: str | None = None, cmap: str = CMAP):
        images = np.asarray(images, dtype=np.float64)
        if images.ndim == 2:
            images = images[None]
        groups = _labels(groups)
        if images.ndim != 3 or len(groups) != images.shape[0]:
            raise ParameterError(
                f"images must be shaped (group, row, col) with one image per group "
                f"({len(groups)} groups); got shape {images.shape}. Pass the 'image' "
                f"variable of a topomap/<layer> Dataset and its 'group' coordinate."
            )
        extent = tuple(float(e) for e in np.asarray(extent, dtype=np.float64).ravel())
        if len(extent) != 4:
            raise ParameterError(
                f"extent must be [left, right, bottom, top] (4 numbers); got {extent}. "
                f"Use the topomap's attrs['extent'] or inntrospect.topomap.images.image_extent(xy)."
            )
        if vmax is None or not np.isfinite(vmax):
            finite = images[np.isfinite(images)]
            vmax = float(np.abs(finite).max()) if finite.size else 0.0
        vmax = float(abs(vmax))
        self.images = images
        self.extent = extent
        self.groups = groups
        self.layer = str(layer)
        self.vmax = vmax if vmax > 0 else 1.0  # all zero: any scale shows white
        self.source = source
        self.method = method
        self.cmap = cmap

    @classmethod
    def from_dataset(cls, ds, layer: str | None = None, **kwargs) -> TopomapDisplay:
        """The display of a ``topomap/<layer>`` Dataset (see the data contract).

        ``layer`` defaults to ``ds.attrs["layer"]``; ``vmax``, ``extent``,
        ``source`` and ``method`` come from its attributes unless given.
        """
        if "image" not in getattr(ds, "variables", {}) or "group" not in ds.coords:
            got = _what_it_holds(ds)
            raise ParameterError(
                f"expected a topomap/<layer> Dataset with an 'image' (group, row, col) variable "
                f"and a 'group' coordinate; got {got}. Load it with inntrospect.load(store, "
                f"'topomap'), which needs inntrospect layout CONFIG to have run."
            )
        attrs = dict(ds.attrs)
        params = attrs.get("params") or {}
        extent = attrs.get("extent")
        if extent is None:
            from ..topomap.images import image_extent

            extent = image_extent(np.asarray(ds["xy"].values))
        kwargs.setdefault("vmax", attrs.get("vmax"))
        kwargs.setdefault("source", params.get("source"))
        kwargs.setdefault("method", params.get("method"))
        return cls(np.asarray(ds["image"].values), extent, np.asarray(ds["group"].values),
                   layer if layer is not None else attrs.get("layer", "?"), **kwargs)

    # -- titles
    def description(self) -> str:
        """``contrastive NAPs, umap``: what the values are and how they were laid out."""
        parts = [_SOURCES.get(self.source, self.source) if self.source else None, self.method]
        return ", ".join(p for p in parts if p)

    def title(self, group: str | None = None) -> str:
        """Figure title: the layer (and group), and :meth:`description` in brackets."""
        desc = self.description()
        if group is None:
            what = f"Topomaps of layer '{self.layer}'"
            return f"{what} ({desc})" if desc else what
        what = f"Topomap of layer '{self.layer}', group '{group}'"
        return f"{what}\n({desc})" if desc else what  # two lines: fits one panel

    def norm(self):
        """The layer's symmetric colour scale, shared by every panel."""
        from matplotlib.colors import Normalize

        return Normalize(vmin=-self.vmax, vmax=self.vmax)

    def colorbar_label(self) -> str:
        return {"contrast": "contrastive NAP", "naps": "NAP"}.get(self.source, "value")

    # -- drawing
    def plot(self, axes=None, *, groups: Sequence[str] | None = None, ncols: int | None = None,
             colorbar: bool = True, title: bool | str = True, panel_titles: bool = True,
             panel_size: float = 2.2) -> TopomapDisplay:
        """Draw the images of ``groups`` (default: all), one panel each.

        Parameters
        ----------
        axes : matplotlib Axes or sequence of Axes, optional
            Where to draw, one Axes per group (extra Axes are hidden). Default:
            a new figure with up to ``ncols`` panels per row.
        groups : sequence of str, optional
            A subset of the groups, in drawing order.
        ncols : int, optional
            Panels per row of a new figure; default ``min(n_groups, 5)``.
        colorbar : bool, default True
            One colour bar for all drawn panels.
        title : bool or str, default True
            The figure title (:meth:`title`), or a text of your own; False: none.
        panel_titles : bool, default True
            Each panel titled with its group name.
        panel_size : float, default 2.2
            Inches per panel side of a new figure.

        Returns
        -------
        self
        """
        groups = list(self.groups) if groups is None else [str(g) for g in groups]
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise GroupNotFoundError(
                f"group(s) {unknown} are not in the topomaps of layer '{self.layer}', which "
                f"hold {self.groups}. Pick groups among those."
            )
        if axes is None:
            n = max(len(groups), 1)
            ncols = min(n, ncols or MAX_PER_ROW)
            nrows = math.ceil(n / ncols)
            fig = _new_figure((panel_size * ncols + (1.1 if colorbar else 0.3),
                               panel_size * nrows + (0.7 if title else 0.3)))
            axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
        else:
            axes = np.atleast_1d(np.asarray(axes, dtype=object)).ravel().tolist()
            if len(axes) < len(groups):
                raise ParameterError(
                    f"got {len(axes)} Axes for {len(groups)} groups; pass one Axes per group "
                    f"(or axes=None for a new figure)."
                )
            fig = axes[0].get_figure(root=True)
        cmap, norm = _topomap_cmap(self.cmap), self.norm()
        index = {g: i for i, g in enumerate(self.groups)}
        images = []
        for ax, group in zip(axes, groups):
            im = ax.imshow(self.images[index[group]], origin="upper", extent=self.extent,
                           cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
            ax.set_facecolor("white")
            _blank(ax)
            if panel_titles:
                ax.set_title(group, fontsize="medium")
            images.append(im)
        for ax in axes[len(groups):]:
            ax.set_visible(False)
        used = axes[: len(groups)]
        self.colorbar_ = None
        if colorbar and images:
            self.colorbar_ = fig.colorbar(images[0], ax=used, shrink=0.85, aspect=25)
            self.colorbar_.set_label(self.colorbar_label())
        if title:
            fig.suptitle(self.title() if title is True else str(title),
                         fontsize="large" if len(used) > 1 else "medium")
        self.figure_, self.axes_, self.images_ = fig, used, images
        return self

    def figure(self, **kwargs):
        """A new figure of :meth:`plot` (keyword arguments as there)."""
        return self.plot(**kwargs).figure_


# -- projections ---------------------------------------------------------------
def group_colors(n: int) -> np.ndarray:
    """``(n, 4)`` RGBA colours of a qualitative map: tab10, tab20, else evenly from turbo."""
    import matplotlib

    if n <= 10:
        return np.asarray(matplotlib.colormaps["tab10"].colors)[:n]
    if n <= 20:
        return np.asarray(matplotlib.colormaps["tab20"].colors)[:n]
    return matplotlib.colormaps["turbo"](np.linspace(0.05, 0.95, n))


class ProjectionDisplay:
    """The 2-D embedding of sampled instances of one layer, coloured by group.

    Parameters
    ----------
    xy : array_like
        ``(sample, 2)`` embedding.
    group : array_like
        ``(sample,)`` group name per sample.
    layer : str
        Layer name, for the title.
    groups : sequence of str, optional
        Legend order; default: sorted group names.

    Attributes
    ----------
    figure_, ax_ : the Figure and Axes drawn into
    collections_ : dict of str to matplotlib.collections.PathCollection
        One scatter per group, in legend order.
    legend_ : matplotlib.legend.Legend
    """

    def __init__(self, xy, group, layer: str, groups: Sequence[str] | None = None):
        xy = np.asarray(xy, dtype=np.float64)
        group = np.array(_labels(group))
        if xy.ndim != 2 or xy.shape[1] != 2 or group.shape != (len(xy),):
            raise ParameterError(
                f"xy must be (sample, 2) with one group name per sample; got xy of shape "
                f"{xy.shape} and group of shape {group.shape}. Pass the 'xy' and 'group' "
                f"variables of a projection/<layer> Dataset."
            )
        self.xy, self.group, self.layer = xy, group, str(layer)
        self.groups = sorted(set(group.tolist())) if groups is None else [str(g) for g in groups]

    @classmethod
    def from_dataset(cls, ds, layer: str | None = None) -> ProjectionDisplay:
        """The display of a ``projection/<layer>`` Dataset (see the data contract)."""
        if "xy" not in getattr(ds, "variables", {}) or "group" not in ds.variables:
            raise ParameterError(
                f"expected a projection/<layer> Dataset with 'xy' (sample, coord) and 'group' "
                f"(sample); got {list(getattr(ds, 'variables', {}))}. Load it with "
                f"inntrospect.load(store, 'projection') after inntrospect project CONFIG."
            )
        return cls(np.asarray(ds["xy"].values), np.asarray(ds["group"].values),
                   layer if layer is not None else ds.attrs.get("layer", "?"))

    def title(self) -> str:
        return f"Instance projection of layer '{self.layer}' ({len(self.xy)} samples, UMAP)"

    def plot(self, ax=None, *, legend: Literal["auto", "inside", "outside"] = "auto",
             title: bool | str = True) -> ProjectionDisplay:
        """Scatter the samples, one colour per group, with a legend; returns self."""
        n = len(self.groups)
        ax, fig, outside = _scatter_axes(ax, n, legend, 5.4)
        size = float(np.clip(3000.0 / max(len(self.xy), 1), 3.0, 30.0))
        self.collections_ = {}
        for g, color in zip(self.groups, group_colors(n)):
            pts = self.xy[self.group == g]
            self.collections_[g] = ax.scatter(pts[:, 0], pts[:, 1], s=size, color=color,
                                              label=g, alpha=0.8, linewidths=0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        kw = dict(title="group", markerscale=max(1.0, 20.0 / size) ** 0.5, fontsize="small")
        return _finish_scatter(self, ax, fig, outside, n, title, kw)

    def figure(self, **kwargs):
        """A new figure of :meth:`plot` (keyword arguments as there)."""
        return self.plot(**kwargs).figure_


# -- volcano plots -------------------------------------------------------------
#: the q-value below which a contrast counts as significant, unless told otherwise
Q_THRESHOLD = 0.05
#: the statistics a contrast/<layer> node holds when computed with significance
STATISTICS = ("t", "p", "q", "effect")


def has_statistics(results) -> bool:
    """Whether every ``contrast/<layer>`` Dataset of ``results`` holds ``q`` and ``effect``."""
    results = dict(results)
    return bool(results) and all("q" in ds.variables and "effect" in ds.variables
                                 for ds in results.values())


def most_significant(q, effect) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each unit's most significant position per group: its q, its effect and where it is.

    A unit of a layer with spatial axes has one test per position. It is
    represented by the position of its smallest q; among positions with that
    same q (Benjamini–Hochberg q-values tie often) by the one of largest
    ``|effect|``, then by the first in C order. NaN q (untestable) counts as
    larger than any q; a unit whose every q is NaN gets NaN.

    Parameters
    ----------
    q, effect : array_like
        ``(group, *spatial, unit)``, as the ``q`` and ``effect`` variables of a
        ``contrast/<layer>`` node.

    Returns
    -------
    q : numpy.ndarray
        ``(group, unit)`` float64, the smallest q over positions (for layers
        without spatial axes, ``q`` itself).
    effect : numpy.ndarray
        ``(group, unit)`` float64, the effect at that position.
    position : numpy.ndarray
        ``(group, unit, n_spatial)`` int64, the position's spatial index
        (an empty last axis without spatial axes).

    Examples
    --------
    >>> q = np.array([[[[0.5, 0.01]], [[0.01, 0.2]]]])   # (group 1, y 2, x 1, unit 2)
    >>> e = np.array([[[[1.0, -3.0]], [[2.0, 0.5]]]])
    >>> qmin, eff, pos = most_significant(q, e)
    >>> qmin, eff, pos[0, 0]
    (array([[0.01, 0.01]]), array([[ 2., -3.]]), array([1, 0]))
    """
    q = np.asarray(q, dtype=np.float64)
    effect = np.asarray(effect, dtype=np.float64)
    if q.ndim < 2 or q.shape != effect.shape:
        raise ParameterError(
            f"q and effect must be shaped alike, (group, *spatial, unit); got {q.shape} and "
            f"{effect.shape}. Pass the 'q' and 'effect' variables of one contrast/<layer> Dataset."
        )
    n_groups, *spatial, n_units = q.shape
    flat = int(np.prod(spatial, dtype=np.int64)) if spatial else 1
    qf = np.moveaxis(q.reshape(n_groups, flat, n_units), 1, -1)  # (group, unit, position)
    ef = np.moveaxis(effect.reshape(n_groups, flat, n_units), 1, -1)
    key = np.where(np.isnan(qf), np.inf, qf)
    qmin = key.min(axis=-1, keepdims=True)
    size = np.where(np.isnan(ef), -1.0, np.abs(ef))  # |effect| >= 0 > NaN's -1 > the others' -2
    best = np.where(key == qmin, size, -2.0).argmax(axis=-1)  # the first on ties
    qbest = np.take_along_axis(qf, best[..., None], axis=-1)[..., 0]
    ebest = np.take_along_axis(ef, best[..., None], axis=-1)[..., 0]
    if spatial:
        position = np.stack(np.unravel_index(best, tuple(spatial)), axis=-1).astype(np.int64)
    else:
        position = np.zeros((n_groups, n_units, 0), dtype=np.int64)
    return qbest, ebest, position


def _statistics_of(ds, layer: str):
    """``q`` and ``effect`` of a contrast/<layer> Dataset, or an error naming the fix."""
    missing = [name for name in ("q", "effect") if name not in getattr(ds, "variables", {})]
    if missing:
        raise ParameterError(
            f"a volcano plot needs the contrasts' statistics ('q' and 'effect' of a contrast/<layer> "
            f"Dataset); layer '{layer}' has {_what_it_holds(ds)}, without {' and '.join(missing)}. Compute them with inntrospect contrast CONFIG "
            f"([contrast] significance = true, the default) or inntrospect.contrastive_naps(store, "
            f"significance=True, persist=True)."
        )
    return np.asarray(ds["q"].values), np.asarray(ds["effect"].values)


class VolcanoDisplay:
    """Effect size against −log10 q of one layer's contrasts: one point per unit and group.

    Each point is a unit's contrast of a group against all other samples:
    x is Hedges' g (positive: higher in the group), y is −log10 of its
    Benjamini–Hochberg q. For a layer with spatial axes each unit is shown
    once per group, at its most significant position (see
    :func:`most_significant`): one point per unit reads better than one per
    unit and position, and it is the position the report's table names.

    q = 0 (a p-value below the smallest float: −log10 would be infinite) is
    drawn at the top, at :attr:`y_cap`, with a triangle marker; points whose
    q or effect is NaN (untestable) or whose effect is infinite are left out
    (counted in :attr:`n_hidden`).

    Parameters
    ----------
    effect, q : array_like
        ``(group, unit)``: each unit's effect size and q per group (for
        spatial layers, at its most significant position).
    groups : sequence of str
        Group names, one per row.
    layer : str
        Layer name, for the title.
    threshold : float, default 0.05
        The q below which a contrast counts as significant, drawn as a dashed line.
    spatial : bool, default False
        Whether the units have spatial positions (said in the title).

    Attributes
    ----------
    x, y : numpy.ndarray
        ``(group, unit)``: the effect, and −log10 q with q = 0 at :attr:`y_cap`
        (NaN where not drawn).
    capped : numpy.ndarray of bool
        ``(group, unit)``: q = 0, drawn at the top.
    y_cap : float
    n_hidden : int
        Points not drawn (NaN or infinite values).
    figure_, ax_ : the Figure and Axes drawn into
    collections_ : dict of str to matplotlib.collections.PathCollection
        Per group, its points with q > 0, in legend order.
    capped_ : dict of str to PathCollection
        Per group with any, its points with q = 0 (at :attr:`y_cap`).
    threshold_line_ : matplotlib.lines.Line2D
    legend_ : matplotlib.legend.Legend

    Examples
    --------
    >>> d = VolcanoDisplay([[0.5, -2.0, 1.0]], [[0.2, 1e-4, 0.0]], ["a"], "dense").plot()
    >>> d.collections_["a"].get_offsets().tolist()
    [[0.5, 0.6989700043360187], [-2.0, 4.0]]
    >>> bool(d.capped[0, 2]), d.capped_["a"].get_offsets()[0, 0]
    (True, np.float64(1.0))
    """

    def __init__(self, effect, q, groups, layer: str, threshold: float = Q_THRESHOLD, *,
                 spatial: bool = False):
        effect = np.asarray(effect, dtype=np.float64)
        q = np.asarray(q, dtype=np.float64)
        groups = _labels(groups)
        if effect.ndim != 2 or q.shape != effect.shape or len(groups) != effect.shape[0]:
            raise ParameterError(
                f"effect and q must be shaped (group, unit) alike, with one group name per row "
                f"({len(groups)} groups); got {effect.shape} and {q.shape}. For a contrast/<layer> "
                f"Dataset use VolcanoDisplay.from_dataset(ds)."
            )
        if isinstance(threshold, bool) or not (0 < float(threshold) < 1):
            raise ParameterError(f"threshold must be a q-value in (0, 1); got {threshold!r}. "
                                 f"Pass e.g. 0.05 (the default).")
        self.effect, self.q, self.groups = effect, q, groups
        self.layer, self.threshold, self.spatial = str(layer), float(threshold), bool(spatial)
        shown = np.isfinite(effect) & ~np.isnan(q)
        with np.errstate(divide="ignore"):
            y = -np.log10(q)
        self.capped = shown & (q == 0)
        finite = y[shown & ~self.capped]
        top = max(float(finite.max()) if finite.size else 0.0, -math.log10(self.threshold))
        self.y_cap = top + max(0.5, 0.08 * top)
        self.x = np.where(shown, effect, np.nan)
        self.y = np.where(self.capped, self.y_cap, np.where(shown, y, np.nan))
        self.n_hidden = int((~shown).sum())

    @classmethod
    def from_dataset(cls, ds, layer: str | None = None, threshold: float = Q_THRESHOLD
                     ) -> VolcanoDisplay:
        """The display of a ``contrast/<layer>`` Dataset with statistics (each unit at its most
        significant position, see :func:`most_significant`)."""
        layer = layer if layer is not None else ds.attrs.get("layer", "?")
        q, effect = _statistics_of(ds, layer)
        qmin, eff, _ = most_significant(q, effect)
        return cls(eff, qmin, np.asarray(ds["group"].values), layer, threshold,
                   spatial=q.ndim > 2)

    def title(self) -> str:
        what = f"Volcano plot of layer '{self.layer}'"
        return what + ("\n(each unit at its most significant position)" if self.spatial else "")

    def plot(self, ax=None, *, legend: Literal["auto", "inside", "outside"] = "auto",
             title: bool | str = True) -> VolcanoDisplay:
        """Scatter the units, one colour per group, with the threshold line and a legend; returns self."""
        from matplotlib.lines import Line2D

        n = len(self.groups)
        ax, fig, outside = _scatter_axes(ax, n, legend, 5.0)
        drawn = int(np.isfinite(self.x).sum())
        size = float(np.clip(2000.0 / max(drawn, 1), 4.0, 30.0))
        self.collections_, self.capped_ = {}, {}
        for i, (g, color) in enumerate(zip(self.groups, group_colors(n))):
            keep = np.isfinite(self.x[i]) & ~self.capped[i]
            self.collections_[g] = ax.scatter(self.x[i, keep], self.y[i, keep], s=size, color=color,
                                              label=g, alpha=0.75, linewidths=0)
            if self.capped[i].any():
                top = self.capped[i]
                self.capped_[g] = ax.scatter(self.x[i, top], self.y[i, top], s=size * 1.6,
                                             color=color, marker="^", alpha=0.9, linewidths=0)
        self.threshold_line_ = ax.axhline(-math.log10(self.threshold), color="0.25", linestyle="--",
                                          linewidth=1.0, label=f"q = {self.threshold:g}")
        ax.axvline(0.0, color="0.8", linewidth=0.8, zorder=0)
        ax.set_xlabel("effect size (Hedges' g, group vs. all other samples)")
        ax.set_ylabel("−log10 q (Benjamini–Hochberg)")
        handles, labels = ax.get_legend_handles_labels()
        if self.capped_:
            handles.append(Line2D([], [], color="0.3", marker="^", linestyle="none"))
            labels.append("q = 0 (beyond float range), at the top")
        kw = dict(title="group", fontsize="small",
                  markerscale=max(1.0, 20.0 / size) ** 0.5)
        return _finish_scatter(self, ax, fig, outside, n, title, kw, handles, labels)

    def figure(self, **kwargs):
        """A new figure of :meth:`plot` (keyword arguments as there)."""
        return self.plot(**kwargs).figure_


def plot_volcano(results, out: str | os.PathLike, format: str = "png",
                 layers: Sequence[str] | None = None, dpi: float = 150,
                 threshold: float = Q_THRESHOLD) -> list[Path]:
    """Write per layer a volcano plot of the contrasts' statistics, ``volcano_<layer>.<format>``.

    Parameters
    ----------
    results : str, PathLike or mapping
        A store path (read with ``inntrospect.load(path, "contrast")``) or
        ``{layer: Dataset}`` in the ``contrast/<layer>`` format, with the
        statistics (``q``, ``effect``).
    out : str or PathLike
        Folder for the files (created if needed).
    format : {"png", "pdf", "svg"}, default "png"
    layers : sequence of str, optional
    dpi : float, default 150
    threshold : float, default 0.05
        The q drawn as the dashed significance line.

    Returns
    -------
    list of pathlib.Path

    Raises
    ------
    ValueError
        The contrasts have no statistics; the message names the command.
    inntrospect.StepNotFoundError, inntrospect.StaleResultError
        For a store without current contrasts.
    """
    format = _check_format(format)
    results = _select_layers(_as_results(results, "contrast"), layers, "contrast")
    displays = {layer: VolcanoDisplay.from_dataset(ds, layer, threshold)
                for layer, ds in results.items()}
    stems = safe_file_stems("volcano", [(la,) for la in displays])
    return [_save(d.figure(), Path(out) / f"{stems[(layer,)]}.{format}", format, dpi)
            for layer, d in displays.items()]


# -- files ---------------------------------------------------------------------
def plot_topomaps(
    results,
    out: str | os.PathLike,
    mode: Literal["row", "individual"] = "row",
    format: str = "png",
    layers: Sequence[str] | None = None,
    dpi: float = 150,
) -> list[Path]:
    """Write the topomap figures of every layer (or of ``layers``) into the folder ``out``.

    Parameters
    ----------
    results : str, PathLike or mapping
        A store path (read with ``inntrospect.load(path, "topomap")``, which
        checks the results are current), or ``{layer: Dataset}`` in the
        ``topomap/<layer>`` format.
    out : str or PathLike
        Folder for the files (created if needed).
    mode : {"row", "individual"}, default "row"
        ``"row"``: one figure per layer, one panel per group (at most 5 a row),
        one colour bar, file ``topomap_<layer>.<format>``. ``"individual"``:
        one file per layer and group, ``topomap_<layer>_<group>.<format>``,
        each with its colour bar, on the layer's scale.
    format : {"png", "pdf", "svg"}, default "png"
    layers : sequence of str, optional
        A subset of the layers.
    dpi : float, default 150

    Returns
    -------
    list of pathlib.Path
        The files written, in layer (then group) order. Names not safe as file
        names are cleaned (see :func:`safe_file_stems`).

    Raises
    ------
    ValueError
        Unknown ``mode`` or ``format``, or a layer without results.
    inntrospect.StepNotFoundError, inntrospect.StaleResultError
        For a store without current topomaps; the message names the command.
    """
    format = _check_format(format)
    if mode not in ("row", "individual"):
        raise ParameterError(f"mode must be 'row' or 'individual'; got {mode!r}. Pass mode='row' "
                             f"(one figure per layer) or 'individual' (one file per layer and group).")
    results = _select_layers(_as_results(results, "topomap"), layers, "topomap")
    out = Path(out)
    displays = {layer: TopomapDisplay.from_dataset(ds, layer) for layer, ds in results.items()}
    paths = []
    if mode == "row":
        stems = safe_file_stems("topomap", [(la,) for la in displays])
        for layer, d in displays.items():
            fig = d.figure()
            paths.append(_save(fig, out / f"{stems[(layer,)]}.{format}", format, dpi))
    else:
        keys = [(la, g) for la, d in displays.items() for g in d.groups]
        stems = safe_file_stems("topomap", keys)
        for layer, group in keys:
            d = displays[layer]
            fig = d.figure(groups=[group], title=d.title(group), panel_titles=False, panel_size=3.2)
            paths.append(_save(fig, out / f"{stems[(layer, group)]}.{format}", format, dpi))
    return paths


def overview_figure(results, layers: Sequence[str] | None = None, panel_size: float = 1.6):
    """The figure of :func:`plot_overview`; returns ``(figure, {layer: TopomapDisplay})``."""
    results = _select_layers(_as_results(results, "topomap"), layers, "topomap")
    if not results:
        raise ParameterError("expected topomap results of at least one layer; the mapping of layers is "
                             "empty. Pass a store path, or inntrospect.load(store, 'topomap') after "
                             "inntrospect layout CONFIG.")
    displays = {layer: TopomapDisplay.from_dataset(ds, layer) for layer, ds in results.items()}
    columns = []
    for d in displays.values():
        columns += [g for g in d.groups if g not in columns]
    nrows, ncols = len(displays), len(columns)
    fig = _new_figure((panel_size * ncols + 1.6, panel_size * nrows + 0.8))
    grid = fig.subplots(nrows, ncols, squeeze=False)
    for ax in grid.ravel():
        _blank(ax)
    for row, (layer, d) in zip(grid, displays.items()):
        axes = [row[columns.index(g)] for g in d.groups]
        d.plot(axes, colorbar=True, title=False, panel_titles=False)
        for ax in row:
            if ax not in axes:
                ax.set_visible(False)
        row[0].set_visible(True)
        row[0].set_ylabel(layer, fontsize="medium")
    for ax, g in zip(grid[0], columns):
        ax.set_visible(True)
        ax.set_title(g, fontsize="medium")
    fig.suptitle("Topomaps of all layers (each row on its own symmetric scale)")
    return fig, displays


def plot_overview(results, out_file: str | os.PathLike, format: str | None = None, *,
                  layers: Sequence[str] | None = None, dpi: float = 150) -> Path:
    """Write one figure of all layers: a row per layer, a column per group.

    Each row has its own symmetric colour scale and its colour bar at the
    row's end; layer names label the rows, group names title the columns.

    Parameters
    ----------
    results : str, PathLike or mapping
        As in :func:`plot_topomaps`.
    out_file : str or PathLike
        The file to write; without a suffix, ``.<format>`` is added.
    format : {"png", "pdf", "svg"}, optional
        Default: from the suffix of ``out_file``, else ``"png"``.

    Returns
    -------
    pathlib.Path
        The file written.
    """
    out_file = Path(out_file)
    suffix = out_file.suffix.lstrip(".")
    format = _check_format(format if format is not None else (suffix or "png"))
    if suffix.lower() != format:
        out_file = out_file.with_name(f"{out_file.name}.{format}")
    fig, _ = overview_figure(results, layers)
    return _save(fig, out_file, format, dpi)


def plot_projection(results, out: str | os.PathLike, format: str = "png",
                    layers: Sequence[str] | None = None, dpi: float = 150) -> list[Path]:
    """Write per layer a scatter of the instance projection, ``projection_<layer>.<format>``.

    Parameters
    ----------
    results : str, PathLike or mapping
        A store path (read with ``inntrospect.load(path, "projection")``) or
        ``{layer: Dataset}`` in the ``projection/<layer>`` format.
    out : str or PathLike
        Folder for the files (created if needed).
    format : {"png", "pdf", "svg"}, default "png"
    layers : sequence of str, optional

    Returns
    -------
    list of pathlib.Path
    """
    format = _check_format(format)
    results = _select_layers(_as_results(results, "projection"), layers, "projection")
    stems = safe_file_stems("projection", [(la,) for la in results])
    paths = []
    for layer, ds in results.items():
        fig = ProjectionDisplay.from_dataset(ds, layer).figure()
        paths.append(_save(fig, Path(out) / f"{stems[(layer,)]}.{format}", format, dpi))
    return paths


def plot_all(store, out, mode: Literal["row", "individual"] = "row", format: str = "png") -> list[Path]:
    """Every figure of a store into ``out``: topomaps per layer, the overview, the projections,
    the volcano plots.

    Projection plots are left out, with a logged message, when the store has
    no current projections; volcano plots, quietly, when its contrasts have no
    statistics (or there are no current contrasts). Returns the files written.
    """
    import logging

    from ..errors import StaleResultError, StepNotFoundError

    out = Path(out)
    files = plot_topomaps(store, out, mode=mode, format=format)
    files.append(plot_overview(store, out / f"overview.{format}"))
    try:
        files += plot_projection(store, out, format=format)
    except (StepNotFoundError, StaleResultError) as err:
        logging.getLogger("inntrospect").warning("no projection plots: %s", err)
    try:
        contrast = _as_results(store, "contrast")
    except (StepNotFoundError, StaleResultError) as err:
        logging.getLogger("inntrospect").debug("no volcano plots: %s", err)
    else:
        if has_statistics(contrast):
            files += plot_volcano(contrast, out, format=format)
    return files
