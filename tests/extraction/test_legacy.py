"""Importing the reference toolbox's processed-corpus folder (inntrospect.extraction.legacy)."""

from __future__ import annotations

import json
import tracemalloc
import weakref
from pathlib import Path

import numpy as np
import pytest

import inntrospect
from inntrospect.analysis.alignment import align_reference
from inntrospect.errors import (
    ConfigError,
    CorpusError,
    IncompleteStoreError,
    NonFiniteError,
    StoreError,
    StoreLockedError,
)
from inntrospect.extraction import legacy
from inntrospect.store import store_attrs, writer_lock
from inntrospect.store.info import describe_store

from ..conftest import needs_shared

SHAPES = {"layer000": (6, 5, 3), "layer001": (4, 4, 2), "layer002": (7,)}  # 2 spatial, 1 dense
# group -> files in json order (not sorted, to check the json order is kept), rows per file
GROUPS = {"zeta": [("z_b.npy", 5), ("z_a.npy", 3)],
          "alpha": [("a_0.npy", 7), ("a_1.npy", 1), ("a_2.npy", 4)],
          "mid": [("m_0.npy", 9)]}


def write_folder(out: Path, groups=GROUPS, shapes=SHAPES, grads_for=("layer000", "layer001"),
                 seed=0) -> dict:
    """A folder in the reference layout; returns {(var, layer): {file: array}}."""
    rng = np.random.default_rng(seed)
    arrays: dict = {}
    for layer, shape in shapes.items():
        for var in ("acts", "grads") if layer in grads_for else ("acts",):
            d = out / var / layer
            d.mkdir(parents=True, exist_ok=True)
            for files in groups.values():
                for f, n in files:
                    a = rng.standard_normal((n, *shape)).astype(np.float32)
                    np.save(d / f, a)
                    arrays.setdefault((var, layer), {})[f] = a
    names = list(groups)
    (out / "group_name_to_files.json").write_text(json.dumps({g: [f for f, _ in v] for g, v in groups.items()}))
    (out / "group_name_to_index.json").write_text(json.dumps({g: i for i, g in enumerate(names)}))
    (out / "index_to_group_name.json").write_text(json.dumps({str(i): g for i, g in enumerate(names)}))
    return arrays


def ordered(arrays, var, layer, groups=GROUPS):
    """The documented order: sorted groups, json file order, rows."""
    return np.concatenate([arrays[(var, layer)][f] for g in sorted(groups) for f, _ in groups[g]])


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("legacy")
    arrays = write_folder(root / "corpus")
    path = legacy.import_legacy(root / "corpus", root / "s.zarr", chunk_mib=0.002)
    return root, arrays, path


def test_arrays_and_sample_table_in_documented_order(imported):
    root, arrays, path = imported
    tree = inntrospect.open_store(path)
    attrs = store_attrs(path)
    assert attrs["layers"] == list(SHAPES)
    assert attrs["extraction"]["state"] == "complete"
    assert attrs["model"]["framework"] == "legacy"
    assert attrs["corpus"]["n_samples"] == 29 and attrs["corpus"]["groups"] == ["alpha", "mid", "zeta"]
    assert attrs["corpus"]["has_target"] is False
    for layer in SHAPES:
        node = tree[f"layers/{layer}"]
        np.testing.assert_array_equal(node.acts.values, ordered(arrays, "acts", layer))
        assert ("grads" in node) == (layer != "layer002")
        if layer != "layer002":
            np.testing.assert_array_equal(node.grads.values, ordered(arrays, "grads", layer))
        assert node.acts.data.chunks[0][0] == min(29, attrs["chunks"][layer])
    node = tree["layers/layer000"]
    assert node.acts.dims == ("sample", "y", "x", "unit")
    assert tree["layers/layer002"].acts.dims == ("sample", "unit")
    exp_files = [f for g in sorted(GROUPS) for f, n in GROUPS[g] for _ in range(n)]
    exp_index = [i for g in sorted(GROUPS) for _, n in GROUPS[g] for i in range(n)]
    exp_group = [g for g in sorted(GROUPS) for _, n in GROUPS[g] for _ in range(n)]
    assert [str(v) for v in node.file.values] == exp_files
    assert node.index_in_file.values.tolist() == exp_index
    assert [str(v) for v in node.group.values] == exp_group
    assert (node.target.values == -1).all() and (node.prediction.values == -1).all()
    # several chunks per layer, so the chunked writes are exercised
    assert all(attrs["chunks"][k] < 29 for k in ("layer000", "layer001"))


