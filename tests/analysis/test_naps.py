"""NAPs and contrastive NAPs: kernels and lazy store results against plain numpy."""

from __future__ import annotations

import shutil
import tempfile

import dask
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import numpy as np
import pytest
import zarr
from hypothesis import given, settings

import inntrospect
from inntrospect.analysis.alignment import align_reference
from inntrospect.analysis.nap_kernels import (
    chunk_moments,
    contrast,
    finalize_moments,
    group_codes,
    merge_moments,
)
from inntrospect.errors import GroupNotFoundError
from inntrospect.testing import store_from_arrays

from ..conftest import NoCompute, needs_shared


def numpy_naps(x, labels):
    """The definition: per-group float64 mean and population std, groups sorted."""
    names = np.unique(labels)
    x = np.asarray(x, dtype=np.float64)
    return names, np.stack([x[labels == g].mean(0) for g in names]), \
        np.stack([x[labels == g].std(0) for g in names]), \
        np.array([(labels == g).sum() for g in names])


def numpy_contrast(nap, counts, names, chosen, weighted):
    idx = [list(names).index(g) for g in sorted(chosen, key=list(names).index)]
    sub, c = nap[idx], counts[idx].astype(float)
    w = c / c.sum() if weighted else np.full(len(idx), 1 / len(idx))
    return sub - np.einsum("g,g...->...", w, sub)[None]


@st.composite
def grouped(draw, max_n=60):
    n = draw(st.integers(1, max_n))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    x = draw(hnp.arrays(np.float32, (n, *shape), elements=st.floats(-1e3, 1e3, width=32)))
    k = draw(st.integers(1, 5))
    labels = np.array(draw(st.lists(st.sampled_from("abcde"[:k]), min_size=n, max_size=n)))
    if draw(st.booleans()):  # a corpus sorted by group: runs, summed in place
        labels = np.sort(labels)
    chunk = draw(st.integers(1, 17))
    return x, labels, chunk


@given(grouped(), st.booleans(), st.randoms(use_true_random=False))
@settings(max_examples=150, deadline=None)
def test_chunked_moments_equal_numpy(case, std, rnd):
    x, labels, chunk = case
    names, codes = group_codes(labels)
    parts = [chunk_moments(x[lo : lo + chunk], codes[lo : lo + chunk], std)
             for lo in range(0, len(x), chunk)]
    while len(parts) > 1:  # merged in a random tree
        k = rnd.randint(2, max(2, len(parts)))
        rnd.shuffle(parts)
        parts = [merge_moments(*parts[:k]), *parts[k:]]
    mean, sd = finalize_moments(parts[0], len(names), x.shape[1:], std)
    ref_names, ref_mean, ref_sd, _ = numpy_naps(x, labels)
    assert list(names) == list(ref_names)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-10, atol=1e-9)
    if std:
        np.testing.assert_allclose(sd, ref_sd, rtol=1e-7, atol=1e-7)
    else:
        assert sd is None


def test_narrow_layer_uses_one_hot_and_stays_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 3)).astype(np.float32)
    labels = rng.choice(list("xyz"), 500)  # shuffled: the one-hot product path
    names, codes = group_codes(labels)
    mean, sd = finalize_moments(chunk_moments(x, codes, True), 3, (3,), True)
    _, ref_mean, ref_sd, _ = numpy_naps(x, labels)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(sd, ref_sd, rtol=1e-10)


