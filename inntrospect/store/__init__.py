"""The Zarr v3 store: layout, creation, chunk plan, block records, lock, opening.

The format is specified in ``storage/README.md`` (format version 1); this
module is the only code that knows it. Reading needs nothing but
``xarray.open_datatree(path, engine="zarr")``.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ..errors import IncompleteStoreError, StoreError, StoreLockedError, StoreMismatchError
from .backends import Location, location

__all__ = [
    "Location",
    "location",
    "zarr_store",
    "open_tree",
    "FORMAT_VERSION",
    "DEFAULT_CHUNK_MIB",
    "spatial_dims",
    "plan_chunks",
    "ChunkPlan",
    "open_store",
    "store_attrs",
    "writer_lock",
]

FORMAT = "inntrospect"
FORMAT_VERSION = 1
DEFAULT_CHUNK_MIB = 32.0
#: Longest chunk (in samples) of any layer: keeps narrow layers' chunk counts sensible.
MAX_CHUNK_SAMPLES = 8192
#: An extraction block holds at most this many target chunks' worth of all arrays:
#: it bounds the work a crash can lose (the block is the unit of resume).
BLOCK_CHUNKS = 16
BLOCKS_DONE = "extraction/block_done"
#: codec of the small per-sample arrays (the sample table, predictions)
CODEC_TABLE = {"name": "zstd", "level": 3}


def spatial_dims(rank: int) -> tuple[str, ...]:
    """Names of a layer's spatial dims by their number: ``t``; ``y, x``; ``z, y, x``."""
    named = {0: (), 1: ("t",), 2: ("y", "x"), 3: ("z", "y", "x")}
    return named.get(rank, tuple(f"s{i}" for i in range(rank)))


