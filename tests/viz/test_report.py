"""The HTML report (inntrospect.report): one self-contained folder, checked in a browser too."""

from __future__ import annotations

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
LAYERS = ["conv", "dense/1"]
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


def make_store(tmp_path, projections: bool = True) -> Path:
    labels = np.repeat(GROUPS, 4)
    rng = np.random.default_rng(0)
    path = store_from_arrays(tmp_path / "run.zarr",
                             {"conv": rng.random((12, 2, 2, 20)), "dense/1": rng.random((12, 30))},
                             labels)
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
    assert len(refs.imgs) == len(LAYERS) + 1 + len(LAYERS)  # rows, overview, projections
    for src in refs.imgs + refs.links:
        if src.startswith("#"):
            continue
        assert not re.match(r"^[a-z]+:", src) and not src.startswith("/"), src
        target = (out / src).resolve()
        assert target.is_relative_to(out.resolve()) and target.is_file()
        assert target.stat().st_size > 0
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        Path(s).name for s in refs.imgs)


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
    """A store with topomaps and no projections (read only: copy it to change it)."""
    return make_store(tmp_path_factory.mktemp("bare"), projections=False)


def test_report_without_projections_says_how_to_compute_them(bare, tmp_path):
    store = bare
    index = report(store, tmp_path / "out", format="svg")
    page = index.read_text()
    assert "no instance projections" in page and "inntrospect project CONFIG" in page
    figs = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert all(f.endswith(".svg") for f in figs) and len(figs) == len(LAYERS) + 1
    assert 'id="comparison"' not in page


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
            shot = page.screenshot(full_page=True)
            (tmp_path / "report.png").write_bytes(shot)
        finally:
            browser.close()
    assert external == []
    assert len(images) == len(LAYERS) * 2 + 1
    assert all(complete and width > 0 for _, complete, width in images), images
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
