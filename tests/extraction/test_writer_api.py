"""The public writer API (``inntrospect.open_writer``): activations from any source into a store.

Plain numpy arrays go in; the store must read back bit-identically through
``inntrospect.open_store`` and plain xarray, its NAPs must be the group means,
any batching must give the same store, and an interrupted writer (an
exception, or ``kill -9``) must resume to the store an uninterrupted one writes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst

import inntrospect
from inntrospect import (
    IncompleteStoreError,
    LayerNotFoundError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
)
from inntrospect.store import store_attrs

from ..conftest import python_env

N = 150
LAYERS = {"conv": (5, 4, 3), "fc": (6,)}
GRADS = ["conv"]
SOURCE = {"name": "numpy test model", "sha256": "0" * 64, "framework": "numpy"}
GROUPS = np.array(["b", "a", "c"])[np.arange(N) % 3]  # interleaved, not sorted
#: conv chunks of 2 samples, fc of 16, blocks of 16 samples: 10 blocks, the last one short
CHUNK_MIB = 0.0005
BLOCK = 16
TABLE = ("group", "file", "index_in_file", "target", "prediction")


def make_data(n: int = N, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv": np.maximum(rng.standard_normal((n, *LAYERS["conv"])), 0).astype(np.float32),  # ReLU-like
        "fc": rng.standard_normal((n, *LAYERS["fc"])).astype(np.float32),
        "grad_conv": rng.standard_normal((n, *LAYERS["conv"])).astype(np.float32),
        "pred": rng.integers(0, 3, n),
    }


DATA = make_data()


def open_(path, **kwargs):
    kw = dict(source=SOURCE, grads=GRADS, chunk_mib=CHUNK_MIB, targets=np.arange(N) % 3,
              files=[f"f{i // 50}.npy" for i in range(N)], indices=np.arange(N) % 50)
    kw.update(kwargs)
    return inntrospect.open_writer(path, LAYERS, GROUPS, **kw)


def write(writer, lo: int, hi: int, data=DATA, **kwargs) -> None:
    writer.write({"conv": data["conv"][lo:hi], "fc": data["fc"][lo:hi]}, {"conv": data["grad_conv"][lo:hi]},
                 predictions=data["pred"][lo:hi], **kwargs)


def write_store(path, sizes, **kwargs) -> Path:
    """A complete store written in batches of ``sizes`` (cycled)."""
    with open_(path, **kwargs) as writer:
        lo, i = 0, 0
        while lo < N:
            hi = min(N, lo + sizes[i % len(sizes)])
            write(writer, lo, hi)
            lo, i = hi, i + 1
    assert writer.complete
    return Path(path)


ARRAYS = [(layer, var) for layer in LAYERS for var in ("acts", "grads", *TABLE)
          if var != "grads" or layer in GRADS]


def assert_same_store(a, b) -> None:
    """Every array bit-identical; the root attributes equal but for the extraction's id and times."""
    for layer, var in ARRAYS:
        x = zarr.open_array(str(a), path=f"layers/{layer}/{var}", mode="r")
        y = zarr.open_array(str(b), path=f"layers/{layer}/{var}", mode="r")
        assert x.chunks == y.chunks, (layer, var)
        np.testing.assert_array_equal(x[:], y[:], err_msg=f"{layer}/{var}")
    ra, rb = store_attrs(a), store_attrs(b)
    for attrs in (ra, rb):
        attrs["extraction"] = {k: v for k, v in attrs["extraction"].items() if k not in ("id", "started", "finished")}
    assert ra == rb


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The store written in one batch."""
    return write_store(tmp_path_factory.mktemp("ref") / "ref.zarr", [N])


# -- reading back ----------------------------------------------------------------
def test_numpy_arrays_read_back_bit_identical(tmp_path, reference):
    path = write_store(tmp_path / "s.zarr", [7])
    tree = inntrospect.open_store(path)
    plain = xr.open_datatree(str(path), engine="zarr")  # no inntrospect needed to read it
    for t in (tree, plain):
        conv, fc = t["layers/conv"], t["layers/fc"]
        assert conv.acts.dims == ("sample", "y", "x", "unit") and fc.acts.dims == ("sample", "unit")
        np.testing.assert_array_equal(conv.acts.values, DATA["conv"])
        np.testing.assert_array_equal(conv.grads.values, DATA["grad_conv"])
        np.testing.assert_array_equal(fc.acts.values, DATA["fc"])
        assert "grads" not in fc
        for node in (conv, fc):  # every node carries the sample table
            assert [str(g) for g in node.group.values] == GROUPS.tolist()
            np.testing.assert_array_equal(node.prediction.values, DATA["pred"])
            np.testing.assert_array_equal(node.target.values, np.arange(N) % 3)
            np.testing.assert_array_equal(node.index_in_file.values, np.arange(N) % 50)
            assert str(node.file.values[120]) == "f2.npy"
    attrs = tree.attrs
    assert attrs["extraction"]["state"] == "complete" and attrs["extraction"]["source"] == "writer"
    assert attrs["model"] == SOURCE
    assert attrs["layers"] == list(LAYERS)
    assert attrs["chunks"] == {"conv": 2, "fc": 16} and attrs["extraction"]["block"] == BLOCK
    assert attrs["corpus"]["groups"] == ["a", "b", "c"] and attrs["corpus"]["n_samples"] == N
    # codecs chosen as extraction chooses them: the ReLU-like acts compress, the noise does not
    assert attrs["codecs"] == {"conv": {"acts": {"name": "zstd", "level": 1}, "grads": None}, "fc": {"acts": None}}
    assert inntrospect.verify(path).ok
    assert_same_store(path, reference)


def test_naps_equal_numpy_group_means(reference):
    naps = inntrospect.naps(reference)
    for layer, values in (("conv", DATA["conv"]), ("fc", DATA["fc"])):
        nap = naps[layer].nap.compute()
        assert [str(g) for g in nap.group.values] == ["a", "b", "c"]
        for g in "abc":
            want = values[GROUPS == g].astype(np.float64).mean(axis=0)
            np.testing.assert_allclose(nap.sel(group=g).values, want, rtol=1e-6, atol=1e-7)
        assert naps[layer]["count"].values.tolist() == [50, 50, 50]


def test_predictions_left_out_are_minus_one(tmp_path):
    with open_(tmp_path / "s.zarr") as writer:
        writer.write({"conv": DATA["conv"], "fc": DATA["fc"]}, {"conv": DATA["grad_conv"]})
    tree = inntrospect.open_store(tmp_path / "s.zarr")
    assert (tree["layers/fc"].prediction.values == -1).all()
    assert inntrospect.verify(tmp_path / "s.zarr").ok


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=hst.lists(hst.integers(1, 40), min_size=1, max_size=8))
def test_any_batch_sizes_give_the_same_store(tmp_path_factory, reference, sizes):
    path = write_store(tmp_path_factory.mktemp("batches") / "s.zarr", sizes)
    assert_same_store(path, reference)


def test_views_instead_of_copies_give_the_same_store(tmp_path, reference):
    data = {k: v.copy() for k, v in DATA.items()}
    with open_(tmp_path / "s.zarr") as writer:
        for lo in range(0, N, 23):
            write(writer, lo, min(N, lo + 23), data=data, copy=False)
    assert_same_store(tmp_path / "s.zarr", reference)


def test_copies_let_the_caller_reuse_its_arrays(tmp_path, reference):
    buf = {k: np.empty((10, *v.shape[1:]), v.dtype) for k, v in DATA.items()}
    with open_(tmp_path / "s.zarr") as writer:
        for lo in range(0, N, 10):
            for k in buf:
                buf[k][:] = DATA[k][lo : lo + 10]
            write(writer, 0, 10, data=buf)  # the same buffers, overwritten at every batch
    assert_same_store(tmp_path / "s.zarr", reference)


# -- interruption and resume -------------------------------------------------------
def test_an_exception_in_the_with_block_leaves_it_incomplete_and_it_resumes(tmp_path, reference):
    path = tmp_path / "s.zarr"
    recorded = []
    with pytest.raises(RuntimeError, match="stop"), open_(path, on_block=lambda b, n: recorded.append(b)) as writer:
        for lo in range(0, 70, 7):
            write(writer, lo, lo + 7)
            if lo == 35:
                time.sleep(0.3)  # the writes of the first blocks finish: the next write records them
        raise RuntimeError("stop")
    assert recorded and recorded == list(range(len(recorded)))
    assert store_attrs(path)["extraction"]["state"] == "incomplete"
    with pytest.raises(IncompleteStoreError):
        inntrospect.open_store(path)
    with pytest.raises(IncompleteStoreError):
        inntrospect.naps(path)
    first_id = store_attrs(path)["extraction"]["id"]

    with open_(path) as writer:
        start = writer.next_sample
        assert start == len(recorded) * BLOCK and 0 < start < 70  # the part-written block is written again
        assert writer.todo == [(start, N)]
        for lo in range(start, N, 11):
            write(writer, lo, min(N, lo + 11))
    assert writer.complete and writer.blocks_recorded == list(range(len(recorded), 10))
    assert store_attrs(path)["extraction"]["id"] == first_id  # the same writing, resumed
    assert_same_store(path, reference)


def test_a_resumed_writer_starts_at_next_sample(tmp_path, reference):
    path = tmp_path / "s.zarr"
    with open_(path) as writer:
        write(writer, 0, 50)
    with open_(path) as writer:
        assert writer.next_sample == 48
        with pytest.raises(ParameterError, match="in order.*sample 48"):
            write(writer, 0, 10, start=0)
        write(writer, 48, N)
    assert_same_store(path, reference)


def test_a_close_before_the_end_leaves_it_incomplete_with_a_warning(tmp_path, reference, caplog):
    path = tmp_path / "s.zarr"
    with open_(path) as writer:
        write(writer, 0, 40)
    assert not writer.complete
    assert "resumes at sample 32" in caplog.text
    with pytest.raises(StoreError, match="closed"):
        write(writer, 40, 50)
    with open_(path) as writer:
        write(writer, writer.next_sample, N)
    assert_same_store(path, reference)


def test_a_store_with_fewer_samples_than_the_codec_probe_is_made_at_close(tmp_path):
    with open_(tmp_path / "s.zarr") as writer:
        write(writer, 0, 5)
    assert store_attrs(tmp_path / "s.zarr")["extraction"]["state"] == "incomplete"
    with open_(tmp_path / "s.zarr") as writer:
        assert writer.next_sample == 0
    with pytest.raises(RuntimeError), open_(tmp_path / "t.zarr") as writer:
        write(writer, 0, 5)
        raise RuntimeError
    assert not (tmp_path / "t.zarr").exists()  # nothing was made


def test_a_recorded_block_with_a_missing_chunk_is_written_again(tmp_path, reference):
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    (path / "layers" / "conv" / "grads" / "c" / "20" / "0" / "0" / "0").unlink()  # samples 40-41: block 2
    with open_(path) as writer:
        assert writer.next_sample == 2 * BLOCK and writer.todo == [(32, 48)]
        write(writer, 32, N)  # rows of the blocks recorded after it are dropped
    assert writer.blocks_recorded == [2] and writer.complete
    assert_same_store(path, reference)


WRITER = """
import os, sys, time
import numpy as np
import inntrospect

