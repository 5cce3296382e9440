"""The lazy NAP pass of a layer: dask tasks over its chunks, reduced in a tree.

The tasks run the kernels of :mod:`inntrospect.analysis.nap_kernels` (chunk,
merge :data:`FAN_IN` at a time, finalize) and give lazy ``(nap, std or None)``
dask arrays; :mod:`inntrospect.analysis.profiles` opens the store, chooses
the route and wraps them. One pass over each layer, never a whole layer in
memory; partial results hold only the groups their chunks contain.

Speed (``benchmarks/bench_naps.py``): a NAP pass should run at the speed of
reading the store. So for chunk files that can be read directly
(:func:`stored_layer_naps`), each task reads a few consecutive chunk files
itself (:func:`task_chunks`), one at a time, decoding each into a buffer of
its thread that is reused from chunk to chunk and task to task
(:func:`inntrospect.store.chunkio.read_chunk`; Zarr's own read decodes into
fresh memory and copies it again, at about 60 % of that speed; on this kind
of VM touching fresh memory is slow). Each thread keeps those buffers, a few
chunks' worth, for the next NAP pass. The gradients' shifts are computed
first and the chunk is summed shifted while it is still in cache
(:func:`inntrospect.analysis.nap_kernels.add_sums`). Chunks of other
encodings, and trees given instead of paths, are read through their dask
arrays (:func:`dask_layer_naps`).
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError, StoreError
from ..store import chunkio
from . import compiled
from .nap_kernels import (
    add_sums,
    aligned_moments,
    as_moments,
    chunk_moments,
    finalize_moments,
    fusable,
    merge_moments,
    shifts3,
)

__all__ = [
    "FAN_IN",
    "CHUNKS_PER_TASK",
    "TASK_RESULT_MIB",
    "MIN_TASKS",
    "task_chunks",
    "stored_layer_naps",
    "dask_layer_naps",
]

#: partial results merged per task in the reduction tree
FAN_IN = 8
#: stored chunks read and reduced by one task, one after the other: the task's
#: partial result is new memory, once per task rather than once per chunk
CHUNKS_PER_TASK = 8
#: ... as long as that partial result (float64 sums of its groups) stays this small,
TASK_RESULT_MIB = 32
#: ... and a layer still makes this many tasks, to keep the workers busy
MIN_TASKS = 16


# -- tasks -----------------------------------------------------------------------
def _chunk(acts, codes, grads=None, std=False):
    """One task: the moments of a chunk (given as an array), aligned when gradients are given."""
    if grads is not None:
        return aligned_moments(acts, codes, grads, std)
    return chunk_moments(acts, codes, std)


def _stored_chunks(chunks, codes, std=False):
    """One task: consecutive stored chunks, each read into this thread's buffers and reduced.

    ``chunks`` is a list of ``(acts, grads or None)`` :class:`~inntrospect.store.chunkio.ChunkFile`
    records, ``codes`` the group codes of all their samples. The buffers are
    reused by the next chunk, so nothing of them is returned: the chunks are
    added into one partial result (float64 sums of the groups present), new
    memory once per task rather than per chunk.
    """
    kernels = compiled.kernels()
    if std or kernels is None:
        parts, lo = [], 0
        for acts, grads in chunks:
            x = chunkio.read_chunk(acts, "acts")
            c = codes[lo : lo + len(x)]
            lo += len(x)
            parts.append(_chunk(x, c, chunkio.read_chunk(grads, "grads") if grads is not None else None, std))
        return merge_moments(*parts)
    present, index, counts = np.unique(codes, return_inverse=True, return_counts=True)
    index = index.reshape(-1).astype(np.intp)
    sums, lo = None, 0
    for acts, grads in chunks:
        g = shift = None
        if grads is not None:  # gradients first: their shifts, then the chunk while in cache
            g = chunkio.read_chunk(grads, "grads")
            shift = shifts3(g) if fusable(acts.shape, grads.shape) else None
        x = chunkio.read_chunk(acts, "acts")
        if sums is None:
            sums = np.zeros((len(present), int(np.prod(x.shape[1:], dtype=np.int64))))
        add_sums(kernels, x, index[lo : lo + len(x)], sums, g, shift)
        lo += len(x)
    if lo != len(codes):
        raise ParameterError(f"{lo} samples but {len(codes)} group codes: give one group code per sample.")
    return as_moments(present, counts, sums)


def task_chunks(codes, bounds, values: int) -> list[tuple[int, int]]:
    """Consecutive chunks ``[a, b)`` per task.

    At most :data:`CHUNKS_PER_TASK` (fewer for layers of fewer than
    :data:`MIN_TASKS` times that many chunks, so that they still make
    :data:`MIN_TASKS` tasks), while the task's partial result (float64 sums of
    the groups its samples hold) stays within :data:`TASK_RESULT_MIB`; one
    chunk always makes a task.
    """
    n_chunks = len(bounds) - 1
    per_task = max(1, min(CHUNKS_PER_TASK, n_chunks // MIN_TASKS))
    out, a, groups = [], 0, set()
    for k in range(n_chunks):
        present = set(np.unique(codes[bounds[k] : bounds[k + 1]]).tolist())
        union = groups | present
        if k > a and (k - a >= per_task or len(union) * values * 8 > TASK_RESULT_MIB * 2**20):
            out.append((a, k))
            a, union = k, present
        groups = union
    if n_chunks:
        out.append((a, n_chunks))
    return out


# -- graphs ----------------------------------------------------------------------
def stored_layer_naps(files, gfiles, n_groups: int, codes, shape: tuple, std: bool):
    """Lazy ``(nap, std or None)`` of tasks that read their chunk files themselves (:func:`_stored_chunks`).

    ``files`` (and ``gfiles``, the gradients' or None) are the layer's
    :func:`inntrospect.store.chunkio.chunk_files`; ``codes`` the group code of
    every sample, ``shape`` that of one sample. The graph is written out
    directly (one ``dask.delayed`` call per chunk costs more than reading a
    small chunk): tasks of a few chunks (:func:`task_chunks`), merges
    :data:`FAN_IN` at a time, the final division.
    """
    import operator

    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    shape = tuple(int(k) for k in shape)
    files = [chunkio.ChunkFile(*f) for f in files]
    gfiles = [chunkio.ChunkFile(*g) for g in gfiles] if gfiles else [None] * len(files)
    token = tokenize(files, gfiles, codes, n_groups, shape, std)
    bounds = np.cumsum((0, *(f.n for f in files)))
    dsk: dict = {}
    keys = []
    for i, (a, b) in enumerate(task_chunks(codes, bounds, int(np.prod(shape, dtype=np.int64)))):
        keys.append((f"naps-chunk-{token}", i))
        dsk[keys[-1]] = (_stored_chunks, list(zip(files[a:b], gfiles[a:b])), codes[bounds[a] : bounds[b]], std)
    level = 0
    while len(keys) > 1:
        name = f"naps-merge{level}-{token}"
        groups = [keys[k : k + FAN_IN] for k in range(0, len(keys), FAN_IN)]
        keys = [(name, j) for j in range(len(groups))]
        dsk.update({key: (merge_moments, *group) for key, group in zip(keys, groups)})
        level += 1
    final = f"naps-final-{token}"
    dsk[final] = (finalize_moments, keys[0], n_groups, shape, std)
    zeros = (0,) * (len(shape) + 1)
    chunks = ((n_groups,), *((k,) for k in shape))
    out = []
    for i, what in enumerate(("mean", "std") if std else ("mean",)):
        name = f"naps-{what}-{token}"
        layer = {**dsk, (name, *zeros): (operator.getitem, final, i)}
        out.append(da.Array(HighLevelGraph.from_collections(name, layer), name, chunks, dtype=np.float64))
    return out[0], (out[1] if std else None)


def dask_layer_naps(data, grads, names, codes, std: bool):
    """Lazy ``(nap, std or None)`` dask arrays of one layer, from the blocks of its dask arrays.

    ``data`` (and ``grads``, or None to average unaligned) are the layer's
    DataArrays, chunked along samples only; ``names`` the groups, ``codes``
    each sample's group code.
    """
    import dask

    if data.data.numblocks[1:] != (1,) * (data.ndim - 1):
        raise StoreError("activations must be chunked along samples only.")
    blocks = data.data.to_delayed().reshape(-1)
    gblocks = grads.data.rechunk(data.data.chunks).to_delayed().reshape(-1) if grads is not None \
        else [None] * len(blocks)
    task = dask.delayed(_chunk, pure=True)
    bounds = np.cumsum((0, *data.data.chunks[0]))
    parts = [task(a, codes[lo:hi], g, std) for a, g, lo, hi in zip(blocks, gblocks, bounds, bounds[1:])]
    return _reduce_layer(parts, len(names), tuple(data.shape[1:]), std)


def _reduce_layer(parts: list, n_groups: int, shape: tuple, std: bool):
    """Lazy ``(nap, std or None)`` dask arrays from the per-chunk moment tasks of a layer."""
    import dask
    import dask.array as da

    final = dask.delayed(finalize_moments, pure=True, nout=2)(_tree_reduce(parts), n_groups, shape, std)
    out = (n_groups, *shape)
    mean = da.from_delayed(final[0], out, dtype=np.float64)
    sd = da.from_delayed(final[1], out, dtype=np.float64) if std else None
    return mean, sd


def _tree_reduce(parts: list, fan_in: int = FAN_IN):
    import dask

    merge = dask.delayed(merge_moments, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]
