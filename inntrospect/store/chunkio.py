"""Reading stored chunks straight from their files, into reused per-thread buffers.

Zarr's own read decodes each chunk into fresh memory and copies it again; on
this kind of VM touching fresh memory costs about as much as decoding, so a
NAP pass through Zarr runs at about 60 % of the disk-and-decode speed
(``benchmarks/README.md``). For local Zarr v3 float32 arrays chunked along
samples only, encoded as native-order bytes, at most zstd and at most a
crc32c checksum after it (what extraction writes), :func:`chunk_files` lists
the chunk files and :func:`read_chunk` decodes one into a page-aligned buffer
of the calling thread, reused from chunk to chunk. Anything else is read
through Zarr. :func:`write_chunk` is its inverse, the extraction's writes:
chunk files Zarr reads as its own, at a fraction of its cost (the batches
compressed as a stream without being joined, nothing copied into fresh
memory, the checksum without the GIL).

:func:`read_chunk` checks what Zarr would: the crc32c of the encoded bytes
(computed slab by slab as the file is read, while each slab is in cache), the
size a zstd frame declares, the size of an uncompressed chunk. A chunk file
that is missing, fails its checksum or does not decode raises
:class:`~inntrospect.errors.DamagedStoreError` naming the file and the
command that repairs it; never NaN or other numbers.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import DamagedStoreError
from .checksum import checksum, crc32c, crc32c_extend

__all__ = ["ChunkFile", "chunk_files", "read_chunk", "write_chunk", "buffer"]


@dataclass(frozen=True)
class ChunkFile:
    """A chunk file to read (or write) directly: its path, samples, chunk shape, codec and fill value,
    whether a crc32c follows the encoded bytes, the store and array it belongs to (for messages),
    the zstd level (for writing) and the array's dtype."""

    file: str
    n: int
    shape: tuple
    zstd: bool
    fill: float
    crc: bool = False
    store: str = ""
    array: str = ""
    level: int = 0
    dtype: str = "float32"


_local = threading.local()
_PAGE = 4096
#: bytes read per ``readinto`` when checksumming: the checksum runs over each slab while it is in cache
_SLAB = 1 << 19


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


def chunk_files(arr, dtype="float32"):
    """Per chunk along ``sample`` of a Zarr array: ``(file, samples, chunk shape, zstd?, fill value,
    crc32c?, store, array, zstd level, dtype)`` (the fields of :class:`ChunkFile`).

    None unless its chunk files can be read directly: a local Zarr v3 array
    of ``dtype`` (float32: what the readers decode into), chunked along its
    first axis only, each chunk encoded as bytes in native order, then at most
    zstd, then at most a crc32c checksum.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec
    from zarr.storage import LocalStore

    meta = arr.metadata
    codecs = list(getattr(meta, "codecs", ()))
    crc = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    if crc:
        codecs = codecs[:-1]
    if getattr(meta, "zarr_format", None) != 3 or not isinstance(arr.store, LocalStore) \
            or np.dtype(arr.dtype) != np.dtype(dtype) or arr.ndim < 1 \
            or tuple(arr.chunks[1:]) != tuple(arr.shape[1:]) or not 1 <= len(codecs) <= 2 \
            or not isinstance(codecs[0], BytesCodec) \
            or (codecs[0].endian is not None and codecs[0].endian.value != sys.byteorder) \
            or (len(codecs) == 2 and not isinstance(codecs[1], ZstdCodec)):
        return None
    zstd = len(codecs) == 2
    level = int(codecs[1].level) if zstd else 0
    store = str(arr.store.root)
    root = os.path.join(store, *arr.path.split("/"))
    c, n = arr.chunks[0], arr.shape[0]
    fill = float(arr.fill_value) if arr.fill_value is not None else np.nan
    zeros = (0,) * (arr.ndim - 1)
    kind = str(np.dtype(dtype))
    return [
        (os.path.join(root, *meta.encode_chunk_key((k, *zeros)).split("/")), min(c, n - k * c),
         tuple(arr.chunks), zstd, fill, crc, store, arr.path, level, kind)
        for k in range(-(-n // c))
    ]


def write_chunk(rec, data) -> None:
    """Write the samples ``data`` as the chunk file ``rec`` (a :class:`ChunkFile`), as Zarr reads it.

    ``data``: an array of the chunk's samples from its first, or a list of
    arrays whose rows follow each other (the batches that filled the chunk,
    written without being joined first): all of the chunk's samples but for
    the array's last chunk, which is padded with the fill value to the
    chunk's shape. Encoded as :func:`read_chunk` decodes: native-order bytes
    of the array's dtype (``rec.dtype``), then one zstd frame at the array's
    level declaring its content size (compressed as a stream, piece by piece,
    into a small reused buffer), then the crc32c of the encoded bytes,
    little-endian. The file is written whole, replacing any; always, even
    when every value is the fill value (Zarr would leave such a chunk out,
    which a resume takes for a missing chunk).
    """
    shape, dtype = tuple(rec.shape), np.dtype(rec.dtype)
    parts = [data] if isinstance(data, np.ndarray) else list(data)
    parts = [np.ascontiguousarray(p, dtype).reshape(-1, *shape[1:]) for p in parts]
    n = sum(len(p) for p in parts)
    assert n <= shape[0], (n, shape)
    if n < shape[0]:
        parts.append(np.full((shape[0] - n, *shape[1:]), rec.fill, dtype))
    os.makedirs(os.path.dirname(rec.file), exist_ok=True)
    with open(rec.file, "wb") as fh:
        sink = _Sink(fh, rec.crc)
        if rec.zstd:
            import zstandard

            stream = _compressor(rec.level).stream_writer(sink, size=sum(p.nbytes for p in parts), closefd=False)
            for p in parts:
                stream.write(_bytes(p))
            stream.flush(zstandard.FLUSH_FRAME)
        else:
            for p in parts:
                sink.write(_bytes(p))
        if rec.crc:
            fh.write(sink.crc.to_bytes(4, "little"))


class _Sink:
    """A chunk file being written piece by piece, the crc32c extended over each piece while it is in cache."""

    def __init__(self, fh, crc: bool):
        self.fh, self.checked, self.crc = fh, crc, 0

    def write(self, piece) -> int:
        self.fh.write(piece)
        if self.checked:
            self.crc = checksum(np.frombuffer(piece, np.uint8), self.crc)
        return len(piece)


def _bytes(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1)).cast("B")


def _compressor(level: int):
    """This thread's zstd compressor at ``level`` (its contexts reused from chunk to chunk)."""
    import zstandard

    kept = _local.__dict__.setdefault("compressors", {})
    if level not in kept:
        kept[level] = zstandard.ZstdCompressor(level=level)
    return kept[level]


