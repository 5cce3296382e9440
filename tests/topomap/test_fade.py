"""Topomaps that fade units whose contrast is not significant ([topomap] fade_q), against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

import inntrospect
from inntrospect import pipeline, registry
from inntrospect.config import load_config
from inntrospect.errors import ConfigError, ParameterError
from inntrospect.testing import store_from_arrays
from inntrospect.topomap.images import fade_insignificant, interpolate, unit_values

from ..conftest import write_config

GROUPS = np.repeat(["a", "b", "c"], 12)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Units 0-7 fire for group a at one position only, 8-15 for c everywhere, the rest is noise."""
    rng = np.random.default_rng(1)
    conv = rng.normal(size=(len(GROUPS), 2, 2, 24))
    conv[GROUPS == "a", 0, 1, :8] += 3.0
    conv[GROUPS == "c", :, :, 8:16] += 2.0
    dense = rng.normal(size=(len(GROUPS), 20))
    dense[GROUPS == "b", :6] -= 2.0
    path = store_from_arrays(tmp_path_factory.mktemp("fade") / "f.zarr",
                             {"conv": conv, "dense": dense}, GROUPS, chunks=16)
    inntrospect.naps(path, std=True, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    inntrospect.topomap_layout(path, method="pca")
    return path


def _by_hand(contrast, layer: str, fade_q: float) -> tuple[np.ndarray, np.ndarray]:
    """Unit values with units not significant (min q over positions >= fade_q, or all NaN) set to 0."""
    ds = contrast[layer]
    values = unit_values(ds["nap"].values).copy()
    q = ds["q"].values
    keep = np.zeros(values.shape, dtype=bool)
    for g in range(q.shape[0]):
        for u in range(q.shape[-1]):
            finite = [v for v in q[g, ..., u].ravel().tolist() if v == v]
            keep[g, u] = bool(finite) and min(finite) < fade_q
            if not keep[g, u]:
                values[g, u] = 0.0
    return values, keep


def test_faded_units_are_zero_the_others_unchanged(store):
    plain = inntrospect.topomap_images(store, 20, persist=False)
    faded = inntrospect.topomap_images(store, 20, fade=0.05, persist=False)
    contrast = inntrospect.load(store, "contrast")
    for layer, ds in faded.items():
        want, keep = _by_hand(contrast, layer, 0.05)
        assert keep.any() and (~keep).any()  # the fixture's premise: both kinds in each layer
        got = ds["value"].values
        assert (got[~keep] == 0.0).all()
        np.testing.assert_array_equal(got[keep], plain[layer]["value"].values[keep])  # bit for bit
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ds["image"].values, interpolate(ds["xy"].values, want, 20))
        assert ds.attrs["faded"] == (~keep).sum(axis=1).tolist()
        assert ds.attrs["vmax"] == np.abs(want).max()
        assert ds.attrs["params"]["fade_q"] == 0.05
        assert "fade_q" not in plain[layer].attrs["params"] and "faded" not in plain[layer].attrs
    # units 0-7 fire for a at one position only: kept for a all the same (their smallest q counts)
    want, keep = _by_hand(contrast, "conv", 0.05)
    assert keep[0, :8].all() and keep[2, 8:16].all()


def test_the_kernel_fades_per_group_and_all_nan_units():
    values = np.array([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    q = np.full((2, 2, 3), np.nan)
    q[0, :, 0] = [0.2, 0.01]  # significant at one position
    q[0, :, 1] = [0.05, 0.5]  # exactly at the threshold: faded
    q[1, :, 1] = [np.nan, 0.049]
    out, faded = fade_insignificant(values, q, 0.05)
    np.testing.assert_array_equal(out, [[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    np.testing.assert_array_equal(faded, [[False, True, True], [True, False, True]])
    assert values[0, 1] == -2.0  # a new array
    out2, _ = fade_insignificant(values, q[:, 1], 0.05)  # no spatial axes
    np.testing.assert_array_equal(out2, [[1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(ParameterError, match=r"fade_q must be a q-value threshold in \(0, 1\)"):
            fade_insignificant(values, q, bad)


def test_fade_is_recorded_and_makes_the_images_stale_for_run(store, tmp_path):
    cfg = lambda fade: load_config(write_config(  # noqa: E731
        tmp_path, {"store": {"path": str(store)},
                   "topomap": {"method": "pca", "resolution": 20,
                               **({} if fade is None else {"fade_q": fade})}}, name=f"c{fade}.toml"))
    wanted = lambda c: registry.STEPS["topomap"].params(c)  # noqa: E731
    inntrospect.topomap_images(store, 20, fade=0.05)
    rec = inntrospect.open_store(store).attrs["steps"]["topomap"]
    assert rec["params"]["fade_q"] == 0.05
    assert inntrospect.load(store, "topomap")["conv"].attrs["params"]["fade_q"] == 0.05
    assert pipeline.is_done(store, "topomap", wanted(cfg(0.05)))
    assert not pipeline.is_done(store, "topomap", wanted(cfg(0.01)))
    assert not pipeline.is_done(store, "topomap", wanted(cfg(None)))
    inntrospect.topomap_images(store, 20)  # off again: the record has no fade_q, as before the option
    assert "fade_q" not in inntrospect.open_store(store).attrs["steps"]["topomap"]["params"]
    assert pipeline.is_done(store, "topomap", wanted(cfg(None)))
    assert not pipeline.is_done(store, "topomap", wanted(cfg(0.05)))


def test_fade_needs_contrast_statistics(tmp_path):
    rng = np.random.default_rng(0)
    path = store_from_arrays(tmp_path / "n.zarr", {"dense": rng.normal(size=(len(GROUPS), 20))},
                             GROUPS, chunks=16)
    inntrospect.naps(path, persist=True)  # no std: no statistics
    inntrospect.contrastive_naps(path, persist=True)
    inntrospect.topomap_layout(path, method="pca")
    with pytest.raises(ParameterError, match=r"statistics.*inntrospect contrast CONFIG.*"
                                             r"significance = true"):
        inntrospect.topomap_images(path, 10, fade=0.05, persist=False)
    inntrospect.topomap_layout(path, method="pca", source="naps")
    with pytest.raises(ParameterError, match=r"made from NAPs.*from = \"contrast\""):
        inntrospect.topomap_images(path, 10, fade=0.05, persist=False)
    for bad in (0.0, 1.0, 2, "0.05", True):
        with pytest.raises(ParameterError, match=r"fade must be a q-value threshold in \(0, 1\)"):
            inntrospect.topomap_images(path, 10, fade=bad, persist=False)


@pytest.mark.parametrize("value, message", [
    ("0", "above 0 and at most 1"), ("1.5", "above 0 and at most 1"), ("-0.1", "above 0"),
    ("1", "above 0 and below 1"), ("true", "must be int or float"), ('"0.05"', "must be int or float"),
])
def test_config_fade_q_is_checked(tmp_path, value, message):
    path = write_config(tmp_path, {"store": {"path": "s.zarr"}}, text=f"[topomap]\nfade_q = {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path).fade_q()


def test_config_fade_q_default_is_off(tmp_path):
    assert load_config(write_config(tmp_path, {"store": {"path": "s.zarr"}})).fade_q() is None
    cfg = load_config(write_config(tmp_path, {"topomap": {"fade_q": 0.01}}, name="f.toml"))
    assert cfg.fade_q() == 0.01 and registry.STEPS["topomap"].params(cfg)["fade_q"] == 0.01
