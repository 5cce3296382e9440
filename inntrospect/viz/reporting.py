"""A self-contained HTML report of a store: topomaps, projections, significant units, quality,
provenance.

:func:`report` writes one folder::

    out/index.html        the page (inline CSS, no scripts, relative links only)
    out/figures/*.png     its figures (or .svg)
    out/thumbnails/*.png  the top exemplars' inputs, when the input is an image

The folder can be copied, zipped or opened straight from disk: nothing is
fetched from a server or the internet. Figures come from
:mod:`inntrospect.viz.plots`; the results are read with :func:`inntrospect.load`,
so they are checked to be current first.
"""

from __future__ import annotations

import csv
import html
import json
import os
import platform
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .. import store as st

__all__ = ["report", "REPORT_FORMATS", "input_kind", "thumbnail", "top_significant"]

#: figure formats a browser shows in ``<img>``
REPORT_FORMATS = ("png", "svg")
#: resolution of the PNG figures (dots per inch)
DPI = 150

_CSS = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #d9dde5; --band: #f5f7fa; --accent: #2456a6; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; color: var(--ink); background: #fff; }
header { background: #1f2b44; color: #fff; padding: 1.4rem 2rem 1.2rem; }
header h1 { margin: 0 0 .2rem; font-size: 1.6rem; font-weight: 600; }
header p { margin: 0; color: #c9d3e6; }
nav { padding: .6rem 2rem; border-bottom: 1px solid var(--line); background: var(--band);
      position: sticky; top: 0; z-index: 1; }
nav a { margin-right: 1.2rem; color: var(--accent); text-decoration: none; font-weight: 500; }
main { max-width: 1280px; margin: 0 auto; padding: 0 2rem 3rem; }
section { margin-top: 2rem; }
h2 { font-size: 1.3rem; border-bottom: 2px solid var(--line); padding-bottom: .3rem; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
p.note { color: var(--muted); margin: .3rem 0 .8rem; }
figure { margin: .4rem 0 1.4rem; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line);
             border-radius: 4px; background: #fff; }
figcaption { color: var(--muted); font-size: .9rem; margin-top: .3rem; }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid var(--line); padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th { background: var(--band); font-weight: 600; }
tr:nth-child(even) td { background: #fafbfc; }
td code { font-size: .8rem; }
table.steps td:nth-child(n+6) { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.significant td { vertical-align: middle; }
.exemplars { display: flex; flex-wrap: wrap; gap: 3px; }
img.thumb { image-rendering: pixelated; border: 1px solid var(--line); background: #000; }
table.kv th { width: 12rem; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
            font-size: .85rem; }
pre { background: var(--band); border: 1px solid var(--line); padding: .8rem; overflow-x: auto;
      white-space: pre-wrap; word-break: break-word; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: .6rem .9rem; min-width: 9rem;
        background: var(--band); }
.card b { display: block; font-size: 1.25rem; }
.card span { color: var(--muted); font-size: .85rem; }
footer { color: var(--muted); font-size: .85rem; border-top: 1px solid var(--line);
         margin-top: 3rem; padding-top: .8rem; }
"""


# -- small html helpers ----------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _text(value) -> str:
    """A value as short text: JSON for containers, empty for None."""
    if value is None:
        return ""
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _num(value, digits: int = 4) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _text(value)
    if x != x:  # NaN
        return "–"
    if x == int(x) and abs(x) < 1e12 and not isinstance(value, float):
        return str(int(x))
    return f"{x:.{digits}g}"


def _is_num(value) -> bool:
    if isinstance(value, bool) or value is None or value == "":
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class _Html(str):
    """Markup already escaped: a table cell takes it as is."""


def _lines(record) -> _Html:
    """A small dict as ``key = value`` lines (escaped), for a table cell."""
    if not isinstance(record, dict):
        return _Html(_e(_text(record)))
    return _Html("<br>".join(f"<code>{_e(k)}</code> = {_e(_text(v))}"
                             for k, v in record.items()))


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for v in row:
            if isinstance(v, _Html):
                cells.append(f"<td>{v}</td>")
            elif _is_num(v):
                cells.append(f'<td class="num">{_e(_num(v))}</td>')
            else:
                cells.append(f"<td>{_e(_text(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv(record: dict) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_text(v))}</td></tr>" for k, v in record.items())
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _css_width(path: Path, dpi: float) -> int | None:
    """Display width of a PNG figure in CSS pixels (96 per inch), as matplotlib sized it.

    PNGs drawn at ``dpi`` shown at their pixel size would look ``dpi / 96`` times
    too large. SVGs carry their size in points and need nothing.
    """
    if path.suffix != ".png":
        return None
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"\x89PNG":
        return None
    return round(int.from_bytes(head[16:20], "big") * 96 / dpi)


def _img(path: Path, root: Path, dpi: float, alt: str, cls: str = "",
         caption: str = "") -> str:
    src = _rel(path, root)
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    klass = f' class="{cls}"' if cls else ""
    width = _css_width(path, dpi)
    size = f' width="{width}"' if width else ""
    return (f'<figure{klass}><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(alt)}"{size} '
            f'loading="eager"></a>{cap}</figure>')


def _when(stamp) -> str:
    """An ISO time stamp readable in a narrow cell: ``2026-01-02 10:11:12+00:00``."""
    return "" if stamp is None else str(stamp).replace("T", " ")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


# -- content ---------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__

    out = {"inntrospect": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "xarray", "zarr", "dask", "scipy", "matplotlib", "umap-learn"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["platform"] = platform.platform()
    return out


def _group_counts(store: st.Store) -> dict[str, int]:
    """Samples per group from the store's sample table ({} when it cannot be read)."""
    import numpy as np

    try:  # one small array, not the whole tree
        labels = st.group_labels(store, store.layers[0])
    except Exception:  # noqa: BLE001 - a summary nicety, never a reason to fail
        return {}
    names, counts = np.unique(labels, return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts)}


def _quality_rows(topomaps: dict) -> list[list]:
    rows = []
    for layer, ds in topomaps.items():
        a = ds.attrs
        p = a.get("params") or {}
        q = a.get("quality") or {}
        rows.append([layer, ds.sizes.get("unit", ""), p.get("method"), p.get("metric"),
                     p.get("source"), p.get("resolution"), q.get("resize"), q.get("blur"),
                     a.get("seconds")])
    return rows


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        rows = [r for r in reader if r]
    if not rows:
        return [], []
    return rows[0], rows[1:]


def _clean_figures(figures: Path) -> None:
    """Remove figures an earlier report left (only files this module names)."""
    if not figures.is_dir():
        return
    for f in figures.iterdir():
        if f.is_file() and f.name.startswith(("topomap_", "projection_", "overview.", "volcano_")):
            f.unlink()


def _clean_thumbnails(thumbs: Path) -> None:
    """Remove thumbnails an earlier report left (only files this module names)."""
    if thumbs.is_dir():
        for f in thumbs.iterdir():
            if f.is_file() and f.name.startswith("sample_") and f.suffix == ".png":
                f.unlink()


def report(
    store: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    compare_csv: str | os.PathLike | None = None,
    format: str = "png",
    progress: bool = False,
    dpi: float = DPI,
) -> Path:
    """Write a self-contained HTML report of ``store`` into the folder ``out``.

    The page (``out/index.html``, figures in ``out/figures/``, relative links
    only, inline CSS, nothing fetched from the network) shows: a summary of
    the model, corpus and store; per layer the topomaps of all groups; the
    multi-layer overview; the instance projections (or how to compute them);
    per layer the units with the strongest significant contrasts per group
    (unit, position, effect, t, q), with their top exemplars as thumbnails of
    the store's own inputs (or the inputs' file and index, when they are no
    images), and the volcano plot (or how to compute the statistics and the
    exemplars); the layout quality per layer; the rows of ``compare_csv``;
    and the provenance (extraction record, every step's record, package
    versions and the configuration file).

    Parameters
    ----------
    store : str or PathLike
        The store (it needs current topomaps: ``inntrospect layout CONFIG``).
    out : str or PathLike
        The report folder (created; figures of an earlier report are replaced).
    config : str or PathLike, optional
        The configuration file, shown verbatim under provenance.
    compare_csv : str or PathLike, optional
        A CSV written by ``inntrospect compare-layouts``, shown as a table.
    format : {"png", "svg"}, default "png"
        Format of the figures.
    progress : bool, default False
        Show a progress bar while the figures are drawn.
    dpi : float, default 150
        Resolution of PNG figures; they are shown at the size matplotlib gave
        them, whatever the resolution.

    Returns
    -------
    pathlib.Path
        ``out/index.html``.

    Raises
    ------
    inntrospect.StepNotFoundError, inntrospect.StaleResultError
        The store has no current topomaps; the message names the command to run.
    ValueError
        ``format`` is not one a browser shows in a page.

    Examples
    --------
    >>> report("run.zarr", "run-report", config="run.toml")  # doctest: +SKIP
    PosixPath('run-report/index.html')
    """
    from ..errors import ParameterError, StaleResultError, StepNotFoundError
    from ..store.steps import RERUN, load
    from . import plots

    fmt = str(format).lower().lstrip(".")
    if fmt not in REPORT_FORMATS:
        raise ParameterError(
            f"format must be one of {', '.join(map(repr, REPORT_FORMATS))} for a report (a "
            f"browser shows them inline); got {format!r}. For PDF figures use "
            f"inntrospect.plot_topomaps(store, out, format='pdf')."
        )
    store = st.Store.open(store)
    out = Path(out)
    attrs = store.attrs
    topomaps = load(store, "topomap")  # raises, naming the command, when missing or stale
    try:
        projections = load(store, "projection")
        projection_note = None
    except StepNotFoundError:
        projections, projection_note = {}, (
            f"This store has no instance projections yet. Compute them with "
            f"{RERUN['projection']}, then write this report again.")
    except StaleResultError as err:
        projections, projection_note = {}, f"The instance projections are out of date: {err}"
    contrast, significance_note = _statistics(store)
    exemplars, exemplars_note = _exemplars(store) if contrast else ({}, None)

    out.mkdir(parents=True, exist_ok=True)
    figures = out / "figures"
    _clean_figures(figures)
    figures.mkdir(exist_ok=True)
    _clean_thumbnails(out / THUMBS)

    from ..scheduler import bar as make_bar

    bar = make_bar(total=len(topomaps) + 1 + len(projections) + len(contrast),
                   desc="report figures", progress=progress, unit="fig")
    with bar, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        rows = {}
        paths = plots.plot_topomaps(topomaps, figures, format=fmt, dpi=dpi)
        for layer, path in zip(topomaps, paths):
            rows[layer] = path
            bar.update(1)
        overview = plots.plot_overview(topomaps, figures / f"overview.{fmt}", format=fmt,
                                       dpi=dpi) \
            if topomaps else None
        bar.update(1)
        proj = {}
        for layer in projections:
            (proj[layer],) = plots.plot_projection({layer: projections[layer]}, figures,
                                                  format=fmt, dpi=dpi)
            bar.update(1)
        volcano, significant = {}, {}
        for layer, ds in contrast.items():
            (volcano[layer],) = plots.plot_volcano({layer: ds}, figures, format=fmt, dpi=dpi,
                                                   threshold=Q_THRESHOLD)
            significant[layer] = top_significant(ds)
            bar.update(1)
    cells = (_exemplar_cells(store, exemplars, {la: rows for la, (rows, _) in significant.items()},
                             out / THUMBS) if exemplars else None)

    page = _page(_PageInputs(
        store=store, attrs=attrs, topomaps=topomaps, projections=projections,
        topomap_figures=rows, overview=overview, projection_figures=proj,
        projection_note=projection_note, out=out, config=config, compare_csv=compare_csv, dpi=dpi,
        contrast=contrast, significant=significant, exemplar_cells=cells, volcano_figures=volcano,
        significance_note=significance_note, exemplars_note=exemplars_note))
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _statistics(store: st.Store) -> tuple[dict, str | None]:
    """The current contrasts with statistics ``{layer: Dataset}``, or ``{}`` and why not."""
    from ..errors import StaleResultError, StepNotFoundError
    from ..store.steps import RERUN, load
    from .plots import has_statistics

    try:
        contrast = load(store, "contrast")
    except StepNotFoundError:
        return {}, (f"This store has no contrasts, so no per-unit statistics: compute them with "
                    f"{RERUN['contrast']}, then write this report again.")
    except StaleResultError as err:
        return {}, f"The contrasts are out of date, so their statistics are not shown: {err}"
    if not has_statistics(contrast):
        return {}, ("The contrasts were computed without statistics (t, q, effect): compute them "
                    "with inntrospect contrast CONFIG and [contrast] significance = true (the "
                    "default), or in Python inntrospect.naps(store, std=True, persist=True) then "
                    "inntrospect.contrastive_naps(store, significance=True, persist=True), then "
                    "write this report again.")
    return contrast, None


def _exemplars(store: st.Store) -> tuple[dict, str | None]:
    """The current exemplars ``{layer: Dataset}``, or ``{}`` and why not."""
    from ..errors import StaleResultError, StepNotFoundError
    from ..store.steps import load

    how = ("compute them with inntrospect exemplars CONFIG (or inntrospect.exemplars(store, "
           "persist=True)), then write this report again.")
    try:
        return load(store, "exemplars"), None
    except StepNotFoundError:
        return {}, "This store has no top exemplars to show beside the units: " + how
    except StaleResultError as err:
        return {}, f"The top exemplars are out of date, so they are not shown: {err}"


@dataclass(frozen=True)
class _PageInputs:
    """What the page shows: the store's records, the results and the figures drawn of them."""

    store: st.Store
    attrs: dict
    topomaps: dict
    projections: dict
    #: ``{layer: figure}`` of the topomaps, one row of panels per layer
    topomap_figures: dict
    overview: Path | None
    #: ``{layer: figure}`` of the instance projections
    projection_figures: dict
    #: why there are no projections to show, or None
    projection_note: str | None
    #: the report folder: figures are linked relative to it
    out: Path
    config: str | os.PathLike | None
    compare_csv: str | os.PathLike | None
    dpi: float
    #: ``{layer: Dataset}`` of the current contrasts ({} when there are none)
    contrast: dict | None = None
    #: ``{layer: (rows, {group: significant units})}`` of :func:`top_significant`
    significant: dict | None = None
    #: ``{(layer, group, unit): cell}`` of the top exemplars, or None without current exemplars
    exemplar_cells: dict | None = None
    #: ``{layer: figure}`` of the volcano plots
    volcano_figures: dict | None = None
    #: why there are no statistics to show, or None
    significance_note: str | None = None
    #: why there are no exemplars to show, or None
    exemplars_note: str | None = None


def _page(p: _PageInputs) -> str:
    """The whole page: one function per part of it, joined line by line."""
    counts = _group_counts(p.store)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    parts = [
        *_head(p, now),
        "<main>",
        *_summary(p, counts),
        *_topomaps_section(p),
        *_overview_section(p),
        *_projections_section(p),
        *_significant_section(p),
        *_quality_section(p),
        *_comparison_section(p),
        *_provenance_section(p),
        _footer(now),
        "</main></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _head(p: _PageInputs, now: str) -> list[str]:
    """Document head with the inline CSS, the page header and the navigation bar."""
    model = p.attrs.get("model") or {}
    model_name = model.get("name") or model.get("path") or model.get("framework") or "model"
    return [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>inntrospect report: {_e(p.store.location.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<header>",
        f"<h1>inntrospect report: {_e(p.store.location.name)}</h1>",
        f"<p>Model <b>{_e(model_name)}</b> · store <code>{_e(p.store)}</code> · "
        f"written {_e(now)}</p>",
        "</header>",
        '<nav><a href="#summary">Summary</a><a href="#topomaps">Topomaps</a>'
        '<a href="#overview">Overview</a><a href="#projections">Projections</a>'
        '<a href="#significant">Significant units</a><a href="#quality">Layout quality</a>'
        + ('<a href="#comparison">Layout comparison</a>' if p.compare_csv is not None else "")
        + '<a href="#provenance">Provenance</a></nav>',
    ]


def _summary(p: _PageInputs, counts: dict[str, int]) -> list[str]:
    """Key figures, the model, the corpus, samples per group and the store."""
    attrs = p.attrs
    corpus = attrs.get("corpus") or {}
    extraction = attrs.get("extraction") or {}
    groups = list(counts) or sorted({str(g) for ds in p.topomaps.values()
                                     for g in ds["group"].values})
    cards = [
        (len(attrs.get("layers") or []), "layers in the store"),
        (len(p.topomaps), "layers with topomaps"),
        (len(groups), "groups"),
        (corpus.get("n_samples", sum(counts.values()) or "?"), "samples"),
        (len(p.projections), "projections"),
    ]
    parts = [
        '<section id="summary"><h2>Summary</h2>',
        '<div class="cards">' + "".join(
            f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for v, k in cards)
        + "</div>",
        "<h3>Model</h3>", _kv(attrs.get("model") or {}),
        "<h3>Corpus</h3>", _kv({k: v for k, v in corpus.items() if k != "files"}),  # per file: for resuming
    ]
    if counts:
        parts += ["<h3>Groups</h3>",
                  _table(["group", "samples"], [[g, c] for g, c in counts.items()])]
    parts += ["<h3>Store</h3>", _kv({
        "path": str(p.store), "format": p.store.format,
        "layers": attrs.get("layers"), "extraction id": extraction.get("id"),
        "extraction state": extraction.get("state")}), "</section>"]
    return parts


def _topomaps_section(p: _PageInputs) -> list[str]:
    """Per layer, its row of topomaps (one panel per group) with a caption."""
    from .plots import TopomapDisplay

    parts = ['<section id="topomaps"><h2>Topomaps per layer</h2>',
             '<p class="note">One panel per group; every panel of a layer shares one '
             'symmetric colour scale [−vmax, vmax] (colour map bwr: blue below 0, red '
             'above). Pixels outside the convex hull of the units are left blank.</p>']
    for layer, ds in p.topomaps.items():
        d = TopomapDisplay.from_dataset(ds, layer)
        params = ds.attrs.get("params") or {}
        caption = (f"{ds.sizes.get('unit', '?')} units, {len(d.groups)} groups, "
                   f"vmax = {_num(d.vmax)}, {params.get('resolution', '?')} px per side"
                   + (f"; {d.description()}" if d.description() else ""))
        parts += [f'<h3 id="layer-{_e(layer)}">Layer {_e(layer)}</h3>',
                  _img(p.topomap_figures[layer], p.out, p.dpi, d.title(), caption=caption)]
    parts.append("</section>")
    return parts


def _overview_section(p: _PageInputs) -> list[str]:
    """The multi-layer overview figure."""
    parts = ['<section id="overview"><h2>Overview of all layers</h2>',
             '<p class="note">One row per layer, one column per group; each row has its '
             'own symmetric colour scale and colour bar.</p>']
    if p.overview is not None:
        parts.append(_img(p.overview, p.out, p.dpi, "Topomaps of all layers"))
    parts.append("</section>")
    return parts


def _projections_section(p: _PageInputs) -> list[str]:
    """The instance projections per layer, or the note saying why there are none."""
    parts = ['<section id="projections"><h2>Instance projections</h2>']
    if p.projection_note:
        parts.append(f'<p class="note">{_e(p.projection_note)}</p>')
    for layer, path in p.projection_figures.items():
        ds = p.projections[layer]
        var = ds.attrs.get("explained_variance")
        pp = ds.attrs.get("params") or {}
        caption = (f"{ds.sizes.get('sample', '?')} samples"
                   + (f", {pp.get('samples_per_group')} per group ({pp.get('sampling')})"
                      if pp.get("samples_per_group") else "")
                   + (f"; PCA to {pp.get('pca_components')} components kept "
                      f"{_num(var, 3)} of the variance" if pp.get("pca_components") else ""))
        parts += [f"<h3>Layer {_e(layer)}</h3>",
                  _img(path, p.out, p.dpi, f"Instance projection of layer {layer}", "projection",
                       caption)]
    parts.append("</section>")
    return parts


# -- significant units and their exemplars -----------------------------------------
#: q below which a unit's contrast counts as significant in the report
Q_THRESHOLD = 0.05
#: rows of the significant-units table per group
UNITS_PER_GROUP = 8
#: top exemplars shown per row
EXEMPLARS_SHOWN = 6
#: thumbnails are drawn at least this many CSS pixels on their longer side (whole multiples)
THUMB_CSS = 56
#: longer side of a thumbnail file, in pixels: larger inputs are scaled down to it
THUMB_MAX = 64
#: the folder of the thumbnails, inside the report folder
THUMBS = "thumbnails"

_STATS_NOTE = (
    "Each group's samples are tested against all other samples, per unit (and position): "
    "<b>t</b> is Welch's t; <b>q</b> the Benjamini–Hochberg adjusted p-value, per group across "
    "the layer's units and positions (q &lt; {thr:g}: significant, at most a {pct:g} % expected "
    "share of false discoveries); <b>effect</b> is Hedges' g, the difference of the means in "
    "pooled standard deviations (positive: higher in the group). Per group, up to {n} units with "
    "q &lt; {thr:g} by |effect|; units with spatial positions at their most significant one "
    "(smallest q, ties by |effect|)."
)


def top_significant(ds, threshold: float = Q_THRESHOLD, per_group: int = UNITS_PER_GROUP
                    ) -> tuple[list[dict], dict[str, int]]:
    """The units of one layer with the strongest significant contrasts, per group.

    Each unit is taken at its most significant position
    (:func:`inntrospect.viz.plots.most_significant`); per group, the units whose
    q there is below ``threshold``, by ``|effect|`` descending (ties: lower
    unit first), at most ``per_group``.

    Parameters
    ----------
    ds : xarray.Dataset
        A ``contrast/<layer>`` node with ``t``, ``q`` and ``effect``.

    Returns
    -------
    rows : list of dict
        ``group``, ``unit``, ``position`` (tuple of ints; ``()`` without spatial
        axes), ``effect``, ``t`` and ``q``, group by group in the order of ``ds``.
    significant : dict of str to int
        Per group, how many units are significant.
    """
    import numpy as np

    from .plots import most_significant

    q, effect = np.asarray(ds["q"].values), np.asarray(ds["effect"].values)
    t = np.asarray(ds["t"].values) if "t" in ds.variables else np.full(q.shape, np.nan)
    qmin, eff, pos = most_significant(q, effect)
    groups = [str(g) for g in ds["group"].values]
    rows, significant = [], {}
    for g, name in enumerate(groups):
        sig = np.flatnonzero(qmin[g] < threshold)
        significant[name] = int(sig.size)
        order = sig[np.argsort(-np.abs(eff[g, sig]), kind="stable")][:per_group]
        for u in order.tolist():
            where = tuple(int(i) for i in pos[g, u])
            rows.append({"group": name, "unit": u, "position": where, "effect": float(eff[g, u]),
                         "t": float(t[(g, *where, u)]), "q": float(qmin[g, u])})
    return rows, significant


def input_kind(store: st.Store) -> tuple[str, tuple[int, ...]]:
    """How the store's input layer is shown: ``("image", shape)`` for 2-D inputs with 1 or 3
    channels (or none), else ``("text", shape)``."""
    shape = tuple(st.array_meta(store, store.layers[0])["shape"][1:])
    if len(shape) == 3 and shape[2] in (1, 3) and min(shape[:2]) >= 2:
        return "image", shape
    if len(shape) == 2 and min(shape) >= 2:  # (y, x) stored as (t, unit): no channel axis
        return "image", shape
    return "text", shape


def thumbnail(x, path: Path) -> tuple[int, int]:
    """Write one input as a PNG, min-max scaled on its own; returns its (width, height) in pixels."""
    import numpy as np
    from PIL import Image

    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    finite = np.isfinite(x)
    lo, hi = (float(x[finite].min()), float(x[finite].max())) if finite.any() else (0.0, 0.0)
    scaled = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    pixels = np.round(np.where(finite, scaled, 0.0) * 255).astype(np.uint8)
    img = Image.fromarray(pixels)  # uint8: (y, x) is mode L, (y, x, 3) RGB
    if max(img.size) > THUMB_MAX:
        img.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
    img.save(path, format="PNG", optimize=True)
    return img.size


def _exemplar_cells(store: st.Store, exemplars: dict, layer_rows: dict, thumbs: Path
                    ) -> dict[tuple[str, str, int], _Html]:
    """Per ``(layer, group, unit)`` of the table rows, its top exemplars as HTML.

    Reads from the store only the input samples shown (by index, chunk by
    chunk), or only their ``file`` and ``index_in_file`` when the input is no image.
    """
    import numpy as np

    wanted: dict[tuple[str, str, int], list[tuple[int, float, tuple]]] = {}
    for layer, rows in layer_rows.items():
        ex = exemplars.get(layer)
        if ex is None or not rows:
            continue
        names = [str(g) for g in ex["group"].values]
        units = sorted({r["unit"] for r in rows})
        top = ex.sel(end="top").isel(unit=units)
        sample = np.asarray(top["sample"].values)  # (group, rank, unit)
        value = np.asarray(top["value"].values)
        position = np.asarray(top["position"].values) if "position" in top else None
        axes = [str(a) for a in ex["axis"].values] if "axis" in ex.coords else []
        for r in rows:
            if r["group"] not in names:
                continue
            g, u = names.index(r["group"]), units.index(r["unit"])
            found = []
            for k in range(sample.shape[1]):
                if sample[g, k, u] >= 0 and len(found) < EXEMPLARS_SHOWN:
                    where = () if position is None else tuple(zip(axes, position[g, k, u].tolist()))
                    found.append((int(sample[g, k, u]), float(value[g, k, u]), where))
            wanted[(layer, r["group"], r["unit"])] = found
    samples = sorted({s for found in wanted.values() for s, _, _ in found})
    if not samples:
        return {}
    index = np.asarray(samples, dtype=np.int64)
    first = store.layers[0]
    kind, shape = input_kind(store)
    if kind == "image":
        data = st.open_array(store, first, "acts").oindex[index]  # only the chunks holding them
        thumbs.mkdir(parents=True, exist_ok=True)
        files = {}
        for s, x in zip(samples, data):
            path = thumbs / f"sample_{s}.png"
            files[s] = (path, thumbnail(x, path))
    else:
        file = st.open_array(store, first, "file").oindex[index]
        in_file = st.open_array(store, first, "index_in_file").oindex[index]
        where_from = {s: (str(f), int(i)) for s, f, i in zip(samples, file, in_file)}

    cells = {}
    for key, found in wanted.items():
        parts = []
        for s, v, where in found:
            tip = f"sample {s}, value {_num(v)}" + (
                ", at " + ", ".join(f"{a}={i}" for a, i in where) if where else "")
            if kind == "image":
                path, (w, h) = files[s]
                scale = max(1, THUMB_CSS // max(w, h))
                src = f"{THUMBS}/{path.name}"
                parts.append(f'<img class="thumb" src="{_e(src)}" width="{w * scale}" '
                             f'height="{h * scale}" alt="sample {s}" title="{_e(tip)}">')
            else:
                f, i = where_from[s]
                parts.append(f'<code title="{_e(tip)}">{_e(f"{f}[{i}]" if f else f"sample {s}")}'
                             f"</code>")
        joined = "".join(parts) if kind == "image" else ", ".join(parts)
        cells[key] = _Html(f'<span class="exemplars">{joined}</span>')
    return cells


def _stat(x: float):
    """A statistic for a table cell: the number, or text for 0 q-values and infinities."""
    if x != x:
        return "–"
    if x in (float("inf"), float("-inf")):
        return "∞" if x > 0 else "−∞"
    return x


def _significant_section(p: _PageInputs) -> list[str]:
    """Per layer, the units with the strongest significant contrasts per group and the volcano plot."""
    parts = ['<section id="significant"><h2>Significant units</h2>']
    for note in (p.significance_note, p.exemplars_note):
        if note:
            parts.append(f'<p class="note">{_e(note)}</p>')
    if not p.significant:
        parts.append("</section>")
        return parts
    parts.append('<p class="note">' + _STATS_NOTE.format(
        thr=Q_THRESHOLD, pct=100 * Q_THRESHOLD, n=UNITS_PER_GROUP) + "</p>")
    if p.exemplar_cells is not None:
        parts.append(f'<p class="note">Top exemplars: the up to {EXEMPLARS_SHOWN} samples of the '
                     "group that activate the unit most (raw activations; for units with spatial "
                     "positions, their maximum over positions), drawn from the store's input "
                     "layer, each image scaled to its own minimum and maximum (or, for inputs that "
                     "are no images, their batch file and index). Hover for the sample, its value "
                     "and position.</p>")
    for layer, (rows, counts) in p.significant.items():
        ds = p.contrast[layer]
        spatial = ds["q"].ndim > 2
        dims = list(ds["q"].dims[1:-1])
        n_units = ds.sizes.get("unit", "?")
        parts.append(f'<h3 id="significant-{_e(layer)}">Layer {_e(layer)}</h3>')
        parts.append('<p class="note">Significant units (q &lt; '
                     f'{Q_THRESHOLD:g}) per group: ' + ", ".join(
                         f"{_e(g)} {n} of {_e(n_units)}" for g, n in counts.items()) + ".</p>")
        header = ["group", "unit"] + (["position"] if spatial else []) + ["effect", "t", "q"]
        with_exemplars = p.exemplar_cells is not None
        if with_exemplars:
            header.append("top exemplars")
        table_rows = []
        for r in rows:
            row = [_Html(_e(r["group"])), r["unit"]]  # a name, even when it reads as a number
            if spatial:
                row.append(", ".join(f"{d}={i}" for d, i in zip(dims, r["position"])))
            row += [_stat(r["effect"]), _stat(r["t"]), "0 (below float range)" if r["q"] == 0
                    else _stat(r["q"])]
            if with_exemplars:
                row.append(p.exemplar_cells.get((layer, r["group"], r["unit"]), _Html("")))
            table_rows.append(row)
        if table_rows:
            parts.append(_table(header, table_rows, "significant"))
        else:
            parts.append(f'<p class="note">No unit of layer {_e(layer)} is significant at q &lt; '
                         f"{Q_THRESHOLD:g} for any group.</p>")
        volcano = (p.volcano_figures or {}).get(layer)
        if volcano is not None:
            parts.append(_img(volcano, p.out, p.dpi, f"Volcano plot of layer {layer}", "volcano",
                              "Effect size against −log10 q, one point per unit and group"
                              + (" (each unit at its most significant position)" if spatial else "")
                              + f"; dashed: q = {Q_THRESHOLD:g}."))
    parts.append("</section>")
    return parts


def _quality_section(p: _PageInputs) -> list[str]:
    """The layout quality table, one row per layer."""
    return ['<section id="quality"><h2>Layout quality</h2>',
            '<p class="note">Topographic quality of each layer\'s topomaps (area under '
            'the error curve of resizing and of blurring the images; lower is '
            'smoother).</p>',
            _table(["layer", "units", "method", "metric", "source", "resolution",
                    "quality (resize)", "quality (blur)", "layout seconds"],
                   _quality_rows(p.topomaps), "quality"),
            "</section>"]


def _comparison_section(p: _PageInputs) -> list[str]:
    """The rows of ``compare_csv`` (or how to write it); nothing when no CSV was given."""
    if p.compare_csv is None:
        return []
    compare_csv = Path(p.compare_csv)
    parts = ['<section id="comparison"><h2>Layout comparison</h2>']
    if compare_csv.is_file():
        header, csv_rows = _read_csv(compare_csv)
        parts.append(f'<p class="note">From <code>{_e(compare_csv.name)}</code> '
                     f"(inntrospect compare-layouts), {len(csv_rows)} rows.</p>")
        parts.append(_table(header, csv_rows, "comparison"))
    else:
        parts.append(f'<p class="note">No comparison table at <code>{_e(compare_csv)}'
                     "</code>; run <code>inntrospect compare-layouts CONFIG</code> to "
                     "write one.</p>")
    parts.append("</section>")
    return parts


def _provenance_section(p: _PageInputs) -> list[str]:
    """The extraction record, every step's record, package versions and the configuration."""
    parts = ['<section id="provenance"><h2>Provenance</h2>',
             "<h3>Extraction</h3>", _kv(p.attrs.get("extraction") or {}),
             "<h3>Steps</h3>"]
    step_rows = [[rec.get("step", name), _Html(f"<code>{_e(rec.get('id'))}</code>"),
                  rec.get("state"), _lines(rec.get("params")), _lines(rec.get("inputs")),
                  _when(rec.get("started")), _when(rec.get("finished"))]
                 for name, rec in (p.attrs.get("steps") or {}).items()]
    parts.append(_table(["step", "id", "state", "params", "inputs", "started", "finished"],
                        step_rows, "steps") if step_rows else
                 '<p class="note">No step records.</p>')
    parts += ["<h3>Software</h3>", _kv(_versions())]
    if p.config is not None:
        config = Path(p.config)
        text = config.read_text(encoding="utf-8", errors="replace")
        parts += [f"<h3>Configuration <code>{_e(config.name)}</code></h3>",
                  f"<pre>{_e(text)}</pre>"]
    parts.append("</section>")
    return parts


def _footer(now: str) -> str:
    from ..version import __version__

    return f"<footer>Written by inntrospect {_e(__version__)} on {_e(now)}.</footer>"
