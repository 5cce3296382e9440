"""The HTML report (inntrospect.report): one self-contained folder, checked in a browser too."""

from __future__ import annotations

import html
import io
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import inntrospect
from inntrospect.errors import StaleResultError, StepNotFoundError
from inntrospect.store import steps, store_attrs, write_node
from inntrospect.testing import store_from_arrays
from inntrospect.viz.reporting import report

from ..conftest import write_config
from .test_plots import projection_ds, topomap_ds

GROUPS = ["airplane", "cat <b>", "dog"]  # sorted, one with markup to escape
LAYERS = ["conv", "dense/1"]  # with topomaps; the store's first layer, "input", has none
K = 3  # exemplars per unit and group
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)


def _write_step(path, step: str, results: dict, params: dict) -> dict:
    """Write ``{layer: Dataset}`` as ``step``'s nodes with a complete, current record."""
    ext = store_attrs(path)["extraction"]["id"]
    rec = steps.new_record(step, params, {"extraction": ext}, list(results))
    steps.begin(path, rec)
    for layer, ds in results.items():
        ds = ds.copy()
        ds.attrs = {**ds.attrs, **steps.node_attrs(rec, layer)}
        write_node(path, f"{steps.STEPS[step]}/{layer}", ds)
    return steps.finish(path, rec)


def make_store(tmp_path, projections: bool = True, statistics: bool = True,
               exemplars: bool = True, first: str = "image") -> Path:
    """Topomaps (and projections) written as results; NAPs, contrasts (with statistics) and
    exemplars computed. The first layer is the input: 6 x 6 x 1 images, or a vector."""
    labels = np.repeat(GROUPS, 4)
    rng = np.random.default_rng(0)
    conv, dense = rng.random((12, 2, 2, 20)), rng.random((12, 30))
    conv[labels == "airplane", :, 1, :4] += 3.0  # significant for airplane (and, lower, the rest)
    dense[labels == "dog", 5:8] -= 2.0
    image = rng.random((12, 6, 6, 1)) if first == "image" else rng.random((12, 5))
    image[labels == "cat <b>", 2:4, ...] += 3.0  # a bright band (or the middle features) for cats
    path = store_from_arrays(tmp_path / "run.zarr", {"input": image, "conv": conv, "dense/1": dense},
                             labels, chunks=4)
    topo = {la: topomap_ds(la, GROUPS, n=24, res=24, seed=i) for i, la in enumerate(LAYERS)}
    params = topo["conv"].attrs["params"]
    _write_step(path, "topomap", topo, params)
    # the node attrs are the record's; add the contract's extras
    for la, ds in topo.items():
        extras = {k: ds.attrs[k] for k in ("extent", "vmax", "quality", "seconds")}
        import zarr

        zarr.open_group(str(path), mode="r+")[f"topomap/{la}"].attrs.update(extras)
    if projections:
        proj = {la: projection_ds(la, GROUPS, per=4, seed=i) for i, la in enumerate(LAYERS)}
        _write_step(path, "projection", proj, {"samples_per_group": 4, "sampling": "first",
                                               "seed": 0, "pca_components": 0})
    from inntrospect.store import consolidate

    consolidate(path)
    if statistics:
        inntrospect.naps(path, std=True, persist=True)
        inntrospect.contrastive_naps(path, persist=True)
    if exemplars:
        inntrospect.exemplars(path, k=K, persist=True)
    return path


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a["src"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    store = make_store(tmp)
    config = write_config(tmp, {"store": "run.zarr"}, text="# a <comment> & more\n", name="run.toml")
    csv = tmp / "compare.csv"
    csv.write_text("layer,method,metric,quality_resize,quality_blur,seconds\n"
                   "conv,umap,correlation,0.12345678,0.2,1.5\n"
                   "conv,tsne,euclidean,0.3,0.4,12\n")
    index = report(store, tmp / "out", config=config, compare_csv=csv, dpi=60)
    return store, index


def test_report_is_one_self_contained_folder(built):
    store, index = built
    out = index.parent
    assert index == out / "index.html"
    page = index.read_text()
    refs = _Refs()
    refs.feed(page)
    figures = [s for s in refs.imgs if s.startswith("figures/")]
    thumbs = [s for s in refs.imgs if s.startswith("thumbnails/")]
    assert len(figures) == len(LAYERS) + 1 + len(LAYERS) + 3  # rows, overview, projections, volcanos
    assert len(thumbs) > 0 and len(figures) + len(thumbs) == len(refs.imgs)
    for src in refs.imgs + refs.links:
        if src.startswith("#"):
            continue
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src
        target = (out / src).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file()
        assert target.stat().st_size > 0
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        Path(s).name for s in figures)
    assert sorted(p.name for p in (out / "thumbnails").iterdir()) == sorted(
        {Path(s).name for s in thumbs})