def layer_dims(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dims of a per-sample layer array: spatial dims by rank, then ``unit``."""
    return (*spatial_dims(len(shape) - 1), "unit")


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk length along ``sample`` per layer, and the extraction block length.

    Every chunk length is a power of two dividing ``block``, so each block of
    ``block`` samples writes whole chunks of every layer.
    """

    chunks: dict[str, int]
    block: int
    chunk_mib: float

    def n_blocks(self, n_samples: int) -> int:
        return -(-n_samples // self.block)


def _pow2_floor(x: float) -> int:
    return 1 if x < 2 else 1 << int(np.floor(np.log2(x)))


def plan_chunks(
    bytes_per_sample: Mapping[str, int],
    chunk_mib: float | None = None,
    total_bytes_per_sample: int | None = None,
    max_samples: int = MAX_CHUNK_SAMPLES,
) -> ChunkPlan:
    """Choose per-layer chunk lengths so one chunk is about ``chunk_mib`` MiB.

    Parameters
    ----------
    bytes_per_sample
        Bytes of one sample of each layer's array (one array: acts or grads).
    chunk_mib
        Target chunk size (default :data:`DEFAULT_CHUNK_MIB`).
    total_bytes_per_sample
        Bytes per sample of every array written (default: twice the sum, acts
        and grads); sets the block length, which holds about
        :data:`BLOCK_CHUNKS` target chunks of all arrays together.

    A layer's ideal chunk length is the largest power of two whose chunk stays
    within ``chunk_mib`` (at least 1 sample, at most ``max_samples``). The
    block length is a power of two too, no longer than the longest ideal
    chunk; every chunk length is its layer's ideal capped at the block length,
    so every chunk length divides the block length.
    """
    mib = DEFAULT_CHUNK_MIB if chunk_mib is None else float(chunk_mib)
    if not mib > 0:
        raise StoreError(f"chunk_mib must be positive, got {chunk_mib!r}.")
    if not bytes_per_sample:
        raise StoreError("no layers to plan chunks for.")
    target = mib * 2**20
    cap = _pow2_floor(max_samples)
    ideal = {n: min(cap, _pow2_floor(target / max(1, b))) for n, b in bytes_per_sample.items()}
    total = total_bytes_per_sample or 2 * sum(bytes_per_sample.values())
    block = min(max(ideal.values()), _pow2_floor(BLOCK_CHUNKS * target / max(1, total)))
    return ChunkPlan({n: min(c, block) for n, c in ideal.items()}, block, mib)


# -- where it lives, and its lock ----------------------------------------------------
def zarr_store(path, read_only: bool = False):
    """What ``zarr.open_*`` needs for the store at ``path`` (a path, URL or :class:`Location`)."""
    return location(path).zarr_store(read_only)


def open_tree(path, **kwargs):
    """``xarray.open_datatree`` of the store at ``path`` (local or any fsspec URL), silently."""
    import xarray as xr

    loc = location(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        return xr.open_datatree(loc.url, engine="zarr", **loc.xarray_kwargs(), **kwargs)


@contextmanager
def writer_lock(path) -> Iterator[str]:
    """Hold the store's writer lock or raise StoreLockedError.

    On a local disk the lock is an ``flock`` on ``<store>.lock`` beside it, so
    the operating system releases it when the holder dies, even by ``kill -9``:
    a crashed run never blocks its resume. On object storage it is a lease
    object ``<store>.lock`` created only if absent and renewed while held; a
    crashed writer's lease expires after two minutes.
    """
    with location(path).lock(StoreLockedError) as where:
        yield where


def is_locked(path) -> bool:
    """Whether a writer holds the store's lock now (checks without taking it)."""
    return location(path).is_locked()


# -- reading -----------------------------------------------------------------
def is_store(path) -> bool:
    try:
        text = location(path).read_text("zarr.json")
        return text is not None and json.loads(text).get("attributes", {}).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def store_attrs(path) -> dict:
    """The root attributes of a store (its provenance and extraction state)."""
    text = location(path).read_text("zarr.json")
    if text is None:
        raise StoreError(f"{path} is not a Zarr store (no zarr.json); run inntrospect extract first.")
    attrs = json.loads(text).get("attributes", {})
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is a Zarr store but not an inntrospect store (no format attribute).")
    if attrs.get("format_version", 0) > FORMAT_VERSION:
        raise StoreError(
            f"{path} has store format version {attrs['format_version']}, newer than this "
            f"inntrospect understands ({FORMAT_VERSION}); upgrade inntrospect."
        )
    return attrs


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False):
    """Open a store lazily as an :class:`xarray.DataTree` (dask arrays in the stored chunks).

    Activations and gradients stay lazy; the sample table (``group``, ``file``,
    ``index_in_file``, ``target``, ``prediction``) is loaded, so grouping works
    directly: ``tree["layers/conv"].acts.groupby("group").mean()``.

    Raises
    ------
    IncompleteStoreError
        If extraction has not finished, unless ``allow_incomplete``: unwritten
        chunks read as NaN.
    """
    import xarray as xr

    attrs = store_attrs(path)
    state = attrs.get("extraction", {}).get("state")
    if state != "complete" and not allow_incomplete:
        raise IncompleteStoreError(
            f"the extraction into {path} has not finished (state: {state}). Run the same "
            "extraction again to resume it, or pass allow_incomplete=True to look at it anyway."
        )
    tree = open_tree(path, chunks={})
    plain = open_tree(path)  # labels read without dask
    return xr.map_over_datasets(_load_labels, tree, plain)


def _load_labels(ds, plain):
    """Hold the small per-sample labels in memory, so ``groupby("group")`` just works."""
    labels = {k: plain[k].variable.load() for k in ds.coords if k not in ds.indexes}
    return ds.assign_coords(labels) if labels else ds


# -- writing -----------------------------------------------------------------
def consolidate(path: str | os.PathLike) -> None:
    """Refresh consolidated metadata so plain xarray opens the store quickly and silently."""
    import zarr

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(zarr_store(path))


def update_attrs(path: str | os.PathLike, **changes) -> None:
    import zarr

    group = zarr.open_group(zarr_store(path), mode="r+")
    group.attrs.update(changes)  # rewrites the root's zarr.json, its consolidated metadata kept as it was
    if group.metadata.consolidated_metadata is None:
        consolidate(path)


def remove_node(path: str | os.PathLike, name: str) -> None:
    """Delete a group or array of the store (and everything under it), if present.

    The consolidated metadata is refreshed, so no reader looks for what is gone.
    """
    import zarr

    root = zarr.open_group(zarr_store(path), mode="r+", use_consolidated=False)
    if name in root:
        del root[name]
        consolidate(path)


def write_node(path: str | os.PathLike, name: str, ds, *, consolidated: bool = True) -> None:
    """Write a small in-memory Dataset as the node ``name`` (replacing it), then consolidate.

    ``consolidated=False`` leaves that to the caller (one refresh after several
    nodes: on object storage a refresh lists the whole store). Text labels are stored as Zarr v3 variable-length strings, like the sample table.
    """
    text = {k: v.astype(object) for k, v in ds.variables.items() if v.dtype.kind == "U"}
    ds = ds.assign_coords({k: v for k, v in text.items() if k in ds.coords}).assign(
        {k: v for k, v in text.items() if k not in ds.coords})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        loc = location(path)
        ds.to_zarr(loc.url, group=name, mode="w", zarr_format=3, consolidated=False,
                   encoding=_one_chunk_per_group(ds), **loc.xarray_kwargs())
    if consolidated:
        consolidate(path)


def _one_chunk_per_group(ds) -> dict:
    """Chunk per-group arrays one group per chunk: reading one group reads one chunk."""
    return {k: {"chunks": (1, *v.shape[1:])} for k, v in ds.data_vars.items()
            if v.ndim > 1 and v.dims[0] == "group"}


def remove_store(path) -> None:
    """Delete an existing store, refusing to touch a folder that is not one."""
    loc = location(path)
    if not loc.exists():
        return
    if loc.is_nonempty_non_store():
        raise StoreError(
            f"{path} exists and is not a Zarr store; refusing to overwrite it. Choose another path."
        )
    loc.remove()


def create_store(
    path,
    attrs: dict,
    layers: list,  # list of LayerInfo
    plan: ChunkPlan,
    sample_table: Mapping[str, np.ndarray],
) -> None:
    """Write an empty store: root attrs, one node per layer, block records.

    Arrays follow xarray's Zarr v3 conventions (``dimension_names``; the sample
    table named in the ``coordinates`` attribute of ``acts``/``grads``), so plain
    xarray reads them back as labelled data. Activation chunks are written
    later by region writes. The ``extraction`` attribute goes in last: a store
    without it was interrupted while being created and is simply created again.
    """
    import zarr

    n = len(sample_table["group"])
    root = zarr.open_group(zarr_store(path), mode="w", zarr_format=3)
    root.attrs.update({k: v for k, v in attrs.items() if k != "extraction"})
    root.create_array(
        BLOCKS_DONE, shape=(plan.n_blocks(n),), chunks=(1,), dtype="uint8", fill_value=0,
        dimension_names=("block",), compressors=None,
    )
    table = {
        "sample": np.arange(n, dtype=np.int64),
        "group": np.asarray(sample_table["group"]).astype(str),
        "file": np.asarray(sample_table["file"]).astype(str),
        "index_in_file": np.asarray(sample_table["index_in_file"], dtype=np.int64),
        "target": np.asarray(sample_table["target"], dtype=np.int64),
    }
    coordinates = " ".join(sorted([*table][1:] + ["prediction"]))
    for info in layers:
        node = root.create_group(f"layers/{info.name}", attributes={"layer": info.name})
        for name, values in table.items():
            node.create_array(
                name, shape=(n,), chunks=(max(n, 1),), dtype=str if name in ("group", "file") else
                values.dtype, dimension_names=("sample",), compressors=zarr_codecs(CODEC_TABLE),
            )[:] = values
        node.create_array(
            "prediction", shape=(n,), chunks=(plan.block,), dtype="int64", fill_value=-1,
            dimension_names=("sample",), compressors=zarr_codecs(CODEC_TABLE),
        )
        dims = ("sample", *layer_dims(info.shape))
        for var in ("acts", "grads") if info.has_grads else ("acts",):
            node.create_array(
                var, shape=(n, *info.shape), chunks=(plan.chunks[info.name], *info.shape),
                dtype="float32", fill_value=np.nan, dimension_names=dims,
                compressors=zarr_codecs(attrs["codecs"][info.name][var]),
                attributes={"coordinates": coordinates},
            )
    root.attrs["extraction"] = attrs["extraction"]
    consolidate(path)


def zarr_codecs(spec: dict | None) -> list:
    """The Zarr compressors of a codec record (``{"name": "zstd", "level": 1}`` or None)."""
    import zarr

    if spec is None:
        return []
    if spec["name"] == "zstd":
        return [zarr.codecs.ZstdCodec(level=spec["level"])]
    raise StoreError(f"unknown codec {spec!r} in the store's attributes.")


def check_same(stored: dict, wanted: dict, path) -> None:
    """Refuse to resume when model, corpus or settings differ; name what differs."""
    diffs = []
    sm, wm = stored.get("model", {}), wanted["model"]
    if sm.get("sha256") != wm.get("sha256"):
        was = sm.get("path") or sm.get("name")
        now = wm.get("path") or wm.get("name")
        diffs.append(
            f"model: the store was made from {was} (sha256 {str(sm.get('sha256'))[:12]}), "
            f"now {now} (sha256 {str(wm.get('sha256'))[:12]})"
        )
    sc, wc = stored.get("corpus", {}), wanted["corpus"]
    if sc.get("csv_sha256") != wc["csv_sha256"]:
        diffs.append(f"corpus: corpus.csv differs (store: {sc.get('path')}, now: {wc['path']})")
    elif sc.get("files_sha256") != wc["files_sha256"]:
        diffs.append("corpus: the batch files' names or shapes differ")
    if stored.get("layers") != wanted["layers"]:
        diffs.append(f"layers: store has {stored.get('layers')}, now {wanted['layers']}")
    se, we = stored.get("extraction", {}), wanted["extraction"]
    for key in ("gradient_target", "block"):
        if se.get(key) != we.get(key):
            diffs.append(f"extraction.{key}: store has {se.get(key)!r}, now {we.get(key)!r}")
    if stored.get("chunks") != wanted["chunks"]:
        diffs.append(f"chunks: store has {stored.get('chunks')}, now {wanted['chunks']}")
    if diffs:
        raise StoreMismatchError(
            f"{path} holds another extraction, so it cannot be resumed:\n  - "
            + "\n  - ".join(diffs)
            + "\nUse another store path, or overwrite=True (--overwrite) to start over."
        )