def test_naps_equal_per_group_means_of_the_files(imported):
    _, arrays, path = imported
    naps = inntrospect.naps(path)
    for layer in SHAPES:
        nap = naps[layer].nap.compute()
        assert [str(g) for g in nap.group.values] == sorted(GROUPS)
        for g in GROUPS:
            ref = np.concatenate([arrays[("acts", layer)][f] for f, _ in GROUPS[g]]).astype(np.float64).mean(0)
            np.testing.assert_allclose(nap.sel(group=g).values, ref, rtol=1e-6, atol=1e-7)
        assert naps[layer]["count"].values.tolist() == [12, 9, 8]


def test_aligned_naps_equal_reference_alignment(imported):
    _, arrays, path = imported
    naps = inntrospect.naps(path, aligned=True)
    for layer in SHAPES:
        nap = naps[layer].nap.compute()
        for g in GROUPS:
            acts = np.concatenate([arrays[("acts", layer)][f] for f, _ in GROUPS[g]])
            if layer == "layer002":  # dense: raw activations
                ref = acts.astype(np.float64).mean(0)
            else:
                grads = np.concatenate([arrays[("grads", layer)][f] for f, _ in GROUPS[g]])
                ref = align_reference(acts, grads).astype(np.float64).mean(0)
            np.testing.assert_allclose(nap.sel(group=g).values, ref, rtol=1e-6, atol=1e-7)


def test_contrastive_naps_and_info_work(imported):
    _, _, path = imported
    inntrospect.naps(path, persist=True)
    c = inntrospect.contrastive_naps(path)
    assert set(c) == set(SHAPES)
    assert np.isfinite(c["layer000"].nap.compute().values).all()
    text = describe_store(path)
    assert "legacy" in text and "layer001" in text and "alpha (12)" in text and "complete" in text


def test_layer_names_mapping_and_list(tmp_path):
    write_folder(tmp_path / "c")
    p = legacy.import_legacy(tmp_path / "c", tmp_path / "a.zarr", {"layer000": "conv", "layer002": "dense"})
    assert store_attrs(p)["layers"] == ["conv", "layer001", "dense"]
    assert set(inntrospect.naps(p)) == {"conv", "layer001", "dense"}
    assert store_attrs(p)["corpus"]["legacy_layers"]["conv"] == "layer000"
    p = legacy.import_legacy(tmp_path / "c", tmp_path / "b.zarr", ["a", "b", "c"])
    assert store_attrs(p)["layers"] == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="layer007"):
        legacy.import_legacy(tmp_path / "c", tmp_path / "x.zarr", {"layer007": "x"})
    with pytest.raises(ConfigError, match="one name per folder"):
        legacy.import_legacy(tmp_path / "c", tmp_path / "x.zarr", ["a"])
    with pytest.raises(ConfigError, match="duplicates"):
        legacy.import_legacy(tmp_path / "c", tmp_path / "x.zarr", ["a", "a", "b"])


# -- streaming ------------------------------------------------------------------
def test_one_batch_file_per_array_at_a_time(tmp_path, monkeypatch):
    write_folder(tmp_path / "c")
    real = legacy.read_rows
    alive: dict = {}
    peak: dict = {}
    calls = []

    def spy(p):
        a = real(p)
        key = (p.parent.parent.name, p.parent.name)  # (var, layer)
        calls.append((key, p.name))
        alive[key] = alive.get(key, 0) + 1
        peak[key] = max(peak.get(key, 0), alive[key])

        def gone(k=key):
            alive[k] -= 1

        weakref.finalize(a, gone)
        return a

    monkeypatch.setattr(legacy, "read_rows", spy)
    monkeypatch.setattr(legacy, "choose_legacy_codecs", lambda lf, plan: {
        lay.name: {v: None for v in (("acts", "grads") if lay.has_grads else ("acts",))}
        for lay in lf.layers})
    legacy.import_legacy(tmp_path / "c", tmp_path / "s.zarr", chunk_mib=0.002)
    assert len(peak) == 5 and max(peak.values()) == 1
    # each batch file read once per array, in sample order
    files = [f for g in sorted(GROUPS) for f, _ in GROUPS[g]]
    assert [name for k, name in calls if k == ("acts", "layer001")] == files
    assert len(calls) == 5 * len(files)


