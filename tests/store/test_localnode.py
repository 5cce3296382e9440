"""Result nodes written straight to their files are what ``Dataset.to_zarr`` writes, file for file.

:func:`inntrospect.store.localnode.write_local` replaces xarray and Zarr for
the small result nodes on a local disk. Each case writes the same Dataset
both ways, with the encoding ``write_node`` gives, and compares: the same
files, the same ``zarr.json`` documents, the same chunk bytes, and the same
Dataset read back by plain xarray.
"""

from __future__ import annotations

import json
import os

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

import inntrospect
from inntrospect.store import localnode, nodes
from inntrospect.testing import store_from_arrays


def _both(tmp_path, ds, name="naps.next/conv"):
    """Write ``ds`` through xarray (``a``) and directly (``b``); the two stores' folders."""
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    for root in (a, b):
        zarr.open_group(str(root), mode="w", zarr_format=3)
    text = {k: v.astype(object) for k, v in ds.variables.items() if v.dtype.kind == "U"}
    ds = ds.assign_coords({k: v for k, v in text.items() if k in ds.coords}).assign(
        {k: v for k, v in text.items() if k not in ds.coords})
    encoding = nodes.result_encoding(ds)
    ds.to_zarr(str(a), group=name, mode="w", zarr_format=3, consolidated=False, encoding=encoding)
    assert localnode.write_local(str(b), name, ds, encoding)
    return a, b


def _files(root) -> dict:
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = os.path.join(folder, f)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def same_files(a, b) -> None:
    """The same files in both folders: ``zarr.json`` documents equal as JSON, other files byte for byte."""
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        if key.endswith("zarr.json"):
            assert json.loads(fa[key]) == json.loads(fb[key]), key
        else:
            assert fa[key] == fb[key], key


def assert_same_files(a, b, name="naps.next/conv"):
    same_files(a, b)
    xr.testing.assert_identical(xr.open_dataset(a, group=name, engine="zarr", consolidated=False).load(),
                                xr.open_dataset(b, group=name, engine="zarr", consolidated=False).load())


DTYPES = [np.float64, np.float32, np.int64, np.int32, np.uint8, np.bool_]


@hs.composite
def datasets(draw):
    groups = draw(hs.integers(1, 4))
    units = draw(hs.integers(1, 7))
    spatial = draw(hs.sampled_from([(), (2,), (3, 2)]))
    dims = ("group", *("yx"[: len(spatial)]), "unit")
    shape = (groups, *spatial, units)
    variables = {}
    for i in range(draw(hs.integers(1, 3))):
        dtype = draw(hs.sampled_from(DTYPES))
        elements = hs.floats(allow_nan=True, allow_infinity=True, width=32) if np.dtype(dtype).kind == "f" \
            else None
        data = draw(hnp.arrays(dtype, shape, elements=elements))
        if draw(hs.booleans()):  # a group all fill: Zarr leaves such chunks out
            data[0] = np.nan if np.dtype(dtype).kind == "f" else 0
        raw = {"compressors": None} if draw(hs.booleans()) else {}  # stored without zstd, as the statistics
        variables[f"v{i}"] = (dims, data, {}, raw)
    variables["count"] = ("group", draw(hnp.arrays(np.int64, groups)))
    labels = draw(hs.lists(hs.text(hs.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=3),
                           min_size=groups, max_size=groups, unique=True))
    variables["label"] = ("group", np.array(labels, dtype=object))
    attrs = {"step": "naps", "params": {"k": draw(hs.integers(0, 9)), "names": ["a", "b"]}, "x": None}
    return xr.Dataset(variables, coords={"group": np.arange(groups), "unit": np.arange(units)}, attrs=attrs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ds=datasets(), per_group=hs.booleans())
def test_random_nodes_are_written_as_to_zarr_writes_them(tmp_path_factory, monkeypatch, ds, per_group):
    monkeypatch.setattr(nodes, "GROUP_CHUNK_BYTES", 1 if per_group else 1 << 20)  # one group a chunk, or one chunk
    a, b = _both(tmp_path_factory.mktemp("node"), ds)
    assert_same_files(a, b)


