"""Instance projection: sampling, the streamed PCA against sklearn's PCA, UMAP, persisting."""

from __future__ import annotations

import hypothesis.strategies as hst
import numpy as np
import pytest
from hypothesis import given, settings

import inntrospect
from inntrospect import projection
from inntrospect.errors import IncompleteStoreError, LayerNotFoundError, StoreError
from inntrospect.projection import choose_samples, instance_projection, plan_batches
from inntrospect.testing import store_from_arrays


def low_rank(rng, n, features, rank=8, noise=1e-3, centres=None, labels=None):
    """Rows near a ``rank``-dimensional subspace (so an incremental PCA keeping more is exact)."""
    basis = rng.normal(size=(rank, features))
    x = rng.normal(size=(n, rank)) * np.linspace(3, 1, rank) @ basis
    return (x + noise * rng.normal(size=(n, features))).astype(np.float32)


@pytest.fixture(scope="module")
def wide_store(tmp_path_factory):
    """3 groups (interleaved), 600 samples, a (10, 30) layer (300 values) in chunks of 37, and a
    narrow dense layer of 6 units."""
    rng = np.random.default_rng(1)
    n = 600
    labels = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.4, 0.1])
    wide = low_rank(rng, n, 300).reshape(n, 10, 30)
    dense = rng.normal(size=(n, 6)).astype(np.float32)
    path = tmp_path_factory.mktemp("proj") / "wide.zarr"
    store_from_arrays(path, {"conv": wide, "dense": dense}, labels, chunks={"conv": 37, "dense": 64})
    return path, {"conv": wide.reshape(n, -1), "dense": dense}, labels


