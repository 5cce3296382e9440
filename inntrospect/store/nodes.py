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

from ..errors import (
    DamagedStoreError,
    IncompleteStoreError,
    StoreAccessError,
    StoreError,
    StoreLockedError,
)
from . import codecs as codec_rules
from .backends import location
from .codecs import CODEC_RESULT, CODEC_TABLE, zarr_codecs
from .faults import guarded
from .format import (
    BLOCKS_DONE,
    FORMAT,
    FORMAT_VERSION,
    LAYERS,
    ChunkPlan,
    LayerSpec,
    layer_dims,
    layer_path,
    timestamp,
)
from .localnode import array_doc, create_nodes, update_root, write_file, write_local

__all__ = [
    "zarr_store", "open_tree", "writer_lock", "is_locked", "is_store", "store_attrs", "open_store",
    "consolidate", "update_attrs", "remove_node", "write_node", "result_encoding", "GROUP_CHUNK_BYTES", "remove_store", "create_store",
    "open_array", "write_sample_table", "layer_group", "layer_arrays", "blocks_done", "create_derived_array", "group_labels", "array_meta", "has_node", "node_bytes", "occupant", "finish_extraction",
    "STAGED", "ASIDE", "remove_staged", "swap_in",
    "chunk_grid", "chunk_where", "repair_hint", "damaged_error", "stored_chunks", "missing_chunks",
    "check_chunks", "checked_dask_array", "decode_problem",
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
    where = location(path)
    with guarded(where), where.lock(StoreLockedError) as holder:  # a full disk, a read-only folder
        yield holder


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
    where = location(path)
    with guarded(where):
        text = where.read_text("zarr.json")
        if text is None:
            what = "does not exist" if not where.exists() else "is not a Zarr store (no zarr.json)"
            raise StoreError(f"{path} {what}; check the path, or run inntrospect extract first.")
        meta = json.loads(text)
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is a Zarr store but not an inntrospect store (no format attribute).")
    version = attrs.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreAccessError(
            f"{path} has a damaged format_version ({version!r}, not an integer) in its zarr.json; "
            "restore the store from a copy, or extract it again with --overwrite.")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} has store format version {version}, newer than this inntrospect understands "
            f"({FORMAT_VERSION}); upgrade inntrospect."
        )
    if "extraction" in attrs and not isinstance(attrs.get("layers"), list):
        raise StoreAccessError(
            f"{path} has no list of layers in its zarr.json ({attrs.get('layers')!r}): its root "
            "attributes were damaged or edited. Restore the store, or extract it again with --overwrite.")
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


def consolidate(path: str | os.PathLike, changed: Sequence[str] | None = None) -> None:
    """Refresh consolidated metadata so plain xarray opens the store quickly and silently.

    ``changed`` names the only nodes (with everything below them) that changed
    since the last refresh: on a local disk only their metadata is read again
    (:func:`~inntrospect.store.localnode.update_root`).
    """
    import zarr

    loc = location(path)
    if changed is not None and loc.is_local and update_root(loc.url, changed=changed):
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        zarr.consolidate_metadata(zarr_store(path))