def test_report_content(built):
    store, index = built
    page = index.read_text()
    attrs = store_attrs(store)
    assert attrs["extraction"]["id"] in page
    for step in ("topomap", "projection"):
        assert attrs["steps"][step]["id"] in page
    assert f"inntrospect {inntrospect.__version__}" in page
    for pkg in ("numpy", "xarray", "zarr", "matplotlib", "python"):
        assert f"<th>{pkg}</th>" in page
    # escaped text, never raw markup from names or the config
    assert "cat &lt;b&gt;" in page and "cat <b>" not in page
    assert "# a &lt;comment&gt; &amp; more" in page
    # the quality table: one row per layer, with the topomap attrs
    quality = re.search(r'<table class="quality">.*?</table>', page, re.S).group(0)
    rows = re.findall(r"<tr><td>(.*?)</td>", quality)
    assert rows == ["conv", "dense/1"]
    assert ">umap<" in quality and ">correlation<" in quality and ">contrast<" in quality
    assert ">0.1<" in quality and ">0.2<" in quality and ">0.5<" in quality
    comparison = re.search(r'<table class="comparison">.*?</table>', page, re.S).group(0)
    assert comparison.count("<tr><td>") == 2 and ">tsne<" in comparison
    assert ">0.1235<" in comparison  # numbers rounded for reading
    for layer in LAYERS:
        assert f"Layer {layer}" in page


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A store with topomaps and no projections, contrasts or exemplars (read only: copy it to
    change it)."""
    return make_store(tmp_path_factory.mktemp("bare"), projections=False, statistics=False,
                      exemplars=False)


def test_report_without_projections_says_how_to_compute_them(bare, tmp_path):
    store = bare
    index = report(store, tmp_path / "out", format="svg")
    page = index.read_text()
    assert "no instance projections" in page and "inntrospect project CONFIG" in page
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert all(f.endswith(".svg") for f in figs) and len(figs) == len(LAYERS) + 1
    assert 'id="comparison"' not in page
    # no contrasts: the significant-units section says how to compute them, and shows nothing else
    section = re.search(r'<section id="significant">.*?</section>', page, re.S).group(0)
    assert "no contrasts" in section and "inntrospect contrast CONFIG" in section
    assert "<table" not in section and "<img" not in section
    assert not (tmp_path / "out" / "thumbnails").exists()


def test_report_needs_current_topomaps(bare, tmp_path):
    store = store_from_arrays(tmp_path / "s.zarr", {"l": np.zeros((4, 3))}, ["a", "a", "b", "b"])
    with pytest.raises(StepNotFoundError, match="inntrospect layout CONFIG"):
        report(store, tmp_path / "out")
    store = shutil.copytree(bare, tmp_path / "stale.zarr")
    from inntrospect.store import update_attrs

    update_attrs(store, extraction={**store_attrs(store)["extraction"], "id": "new"})
    with pytest.raises(StaleResultError, match="Re-run"):
        report(store, tmp_path / "out")
    with pytest.raises(ValueError, match="format must be one of 'png', 'svg'"):
        report(tmp_path / "s.zarr", tmp_path / "out", format="pdf")  # checked first


# -- in a real browser -----------------------------------------------------------
@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y "
                    "chromium); needed to render the report in a headless browser")
def test_report_renders_in_headless_chromium(built, tmp_path):
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download needed: "
        "the test drives the system chromium)")
    from matplotlib.image import imread

    _, index = built
    external = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})

            def route(r):
                if not r.request.url.startswith("file://"):
                    external.append(r.request.url)
                    return r.abort()
                return r.continue_()

            page.route("**/*", route)
            page.goto(index.as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, "
                "i.naturalWidth])")
            significant = page.evaluate(
                "Array.from(document.querySelectorAll('#significant table.significant')).map(t => "
                "Array.from(t.querySelectorAll('tbody tr')).map(r => [r.cells[0].textContent, "
                "r.cells[1].textContent, r.querySelectorAll('img.thumb').length, "
                "Array.from(r.querySelectorAll('img.thumb')).map(i => [i.naturalWidth, "
                "i.getBoundingClientRect().width, getComputedStyle(i).imageRendering])]))")
            volcanos = page.evaluate(
                "Array.from(document.querySelectorAll('#significant img')).filter(i => "
                "i.getAttribute('src').startsWith('figures/volcano_')).map(i => [i.naturalWidth, "
                "i.getBoundingClientRect().width])")
            shot = page.screenshot(full_page=True)
            (tmp_path / "report.png").write_bytes(shot)
        finally:
            browser.close()
    assert external == []
    thumbs = [src for src, _, _ in images if src.startswith("thumbnails/")]
    assert len(images) == len(LAYERS) * 2 + 1 + 3 + len(thumbs) and thumbs
    assert all(complete and width > 0 for _, complete, width in images), images
    # the significant units: one table per layer (input, conv, dense/1), rows with thumbnails
    # drawn 6 x 6 pixels scaled up (x9 to 54 CSS px), pixelated
    assert len(significant) == 3 and all(len(rows) > 0 for rows in significant)
    for rows in significant:
        for group, unit, n, drawn in rows:
            assert group in GROUPS and unit.isdigit() and 1 <= n <= K
            assert all(w == 6 and css == 54 and rendering == "pixelated"
                       for w, css, rendering in drawn), drawn
    assert len(volcanos) == 3 and all(w > 0 and css > 100 for w, css in volcanos)
    pixels = imread(io.BytesIO(shot))[..., :3]
    assert pixels.shape[0] > 900  # a long page, not an error page
    rgb = (pixels[::3, ::3] * 255).astype(np.uint32)
    colours = np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2])
    assert len(colours) > 200  # figures drawn, not a blank page


def test_plots_read_a_store_path(built, tmp_path):
    from inntrospect.viz import plots

    store, _ = built
    rows = plots.plot_topomaps(store, tmp_path, dpi=20)
    assert [p.name for p in rows] == ["topomap_conv.png", rows[1].name]
    assert rows[1].name.startswith("topomap_dense_1-")
    proj = plots.plot_projection(str(store), tmp_path, format="svg", dpi=20, layers=["conv"])
    assert [p.name for p in proj] == ["projection_conv.svg"]
    assert proj[0].read_bytes()[:5] in (b"<?xml", b"<svg ")


# -- significant units, their exemplars, volcano plots -------------------------------
class _Rows(HTMLParser):
    """Per table of class ``significant``: rows of (cell texts, image sources per cell)."""

    def __init__(self):
        super().__init__()
        self.tables, self._in, self._cell = [], False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("class") == "significant":
            self._in = True
            self.tables.append([])
        elif self._in and tag == "tr":
            self.tables[-1].append([])
        elif self._in and tag == "td":
            self._cell = ["", []]
            self.tables[-1][-1].append(self._cell)
        elif self._in and tag == "img" and self._cell is not None:
            self._cell[1].append(a["src"])
        elif self._in and tag == "code" and self._cell is not None:
            self._cell[1].append(None)

    def handle_endtag(self, tag):
        if tag == "table":
            self._in = False
        if tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def _tables(page: str) -> dict[str, list]:
    """``{layer: rows}`` of the significant-units section, each row ``[(text, srcs), …]``."""
    section = re.search(r'<section id="significant">.*?</section>', page, re.S).group(0)
    out = {}
    for part in re.split(r'(?=<h3 id="significant-)', section)[1:]:
        layer = html.unescape(re.match(r'<h3 id="significant-([^"]*)"', part).group(1))
        parser = _Rows()
        parser.feed(part)
        out[layer] = [row for table in parser.tables for row in table if row]
    return out


def expected_rows(ds, threshold: float = 0.05, per_group: int = 8):
    """The report's rows by pandas: per group and unit the position of smallest q (then largest
    |effect|, then first), the significant ones by |effect| descending (then unit), 8 per group."""
    import pandas as pd

    spatial = list(ds["q"].dims[1:-1])
    frame = ds[["q", "effect", "t"]].compute().to_dataframe().reset_index()
    frame["order"] = np.arange(len(frame))  # C order of (group, *spatial, unit)
    frame["qkey"] = frame["q"].fillna(np.inf)
    frame["size"] = frame["effect"].abs().fillna(-1.0)
    best = (frame.sort_values(["group", "unit", "qkey", "size", "order"],
                              ascending=[True, True, True, False, True])
            .groupby(["group", "unit"], sort=False).head(1))
    sig = best[best["q"] < threshold].assign(abs_effect=lambda f: f["effect"].abs())
    sig = (sig.sort_values(["group", "abs_effect", "unit"], ascending=[True, False, True])
           .groupby("group", sort=False).head(per_group))
    assert isinstance(sig, pd.DataFrame)
    return [(str(r.group), int(r.unit), ", ".join(f"{d}={getattr(r, d)}" for d in spatial),
             float(r.effect), float(r.t), float(r.q)) for r in sig.itertuples()]


def test_significant_units_table_equals_pandas(built):
    store, index = built
    page = index.read_text()
    contrast, ex = inntrospect.load(store, "contrast"), inntrospect.load(store, "exemplars")
    tables = _tables(page)
    assert list(tables) == ["input", "conv", "dense/1"]
    for layer, rows in tables.items():
        want = expected_rows(contrast[layer])
        assert len(want) > 0 and len(rows) == len(want), layer
        spatial = contrast[layer]["q"].ndim > 2
        top = ex[layer]["sample"].sel(end="top").values  # (group, rank, unit)
        groups = [str(g) for g in ex[layer]["group"].values]
        for row, (group, unit, position, effect, t, q) in zip(rows, want):
            texts = [html.unescape(text).strip() for text, _ in row]
            assert texts[0] == group and int(texts[1]) == unit
            cells = texts[2:]
            if spatial:
                assert cells.pop(0) == position
            assert float(cells[0]) == pytest.approx(effect, rel=1e-3)
            assert float(cells[1]) == pytest.approx(t, rel=1e-3)
            assert float(cells[2]) == pytest.approx(q, rel=1e-3) and q < 0.05
            shown = [s for s in top[groups.index(group), :, unit] if s >= 0][:6]
            assert row[-1][1] == [f"thumbnails/sample_{s}.png" for s in shown]
    for explained in ("Welch", "Benjamini–Hochberg", "Hedges"):
        assert explained in page
    # the fixture's premise: conv units 0-3 fire for airplane, so they are among its rows
    assert {r[1] for r in expected_rows(contrast["conv"]) if r[0] == "airplane"} >= {0, 1, 2, 3}


def test_thumbnails_are_the_inputs_min_max_scaled(built):
    from PIL import Image

    from inntrospect.store import open_array

    store, index = built
    acts = open_array(store, "input", "acts")[:]
    thumbs = sorted((index.parent / "thumbnails").iterdir())
    assert thumbs
    for path in thumbs:
        s = int(path.stem.removeprefix("sample_"))
        x = acts[s, ..., 0].astype(np.float64)
        want = np.round((x - x.min()) / (x.max() - x.min()) * 255).astype(np.uint8)
        img = Image.open(path)
        assert img.mode == "L" and img.size == (6, 6)
        np.testing.assert_array_equal(np.asarray(img), want)


def test_report_reads_only_the_samples_it_shows(built, tmp_path, monkeypatch):
    from inntrospect import store as st

    store, index = built
    real, calls = st.open_array, []

    class Spy:
        def __init__(self, arr, name):
            self.arr, self.name = arr, name

        @property
        def oindex(self):
            spy = self

            class _O:
                def __getitem__(self, idx):
                    calls.append((spy.name, np.asarray(idx).tolist()))
                    return spy.arr.oindex[idx]
            return _O()

        def __getitem__(self, key):
            raise AssertionError(f"{self.name} read by slice {key!r}, not by sample index")

    monkeypatch.setattr(st, "open_array", lambda path, layer, var, **kw: Spy(real(path, layer, var, **kw),
                                                                               f"{layer}/{var}"))
    out = report(store, tmp_path / "out", dpi=30)
    shown = sorted(int(p.stem.removeprefix("sample_")) for p in (out.parent / "thumbnails").iterdir())
    assert calls == [("input/acts", shown)]


def test_report_without_exemplars_or_image_inputs(tmp_path):
    from inntrospect.store import open_array

    plain = make_store(tmp_path / "plain", projections=False, exemplars=False)
    page = report(plain, tmp_path / "plain-out", dpi=30).read_text()
    section = re.search(r'<section id="significant">.*?</section>', page, re.S).group(0)
    assert "no top exemplars" in section and "inntrospect exemplars CONFIG" in section
    assert "top exemplars</th>" not in section and 'class="thumb"' not in section
    assert len(_tables(page)) == 3 and section.count("figures/volcano_") == 2 * 3  # href and src
    inntrospect.contrastive_naps(plain, significance=False, persist=True)
    page = report(plain, tmp_path / "plain-out", dpi=30).read_text()
    section = re.search(r'<section id="significant">.*?</section>', page, re.S).group(0)
    assert "without statistics" in section and "significance = true" in section
    assert "<table" not in section and "<img" not in section
    assert not list((tmp_path / "plain-out" / "figures").glob("volcano_*"))  # an earlier report's

    vector = make_store(tmp_path / "vector", projections=False, first="vector")
    files = open_array(vector, "input", "file", write=True)
    files[:] = np.array([f"batch_{i // 5}.npy" for i in range(12)])
    index = report(vector, tmp_path / "vector-out", dpi=30)
    page = index.read_text()
    assert not (index.parent / "thumbnails").exists()
    ex = inntrospect.load(vector, "exemplars")["conv"]
    rows = _tables(page)["conv"]
    for row in rows:
        group, unit = html.unescape(row[0][0]), int(row[1][0])
        shown = [int(s) for s in ex["sample"].sel(end="top", group=group).values[:, unit] if s >= 0]
        assert row[-1][0] == ", ".join(f"batch_{s // 5}.npy[{s}]" for s in shown)


def test_plot_all_writes_volcano_plots_only_with_statistics(built, bare, tmp_path):
    from inntrospect.viz import plots

    store, _ = built
    files = plots.plot_all(store, tmp_path / "with")
    assert sorted(p.name for p in files if p.name.startswith("volcano_")) == sorted(
        ["volcano_input.png", "volcano_conv.png", next(p.name for p in files
                                                         if p.name.startswith("volcano_dense_1"))])
    files = plots.plot_all(bare, tmp_path / "without")
    assert not [p for p in files if p.name.startswith("volcano_")]
    assert not list((tmp_path / "without").glob("volcano_*"))


def test_thumbnails_of_rgb_gray_constant_and_large_inputs(tmp_path):
    from PIL import Image

    from inntrospect.store import Store
    from inntrospect.viz.reporting import input_kind, thumbnail

    rng = np.random.default_rng(0)
    rgb = rng.normal(size=(5, 7, 3))
    assert thumbnail(rgb, tmp_path / "rgb.png") == (7, 5)
    img = Image.open(tmp_path / "rgb.png")
    assert img.mode == "RGB"  # one scale for the three channels together
    want = np.round((rgb - rgb.min()) / (rgb.max() - rgb.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img), want)
    gray = rng.normal(size=(5, 7))  # no channel axis
    thumbnail(gray, tmp_path / "gray.png")
    assert Image.open(tmp_path / "gray.png").mode == "L"
    thumbnail(np.full((4, 4, 1), 3.0), tmp_path / "flat.png")
    assert (np.asarray(Image.open(tmp_path / "flat.png")) == 0).all()
    assert thumbnail(rng.random((100, 200, 1)), tmp_path / "big.png") == (64, 32)  # scaled down
    kinds = {}
    for name, shape in {"rgb": (8, 8, 3), "gray": (8, 8, 1), "plain": (8, 8), "four": (8, 8, 4),
                        "vector": (8,), "volume": (4, 4, 4, 1)}.items():
        path = store_from_arrays(tmp_path / f"{name}.zarr", {"input": np.zeros((2, *shape))}, ["a", "b"])
        kinds[name] = input_kind(Store.open(path))[0]
    assert kinds == {"rgb": "image", "gray": "image", "plain": "image", "four": "text",
                     "vector": "text", "volume": "text"}