def test_the_steps_results_are_written_as_to_zarr_writes_them(tmp_path):
    """NAPs with std, contrasts with statistics, exemplars: each layer's node, both ways."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.standard_normal((60, 3, 3, 5)), 0).astype(np.float32)
    store = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, rng.choice(list("abc"), 60),
                              chunks=16)
    results = {"naps": inntrospect.naps(store, std=True, persist=True),
               "contrast": inntrospect.contrastive_naps(store, persist=True),
               "exemplars": inntrospect.exemplars(store, k=3, persist=True)}
    for step, per_layer in results.items():
        for layer in ("conv", "dense"):
            ds = inntrospect.load(store, step)[layer].load() if step != "exemplars" else per_layer[layer]
            out = tmp_path / f"{step}-{layer}"
            out.mkdir()
            a, b = _both(out, ds, f"{step}/{layer}")
            assert_same_files(a, b, f"{step}/{layer}")
    assert "q" in results["contrast"]["conv"]


@pytest.mark.parametrize("case", ["non-index coordinate", "datetime", "empty", "scalar"])
def test_what_it_does_not_cover_goes_through_xarray(tmp_path, case):
    base = xr.Dataset({"v": (("group", "unit"), np.ones((2, 3)))}, coords={"group": ["a", "b"]})
    ds = {"non-index coordinate": base.assign_coords(size=("group", [1, 2])),
          "datetime": base.assign(when=("group", np.array(["2026-01-01", "2026-01-02"], "datetime64[ns]"))),
          "empty": base.assign(none=("empty", np.zeros(0))),
          "scalar": base.assign(one=((), 1.0))}[case]
    assert not localnode.can_write(ds)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    nodes.write_node(tmp_path / "s.zarr", "naps/conv", ds)  # through to_zarr
    back = xr.open_dataset(tmp_path / "s.zarr", group="naps/conv", engine="zarr").load()
    xr.testing.assert_identical(back.drop_encoding(), ds.drop_encoding())


def test_a_node_replaces_the_old_one_and_makes_missing_parents(tmp_path):
    root = tmp_path / "s.zarr"
    zarr.open_group(str(root), mode="w", zarr_format=3)
    old = xr.Dataset({"old": ("unit", np.arange(4.0))})
    new = xr.Dataset({"new": ("unit", np.arange(3.0))})
    nodes.write_node(root, "a/b/c", old)
    nodes.write_node(root, "a/b/c", new)
    back = xr.open_datatree(root, engine="zarr")
    assert list(back["a/b/c"].to_dataset().data_vars) == ["new"]
    np.testing.assert_array_equal(back["a/b/c"]["new"].values, np.arange(3.0))


# -- the root's zarr.json, and nodes read back ---------------------------------------------------
def _consolidated(root) -> dict:
    return json.loads((root / "zarr.json").read_text())["consolidated_metadata"]["metadata"]


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_an_incremental_consolidation_equals_zarrs(tmp_path):
    """After steps replace their nodes, the root's consolidated metadata is what a full
    ``zarr.consolidate_metadata`` gives; root attributes written directly keep it."""
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((40, 2, 2, 3)), 0).astype(np.float32)
    store = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, rng.choice(list("ab"), 40),
                              chunks=16)
    inntrospect.naps(store, std=True, persist=True)
    inntrospect.contrastive_naps(store, persist=True)
    inntrospect.naps(store, persist=True)  # replaces naps/ (no std now); contrast/ stays
    ours = _consolidated(store)
    assert "naps/conv/std" not in ours and "naps/conv/nap" in ours and "contrast/conv/q" in ours
    assert not any(k.startswith(("naps.next", "naps.old")) for k in ours)
    nodes.update_attrs(store, extra={"a": [1, 2]})
    assert _consolidated(store) == ours
    assert inntrospect.store.store_attrs(store)["extra"] == {"a": [1, 2]}
    zarr.consolidate_metadata(str(store))
    assert _consolidated(store) == ours
    assert list(_consolidated(store)) == list(ours)  # Zarr's order too: it nests the entries in order


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_every_node_opens_through_the_consolidated_metadata_after_steps(tmp_path):
    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((40, 2, 2, 3)), 0).astype(np.float32)
    g = rng.standard_normal((40, 2, 2, 3)).astype(np.float32)
    store = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, rng.choice(list("ab"), 40),
                              grads={"conv": g}, chunks=16)
    inntrospect.align(store, persist=True)  # aligned arrays join the layer nodes, after the other layer's
    inntrospect.naps(store, aligned=True, persist=True)
    root = zarr.open_group(str(store), mode="r")  # consolidated: no listing
    assert root.metadata.consolidated_metadata is not None
    for key in _consolidated(store):
        assert root[key] is not None
    assert {"layers/conv/acts", "layers/conv/aligned", "layers/dense/acts", "naps/conv/nap"} <= set(_consolidated(store))
    assert not list(store.glob(".zarr.json.*"))  # the replacement file was renamed into place


def test_nodes_read_back_straight_from_their_files_equal_zarrs(tmp_path):
    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((50, 3, 2, 4)), 0).astype(np.float32)
    store = store_from_arrays(tmp_path / "s.zarr", {"conv": x}, rng.choice(list("abc"), 50), chunks=16)
    inntrospect.naps(store, std=True, persist=True)
    inntrospect.exemplars(store, k=2, persist=True)
    for name in ("naps/conv", "exemplars/conv"):
        arrays, attrs = localnode.read_local(str(store), name)
        group = zarr.open_group(str(store), path=name, mode="r")
        assert attrs == dict(group.attrs)
        assert sorted(arrays) == sorted(k for k, _ in group.arrays())
        for key, arr in group.arrays():
            np.testing.assert_array_equal(arrays[key], arr[...])
            assert arrays[key].dtype == arr[...].dtype or arrays[key].dtype == object
    assert localnode.read_local(str(store), "naps/none") == ({}, None)
    # a damaged chunk: not read here (None), so Zarr's read raises its error
    chunk = store / "naps" / "conv" / "nap" / "c.0.0.0.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert localnode.read_local(str(store), "naps/conv") is None
    assert localnode.read_array(str(store / "naps" / "conv" / "nap")) is None


def test_the_group_codes_are_decoded_once_for_layers_with_the_same_table(tmp_path, monkeypatch):
    from inntrospect.analysis import nap_kernels, profiles

    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 5)).astype(np.float32)
    labels = rng.choice(list("xyz"), 30)
    store = store_from_arrays(tmp_path / "s.zarr", {"a": x, "b": 2 * x, "c": 3 * x}, labels, chunks=8)
    calls = []
    real = nap_kernels.group_codes
    monkeypatch.setattr(profiles, "group_codes", lambda v: calls.append(1) or real(v))
    result = inntrospect.naps(store)
    assert len(calls) == 1  # one table, three layers
    for layer, scale in zip("abc", (1, 2, 3)):
        for g in "xyz":
            np.testing.assert_allclose(result[layer]["nap"].sel(group=g).values,
                                       (scale * x[labels == g]).astype(np.float64).mean(0), rtol=1e-12)


def test_nodes_of_older_stores_read_back_too(tmp_path):
    """Written before 2026-11-28: zstd level 3, one group per chunk, chunk keys c/0/0."""
    from inntrospect.store import zarr_codecs

    ds = xr.Dataset({"nap": (("group", "unit"), np.arange(12.0).reshape(3, 4)), "count": ("group", [1, 0, 2])},
                    coords={"group": np.array(["a", "b", "c"], dtype=object)}, attrs={"id": "x"})
    encoding = {k: {"compressors": zarr_codecs({"name": "zstd", "level": 3})} for k in ds.variables}
    encoding["nap"]["chunks"] = (1, 4)
    zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    ds.to_zarr(str(tmp_path / "s.zarr"), group="naps/l", mode="w", zarr_format=3, consolidated=False,
               encoding=encoding)
    assert (tmp_path / "s.zarr" / "naps" / "l" / "nap" / "c" / "2" / "0").is_file()
    arrays, attrs = localnode.read_local(str(tmp_path / "s.zarr"), "naps/l")
    assert attrs == {"id": "x"}
    np.testing.assert_array_equal(arrays["nap"], ds["nap"].values)
    np.testing.assert_array_equal(arrays["count"], ds["count"].values)
    assert list(arrays["group"]) == ["a", "b", "c"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hs.integers(0, 30), hs.lists(hs.sampled_from([(1,), (3,), (2, 3), (2, 2, 3)]), min_size=1, max_size=3),
       hs.booleans(), hs.sampled_from([None, {"name": "zstd", "level": 1}]), hs.integers(1, 8))
def test_a_new_store_is_written_as_zarr_writes_it(tmp_path, n, shapes, grads, codec, chunk):
    """``create_store`` on a local disk writes every file itself: the same files, ``zarr.json``
    documents and sample-table chunks as through Zarr (object storage's path), and both open alike."""
    import shutil

    from inntrospect import store as st

    rng = np.random.default_rng(n)
    layers = [st.LayerSpec(f"block{i % 2}/layer{i}" if i else "layer0", shape, grads)
              for i, shape in enumerate(shapes)]
    plan = st.ChunkPlan({s.name: chunk for s in layers}, chunk, 0.0)
    attrs = st.new_extraction(st.root_attrs(
        model={"framework": "arrays", "path": None, "sha256": None},
        corpus={"path": None, "n_samples": n, "n_files": 0}, layers=layers, plan=plan, n_samples=n,
        gradient_target=None,
        codecs={s.name: {v: codec for v in (("acts", "grads") if grads else ("acts",))} for s in layers}))
    table = {"group": rng.choice(["cat", "dog", "é"], n), "file": np.array([f"f{i % 3}.npy" if i % 4 else ""
                                                                            for i in range(n)]),
             "index_in_file": np.arange(n), "target": rng.integers(-1, 3, n)}
    a, b = tmp_path / "zarr.zarr", tmp_path / "direct.zarr"
    for root in (a, b):
        shutil.rmtree(root, ignore_errors=True)
    st.create_store(a, attrs, layers, plan, table, via_zarr=True)
    b.mkdir()
    (b / "leftover").write_text("replaced, as Zarr's mode 'w' replaces it")
    st.create_store(b, attrs, layers, plan, table)
    same_files(a, b)
    for layer in layers:
        for var in ("group", "file", "prediction", "acts"):
            za, zb = st.open_array(a, layer.name, var), st.open_array(b, layer.name, var)
            np.testing.assert_array_equal(za[...], zb[...])
    xr.testing.assert_identical(xr.open_zarr(b, group=f"layers/{layers[0].name}").load(),
                                xr.open_zarr(a, group=f"layers/{layers[0].name}").load())