data = {{k: np.load(os.path.join({folder!r}, k + ".npy")) for k in ("conv", "fc", "grad_conv", "pred")}}
groups = np.load(os.path.join({folder!r}, "groups.npy"))
with inntrospect.open_writer({store!r}, {layers!r}, groups, source={source!r}, grads={grads!r},
                             chunk_mib={mib!r}) as writer:
    for lo in range(writer.next_sample, len(groups), 5):
        hi = min(len(groups), lo + 5)
        while lo >= 100 and os.path.exists({hold!r}):  # the test tries a second writer meanwhile
            time.sleep(0.01)
        writer.write({{"conv": data["conv"][lo:hi], "fc": data["fc"][lo:hi]}}, {{"conv": data["grad_conv"][lo:hi]}},
                     predictions=data["pred"][lo:hi])
        time.sleep(0.02)
"""


def recorded_blocks(path: Path) -> int:
    folder = path / "extraction" / "block_done" / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_kill_9_mid_write_then_resume_gives_the_same_store(tmp_path):
    n = 400
    data = make_data(n, seed=3)
    groups = np.array(["x", "y"])[np.arange(n) % 2]
    for k, v in data.items():
        np.save(tmp_path / f"{k}.npy", v)
    np.save(tmp_path / "groups.npy", groups)
    path, held = tmp_path / "k.zarr", tmp_path / "hold"
    held.touch()
    code = WRITER.format(folder=str(tmp_path), store=str(path), layers=LAYERS, source=SOURCE, grads=GRADS,
                         mib=CHUNK_MIB, hold=str(held))
    proc = subprocess.Popen([sys.executable, "-c", code], env=python_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while recorded_blocks(path) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the writer did not start"
            time.sleep(0.01)
        with pytest.raises(StoreLockedError, match="another process"):
            inntrospect.open_writer(path, LAYERS, groups, source=SOURCE, grads=GRADS, chunk_mib=CHUNK_MIB)
        held.unlink()
        while recorded_blocks(path) < 8:  # let it write on, then kill it in the middle of a block
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.005)
        time.sleep(0.03)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    done = np.asarray(zarr.open_array(str(path / "extraction" / "block_done"), mode="r")[:], bool)
    assert 8 <= done.sum() < len(done), "the kill should land mid-run"
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs["extraction"]["state"] == "incomplete"

    def write_all(p, first=None):
        with inntrospect.open_writer(p, LAYERS, groups, source=SOURCE, grads=GRADS, chunk_mib=CHUNK_MIB) as w:
            if first is not None:
                assert w.next_sample == first
            for lo in range(w.next_sample, n, 9):
                hi = min(n, lo + 9)
                w.write({"conv": data["conv"][lo:hi], "fc": data["fc"][lo:hi]}, {"conv": data["grad_conv"][lo:hi]},
                        predictions=data["pred"][lo:hi])
        return w

    resumed = write_all(path, first=int(np.flatnonzero(~done)[0]) * BLOCK)
    assert resumed.blocks_recorded == [int(b) for b in np.flatnonzero(~done)]  # recorded blocks kept
    write_all(tmp_path / "ref.zarr")
    for layer, var in ARRAYS:
        a = zarr.open_array(str(path), path=f"layers/{layer}/{var}", mode="r")[:]
        b = zarr.open_array(str(tmp_path / "ref.zarr"), path=f"layers/{layer}/{var}", mode="r")[:]
        np.testing.assert_array_equal(a, b, err_msg=f"{layer}/{var}")


# -- what is refused ----------------------------------------------------------------
def test_a_store_of_another_source_layers_or_table_is_refused(tmp_path, reference):
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    with pytest.raises(StoreMismatchError, match=r"source: the store was written from .*numpy test model"):
        open_(path, source={"name": "another model"})
    with pytest.raises(StoreMismatchError, match=r"source:"):
        open_(path, source={**SOURCE, "sha256": "1" * 64})
    with pytest.raises(StoreMismatchError, match=r"layers: the store has conv \(5, 4, 3\) with grads"):
        inntrospect.open_writer(path, {"conv": (5, 4, 2), "fc": (6,)}, GROUPS, source=SOURCE, grads=GRADS,
                                chunk_mib=CHUNK_MIB)
    with pytest.raises(StoreMismatchError, match=r"layers:"):
        open_(path, grads=True)
    other = GROUPS.copy()
    other[17] = "z"
    with pytest.raises(StoreMismatchError, match=r"sample table: the group of sample 17 is 'c' in the store, 'z'"):
        inntrospect.open_writer(path, LAYERS, other, source=SOURCE, grads=GRADS, chunk_mib=CHUNK_MIB,
                                targets=np.arange(N) % 3, files=[f"f{i // 50}.npy" for i in range(N)],
                                indices=np.arange(N) % 50)
    with pytest.raises(StoreMismatchError, match=r"(?s)the store holds 150 samples, now 151.*overwrite=True"):
        inntrospect.open_writer(path, LAYERS, [*GROUPS, "a"], source=SOURCE, grads=GRADS, chunk_mib=CHUNK_MIB)
    with pytest.raises(StoreMismatchError, match=r"gradient_target"):
        open_(path, gradient_target="predicted")
    assert store_attrs(path)["extraction"]["state"] == "complete"  # refused: nothing changed
    # the same arguments on a complete store: nothing left to write
    with open_(path) as writer:
        assert writer.next_sample == N and writer.todo == []
        with pytest.raises(ParameterError, match="past the end"):
            write(writer, 0, 1, start=N)
    assert writer.complete
    with open_(path, source={"name": "another model"}, overwrite=True) as writer:
        write(writer, 0, N)
    assert store_attrs(path)["model"]["name"] == "another model"


def test_an_extracted_store_is_refused(tmp_path, reference):
    from inntrospect.testing import store_from_arrays

    path = store_from_arrays(tmp_path / "x.zarr", {"conv": DATA["conv"], "fc": DATA["fc"]}, GROUPS)
    with pytest.raises(StoreMismatchError, match="source:"):
        open_(path)


def test_a_second_writer_is_refused(tmp_path):
    with open_(tmp_path / "s.zarr") as writer:
        with pytest.raises(StoreLockedError):
            open_(tmp_path / "s.zarr")
        write(writer, 0, N)


@pytest.fixture
def writer(tmp_path):
    w = open_(tmp_path / "s.zarr")
    yield w
    w.close()


def batch(lo=0, hi=10, **changes):
    acts = {"conv": DATA["conv"][lo:hi], "fc": DATA["fc"][lo:hi]}
    grads = {"conv": DATA["grad_conv"][lo:hi]}
    for key, value in changes.items():
        var, layer = key.split("_")
        target = acts if var == "acts" else grads
        if value is None:
            del target[layer]
        else:
            target[layer] = value
    return acts, grads


BAD_WRITES = [
    # (what, batch changes, write keywords, error, message)
    ("a layer missing", dict(acts_fc=None), {}, ParameterError, r"acts lacks layer\(s\) 'fc'"),
    ("grads missing", dict(grads_conv=None), {}, ParameterError, r"grads lacks layer\(s\) 'conv'"),
    ("an unknown layer", dict(acts_fc2=np.zeros((10, 6))), {}, LayerNotFoundError, r"'fc2'.*layers are: conv, fc"),
    ("grads of a layer without", dict(grads_fc=np.zeros((10, 6))), {}, LayerNotFoundError,
     r"grads has layer\(s\) 'fc'.*grads=True"),
    ("a wrong shape", dict(acts_conv=np.zeros((10, 4, 5, 3), np.float32)), {}, ParameterError,
     r"acts\['conv'\] has shape \(10, 4, 5, 3\); expected \(samples, 5, 4, 3\)"),
    ("no sample axis", dict(acts_fc=np.zeros(6, np.float32)), {}, ParameterError, r"expected \(samples, 6\)"),
    ("complex values", dict(acts_fc=np.zeros((10, 6), complex)), {}, ParameterTypeError,
     r"acts\['fc'\] holds complex128 values.*float32"),
    ("strings", dict(grads_conv=np.full((10, 5, 4, 3), "x")), {}, ParameterTypeError, r"grads\['conv'\] holds <U1"),
    ("different sample counts", dict(acts_fc=DATA["fc"][:9]), {}, ParameterError,
     r"acts\['fc'\] has 9 samples but acts\['conv'\] has 10"),
    ("predictions misshapen", {}, dict(predictions=np.zeros(9, int)), ParameterError, r"predictions has shape \(9,\)"),
    ("predictions not classes", {}, dict(predictions=np.zeros(10)), ParameterTypeError, "predictions holds float64"),
    ("groups not the table's", {}, dict(groups=["b", "a", "c", "b", "a", "c", "a", "a", "c", "b"]), ParameterError,
     r"groups do not match the sample table .*: sample 6 is 'b' there but 'a' in this write \(1 of 10"),
    ("out of order", {}, dict(start=5), ParameterError, "skip ahead only to the start of a block"),
    ("a start that is no index", {}, dict(start=1.5), ParameterTypeError, "start must be a sample index"),
]


@pytest.mark.parametrize("what, changes, kwargs, error, message", BAD_WRITES, ids=[w[0] for w in BAD_WRITES])
def test_a_bad_write_raises_its_error_and_writes_nothing(writer, what, changes, kwargs, error, message):
    acts, grads = batch(**changes)
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        writer.write(acts, grads, predictions=kwargs.pop("predictions", DATA["pred"][:10]), **kwargs)
    assert writer.next_sample == 0  # nothing taken: the writer goes on
    write(writer, 0, N)
    writer.close()
    assert writer.complete


def test_non_finite_values_are_refused_naming_the_sample(writer):
    write(writer, 0, 20)
    for bad in (np.nan, np.inf, -np.inf):
        conv = DATA["conv"][20:30].copy()
        conv[3, 1, 2, 0] = bad
        with pytest.raises(NonFiniteError, match=r"acts of layer 'conv' at sample 23 \(f0.npy, index 23\) contain "
                                                 r"NaN or infinity"):
            writer.write({"conv": conv, "fc": DATA["fc"][20:30]}, {"conv": DATA["grad_conv"][20:30]},
                         predictions=DATA["pred"][20:30])
    grads = DATA["grad_conv"][20:30].astype(np.float64)
    grads[9, 0, 0, 0] = 1e39  # finite, but not as float32
    with pytest.raises(NonFiniteError, match=r"grads of layer 'conv' at sample 29 .*after conversion to float32"):
        writer.write({"conv": DATA["conv"][20:30], "fc": DATA["fc"][20:30]}, {"conv": grads},
                     predictions=DATA["pred"][20:30])
    assert writer.next_sample == 20
    write(writer, 20, N)
    writer.close()
    assert writer.complete


def test_non_finite_views_stop_the_writer_and_it_resumes(tmp_path, reference):
    """With copy=False the writer's threads check the arrays as they write them (extraction's way)."""
    path = tmp_path / "s.zarr"
    data = {k: v.copy() for k, v in DATA.items()}
    data["fc"][70, 2] = np.nan
    message = r"acts of layer 'fc' at sample 70 .*the writer stops"
    writer = open_(path)
    try:  # found by a later write, or at the latest when the writer closes
        for lo in range(0, N, 10):
            write(writer, lo, min(N, lo + 10), data=data, copy=False)
    except NonFiniteError as err:
        assert re.search(message, str(err))
        with pytest.raises(StoreError, match="an earlier write .* failed"):
            write(writer, lo + 10, lo + 20)
        writer.close()
    else:
        with pytest.raises(NonFiniteError, match=message):
            writer.close()
    assert store_attrs(path)["extraction"]["state"] == "incomplete"
    with open_(path) as writer:
        assert writer.next_sample <= 64  # the block of sample 70 was not recorded
        write(writer, writer.next_sample, N, copy=False)
    assert_same_store(path, reference)


def test_writes_out_of_order_or_past_the_end_are_refused(writer):
    write(writer, 0, 20)
    with pytest.raises(ParameterError, match=r"in order: this write starts at sample 10, but the writer is at "
                                             r"sample 20"):
        write(writer, 10, 20, start=10)
    with pytest.raises(ParameterError, match=r"writer is at sample 20, inside a block of 16 samples \(16\.\.31\)"):
        write(writer, 32, 40, start=32)
    write(writer, 20, 140)
    with pytest.raises(ParameterError, match=r"this write of 11 samples from sample 140 goes past the end of the "
                                             r"store: it holds 150 samples"):
        writer.write({"conv": DATA["conv"][:11], "fc": DATA["fc"][:11]}, {"conv": DATA["grad_conv"][:11]},
                     predictions=DATA["pred"][:11])
    write(writer, 140, N)


def test_skipping_whole_blocks_leaves_them_to_a_later_writer(tmp_path, reference):
    path = tmp_path / "s.zarr"
    with open_(path) as writer:
        write(writer, 0, 32)
        write(writer, 64, N, start=64)  # blocks 2 and 3 skipped
        assert writer.todo == []
    assert not writer.complete
    with open_(path) as writer:
        assert writer.todo == [(32, 64)]
        write(writer, 32, 64)
        with pytest.raises(ParameterError, match="in order"):
            write(writer, 40, 50, start=40)
    assert writer.complete
    assert_same_store(path, reference)


def test_gradient_target_needs_predictions(tmp_path):
    with open_(tmp_path / "s.zarr", gradient_target="predicted") as writer:
        with pytest.raises(ParameterError, match="every write gives predictions"):
            writer.write({"conv": DATA["conv"][:4], "fc": DATA["fc"][:4]}, {"conv": DATA["grad_conv"][:4]})
        write(writer, 0, N)
    assert store_attrs(tmp_path / "s.zarr")["extraction"]["gradient_target"] == "predicted"
    assert inntrospect.verify(tmp_path / "s.zarr").ok


BAD_OPENS = [
    ("groups not one per sample", dict(n_samples=149), ParameterError, "n_samples is 149 but groups has 150"),
    ("no groups", dict(groups=[]), ParameterError, "at least one sample"),
    ("a string of groups", dict(groups="abc"), ParameterTypeError, "groups must be a sequence"),
    ("an empty label", dict(groups=["", *GROUPS[1:]]), ParameterError, "sample 0 has an empty label"),
    ("no layers", dict(layers={}), ParameterTypeError, "layers must be a non-empty mapping"),
    ("a shape that is none", dict(layers={"fc": (0,)}, grads=False), ParameterError, r"shape of layer 'fc'.*\(128,\)"),
    ("a scalar layer", dict(layers={"fc": ()}, grads=False), ParameterError, "at least a unit axis"),
    ("a name with a slash", dict(layers={"a/b": (3,)}, grads=False), ParameterError, "without '/'"),
    ("grads of an unknown layer", dict(grads=["nope"]), LayerNotFoundError, r"\['nope'\].*conv, fc"),
    ("no source", dict(source=None), ParameterTypeError, "source must be a non-empty dict"),
    ("a source that is no JSON", dict(source={"model": object()}), ParameterTypeError, "JSON values"),
    ("targets of another length", dict(targets=[1, 2]), ParameterError, r"targets must hold one value per sample"),
    ("files of another length", dict(files=["a"]), ParameterError, r"files must hold one value per sample"),
    ("a target below -1", dict(targets=np.full(N, -2)), ParameterError, "-1 where a sample has none"),
    ("gradient target without targets", dict(gradient_target="target", targets=None), ParameterError,
     "needs targets"),
    ("an unknown gradient target", dict(gradient_target="argmax"), ParameterError, "'predicted', 'target' or None"),
    ("a chunk size out of range", dict(chunk_mib=-1), ParameterError, "chunk_mib must be a number"),
]


@pytest.mark.parametrize("what, kwargs, error, message", BAD_OPENS, ids=[b[0] for b in BAD_OPENS])
def test_bad_arguments_of_open_writer_are_refused_before_anything_is_written(tmp_path, what, kwargs, error,
                                                                             message):
    kw = dict(layers=LAYERS, groups=GROUPS, source=SOURCE, grads=GRADS)
    kw.update(kwargs)
    with pytest.raises(error, match=message):
        inntrospect.open_writer(tmp_path / "s.zarr", **kw)
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "s.zarr.lock").exists()


def test_the_api_is_exported_flat():
    assert inntrospect.open_writer.__module__ == "inntrospect.extraction.writer"
    assert "open_writer" in inntrospect.__all__ and "StoreWriter" in inntrospect.__all__
    assert "Examples" in inntrospect.open_writer.__doc__ and "Examples" in inntrospect.StoreWriter.__doc__


# -- import-legacy, rebuilt on the writer -------------------------------------------
def test_an_interrupted_legacy_import_resumes_to_the_same_store(tmp_path, monkeypatch):
    from inntrospect.extraction import legacy

    from .test_legacy import write_folder

    write_folder(tmp_path / "c")
    ref = legacy.import_legacy(tmp_path / "c", tmp_path / "ref.zarr", chunk_mib=0.0005)  # blocks of 8
    real, calls = legacy.ChunkStream.push, []

    def failing(self, rows, file):
        calls.append(file)
        if len(calls) == 21:  # the 5th of 6 batch files: the writes of the first 4 are done
            time.sleep(0.5)  # (so the 5th's write records their blocks)
        if len(calls) == 30:  # the last one
            raise KeyboardInterrupt
        return real(self, rows, file)

    monkeypatch.setattr(legacy.ChunkStream, "push", failing)
    with pytest.raises(KeyboardInterrupt):
        legacy.import_legacy(tmp_path / "c", tmp_path / "s.zarr", chunk_mib=0.0005)
    done = np.asarray(zarr.open_array(str(tmp_path / "s.zarr" / "extraction" / "block_done"), mode="r")[:], bool)
    assert 0 < done.sum() < len(done)
    monkeypatch.setattr(legacy.ChunkStream, "push", real)
    read = []
    monkeypatch.setattr(legacy, "read_rows", lambda p: read.append(p.name) or np.load(p, mmap_mode="r"))
    legacy.import_legacy(tmp_path / "c", tmp_path / "s.zarr")  # no overwrite: resumed, chunking kept
    assert 0 < len(read) < 5 * 8  # batch files of recorded blocks are not read again
    attrs = store_attrs(ref)
    for layer in attrs["layers"]:
        for var in ("acts", "grads", "prediction", "group", "file", "index_in_file"):
            if var == "grads" and layer == "layer002":
                continue
            np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "s.zarr"), path=f"layers/{layer}/{var}")[:],
                                          zarr.open_array(str(ref), path=f"layers/{layer}/{var}")[:])
    assert store_attrs(tmp_path / "s.zarr")["extraction"]["state"] == "complete"
    with pytest.raises(StoreError, match="already exists and holds a store.*overwrite=True"):
        legacy.import_legacy(tmp_path / "c", tmp_path / "s.zarr")



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_the_writer_threads_run_nicer_than_the_caller(tmp_path, monkeypatch):
    """The model's threads get the cores first: the writer threads run WRITER_NICE steps nicer than
    the caller (at most 19); chunks the caller writes itself, when it would wait for them, are written
    at its own priority, which is left alone."""
    import os
    import threading
    import time

    from inntrospect.extraction import writer as writer_module
    from inntrospect.store import chunkio

    seen, real = [], chunkio.write_chunk

    def write_chunk(rec, data):
        seen.append((threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        time.sleep(0.02)  # slow writes: the writer thread holds one while the caller, closing, helps
        return real(rec, data)

    monkeypatch.setattr(chunkio, "write_chunk", write_chunk)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with open_(tmp_path / "s.zarr") as writer:
        writer.write({"conv": DATA["conv"], "fc": DATA["fc"]}, {"conv": DATA["grad_conv"]})
    caller = threading.get_native_id()
    assert any(tid != caller for tid, _ in seen)
    assert {nice for tid, nice in seen if tid != caller} == {min(19, mine + writer_module.WRITER_NICE)}
    assert {nice for tid, nice in seen if tid == caller} <= {mine}
    assert os.getpriority(os.PRIO_PROCESS, caller) == mine
