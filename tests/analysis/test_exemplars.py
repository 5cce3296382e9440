"""Top exemplars of stores: the lazy pass, the shared pass with the NAPs, persistence, the real CNN,
against a brute-force numpy argsort of the raw activations."""

from __future__ import annotations

import shutil
import tempfile

import dask
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import inntrospect
from inntrospect.errors import ParameterError, StaleResultError
from inntrospect.testing import store_from_arrays

from ..conftest import counting_reads


def brute_force(x: np.ndarray, labels: np.ndarray, k: int):
    """``sample``, ``value``, ``position`` (end, group, rank, unit[, axis]) by sorting every sample."""
    names = np.unique(labels)
    n, units = len(x), x.shape[-1]
    spatial = x.shape[1:-1]
    flat = x.reshape(n, -1, units).astype(np.float64)
    score, where = flat.max(axis=1), flat.argmax(axis=1)
    sample = np.full((2, len(names), k, units), -1, np.int64)
    value = np.full((2, len(names), k, units), np.nan)
    position = np.full((2, len(names), k, units, len(spatial)), -1, np.int32)
    for g, name in enumerate(names):
        idx = np.flatnonzero(labels == name)
        for u in range(units):
            s = score[idx, u]
            for end, order in enumerate((np.lexsort((idx, -s)), np.lexsort((idx, s)))):
                take = order[:k]
                sample[end, g, : len(take), u] = idx[take]
                value[end, g, : len(take), u] = s[take]
                if spatial:
                    position[end, g, : len(take), u] = np.stack(
                        np.unravel_index(where[idx[take], u], spatial), axis=-1)
    return sample, value, position


def assert_exemplars(ds, x, labels, k):
    sample, value, position = brute_force(x, labels, k)
    np.testing.assert_array_equal(ds["sample"].values, sample)
    np.testing.assert_array_equal(ds["value"].values, value)
    if x.ndim > 2:
        np.testing.assert_array_equal(ds["position"].values, position)
        assert ds.sizes["axis"] == x.ndim - 2
    else:
        assert "position" not in ds
    assert list(ds["end"].values) == ["top", "bottom"]


@st.composite
def cases(draw):
    n = draw(st.integers(1, 60))
    shape = draw(st.sampled_from([(3,), (2, 3), (2, 2, 3), (1, 4, 2)]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    ties = draw(st.booleans())
    x = rng.integers(-2, 3, size=(n, *shape)).astype(np.float32) if ties else \
        rng.standard_normal((n, *shape)).astype(np.float32)
    labels = rng.choice(["a", "b", "c", "d"][: draw(st.integers(1, 4))], n)
    return x, labels, draw(st.integers(1, 17)), draw(st.integers(1, 6))


@settings(max_examples=30, deadline=None)
@given(cases())
def test_store_exemplars_equal_brute_force(case):
    x, labels, chunk, k = case
    with tempfile.TemporaryDirectory() as tmp:
        path = store_from_arrays(f"{tmp}/s.zarr", {"l": x}, labels, chunks=chunk)
        lazy = inntrospect.exemplars(path, k=k)
        (result,) = dask.compute(lazy)
        tree = inntrospect.open_store(path)  # read through the tree's dask arrays
        (through_tree,) = dask.compute(inntrospect.exemplars(tree, k=k))
    assert_exemplars(result["l"], x, labels, k)
    for var in ("sample", "value"):
        np.testing.assert_array_equal(through_tree["l"][var].values, result["l"][var].values)


@pytest.mark.parametrize("persisted_alignment", [False, True])
def test_one_pass_for_naps_and_exemplars_equals_each_alone(tmp_path, persisted_alignment):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((150, 4, 5, 6)).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    d = rng.standard_normal((150, 9)).astype(np.float32)
    labels = rng.choice(["cat", "dog", "owl"], 150)
    path = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": d}, labels, grads={"conv": g},
                             chunks=32)
    if persisted_alignment:
        inntrospect.align(path, persist=True)
    naps, ex = inntrospect.naps_and_exemplars(path, aligned=True, std=True, k=5)
    assert_exemplars(ex["conv"], x, labels, 5)
    assert_exemplars(ex["dense"], d, labels, 5)
    alone = dask.compute(inntrospect.naps(path, aligned=True, std=True))[0]
    for layer in ("conv", "dense"):  # the same sums, merged in another tree (longer tasks): to rounding
        np.testing.assert_allclose(naps[layer].nap.values, alone[layer].nap.values, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(naps[layer]["std"].values, alone[layer]["std"].values, rtol=1e-10,
                                   atol=1e-14)
    loaded = inntrospect.load(path, "exemplars")
    np.testing.assert_array_equal(loaded["conv"]["sample"].values, ex["conv"]["sample"].values)
    np.testing.assert_array_equal(loaded["conv"]["position"].values, ex["conv"]["position"].values)
    assert loaded["conv"].attrs["params"] == {"k": 5}
    assert inntrospect.load(path, "naps")["conv"].attrs["params"] == {"aligned": True, "std": True}


def test_the_shared_pass_reads_each_chunk_once(tmp_path, monkeypatch):
    """NAPs aligned on the fly and exemplars: every chunk file of the layer is read exactly once."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((96, 3, 3, 4)).astype(np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"c": x}, rng.choice(["a", "b"], 96),
                             grads={"c": rng.standard_normal(x.shape).astype(np.float32)}, chunks=16)
    reads = counting_reads(monkeypatch)
    with dask.config.set(scheduler="synchronous"):
        inntrospect.naps_and_exemplars(path, aligned=True, k=3)
    assert len(reads) == 2 * 6  # 6 chunks of acts and 6 of grads, each once
    assert len(set(reads)) == len(reads)


def test_exemplars_become_stale_with_a_new_extraction_and_k_is_checked(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, np.repeat(["a", "b"], 10))
    inntrospect.exemplars(path, k=2, persist=True)
    assert inntrospect.load(path, "exemplars")["l"]["sample"].shape == (2, 2, 2, 3)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ParameterError, match="k must be"):
            inntrospect.exemplars(path, k=bad)
    store_from_arrays(tmp_path / "s.zarr", {"l": x}, np.repeat(["a", "b"], 10))  # extracted anew
    with pytest.raises((StaleResultError, inntrospect.StepNotFoundError)):
        inntrospect.load(path, "exemplars")


def test_exemplars_of_the_mnist_cnn_store_equal_brute_force(cnn_store, tmp_path):
    path = tmp_path / "cnn.zarr"
    shutil.copytree(cnn_store, path)
    k = 16
    _, ex = inntrospect.naps_and_exemplars(path, aligned=True, std=True, k=k)
    root = zarr.open_group(str(path), mode="r")
    labels = np.asarray(root["layers/conv2d_25/group"][:]).astype(object).astype(str)
    for layer in ("conv2d_24", "conv2d_25", "flatten_8"):
        acts = np.asarray(root[f"layers/{layer}/acts"][:])
        assert_exemplars(ex[layer], acts, labels, k)
    assert list(ex["conv2d_25"]["axis"].values) == list(
        root["layers/conv2d_25/acts"].metadata.dimension_names[1:-1])
