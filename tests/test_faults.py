"""Faults that are not crashes come out as one-line errors naming the cause and the fix.

A full disk and a read-only place are injected at the filesystem call (the
tests run as root in CI, where permissions do not stop a write; a real
read-only folder is used where the user is not root). Damaged metadata is
written into real stores on disk.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

import inntrospect
from inntrospect.cli import main
from inntrospect.errors import (
    IncompleteStoreError,
    ParameterError,
    ParameterTypeError,
    StoreAccessError,
    StoreError,
)
from inntrospect.testing import store_from_arrays

from .conftest import CNN, needs_shared, python_env, write_config


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 3, 3, 4)).astype(np.float32)
    return store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]},
                             np.repeat(list("abc"), 10), grads={"conv": x}, chunks=8)


def one_line_error(argv, capsys) -> str:
    """The CLI's message for ``argv``: exit code 2, one ``error:`` line, no traceback."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def fail_writes(monkeypatch, code: int, after: int = 0, keys: str = "") -> None:
    """Every write of a store chunk (whose key contains ``keys``) after the first ``after`` fails
    with ``OSError(code)``, as the operating system would: through Zarr, the extraction's
    direct chunk writes (``chunkio.write_chunk``) and the result nodes' (``localnode.write_file``)."""
    from zarr.storage import LocalStore

    from inntrospect.store import chunkio, localnode

    real, real_chunk, real_file, seen = LocalStore.set, chunkio.write_chunk, localnode.write_file, []

    def fails(key: str) -> bool:
        if keys in key.replace(os.sep, "/"):
            seen.append(key)
            return len(seen) > after
        return False

    async def set_(self, key, value, *args, **kwargs):
        if fails(key):
            raise OSError(code, os.strerror(code), os.path.join(str(self.root), key))
        return await real(self, key, value, *args, **kwargs)

    def write_chunk(rec, data):
        if fails(rec.file):
            raise OSError(code, os.strerror(code), rec.file)
        return real_chunk(rec, data)

    def write_file(path, data):
        if fails(path):
            raise OSError(code, os.strerror(code), path)
        return real_file(path, data)

    monkeypatch.setattr(LocalStore, "set", set_)
    monkeypatch.setattr(chunkio, "write_chunk", write_chunk)
    monkeypatch.setattr(localnode, "write_file", write_file)


def test_a_full_disk_during_naps_is_one_line_and_names_the_fix(store, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path, {"store": {"path": str(store)}})
    fail_writes(monkeypatch, errno.ENOSPC, keys="naps")
    line = one_line_error(["naps", str(cfg)], capsys)
    assert "no space left on the device holding" in line and "run the same command again" in line
    with pytest.raises(StoreAccessError, match="no space left"):
        inntrospect.naps(store, persist=True)