# -- sampling --------------------------------------------------------------------
@given(hst.lists(hst.sampled_from("abcd"), min_size=1, max_size=80), hst.integers(1, 30),
       hst.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_first_takes_the_first_of_each_group(labels, k, seed):
    labels = np.array(labels)
    got = choose_samples(labels, k, "first", seed)
    want = np.sort(np.concatenate([np.flatnonzero(labels == g)[:k] for g in np.unique(labels)]))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int64


@given(hst.lists(hst.sampled_from("abcd"), min_size=1, max_size=80), hst.integers(1, 30),
       hst.integers(0, 2**32 - 1))
@settings(max_examples=100, deadline=None)
def test_random_takes_distinct_samples_of_each_group(labels, k, seed):
    labels = np.array(labels)
    got = choose_samples(labels, k, "random", seed)
    assert np.all(np.diff(got) > 0)  # sorted and distinct
    for g in np.unique(labels):
        assert np.sum(labels[got] == g) == min(k, np.sum(labels == g))  # small groups: all
    np.testing.assert_array_equal(got, choose_samples(labels, k, "random", seed))


def test_random_depends_on_the_seed():
    labels = np.repeat(["x", "y", "z"], 200)
    a, b = choose_samples(labels, 20, "random", 0), choose_samples(labels, 20, "random", 1)
    assert len(a) == len(b) == 60 and not np.array_equal(a, b)
    first = choose_samples(labels, 20, "first")
    np.testing.assert_array_equal(first, np.r_[0:20, 200:220, 400:420])
    assert not np.array_equal(a, first)


@given(hst.integers(1, 5000), hst.integers(1, 10_000), hst.integers(1, 60), hst.floats(0.001, 2))
@settings(max_examples=200, deadline=None)
def test_batches_cover_the_rows_within_bounds(n, features, min_rows, mib):
    batches = plan_batches(n, features, min_rows, mib)
    assert batches[0].start == 0 and batches[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(batches, batches[1:]))
    rows = max(min_rows, int(mib * 2**20 // (8 * features)))
    sizes = [b.stop - b.start for b in batches]
    assert all(s <= rows + min_rows for s in sizes)
    if n >= min_rows:
        assert min(sizes) >= min_rows


# -- the streamed PCA ------------------------------------------------------------
def test_streamed_pca_equals_sklearn_pca(wide_store, monkeypatch):
    from sklearn.decomposition import PCA

    path, arrays, labels = wide_store
    read = []
    original = projection._read_rows

    def counting(data, rows):
        read.append(len(rows))
        return original(data, rows)

    monkeypatch.setattr(projection, "_read_rows", counting)
    monkeypatch.setattr(projection, "BATCH_MIB", 40 * 300 * 8 / 2**20)  # 40 rows of 300 values
    out = instance_projection(path, 150, "random", 3, layers=["conv"], pca_components=10,
                              method="pca")["conv"]
    rows = choose_samples(labels, 150, "random", 3)
    n = len(rows)  # 150 + 150 + all of "c"
    assert n < 450 and np.sum(labels[rows] == "c") == np.sum(labels == "c")
    # bounded batches: fitted and transformed batch by batch, never the whole subset
    assert len(read) > 2 and max(read) < 80 and sum(read) == 2 * n
    np.testing.assert_array_equal(out["sample"].values, rows)
    np.testing.assert_array_equal(out["group"].values, labels[rows])

    full = arrays["conv"][rows].astype(np.float64)
    ref = PCA(10).fit(full)
    assert out.attrs["explained_variance"] == pytest.approx(ref.explained_variance_ratio_.sum(),
                                                            rel=1e-9)
    assert out.attrs["explained_variance"] > 0.999
    assert out.attrs["params"] == {"samples_per_group": 150, "sampling": "random", "seed": 3,
                                   "pca_components": 10, "method": "pca"}
    # the 2-D PCA of the 10 streamed components = the first 2 components of the full PCA
    want = ref.transform(full)[:, :2]
    got = out["xy"].values
    assert got.dtype == np.float64 and got.shape == (n, 2)
    for j in range(2):
        sign = np.sign(got[:, j] @ want[:, j])
        np.testing.assert_allclose(sign * got[:, j], want[:, j], rtol=1e-6,
                                   atol=1e-6 * np.abs(want).max())


def test_streamed_pca_subspace_matches_sklearn(wide_store):
    from sklearn.decomposition import PCA

    _, arrays, _ = wide_store
    x = arrays["conv"][::2].astype(np.float64)
    batches = plan_batches(len(x), x.shape[1], 12, 30 * 300 * 8 / 2**20)
    assert len(batches) > 5
    reduced, explained = projection.streamed_pca(lambda: (x[b] for b in batches), 12)
    ref = PCA(12).fit(x)
    assert explained == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-9)
    want = ref.transform(x)
    for j in range(8):  # the signal's components; the rest are noise
        c = abs(np.corrcoef(reduced[:, j], want[:, j])[0, 1])
        assert c > 0.99999


def test_narrow_layers_and_no_pca_use_the_rows(wide_store):
    path, arrays, labels = wide_store
    out = instance_projection(path, 30, "first", method="pca", pca_components=50)
    assert list(out) == ["conv", "dense"]
    rows = choose_samples(labels, 30, "first")
    dense = out["dense"]
    assert dense.attrs["pca_components_used"] == 0 and dense.attrs["explained_variance"] == 1.0
    np.testing.assert_allclose(np.abs(dense["xy"].values),
                               np.abs(projection._pca_2d(arrays["dense"][rows])), rtol=1e-9)
    assert out["conv"].attrs["pca_components_used"] == 50
    off = instance_projection(path, 30, "first", layers="conv", method="pca", pca_components=0)
    assert off["conv"].attrs["pca_components_used"] == 0
    np.testing.assert_allclose(np.abs(off["conv"]["xy"].values),
                               np.abs(projection._pca_2d(arrays["conv"][rows])), rtol=1e-6)


def test_tiny_and_constant_layers_do_not_crash(tmp_path):
    labels = np.array(["a", "a", "b", "b", "b"])
    x = np.arange(5 * 60, dtype=np.float32).reshape(5, 60) ** 1.5
    path = store_from_arrays(tmp_path / "tiny.zarr", {"wide": x, "flat": np.ones((5, 4))}, labels,
                             chunks=2)
    with pytest.warns(UserWarning, match="only 2 samples of layer wide"):
        out = instance_projection(path, 1, layers=["wide"], pca_components=10)  # UMAP: PCA instead
    assert out["wide"]["xy"].shape == (2, 2) and np.all(np.isfinite(out["wide"]["xy"]))
    with pytest.warns(UserWarning, match="same activations"):
        flat = instance_projection(path, 5, layers=["flat"], method="pca")["flat"]
    np.testing.assert_array_equal(flat["xy"].values, np.zeros((5, 2)))
    with pytest.warns(UserWarning, match="all 2 chosen samples of layer flat"):
        one = instance_projection(path, 1, layers="flat", method="pca")  # one per group
    assert one["flat"]["xy"].shape == (2, 2)


# -- UMAP (the only test paying for its import and JIT) ------------------------------
def test_umap_separates_groups_reproducibly(tmp_path):
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    n = 120
    labels = np.repeat(["left", "right"], n // 2)
    x = rng.normal(size=(n, 4, 20)).astype(np.float32)
    x[labels == "right"] += 4.0
    path = store_from_arrays(tmp_path / "two.zarr", {"conv": x}, labels, chunks=16)
    a = instance_projection(path, 40, "random", seed=7, pca_components=10)["conv"]
    b = instance_projection(path, 40, "random", seed=7, pca_components=10)["conv"]
    assert a["xy"].shape == (80, 2) and a.attrs["params"]["method"] == "umap"
    np.testing.assert_array_equal(a["xy"].values, b["xy"].values)
    assert silhouette_score(a["xy"].values, a["group"].values) > 0.5


# -- persisting and errors -----------------------------------------------------------
def test_persist_writes_and_loads(wide_store, tmp_path):
    import shutil

    path = tmp_path / "copy.zarr"
    shutil.copytree(wide_store[0], path)
    with pytest.raises(inntrospect.StepNotFoundError):
        inntrospect.load(path, "projection")
    done = instance_projection(path, 20, "first", pca_components=10, method="pca", persist=True)
    loaded = inntrospect.load(path, "projection")
    assert list(loaded) == list(done) == ["conv", "dense"]
    rec = inntrospect.store.store_attrs(path)["steps"]["projection"]
    assert rec["state"] == "complete" and rec["params"]["pca_components"] == 10
    assert rec["inputs"] == {"extraction": inntrospect.store.store_attrs(path)["extraction"]["id"]}
    for layer, ds in loaded.items():
        np.testing.assert_array_equal(ds["xy"].values, done[layer]["xy"].values)
        np.testing.assert_array_equal(ds["sample"].values, done[layer]["sample"].values)
        assert ds["sample"].dtype == np.int64
        assert [str(g) for g in ds["group"].values] == list(done[layer]["group"].values)
        assert [str(c) for c in ds["coord"].values] == ["x", "y"]
        assert ds.attrs["id"] == rec["id"] and ds.attrs["step"] == "projection"
        assert ds.attrs["explained_variance"] == done[layer].attrs["explained_variance"]
        assert ds.attrs["params"] == done[layer].attrs["params"]
    assert loaded["dense"].attrs["pca_components_used"] == 0
    with pytest.raises(StoreError, match="pass its path"):
        instance_projection(inntrospect.open_store(path), persist=True)


def test_an_opened_tree_works(wide_store):
    path = wide_store[0]
    a = instance_projection(inntrospect.open_store(path), 10, "first", layers=["dense"], method="pca")
    b = instance_projection(path, 10, "first", layers=["dense"], method="pca")
    np.testing.assert_array_equal(a["dense"]["xy"].values, b["dense"]["xy"].values)


def test_errors(wide_store, tmp_path):
    path = wide_store[0]
    with pytest.raises(LayerNotFoundError, match="'nope'.*the layers are: conv, dense"):
        instance_projection(path, layers=["conv", "nope"], method="pca")
    with pytest.raises(ValueError, match="sampling must be one of 'random', 'first'; got 'last'"):
        instance_projection(path, sampling="last")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="samples_per_group must be a positive integer"):
            instance_projection(path, samples_per_group=bad)
    with pytest.raises(ValueError, match="method must be one of"):
        instance_projection(path, method="tsne")
    with pytest.raises(ValueError, match="pca_components"):
        instance_projection(path, pca_components=-1)
    import zarr

    bad = tmp_path / "incomplete.zarr"
    store_from_arrays(bad, {"d": np.ones((4, 2))}, ["a"] * 4)
    zarr.open_group(str(bad), mode="r+").attrs["extraction"] = {"state": "incomplete", "id": "x"}
    with pytest.raises(IncompleteStoreError):
        instance_projection(bad, method="pca")
