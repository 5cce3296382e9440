"""Result nodes and the root's ``zarr.json`` of a local store, read and written straight from files.

Through xarray and Zarr each small array costs 4-8 ms of metadata round
trips and codec set-up on Zarr's event loop, more than encoding its bytes (a
contrast with its statistics is 27 arrays), and each root attribute update
or consolidation reads the store's metadata again. Here, for a store on a
local disk:

- :func:`write_local` writes a small in-memory Dataset as a group: what
  ``Dataset.to_zarr(mode="w")`` writes, the same ``zarr.json`` documents and
  chunk bytes (numcodecs' zstd and vlen-utf8 as Zarr's codecs use them, the
  crc32c after them), the chunks encoded on two threads. Only numeric, bool
  and text variables with at least one element and no non-index
  coordinates; for anything else it returns False and the caller goes
  through xarray. (A variable's ``encoding`` does not matter: ``write_node``
  gives ``to_zarr`` one for every variable, which replaces it.)
- :func:`update_root` merges root attributes and refreshes the consolidated
  metadata of the nodes that changed, in one replacement of the file.
- :func:`read_local` and :func:`read_array` read such nodes back, checking
  each chunk's crc32c; anything unexpected gives None, and the caller reads
  through Zarr (which raises its own errors).

``tests/store/test_localnode.py`` compares each with Zarr, file for file.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import StoreError
from .checksum import checksum

__all__ = ["write_local", "can_write", "write_file", "read_local", "read_array", "update_root", "array_doc",
           "create_nodes"]

_GROUP = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def can_write(ds) -> bool:
    """Whether :func:`write_local` writes ``ds`` exactly as ``to_zarr`` would."""
    if any(name not in ds.dims for name in ds.coords):  # non-index coordinates: xarray's "coordinates"
        return False
    for var in ds.variables.values():
        kind = var.dtype.kind
        if kind not in "fiubUOT" or var.size == 0 or var.ndim == 0 or (kind == "f" and var.dtype.itemsize < 4):
            return False
        if kind == "O" and not all(isinstance(v, str) for v in np.asarray(var.values).reshape(-1)):
            return False
        if "_FillValue" in var.attrs:
            return False
    return True


def write_local(folder: str, name: str, ds, encoding: dict) -> bool:
    """Write ``ds`` as the group ``name`` of the local store ``folder`` (replacing it); False when
    :func:`can_write` says it must go through xarray.

    ``encoding`` is what ``to_zarr`` would get: per variable ``compressors``
    (Zarr codec objects) and optionally ``chunks``. Parent groups missing on
    the way are created, as Zarr creates them.
    """
    if not can_write(ds):
        return False
    parts = [p for p in name.split("/") if p]
    for depth in range(len(parts)):
        parent = os.path.join(folder, *parts[:depth], "zarr.json")
        if not os.path.exists(parent):
            os.makedirs(os.path.dirname(parent), exist_ok=True)
            _write_json(parent, _GROUP)
    node = os.path.join(folder, *parts)
    if os.path.lexists(node):
        shutil.rmtree(node)
    os.makedirs(node)
    _write_json(os.path.join(node, "zarr.json"), {**_GROUP, "attributes": _plain(ds.attrs)})
    jobs = []
    for key, var in ds.variables.items():
        data = np.asarray(var.values)
        enc = encoding.get(key, {})
        chunks = tuple(enc.get("chunks") or data.shape)
        separator = enc.get("chunk_key_encoding", {}).get("separator", "/")
        compressors = list(enc.get("compressors", ()))
        text = data.dtype.kind in "UOT"
        attrs = _plain(var.attrs)
        if data.dtype.kind == "f":
            attrs["_FillValue"] = base64.standard_b64encode(struct.pack("<d", np.nan)).decode()
        meta = array_doc(data.shape, data.dtype, chunks, fill="" if text else _fill(data.dtype),
                         compressors=compressors, dims=var.dims, attrs=attrs, separator=separator)
        folder_of = os.path.join(node, key)
        os.makedirs(folder_of)
        _write_json(os.path.join(folder_of, "zarr.json"), meta)
        if not text and data.dtype.byteorder == ">":
            data = data.astype(data.dtype.newbyteorder("<"))
        for index in np.ndindex(*(-(-s // c) for s, c in zip(data.shape, chunks))):
            jobs.append((folder_of, index, data, chunks, compressors, text, separator))
    if len(jobs) > 1:
        with ThreadPoolExecutor(2) as pool:  # zstd and the checksum run without the GIL
            list(pool.map(_write_chunk, jobs))
    else:
        list(map(_write_chunk, jobs))
    return True


def array_doc(shape: Sequence[int], dtype, chunks: Sequence[int], *, fill, compressors, dims: Sequence[str],
              attrs: dict | None = None, separator: str = "/") -> dict:
    """The ``zarr.json`` of an array as Zarr 3 writes it (``dtype`` ``str``: variable-length strings)."""
    text = dtype is str or np.dtype(dtype).kind in "UOT"
    dtype = None if text else np.dtype(dtype)
    first = {"name": "vlen-utf8", "configuration": {}} if text else (
        {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}})
    if text:
        fill_json = fill
    elif dtype.kind == "f" and np.isnan(fill):
        fill_json = "NaN"
    else:
        fill_json = _plain(dtype.type(fill))
    return {
        "shape": [int(n) for n in shape],
        "data_type": "string" if text else dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [int(c) for c in chunks]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": separator}},
        "fill_value": fill_json,
        "codecs": [first, *(c.to_dict() for c in compressors)],
        "attributes": _plain(attrs or {}),
        "dimension_names": list(dims),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def create_nodes(folder: str, groups: Mapping[str, dict], arrays: Mapping[str, tuple]) -> None:
    """Write new groups (``{name: attributes}``) and arrays (``{name: (doc, data)}``: the doc from
    :func:`array_doc`, ``data`` None for no chunks or the whole array as its one chunk, written even
    when all fill) into the local store ``folder``, as Zarr creates them; parents first."""
    for name, attrs in sorted(groups.items(), key=lambda kv: kv[0].count("/")):
        os.makedirs(os.path.join(folder, *name.split("/")), exist_ok=True)
        _write_json(os.path.join(folder, *name.split("/"), "zarr.json"), {**_GROUP, "attributes": _plain(attrs)})
    for name, (doc, data) in arrays.items():
        where = os.path.join(folder, *name.split("/"))
        os.makedirs(where, exist_ok=True)
        _write_json(os.path.join(where, "zarr.json"), doc)
        if data is None or not np.size(data):
            continue
        text = doc["data_type"] == "string"
        separator = doc["chunk_key_encoding"]["configuration"]["separator"]
        path = os.path.join(where, *separator.join(["c", *("0" * len(doc["shape"]))]).split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        part = np.asarray(data) if text else np.ascontiguousarray(data, dtype=np.dtype(doc["data_type"]).newbyteorder("<"))
        write_file(path, _encode(part, doc["codecs"][1:], text))


def _write_chunk(job) -> None:
    """Encode and write one chunk as Zarr does: fill-padded at the array's edge, all-fill chunks left out."""
    folder, index, data, chunks, compressors, text, separator = job
    part = data[_box(index, chunks, data.shape)]
    if _all_fill(part, text):
        return
    if part.shape != chunks:
        full = np.full(chunks, "" if text else _fill(data.dtype), dtype=object if text else data.dtype)
        full[tuple(slice(0, s) for s in part.shape)] = part
        part = full
    body = _encode(part, compressors, text)
    path = os.path.join(folder, *separator.join(["c", *map(str, index)]).split("/"))
    if separator == "/":  # c/0/0: a folder per axis (with ".", the chunk is in the array's own folder)
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file(path, body)