@needs_shared
def test_a_full_disk_during_extract_is_one_line_and_leaves_the_store_incomplete(tmp_path, mnist_corpus,
                                                                               capsys, monkeypatch):
    pytest.importorskip("tensorflow")
    cfg = write_config(tmp_path, {"model": {"path": CNN, "layers": ["conv2d_25"]},
                                  "corpus": {"path": mnist_corpus},
                                  "store": {"path": "out.zarr", "chunk_mib": 1},
                                  "extract": {"batch_size": 64}})
    fail_writes(monkeypatch, errno.ENOSPC, after=3, keys="/acts/c")
    line = one_line_error(["extract", str(cfg), "--no-progress"], capsys)
    assert "no space left on the device holding" in line
    attrs = json.loads((tmp_path / "out.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["extraction"]["state"] == "incomplete"  # never claims completion


def test_a_full_disk_while_the_writer_makes_the_store_in_the_background(tmp_path, monkeypatch):
    """The store is made on a thread of its own while the caller computes: its failure is raised by
    the writer (translated), the lock is released, nothing claims completion, and the next writer
    makes the store anew."""
    from inntrospect.store import is_locked, store_attrs

    path, groups = tmp_path / "w.zarr", ["a", "b"] * 100
    x = np.arange(800, dtype=np.float32).reshape(200, 4)
    fail_writes(monkeypatch, errno.ENOSPC, keys="layers/")
    with pytest.raises(StoreAccessError, match="no space left"):
        with inntrospect.open_writer(path, {"fc": (4,)}, groups, source={"name": "t"}) as writer:
            for lo in range(0, 200, 50):
                writer.write({"fc": x[lo : lo + 50]})
    assert not is_locked(path)
    assert not (path / "zarr.json").exists() or "extraction" not in store_attrs(path) \
        or store_attrs(path)["extraction"]["state"] != "complete"
    monkeypatch.undo()
    with inntrospect.open_writer(path, {"fc": (4,)}, groups, source={"name": "t"}) as writer:
        for lo in range(writer.next_sample, 200, 50):
            writer.write({"fc": x[lo : lo + 50]})
    assert writer.complete and store_attrs(path)["extraction"]["state"] == "complete"
    np.testing.assert_array_equal(xr.open_zarr(path, group="layers/fc")["acts"].values, x)


def test_a_read_only_store_is_one_line(store, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path, {"store": {"path": str(store)}})
    fail_writes(monkeypatch, errno.EROFS)
    line = one_line_error(["naps", str(cfg)], capsys)
    assert "Read-only file system" in line and "copy the store somewhere writable" in line


def test_a_read_only_parent_folder_refuses_the_lock_file_in_one_line(store, tmp_path, capsys,
                                                                    monkeypatch):
    cfg = write_config(tmp_path, {"store": {"path": str(store)}})
    if os.geteuid() == 0:  # root writes anywhere: refuse the lock file as a read-only folder would
        real_open = os.open

        def open_(path, flags, *args, **kwargs):
            if str(path).endswith(".lock") and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", open_)
    else:
        os.chmod(store.parent, 0o555)
        monkeypatch.setattr(os, "chmod", os.chmod)  # restored below either way
    try:
        line = one_line_error(["naps", str(cfg)], capsys)
    finally:
        os.chmod(store.parent, 0o755)
    assert "Permission denied" in line and "lock file" in line


def test_an_unknown_url_protocol_is_one_line(capsys):
    line = one_line_error(["info", "foo://bucket/run.zarr"], capsys)
    assert "fsspec cannot open foo:// URLs" in line
    with pytest.raises(StoreAccessError):
        inntrospect.naps("foo://bucket/run.zarr")


def test_an_s3_store_without_credentials_is_one_line(tmp_path):
    pytest.importorskip("s3fs")
    env = {k: v for k, v in python_env().items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    res = subprocess.run([sys.executable, "-m", "inntrospect", "info", "s3://bucket/run.zarr"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().startswith("error: no valid credentials for s3://bucket/run.zarr")
    assert len(res.stderr.strip().splitlines()) == 1


def test_damaged_root_metadata_is_one_line(store, capsys):
    meta = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(meta[: len(meta) // 2])  # truncated
    assert "the metadata of" in one_line_error(["info", str(store)], capsys)
    doc = json.loads(meta)
    doc["attributes"]["format_version"] = "one"
    (store / "zarr.json").write_text(json.dumps(doc))
    assert "damaged format_version ('one'" in one_line_error(["info", str(store)], capsys)
    doc["attributes"]["format_version"] = 1
    del doc["attributes"]["layers"]
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreAccessError, match="no list of layers"):
        inntrospect.naps(store)


def test_a_missing_store_says_it_does_not_exist(tmp_path, capsys):
    assert "does not exist" in one_line_error(["info", str(tmp_path / "nope.zarr")], capsys)


def test_library_misuse_raises_our_errors(store):
    with pytest.raises(ParameterError, match="unknown step 'nonsense'; the steps with results are: align"):
        inntrospect.load(store, "nonsense")
    with pytest.raises(ParameterTypeError, match="std must be True or False, got 'no'"):
        inntrospect.naps(store, std="no")
    with pytest.raises(ParameterTypeError, match="persist must be True or False"):
        inntrospect.align(store, persist=1)
    assert inntrospect.naps(store, std=np.bool_(False))  # numpy's bools are bools
    tree = inntrospect.open_store(store)
    with pytest.raises(ParameterTypeError, match=r"naps=inntrospect.naps\(tree\)"):
        inntrospect.contrastive_naps(tree)
    assert inntrospect.contrastive_naps(tree, naps=inntrospect.naps(tree))  # as the message says


def test_a_step_record_without_an_id_is_a_store_error(store):
    from inntrospect.store import Store

    inntrospect.naps(store, persist=True)
    handle = Store.open(store)
    handle.update_attrs(steps={"naps": {k: v for k, v in handle.records["naps"].items() if k != "id"}})
    with pytest.raises(StoreError, match="the record of the naps step is damaged"):
        inntrospect.load(store, "naps")


def test_naps_of_an_unfinished_extraction_refuse_instead_of_nan(store):
    from inntrospect.store import Store

    handle = Store.open(store)
    handle.update_attrs(extraction={**handle.extraction, "state": "incomplete"})
    tree = inntrospect.open_store(store, allow_incomplete=True)
    assert isinstance(tree, xr.DataTree)
    with pytest.raises(IncompleteStoreError, match="allow_incomplete=True"):
        inntrospect.naps(tree)


def test_align_on_a_chunk_failing_its_checksum_is_one_line(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 3, 3, 4)).astype(np.float32)
    path = store_from_arrays(tmp_path / "z.zarr", {"conv": x, "dense": x[:, 0, 0]}, np.repeat(list("abc"), 10),
                             grads={"conv": x}, chunks=8, codec={"name": "zstd", "level": 1})
    chunk = sorted(f for f in (path / "layers/conv/grads/c").rglob("*") if f.is_file())[1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the zstd frame
    chunk.write_bytes(bytes(data))
    cfg = write_config(tmp_path, {"store": {"path": str(path)}})
    line = one_line_error(["align", str(cfg), "--no-progress"], capsys)
    assert "fails its crc32c checksum" in line and "inntrospect verify" in line
    assert not (path / "layers/conv/aligned" / "zarr.json").exists()  # nothing half-written kept