def update_attrs(path: str | os.PathLike, **changes) -> None:
    """Merge ``changes`` into the root attributes (on a local disk: the root's ``zarr.json`` replaced
    whole, its consolidated metadata kept)."""
    import zarr

    loc = location(path)
    if loc.is_local and update_root(loc.url, attrs=changes):
        return
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
    nodes: on object storage a refresh lists the whole store). Text labels are
    stored as Zarr v3 variable-length strings, like the sample table. On a
    local disk the files are written directly (:mod:`.localnode`: what
    ``to_zarr`` writes, faster); anything it does not cover goes through xarray.
    """
    text = {k: v.astype(object) for k, v in ds.variables.items() if v.dtype.kind == "U"}
    ds = ds.assign_coords({k: v for k, v in text.items() if k in ds.coords}).assign(
        {k: v for k, v in text.items() if k not in ds.coords})
    loc = location(path)
    encoding = result_encoding(ds)
    if not (loc.is_local and write_local(loc.url, name, ds, encoding)):  # the same files, faster
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            ds.to_zarr(loc.url, group=name, mode="w", zarr_format=3, consolidated=False,
                       encoding=encoding, **loc.xarray_kwargs())
    if consolidated:
        consolidate(path)


#: a result array is chunked one group per chunk when each group's part is at least this big
GROUP_CHUNK_BYTES = 1 << 20


def _chunks(var) -> tuple:
    """A result array's chunks: one group per chunk when each group's part is big (reading one group
    reads one chunk), else the whole array as one chunk (each chunk file costs file-system calls)."""
    if var.ndim > 1 and var.dims[0] == "group" and var.nbytes >= GROUP_CHUNK_BYTES * var.shape[0]:
        return (1, *var.shape[1:])
    return tuple(max(n, 1) for n in var.shape)


def result_encoding(ds) -> dict:
    """Every variable of a result node: zstd (:data:`CODEC_RESULT`) and the checksum, or the checksum
    alone where the variable's own encoding says ``compressors=None`` (what ``to_zarr`` reads it as:
    the step that makes it knows zstd would barely shrink it); chunked as :func:`_chunks` says, chunk
    keys ``c.0.0`` (one file in the array's folder, not a folder per axis)."""
    return {k: {"chunks": _chunks(v), "compressors": zarr_codecs(None if _uncompressed(v) else CODEC_RESULT),
                "chunk_key_encoding": {"name": "default", "separator": "."}}
            for k, v in ds.variables.items()}


def _uncompressed(var) -> bool:
    """Whether ``var`` asks to be stored without compression (``encoding["compressors"]`` is None;
    arrays read from a store carry their codecs there, never None)."""
    return "compressors" in var.encoding and var.encoding["compressors"] is None


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
    *,
    via_zarr: bool = False,
) -> None:
    """Write an empty store: root attrs, one node per layer, block records.

    Arrays follow xarray's Zarr v3 conventions (``dimension_names``; the sample
    table named in the ``coordinates`` attribute of ``acts``/``grads``), so plain
    xarray reads them back as labelled data. Activation chunks are written
    later by region writes. The ``extraction`` attribute goes in last: a store
    without it was interrupted while being created and is simply created again.
    On a local disk the files are written directly, unless ``via_zarr`` (what
    object storage gets; the tests compare the two).
    """
    import zarr

    loc = location(path)
    if loc.is_local and not via_zarr:  # the same files, written directly: Zarr took ~0.25 s of CPU for a small model's store
        _create_local(loc.url, attrs, layers, plan, sample_table)
        return
    n = len(sample_table["group"])
    root = zarr.open_group(zarr_store(path), mode="w", zarr_format=3)
    root.attrs.update({**{k: v for k, v in attrs.items() if k != "extraction"},
                       "checksum": codec_rules.CHECKSUM})
    root.create_array(
        BLOCKS_DONE, shape=(plan.n_blocks(n),), chunks=(1,), dtype="uint8", fill_value=0,
        dimension_names=("block",), compressors=zarr_codecs(None),
    )
    coordinates = " ".join(sorted([*_TABLE_COLUMNS][1:] + ["prediction"]))
    first = None  # the layer whose sample table the others' copy, on a local disk
    for info in layers:
        node = root.create_group(layer_path(info.name), attributes={"layer": info.name})
        if first is None or not _copy_table(root, first, layer_path(info.name)):
            write_sample_table(node, sample_table)
            first = layer_path(info.name)
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


