"""Nothing silently wrong: checksums on every chunk, missing and damaged chunks as errors, verify, repair.

Faults are injected into real stores on disk: a chunk file deleted, a whole
``acts/c`` folder deleted, a byte flipped inside a zstd chunk, a chunk
truncated, an uncompressed chunk of the wrong size, a damaged block record.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import zarr

import inntrospect
from inntrospect import DamagedStoreError
from inntrospect import store as st
from inntrospect.analysis import profiles
from inntrospect.cli import main
from inntrospect.store import chunkio, codecs
from inntrospect.testing import store_from_arrays

from ..conftest import BATCH, CNN, CNN_LAYERS, needs_shared, write_config

ZSTD = {"name": "zstd", "level": 1}
N, CHUNK = 75, 16  # 5 chunks of acts per layer, the last one short; blocks of 16 samples


def make_store(path, codec=None):
    """A small complete store: ``conv`` (4, 5, 6) with gradients and ``dense`` (6); acts zstd, grads raw."""
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((N, 4, 5, 6)), 0).astype(np.float32)
    g = rng.standard_normal((N, 4, 5, 6)).astype(np.float32)
    labels = rng.choice(list("abc"), N)
    codec = {"acts": ZSTD, "grads": None} if codec is None else codec
    return store_from_arrays(path, {"conv": x, "dense": x[:, 0, 0]}, labels, grads={"conv": g},
                             chunks=CHUNK, codec=codec)


def chunk(path, layer="conv", var="acts", k=1):
    return path / "layers" / layer / var / "c" / str(k) / "0" / "0" / "0" if layer == "conv" \
        else path / "layers" / layer / var / "c" / str(k) / "0"


def flip(file, at=None):
    """Flip one bit in the middle of a chunk file (not in its last 4 bytes, the checksum)."""
    data = bytearray(file.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x10
    file.write_bytes(bytes(data))


@pytest.fixture
def via_zarr(monkeypatch):
    """NAPs read through Zarr (as for stores in object storage) rather than from the chunk files."""
    monkeypatch.setattr(profiles.chunkio, "chunk_files", lambda arr: None)


@pytest.fixture
def small(tmp_path):
    return make_store(tmp_path / "s.zarr")


# -- checksums written -------------------------------------------------------------
def test_every_array_written_carries_a_crc32c_last(small):
    inntrospect.align(small, persist=True)
    inntrospect.naps(small, aligned=True, persist=True)
    root = zarr.open_group(str(small), mode="r")
    assert root.attrs["checksum"] == "crc32c"
    arrays = [name for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)]
    assert {"layers/conv/acts", "layers/conv/grads", "layers/conv/aligned", "layers/conv/group",
            "layers/conv/prediction", "extraction/block_done", "naps/conv/nap", "naps/conv/count",
            "naps/conv/group"} <= set(arrays)
    for name in arrays:
        codecs_ = root[name].metadata.codecs
        assert type(codecs_[-1]).__name__ == "Crc32cCodec", name
    assert [type(c).__name__ for c in root["layers/conv/acts"].metadata.codecs] == \
        ["BytesCodec", "ZstdCodec", "Crc32cCodec"]  # after zstd: the checksum covers what is stored
    assert [type(c).__name__ for c in root["layers/conv/grads"].metadata.codecs] == \
        ["BytesCodec", "Crc32cCodec"]


def test_a_store_without_checksums_stays_readable(tmp_path, monkeypatch):
    monkeypatch.setattr(codecs, "CHECKSUM", None)
    path = make_store(tmp_path / "old.zarr")
    monkeypatch.undo()
    assert [type(c).__name__ for c in zarr.open_array(str(path), path="layers/conv/acts").metadata.codecs] \
        == ["BytesCodec", "ZstdCodec"]
    ref = make_store(tmp_path / "new.zarr")
    for aligned in (False, True):
        old, new = (inntrospect.naps(p, aligned=aligned)["conv"].nap.values for p in (path, ref))
        np.testing.assert_array_equal(old, new)
    report = inntrospect.verify(path)
    assert report.ok and "layers/conv/acts" in report.unchecked
    assert "no checksums in" in str(report)


# -- missing chunks ------------------------------------------------------------------
@pytest.mark.parametrize("route", ["chunk files", "zarr"])
def test_a_deleted_chunk_of_acts_is_an_error_naming_it_not_nan(small, route, request):
    if route == "zarr":
        request.getfixturevalue("via_zarr")
    chunk(small, k=2).unlink()
    for aligned in (False, True):
        with pytest.raises(DamagedStoreError, match=r"layers/conv/acts/c/2/0/0/0 is missing") as err:
            inntrospect.naps(small, aligned=aligned)["conv"].compute()
        assert f"inntrospect verify {small}" in str(err.value)
        assert "inntrospect extract CONFIG --verify" in str(err.value)


def test_a_deleted_chunk_of_a_tree_s_store_is_an_error_too(small):
    tree = inntrospect.open_store(small)
    chunk(small, var="grads", k=0).unlink()
    with pytest.raises(DamagedStoreError, match=r"layers/conv/grads/c/0/0/0/0 is missing"):
        inntrospect.naps(tree, aligned=True)


def test_align_refuses_a_store_with_a_deleted_chunk(small):
    chunk(small, var="grads", k=4).unlink()
    with pytest.raises(DamagedStoreError, match=r"layers/conv/grads/c/4/0/0/0 is missing"):
        inntrospect.align(small, persist=True)
    assert "align" not in st.store_attrs(small).get("steps", {})  # nothing recorded


def test_a_whole_acts_folder_deleted(small):
    shutil.rmtree(small / "layers" / "conv" / "acts" / "c")
    with pytest.raises(DamagedStoreError, match=r"acts/c/0/0/0/0 is missing.*and so are 4 more"):
        inntrospect.naps(small)
    with pytest.raises(DamagedStoreError, match=r"acts/c/0/0/0/0 is missing"):
        inntrospect.align(small, persist=True)
    assert st.missing_chunks(small, "conv", "acts") == [f"c/{k}/0/0/0" for k in range(5)]
    report = inntrospect.verify(small)
    assert not report.ok and report.damaged_blocks == [0, 1, 2, 3, 4]
    assert [p.blocks for p in report.problems] == [(k,) for k in range(5)]


def test_a_deleted_chunk_of_aligned_names_align_as_the_fix(small):
    inntrospect.align(small, persist=True)
    chunk(small, var="aligned", k=1).unlink()
    with pytest.raises(DamagedStoreError, match=r"aligned/c/1/0/0/0 is missing.*inntrospect align CONFIG"):
        inntrospect.naps(small, aligned=True)
    report = inntrospect.verify(small)
    assert [(p.array, p.chunk, p.blocks) for p in report.problems] == [("layers/conv/aligned", "c/1/0/0/0", (1,))]
    assert report.damaged_blocks == []  # not repaired by extracting again: align is re-run


# -- damaged chunks ------------------------------------------------------------------
@pytest.mark.parametrize("route", ["chunk files", "zarr"])
def test_a_flipped_byte_in_a_zstd_chunk_fails_its_checksum(small, route, request):
    if route == "zarr":
        request.getfixturevalue("via_zarr")
    flip(chunk(small, k=3))
    with pytest.raises(DamagedStoreError, match=r"acts/c/3/0/0/0 fails its crc32c checksum") as err:
        inntrospect.naps(small)["conv"].compute()
    assert "inntrospect extract CONFIG --verify" in str(err.value)


def test_a_flipped_byte_read_through_a_tree_is_zarr_s_checksum_error(small):
    flip(chunk(small, k=3))
    with pytest.raises(ValueError, match="checksum"):  # Zarr's own error: xarray reads the chunks there
        inntrospect.naps(inntrospect.open_store(small))["conv"].compute()


def test_verify_reports_a_flipped_byte_with_its_block(small):
    flip(chunk(small, k=3))
    flip(chunk(small, "dense", "acts", k=0))
    report = inntrospect.verify(small)
    assert not report.ok
    assert [(p.array, p.chunk, p.blocks) for p in report.problems] == [
        ("layers/conv/acts", "c/3/0/0/0", (3,)), ("layers/dense/acts", "c/0/0", (0,))]
    assert all("fails its crc32c checksum" in p.problem for p in report.problems)
    assert report.damaged_blocks == [0, 3]
    text = str(report)
    assert str(chunk(small, k=3)) in text and "(block 3)" in text
    assert "extraction blocks to extract again: 0, 3" in text


@pytest.mark.parametrize("checksum", ["crc32c", None])
def test_a_truncated_zstd_chunk_is_an_error_not_a_traceback(tmp_path, monkeypatch, checksum):
    monkeypatch.setattr(codecs, "CHECKSUM", checksum)
    path = make_store(tmp_path / "s.zarr")
    f = chunk(path, k=1)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    why = "fails its crc32c checksum" if checksum else "does not decode"
    with pytest.raises(DamagedStoreError, match=rf"acts/c/1/0/0/0 {why}"):
        inntrospect.naps(path)["conv"].compute()
    report = inntrospect.verify(path)
    assert [(p.chunk, p.blocks) for p in report.problems] == [("c/1/0/0/0", (1,))]


@pytest.mark.parametrize("checksum", ["crc32c", None])
def test_an_uncompressed_chunk_of_the_wrong_size_is_an_error(tmp_path, monkeypatch, checksum):
    monkeypatch.setattr(codecs, "CHECKSUM", checksum)
    path = make_store(tmp_path / "s.zarr")
    f = chunk(path, var="grads", k=2)
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DamagedStoreError, match=r"grads/c/2/0/0/0 (holds \d+ bytes|fails its crc32c)"):
        inntrospect.naps(path, aligned=True)["conv"].compute()
    monkeypatch.setattr(profiles.chunkio, "chunk_files", lambda arr: None)  # and through Zarr
    with pytest.raises(DamagedStoreError, match=r"grads/c/2/0/0/0 (does not decode|fails its crc32c)"):
        inntrospect.naps(path, aligned=True)["conv"].compute()


def test_read_chunk_checks_the_checksum_of_raw_and_zstd_chunks(small):
    for var in ("acts", "grads"):  # zstd, raw
        arr = zarr.open_array(str(small), path=f"layers/conv/{var}")
        files = chunkio.chunk_files(arr)
        assert files is not None and all(f[5] for f in files)  # crc32c: read directly all the same
        np.testing.assert_array_equal(chunkio.read_chunk(chunkio.ChunkFile(*files[4]), "t"), arr[64:])
        flip(chunk(small, var=var, k=4), at=0)
        with pytest.raises(DamagedStoreError, match="fails its crc32c checksum"):
            chunkio.read_chunk(chunkio.ChunkFile(*files[4]), "t")


# -- verify --------------------------------------------------------------------------
def test_verify_a_good_store_finds_nothing_and_exits_0(small, capsys):
    inntrospect.align(small, persist=True)
    inntrospect.naps(small, persist=True)
    report = inntrospect.verify(small)
    assert report.ok and report.problems == [] and report.damaged_blocks == []
    assert report.arrays >= 17 and report.chunks >= 40 and not report.unchecked
    assert main(["verify", str(small), "--no-progress"]) == 0
    assert "no damage" in capsys.readouterr().out


def test_verify_a_damaged_store_exits_non_zero(small, capsys):
    inntrospect.naps(small, persist=True)
    flip(small / "naps" / "conv" / "nap" / "c.0.0.0.0")  # result nodes: one chunk file, keys c.0.0
    chunk(small, var="grads", k=1).unlink()
    assert main(["verify", str(small)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED, 2 chunks (1 missing, 1 failing to decode or verify)" in out
    assert str(chunk(small, var="grads", k=1)) + " is missing" in out and "(block 1)" in out
    assert "naps/conv/nap" in out and "Re-run inntrospect naps CONFIG" in out


def test_verify_reports_a_damaged_block_record_once(small):
    flip(small / "extraction" / "block_done" / "c" / "2", at=0)
    report = inntrospect.verify(small)
    assert [(p.array, p.chunk, p.blocks) for p in report.problems] == [("extraction/block_done", "c/2", (2,))]
    assert "fails its crc32c checksum" in report.problems[0].problem
    assert report.damaged_blocks == [2] and report.blocks_pending == 1  # its chunks were not checked
    assert "inntrospect extract CONFIG --verify" in str(report)


def test_verify_takes_a_config_naming_the_store(small, tmp_path, capsys):
    cfg = write_config(tmp_path, {"store": {"path": str(small)}})
    flip(chunk(small, k=0))
    assert main(["verify", str(cfg)]) == 1
    assert "c/0/0/0/0 fails its crc32c checksum" in capsys.readouterr().out


# -- repair by extracting again ------------------------------------------------------------
@needs_shared
def test_extract_re_extracts_damaged_blocks_bit_identical(tmp_path, cnn_store, mnist_corpus, capsys):
    pytest.importorskip("tensorflow")
    from inntrospect.extraction.local import prepare_extraction, run_extraction

    path = tmp_path / "cnn.zarr"
    shutil.copytree(cnn_store, path)
    B = st.store_attrs(path)["extraction"]["block"]
    layer = CNN_LAYERS[0]
    acts = zarr.open_array(str(path), path=f"layers/{layer}/acts")
    k = 3 * B // acts.chunks[0]  # the first chunk of block 3
    (path / "layers" / layer / "acts" / "c" / str(k) / "0" / "0" / "0").unlink()
    grads = zarr.open_array(str(path), path=f"layers/{CNN_LAYERS[1]}/grads")
    flip(path / "layers" / CNN_LAYERS[1] / "grads" / "c" / str(5 * B // grads.chunks[0]) / "0" / "0" / "0")
    flip(path / "extraction" / "block_done" / "c" / "7", at=0)

    ex = prepare_extraction(CNN, mnist_corpus, path, CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    with pytest.raises(DamagedStoreError, match=r"block_done/c/7 fails its crc32c.*--verify"):
        run_extraction(ex)  # a damaged record cannot even be read without --verify
    found = []
    assert run_extraction(ex, verify=True, on_damaged=lambda b, n: found.append((b, n))) == [3, 5, 7]
    assert found == [([3, 5, 7], 10)]
    assert inntrospect.verify(path).ok
    assert st.store_attrs(path)["extraction"]["state"] == "complete"
    for name in ["conv2d_24_input", *CNN_LAYERS, "dense_14"]:
        for var in ("acts", "grads", "prediction") if name != "dense_14" else ("acts", "prediction"):
            np.testing.assert_array_equal(zarr.open_array(str(path), path=f"layers/{name}/{var}")[:],
                                          zarr.open_array(str(cnn_store), path=f"layers/{name}/{var}")[:])

    # a missing chunk is found without --verify, from the command line
    (path / "layers" / layer / "acts" / "c" / str(k) / "0" / "0" / "0").unlink()
    cfg = write_config(tmp_path, {"model": {"path": CNN, "layers": CNN_LAYERS},
                                  "corpus": {"path": mnist_corpus},
                                  "store": {"path": str(path), "chunk_mib": 1},
                                  "extract": {"batch_size": BATCH}})
    assert main(["extract", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "found 1 of 10 recorded blocks damaged" in out and "extracted 1 of 10 blocks" in out
    np.testing.assert_array_equal(zarr.open_array(str(path), path=f"layers/{layer}/acts")[:],
                                  zarr.open_array(str(cnn_store), path=f"layers/{layer}/acts")[:])


# -- object storage: listings find missing chunks, Zarr's reads are checked ------------------
def test_damage_in_object_storage(small, s3):
    loc = s3.location("s.zarr")
    fs = loc.fs
    root = fs._strip_protocol(loc.url)
    fs.put(str(small), root, recursive=True)
    assert inntrospect.verify(loc).ok
    key = f"{root}/layers/conv/acts/c/3/0/0/0"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0x10
    fs.pipe_file(key, bytes(data))
    with pytest.raises(DamagedStoreError, match=rf"{loc.url}/layers/conv/acts/c/3/0/0/0 fails its crc32c"):
        inntrospect.naps(loc)["conv"].compute()
    fs.rm_file(f"{root}/layers/conv/grads/c/1/0/0/0")
    with pytest.raises(DamagedStoreError, match=r"layers/conv/grads/c/1/0/0/0 is missing"):
        inntrospect.naps(loc, aligned=True)
    report = inntrospect.verify(loc)
    assert [(p.array, p.chunk, p.blocks) for p in report.problems] == [
        ("layers/conv/acts", "c/3/0/0/0", (3,)), ("layers/conv/grads", "c/1/0/0/0", (1,))]
    assert report.damaged_blocks == [1, 3]


@pytest.mark.parametrize("codec", [{"name": "zstd", "level": 1}, {"name": "zstd", "level": 3}, None])
@pytest.mark.parametrize("checksum", [True, False])
def test_write_chunk_writes_chunks_zarr_reads_as_its_own(tmp_path, codec, checksum):
    """``chunkio.write_chunk`` (the extraction's direct writes) gives each chunk file, the last partial
    one included, what Zarr reads back as the values written: uncompressed, byte for byte Zarr's file;
    with zstd one frame at the array's level declaring its size (within 0.5 % of Zarr's size), the
    same bytes however the chunk's rows come in parts; ``read_chunk`` and Zarr read it back."""
    from inntrospect.store.nodes import zarr_codecs

    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((70, 30, 40)), 0).astype(np.float32)  # chunks of 16: the last holds 6
    compressors = zarr_codecs(codec) if checksum else ([] if codec is None else [zarr.codecs.ZstdCodec(
        level=codec["level"], checksum=False)])
    arrays = {}
    for name in ("zarr", "direct", "parts"):
        arrays[name] = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=x.shape, chunks=(16, 30, 40),
                                         dtype="float32", fill_value=np.nan, compressors=compressors,
                                         config={"write_empty_chunks": True})
    arrays["zarr"][:] = x
    files, split = chunkio.chunk_files(arrays["direct"]), chunkio.chunk_files(arrays["parts"])
    assert files is not None and len(files) == 5
    for k, (rec, rec_parts) in enumerate(zip(files, split)):
        rows = x[16 * k : 16 * (k + 1)]
        chunkio.write_chunk(chunkio.ChunkFile(*rec), rows)
        chunkio.write_chunk(chunkio.ChunkFile(*rec_parts), [rows[:1], rows[1:1], rows[1:7], rows[7:]])
    for k, (rec, rec_parts, ref) in enumerate(zip(files, split, chunkio.chunk_files(arrays["zarr"]))):
        mine, theirs = open(rec[0], "rb").read(), open(ref[0], "rb").read()
        assert open(rec_parts[0], "rb").read() == mine, k
        if codec is None:
            assert mine == theirs, k
        else:
            import zstandard

            assert zstandard.get_frame_parameters(mine).content_size == 16 * 30 * 40 * 4
            assert abs(len(mine) - len(theirs)) <= max(16, len(theirs) // 200), (k, len(mine), len(theirs))
        np.testing.assert_array_equal(chunkio.read_chunk(chunkio.ChunkFile(*rec), "t"), x[16 * k : 16 * (k + 1)])
    for name in ("direct", "parts"):
        reopened = zarr.open_array(str(tmp_path / f"{name}.zarr"), mode="r")
        np.testing.assert_array_equal(reopened[:], x)


def test_write_chunk_writes_integer_arrays_of_their_dtype(tmp_path):
    """The predictions' chunks (int64, fill -1, zstd-3 and the checksum, one chunk per block) are
    written directly too: Zarr reads back the values, the last chunk's padding is the fill value;
    ``chunk_files`` lists an array only for the dtype asked (float32 unless told)."""
    from inntrospect.store.nodes import zarr_codecs

    arr = zarr.create_array(str(tmp_path / "p.zarr"), shape=(10,), chunks=(4,), dtype="int64", fill_value=-1,
                            compressors=zarr_codecs({"name": "zstd", "level": 3}))
    assert chunkio.chunk_files(arr) is None
    files = chunkio.chunk_files(arr, dtype="int64")
    values = np.arange(10, dtype=np.int64) * 7 - 3
    for k, rec in enumerate(files):
        chunkio.write_chunk(chunkio.ChunkFile(*rec), [values[4 * k : 4 * k + 1], values[4 * k + 1 : 4 * (k + 1)]])
    reopened = zarr.open_array(str(tmp_path / "p.zarr"), mode="r")
    np.testing.assert_array_equal(reopened[:], values)
    assert reopened.dtype == np.int64
    import numcodecs

    last = open(files[2][0], "rb").read()[:-4]  # the checksum apart
    assert np.frombuffer(numcodecs.Zstd().decode(last), np.int64).tolist() == [53, 60, -1, -1]