@given(grouped(max_n=40), st.data())
@settings(max_examples=25, deadline=None)
def test_store_naps_and_contrasts_equal_numpy(case, data):
    x, labels, chunk = case
    y = x[..., :1] * 2 + 1  # a second, narrow layer
    names = np.unique(labels)
    chosen = data.draw(st.lists(st.sampled_from(list(names)), min_size=1, unique=True))
    weighted = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as tmp:
        path = store_from_arrays(f"{tmp}/s.zarr", {"a": x, "b": y}, labels, chunks=chunk)
        result = dask.compute(inntrospect.naps(path, std=True))[0]
        lazy = inntrospect.naps(path)
        con = dask.compute(inntrospect.contrastive_naps(
            path, chosen, weighted, naps=lazy))[0]
    for layer, arr in (("a", x), ("b", y)):
        ref_names, ref_mean, ref_sd, ref_counts = numpy_naps(arr, labels)
        ds = result[layer]
        assert list(ds.group.values) == list(ref_names)
        np.testing.assert_allclose(ds.nap.values, ref_mean, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(ds["std"].values, ref_sd, rtol=1e-7, atol=1e-7)
        np.testing.assert_array_equal(ds["count"].values, ref_counts)
        ref_c = numpy_contrast(ref_mean, ref_counts, ref_names, chosen, weighted)
        c = con[layer]
        assert list(c.group.values) == sorted(chosen, key=list(ref_names).index)
        np.testing.assert_allclose(c.nap.values, ref_c, rtol=1e-9, atol=1e-8)
        assert np.isclose(c.weight.values.sum(), 1.0)


def test_group_in_one_chunk_only(tmp_path):
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 2, 2)
    labels = np.array(["a"] * 4 + ["b"] * 5 + ["c"])  # "c" only in the last, short chunk
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, labels, chunks=4)
    ds = inntrospect.naps(path)["l"].compute()
    np.testing.assert_array_equal(ds["count"].values, [4, 5, 1])
    np.testing.assert_allclose(ds.nap.sel(group="c").values, x[9])
    np.testing.assert_allclose(ds.nap.sel(group="b").values, x[4:9].mean(0))


def test_contrast_kernel_by_hand():
    nap = np.array([[1.0, 2.0], [3.0, 6.0]])
    np.testing.assert_allclose(contrast(nap, [1, 3]), [[-1.0, -2.0], [1.0, 2.0]])
    np.testing.assert_allclose(contrast(nap, [1, 3], True), [[-1.5, -3.0], [0.5, 1.0]])


def test_unknown_groups_are_named_with_the_groups_that_exist(tmp_path):
    x = np.ones((6, 3), np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, list("aabbcc"), chunks=4)
    lazy = inntrospect.naps(path)
    with pytest.raises(GroupNotFoundError, match=r"'zebra'.*the groups are: a, b, c"):
        inntrospect.contrastive_naps(path, ["a", "zebra"], naps=lazy)
    with pytest.raises(GroupNotFoundError, match="no groups of interest"):
        inntrospect.contrastive_naps(path, [], naps=lazy)


def test_building_graphs_computes_nothing(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((40, 3, 3, 2), dtype=np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x, "m": x[:, 0, 0]}, rng.choice(list("ab"), 40),
                             grads={"l": rng.standard_normal((40, 3, 3, 2))}, chunks=8)
    with dask.config.set(scheduler=NoCompute()):
        lazy = inntrospect.naps(path, aligned=True, std=True)
        con = inntrospect.contrastive_naps(path, ["b"], naps=lazy)
        net = inntrospect.stack(lazy)
        inntrospect.stack(con)
        inntrospect.align(path)
    assert net.shape == (2, 18 + 2)
    np.testing.assert_allclose(
        net.sel(layer="l").values,
        lazy["l"].nap.values.reshape(2, -1), rtol=0)


def test_stack_indexes_layers_positions_and_units(tmp_path):
    rng = np.random.default_rng(2)
    a, b = rng.random((12, 3, 4, 2), np.float32), rng.random((12, 5), np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"a": a, "b": b}, rng.choice(list("pq"), 12), chunks=5)
    tree = inntrospect.open_store(path)
    net = inntrospect.stack(tree["layers"])  # every sample, every neuron
    assert net.dims == ("sample", "neuron") and net.shape == (12, 24 + 5)
    np.testing.assert_array_equal(net.values, np.concatenate([a.reshape(12, -1), b], axis=1))
    np.testing.assert_array_equal(net.sel(layer="a", y=2, x=1).values, a[:, 2, 1, :])
    np.testing.assert_array_equal(net.sel(layer="b").values, b)
    assert set(net.sel(layer="b").y.values) == {-1}
    np.testing.assert_array_equal(net.group.values, tree["layers/a"].group.values)


