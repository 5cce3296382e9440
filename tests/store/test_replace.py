"""A rerun replaces a step's results, never deletes them first (no TensorFlow).

A step writes its new nodes beside the old ones (``<node>.next``) and swaps them
in only when all are written: a rerun that fails part way (a damaged chunk, a
full disk) leaves the previous results readable, equal and current; a crash
between the swap and the record leaves results refused as stale; leftovers of
a killed run are ignored by readers and deleted by the next run. On real
stores on disk, and one on S3 (moto).
"""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import inntrospect
from inntrospect import store as st
from inntrospect.errors import InntrospectError, StaleResultError
from inntrospect.store import steps
from inntrospect.store.info import describe_store
from inntrospect.testing import store_from_arrays

LAYERS = ["conv1", "conv2", "dense", "out"]
ZSTD = {"name": "zstd", "level": 1}
#: what reading a damaged chunk raises (an inntrospect error naming it, or the codec's own)
DAMAGED = (InntrospectError, RuntimeError, ValueError)


class Injected(Exception):
    """A failure injected into a run."""


def make_store(path):
    """4 layers (2 with spatial axes and gradients), 48 samples in 3 groups, chunks of 8, zstd."""
    rng = np.random.default_rng(7)
    n = 48
    acts = {"conv1": rng.random((n, 5, 5, 16)), "conv2": rng.random((n, 3, 3, 20)),
            "dense": rng.random((n, 24)), "out": rng.random((n, 5))}
    grads = {k: rng.standard_normal(v.shape) for k, v in acts.items() if k != "out"}
    return store_from_arrays(path, acts, np.repeat(["a", "b", "c"], n // 3), grads=grads, chunks=8,
                             codec=ZSTD)


@pytest.fixture
def path(tmp_path):
    return make_store(tmp_path / "run.zarr")


def damage_chunk(path, layer: str, var: str = "acts", chunk: int = 2) -> None:
    """Overwrite one stored chunk of ``layers/<layer>/<var>`` with bytes that do not decode."""
    files = sorted((path / "layers" / layer / var / "c" / str(chunk)).rglob("*"))
    (f,) = [f for f in files if f.is_file()]
    f.write_bytes(b"not a zstd frame" * 8)


def snapshot(path, step: str) -> dict:
    """The step's results as ``load`` gives them, computed: ``{layer: Dataset or DataArray}``."""
    return {layer: ds.compute() for layer, ds in inntrospect.load(path, step).items()}


def assert_same(before: dict, after: dict) -> None:
    assert list(after) == list(before)
    for layer in before:
        xr.testing.assert_identical(after[layer].compute(), before[layer])


def assert_still_current(path, step: str, record: dict, *, strict: bool = True) -> None:
    """``step``'s record is the one it had, complete and current; no staged node is left.

    Not ``strict``: chunk files that tasks still running when the run failed wrote
    after their staged array was deleted may be left (no ``zarr.json``: no reader
    sees them; the next run deletes them).
    """
    attrs = st.store_attrs(path)
    assert attrs["steps"][step] == record
    assert steps.status(path)[step] is None
    assert f"{step:<10} current" in describe_store(path)
    staged = [*path.rglob("*.next"), *path.rglob("*.old")]
    if not strict:
        staged = [p for p in staged if (p / "zarr.json").exists()]
    assert [p.relative_to(path).as_posix() for p in staged] == []


def fail_on_call(monkeypatch, module, name: str, n: int) -> list:
    """Make ``module.name`` raise :class:`Injected` at its ``n``-th call (the first ``n - 1`` work)."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise Injected(f"{name} call {n}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


# -- a rerun that fails part way keeps the previous results -------------------------------
def test_a_naps_rerun_failing_on_a_damaged_chunk_keeps_the_previous_naps(path):
    inntrospect.naps(path, persist=True)
    before, record = snapshot(path, "naps"), st.store_attrs(path)["steps"]["naps"]
    damage_chunk(path, "dense")  # the third of four layers: conv1 and conv2 are written first
    with pytest.raises(DAMAGED):
        inntrospect.naps(path, std=True, persist=True)
    after = snapshot(path, "naps")
    assert_same(before, after)
    assert all("std" not in ds for ds in after.values())
    assert_still_current(path, "naps", record)
    assert sorted(p.name for p in path.iterdir()) == ["extraction", "layers", "naps", "zarr.json"]


def test_a_contrast_rerun_failing_part_way_keeps_the_previous_contrasts(path, monkeypatch):
    inntrospect.naps(path, persist=True)
    inntrospect.contrastive_naps(path, ["a", "b"], persist=True)
    before, record = snapshot(path, "contrast"), st.store_attrs(path)["steps"]["contrast"]
    calls = fail_on_call(monkeypatch, steps, "write_node", 3)  # a full disk at the third layer
    with pytest.raises(Injected):
        inntrospect.contrastive_naps(path, ["b", "c"], persist=True)
    assert len(calls) >= 3  # (nodes are written beside the next layer's computation: one more may start)
    assert_same(before, snapshot(path, "contrast"))
    assert_still_current(path, "contrast", record)
    monkeypatch.undo()
    inntrospect.contrastive_naps(path, ["b", "c"], persist=True)
    assert list(inntrospect.load(path, "contrast")["conv1"].group.values) == ["b", "c"]


def test_a_layout_rerun_failing_part_way_keeps_the_previous_layout(path, monkeypatch):
    inntrospect.naps(path, persist=True)
    inntrospect.topomap_layout(path, method="pca", source="naps", seed=0)
    before, record = snapshot(path, "layout"), st.store_attrs(path)["steps"]["layout"]
    assert list(before) == ["conv1", "conv2", "dense"]  # out has 5 units: no layout
    calls = fail_on_call(monkeypatch, steps, "write_node", 2)
    with pytest.raises(Injected):
        inntrospect.topomap_layout(path, method="random", source="naps", seed=1)
    assert len(calls) >= 2
    assert_same(before, snapshot(path, "layout"))
    assert_still_current(path, "layout", record)


def test_an_align_rerun_failing_on_a_damaged_chunk_keeps_the_previous_aligned_arrays(path):
    inntrospect.align(path, persist=True)
    inntrospect.naps(path, aligned=True, persist=True)
    before, record = snapshot(path, "align"), st.store_attrs(path)["steps"]["align"]
    naps_before = snapshot(path, "naps")
    assert list(before) == ["conv1", "conv2"]
    damage_chunk(path, "conv2", "grads")
    with pytest.raises(DAMAGED):
        inntrospect.align(path, persist=True)
    assert_same(before, snapshot(path, "align"))
    assert_still_current(path, "align", record, strict=False)
    # the NAPs computed from them are still current, and the stored aligned arrays still used
    assert_same(naps_before, snapshot(path, "naps"))
    assert steps.status(path)["naps"] is None
    redone = inntrospect.naps(path, aligned=True)
    assert {ds.attrs["inputs"]["align"] for ds in redone.values()} == {record["id"], None}


# -- a crash between the swap and the record ---------------------------------------------
def test_a_crash_between_the_swap_and_the_record_leaves_results_refused_as_stale(path, monkeypatch):
    inntrospect.naps(path, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    old = st.store_attrs(path)["steps"]["naps"]
    real_swap = steps.swap_in

    def swap_then_crash(*args, **kwargs):
        real_swap(*args, **kwargs)
        raise Injected("killed right after the swap")

    monkeypatch.setattr(steps, "swap_in", swap_then_crash)
    with pytest.raises(Injected):
        inntrospect.naps(path, std=True, persist=True)
    monkeypatch.undo()
    # the new nodes are in place (the consolidated metadata not even refreshed), but not trusted
    assert (path / "naps/conv1/std").is_dir()
    record = st.store_attrs(path)["steps"]["naps"]
    assert record["state"] == "running" and record["id"] != old["id"]
    with pytest.raises(StaleResultError, match="naps step started .* did not finish. Re-run inntrospect naps"):
        inntrospect.load(path, "naps")
    with pytest.raises(StaleResultError, match="computed from naps results .* Re-run inntrospect contrast"):
        inntrospect.load(path, "contrast")
    assert "naps       STALE" in describe_store(path)

    # killed after the swap and the metadata's refresh: the new nodes carry the new run's id, so
    # even under the old complete record (as a writer that knew nothing of the swap would leave
    # it) they are refused, never read as the old results
    fail_on_call(monkeypatch, steps, "finish", 1)
    with pytest.raises(Injected):
        inntrospect.naps(path, std=True, persist=True)
    monkeypatch.undo()
    with pytest.raises(StaleResultError, match="did not finish"):
        inntrospect.load(path, "naps")
    st.update_attrs(path, steps={**st.store_attrs(path)["steps"], "naps": old})
    with pytest.raises(StaleResultError, match="naps/conv1 was written by another naps run"):
        inntrospect.load(path, "naps")

    # the next run succeeds
    inntrospect.naps(path, std=True, persist=True)
    record = st.store_attrs(path)["steps"]["naps"]
    assert record["state"] == "complete"
    assert all("std" in ds and ds.attrs["id"] == record["id"]
               for ds in inntrospect.load(path, "naps").values())


# -- leftovers of a killed run -------------------------------------------------------------
def test_leftovers_of_a_killed_run_are_ignored_by_readers_and_removed_by_the_next_run(path):
    import shutil

    inntrospect.align(path, persist=True)
    inntrospect.naps(path, aligned=True, persist=True)
    naps_before, align_before = snapshot(path, "naps"), snapshot(path, "align")
    # what runs killed mid-way leave (a naps run while writing, one mid-swap, an align run),
    # even listed in the consolidated metadata (another step consolidated since)
    shutil.copytree(path / "naps", path / "naps.next")
    shutil.copytree(path / "naps", path / "naps.old")
    st.create_derived_array(path, "conv1", "aligned.next", dims=("sample", "y", "x", "unit"),
                            codec=None, attributes={"step": "align", "id": "killed"})
    st.consolidate(path)
    assert "naps.next" in xr.open_datatree(str(path), engine="zarr").children
    # ignored: load, info, naps from the stored aligned arrays
    assert_same(naps_before, snapshot(path, "naps"))
    assert_same(align_before, snapshot(path, "align"))
    info = describe_store(path)
    assert "naps       current" in info and "align      current" in info
    assert "aligned.next" in inntrospect.open_store(path)["layers/conv1"]  # plain xarray sees it
    redone = inntrospect.naps(path, aligned=True)
    xr.testing.assert_allclose(redone["conv1"].nap.compute(), naps_before["conv1"].nap)
    # removed by the next run of each step
    inntrospect.naps(path, aligned=True, std=True, persist=True)
    assert not (path / "naps.next").exists() and not (path / "naps.old").exists()
    assert "naps.next" not in xr.open_datatree(str(path), engine="zarr").children
    assert (path / "layers/conv1/aligned.next").exists()  # not the naps run's to remove
    inntrospect.align(path, persist=True)
    assert not (path / "layers/conv1/aligned.next").exists()
    assert "aligned.next" not in xr.open_datatree(str(path), engine="zarr")["layers/conv1"]
    assert_same(align_before, {k: v.assign_attrs(align_before[k].attrs)
                               for k, v in snapshot(path, "align").items()})


def test_while_a_rerun_writes_the_previous_results_stay_readable_and_current(path, monkeypatch):
    inntrospect.naps(path, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    before, old = snapshot(path, "naps"), st.store_attrs(path)["steps"]["naps"]
    seen = []
    real_write = steps.write_node

    def write_and_look(store, name, ds, **kwargs):
        real_write(store, name, ds, **kwargs)
        seen.append(name)  # another reader, meanwhile: the old NAPs, and what depends on them
        assert_same(before, snapshot(path, "naps"))
        assert steps.status(path) == {"naps": None, "contrast": None}

    monkeypatch.setattr(steps, "write_node", write_and_look)
    inntrospect.naps(path, std=True, persist=True)
    assert sorted(seen) == sorted(f"naps.next/{layer}" for layer in LAYERS)  # written two at a time
    record = st.store_attrs(path)["steps"]["naps"]
    assert record["state"] == "complete" and record["params"]["std"] is True and record != old
    assert all("std" in ds and ds.attrs["id"] == record["id"]
               for ds in inntrospect.load(path, "naps").values())
    assert sorted(p.name for p in path.iterdir()) == ["contrast", "extraction", "layers", "naps", "zarr.json"]


# -- object storage --------------------------------------------------------------------------
def test_a_persisted_rerun_on_s3_swaps_in_its_results(s3, tmp_path, monkeypatch):
    local = make_store(tmp_path / "run.zarr")
    loc = s3.location()
    loc.fs.put(str(local), loc.url.removeprefix("s3://"), recursive=True)
    inntrospect.naps(loc, persist=True)
    before, record = snapshot(loc, "naps"), st.store_attrs(loc)["steps"]["naps"]
    fail_on_call(monkeypatch, steps, "write_node", 3)
    with pytest.raises(Injected):
        inntrospect.naps(loc, std=True, persist=True)
    monkeypatch.undo()
    assert_same(before, snapshot(loc, "naps"))
    assert st.store_attrs(loc)["steps"]["naps"] == record
    root = loc.url.removeprefix("s3://")

    def keys():
        return sorted(k.removeprefix(root + "/") for k in loc.fs.find(root) if "/layers/" not in k)

    assert not any(".next" in k or ".old" in k for k in keys())
    inntrospect.naps(loc, std=True, persist=True)
    record = st.store_attrs(loc)["steps"]["naps"]
    assert record["state"] == "complete" and record["params"]["std"] is True
    loaded = inntrospect.load(loc, "naps")
    assert list(loaded) == LAYERS
    for layer, ds in loaded.items():
        assert ds.attrs["id"] == record["id"]
        xr.testing.assert_allclose(ds.nap.compute(), before[layer].nap)
        assert float(ds["std"].max()) > 0
    assert not any(".next" in k or ".old" in k for k in keys())
    assert {k.split("/")[1] for k in keys() if k.startswith("naps/")} == {*LAYERS, "zarr.json"}
    plain = xr.open_datatree(loc.url, engine="zarr", storage_options=s3.storage_options)
    assert plain["naps/conv1"].attrs["id"] == record["id"] and "std" in plain["naps/conv1"]
