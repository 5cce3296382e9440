"""Instance projection: sampling, the scratch and its PCA against sklearn's PCA, UMAP, persisting."""

from __future__ import annotations

import os

import hypothesis.strategies as hst
import numpy as np
import pytest
from hypothesis import assume, given, settings

import inntrospect
from inntrospect.analysis import projection
from inntrospect.analysis.projection import (
    Scratch,
    choose_samples,
    gram_pca,
    instance_projection,
    plan_blocks,
    randomized_pca,
)
from inntrospect.errors import IncompleteStoreError, LayerNotFoundError, StoreError
from inntrospect.testing import store_from_arrays

from ..conftest import needs_shared


def low_rank(rng, n, features, rank=8, noise=1e-3, centres=None, labels=None):
    """Rows near a ``rank``-dimensional subspace (so a PCA keeping more is exact)."""
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


@given(hst.integers(1, 5000), hst.integers(1, 10_000), hst.floats(0.001, 2))
@settings(max_examples=200, deadline=None)
def test_blocks_cover_the_features_within_bounds(n, features, mib):
    blocks = plan_blocks(n, features, mib)
    assert blocks[0].start == 0 and blocks[-1].stop == features
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    sizes = [b.stop - b.start for b in blocks]
    assert min(sizes) >= 1 and len(set(sizes[:-1])) <= 1  # one width, a shorter last block
    assert all(s == 1 or n * s * 8 <= mib * 2**20 for s in sizes)  # within the budget (or 1 column)
    if len(blocks) > 1:  # no wider budget would have been in reach
        assert n * (sizes[0] + 1) * 8 > mib * 2**20


# -- the scratch and its PCA -----------------------------------------------------
def subspace_gap(a, b):
    """Largest entry of the difference of the projectors on the column spans of ``a`` and ``b``."""
    def projector(s):
        return s @ np.linalg.solve(s.T @ s, s.T)

    return np.abs(projector(a) - projector(b)).max()


def scratch_of(x, width=None, budget_mib=None, folder=None, pieces=3):
    """A :class:`Scratch` of the rows of ``x``, written in ``pieces`` consecutive runs."""
    scratch = Scratch(len(x), x.shape[1], width, budget_mib, folder)
    for part in np.array_split(np.arange(len(x)), pieces):
        if len(part):
            scratch.put(int(part[0]), x[part])
    return scratch


def test_instance_projection_pca_equals_sklearn_pca(wide_store, monkeypatch):
    from sklearn.decomposition import PCA

    path, arrays, labels = wide_store
    read = []
    original = projection.read_chunk_rows

    def counting(data, rows):
        read.append(rows)
        return original(data, rows)

    monkeypatch.setattr(projection, "read_chunk_rows", counting)
    monkeypatch.setattr(projection, "BLOCK_MIB", 40 * 400 * 8 / 2**20)  # 40 columns of 400 rows
    out = instance_projection(path, 150, "random", 3, layers=["conv"], pca_components=10,
                              method="pca")["conv"]
    rows = choose_samples(labels, 150, "random", 3)
    n = len(rows)  # 150 + 150 + all of "c"
    assert n < 450 and np.sum(labels[rows] == "c") == np.sum(labels == "c")
    # read once, a stored chunk (37 rows) at a time, keeping only its chosen rows
    np.testing.assert_array_equal(np.concatenate(read), rows)
    assert len(read) > 2 and max(len(r) for r in read) <= 37
    assert all(r[0] // 37 == r[-1] // 37 for r in read)
    np.testing.assert_array_equal(out["sample"].values, rows)
    np.testing.assert_array_equal(out["group"].values, labels[rows])

    full = arrays["conv"][rows].astype(np.float64)
    ref = PCA(10).fit(full)
    assert out.attrs["explained_variance"] == pytest.approx(ref.explained_variance_ratio_.sum(),
                                                            rel=1e-9)
    assert out.attrs["explained_variance"] > 0.999
    assert out.attrs["pca_method"] == "exact" and out.attrs["pca_components_used"] == 10
    assert out.attrs["params"] == {"samples_per_group": 150, "sampling": "random", "seed": 3,
                                   "pca_components": 10, "method": "pca"}
    # the 2-D PCA of the 10 components = the first 2 components of the full PCA
    want = ref.transform(full)[:, :2]
    got = out["xy"].values
    assert got.dtype == np.float64 and got.shape == (n, 2)
    for j in range(2):
        sign = np.sign(got[:, j] @ want[:, j])
        np.testing.assert_allclose(sign * got[:, j], want[:, j], rtol=1e-6,
                                   atol=1e-6 * np.abs(want).max())


def test_gram_pca_matches_sklearn(wide_store):
    from sklearn.decomposition import PCA

    _, arrays, _ = wide_store
    x = arrays["conv"][::2]
    with scratch_of(x, width=30) as scratch:
        assert len(scratch.slices) > 5
        reduced, explained = gram_pca(scratch, 12)
    ref = PCA(12).fit(x.astype(np.float64))
    assert explained == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-9)
    want = ref.transform(x.astype(np.float64))
    assert reduced.shape == want.shape and reduced.dtype == np.float64
    for j in range(8):  # the signal's components; the rest are noise
        c = abs(np.corrcoef(reduced[:, j], want[:, j])[0, 1])
        assert c > 0.99999
    assert subspace_gap(reduced[:, :8], want[:, :8]) < 1e-6
    big = np.abs(reduced).argmax(axis=0)
    assert np.all(reduced[big, np.arange(12)] > 0)  # deterministic signs