def _create_local(folder: str, attrs: dict, layers: Sequence[LayerSpec], plan: ChunkPlan,
                  sample_table: Mapping[str, np.ndarray]) -> None:
    """:func:`create_store` on a local disk: every ``zarr.json`` and the sample table's chunks written
    straight to their files (:func:`~inntrospect.store.localnode.create_nodes`), what Zarr writes for
    them (a test compares the two stores file for file); the root's ``extraction`` attribute and its
    consolidated metadata last."""
    import shutil

    n = len(sample_table["group"])
    if os.path.lexists(folder):  # as Zarr's mode "w": whatever was there goes
        shutil.rmtree(folder)
    os.makedirs(folder)
    root = {**{k: v for k, v in attrs.items() if k != "extraction"}, "checksum": codec_rules.CHECKSUM}
    write_file(os.path.join(folder, "zarr.json"), json.dumps(
        {"attributes": root, "zarr_format": 3, "node_type": "group",
         "consolidated_metadata": {"kind": "inline", "must_understand": False, "metadata": {}}}).encode())
    groups = {"extraction": {}, "layers": {}}
    arrays = {BLOCKS_DONE: (array_doc((plan.n_blocks(n),), "uint8", (1,), fill=0, compressors=zarr_codecs(None),
                                      dims=("block",)), None)}
    table = _table_arrays(sample_table)
    coordinates = " ".join(sorted([*_TABLE_COLUMNS][1:] + ["prediction"]))
    for info in layers:
        node = layer_path(info.name)
        groups[node] = {"layer": info.name}
        for name in _TABLE_COLUMNS:
            values = table[name]
            arrays[f"{node}/{name}"] = (array_doc(
                (n,), str if name in ("group", "file") else values.dtype, (max(n, 1),),
                fill="" if name in ("group", "file") else 0, compressors=zarr_codecs(CODEC_TABLE),
                dims=("sample",)), values)
        arrays[f"{node}/prediction"] = (array_doc((n,), "int64", (plan.block,), fill=-1,
                                                  compressors=zarr_codecs(CODEC_TABLE), dims=("sample",)), None)
        dims = ("sample", *layer_dims(info.shape))
        for var in ("acts", "grads") if info.has_grads else ("acts",):
            arrays[f"{node}/{var}"] = (array_doc(
                (n, *info.shape), "float32", (plan.chunks[info.name], *info.shape), fill=np.nan,
                compressors=zarr_codecs(attrs["codecs"][info.name][var]), dims=dims,
                attrs={"coordinates": coordinates}), None)
    for name in [*groups, *arrays]:  # parents Zarr makes on the way (layers named "block/conv")
        parts = name.split("/")
        for depth in range(1, len(parts)):
            groups.setdefault("/".join(parts[:depth]), {})
    create_nodes(folder, groups, arrays)
    if not update_root(folder, attrs={"extraction": attrs["extraction"]}, changed=["extraction", "layers"]):
        raise StoreError(f"could not write the root metadata of {folder}")


#: the sample table's arrays in every layer node (``sample``, the index, first)
_TABLE_COLUMNS = ("sample", "group", "file", "index_in_file", "target")


def _copy_table(root, src: str, dst: str) -> bool:
    """Copy the sample table's arrays (metadata and chunk files) of node ``src`` into node ``dst`` of a
    local store (encoding the same table again for every layer cost most of a store's creation);
    False elsewhere."""
    import shutil

    from zarr.storage import LocalStore

    if not isinstance(root.store, LocalStore):
        return False
    base = os.path.join(str(root.store.root), *(root.path.split("/") if root.path else ()))
    for name in _TABLE_COLUMNS:
        shutil.copytree(os.path.join(base, *src.split("/"), name), os.path.join(base, *dst.split("/"), name))
    return True