def read_chunk(rec, slot: str) -> np.ndarray:
    """The samples of a chunk file, decoded into this thread's buffer ``slot`` (valid until reused).

    Raises
    ------
    DamagedStoreError
        The file is missing (Zarr would read NaN), fails its crc32c checksum, or
        does not decode to the bytes of its chunk.
    """
    import numcodecs

    size = int(np.prod(rec.shape, dtype=np.int64))
    out = buffer(slot, size, rec.dtype)
    tail = 4 if rec.crc else 0
    try:
        fh = open(rec.file, "rb", buffering=0)
    except FileNotFoundError:
        raise _damaged(rec, "is missing (deleted, or never written)") from None
    with fh:
        nbytes = os.fstat(fh.fileno()).st_size
        if rec.zstd:
            raw = buffer(slot + "/encoded", nbytes, np.uint8)
            crc = _read_into(fh, raw, rec, nbytes - tail if tail else 0)
            if tail:
                _check_crc(rec, crc, raw[nbytes - tail :])
            frame = raw[: nbytes - tail]
            if _zstd_content_size(frame) != out.nbytes:  # decoding would not fill the buffer
                raise _damaged(rec, f"does not decode to the {out.nbytes} bytes of its chunk (its zstd "
                                    f"header says {_zstd_content_size(frame)})")
            try:
                numcodecs.Zstd().decode(frame, out=out)
            except (RuntimeError, ValueError) as err:
                raise _damaged(rec, f"does not decode ({err})") from None
        elif nbytes != out.nbytes + tail:
            raise _damaged(rec, f"holds {nbytes} bytes, not the {out.nbytes + tail} of its chunk")
        else:
            crc = _read_into(fh, out, rec, out.nbytes if tail else 0)
            if tail:
                _check_crc(rec, crc, np.frombuffer(fh.read(tail), np.uint8))
    return out.reshape(rec.shape)[: rec.n]


def _damaged(rec, what: str) -> DamagedStoreError:
    if not rec.store:
        return DamagedStoreError(f"{rec.file} {what}: the store is damaged there. Run inntrospect "
                                 "verify STORE to list every damaged chunk.")
    from .nodes import damaged_error

    key = os.path.relpath(rec.file, os.path.join(rec.store, *rec.array.split("/"))).replace(os.sep, "/")
    return damaged_error(rec.store, rec.array, key, what)


def _check_crc(rec, crc: int, stored: np.ndarray) -> None:
    """Compare the crc32c computed over the encoded bytes with the 4 stored after them (little-endian)."""
    want = int.from_bytes(bytes(stored), "little") if len(stored) == 4 else None
    if want != crc:
        raise _damaged(rec, f"fails its crc32c checksum (stored {want if want is None else f'{want:08x}'}, "
                            f"computed {crc:08x} over its encoded bytes)")


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


def _read_into(fh, buf: np.ndarray, rec, checked: int = 0) -> int:
    """Fill ``buf`` from ``fh``; the crc32c of its first ``checked`` bytes (0: none, read at once).

    With a checksum the file is read a slab at a time (:data:`_SLAB`), each slab
    checksummed at once, while it is still in the core's cache.
    """
    flat = buf.reshape(-1).view(np.uint8)
    view, got, crc = memoryview(flat), 0, 0
    step = _SLAB if checked else len(view)
    extend, base = crc32c_extend(), flat.ctypes.data
    while got < len(view):
        k = fh.readinto(view[got : got + step])
        if not k:
            raise _damaged(rec, f"ended after {got} of its {len(view)} bytes")
        if got < checked:
            n = min(got + k, checked) - got
            crc = extend(crc, base + got, n) if extend else crc32c(crc, flat[got : got + n])
        got += k
    return crc
