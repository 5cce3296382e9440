"""Topomap and projection figures (inntrospect.viz.plots): values drawn, not just files written."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import xarray as xr

from inntrospect.topomap.images import image_extent, interpolate
from inntrospect.viz import plots

MAGIC = {"png": (b"\x89PNG",), "pdf": (b"%PDF",), "svg": (b"<?xml", b"<svg")}
WHITE = (255, 255, 255, 255)


def disk_xy(n: int, seed: int) -> np.ndarray:
    """Units in a disk: the corners of their bounding box lie outside their convex hull."""
    rng = np.random.default_rng(seed)
    ang = rng.uniform(0, 2 * np.pi, n)
    r = np.sqrt(rng.uniform(0, 1, n))
    xy = np.c_[np.cos(ang) * r, np.sin(ang) * r]
    return (xy - xy.min(0)) / (xy.max(0) - xy.min(0))


def topomap_ds(layer: str, groups, n: int = 40, res: int = 24, seed: int = 0,
               scale: float = 1.0) -> xr.Dataset:
    """A ``topomap/<layer>`` Dataset in the contract's format, values far from 0 inside."""
    rng = np.random.default_rng(seed)
    xy = disk_xy(n, seed)
    values = scale * (1.0 + xy[:, 0] + 0.2 * rng.random((len(groups), n)))
    if len(groups) > 1:
        values[-1] *= -1  # the last group negative: both ends of the scale
    return xr.Dataset(
        {"xy": (("unit", "coord"), xy), "value": (("group", "unit"), values),
         "image": (("group", "row", "col"), interpolate(xy, values, res))},
        coords={"group": list(groups), "unit": np.arange(n), "coord": ["x", "y"]},
        attrs={"step": "topomap", "id": "abc", "layer": layer,
               "params": {"resolution": res, "source": "contrast", "method": "umap",
                          "metric": "correlation", "distribute_in_circle": False, "seed": 0},
               "inputs": {}, "extent": list(image_extent(xy)),
               "vmax": float(np.abs(values).max()), "quality": {"resize": 0.1, "blur": 0.2},
               "seconds": 0.5},
    )


