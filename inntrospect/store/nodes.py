"""The store's nodes: opening, reading the root attributes, creating, writing, removing.

The only code that opens Zarr nodes for writing. Where the store lives (a
folder or an fsspec URL) and its writer lock are in :mod:`.backends`; what the
nodes are called, in :mod:`.format`.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from ..errors import IncompleteStoreError, StoreError, StoreLockedError
from .backends import location
from .codecs import CODEC_TABLE, zarr_codecs
from .format import (
    BLOCKS_DONE,
    FORMAT,
    FORMAT_VERSION,
    ChunkPlan,
    LayerSpec,
    layer_dims,
    layer_path,
    timestamp,
)

__all__ = [
    "zarr_store", "open_tree", "writer_lock", "is_locked", "is_store", "store_attrs", "open_store",
    "consolidate", "update_attrs", "remove_node", "write_node", "remove_store", "create_store",
    "open_array", "layer_group", "blocks_done", "create_derived_array", "group_labels", "array_meta", "has_node", "node_bytes", "occupant", "finish_extraction",
]


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


def open_store(path, *, allow_incomplete: bool = False, attrs: dict | None = None):
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

    attrs = store_attrs(path) if attrs is None else attrs
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
    layers: Sequence[LayerSpec],
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
        node = root.create_group(layer_path(info.name), attributes={"layer": info.name})
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


def open_array(path, layer: str, var: str, *, write: bool = False):
    """One array of a layer (``acts``, ``grads``, ``prediction``, ``group``, ...) as a Zarr array.

    ``write=True`` opens it for chunk-aligned region writes; every chunk written
    holds data, so Zarr's check for all-fill chunks is skipped.
    """
    import zarr

    if write:
        return zarr.open_array(zarr_store(path), path=layer_path(layer, var), mode="r+",
                               config={"write_empty_chunks": True})
    return zarr.open_array(zarr_store(path, read_only=True), path=layer_path(layer, var), mode="r")


def layer_group(path, layer: str):
    """A layer's node as a read-only Zarr group (its arrays' metadata and chunks, without xarray)."""
    import zarr

    return zarr.open_group(zarr_store(path, read_only=True), path=layer_path(layer), mode="r")


def blocks_done(path, *, write: bool = False):
    """The extraction's block records (``extraction/block_done``, one uint8 per block)."""
    import zarr

    if write:
        return zarr.open_array(zarr_store(path), path=BLOCKS_DONE, mode="r+")
    return zarr.open_array(zarr_store(path, read_only=True), path=BLOCKS_DONE, mode="r")


def create_derived_array(path, layer: str, var: str, *, like: str = "acts", dims: Sequence[str],
                         codec: dict | None, attributes: Mapping) -> object:
    """Create (replacing) an array ``var`` of a layer shaped and chunked like ``like``, filled with NaN.

    Its chunks are written afterwards, one task per chunk; xarray reads it with the
    sample table as coordinates, like ``like``.
    """
    import zarr

    root = zarr.open_group(zarr_store(path), mode="r+")
    src = root[layer_path(layer, like)]
    return root.create_array(
        layer_path(layer, var), shape=src.shape, chunks=src.chunks, dtype="float32",
        fill_value=np.nan, dimension_names=tuple(dims), overwrite=True,
        compressors=zarr_codecs(codec),
        attributes={"coordinates": src.attrs.get("coordinates", ""), **attributes},
    )


def group_labels(path, layer: str) -> np.ndarray:
    """The group label of every sample (as stored for ``layer``), as an array of ``str``."""
    return np.array([str(g) for g in open_array(path, layer, "group")[:]])


def array_meta(path, layer: str, var: str = "acts") -> dict:
    """``dims``, ``shape`` and ``chunk`` (samples per chunk) of a layer's array, from its metadata."""
    meta = json.loads(location(path).read_text(f"{layer_path(layer, var)}/zarr.json"))
    return {"dims": tuple(meta["dimension_names"]), "shape": tuple(meta["shape"]),
            "chunk": meta["chunk_grid"]["configuration"]["chunk_shape"][0]}


def occupant(path) -> str | None:
    """What is at ``path`` that writing a new store there would replace: ``"a store"``,
    ``"something that is not a store"``, or None (nothing, or a store interrupted while
    being created, which is simply created again)."""
    where = location(path)
    if not where.exists():
        return None
    if is_store(where):
        return None if "extraction" not in store_attrs(where) else "a store"
    if where.read_text("zarr.json") is not None or where.is_nonempty_non_store():
        return "something that is not a store"
    return None


def finish_extraction(path) -> None:
    """Mark the extraction complete (once every block is recorded), with the time it finished."""
    extraction = dict(store_attrs(path)["extraction"])
    if extraction.get("state") != "complete":
        extraction.update(state="complete", finished=timestamp())
        update_attrs(path, extraction=extraction)


def has_node(path, name: str) -> bool:
    """Whether the store has the group or array ``name`` (e.g. :data:`BLOCKS_DONE`)."""
    return location(path).read_text(f"{name}/zarr.json") is not None


def node_bytes(path, layer: str) -> int:
    """Bytes a layer's node takes in the store (all its arrays)."""
    return location(path).size(layer_path(layer))