def _box(index: tuple, chunks: tuple, shape: tuple) -> tuple:
    """The region of the chunk at grid ``index`` within an array of ``shape`` (cut at its edge)."""
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))


def _encode(part: np.ndarray, compressors, text: bool) -> list:
    """The chunk's bytes as Zarr encodes them, as a list of buffers to write one after the other
    (the array itself when uncompressed, the checksum apart: no copies of the body)."""
    import numcodecs

    body = numcodecs.VLenUTF8().encode(np.asarray(part, dtype=object)) if text else \
        np.ascontiguousarray(part).reshape(-1).view(np.uint8)
    tail = []
    for codec in compressors:  # Zarr codec objects, or their dicts
        spec = codec if isinstance(codec, dict) else codec.to_dict()
        if spec["name"] == "zstd" and not tail:
            conf = spec["configuration"]
            body = numcodecs.Zstd(level=conf["level"], checksum=conf["checksum"]).encode(body)
        elif spec["name"] == "crc32c" and not tail:
            tail = [checksum(np.frombuffer(body, np.uint8)).to_bytes(4, "little")]
        else:  # not a codec (or an order) the result nodes use: can_write's callers never pass one
            raise StoreError(f"codec {spec['name']!r} is not written here; write the node through xarray")
    return [body, *tail]