def projection_ds(layer: str, groups, per: int = 15, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    group = np.repeat(np.asarray(groups, dtype=object), per)
    return xr.Dataset(
        {"xy": (("sample", "coord"), rng.normal(size=(len(group), 2))), "group": ("sample", group)},
        coords={"sample": np.arange(len(group)) * 2, "coord": ["x", "y"]},
        attrs={"step": "projection", "id": "p", "layer": layer, "explained_variance": 1.0},
    )


def rgba(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())


def pixel(fig, ax, x: float, y: float) -> tuple[int, ...]:
    """The rendered RGBA at data point (x, y) of ``ax`` (buffer rows run top-down)."""
    buf = rgba(fig)
    dx, dy = ax.transData.transform((x, y))
    return tuple(int(v) for v in buf[int(buf.shape[0] - dy), int(dx)])


GROUPS = ["cat", "dog", "bird"]


# -- TopomapDisplay ------------------------------------------------------------
def test_panels_share_one_symmetric_scale_and_one_colorbar():
    ds = topomap_ds("conv2", GROUPS)
    d = plots.TopomapDisplay.from_dataset(ds).plot()
    vmax = ds.attrs["vmax"]
    assert d.vmax == vmax
    assert len(d.images_) == len(GROUPS)
    for im, g in zip(d.images_, range(len(GROUPS))):
        assert im.get_clim() == (-vmax, vmax)
        assert im.get_cmap().name.startswith("bwr")
        np.testing.assert_array_equal(np.ma.getdata(im.get_array()), ds["image"].values[g])
        assert im.get_extent() == pytest.approx(ds.attrs["extent"])
    assert d.colorbar_ is not None
    assert d.colorbar_.mappable.get_clim() == (-vmax, vmax)
    cbars = [ax for ax in d.figure_.axes if ax not in d.axes_]
    assert len(cbars) == 1  # one colour bar for the whole layer
    for ax in d.axes_:
        assert ax.get_xticks().size == 0 and ax.get_yticks().size == 0
        assert ax.get_aspect() == 1.0


def test_titles_name_layer_groups_and_method():
    d = plots.TopomapDisplay.from_dataset(topomap_ds("conv2", GROUPS)).plot()
    suptitle = d.figure_.get_suptitle()
    assert "conv2" in suptitle and "contrastive NAPs" in suptitle and "umap" in suptitle
    assert [ax.get_title() for ax in d.axes_] == GROUPS
    one = plots.TopomapDisplay.from_dataset(topomap_ds("conv2", GROUPS)).plot(
        groups=["dog"], title=True)
    assert len(one.images_) == 1
    np.testing.assert_array_equal(np.ma.getdata(one.images_[0].get_array()),
                                  topomap_ds("conv2", GROUPS)["image"].values[1])


def test_nan_outside_the_hull_is_blank_inside_is_painted():
    ds = topomap_ds("conv2", ["a"], res=40)
    image = ds["image"].values[0]
    assert np.isnan(image[0, 0]) and np.isfinite(image[20, 20])  # the fixture's premise
    d = plots.TopomapDisplay.from_dataset(ds).plot(colorbar=False, title=False)
    left, right, bottom, top = d.extent
    w, h = right - left, top - bottom
    ax = d.axes_[0]
    assert pixel(d.figure_, ax, left + 0.03 * w, top - 0.03 * h) == WHITE  # corner: outside
    inside = pixel(d.figure_, ax, left + 0.5 * w, bottom + 0.5 * h)
    assert inside != WHITE
    assert inside[0] > inside[2]  # positive values: the red half of bwr


def test_wraps_many_groups_into_rows():
    groups = [f"g{i}" for i in range(7)]
    d = plots.TopomapDisplay.from_dataset(topomap_ds("l", groups, n=20, res=8)).plot()
    rows = {round(ax.get_position().y0, 3) for ax in d.axes_}
    cols = {round(ax.get_position().x0, 3) for ax in d.axes_}
    assert len(rows) == 2 and len(cols) == plots.MAX_PER_ROW
    hidden = [ax for ax in d.figure_.axes if not ax.get_visible()]
    assert len(hidden) == 2 * plots.MAX_PER_ROW - len(groups)


def test_display_validates_inputs():
    with pytest.raises(ValueError, match="one image per group"):
        plots.TopomapDisplay(np.zeros((2, 4, 4)), [0, 1, 0, 1], ["a"], "l")
    with pytest.raises(ValueError, match=r"'image'.*inntrospect.load"):
        plots.TopomapDisplay.from_dataset(xr.Dataset({"value": ("x", [1.0])}))
    with pytest.raises(ValueError, match="not in the topomaps"):
        plots.TopomapDisplay.from_dataset(topomap_ds("l", GROUPS)).plot(groups=["fish"])
    d = plots.TopomapDisplay(np.zeros((1, 3, 3)), [0, 1, 0, 1], ["a"], "l", vmax=0.0)
    assert d.vmax == 1.0  # all zeros: still a valid scale


def test_plots_into_given_axes_and_from_threads():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure()
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    d = plots.TopomapDisplay.from_dataset(topomap_ds("l", GROUPS)).plot(axes, title=False)
    assert d.figure_ is fig and d.axes_ == list(axes[:3]) and not axes[3].get_visible()

    errors = []

    def work():
        try:
            f = plots.TopomapDisplay.from_dataset(topomap_ds("l", GROUPS, res=8)).figure()
            rgba(f)
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- files ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", plots.FORMATS)
def test_plot_topomaps_writes_each_format(tmp_path, fmt):
    results = {"conv2": topomap_ds("conv2", GROUPS, res=12)}
    paths = plots.plot_topomaps(results, tmp_path / "figs", format=fmt, dpi=40)
    assert paths == [tmp_path / "figs" / f"topomap_conv2.{fmt}"]
    data = paths[0].read_bytes()
    assert len(data) > 100 and data.startswith(MAGIC[fmt])


def test_individual_mode_one_file_per_layer_and_group(tmp_path):
    results = {"conv2": topomap_ds("conv2", GROUPS, res=12),
               "dense": topomap_ds("dense", GROUPS[:1], res=12, seed=1)}
    paths = plots.plot_topomaps(results, tmp_path, mode="individual", dpi=30)
    assert [p.name for p in paths] == [f"topomap_conv2_{g}.png" for g in GROUPS] + [
        "topomap_dense_cat.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    only = plots.plot_topomaps(results, tmp_path / "one", layers=["dense"], dpi=40)
    assert [p.name for p in only] == ["topomap_dense.png"]
    with pytest.raises(ValueError, match=r"layer\(s\) 'nope'.*conv2"):
        plots.plot_topomaps(results, tmp_path, layers=["nope"])


def test_safe_file_stems_are_distinct_and_safe():
    layers = ["block 1/conv", "block_1_conv", "Block_1_conv", "../up", "naïve", "", "plain"]
    groups = ["a/b", "a b", "A_b", "x"]
    keys = [(la,) for la in layers] + [(la, g) for la in layers for g in groups] + [
        ("a_b", "c"), ("a", "b_c")]
    stems = plots.safe_file_stems("topomap", keys)
    assert list(stems) == keys
    assert len({s.casefold() for s in stems.values()}) == len(keys)
    for stem in stems.values():
        assert stem.replace("_", "").replace("-", "").replace(".", "").isalnum()
        assert stem.startswith("topomap_") and ".." not in stem and "/" not in stem
    assert stems[("plain",)] == "topomap_plain" and stems[("plain", "x")] == "topomap_plain_x"
    assert stems == plots.safe_file_stems("topomap", keys)  # deterministic


def test_odd_names_give_distinct_safe_file_names(tmp_path):
    layers = ["block 1/conv", "block_1_conv"]
    results = {la: topomap_ds(la, ["a/b", "a b"], n=12, res=6) for la in layers}
    rows = plots.plot_topomaps(results, tmp_path / "rows", dpi=20)
    each = plots.plot_topomaps(results, tmp_path / "each", mode="individual", dpi=20)
    for paths, n in ((rows, len(layers)), (each, len(layers) * 2)):
        assert len(paths) == n
        assert len({p.name.casefold() for p in paths}) == n  # distinct, even ignoring case
        for p in paths:
            assert p.is_file() and p.stat().st_size > 0 and p.parent.name in ("rows", "each")
    assert (tmp_path / "rows" / "topomap_block_1_conv.png").is_file()  # safe names kept


def test_bad_format_and_mode_raise(tmp_path):
    results = {"l": topomap_ds("l", GROUPS)}
    with pytest.raises(ValueError, match=r"format must be one of 'png', 'pdf', 'svg'; got 'jpg'"):
        plots.plot_topomaps(results, tmp_path, format="jpg")
    with pytest.raises(ValueError, match="mode must be"):
        plots.plot_topomaps(results, tmp_path, mode="grid")
    with pytest.raises(ValueError, match="format must be one of"):
        plots.plot_overview(results, tmp_path / "o.gif")
    with pytest.raises(TypeError, match="store path or a mapping"):
        plots.plot_topomaps([1, 2], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_store_path_without_topomaps_names_the_command(tmp_path):
    from inntrospect.errors import StepNotFoundError
    from inntrospect.testing import store_from_arrays

    path = store_from_arrays(tmp_path / "s.zarr", {"l": np.zeros((4, 3))}, ["a", "a", "b", "b"])
    with pytest.raises(StepNotFoundError, match="inntrospect layout CONFIG"):
        plots.plot_topomaps(path, tmp_path / "out")
    with pytest.raises(StepNotFoundError, match="inntrospect project CONFIG"):
        plots.plot_projection(str(path), tmp_path / "out")


# -- overview ------------------------------------------------------------------
def test_overview_one_row_per_layer_each_with_its_scale(tmp_path):
    results = {"conv2": topomap_ds("conv2", GROUPS, res=12),
               "dense": topomap_ds("dense", GROUPS, res=12, seed=1, scale=10.0)}
    fig, displays = plots.overview_figure(results)
    for layer, d in displays.items():
        vmax = results[layer].attrs["vmax"]
        assert [im.get_clim() for im in d.images_] == [(-vmax, vmax)] * len(GROUPS)
        assert d.colorbar_ is not None and d.colorbar_.mappable.get_clim() == (-vmax, vmax)
        assert d.axes_[0].get_ylabel() == layer
    assert displays["conv2"].vmax != displays["dense"].vmax
    assert [ax.get_title() for ax in displays["conv2"].axes_] == GROUPS
    assert len(fig.axes) == 2 * len(GROUPS) + 2  # panels and one colour bar per row
    out = plots.plot_overview(results, tmp_path / "overview", dpi=40)
    assert out == tmp_path / "overview.png" and out.read_bytes().startswith(b"\x89PNG")
    svg = plots.plot_overview(results, tmp_path / "o.svg")
    assert svg.suffix == ".svg" and svg.read_bytes()[:5] in (b"<?xml", b"<svg ")


# -- projection ----------------------------------------------------------------
@pytest.mark.parametrize("n_groups", [3, 12])
def test_projection_legend_and_offsets(tmp_path, n_groups):
    groups = [f"g{i:02d}" for i in range(n_groups)]  # sorted = legend order
    ds = projection_ds("conv2", groups, per=5)
    d = plots.ProjectionDisplay.from_dataset(ds).plot()
    labels = [t.get_text() for t in d.legend_.get_texts()]
    assert labels == groups
    xy, group = ds["xy"].values, ds["group"].values.astype(str)
    for g in groups:
        np.testing.assert_array_equal(d.collections_[g].get_offsets(), xy[group == g])
    colors = {tuple(c.get_facecolor()[0][:3]) for c in d.collections_.values()}
    assert len(colors) == n_groups
    assert "conv2" in d.ax_.get_title() and f"{len(xy)} samples" in d.ax_.get_title()
    outside = d.legend_.get_window_extent().x0 > d.ax_.get_window_extent().x1 - 1
    assert outside == (n_groups > 5)
    paths = plots.plot_projection({"conv2": ds, "a/b": ds}, tmp_path, format="pdf", dpi=40)
    assert paths[0].name == "projection_conv2.pdf"
    assert paths[1].name.startswith("projection_a_b-")
    assert all(p.read_bytes().startswith(b"%PDF") for p in paths)