# -- the real MNIST CNN store --------------------------------------------------
def mnist_reference(path, layer, aligned):
    node = zarr.open_group(str(path), mode="r")[f"layers/{layer}"]
    acts = node["acts"][:]
    if aligned and "grads" in node and acts.ndim > 2:
        acts = align_reference(acts, node["grads"][:])
    labels = np.array([str(g) for g in node["group"][:]])
    return numpy_naps(acts, labels)


@needs_shared
@pytest.mark.parametrize("aligned", [False, True])
def test_mnist_cnn_naps_equal_numpy(cnn_store, aligned):
    result = dask.compute(inntrospect.naps(cnn_store, aligned=aligned, std=True))[0]
    assert list(result) == zarr.open_group(str(cnn_store), mode="r").attrs["layers"]
    for layer, ds in result.items():
        names, mean, sd, counts = mnist_reference(cnn_store, layer, aligned)
        assert list(ds.group.values) == list(names) == [str(d) for d in range(10)]
        np.testing.assert_allclose(ds.nap.values, mean, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ds["std"].values, sd, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(ds["count"].values, counts)
        assert ds.nap.dims[0] == "group" and ds.nap.dims[-1] == "unit"


@needs_shared
def test_aligned_naps_differ_from_raw_on_conv_layers_only(cnn_store):
    raw, al = (dask.compute(inntrospect.naps(cnn_store, aligned=a))[0] for a in (False, True))
    assert not np.allclose(raw["conv2d_24"].nap, al["conv2d_24"].nap)
    np.testing.assert_array_equal(raw["flatten_8"].nap, al["flatten_8"].nap)


@pytest.fixture
def small_store(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.random((30, 4, 4, 3), np.float32)
    g = rng.standard_normal((30, 4, 4, 3)).astype(np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, np.repeat(list("abc"), 10),
                             grads={"conv": g}, chunks=8)
    return path, x, g


def test_persisted_results_are_read_back_and_open_with_plain_xarray(small_store):
    import xarray as xr

    path, x, g = small_store
    written = inntrospect.naps(path, aligned=True, persist=True)
    loaded = inntrospect.load(path, "naps")
    for layer in ("conv", "dense"):
        xr.testing.assert_allclose(loaded[layer].nap.compute(), written[layer].nap)
    plain = xr.open_datatree(str(path), engine="zarr")
    np.testing.assert_allclose(plain["naps/conv"].nap.sel(group="b").values,
                               align_reference(x, g)[10:20].mean(0), rtol=1e-6)
    assert plain["naps/conv"].attrs["step"] == "naps"
    assert plain["naps/conv"].attrs["params"] == {"aligned": True, "std": False}
    inntrospect.contrastive_naps(path, ["a", "c"], persist=True)
    con = inntrospect.load(path, "contrast")["conv"]
    assert list(con.group.values) == ["a", "c"]
    assert plain.attrs["steps"]["naps"]["state"] == "complete"


def test_stale_results_name_the_step_to_rerun(small_store, tmp_path):
    from inntrospect.errors import StaleResultError, StepNotFoundError
    from inntrospect.store import consolidate, store_attrs, update_attrs
    from inntrospect.store.info import describe_store

    path = small_store[0]
    with pytest.raises(StepNotFoundError, match="no naps results yet. Run inntrospect naps"):
        inntrospect.load(path, "naps")
    inntrospect.naps(path, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    inntrospect.load(path, "contrast")
    # NAPs recomputed with another setting: the old contrasts are stale, NAPs are not
    inntrospect.naps(path, aligned=True, persist=True)
    inntrospect.load(path, "naps")
    with pytest.raises(StaleResultError, match=r"computed from naps results .* Re-run inntrospect contrast"):
        inntrospect.load(path, "contrast")
    assert "contrast   STALE" in describe_store(path)
    # re-running the contrast replaces it: current again
    inntrospect.contrastive_naps(path, ["b"], persist=True)
    assert list(inntrospect.load(path, "contrast")["conv"].group.values) == ["b"]
    # an interrupted NAP run: NAPs and everything after them are refused
    steps = store_attrs(path)["steps"]
    update_attrs(path, steps={**steps, "naps": {**steps["naps"], "state": "running"}})
    with pytest.raises(StaleResultError, match="did not finish. Re-run inntrospect naps"):
        inntrospect.load(path, "naps")
    with pytest.raises(StaleResultError, match="Re-run inntrospect naps .*, then inntrospect contrast"):
        inntrospect.load(path, "contrast")
    update_attrs(path, steps=steps)
    inntrospect.load(path, "contrast")
    # a new extraction under the derived results
    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    update_attrs(copy, extraction={**store_attrs(copy)["extraction"], "id": "another"})
    with pytest.raises(StaleResultError, match="extraction .* now holds extraction another"):
        inntrospect.load(copy, "naps")
    # a node left behind by another run of the step
    update_attrs(copy, extraction=store_attrs(path)["extraction"])
    zarr.open_group(str(copy), mode="r+")["naps/conv"].attrs["id"] = "older"
    consolidate(copy)
    with pytest.raises(StaleResultError, match="naps/conv was written by another naps run"):
        inntrospect.load(copy, "naps")


def test_persist_needs_the_store_path_and_the_lock(small_store):
    from inntrospect.errors import StoreError, StoreLockedError
    from inntrospect.store import writer_lock

    path = small_store[0]
    with pytest.raises(StoreError, match="pass its path"):
        inntrospect.naps(inntrospect.open_store(path), persist=True)
    with writer_lock(path), pytest.raises(StoreLockedError):
        inntrospect.naps(path, persist=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 40), st.integers(1, 20), st.integers(1, 16))
def test_task_chunks_cover_the_chunks_evenly_and_round_to_the_threads(n_chunks, per_task_max, min_tasks, threads):
    from inntrospect.analysis.nap_graph import task_chunks

    codes = np.zeros(n_chunks * 4, np.int64)  # one group: the partial results stay small
    bounds = np.arange(0, n_chunks * 4 + 1, 4)
    tasks = task_chunks(codes, bounds, 1, min_tasks, per_task_max, threads=threads)
    plain = task_chunks(codes, bounds, 1, min_tasks, per_task_max)
    for got in (tasks, plain):
        assert [a for a, _ in got] == ([0, *(b for _, b in got[:-1])] if got else [])  # consecutive
        assert (got[-1][1] if got else 0) == n_chunks
        sizes = [b - a for a, b in got]
        assert all(s >= 1 for s in sizes) and (not sizes or max(sizes) - min(sizes) <= 1)  # even
        assert not sizes or max(sizes) <= max(1, min(per_task_max, n_chunks // min_tasks))
    n = len(plain)
    rounded = -(-n // threads) * threads
    if threads > 1 and n > 1 and 2 * rounded <= 3 * n:
        assert len(tasks) == min(rounded, n_chunks)  # a multiple of the threads, unless too few chunks
    else:
        assert tasks == plain


def test_an_exemplar_pass_on_two_threads_makes_an_even_number_of_tasks_per_layer():
    """157 chunks in tasks of up to 32 are 5 tasks, one thread finishing the layer alone: 6 on 2 threads."""
    from inntrospect.analysis.nap_graph import task_chunks

    codes, bounds = np.zeros(157, np.int64), np.arange(158)
    assert [b - a for a, b in task_chunks(codes, bounds, 1, 2, 32)] == [31, 32, 31, 32, 31]
    assert [b - a for a, b in task_chunks(codes, bounds, 1, 2, 32, threads=2)] == [26, 26, 26, 27, 26, 26]
    assert len(task_chunks(codes, bounds, 1, 2, 32, threads=16)) == 5  # 16 would triple them: not rounded