@hst.composite
def pca_case(draw):
    n, features = draw(hst.integers(3, 60)), draw(hst.integers(1, 300))
    k = draw(hst.integers(1, min(n - 1, features)))
    width = draw(hst.sampled_from([1, 7, 13, 64, 1000]))
    scale = draw(hst.sampled_from([1e-3, 1.0, 1e3]))
    rank = draw(hst.integers(1, min(n, features)))
    seed = draw(hst.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, features)) * scale
    x += rng.normal(size=(1, features)) * 3 * scale  # an offset the centring removes
    return x.astype(np.float32), k, width


@given(pca_case())
@settings(max_examples=150, deadline=None)
def test_gram_pca_spans_sklearns_subspace(case):
    from sklearn.decomposition import PCA

    x, k, width = case
    x64 = x.astype(np.float64)
    s = np.linalg.svd(x64 - x64.mean(axis=0), compute_uv=False)
    assume(s[k - 1] > 1e-3 * s[0])  # k components that hold variance
    assume(k == len(s) or s[k - 1] > 1.01 * s[k])  # and a k-th distinct from the next
    with scratch_of(x, width=width) as scratch:
        assert len(scratch.slices) == -(-x.shape[1] // min(width, x.shape[1]))
        scores, explained = gram_pca(scratch, k)
    ref = PCA(k, svd_solver="full").fit(x64)
    assert scores.shape == (len(x), k)
    assert subspace_gap(scores, ref.transform(x64)) < 1e-6
    assert explained == pytest.approx(ref.explained_variance_ratio_.sum(), abs=1e-8)


def test_randomized_pca_spans_the_exact_subspace():
    rng = np.random.default_rng(5)
    x = low_rank(rng, 500, 700, rank=12, noise=1e-2)
    with scratch_of(x, width=64) as scratch:
        exact, explained = gram_pca(scratch, 12)
        fast, fast_explained = randomized_pca(scratch, 12, seed=1)
        again, _ = randomized_pca(scratch, 12, seed=1)
    assert subspace_gap(fast, exact) < 1e-6
    assert fast_explained == pytest.approx(explained, rel=1e-9)
    np.testing.assert_array_equal(fast, again)  # seeded: the same scores
    for j in range(12):  # the same components, one by one (distinct singular values)
        np.testing.assert_allclose(fast[:, j], exact[:, j], atol=1e-6 * np.abs(exact).max())


def test_many_samples_take_the_randomized_route(wide_store, monkeypatch):
    path, arrays, labels = wide_store
    monkeypatch.setattr(projection, "EXACT_MAX_SAMPLES", 100)
    out = instance_projection(path, 150, "first", layers=["conv"], pca_components=10, method="pca",
                              progress=True)
    rows = choose_samples(labels, 150, "first")
    assert len(rows) > 100 and out["conv"].attrs["pca_method"] == "randomized"
    with scratch_of(arrays["conv"][rows]) as scratch:
        exact, explained = gram_pca(scratch, 10)
    assert out["conv"].attrs["explained_variance"] == pytest.approx(explained, rel=1e-9)
    assert subspace_gap(out["conv"]["xy"].values, exact[:, :2]) < 1e-6


def test_disk_scratch_equals_memory_and_leaves_nothing(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    x = low_rank(rng, 90, 257, rank=6, noise=0.1)
    with scratch_of(x, width=20, budget_mib=1e9) as memory:
        assert not memory.on_disk
        want, want_explained = gram_pca(memory, 9)
        blocks = [b.copy() for b in memory.blocks()]
    folder = tmp_path / "scratch"
    folder.mkdir()
    with scratch_of(x, width=20, budget_mib=0, folder=str(folder), pieces=7) as disk:
        assert disk.on_disk
        for got, b in zip(disk.blocks(), blocks, strict=True):
            np.testing.assert_array_equal(got, b)
        got, explained = gram_pca(disk, 9)
        fast, _ = randomized_pca(disk, 6)  # the signal's components (the rest: noise)
    np.testing.assert_array_equal(got, want)
    assert explained == want_explained
    assert subspace_gap(fast, want[:, :6]) < 1e-6
    assert list(folder.iterdir()) == []
    # through instance_projection, into the default folder, and when the PCA fails
    path = store_from_arrays(tmp_path / "d.zarr", {"w": x}, np.repeat(["a", "b"], 45), chunks=16)
    in_memory = instance_projection(path, 45, "first", pca_components=9, method="pca")["w"]
    monkeypatch.setattr(projection, "SCRATCH_DIR", str(folder))
    monkeypatch.setattr(projection, "SCRATCH_MIB", 0.0)
    on_disk = instance_projection(path, 45, "first", pca_components=9, method="pca",
                                  progress=True)["w"]
    np.testing.assert_array_equal(on_disk["xy"].values, in_memory["xy"].values)
    np.testing.assert_allclose(on_disk["xy"].values, projection.pca_2d(want), rtol=1e-9,
                               atol=1e-9 * np.abs(want).max())

    def broken(*args, **kwargs):
        assert len(os.listdir(folder)) <= 1  # (an unlinked file is not listed at all)
        raise MemoryError("no room")

    monkeypatch.setattr(projection, "gram_pca", broken)
    with pytest.raises(MemoryError, match="no room"):
        instance_projection(path, 45, "first", pca_components=9, method="pca")
    assert list(folder.iterdir()) == []


def test_reading_keeps_only_the_chosen_rows(tmp_path):
    import tracemalloc

    n, shape = 480, (20, 25, 40)  # 20,000 values a sample; the layer: 38 MB
    rng = np.random.default_rng(3)
    wide = rng.normal(size=(n, *shape)).astype(np.float32)
    labels = np.repeat(["a", "b", "c"], n // 3)
    path = store_from_arrays(tmp_path / "m.zarr", {"wide": wide}, labels, chunks=12)
    layer_bytes = wide.nbytes
    rows = choose_samples(labels, 3, "random", 0)
    data = inntrospect.open_store(path)["layers/wide"]["acts"].data
    tracemalloc.start()
    try:
        with Scratch(len(rows), 20_000) as scratch:
            projection.read_chosen(data, rows, scratch.put, False, "read")
            scores, _ = gram_pca(scratch, 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < layer_bytes / 10  # a chunk (12 rows, 1 MB) and the chosen rows, never the layer
    want = wide[rows].reshape(len(rows), -1).astype(np.float64)
    from sklearn.decomposition import PCA

    assert subspace_gap(scores, PCA(5, svd_solver="full").fit_transform(want)) < 1e-6


@needs_shared
def test_pca_of_the_mnist_cnn_store_equals_sklearn(cnn_store):
    import zarr
    from sklearn.decomposition import PCA

    tree = inntrospect.open_store(cnn_store)
    layers = tree.attrs["layers"]
    widest = max(layers, key=lambda k: np.prod(tree[f"layers/{k}"]["acts"].shape[1:]))
    labels = tree[f"layers/{widest}"]["group"].values.astype(object).astype(str)
    rows = choose_samples(labels, 30, "random", 0)
    plain = zarr.open_group(str(cnn_store), mode="r")[f"layers/{widest}/acts"][:]
    x = plain[rows].reshape(len(rows), -1).astype(np.float64)
    assert x.shape[1] > 1000
    out = instance_projection(cnn_store, 30, "random", 0, layers=[widest], method="pca")[widest]
    assert out.attrs["pca_method"] == "exact" and out.attrs["pca_components_used"] == 50
    ref = PCA(50, svd_solver="full").fit(x)
    assert out.attrs["explained_variance"] == pytest.approx(ref.explained_variance_ratio_.sum(),
                                                            rel=1e-9)
    want = ref.transform(x)
    assert subspace_gap(out["xy"].values, want[:, :2]) < 1e-6
    data = tree[f"layers/{widest}"]["acts"].data
    with Scratch(len(rows), x.shape[1]) as scratch:
        projection.read_chosen(data, rows, scratch.put, False, "read")
        scores, _ = gram_pca(scratch, 50)
    assert subspace_gap(scores, want) < 1e-6


def test_narrow_layers_and_no_pca_use_the_rows(wide_store):
    path, arrays, labels = wide_store
    out = instance_projection(path, 30, "first", method="pca", pca_components=50)
    assert list(out) == ["conv", "dense"]
    rows = choose_samples(labels, 30, "first")
    dense = out["dense"]
    assert dense.attrs["pca_components_used"] == 0 and dense.attrs["explained_variance"] == 1.0
    assert dense.attrs["pca_method"] == "none" and out["conv"].attrs["pca_method"] == "exact"
    np.testing.assert_allclose(np.abs(dense["xy"].values),
                               np.abs(projection.pca_2d(arrays["dense"][rows])), rtol=1e-9)
    assert out["conv"].attrs["pca_components_used"] == 50
    off = instance_projection(path, 30, "first", layers="conv", method="pca", pca_components=0)
    assert off["conv"].attrs["pca_components_used"] == 0 and off["conv"].attrs["pca_method"] == "none"
    np.testing.assert_allclose(np.abs(off["conv"]["xy"].values),
                               np.abs(projection.pca_2d(arrays["conv"][rows])), rtol=1e-6)


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
        assert ds.attrs["pca_method"] == done[layer].attrs["pca_method"]
        assert ds.attrs["params"] == done[layer].attrs["params"]
    assert loaded["dense"].attrs["pca_components_used"] == 0
    with pytest.raises(StoreError, match="pass its path"):
        instance_projection(inntrospect.open_store(path), persist=True)


def test_projections_computed_elsewhere_are_persisted_as_if_persisted_at_once(wide_store, tmp_path):
    """What the pipeline does: compute in another process, store afterwards; refused once re-extracted."""
    import shutil

    from inntrospect.analysis.projection import persist_projection

    path = tmp_path / "copy.zarr"
    shutil.copytree(wide_store[0], path)
    direct = instance_projection(wide_store[0], 20, "first", pca_components=10, method="pca")
    stored = persist_projection(path, instance_projection(path, 20, "first", pca_components=10,
                                                          method="pca"))
    loaded = inntrospect.load(path, "projection")
    rec = inntrospect.store.store_attrs(path)["steps"]["projection"]
    assert rec["params"] == direct["conv"].attrs["params"] and list(loaded) == ["conv", "dense"]
    for layer in direct:
        np.testing.assert_array_equal(loaded[layer]["xy"].values, direct[layer]["xy"].values)
        assert stored[layer].attrs["id"] == rec["id"]
    late = instance_projection(path, 20, "first", pca_components=10, method="pca")
    extraction = dict(inntrospect.store.store_attrs(path)["extraction"], id="another-extraction")
    inntrospect.store.update_attrs(path, extraction=extraction)
    with pytest.raises(inntrospect.StaleResultError, match="inntrospect project"):
        persist_projection(path, late)


def test_an_opened_tree_works(wide_store):
    path = wide_store[0]
    a = instance_projection(inntrospect.open_store(path), 10, "first", layers=["dense"], method="pca")
    b = instance_projection(path, 10, "first", layers=["dense"], method="pca")
    np.testing.assert_array_equal(a["dense"]["xy"].values, b["dense"]["xy"].values)


def test_errors(wide_store, tmp_path):
    path = wide_store[0]
    with pytest.raises(LayerNotFoundError, match="'nope'.*the layers are: conv, dense"):
        instance_projection(path, layers=["conv", "nope"], method="pca")
    with pytest.raises(ValueError, match="unknown sampling 'last'; choose one of 'random', 'first'"):
        instance_projection(path, sampling="last")
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="samples_per_group must be a positive integer"):
            instance_projection(path, samples_per_group=bad)
    with pytest.raises(ValueError, match="unknown method .*; choose one of 'umap', 'pca'"):
        instance_projection(path, method="tsne")
    with pytest.raises(ValueError, match="pca_components"):
        instance_projection(path, pca_components=-1)
    import zarr

    bad = tmp_path / "incomplete.zarr"
    store_from_arrays(bad, {"d": np.ones((4, 2))}, ["a"] * 4)
    zarr.open_group(str(bad), mode="r+").attrs["extraction"] = {"state": "incomplete", "id": "x"}
    with pytest.raises(IncompleteStoreError):
        instance_projection(bad, method="pca")
