"""Appending samples: ``extract(..., append=True)`` / ``--append`` and ``open_writer(..., append=True)``.

An append must give the store a full extraction of the longer corpus gives
(every array bit-identical, the same sample table and chunks), refuse a
corpus whose extracted rows changed or another model with the difference
named, survive ``kill -9``, and leave derived results stale but for the NAPs
(and exemplars, and persisted alignment), which the next run updates by
reading the new samples only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import zarr

import inntrospect
from inntrospect import StaleResultError, StoreMismatchError
from inntrospect.store import store_attrs

from ..conftest import (
    BATCH,
    CNN,
    CNN_LAYERS,
    MLP,
    MLP_LAYERS,
    ROOT,
    counting_reads,
    needs_shared,
    python_env,
)

# -- the writer API (no TensorFlow) ------------------------------------------------------
LAYERS = {"conv": (5, 4, 3), "fc": (6,)}
SOURCE = {"name": "numpy test model", "sha256": "0" * 64, "framework": "numpy"}
CHUNK_MIB = 0.0005  # conv chunks of 2 samples, fc of 16, blocks of 16
N, M = 101, 170  # the store's samples, then the longer table's: 101 ends inside block 6
TABLE = ("group", "file", "index_in_file", "target", "prediction")
ARRAYS = [(layer, var) for layer in LAYERS for var in ("acts", "grads", *TABLE) if var != "grads" or layer == "conv"]


def make_data(n: int = M) -> dict:
    rng = np.random.default_rng(1)
    groups = np.array(["b", "a", "c"], dtype=object)[np.arange(n) % 3]
    groups[130:] = "new"  # a group that only the appended samples have
    return {"conv": np.maximum(rng.standard_normal((n, *LAYERS["conv"])), 0).astype(np.float32),
            "fc": rng.standard_normal((n, *LAYERS["fc"])).astype(np.float32),
            "grad_conv": rng.standard_normal((n, *LAYERS["conv"])).astype(np.float32),
            "pred": rng.integers(0, 3, n), "groups": groups, "targets": np.arange(n) % 3,
            "files": [f"f{i // 50}.npy" for i in range(n)], "indices": np.arange(n) % 50}


DATA = make_data()


def open_(path, n: int, data=DATA, **kwargs):
    kw = dict(source=SOURCE, grads=["conv"], chunk_mib=CHUNK_MIB, targets=data["targets"][:n],
              files=data["files"][:n], indices=data["indices"][:n])
    kw.update(kwargs)
    return inntrospect.open_writer(path, LAYERS, data["groups"][:n], **kw)


def write(path, n: int, data=DATA, step: int = 9, **kwargs):
    """Write samples ``next_sample .. n`` (in batches of ``step``); the closed writer."""
    with open_(path, n, data, **kwargs) as w:
        for lo in range(w.next_sample, n, step):
            hi = min(n, lo + step)
            w.write({"conv": data["conv"][lo:hi], "fc": data["fc"][lo:hi]}, {"conv": data["grad_conv"][lo:hi]},
                    predictions=data["pred"][lo:hi])
    return w


def assert_same_store(a, b, arrays=ARRAYS, chunks: bool = True) -> None:
    """Every array bit-identical (and chunked alike); the root attributes equal but for the extraction's
    id, times and appends, and the corpus csv's path."""
    for layer, var in arrays:
        x = zarr.open_array(str(a), path=f"layers/{layer}/{var}", mode="r")
        y = zarr.open_array(str(b), path=f"layers/{layer}/{var}", mode="r")
        assert x.shape == y.shape, (layer, var)
        if chunks:
            assert x.chunks == y.chunks, (layer, var)
        np.testing.assert_array_equal(x[:], y[:], err_msg=f"{layer}/{var}")
    ra, rb = store_attrs(a), store_attrs(b)
    for attrs in (ra, rb):
        attrs["extraction"] = {k: v for k, v in attrs["extraction"].items()
                               if k not in ("id", "started", "finished", "appends")}
        attrs.pop("steps", None)
        attrs["corpus"].pop("path")  # the longer corpus's csv may be another file
        if not chunks:
            attrs.pop("chunks")
            attrs["extraction"].pop("block")
            attrs["extraction"].pop("n_blocks")
    assert ra == rb


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The store of all ``M`` samples, written at once."""
    path = tmp_path_factory.mktemp("full") / "full.zarr"
    assert write(path, M).complete
    return path


def test_an_append_writes_only_the_new_samples_and_equals_the_longer_store(tmp_path, full):
    path = tmp_path / "s.zarr"
    write(path, N)
    before = store_attrs(path)["extraction"]
    with open_(path, M, append=True) as w:
        assert w.next_sample == N  # the caller writes the new samples only
        assert w.appended == (N, M)
        assert w.blocks_todo == list(range(N // 16, -(-M // 16)))  # the old last block (partial) on
        for lo in range(N, M, 11):
            hi = min(M, lo + 11)
            w.write({"conv": DATA["conv"][lo:hi], "fc": DATA["fc"][lo:hi]}, {"conv": DATA["grad_conv"][lo:hi]},
                    predictions=DATA["pred"][lo:hi])
    assert w.complete
    assert_same_store(path, full)  # bit-identical arrays, same chunks, table, groups, codecs
    attrs = store_attrs(path)
    ext = attrs["extraction"]
    assert ext["id"] != before["id"] and ext["state"] == "complete"
    assert ext["appends"] == [{"n_samples_before": N, "n_samples_after": M, "id_before": before["id"],
                               "id": ext["id"], "at": ext["appends"][0]["at"]}]
    assert "kept" not in ext and "resizing" not in ext
    assert attrs["corpus"]["groups"] == ["a", "b", "c", "new"] and attrs["corpus"]["n_samples"] == M
    assert inntrospect.verify(path).ok
    tree = inntrospect.open_store(path)
    assert tree["layers/conv"].acts.shape == (M, *LAYERS["conv"])
    assert set(str(g) for g in tree["layers/fc"].group.values) == {"a", "b", "c", "new"}
    # appending the same samples again is a resume of a complete store: nothing written
    again = write(path, M, append=True)
    assert again.blocks_recorded == [] and again.appended is None and store_attrs(path)["extraction"]["id"] == ext["id"]


def test_appending_to_an_interrupted_store_resumes_it_then_appends(tmp_path, full):
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="stop"):
        with open_(path, N) as w:
            for lo in range(0, 60, 9):
                w.write({"conv": DATA["conv"][lo:lo + 9], "fc": DATA["fc"][lo:lo + 9]},
                        {"conv": DATA["grad_conv"][lo:lo + 9]}, predictions=DATA["pred"][lo:lo + 9])
            raise RuntimeError("stop")
    assert store_attrs(path)["extraction"]["state"] == "incomplete"
    w = write(path, M, append=True)
    assert w.complete and w.appended == (N, M)
    assert_same_store(path, full)


def test_a_tiny_store_keeps_its_chunks_when_it_grows(tmp_path, caplog):
    """Below 8192 samples a fresh store's chunks depend on its size: an append keeps the store's."""
    path, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    write(path, 10, chunk_mib=1)
    with caplog.at_level(logging.WARNING, logger="inntrospect"):
        write(path, M, append=True, chunk_mib=None)
    assert "keeps the chunks chosen for its first samples" in caplog.text
    write(ref, M, chunk_mib=1)
    assert store_attrs(path)["chunks"] == {"conv": 16, "fc": 16}  # capped at 10 samples' next power of two
    assert store_attrs(ref)["chunks"] == {"conv": 256, "fc": 256}
    assert_same_store(path, ref, chunks=False)  # the same values, other chunks
    assert inntrospect.verify(path).ok
    with pytest.raises(StoreMismatchError, match="an append keeps the store's chunking: leave chunk_mib out"):
        write(path, M + 5, data=make_data(M + 5), append=True, chunk_mib=2)


def test_an_append_with_other_first_samples_or_another_source_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, N)
    other = make_data()
    other["groups"] = other["groups"].copy()
    other["groups"][39] = "c"
    with pytest.raises(StoreMismatchError, match=r"(?s)sample table: the group of sample 39 is 'b' in the "
                                                 r"store, 'c' now .*--overwrite"):
        write(path, M, data=other, append=True)
    with pytest.raises(StoreMismatchError, match=r"model: the store was made from numpy test model .*same model"):
        write(path, M, append=True, source={"name": "another model", "sha256": "1" * 64})
    with pytest.raises(StoreMismatchError, match=r"samples: the store holds 101, the corpus now has 90"):
        write(path, 90, append=True)
    with pytest.raises(StoreMismatchError, match=r"layers: the store has conv \(5, 4, 3\) with grads, fc \(6,\)"):
        write(path, M, append=True, grads=False)
    # without append= a longer table is another sample table; the message names append=True
    with pytest.raises(StoreMismatchError, match=r"holds 101 samples, now 170 \(if the first 101 are the "
                                                 r"store's, open_writer\(\.\.\., append=True\)"):
        write(path, M)
    with pytest.raises(inntrospect.ParameterError, match="give one of them"):
        write(path, M, append=True, overwrite=True)
    assert store_attrs(path)["corpus"]["n_samples"] == N  # nothing changed
    assert store_attrs(path)["extraction"]["state"] == "complete"


KILL_IN_RESIZE = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
import inntrospect.store.append as app
from tests.extraction.test_append import write, M

real = app.write_sample_table if hasattr(app, "write_sample_table") else None
count = {{"n": 0}}

def dying(node, table):  # the second layer's table is never written: killed while resizing
    count["n"] += 1
    if count["n"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(node, table)

app.write_sample_table = dying
write({path!r}, M, append=True)
"""

