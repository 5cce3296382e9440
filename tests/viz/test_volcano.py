"""Volcano plots of the contrasts' statistics (inntrospect.viz.plots): the values drawn, checked."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from inntrospect.viz import plots

GROUPS = ["cat", "dog", "eel"]


def contrast_ds(layer: str = "conv", spatial=(2, 3), n_units: int = 7, seed: int = 0) -> xr.Dataset:
    """A ``contrast/<layer>`` Dataset with statistics: ties in q, a q of 0 and NaN among them."""
    rng = np.random.default_rng(seed)
    shape = (len(GROUPS), *spatial, n_units)
    q = np.round(rng.uniform(0, 0.2, shape), 2)  # rounded: ties at the minimum happen
    effect = rng.normal(scale=2.0, size=shape)
    q[(0, *(0,) * len(spatial), 1)] = 0.0  # a p-value beyond float range
    q[1, ..., 2] = np.nan  # untestable at every position
    effect[1, ..., 2] = np.nan
    dims = ("group", *("y", "x")[2 - len(spatial):], "unit")
    t = rng.normal(scale=3.0, size=shape)
    return xr.Dataset({"nap": (dims, effect * 0.1), "q": (dims, q), "effect": (dims, effect),
                       "t": (dims, t), "p": (dims, q / 2)},
                      coords={"group": GROUPS}, attrs={"layer": layer})


def by_pandas(ds: xr.Dataset) -> pd.DataFrame:
    """Per group and unit, the row of its most significant position: smallest q (NaN last), then
    largest |effect|, then the first position in C order."""
    frame = ds[["q", "effect"]].to_dataframe().reset_index()
    spatial = [d for d in ds["q"].dims[1:-1]]
    frame["position"] = (np.ravel_multi_index([frame[d] for d in spatial],
                                              [ds.sizes[d] for d in spatial])
                         if spatial else 0)
    frame["qkey"] = frame["q"].fillna(np.inf)
    frame["size"] = frame["effect"].abs().fillna(-1.0)
    frame = frame.sort_values(["group", "unit", "qkey", "size", "position"],
                              ascending=[True, True, True, False, True])
    return frame.groupby(["group", "unit"], sort=True).head(1).set_index(["group", "unit"])


@pytest.mark.parametrize("spatial", [(2, 3), (4,), ()])
def test_most_significant_matches_pandas(spatial):
    ds = contrast_ds(spatial=spatial)
    q, eff, pos = plots.most_significant(ds["q"].values, ds["effect"].values)
    want = by_pandas(ds)
    assert q.shape == eff.shape == (len(GROUPS), 7) and pos.shape == (len(GROUPS), 7, len(spatial))
    for g, name in enumerate(GROUPS):
        for u in range(7):
            row = want.loc[(name, u)]
            np.testing.assert_equal(q[g, u], row["q"])
            np.testing.assert_equal(eff[g, u], row["effect"])
            if spatial:
                assert np.ravel_multi_index(tuple(pos[g, u]), spatial) == row["position"]
    assert np.isnan(q[1, 2]) and np.isnan(eff[1, 2])


def test_volcano_offsets_are_effect_and_minus_log10_q():
    ds = contrast_ds()
    d = plots.VolcanoDisplay.from_dataset(ds).plot()
    want = by_pandas(ds)
    top = d.y_cap
    for name in GROUPS:
        rows = want.loc[name]
        shown = rows[rows["q"].notna() & np.isfinite(rows["effect"])]
        normal, capped = shown[shown["q"] > 0], shown[shown["q"] == 0]
        np.testing.assert_allclose(d.collections_[name].get_offsets(),
                                   np.c_[normal["effect"], -np.log10(normal["q"])], rtol=1e-12)
        if len(capped):
            np.testing.assert_allclose(d.capped_[name].get_offsets(),
                                       np.c_[capped["effect"], np.full(len(capped), top)])
            assert d.capped_[name].get_paths()[0] is not d.collections_[name].get_paths()[0]
        else:
            assert name not in d.capped_
    assert "cat" in d.capped_  # q = 0 of the fixture: drawn at the top, above every other point
    finite = np.concatenate([c.get_offsets()[:, 1] for c in d.collections_.values()])
    assert top > finite.max() and top > -math.log10(0.05)
    assert d.n_hidden == 1  # dog's unit 2: NaN everywhere
    # threshold, labels, legend, title, one colour per group
    assert d.threshold_line_.get_ydata()[0] == pytest.approx(-math.log10(0.05))
    assert d.threshold_line_.get_linestyle() == "--"
    labels = [t.get_text() for t in d.legend_.get_texts()]
    assert labels == GROUPS + ["q = 0.05", "q = 0 (beyond float range), at the top"]
    assert "conv" in d.ax_.get_title() and "most significant position" in d.ax_.get_title()
    assert "Hedges" in d.ax_.get_xlabel() and "log10 q" in d.ax_.get_ylabel()
    colours = {tuple(c.get_facecolor()[0][:3]) for c in d.collections_.values()}
    assert len(colours) == len(GROUPS)
    np.testing.assert_allclose(d.collections_["dog"].get_facecolor()[0][:3],
                               plots.group_colors(3)[1][:3])


def test_volcano_dense_layer_threshold_and_no_cap():
    ds = contrast_ds("dense", spatial=())
    ds["q"] = ds["q"].where(ds["q"] > 0, 1e-3)
    d = plots.VolcanoDisplay.from_dataset(ds, threshold=0.01).plot(legend="outside")
    assert d.capped_ == {} and not d.capped.any()
    assert "most significant" not in d.ax_.get_title()
    assert d.threshold_line_.get_ydata()[0] == pytest.approx(2.0)
    assert [t.get_text() for t in d.legend_.get_texts()] == GROUPS + ["q = 0.01"]
    assert d.legend_.get_window_extent().x0 > d.ax_.get_window_extent().x1 - 1


def test_volcano_needs_statistics_and_valid_inputs(tmp_path):
    bare = contrast_ds().drop_vars(["q", "effect", "t", "p"])
    with pytest.raises(ValueError, match=r"statistics.*inntrospect contrast CONFIG"):
        plots.VolcanoDisplay.from_dataset(bare)
    with pytest.raises(ValueError, match=r"statistics.*significance = true"):
        plots.plot_volcano({"conv": bare}, tmp_path)
    with pytest.raises(ValueError, match="shaped"):
        plots.VolcanoDisplay(np.zeros((2, 3)), np.zeros((2, 4)), ["a", "b"], "l")
    with pytest.raises(ValueError, match=r"threshold must be a q-value in \(0, 1\)"):
        plots.VolcanoDisplay(np.zeros((1, 3)), np.ones((1, 3)), ["a"], "l", threshold=1.5)
    assert not plots.has_statistics({"conv": bare}) and plots.has_statistics({"c": contrast_ds()})
    assert not plots.has_statistics({})


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_plot_volcano_writes_one_file_per_layer(tmp_path, fmt):
    results = {"conv": contrast_ds(), "dense/1": contrast_ds("dense/1", spatial=(), seed=1)}
    paths = plots.plot_volcano(results, tmp_path, format=fmt, dpi=30)
    assert paths[0].name == f"volcano_conv.{fmt}" and paths[1].name.startswith("volcano_dense_1-")
    assert all(p.is_file() and p.stat().st_size > 100 for p in paths)
    only = plots.plot_volcano(results, tmp_path / "one", layers=["conv"], dpi=30)
    assert [p.name for p in only] == ["volcano_conv.png"]
