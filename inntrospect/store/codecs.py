"""The codecs of the store's arrays, and the rule that chooses them.

Codec records (``{"name": "zstd", "level": 1}`` or None for raw) are kept in the
root attribute ``codecs`` per layer and array; :func:`zarr_codecs` turns one
into Zarr compressors, followed by the checksum every array the package writes
carries (:data:`CHECKSUM`: Zarr v3's ``crc32c`` codec, last, over the encoded
bytes). The root attribute ``checksum`` says so; stores written before it have
no checksums and are read as they are.
"""

from __future__ import annotations

from ..errors import StoreError

__all__ = ["CODEC", "CODEC_TABLE", "CODEC_RESULT", "MIN_RATIO", "CHECKSUM", "zarr_codecs", "choose_codecs"]

#: The codec of activation and gradient chunks, measured on real activations to
#: write fastest for its ratio (benchmarks/bench_codecs.py, benchmarks/README.md).
CODEC = {"name": "zstd", "level": 1}
#: Arrays that compress less than this on the first batch are stored uncompressed:
#: dense gradients gain ~10 % of space for CPU time extraction cannot spare.
MIN_RATIO = 1.25
#: codec of the small per-sample arrays (the sample table, predictions)
CODEC_TABLE = {"name": "zstd", "level": 3}
#: codec of the steps' result nodes (NAPs, contrasts, layouts, ...): level -3 compresses their
#: float64 arrays to 0.64 of their size, level 1 to 0.61 in twice the time (benchmarks/README.md)
CODEC_RESULT = {"name": "zstd", "level": -3}
#: the checksum of every chunk written (Zarr v3's ``crc32c`` codec, the last bytes-to-bytes
#: codec: 4 bytes after the encoded chunk); None writes none (benchmarks compare the two)
CHECKSUM: str | None = "crc32c"


def zarr_codecs(spec: dict | None, checksum: str | None = "default") -> list:
    """The Zarr compressors of a codec record (``{"name": "zstd", "level": 1}`` or None),
    then the checksum (:data:`CHECKSUM` by default; ``None``: none)."""
    import zarr

    checksum = CHECKSUM if checksum == "default" else checksum
    if checksum not in (None, "crc32c"):
        raise StoreError(f"unknown checksum {checksum!r}: crc32c or none.")
    tail = [zarr.codecs.Crc32cCodec()] if checksum else []
    if spec is None:
        return tail
    if spec["name"] == "zstd":
        return [zarr.codecs.ZstdCodec(level=spec["level"]), *tail]
    raise StoreError(f"unknown codec {spec!r} in the store's attributes.")


def choose_codecs(sizes: dict[str, dict[str, tuple[int, int]]]) -> dict[str, dict[str, dict | None]]:
    """:data:`CODEC` for arrays that compress at least :data:`MIN_RATIO`, else none.

    ``sizes`` is ``{layer: {var: (raw bytes, compressed bytes)}}`` of a sample of rows.
    """
    return {
        layer: {var: dict(CODEC) if raw >= MIN_RATIO * comp else None for var, (raw, comp) in v.items()}
        for layer, v in sizes.items()
    }