def test_peak_memory_bounded(tmp_path):
    shapes = {"layer000": (16, 16, 16), "layer001": (64,)}  # 16 kB per sample in layer000
    groups = {g: [(f"{g}_{i}.npy", 40) for i in range(3)] for g in "abc"}  # 360 samples, ~12 MB
    arrays = write_folder(tmp_path / "c", groups=groups, shapes=shapes, grads_for=("layer000",))
    total = sum(a.nbytes for v in arrays.values() for a in v.values())
    del arrays
    tracemalloc.start()
    try:
        legacy.import_legacy(tmp_path / "c", tmp_path / "s.zarr", chunk_mib=0.125)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 10e6
    assert peak < total / 8, (peak, total)
    nap = inntrospect.naps(tmp_path / "s.zarr")["layer000"].nap.compute()
    ref = np.concatenate([np.load(tmp_path / "c/acts/layer000" / f) for f, _ in groups["b"]]).mean(0)
    np.testing.assert_allclose(nap.sel(group="b").values, ref, rtol=1e-5, atol=1e-6)


# -- errors -----------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    write_folder(tmp_path / "c", seed=1)
    return tmp_path / "c"


def test_missing_folder(tmp_path):
    with pytest.raises(CorpusError, match="not found.*acts/layerNNN"):
        legacy.import_legacy(tmp_path / "nope", tmp_path / "s.zarr")


@pytest.mark.parametrize("name", ["group_name_to_files.json", "group_name_to_index.json",
                                  "index_to_group_name.json"])