KILL_IN_BLOCKS = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.extraction.test_append import open_, DATA, M

with open_({path!r}, M, append=True) as w:
    for lo in range(w.next_sample, M, 9):
        hi = min(M, lo + 9)
        w.write({{"conv": DATA["conv"][lo:hi], "fc": DATA["fc"][lo:hi]}}, {{"conv": DATA["grad_conv"][lo:hi]}},
                predictions=DATA["pred"][lo:hi])
        if hi > 140:  # some blocks recorded, the one being written is not
            w._record(wait_all=True)
            os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("where", ["resize", "blocks"])
def test_kill_9_during_an_append_then_resume_gives_the_longer_store(tmp_path, full, where):
    path = tmp_path / "s.zarr"
    write(path, N)
    code = (KILL_IN_RESIZE if where == "resize" else KILL_IN_BLOCKS).format(root=str(Path(__file__).parents[2]),
                                                                            path=str(path))
    res = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr.decode()[-2000:]
    ext = store_attrs(path)["extraction"]
    assert ext["state"] == "incomplete"
    if where == "resize":
        assert ext["resizing"]["from"] == N  # killed while the arrays were being resized
        with pytest.raises(inntrospect.IncompleteStoreError):
            inntrospect.open_store(path)
        w = write(path, M)  # a plain resume finishes the append (append=True would too)
        assert w.appended == (N, M)
    else:
        done = np.asarray(zarr.open_array(str(path / "extraction" / "block_done"), mode="r")[:], bool)
        assert done[: N // 16].all() and 0 < done[N // 16 :].sum() < len(done) - N // 16
        w = write(path, M, append=True)
        assert w.appended is None and w.next_sample > N  # resumed: the recorded new blocks kept
    assert w.complete
    assert_same_store(path, full)
    assert len(store_attrs(path)["extraction"]["appends"]) == 1


# -- incremental NAPs, exemplars and alignment (writer API) --------------------------------


def chunk_index(file: str) -> tuple[str, str, int]:
    """``(layer, array, chunk index along sample)`` of a chunk file of a store."""
    parts = Path(file).parts
    c = parts.index("c")
    return parts[c - 2], parts[c - 1], int(parts[c + 1])


def assert_only_new_chunks_read(reads, first: int, chunks: dict) -> None:
    assert reads and len(set(reads)) == len(reads)
    for file in reads:
        layer, _, k = chunk_index(file)
        assert (k + 1) * chunks[layer] > first, f"{file} holds only samples before {first}"
    for layer, c in chunks.items():  # every chunk of the new samples, once per array read
        assert {k for f in reads for name, _, k in [chunk_index(f)] if name == layer} == \
            set(range(first // c, -(-M // c)))


@pytest.mark.parametrize("aligned, std, k", [(False, False, None), (True, True, 3), (True, False, 2)])
def test_naps_after_an_append_read_only_the_new_samples(tmp_path, full, monkeypatch, aligned, std, k):
    path = tmp_path / "s.zarr"
    write(path, N)
    if k is None:
        inntrospect.naps(path, aligned=aligned, std=std, persist=True)
    else:
        inntrospect.naps_and_exemplars(path, aligned=aligned, std=std, k=k)
    old = store_attrs(path)["steps"]["naps"]
    assert old["n_samples"] == N and old["params"] == {"aligned": aligned, "std": std}
    write(path, M, append=True)
    with pytest.raises(StaleResultError, match="now holds extraction"):
        inntrospect.load(path, "naps")
    reads = counting_reads(monkeypatch)
    with dask.config.set(scheduler="synchronous"):
        if k is None:
            nap = inntrospect.naps(path, aligned=aligned, std=std, persist=True)
        else:
            nap, ex = inntrospect.naps_and_exemplars(path, aligned=aligned, std=std, k=k)
    assert_only_new_chunks_read(reads, N, {"conv": 2, "fc": 16})
    assert len(reads) == (2 if aligned else 1) * len(range(N // 2, M // 2)) + len(range(N // 16, -(-M // 16)))
    rec = store_attrs(path)["steps"]["naps"]
    assert rec["n_samples"] == M and rec["update_of"] == {"id": old["id"], "n_samples": N}
    assert rec["params"] == {"aligned": aligned, "std": std}  # the config's values: `run` keeps them
    (ref_nap, ref_ex) = dask.compute(*inntrospect.naps_and_exemplars(full, aligned=aligned, std=std, k=k or 1,
                                                                     persist=False))
    stored = inntrospect.load(path, "naps")
    for layer in LAYERS:
        for got in (nap[layer], stored[layer]):
            assert [str(g) for g in got.group.values] == ["a", "b", "c", "new"]  # the new group appears
            np.testing.assert_array_equal(got["count"].values, ref_nap[layer]["count"].values)
            np.testing.assert_allclose(got.nap.values, ref_nap[layer].nap.values, rtol=0, atol=1e-12)
            if std:
                np.testing.assert_allclose(got["std"].values, ref_nap[layer]["std"].values, rtol=0, atol=1e-12)
        if k is not None:  # the exemplars exactly
            for var in ("sample", "value", "position"):
                if var in ref_ex[layer]:
                    np.testing.assert_array_equal(ex[layer][var].values, ref_ex[layer][var].values)
    if k is not None:
        ex_rec = store_attrs(path)["steps"]["exemplars"]
        assert ex_rec["n_samples"] == M and ex_rec["update_of"]["n_samples"] == N
    # a second run, with nothing appended since, reads every sample again (a plain re-run)
    reads.clear()
    with dask.config.set(scheduler="synchronous"):
        inntrospect.naps(path, aligned=aligned, std=std, persist=True)
    assert "update_of" not in store_attrs(path)["steps"]["naps"]
    assert len(reads) == (2 if aligned else 1) * (M // 2) + -(-M // 16)


def test_naps_of_other_parameters_or_incremental_false_read_everything(tmp_path, monkeypatch):
    path = tmp_path / "s.zarr"
    write(path, N)
    inntrospect.naps(path, persist=True)
    write(path, M, append=True)
    reads = counting_reads(monkeypatch)
    inntrospect.naps(path, std=True, persist=True)  # other parameters: the stored moments do not fit
    assert len(reads) == M // 2 + -(-M // 16) and "update_of" not in store_attrs(path)["steps"]["naps"]
    write(tmp_path / "t.zarr", N)
    inntrospect.naps(tmp_path / "t.zarr", persist=True)
    write(tmp_path / "t.zarr", M, append=True)
    reads.clear()
    inntrospect.naps(tmp_path / "t.zarr", persist=True, incremental=False)
    assert len(reads) == M // 2 + -(-M // 16)


def test_derived_results_become_stale_after_an_append_and_naps_update_across_appends(tmp_path, full, monkeypatch):
    path = tmp_path / "s.zarr"
    write(path, N)
    inntrospect.align(path, persist=True)
    inntrospect.naps(path, aligned=True, std=True, persist=True)
    inntrospect.exemplars(path, k=2, persist=True)
    inntrospect.contrastive_naps(path, persist=True)
    write(path, 140, append=True)  # two appends: 101 -> 140 -> 170
    write(path, M, append=True)
    status = inntrospect.store.steps.status(path)
    assert set(status) == {"align", "naps", "exemplars", "contrast"}
    assert all(why is not None for why in status.values())  # every result is stale
    for step in ("align", "naps", "exemplars", "contrast"):
        with pytest.raises(StaleResultError):
            inntrospect.load(path, step)
    assert inntrospect.verify(path).ok  # the stale aligned arrays' new chunks are not expected yet
    reads = counting_reads(monkeypatch)
    with dask.config.set(scheduler="synchronous"):
        inntrospect.align(path, persist=True)  # extends the aligned arrays from the first new sample
        nap = inntrospect.naps(path, aligned=True, std=True, persist=True)  # from the persisted aligned
        assert_only_new_chunks_read(reads, N, {"conv": 2, "fc": 16})
        assert {chunk_index(f)[1] for f in reads} == {"aligned", "acts"}  # fc: acts; conv: aligned
        reads.clear()
        ex = inntrospect.exemplars(path, k=2, persist=True)
        assert_only_new_chunks_read(reads, N, {"conv": 2, "fc": 16})
    rec = store_attrs(path)["steps"]
    assert rec["align"]["update_of"]["n_samples"] == N and rec["naps"]["inputs"]["align"] == rec["align"]["id"]
    inntrospect.align(full, persist=True)
    for layer in ("conv",):
        np.testing.assert_array_equal(zarr.open_array(str(path), path=f"layers/{layer}/aligned")[:],
                                      zarr.open_array(str(full), path=f"layers/{layer}/aligned")[:])
    ref_nap, ref_ex = dask.compute(*inntrospect.naps_and_exemplars(full, aligned=True, std=True, k=2, persist=False))
    for layer in LAYERS:
        np.testing.assert_allclose(nap[layer].nap.values, ref_nap[layer].nap.values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(nap[layer]["std"].values, ref_nap[layer]["std"].values, rtol=0, atol=1e-12)
        np.testing.assert_array_equal(ex[layer]["sample"].values, ref_ex[layer]["sample"].values)
    with pytest.raises(StaleResultError, match="contrast"):  # contrasts: recomputed from the new NAPs
        inntrospect.load(path, "contrast")
    inntrospect.contrastive_naps(path, persist=True)
    assert inntrospect.store.steps.status(path) == {s: None for s in ("align", "naps", "exemplars", "contrast")}
    assert inntrospect.verify(path).ok


# -- extraction from a corpus with the real MNIST CNN ------------------------------------
ROWS = 7  # of the 10 rows (one batch file per digit) of the 600-sample corpus: digits 0-6


@pytest.fixture(scope="module")
def grown(tmp_path_factory, mnist_arrays):
    """A CNN store of the first 7 rows of a corpus, its NAPs and exemplars persisted, then the corpus grown
    to 10 rows (new digits: new groups) and appended (computing as little as possible); a full
    extraction of the 10 rows beside it."""
    pytest.importorskip("tensorflow")
    from inntrospect.extraction.local import prepare_extraction, run_extraction

    from ..conftest import mnist_example

    x, y = mnist_arrays
    out = tmp_path_factory.mktemp("grow")
    csv = mnist_example.write_mnist_corpus(x[:600], y[:600], out, batch=77)
    rows = csv.read_text().splitlines()
    assert len(rows) == 10
    (out / "all.csv").write_text("\n".join(rows) + "\n")
    csv.write_text("\n".join(rows[:ROWS]) + "\n")
    path = out / "s.zarr"
    inntrospect.extract(CNN, csv, path, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    n_before = store_attrs(path)["corpus"]["n_samples"]
    inntrospect.naps_and_exemplars(path, aligned=True, std=True, k=4)
    old = store_attrs(path)
    csv.write_text("\n".join(rows) + "\n")  # new rows after those extracted
    ex = prepare_extraction(CNN, csv, path, CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    seen = []
    compute = ex.model.compute

    def counted(xb, *args, **kwargs):
        seen.append(len(xb))
        return compute(xb, *args, **kwargs)

    ex.model.compute = counted
    blocks = run_extraction(ex, append=True)
    ref = out / "full.zarr"
    inntrospect.extract(CNN, out / "all.csv", ref, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    return {"path": path, "csv": csv, "full": ref, "n_before": n_before, "old": old, "seen": seen,
            "blocks": blocks, "folder": out, "rows": rows}


CNN_ARRAYS = [(layer, var) for layer in ["conv2d_24_input", *CNN_LAYERS, "dense_14"]
              for var in ("acts", "grads", *TABLE) if var != "grads" or layer != "dense_14"]


@needs_shared
def test_extract_append_equals_a_full_extraction_of_the_longer_corpus(grown):
    path, n = grown["path"], grown["n_before"]
    attrs = store_attrs(path)
    block = attrs["extraction"]["block"]
    assert n % block, "the old samples should end inside a block"
    assert grown["blocks"] == list(range(n // block, attrs["extraction"]["n_blocks"]))
    # only the new samples were extracted, and the old ones of the inference batch holding the first of them
    assert 600 - n <= sum(grown["seen"]) < 600 - n + BATCH
    assert_same_store(path, grown["full"], CNN_ARRAYS)  # bit-identical, same chunks and sample table
    assert attrs["corpus"]["groups"] == [str(d) for d in range(10)]
    assert grown["old"]["corpus"]["groups"] == [str(d) for d in range(ROWS)]
    (entry,) = attrs["extraction"]["appends"]
    assert entry["n_samples_before"] == n and entry["n_samples_after"] == 600
    assert entry["id_before"] == grown["old"]["extraction"]["id"] != attrs["extraction"]["id"]
    assert entry["corpus"]["csv_sha256"] == attrs["corpus"]["csv_sha256"] and entry["corpus"]["n_files"] == 10
    assert inntrospect.verify(path).ok


@needs_shared
def test_naps_after_an_extract_append_merge_the_new_samples_only(grown, monkeypatch):
    path, n = grown["path"], grown["n_before"]
    chunks = store_attrs(path)["chunks"]
    reads = counting_reads(monkeypatch)
    with dask.config.set(scheduler="synchronous"):
        nap, ex = inntrospect.naps_and_exemplars(path, aligned=True, std=True, k=4)
    assert reads and len(set(reads)) == len(reads)
    for file in reads:
        layer, _, k = chunk_index(file)
        assert (k + 1) * chunks[layer] > n
    per_layer = {layer: -(-600 // c) - n // c for layer, c in chunks.items()}
    with_grads = {layer for layer in chunks  # aligned on the fly: the gradients of layers with spatial axes too
                  if "grads" in zarr.open_group(str(path), path=f"layers/{layer}", mode="r")
                  and len(zarr.open_array(str(path), path=f"layers/{layer}/acts", mode="r").shape) > 2}
    assert with_grads == {"conv2d_24_input", "conv2d_24", "conv2d_25"}
    assert len(reads) == sum(c * (2 if layer in with_grads else 1) for layer, c in per_layer.items())
    ref_nap, ref_ex = dask.compute(*inntrospect.naps_and_exemplars(grown["full"], aligned=True, std=True, k=4,
                                                                   persist=False))
    for layer in ref_nap:
        assert [str(g) for g in nap[layer].group.values] == [str(d) for d in range(10)]
        np.testing.assert_array_equal(nap[layer]["count"].values, ref_nap[layer]["count"].values)
        np.testing.assert_allclose(nap[layer].nap.values, ref_nap[layer].nap.values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(nap[layer]["std"].values, ref_nap[layer]["std"].values, rtol=0, atol=1e-12)
        for var in ("sample", "value", "position"):
            if var in ref_ex[layer]:
                np.testing.assert_array_equal(ex[layer][var].values, ref_ex[layer][var].values)
    records = store_attrs(path)["steps"]
    assert records["naps"]["n_samples"] == records["exemplars"]["n_samples"] == 600
    assert records["naps"]["update_of"]["n_samples"] == n


def rewrite_csv(csv: Path, rows) -> None:
    csv.write_text("\n".join(rows) + "\n")


@needs_shared
def test_extract_append_refuses_changed_rows_another_model_or_a_plain_extract(grown, tmp_path, capsys):
    from inntrospect.cli import main

    folder, rows, path = grown["folder"], grown["rows"], grown["path"]
    more = tmp_path / "more"
    more.mkdir()
    for row in rows:  # a copy of the corpus folder (the batch files keep their times), and one row more
        f = row.split(",")[0]
        (more / f).write_bytes((folder / f).read_bytes())
        os.utime(more / f, ns=(os.stat(folder / f).st_atime_ns, os.stat(folder / f).st_mtime_ns))
    np.save(more / "extra.npy", np.zeros((5, 28, 28, 1), np.float32))
    csv = more / "corpus.csv"
    rewrite_csv(csv, [*rows, "extra.npy,blank,0"])
    store = tmp_path / "s.zarr"
    import shutil

    shutil.copytree(path, store)
    before = store_attrs(store)
    # a plain extract of the longer corpus: another corpus, the message suggests --append
    with pytest.raises(StoreMismatchError, match=r"it has 605 samples, the store 600: .* --append"):
        inntrospect.extract(CNN, csv, store, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    # another model
    with pytest.raises(StoreMismatchError, match=r"model: the store was made from .*mnist_cnn_shallow.*now "
                                                 r".*mnist_mlp.*same model"):
        inntrospect.extract(MLP, csv, store, layers=MLP_LAYERS, batch_size=BATCH, append=True)
    # an extracted row's batch file changed (same size, new contents and time)
    first = rows[0].split(",")[0]
    data = np.load(more / first)
    np.save(more / first, data[::-1].copy())
    with pytest.raises(StoreMismatchError, match=rf"batch file\(s\) of the rows already extracted changed since: "
                                                 rf"{first} \(modification time\).*restore the changed files"):
        inntrospect.extract(CNN, csv, store, layers=CNN_LAYERS, batch_size=BATCH, append=True)
    np.save(more / first, data)
    os.utime(more / first, ns=(os.stat(folder / first).st_atime_ns, os.stat(folder / first).st_mtime_ns))
    # an extracted row's group changed
    rewrite_csv(csv, [rows[0].replace(",0,", ",zero,"), *rows[1:], "extra.npy,blank,0"])
    with pytest.raises(StoreMismatchError, match=r"the group of sample 0 is '0' in the store, 'zero' now"):
        inntrospect.extract(CNN, csv, store, layers=CNN_LAYERS, batch_size=BATCH, append=True)
    # rows removed
    rewrite_csv(csv, rows[:-1])
    with pytest.raises(StoreMismatchError, match="rows were removed"):
        inntrospect.extract(CNN, csv, store, layers=CNN_LAYERS, batch_size=BATCH, append=True)
    assert store_attrs(store) == before  # nothing changed
    # the command line: refused without --append (exit 2, the fix named), appended with it
    rewrite_csv(csv, [*rows, "extra.npy,blank,0"])
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npath = "{CNN}"\nlayers = {json.dumps(CNN_LAYERS)}\n[corpus]\npath = "{csv}"\n'
                      f'[store]\npath = "{store}"\n[extract]\nbatch_size = {BATCH}\n')
    assert main(["extract", str(config), "--no-progress"]) == 2
    assert main(["extract", str(config), "--append", "--no-progress"]) == 0
    assert "appended 5 samples: the store holds 600 before, 605 now" in capsys.readouterr().out
    assert main(["extract", str(config), "--no-progress"]) == 0  # the grown store: a resume, nothing to do
    assert "extracted 0 of" in capsys.readouterr().out
    attrs = store_attrs(store)
    assert attrs["corpus"]["n_samples"] == 605 and attrs["corpus"]["groups"][-1] == "blank"
    assert attrs["extraction"]["appends"][-1]["n_samples_before"] == 600
    tree = inntrospect.open_store(store)
    np.testing.assert_array_equal(tree["layers/conv2d_24_input"].acts.values[600:], 0)
    np.testing.assert_array_equal(tree["layers/conv2d_25"].acts.values[:600],
                                  inntrospect.open_store(path)["layers/conv2d_25"].acts.values)


EXTRACT = """
import os, sys, time, inntrospect

def hold(block, n_blocks):  # after the first appended block the extraction waits while the test looks
    while block >= {first} and os.path.exists({hold!r}):
        time.sleep(0.01)

inntrospect.extract({model!r}, {corpus!r}, {store!r}, layers={layers!r}, batch_size=16, append=True,
                    on_block=hold)
"""


@needs_shared
@pytest.mark.slow
def test_kill_9_during_an_extract_append_then_resume(grown, tmp_path):
    import shutil

    rows, folder = grown["rows"], grown["folder"]
    store = tmp_path / "s.zarr"
    new_csv = tmp_path / "corpus.csv"  # the store of the first rows, made anew (not the grown one)
    rewrite_csv(new_csv, rows[:ROWS])
    for row in rows:
        f = row.split(",")[0]
        shutil.copy2(folder / f, tmp_path / f)
    inntrospect.extract(CNN, new_csv, store, layers=CNN_LAYERS, chunk_mib=1, batch_size=16)
    rewrite_csv(new_csv, rows)  # the same corpus.csv, grown
    n = grown["n_before"]
    block = store_attrs(store)["extraction"]["block"]
    held = tmp_path / "hold"
    held.touch()
    code = EXTRACT.format(model=str(CNN), corpus=str(new_csv), store=str(store), layers=CNN_LAYERS,
                          hold=str(held), first=n // block)
    proc = subprocess.Popen([sys.executable, "-c", code], env=python_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)

    def appending() -> bool:  # grown, and the old last block written again (whole) and recorded
        ext = store_attrs(store)["extraction"]
        done = zarr.open_array(str(store / "extraction" / "block_done"), mode="r")
        return "appends" in ext and "resizing" not in ext and done.shape[0] == -(-600 // block) \
            and bool(done[n // block])

    try:
        deadline = time.time() + 180
        while not appending():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the append did not start"
            time.sleep(0.01)
        with pytest.raises(inntrospect.StoreLockedError):  # the same writer lock
            inntrospect.extract(CNN, new_csv, store, layers=CNN_LAYERS, batch_size=16, append=True)
        proc.send_signal(signal.SIGKILL)  # held after its first block: the rest not written
        proc.wait(30)
    finally:
        proc.kill()
    done = np.asarray(zarr.open_array(str(store / "extraction" / "block_done"), mode="r")[:], bool)
    assert done[: n // block + 1].all() and not done.all(), "the kill should land mid-append"
    assert len(done) == -(-600 // block)
    assert store_attrs(store)["extraction"]["state"] == "incomplete"
    inntrospect.extract(CNN, new_csv, store, layers=CNN_LAYERS, batch_size=16)  # a plain resume
    ref = tmp_path / "ref.zarr"
    inntrospect.extract(CNN, new_csv, ref, layers=CNN_LAYERS, chunk_mib=1, batch_size=16)
    assert_same_store(store, ref, CNN_ARRAYS)


@needs_shared
@pytest.mark.slow
def test_extract_append_on_the_workers_of_a_cluster(grown, tmp_path):
    """The blocks of an append computed by cluster tasks (each a writer of one block): the same store."""
    import shutil

    from distributed import Client, LocalCluster

    rows, folder = grown["rows"], grown["folder"]
    for row in rows:
        f = row.split(",")[0]
        shutil.copy2(folder / f, tmp_path / f)
    csv = tmp_path / "corpus.csv"
    rewrite_csv(csv, rows[:ROWS])
    store = tmp_path / "s.zarr"
    inntrospect.extract(CNN, csv, store, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    rewrite_csv(csv, rows)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.run(lambda: os.environ.update(TF_CPP_MIN_LOG_LEVEL="2"))
        computed = []
        inntrospect.extract(CNN, csv, store, layers=CNN_LAYERS, batch_size=BATCH, append=True, where="cluster",
                            on_block=lambda b, n: computed.append(b))
    block = store_attrs(store)["extraction"]["block"]
    assert sorted(computed) == list(range(grown["n_before"] // block, -(-600 // block)))
    assert_same_store(store, grown["full"], CNN_ARRAYS)


def test_an_append_to_a_store_in_object_storage_and_its_naps_update(s3, full):
    """On S3 (moto): the arrays resized and the chunks written through fsspec, the NAPs read through Zarr."""
    loc = s3.location("s.zarr")
    write(loc, N)
    inntrospect.naps(loc, std=True, persist=True)
    w = write(loc, M, append=True)
    assert w.complete and w.appended == (N, M)
    for layer, var in ARRAYS:
        got = zarr.open_array(loc.zarr_store(True), path=f"layers/{layer}/{var}", mode="r")
        ref = zarr.open_array(str(full), path=f"layers/{layer}/{var}", mode="r")
        assert got.chunks == ref.chunks
        np.testing.assert_array_equal(got[:], ref[:], err_msg=f"{layer}/{var}")
    nap = inntrospect.naps(loc, std=True, persist=True)
    assert store_attrs(loc)["steps"]["naps"]["update_of"]["n_samples"] == N
    (ref,) = dask.compute(inntrospect.naps(full, std=True))
    for layer in LAYERS:
        np.testing.assert_allclose(nap[layer].nap.values, ref[layer].nap.values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(nap[layer]["std"].values, ref[layer]["std"].values, rtol=0, atol=1e-12)


@needs_shared
def test_bench_append_quick(cnn_store, tmp_path):
    """``benchmarks/bench_append.py`` at tiny size keeps working (its checks included)."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_append.py"), "--quick", "--source",
                          str(cnn_store), "--naps-store", str(tmp_path / "n.zarr"), "--store", str(tmp_path / "a.zarr")],
                         capture_output=True, text=True, env=python_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("(u) update, persisted", "u / f", "up / fp", "equal the full pass's to 1e-12"):
        assert label in res.stdout, res.stdout


# -- a second corpus file: corpus = [jan.csv, feb.csv] -------------------------------------


def csv_corpus(folder: Path, files: dict[str, tuple[np.ndarray, str, int | None]]) -> Path:
    """``folder/corpus.csv`` listing ``{file: (samples, group, target or None)}`` in order; its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, _, _) in files.items():
        np.save(folder / name, x)
    rewrite_csv(folder / "corpus.csv", [f"{name},{g}" + ("" if t is None else f",{t}")
                                        for name, (_, g, t) in files.items()])
    return folder / "corpus.csv"


@pytest.fixture(scope="module")
def two_csvs(tmp_path_factory, mnist_arrays):
    """``jan/corpus.csv`` (300 MNIST images) and ``feb/corpus.csv`` (150 more, in another folder: batch files
    named as jan's, and a group jan has not), the CNN's store of jan alone, its NAPs persisted."""
    pytest.importorskip("tensorflow")
    from ..conftest import mnist_example

    x, y = mnist_arrays
    out = tmp_path_factory.mktemp("two")
    jan = mnist_example.write_mnist_corpus(x[:300], y[:300], out / "jan", batch=77)
    feb = mnist_example.write_mnist_corpus(x[300:450], y[300:450], out / "feb", batch=77)
    rows = feb.read_text().splitlines()
    name, _, target = rows[-1].split(",")
    rows[-1] = f"{name},new,{target}"  # a group only feb has
    rewrite_csv(feb, rows)
    store = out / "jan.zarr"
    inntrospect.extract(CNN, str(jan), store, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    inntrospect.naps(store, aligned=True, std=True, persist=True)
    return {"folder": out, "jan": jan, "feb": feb, "store": store}


def store_copy(two_csvs, tmp_path) -> Path:
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(two_csvs["store"], path)
    return path


@needs_shared
def test_appending_a_second_csv_equals_a_full_extraction_of_both(two_csvs, tmp_path, capsys):
    from inntrospect.extraction.local import prepare_extraction, run_extraction
    from inntrospect.store.info import describe_store

    jan, feb = two_csvs["jan"], two_csvs["feb"]
    jan_files = {r.split(",")[0] for r in jan.read_text().splitlines()}
    feb_files = [r.split(",")[0] for r in feb.read_text().splitlines()]
    assert jan_files & set(feb_files), "feb should reuse a batch file name of jan's"
    path = store_copy(two_csvs, tmp_path)
    before = store_attrs(path)
    n = before["corpus"]["n_samples"]
    assert n == 300 and n % before["extraction"]["block"], "jan's samples should end inside a block"
    ex = prepare_extraction(CNN, [str(jan), feb], path, CNN_LAYERS, batch_size=BATCH)
    assert ex.request["corpus"] == [str(jan), str(feb)]  # what a cluster's workers read: plain strings
    json.dumps(ex.request["corpus"])
    summary = ex.summary()
    assert "corpus:  2 csv files: 450 samples in" in summary
    assert f"1. {jan}: 300 samples in 10 files" in summary and f"2. {feb}: 150 samples in" in summary
    blocks = run_extraction(ex, append=True)
    block = before["extraction"]["block"]
    assert blocks == list(range(n // block, -(-450 // block)))  # the new samples' blocks only
    worker = prepare_extraction(**ex.request)  # as a cluster's worker prepares it: the same store accepted
    inntrospect.store.check_same(store_attrs(path), worker.attrs, path)
    ref = tmp_path / "ref.zarr"
    inntrospect.extract(CNN, [jan, feb], ref, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    assert_same_store(path, ref, CNN_ARRAYS)  # bit-identical arrays and sample table, equal corpus records
    attrs = store_attrs(path)
    corpus = attrs["corpus"]
    assert corpus["path"] == str(jan) and corpus["n_samples"] == 450 and corpus["groups"][-1] == "new"
    assert [(c["path"], c["n_samples"]) for c in corpus["csvs"]] == [(str(jan), 300), (str(feb), 150)]
    assert corpus["csvs"][0]["csv_sha256"] == before["corpus"]["csv_sha256"]  # jan's own hash, as in the store
    assert [f["file"] for f in corpus["files"]] == [*[r["file"] for r in before["corpus"]["files"]],
                                                    *[f"../feb/{f}" for f in feb_files]]
    (entry,) = attrs["extraction"]["appends"]
    assert entry["n_samples_before"] == 300 and entry["corpus"]["paths"] == [str(jan), str(feb)]
    tree = inntrospect.open_store(path)
    files = tree["layers/flatten_8"].file.values
    assert list(files[:300]) == list(inntrospect.open_store(two_csvs["store"])["layers/flatten_8"].file.values)
    assert files[300] == f"../feb/{feb_files[0]}" and (jan.parent / files[300]).resolve() == feb.parent / feb_files[0]
    info = describe_store(path)  # both csvs; no batch file reported changed (feb's found from jan's folder)
    assert f"corpus:     2 csv files (450 samples, {len(before['corpus']['files']) + len(feb_files)} files)" in info
    assert f"1. {jan} (300 samples" in info and f"2. {feb} (150 samples" in info and "CHANGED" not in info
    # the NAPs: updated from the new samples alone, equal to those of the full extraction
    nap = inntrospect.naps(path, aligned=True, std=True, persist=True)
    assert store_attrs(path)["steps"]["naps"]["update_of"]["n_samples"] == 300
    (ref_nap,) = dask.compute(inntrospect.naps(ref, aligned=True, std=True))
    for layer in ref_nap:
        assert [str(g) for g in nap[layer].group.values] == [*map(str, range(10)), "new"]
        np.testing.assert_array_equal(nap[layer]["count"].values, ref_nap[layer]["count"].values)
        np.testing.assert_allclose(nap[layer].nap.values, ref_nap[layer].nap.values, rtol=0, atol=1e-12)
        np.testing.assert_allclose(nap[layer]["std"].values, ref_nap[layer]["std"].values, rtol=0, atol=1e-12)
    # the same list again: a resume of a complete store, nothing computed
    computed = []
    inntrospect.extract(CNN, [jan, feb], path, layers=CNN_LAYERS, batch_size=BATCH,
                        on_block=lambda b, k: computed.append(b))
    assert computed == [] and store_attrs(path)["extraction"]["id"] == attrs["extraction"]["id"]


@needs_shared
def test_appending_a_second_csv_refuses_changed_rows_and_another_order(two_csvs, tmp_path):
    import shutil

    jan, feb = two_csvs["jan"], two_csvs["feb"]
    path = store_copy(two_csvs, tmp_path)
    before = store_attrs(path)
    rows = jan.read_text().splitlines()
    jan2 = tmp_path / "jan2" / "corpus.csv"  # a copy of jan (its batch files keep their times) ...
    jan2.parent.mkdir()
    for row in rows:
        shutil.copy2(jan.parent / row.split(",")[0], jan2.parent)
    first = rows[0].split(",")[0]
    rewrite_csv(jan2, [rows[0].replace(",0,", ",zero,"), *rows[1:]])  # ... whose first row's group changed
    with pytest.raises(StoreMismatchError, match=(
            rf"(?s)the group of sample 0 is '0' in the store, 'zero' now \(it is {first}\[0\] now; \d+ of the "
            rf"first 300 samples differ\).*corpus csv files: the store's samples come from {jan}, now from "
            rf"{jan2} \+ {feb}\. .*list the store's first, in their order and with their rows as they were, then "
            r"the new ones.*--overwrite")):
        inntrospect.extract(CNN, [jan2, feb], path, layers=CNN_LAYERS, batch_size=BATCH, append=True)
    rewrite_csv(jan2, rows)  # the same rows, a batch file of them changed (same size, new contents and time)
    np.save(jan2.parent / first, np.load(jan2.parent / first)[::-1].copy())
    with pytest.raises(StoreMismatchError, match=rf"batch file\(s\) of the rows already extracted changed since: "
                                                 rf"{first} \(modification time\)"):
        inntrospect.extract(CNN, [jan2, feb], path, layers=CNN_LAYERS, batch_size=BATCH, append=True)
    # the csvs in another order
    with pytest.raises(StoreMismatchError, match=rf"(?s)sample table: .*corpus csv files: the store's samples "
                                                 rf"come from {jan}, now from {feb} \+ {jan}\. The csv files of a "
                                                 r"corpus are read in order"):
        inntrospect.extract(CNN, [feb, jan], path, layers=CNN_LAYERS, batch_size=BATCH, append=True)
    # without append: another corpus, the fix named
    with pytest.raises(StoreMismatchError, match=rf"the corpus csv files differ \(store: {jan}, now: {jan} \+ "
                                                 rf"{feb}\); it has 450 samples, the store 300: .*--append"):
        inntrospect.extract(CNN, [jan, feb], path, layers=CNN_LAYERS, batch_size=BATCH)
    assert store_attrs(path) == before  # nothing changed


@needs_shared
def test_append_a_second_csv_from_a_config_list_on_the_command_line(two_csvs, tmp_path, capsys):
    from inntrospect.cli import main
    from inntrospect.config import load_config

    from ..conftest import write_config

    jan, feb, folder = two_csvs["jan"], two_csvs["feb"], two_csvs["folder"]
    path = store_copy(two_csvs, tmp_path)
    config = write_config(folder, {  # beside the csvs: paths relative to the config's folder
        "model": {"path": CNN, "layers": CNN_LAYERS}, "corpus": {"path": ["jan/corpus.csv", "feb/corpus.csv"]},
        "store": {"path": path}, "extract": {"batch_size": BATCH}}, name=f"append-{tmp_path.name}.toml")
    assert load_config(config).get("corpus", "path") == [str(jan), str(feb)]
    assert main(["extract", str(config), "--append", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "corpus:  2 csv files: 450 samples" in out and f"1. {jan}: 300 samples" in out
    assert "appended 150 samples: the store holds 300 before, 450 now" in out
    attrs = store_attrs(path)
    assert [c["path"] for c in attrs["corpus"]["csvs"]] == [str(jan), str(feb)]
    assert attrs["extraction"]["state"] == "complete" and attrs["corpus"]["n_samples"] == 450
    assert main(["extract", str(config), "--no-progress"]) == 0  # the same list: a resume, nothing to do
    assert "extracted 0 of" in capsys.readouterr().out
    assert main(["info", str(config)]) == 0
    assert f"2. {feb} (150 samples" in capsys.readouterr().out
    bad = write_config(folder, {"corpus": {"path": []}}, name=f"bad-{tmp_path.name}.toml")
    assert main(["extract", str(bad), "--no-progress"]) == 2
    assert "[corpus] path must be a path or a non-empty list of paths" in capsys.readouterr().err


def old_identity(csv: Path) -> dict:
    """``Corpus.identity()`` of one csv as it was computed before corpora of several csvs (the reference)."""
    import hashlib

    rows = [line.split(",") for line in csv.read_text().splitlines() if line.strip()]
    arrays = [np.load(csv.parent / r[0], mmap_mode="r") for r in rows]
    shape, dtype = list(arrays[0].shape[1:]), str(arrays[0].dtype)
    layout = [[r[0], len(a), shape, dtype] for r, a in zip(rows, arrays)]
    return {
        "path": str(csv.resolve()), "csv_sha256": hashlib.sha256(csv.read_bytes()).hexdigest(),
        "files_sha256": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
        "n_samples": sum(len(a) for a in arrays), "n_files": len(rows), "sample_shape": shape, "dtype": dtype,
        "groups": sorted({r[1] for r in rows}), "has_target": len(rows[0]) == 3, "integer_inputs": None,
        "files": [{"file": r[0], "bytes": (csv.parent / r[0]).stat().st_size,
                   "mtime_ns": (csv.parent / r[0]).stat().st_mtime_ns} for r in rows]}


def test_read_corpus_of_several_csvs(tmp_path):
    from inntrospect import CorpusError, read_corpus

    a, b, c = (np.full((k, 2), v, np.float32) for k, v in ((3, 0), (2, 1), (4, 2)))
    jan = csv_corpus(tmp_path / "jan", {"batch_0.npy": (a, "x", 1), "batch_1.npy": (b, "y", 0)})
    feb = csv_corpus(tmp_path / "feb", {"batch_0.npy": (c, "new", 2)})
    # one csv, given alone or as a list of one: the identity computed as before, the request a string
    for given in (jan, str(jan), [jan], tmp_path / "jan"):
        corpus = read_corpus(given)
        assert corpus.identity() == old_identity(jan) and corpus.request == str(jan)
    corpus = read_corpus([jan, tmp_path / "feb"])  # a folder works too
    np.testing.assert_array_equal(corpus.read(0, 9), np.concatenate([a, b, c]))
    assert list(corpus.sample_table["file"]) == ["batch_0.npy"] * 3 + ["batch_1.npy"] * 2 + ["../feb/batch_0.npy"] * 4
    assert list(corpus.sample_table["target"]) == [1] * 3 + [0] * 2 + [2] * 4 and corpus.groups == ["new", "x", "y"]
    assert corpus.request == [str(jan), str(feb)] and corpus.csv_paths == (jan, feb)
    ident = corpus.identity(verify=True)
    assert ident["path"] == str(jan) and [c["path"] for c in ident["csvs"]] == [str(jan), str(feb)]
    assert [c["csv_sha256"] for c in ident["csvs"]] == [old_identity(p)["csv_sha256"] for p in (jan, feb)]
    assert [(c["n_files"], c["n_samples"]) for c in ident["csvs"]] == [(2, 5), (1, 4)]
    assert [f["file"] for f in ident["files"]] == ["batch_0.npy", "batch_1.npy", "../feb/batch_0.npy"]
    assert ident["files"][0]["sha256"] != ident["files"][2]["sha256"]
    # a second csv in the first one's folder: its files as written; an absolute path as written
    (tmp_path / "jan" / "late.npy").write_bytes((tmp_path / "feb" / "batch_0.npy").read_bytes())
    rewrite_csv(tmp_path / "jan" / "more.csv", ["late.npy,new,2"])
    rewrite_csv(tmp_path / "abs.csv", [f"{tmp_path / 'feb' / 'batch_0.npy'},new,2"])
    assert read_corpus([jan, tmp_path / "jan" / "more.csv"]).sample_table["file"][-1] == "late.npy"
    assert read_corpus([jan, tmp_path / "abs.csv"], allow_outside=True).sample_table["file"][-1] == \
        str(tmp_path / "feb" / "batch_0.npy")
    # mixed target columns: refused, naming the file and the fix
    nt = csv_corpus(tmp_path / "nt", {"batch_0.npy": (c, "new", None)})
    with pytest.raises(CorpusError, match=rf"{nt}, line 1: the rows of this csv have no target column, but those "
                                          rf"of {jan} have one \(line 1\).*in all of them or in none: add it to the "
                                          rf"rows of {nt}, or remove it from those of {jan}"):
        read_corpus([jan, nt])
    with pytest.raises(CorpusError, match=rf"{jan}, line 1: the rows of this csv have a target column, but those "
                                          rf"of {nt} have none"):
        read_corpus([nt, jan])
    # each csv's own checks, the csv and its line named
    rewrite_csv(tmp_path / "bad.csv", ["feb/batch_0.npy,new,2", "missing.npy,new,2"])
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'bad.csv'}, line 2: batch file 'missing.npy' not found"):
        read_corpus([jan, tmp_path / "bad.csv"])
    rewrite_csv(tmp_path / "bad.csv", ["file,group,target", "feb/batch_0.npy,new,2"])
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'bad.csv'}, line 1: .*It looks like a header row"):
        read_corpus([jan, tmp_path / "bad.csv"])
    rewrite_csv(tmp_path / "feb" / "out.csv", ["../jan/batch_1.npy,y,0"])
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'feb' / 'out.csv'}, line 1: batch file '../jan/batch_1.npy' "
                                          rf"is outside the corpus folder {tmp_path / 'feb'}"):
        read_corpus([jan, tmp_path / "feb" / "out.csv"])
    # a batch file listed in two csvs: refused (counted twice), naming both
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'feb' / 'out.csv'}, line 1: .*listed again \(line 2 of "
                                          rf"{jan} lists it too, in the same group 'y'\)"):
        read_corpus([jan, tmp_path / "feb" / "out.csv"], allow_outside=True)
    assert read_corpus([jan, tmp_path / "feb" / "out.csv"], allow_outside=True, allow_duplicates=True).n_samples == 7
    np.save(tmp_path / "feb" / "wide.npy", np.zeros((2, 3), np.float32))
    rewrite_csv(tmp_path / "feb" / "wide.csv", ["wide.npy,z,0"])
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'feb' / 'wide.csv'}, line 1: samples in wide.npy have "
                                          rf"shape \(3,\), but samples in batch_0.npy \(line 1 of {jan}\)"):
        read_corpus([jan, tmp_path / "feb" / "wide.csv"])
    with pytest.raises(CorpusError, match=r"listed twice in the corpus list \(items 1 and 2\)"):
        read_corpus([jan, tmp_path / "jan"])
    with pytest.raises(CorpusError, match="empty list of csv files"):
        read_corpus([])
    with pytest.raises(CorpusError, match=rf"corpus file {tmp_path / 'nope.csv'} \(item 2 of the corpus list\) "
                                          "does not exist"):
        read_corpus([jan, tmp_path / "nope.csv"])


@needs_shared
def test_run_append_extracts_the_second_csv_and_updates_the_naps_from_it(two_csvs, tmp_path, monkeypatch):
    """``inntrospect run CONFIG --append``: the extraction takes the new csv's samples (in its own
    process, as the pipeline runs it), the NAPs are updated from them alone and equal a full pass."""
    from inntrospect import registry
    from inntrospect.errors import ConfigError
    from inntrospect.pipeline import run

    from ..conftest import write_config

    path = store_copy(two_csvs, tmp_path)
    config = write_config(tmp_path, {
        "model": {"path": CNN, "layers": CNN_LAYERS},
        "corpus": {"path": [str(two_csvs["jan"]), str(two_csvs["feb"])]},
        "store": {"path": path}, "extract": {"batch_size": BATCH},
        "naps": {"aligned": True, "std": True}, "exemplars": {"k": 0}, "cluster": {"threads_per_worker": 1}})
    with pytest.raises(ConfigError, match="give one of them"):
        run(config, append=True, force=True, progress=False)
    for step in ("layout", "topomap", "projection", "plots", "report"):  # the NAPs are what is checked
        monkeypatch.setitem(registry.RUNNERS, step, lambda *a, **k: None)
    done = run(config, append=True, progress=False, echo=lambda _: None)
    assert done["extract"] == done["naps"] == done["contrast"] == "ran"
    attrs = store_attrs(path)
    assert attrs["corpus"]["n_samples"] == 450 and attrs["extraction"]["state"] == "complete"
    assert attrs["steps"]["naps"]["update_of"]["n_samples"] == 300  # updated, not computed anew
    stored = inntrospect.load(path, "naps")
    fresh = dask.compute(inntrospect.naps(path, aligned=True, std=True, persist=False))[0]
    for layer, ds in fresh.items():
        assert "new" in stored[layer].group.values
        for var in ("nap", "std"):
            np.testing.assert_allclose(stored[layer][var].values, ds[var].values, rtol=0, atol=1e-12)
    # nothing left to append: a second run keeps the NAPs and contrasts
    again = run(config, append=True, progress=False, echo=lambda _: None)
    assert again["naps"] == again["contrast"] == "current"


def test_run_lists_append_in_its_help(capsys):
    from inntrospect.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--append" in capsys.readouterr().out