def _fill(dtype):
    return np.nan if dtype.kind == "f" else (False if dtype.kind == "b" else 0)


def _all_fill(part: np.ndarray, text: bool) -> bool:
    if text:
        return all(v == "" for v in part.reshape(-1))
    if part.dtype.kind == "f":
        flat = part.reshape(-1)
        if flat.size > 64 and not np.isnan(flat[:: flat.size // 64]).all():  # a glance settles most chunks
            return False
        return bool(np.isnan(part).all())
    return not part.any()


def _plain(value):
    """Attributes as JSON: numpy scalars and arrays as Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_json(path: str, doc: dict) -> None:
    write_file(path, json.dumps(doc).encode())  # C encoder (indented is pure Python); one write


def write_file(path: str, data) -> None:
    """Write one file of a node whole (its metadata or a chunk), replacing any: ``data`` is bytes, or
    a list of buffers written one after the other."""
    with open(path, "wb") as fh:
        for piece in data if isinstance(data, list) else (data,):
            fh.write(piece)


# -- the root's zarr.json: attributes and consolidated metadata, updated in place ------------------
def update_root(folder: str, attrs: dict | None = None, changed=()) -> bool:
    """Rewrite the local store's root ``zarr.json`` once: ``attrs`` merged into its attributes, and the
    consolidated metadata of the nodes ``changed`` (and anything below them) read again from their
    ``zarr.json`` files, the rest kept. False when it cannot (no inline consolidated metadata, or
    attributes that are not plain JSON): then the caller goes through Zarr.

    What ``zarr.consolidate_metadata`` gives for those nodes (a test compares the two), without
    reading every other node's metadata again; the file is replaced whole (written beside it, then
    renamed), so a crash leaves the old one or the new one, never a part.
    """
    path = os.path.join(folder, "zarr.json")
    try:
        with open(path, "rb") as fh:
            doc = json.loads(fh.read())
    except (OSError, ValueError):
        return False
    meta = doc.get("consolidated_metadata")
    if not isinstance(meta, dict) or meta.get("kind") != "inline" or not isinstance(meta.get("metadata"), dict):
        return False
    if attrs:
        doc["attributes"] = {**doc.get("attributes", {}), **attrs}
    entries = meta["metadata"]
    for name in changed:
        name = name.strip("/")
        for key in [k for k in entries if k == name or k.startswith(name + "/")]:
            del entries[key]
        entries.update(_subtree(folder, name))
    # in Zarr's order, by depth, then by path: Zarr nests the entries of a group's children read
    # one after the other, and would lose those of a group whose children came in two runs
    meta["metadata"] = dict(sorted(entries.items(), key=lambda kv: (kv[0].count("/"), kv[0])))
    try:
        text = json.dumps(doc, allow_nan=True)  # not indented: the C encoder, 5x faster on a large root
    except (TypeError, ValueError):
        return False
    tmp = os.path.join(folder, f".zarr.json.{os.getpid()}.tmp")
    write_file(tmp, text.encode())
    os.replace(tmp, path)
    return True


def _subtree(folder: str, name: str) -> dict:
    """``{path: metadata}`` of the node ``name`` and every node below it, as consolidated metadata
    holds them (groups with an empty inline ``consolidated_metadata`` of their own)."""
    out = {}
    top = os.path.join(folder, *name.split("/"))
    for here, dirs, files in os.walk(top):
        dirs.sort()
        if "zarr.json" not in files:
            continue
        with open(os.path.join(here, "zarr.json"), "rb") as fh:
            node = json.loads(fh.read())
        if node.get("node_type") == "group":
            node = {"attributes": node.get("attributes", {}), "zarr_format": 3,
                    "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": {}},
                    "node_type": "group"}
        else:
            dirs[:] = []  # an array's folder holds its chunks, no nodes
        out[os.path.relpath(here, folder).replace(os.sep, "/")] = node
    return out


# -- reading a result node back ------------------------------------------------------------------
def read_local(folder: str, name: str) -> tuple[dict, dict] | None:
    """``({array: numpy array}, group attributes)`` of the result node ``name`` of a local store, read
    straight from its files, or None where a node is not one :func:`write_local` (or xarray) writes
    (then read it through Zarr). Missing node: ``({}, None)``.

    Each chunk's crc32c is checked, as Zarr checks it: a chunk that fails (or
    does not decode) gives None too, and Zarr's read raises its error. Chunks
    left out (all fill) read as the fill value.
    """
    node = os.path.join(folder, *name.split("/"))
    try:
        with open(os.path.join(node, "zarr.json"), "rb") as fh:
            doc = json.loads(fh.read())
    except FileNotFoundError:
        return {}, None
    except (OSError, ValueError):
        return None
    if doc.get("node_type") != "group":
        return None
    arrays = {}
    for entry in sorted(os.scandir(node), key=lambda e: e.name):
        if not entry.is_dir() or not os.path.exists(os.path.join(entry.path, "zarr.json")):
            continue  # not a node
        data = read_array(entry.path)
        if data is None:
            return None
        arrays[entry.name] = data
    return arrays, doc.get("attributes", {})


def read_array(path: str) -> np.ndarray | None:
    """The array whose folder is ``path`` (a local Zarr v3 array of the codecs :func:`read_local`
    reads), straight from its files; None where it must be read through Zarr (which raises its
    errors: a damaged chunk, a missing file)."""
    try:
        with open(os.path.join(path, "zarr.json"), "rb") as fh:
            meta = json.loads(fh.read())
        return _read_array(path, meta) if meta.get("node_type") == "array" else None
    except (OSError, ValueError, RuntimeError, KeyError):  # a chunk that does not decode, a bad document
        return None


def _read_array(path: str, meta: dict) -> np.ndarray | None:
    import numcodecs

    codecs = meta.get("codecs") or []
    first = codecs[0] if codecs else {}
    text = first.get("name") == "vlen-utf8"
    grid = meta.get("chunk_grid", {})
    keys = meta.get("chunk_key_encoding", {})
    rest = [c.get("name") for c in codecs[1:]]
    if grid.get("name") != "regular" or keys.get("name") != "default" or meta.get("storage_transformers") \
            or first.get("name") not in ("bytes", "vlen-utf8") or rest not in ([], ["zstd"], ["crc32c"],
                                                                               ["zstd", "crc32c"]) \
            or (not text and (first.get("configuration") or {}).get("endian", "little") != "little"):
        return None
    try:
        dtype = np.dtype(object) if text else np.dtype(meta["data_type"]).newbyteorder("<")
    except TypeError:
        return None
    shape = tuple(meta["shape"])
    chunks = tuple(grid["configuration"]["chunk_shape"])
    separator = (keys.get("configuration") or {}).get("separator", "/")
    fill = meta.get("fill_value")
    out = np.empty(shape, dtype)
    out[...] = "" if text else (np.nan if fill == "NaN" else fill)
    for index in np.ndindex(*(-(-s // c) for s, c in zip(shape, chunks))):
        key = separator.join(["c", *map(str, index)])
        try:
            with open(os.path.join(path, *key.split("/")), "rb") as fh:
                body = fh.read()
        except FileNotFoundError:
            continue  # all fill: left out
        if "crc32c" in rest:
            body, stored = body[:-4], body[-4:]
            if len(stored) != 4 or checksum(np.frombuffer(body, np.uint8)).to_bytes(4, "little") != stored:
                return None  # damaged: read through Zarr, which raises its error
        if "zstd" in rest:
            body = numcodecs.Zstd().decode(body)
        part = numcodecs.VLenUTF8().decode(body).reshape(chunks) if text else \
            np.frombuffer(body, dtype).reshape(chunks)
        box = _box(index, chunks, shape)
        out[box] = part[tuple(slice(0, b.stop - b.start) for b in box)]
    return out.astype(dtype.newbyteorder("="), copy=False) if not text else out