def _table_arrays(sample_table: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The sample table's columns as stored (``sample`` the index; text as ``str``)."""
    n = len(sample_table["group"])
    return {
        "sample": np.arange(n, dtype=np.int64),
        "group": np.asarray(sample_table["group"]).astype(str),
        "file": np.asarray(sample_table["file"]).astype(str),
        "index_in_file": np.asarray(sample_table["index_in_file"], dtype=np.int64),
        "target": np.asarray(sample_table["target"], dtype=np.int64),
    }


def write_sample_table(node, sample_table: Mapping[str, np.ndarray]) -> None:
    """Write (replacing) the sample table's arrays in a layer's node (a Zarr group): one chunk each."""
    n = len(sample_table["group"])
    table = _table_arrays(sample_table)
    for name in _TABLE_COLUMNS:
        values = table[name]
        node.create_array(
            name, shape=(n,), chunks=(max(n, 1),), dtype=str if name in ("group", "file") else
            values.dtype, dimension_names=("sample",), compressors=zarr_codecs(CODEC_TABLE),
            config={"write_empty_chunks": True},  # stored even when all fill ("" files): verifiable
            overwrite=True,
        )[:] = values


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


def layer_arrays(path) -> dict[str, dict]:
    """``{layer: {name: Zarr array}}`` of every layer node, read-only, from the root's consolidated
    metadata in one Zarr call (:func:`layer_group` per layer costs a call, and 2-3 ms, each)."""
    import zarr

    out: dict[str, dict] = {}
    layers = zarr.open_group(zarr_store(path, read_only=True), mode="r")[LAYERS]
    for name, member in layers.members(max_depth=1):
        layer, _, array = name.partition("/")
        if array and isinstance(member, zarr.Array):
            out.setdefault(layer, {})[array] = member
    return out


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
        compressors=zarr_codecs(codec), config={"write_empty_chunks": True},  # every chunk on disk
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
        extraction.pop("kept", None)  # an append's rows read back: written whole now
        extraction.update(state="complete", finished=timestamp())
        update_attrs(path, extraction=extraction)


def has_node(path, name: str) -> bool:
    """Whether the store has the group or array ``name`` (e.g. :data:`BLOCKS_DONE`)."""
    return location(path).read_text(f"{name}/zarr.json") is not None


def node_bytes(path, layer: str) -> int:
    """Bytes a layer's node takes in the store (all its arrays)."""
    return location(path).size(layer_path(layer))


#: suffix of the node a run writes beside the one it replaces (``naps.next``, ``layers/<layer>/aligned.next``)
STAGED = ".next"
#: suffix of the node a local swap moves aside for a moment (``naps.old``)
ASIDE = ".old"


def remove_staged(path, names: Sequence[str]) -> list[str]:
    """Delete what an interrupted run left of its new nodes beside ``names`` (``<name>.next``,
    ``<name>.old``); returns what was deleted. The consolidated metadata is refreshed if anything was."""
    where = location(path)
    gone = [f"{name}{suffix}" for name in names for suffix in (STAGED, ASIDE)
            if where.has(f"{name}{suffix}")]
    for name in gone:
        where.delete(name)
    if gone:
        consolidate(path)
    return gone


def swap_in(path, new_name: str, name: str, *, consolidated: bool = True) -> None:
    """Put the node ``new_name`` (a group or array, complete) in place of ``name`` (replacing it, if any).

    On a local disk two renames (``name`` aside to ``<name>.old``, ``new_name``
    to ``name``; the first undone if the second fails), then the old node is
    deleted. On object storage, which has no rename, the old node is deleted
    and the new one copied into place (then deleted). Without ``new_name``
    (a run that wrote nothing) the old node is just deleted. Either way the
    store's records must not trust ``name`` until this returns (see
    :func:`inntrospect.store.steps.replacing`). ``consolidated=False`` leaves
    refreshing the consolidated metadata to the caller.
    """
    where = location(path)
    if not where.has(new_name):
        where.delete(name)
    elif where.is_local:
        aside = f"{name}{ASIDE}"
        where.delete(aside)
        had = where.has(name)
        if had:
            where.move(name, aside)
        try:
            where.move(new_name, name)
        except BaseException:
            if had:
                where.move(aside, name)
            raise
        where.delete(aside)
    else:  # a move is a copy there: not worth making of the old node, which goes anyway
        where.delete(name)
        where.move(new_name, name)
    if consolidated:
        consolidate(path)


# -- integrity: the chunks an array should have, which are missing, and how to repair them --
#: missing chunks named in one error message (the rest are counted)
_NAMED = 3


def chunk_grid(arr) -> list[tuple[tuple[int, ...], str]]:
    """``(chunk coordinates, chunk key)`` of every chunk of a Zarr v3 array, in C order."""
    import itertools

    counts = [-(-int(s) // int(c)) for s, c in zip(arr.shape, arr.chunks)]
    encode = arr.metadata.encode_chunk_key
    return [(coords, encode(coords)) for coords in itertools.product(*map(range, counts))]


def chunk_where(path, name: str, key: str) -> str:
    """Where the chunk ``key`` of the array ``name`` lives: its file in a local store, else its URL."""
    where = location(path)
    if where.is_local:
        return os.path.join(where.url, *name.split("/"), *key.split("/"))
    return f"{where.url}/{name}/{key}"


def repair_hint(path, name: str) -> str:
    """What repairs a damaged or missing chunk of the array ``name``: the commands to run.

    (Arrays of derived results: re-running their step, which
    :func:`inntrospect.store.integrity.repair_hint` names.)
    """
    store = location(path).url
    parts = name.split("/")
    var = parts[-1] if len(parts) == 3 and parts[0] == LAYERS else None
    if var in ("acts", "grads", "prediction"):
        return (f"Run inntrospect verify {store} to list every damaged chunk, then inntrospect "
                "extract CONFIG --verify: it extracts the blocks they belong to again and keeps the rest.")
    if var is not None and var.startswith("aligned"):
        return ("Run inntrospect align CONFIG again: it writes the aligned activations anew from acts "
                f"and grads (inntrospect verify {store} checks those first).")
    if var is not None:
        return ("The sample table is written once, when the store is created: restore the store "
                "from a copy, or extract it again with inntrospect extract CONFIG --overwrite.")
    if name == BLOCKS_DONE:
        return "Run inntrospect extract CONFIG --verify: it un-records that block and extracts it again."
    return "Restore the store from a copy, or extract it again with inntrospect extract CONFIG --overwrite."


def damaged_error(path, name: str, key: str, what: str) -> DamagedStoreError:
    """The error of a chunk ``key`` of array ``name`` that is missing or damaged (``what`` is wrong).

    It carries ``array``, ``chunk`` and ``problem`` (``what``) as attributes, for reports.
    """
    err = DamagedStoreError(
        f"{chunk_where(path, name, key)} {what}: chunk {key} of {name} in {location(path).url} is "
        f"damaged. {repair_hint(path, name)}")
    err.array, err.chunk, err.problem = name, key, what
    return err


def stored_chunks(path, name: str, keys: Sequence[str]) -> set[str]:
    """Which of the chunk ``keys`` of the array ``name`` are stored.

    Local stores: one ``stat`` per chunk file (cheaper than a listing of the
    nested chunk folders). Object storage: one listing of the array's prefix.
    """
    where = location(path)
    if where.is_local:
        base = os.path.join(where.url, *name.split("/"))
        return {k for k in keys if os.path.isfile(os.path.join(base, *k.split("/")))}
    fs = where.fs
    root = fs._strip_protocol(f"{where.url}/{name}").rstrip("/")
    try:
        found = fs.find(root)
    except FileNotFoundError:
        found = []
    have = {f[len(root) + 1:] for f in found}
    return {k for k in keys if k in have}


def missing_chunks(path, layer: str, var: str, *, recorded=None, block: int | None = None,
                   arr=None) -> list[str]:
    """Keys of the chunks of ``layers/<layer>/<var>`` that should be stored and are not.

    Every chunk should be, in a complete store (a chunk never written reads as
    the fill value: NaN for activations). With ``recorded`` (one bool per
    extraction block, ``block`` samples each) only the chunks of recorded
    blocks. ``arr`` is the array if it is open already.
    """
    return _missing(path, open_array(path, layer, var) if arr is None else arr, recorded, block)


def _missing(path, arr, recorded=None, block: int | None = None, start: int = 0) -> list[str]:
    grid = chunk_grid(arr)
    if start:
        grid = [(coords, key) for coords, key in grid if (coords[0] + 1) * int(arr.chunks[0]) > start]
    if recorded is not None:
        c = int(arr.chunks[0])
        grid = [(coords, key) for coords, key in grid if recorded[coords[0] * c // block]]
    keys = [key for _, key in grid]
    have = stored_chunks(path, arr.path, keys)
    return [k for k in keys if k not in have]


def check_chunks(path, layers: Sequence[str] | None = None,
                 variables: Sequence[str] = ("acts", "grads"), *, arrays=None, start: int = 0) -> None:
    """Raise :class:`DamagedStoreError` when a chunk of these arrays of a complete store is missing.

    Checked before a pass reads them: a missing chunk would read as NaN. The
    arrays are ``variables`` of ``layers`` (all layers by default; arrays a
    layer does not have are skipped), or the open Zarr ``arrays``. A store
    whose extraction has not finished is not checked (its readers refuse it).
    With ``start``, only the chunks holding samples ``start`` and after (a pass
    over those samples only).
    """
    attrs = getattr(path, "attrs", None)
    attrs = store_attrs(path) if not isinstance(attrs, dict) else attrs
    if attrs.get("extraction", {}).get("state") != "complete":
        return
    if arrays is None:
        arrays = []
        for layer in attrs["layers"] if layers is None else layers:
            node = layer_group(path, layer)
            arrays += [node[var] for var in variables if var in node]
    for arr in arrays:
        missing = _missing(path, arr, start=start)
        if missing:
            more = len(missing) - 1
            also = ", ".join(missing[1 : 1 + _NAMED]) + (", ..." if more > _NAMED else "")
            raise damaged_error(
                path, arr.path, missing[0],
                "is missing (deleted, or never written)"
                + (f", and so are {more} more of its chunks ({also})" if more else ""))


class _CheckedRead:
    """A Zarr array as dask reads it, chunk by chunk: a chunk that fails to decode raises
    :class:`DamagedStoreError` naming it (Zarr's own ``ValueError``/``RuntimeError`` do not)."""

    def __init__(self, where, name: str, arr):
        self.where, self.name, self._arr = where, name, arr
        self.shape, self.dtype, self.chunks = tuple(arr.shape), np.dtype(arr.dtype), tuple(arr.chunks)
        self.ndim = len(self.shape)

    def __getstate__(self):  # the Zarr array is opened again where the reads run
        return {**self.__dict__, "_arr": None}

    def __getitem__(self, key):
        import zarr

        arr = self._arr
        if arr is None:
            arr = self._arr = zarr.open_array(zarr_store(self.where, read_only=True), path=self.name, mode="r")
        try:
            return arr[key]
        except (ValueError, RuntimeError) as err:
            if not isinstance(key, tuple):
                key = (key,)
            coords = tuple((k.start or 0) // c if isinstance(k, slice) else 0 for k, c in zip(key, self.chunks))
            raise damaged_error(self.where, self.name, arr.metadata.encode_chunk_key(coords),
                                decode_problem(err)) from err


def decode_problem(err: BaseException) -> str:
    """What a Zarr decoding error says is wrong with a chunk, in words."""
    text = str(err)
    if "checksum" in text.lower():
        return f"fails its crc32c checksum ({text})"
    return f"does not decode ({type(err).__name__}: {text})"


def checked_dask_array(path, name: str):
    """The array ``name`` as a dask array in its stored chunks, read through Zarr, each chunk
    that fails its checksum or does not decode raising :class:`DamagedStoreError`."""
    import uuid

    import dask.array as da
    import zarr

    where = location(path)
    reader = _CheckedRead(where, name, zarr.open_array(zarr_store(where, read_only=True), path=name, mode="r"))
    return da.from_array(reader, chunks=reader.chunks, name=f"read-{name}-{uuid.uuid4().hex}",
                         asarray=False, fancy=False, meta=np.empty((0,) * reader.ndim, reader.dtype))
