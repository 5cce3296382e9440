"""The Zarr v3 store: its format, codecs, location and lock, nodes, step records, and handle.

The format is specified in ``storage/README.md`` (format version 1); this
package is the only code that knows it. Reading needs nothing but
``xarray.open_datatree(path, engine="zarr")``.

- :mod:`.format` — node paths, dims, chunk plan, layer specs, root attributes;
- :mod:`.codecs` — the arrays' codecs and the rule choosing them;
- :mod:`.backends` — where a store lives (folder or fsspec URL) and its writer lock;
- :mod:`.nodes` — opening, reading, creating, writing and removing nodes;
- :mod:`.handle` — :class:`Store`, a store opened once and handed down;
- :mod:`.append` — appending samples: the checks, and growing the arrays;
- :mod:`.steps` — step records, staleness, persisting a step's results, :func:`load`;
- :mod:`.chunkio` — reading stored chunks whole, for the NAP tasks (checksums checked);
- :mod:`.integrity` — ``inntrospect verify``: every chunk of every array read and checked;
- :mod:`.info` — ``inntrospect info``.
"""

from .append import base_samples, check_append, grow, growing, stored_plan, table_sha256
from .backends import Location, location
from .codecs import (
    CHECKSUM,
    CODEC,
    CODEC_RESULT,
    CODEC_TABLE,
    MIN_RATIO,
    choose_codecs,
    zarr_codecs,
)
from .format import (
    BLOCK_CHUNKS,
    BLOCKS_DONE,
    DEFAULT_CHUNK_MIB,
    FORMAT,
    FORMAT_VERSION,
    LAYERS,
    MAX_CHUNK_SAMPLES,
    ChunkPlan,
    LayerSpec,
    check_same,
    layer_dims,
    layer_path,
    new_extraction,
    plan_chunks,
    plan_for,
    root_attrs,
    spatial_dims,
    timestamp,
)
from .handle import Store
from .nodes import (
    array_meta,
    blocks_done,
    check_chunks,
    checked_dask_array,
    chunk_grid,
    chunk_where,
    consolidate,
    create_derived_array,
    create_store,
    damaged_error,
    finish_extraction,
    group_labels,
    has_node,
    is_locked,
    is_store,
    layer_arrays,
    layer_group,
    missing_chunks,
    node_bytes,
    occupant,
    open_array,
    open_store,
    open_tree,
    remove_node,
    remove_store,
    repair_hint,
    store_attrs,
    stored_chunks,
    update_attrs,
    write_node,
    write_sample_table,
    writer_lock,
    zarr_store,
)

__all__ = [
    "Location", "location", "Store",
    "CHECKSUM", "CODEC", "CODEC_RESULT", "CODEC_TABLE", "MIN_RATIO", "choose_codecs", "zarr_codecs",
    "BLOCK_CHUNKS", "BLOCKS_DONE", "DEFAULT_CHUNK_MIB", "FORMAT", "FORMAT_VERSION", "LAYERS",
    "MAX_CHUNK_SAMPLES", "ChunkPlan", "LayerSpec", "check_same", "layer_dims", "layer_path",
    "new_extraction", "plan_chunks", "plan_for", "root_attrs", "spatial_dims", "timestamp",
    "array_meta", "blocks_done", "consolidate", "create_derived_array", "create_store", "group_labels",
    "has_node", "is_locked", "is_store", "layer_arrays", "layer_group", "node_bytes", "open_array", "open_store", "open_tree", "remove_node",
    "remove_store", "store_attrs", "check_chunks", "checked_dask_array", "chunk_grid", "chunk_where",
    "damaged_error", "missing_chunks", "repair_hint", "stored_chunks", "finish_extraction", "occupant", "update_attrs", "write_node", "writer_lock", "zarr_store",
    "write_sample_table", "base_samples", "check_append", "grow", "growing", "stored_plan", "table_sha256",
]
