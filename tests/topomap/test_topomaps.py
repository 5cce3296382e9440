"""Topomap steps on stores: layouts, images, staleness and layout comparison, against numpy."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import xarray as xr
from scipy.interpolate import griddata
from sklearn.metrics import silhouette_score

import inntrospect
from inntrospect.errors import LayerNotFoundError, StaleResultError, StepNotFoundError, StoreError
from inntrospect.testing import store_from_arrays
from inntrospect.topomap.circle import distribute_in_circle
from inntrospect.topomap.layout import Layout, profile_matrix

from ..conftest import needs_shared

GROUPS = np.repeat(["a", "b", "c"], 40)


def _clustered(rng, n_units: int, spatial=(3, 3)) -> np.ndarray:
    """Activations whose units fall in two clusters: half fire for group a, half for c."""
    x = rng.random((len(GROUPS), *spatial, n_units), np.float32) * 0.1
    half = n_units // 2
    x[GROUPS == "a", ..., :half] += 2.0
    x[GROUPS == "c", ..., half:] += 2.0
    return x


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    conv = _clustered(rng, 24)
    path = store_from_arrays(tmp_path / "t.zarr", {"conv": conv, "dense": _clustered(rng, 40, ())[:, :],
                                                   "small": conv[:, 0, 0, :12]}, GROUPS, chunks=32)
    inntrospect.naps(path, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    return path, conv


def test_layout_and_images_equal_the_kernels_and_numpy(store, caplog):
    path, conv = store
    with caplog.at_level(logging.WARNING, logger="inntrospect"):
        lay = inntrospect.topomap_layout(path, method="pca", seed=3)
    assert set(lay) == {"conv", "dense"}
    assert "no topomap for layer 'small': 12 units" in caplog.text
    con = inntrospect.load(path, "contrast")
    for layer, ds in lay.items():
        nap = con[layer].nap.values
        want = distribute_in_circle(Layout("pca", seed=3).fit(profile_matrix(nap)).xy_, seed=3)
        np.testing.assert_array_equal(ds.xy.values, want)
        assert 0 <= ds.xy.values.min() and ds.xy.values.max() <= 1
    # the two clusters of units stay apart, also once spread over the disc
    labels = np.arange(24) >= 12
    xy = lay["conv"].xy.values
    nearest = np.argsort(((xy[:, None] - xy[None]) ** 2).sum(-1), axis=1)[:, 1:4]
    assert (labels[nearest] == labels[:, None]).mean() > 0.75  # chance: 0.5; the disc blurs the border
    flat = inntrospect.topomap_layout(path, method="pca", distribute_in_circle=False, persist=False)
    assert silhouette_score(flat["conv"].xy.values, labels) > 0.5
    assert inntrospect.open_store(path).attrs["steps"]["layout"]["skipped"] == {
        "small": "12 units (layouts need more than 15)"}

    imgs = inntrospect.topomap_images(path, resolution=40)
    stored = inntrospect.load(path, "topomap")
    for layer, ds in imgs.items():
        xr.testing.assert_identical(stored[layer].compute().drop_attrs(), ds.drop_attrs())
        values = con[layer].nap.values
        values = values.mean(axis=tuple(range(1, values.ndim - 1))) if values.ndim > 2 else values
        np.testing.assert_allclose(ds.value.values, values, rtol=1e-12)
        xy = ds.xy.values
        gx, gy = np.meshgrid(np.linspace(xy[:, 0].min(), xy[:, 0].max(), 40),
                             np.linspace(xy[:, 1].max(), xy[:, 1].min(), 40))
        for g in range(3):
            np.testing.assert_allclose(ds.image.values[g], griddata(xy, values[g], (gx, gy)),
                                       rtol=1e-9, atol=1e-12, equal_nan=True)
        assert ds.attrs["vmax"] == pytest.approx(np.abs(values).max())
        assert ds.attrs["params"]["method"] == "pca" and ds.attrs["params"]["resolution"] == 40
        assert set(ds.attrs["quality"]) == {"resize", "blur"}
    # plain xarray sees the same
    plain = xr.open_datatree(str(path), engine="zarr")
    assert plain["topomap/conv"].image.shape == (3, 40, 40)


def test_same_seed_same_layout_for_every_method(store):
    path, _ = store
    for method in ("graph", "som", "random"):
        a = inntrospect.topomap_layout(path, method=method, seed=1, persist=False)["conv"].xy.values
        b = inntrospect.topomap_layout(path, method=method, seed=1, persist=False)["conv"].xy.values
        np.testing.assert_array_equal(a, b)


def test_layouts_from_plain_naps_and_chosen_layers(store):
    path, _ = store
    lay = inntrospect.topomap_layout(path, method="pca", source="naps", layers=["dense"],
                                     distribute_in_circle=False)
    nap = inntrospect.load(path, "naps")["dense"].nap.values
    np.testing.assert_array_equal(lay["dense"].xy.values, Layout("pca", seed=0).fit(profile_matrix(nap)).xy_)
    imgs = inntrospect.topomap_images(path)
    np.testing.assert_allclose(imgs["dense"].value.values, nap)
    with pytest.raises(LayerNotFoundError, match="the layers are: conv, dense, small"):
        inntrospect.topomap_layout(path, layers=["nope"])
    with pytest.raises(ValueError, match="unknown method 'umapp'"):
        inntrospect.topomap_layout(path, method="umapp")
    with pytest.raises(StoreError, match="pass its path"):
        inntrospect.topomap_layout(inntrospect.open_store(path))


def test_new_profiles_or_layouts_make_old_results_stale(store):
    path, _ = store
    with pytest.raises(StepNotFoundError, match="no layout results yet. Run inntrospect layout"):
        inntrospect.topomap_images(path)
    inntrospect.topomap_layout(path, method="pca")
    inntrospect.topomap_images(path)
    inntrospect.load(path, "topomap")
    # a new layout: the images are stale, the layout is current
    inntrospect.topomap_layout(path, method="som")
    inntrospect.load(path, "layout")
    with pytest.raises(StaleResultError, match="computed from layout results .* Re-run inntrospect layout"):
        inntrospect.load(path, "topomap")
    inntrospect.topomap_images(path)
    # new contrasts: layout and images both stale, naming the commands in order
    inntrospect.contrastive_naps(path, ["a", "b"], persist=True)
    with pytest.raises(StaleResultError, match="Re-run inntrospect layout"):
        inntrospect.load(path, "layout")
    with pytest.raises(StaleResultError, match="computed from contrast results"):
        inntrospect.load(path, "topomap")
    with pytest.raises(StaleResultError):
        inntrospect.topomap_images(path)


def test_compare_layouts_matches_the_stored_quality(store):
    path, _ = store
    table = inntrospect.compare_layouts(path, ["pca", "random"], seed=2, resolution=30)
    assert list(table.columns) == ["layer", "units", "method", "metric", "layout_s", "circle_s",
                                   "total_s", "quality_blur", "quality_resize"]
    assert len(table) == 4 and set(table.layer) == {"conv", "dense"}
    inntrospect.topomap_layout(path, method="pca", seed=2)
    q = inntrospect.topomap_images(path, resolution=30)["conv"].attrs["quality"]
    row = table[(table.layer == "conv") & (table.method == "pca")].iloc[0]
    assert row.quality_blur == pytest.approx(q["blur"]) and row.quality_resize == pytest.approx(q["resize"])
    assert (table.total_s >= 0).all() and np.isfinite(table.quality_blur).all()


@needs_shared
def test_mnist_cnn_topomaps_plots_and_report(cnn_store, tmp_path):
    import shutil

    path = tmp_path / "cnn.zarr"
    shutil.copytree(cnn_store, path)
    inntrospect.naps(path, aligned=True, std=True, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    inntrospect.exemplars(path, k=4, persist=True)
    lay = inntrospect.topomap_layout(path, method="pca")
    imgs = inntrospect.topomap_images(path)
    con = inntrospect.load(path, "contrast")
    for layer, ds in imgs.items():
        units = con[layer].sizes["unit"]
        assert ds.image.shape == (10, 100, 100) and ds.xy.shape == (units, 2)
        assert np.isfinite(ds.image.values).mean() > 0.5  # the disc fills most of the square
        np.testing.assert_array_equal(ds.xy.values, lay[layer].xy.values)
    # figures and the report of the real store
    files = inntrospect.plot_all(path, tmp_path / "figures", format="png")
    names = {f.name for f in files}
    assert {"topomap_conv2d_24.png", "topomap_flatten_8.png", "overview.png"} <= names
    assert {f"volcano_{layer}.png" for layer in con} <= names
    assert all(f.stat().st_size > 10_000 for f in files)
    index = inntrospect.report(path, tmp_path / "report")
    html = index.read_text()
    for layer in ("conv2d_24", "conv2d_25", "flatten_8"):
        assert layer in html
        assert f'id="significant-{layer}"' in html and f"figures/volcano_{layer}.png" in html
    # the top exemplars drawn from the store's own 28 x 28 x 1 inputs, shown twice their size
    from PIL import Image

    thumbs = sorted((tmp_path / "report" / "thumbnails").iterdir())
    assert thumbs and all(Image.open(t).size == (28, 28) for t in thumbs)
    assert html.count('class="thumb"') >= len(thumbs) and 'width="56" height="56"' in html
    assert inntrospect.open_store(path).attrs["extraction"]["id"] in html