def test_missing_json(folder, tmp_path, name):
    (folder / name).unlink()
    with pytest.raises(CorpusError, match=name.replace(".", r"\.") + ".*not found"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_listed_file_missing(folder, tmp_path):
    (folder / "grads/layer001/m_0.npy").unlink()
    with pytest.raises(CorpusError, match=r"'m_0\.npy' of group 'mid'.*missing.*grads/layer001"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_files_of_a_layer_disagree_in_shape(folder, tmp_path):
    np.save(folder / "acts/layer001/a_1.npy", np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(CorpusError, match=r"layer folder acts/layer001.*\(4, 4, 2\).*a_1\.npy has \(4, 4, 3\)"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_acts_and_grads_differ_in_shape(folder, tmp_path):
    for f, n in GROUPS["mid"]:
        np.save(folder / "grads/layer000" / f, np.zeros((n, 6, 5, 4), np.float32))
    with pytest.raises(CorpusError, match=r"acts and grads of layer000.*\(6, 5, 3\).*\(6, 5, 4\)"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_sample_counts_differ_between_layers(folder, tmp_path):
    np.save(folder / "acts/layer002/z_a.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(CorpusError, match=r"'z_a\.npy' holds 2 samples in acts/layer002 but 3"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_group_in_index_json_not_in_files_json(folder, tmp_path):
    g2i = json.loads((folder / "group_name_to_index.json").read_text())
    (folder / "group_name_to_index.json").write_text(json.dumps({**g2i, "ghost": 3}))
    with pytest.raises(CorpusError, match=r"group_name_to_index\.json names groups \['ghost'\]"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_file_in_two_groups(folder, tmp_path):
    g2f = json.loads((folder / "group_name_to_files.json").read_text())
    g2f["mid"].append("a_0.npy")
    (folder / "group_name_to_files.json").write_text(json.dumps(g2f))
    with pytest.raises(CorpusError, match=r"'a_0\.npy' is listed under groups 'alpha' and 'mid'"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_non_finite(folder, tmp_path):
    a = np.load(folder / "grads/layer001/z_a.npy")
    a[2, 1, 1, 0] = np.nan
    np.save(folder / "grads/layer001/z_a.npy", a)
    with pytest.raises(NonFiniteError, match=r"grads/layer001/z_a\.npy row 2 contains NaN"):
        legacy.import_legacy(folder, tmp_path / "s.zarr")
    with pytest.raises(IncompleteStoreError):
        inntrospect.open_store(tmp_path / "s.zarr")


def test_existing_store_needs_overwrite(folder, tmp_path):
    p = legacy.import_legacy(folder, tmp_path / "s.zarr")
    first = store_attrs(p)["extraction"]["id"]
    with pytest.raises(StoreError, match="already exists.*overwrite=True"):
        legacy.import_legacy(folder, p)
    legacy.import_legacy(folder, p, overwrite=True)
    assert store_attrs(p)["extraction"]["id"] != first
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(StoreError, match="not a store"):
        legacy.import_legacy(folder, other)
    assert (other / "keep.txt").exists()


def test_store_locked(folder, tmp_path):
    with writer_lock(tmp_path / "s.zarr"):
        with pytest.raises(StoreLockedError, match="another process"):
            legacy.import_legacy(folder, tmp_path / "s.zarr")


def test_interrupted_import_is_incomplete(folder, tmp_path, monkeypatch):
    real, calls = legacy.ChunkStream.push, []

    def failing(self, rows, file):
        calls.append(file)
        if len(calls) == 20:  # the 4th of 8 batch files
            raise KeyboardInterrupt
        return real(self, rows, file)

    monkeypatch.setattr(legacy.ChunkStream, "push", failing)
    with pytest.raises(KeyboardInterrupt):
        legacy.import_legacy(folder, tmp_path / "s.zarr", chunk_mib=0.002)
    assert store_attrs(tmp_path / "s.zarr")["extraction"]["state"] == "incomplete"
    with pytest.raises(IncompleteStoreError):
        inntrospect.open_store(tmp_path / "s.zarr")
    with pytest.raises(IncompleteStoreError):
        inntrospect.naps(tmp_path / "s.zarr")
    assert "incomplete" in describe_store(tmp_path / "s.zarr")
    monkeypatch.setattr(legacy.ChunkStream, "push", real)
    legacy.import_legacy(folder, tmp_path / "s.zarr", chunk_mib=0.002, overwrite=True)
    assert inntrospect.open_store(tmp_path / "s.zarr") is not None


# -- round trip through a real extraction -----------------------------------------
@needs_shared
def test_real_extraction_round_trip(cnn_store, tmp_path):
    tree = inntrospect.open_store(cnn_store)
    attrs = store_attrs(cnn_store)
    layers = attrs["layers"]
    out = tmp_path / "legacy"
    first = tree[f"layers/{layers[0]}"]
    groups = np.array([str(g) for g in first.group.values])
    files = np.array([str(f) for f in first.file.values])
    values = {(layer, var): tree[f"layers/{layer}"][var].values
              for layer in layers for var in ("acts", "grads") if var in tree[f"layers/{layer}"]}
    g2f: dict = {}
    for g in sorted(set(groups)):  # per group batch files of that group's samples
        idx = np.flatnonzero(groups == g)
        names = []
        for k, lo in enumerate(range(0, len(idx), 23)):
            part = idx[lo : lo + 23]
            name = f"{g}_{k:03d}.npy"
            names.append(name)
            for i, layer in enumerate(layers):
                for var in ("acts", "grads"):
                    if (layer, var) in values:
                        d = out / var / f"layer{i:03d}"
                        d.mkdir(parents=True, exist_ok=True)
                        np.save(d / name, values[(layer, var)][part])
        g2f[g] = names
    (out / "group_name_to_files.json").write_text(json.dumps(g2f))
    (out / "group_name_to_index.json").write_text(json.dumps({g: i for i, g in enumerate(g2f)}))
    (out / "index_to_group_name.json").write_text(json.dumps({str(i): g for i, g in enumerate(g2f)}))
    assert len(files) == attrs["corpus"]["n_samples"]

    p = legacy.import_legacy(out, tmp_path / "imp.zarr", layers, chunk_mib=1)
    assert store_attrs(p)["layers"] == layers
    for aligned in (False, True):
        want = inntrospect.naps(cnn_store, aligned=aligned)
        got = inntrospect.naps(p, aligned=aligned)
        for layer in layers:
            np.testing.assert_allclose(got[layer].nap.values, want[layer].nap.values, rtol=1e-6, atol=1e-6)
            assert got[layer]["count"].values.tolist() == want[layer]["count"].values.tolist()
    # the chunk plan follows extraction's rules (codecs are probed on other samples, so may differ)
    assert store_attrs(p)["chunks"] == attrs["chunks"]
    assert set(store_attrs(p)["codecs"]["conv2d_24"]) == {"acts", "grads"}


def test_import_from_the_command_line(folder, tmp_path, capsys):
    from inntrospect.cli import main

    store = tmp_path / "cli.zarr"
    assert main(["import-legacy", str(folder), str(store), "--layer-names", '["a", "b", "c"]',
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "legacy" in out and "complete" in out
    assert inntrospect.open_store(store).attrs["layers"] == ["a", "b", "c"]
    assert main(["import-legacy", str(folder), str(store), "--no-progress"]) == 2
    assert "overwrite" in capsys.readouterr().err
