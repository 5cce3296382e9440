"""Reading stored chunks straight from their files, into reused per-thread buffers.

Zarr's own read decodes each chunk into fresh memory and copies it again; on
this kind of VM touching fresh memory costs about as much as decoding, so a
NAP pass through Zarr runs at about 60 % of the disk-and-decode speed
(``benchmarks/README.md``). For local Zarr v3 float32 arrays chunked along
samples only, encoded as native-order bytes and at most zstd (what
extraction writes), :func:`chunk_files` lists the chunk files and
:func:`read_chunk` decodes one into a page-aligned buffer of the calling
thread, reused from chunk to chunk. Anything else is read through Zarr.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import StoreError

__all__ = ["ChunkFile", "chunk_files", "read_chunk", "buffer"]

@dataclass(frozen=True)
class ChunkFile:
    """A chunk file to read directly: its path, samples, chunk shape, codec and fill value."""

    file: str
    n: int
    shape: tuple
    zstd: bool
    fill: float


_local = threading.local()
_PAGE = 4096


def buffer(slot: str, size: int, dtype) -> np.ndarray:
    """A flat scratch array of this thread, reused from task to task (its memory is touched already).

    Page-aligned: Linux copies a file into a buffer 16 bytes off a page
    boundary (where malloc puts large arrays) 2-3x slower than into an aligned one.
    """
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    bufs = _local.__dict__.setdefault("buffers", {})
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        bufs[slot] = None  # free the old one before allocating the new one
        raw = np.empty(nbytes + _PAGE, np.uint8)
        start = -raw.ctypes.data % _PAGE
        buf = bufs[slot] = raw[start : start + nbytes]
    return buf[:nbytes].view(dtype)


def chunk_files(arr):
    """Per chunk along ``sample`` of a Zarr array: ``(file, samples, chunk shape, zstd?, fill value)``.

    None unless its chunk files can be read directly: a local Zarr v3 array
    of float32, chunked along its first axis only, each chunk encoded as bytes
    in native order and at most zstd.
    """
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    codecs = list(getattr(meta, "codecs", ()))
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(arr.store, LocalStore) \
            or np.dtype(arr.dtype) != np.float32 or arr.ndim < 1 \
            or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or not 1 <= len(codecs) <= 2 \
            or not isinstance(codecs[0], BytesCodec) \
            or (codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder) \
            or (len(codecs) == 2 and not isinstance(codecs[1], ZstdCodec)):
        return None
    zstd = len(codecs) == 2
    root = os.path.join(str(arr.store.root), *arr.path.split("/"))
    c, n = arr.chunks[0], arr.shape[0]
    fill = float(arr.fill_value) if arr.fill_value is not None else np.nan
    zeros = (0,) * (arr.ndim - 1)
    return [
        (os.path.join(root, *meta.encode_chunk_key((k, *zeros)).split("/")), min(c, n - k * c),
         tuple(arr.chunks), zstd, fill)
        for k in range(-(-n // c))
    ]


def read_chunk(rec, slot: str) -> np.ndarray:
    """The samples of a chunk file, decoded into this thread's buffer ``slot`` (valid until reused)."""
    import numcodecs

    size = int(np.prod(rec.shape, dtype=np.int64))
    out = buffer(slot, size, np.float32)
    try:
        with open(rec.file, "rb", buffering=0) as fh:
            nbytes = os.fstat(fh.fileno()).st_size
            if rec.zstd:
                raw = buffer(slot + "/encoded", nbytes, np.uint8)
                _read_into(fh, raw, rec.file)
                if _zstd_content_size(raw) != out.nbytes:  # decoding would not fill the buffer
                    raise StoreError(f"{rec.file} does not decode to the {out.nbytes} bytes of its chunk.")
                numcodecs.Zstd().decode(raw, out=out)
            elif nbytes != out.nbytes:
                raise StoreError(f"{rec.file} holds {nbytes} bytes, not the {out.nbytes} of its chunk.")
            else:
                _read_into(fh, out, rec.file)
    except FileNotFoundError:  # never written: Zarr reads the fill value
        out.fill(rec.fill)
    return out.reshape(rec.shape)[: rec.n]


def _zstd_content_size(frame: np.ndarray) -> int | None:
    """The decoded size a zstd frame header declares (RFC 8878, 3.1.1.1), or None."""
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    desc = int(frame[4])
    single = (desc >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[desc & 3]
    size = (1 if single else 0, 2, 4, 8)[desc >> 6]
    if not size or len(frame) < pos + size:
        return None
    value = int.from_bytes(bytes(frame[pos : pos + size]), "little")
    return value + 256 if size == 2 else value


def _read_into(fh, buf: np.ndarray, file: str) -> None:
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        k = fh.readinto(view[got:])
        if not k:
            raise StoreError(f"{file} ended after {got} of {len(view)} bytes.")
        got += k
