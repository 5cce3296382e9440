"""The lazy NAP pass of a layer: dask tasks over its chunks, reduced in a tree.

The tasks run the kernels of :mod:`inntrospect.analysis.nap_kernels` (chunk,
merge :data:`FAN_IN` at a time, finalize) and give lazy NAPs (and standard
deviations) as dask arrays; asked for, the same tasks keep each unit's top
exemplars per group from the chunks they read
(:mod:`inntrospect.analysis.exemplar_kernels`), so NAPs and exemplars cost
one read of the store. :mod:`inntrospect.analysis.profiles` opens the store,
chooses the route and wraps them. One pass over each layer, never a whole
layer in memory; partial results hold only the groups their chunks contain
(and at most ``2 k`` exemplars per group and unit).

Speed (``benchmarks/bench_naps.py``): a NAP pass should run at the speed of
reading the store. So for chunk files that can be read directly
(:func:`stored_layer_pass`), each task reads a few consecutive chunk files
itself (:func:`task_chunks`), one at a time, decoding each into a buffer of
its thread that is reused from chunk to chunk and task to task
(:func:`inntrospect.store.chunkio.read_chunk`; Zarr's own read decodes into
fresh memory and copies it again, at about 60 % of that speed; on this kind
of VM touching fresh memory is slow). Each thread keeps those buffers, a few
chunks' worth, for the next NAP pass. The gradients' shifts are computed
first and the chunk is summed shifted while it is still in cache
(:func:`inntrospect.analysis.nap_kernels.add_sums`). Chunks of other
encodings, and trees given instead of paths, are read through their dask
arrays (:func:`dask_layer_pass`).
"""

from __future__ import annotations

from functools import partial

import numpy as np

from ..errors import ParameterError, StoreError
from ..store import chunkio
from . import compiled
from .exemplar_kernels import (
    Exemplars,
    RunningExemplars,
    chunk_exemplars,
    finalize_exemplars,
    merge_compiled,
    merge_exemplars,
)
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
    "EXEMPLAR_MIN_TASKS",
    "EXEMPLAR_CHUNKS_PER_TASK",
    "task_chunks",
    "OUTPUTS",
    "stored_layer_pass",
    "dask_layer_pass",
    "base_partial",
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
#: ... or this many when the pass keeps exemplars: a task's running top-k costs an insertion
#: for most of its first samples of each group and few after, so fewer, longer tasks
EXEMPLAR_MIN_TASKS = 2
#: ... of up to this many chunks (a partial result of exemplars does not grow with its chunks)
EXEMPLAR_CHUNKS_PER_TASK = 32


# -- tasks -----------------------------------------------------------------------
# A task's partial result is the moments of its groups, or ``(moments or None, exemplars)``
# when the pass also keeps each unit's top exemplars (``k``): both from the same chunk read.
def _chunk(acts, codes, grads=None, std=False, k=None, start=0, moments=True):
    """One task: the moments of a chunk (given as an array), aligned when gradients are given;
    with ``k``, also its exemplars (of the raw activations)."""
    mom = None
    if moments:
        mom = aligned_moments(acts, codes, grads, std) if grads is not None else chunk_moments(acts, codes, std)
    if k is None:
        return mom
    kernels = compiled.kernels()
    if kernels is None:
        return mom, chunk_exemplars(acts, codes, start, k)
    running = RunningExemplars(kernels, codes, start, k)
    running.add(np.asarray(acts))
    return mom, running.result()


def _stored_chunks(chunks, codes, std=False, k=None, start=0, moments=True):
    """One task: consecutive stored chunks, each read into this thread's buffers and reduced.

    ``chunks`` is a list of ``(acts, grads or None)`` :class:`~inntrospect.store.chunkio.ChunkFile`
    records, ``codes`` the group codes of all their samples, ``start`` the
    index of their first sample. The buffers are reused by the next chunk, so
    nothing of them is returned: the chunks are added into one partial result
    (float64 sums of the groups present; with ``k``, their exemplars, taken
    from the raw activations right after each chunk is read), new memory once
    per task rather than per chunk.
    """
    kernels = compiled.kernels()
    if k is not None and kernels is not None:  # a compiled running top-k over the task's chunks
        found = RunningExemplars(kernels, codes, start, k)
    else:
        found = []
    if not moments or std or kernels is None:
        parts, lo = [], 0
        for acts, grads in chunks:
            x = chunkio.read_chunk(acts, "acts")
            c = codes[lo : lo + len(x)]
            if isinstance(found, RunningExemplars):
                found.add(x)
            g = chunkio.read_chunk(grads, "grads") if grads is not None and moments else None
            mom = _chunk(x, c, g, std) if moments else None
            if isinstance(found, list) and k is not None:
                found.append(chunk_exemplars(x, c, start + lo, k))
            parts.append(mom)
            lo += len(x)
        mom = merge_moments(*parts) if moments else None
        if k is None:
            return mom
        return mom, (found.result() if isinstance(found, RunningExemplars) else merge_exemplars(*found))
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
        rows = index[lo : lo + len(x)]
        if k is not None and g is None:  # the sums added by the exemplars' loop, sample by sample
            found.add(x, sums, rows)
        else:
            if k is not None:
                found.add(x)
            add_sums(kernels, x, rows, sums, g, shift)
        lo += len(x)
    if lo != len(codes):
        raise ParameterError(f"{lo} samples but {len(codes)} group codes: give one group code per sample.")
    mom = as_moments(present, counts, sums)
    return mom if k is None else (mom, found.result())


def _merge(*parts):
    """Merge partial results: moments, or ``(moments or None, exemplars)`` pairs."""
    if not isinstance(parts[0], tuple):
        return merge_moments(*parts)
    moms = [m for m, _ in parts]
    kernels = compiled.kernels()
    exs = [e for _, e in parts]
    merged = merge_exemplars(*exs) if kernels is None else merge_compiled(kernels, *exs)
    return (None if moms[0] is None else merge_moments(*moms)), merged


def _finalize(part, n_groups: int, shape: tuple, std: bool, k=None):
    """``(mean or None, std or None, sample, value, position)``; the last three only with ``k``."""
    mom, ex = part if k is not None else (part, None)
    mean, sd = finalize_moments(mom, n_groups, shape, std) if mom is not None else (None, None)
    if k is None:
        return mean, sd
    return (mean, sd, *finalize_exemplars(ex, n_groups, k, shape[:-1], shape[-1]))


def task_chunks(codes, bounds, values: int, min_tasks: int = MIN_TASKS,
                per_task_max: int = CHUNKS_PER_TASK, threads: int = 1) -> list[tuple[int, int]]:
    """Consecutive chunks ``[a, b)`` per task.

    At most ``per_task_max`` (:data:`CHUNKS_PER_TASK`; fewer for layers of fewer than
    ``min_tasks`` (:data:`MIN_TASKS`) times that many chunks, so that they
    still make that many tasks), split as evenly as the chunks allow, while the
    task's partial result (float64 sums of the groups its samples hold) stays
    within :data:`TASK_RESULT_MIB`; one chunk always makes a task. With
    ``threads`` (how many tasks run at once), a layer's count of tasks is
    rounded up to a multiple of it when that adds at most half as many again:
    long tasks (an exemplar pass's) then end together rather than one thread
    finishing the layer alone (5 tasks of 0.35 s on 2 threads take 1.05 s, 6
    of 0.29 s 0.87 s).
    """
    n_chunks = len(bounds) - 1
    per_task = max(1, min(per_task_max, n_chunks // min_tasks))
    n_tasks = -(-n_chunks // per_task)
    if threads > 1 and n_tasks > 1:
        even = -(-n_tasks // threads) * threads
        if 2 * even <= 3 * n_tasks:
            n_tasks = min(even, n_chunks)
    starts = {round(i * n_chunks / n_tasks) for i in range(1, n_tasks)}
    out, a, groups = [], 0, set()
    for k in range(n_chunks):
        present = set(np.unique(codes[bounds[k] : bounds[k + 1]]).tolist())
        union = groups | present
        if k > a and (k in starts or len(union) * values * 8 > TASK_RESULT_MIB * 2**20):
            out.append((a, k))
            a, union = k, present
        groups = union
    if n_chunks:
        out.append((a, n_chunks))
    return out


# -- graphs ----------------------------------------------------------------------
#: what a layer's pass gives (the lazy arrays of :func:`stored_layer_pass` and :func:`dask_layer_pass`)
OUTPUTS = ("mean", "std", "sample", "value", "position")


def stored_layer_pass(files, gfiles, n_groups: int, codes, shape: tuple, std: bool,
                      k: int | None = None, moments: bool = True, *, first: int = 0, base=None,
                      threads: int = 1) -> dict:
    """Lazy arrays of one pass over a layer's chunk files, by tasks that read them themselves
    (:func:`_stored_chunks`): ``{"mean", "std"}`` (the NAPs; ``std`` when asked) and, with ``k``,
    ``{"sample", "value", "position"}`` (the exemplars, of the raw activations).

    ``files`` (and ``gfiles``, the gradients' or None) are the layer's
    :func:`inntrospect.store.chunkio.chunk_files`; ``codes`` the group code of
    every sample, ``shape`` that of one sample; ``moments=False`` keeps only
    the exemplars. The graph is written out directly (one ``dask.delayed``
    call per chunk costs more than reading a small chunk): tasks of a few
    chunks (:func:`task_chunks`), merges :data:`FAN_IN` at a time, the final
    step.

    ``first`` restricts the pass to samples ``first`` and after (only their
    chunk files are read; ``codes`` still holds every sample's), and ``base``,
    a partial result of the samples before (:func:`base_partial`), is merged in
    before the final step: an incremental update of a stored result. ``threads``
    is how many tasks the scheduler runs at once (:func:`task_chunks`).
    """
    from dask.base import tokenize

    shape = tuple(int(s) for s in shape)
    files = [chunkio.ChunkFile(*f) for f in files]
    gfiles = [chunkio.ChunkFile(*g) for g in gfiles] if gfiles else [None] * len(files)
    offset = 0
    if first:  # the chunk files from the one holding sample `first`; its samples before it: a group dropped
        ends = np.cumsum([f.n for f in files])
        skip = int(np.searchsorted(ends, first, side="right"))
        offset = int(ends[skip - 1]) if skip else 0
        files, gfiles = files[skip:], gfiles[skip:]
        codes = np.array(codes)
        codes[offset:first] = n_groups
    token = tokenize(files, gfiles, codes, n_groups, shape, std, k, moments, first, base, threads)
    bounds = offset + np.cumsum((0, *(f.n for f in files)))
    dsk: dict = {}
    keys = []
    # with exemplars, longer tasks: a task's running top-k fills once, then most scores are refused
    limits = (MIN_TASKS, CHUNKS_PER_TASK) if k is None else (EXEMPLAR_MIN_TASKS, EXEMPLAR_CHUNKS_PER_TASK)
    for i, (a, b) in enumerate(task_chunks(codes, bounds, int(np.prod(shape, dtype=np.int64)), *limits,
                                           threads=threads)):
        keys.append((f"naps-chunk-{token}", i))
        dsk[keys[-1]] = (_stored_chunks, list(zip(files[a:b], gfiles[a:b])), codes[bounds[a] : bounds[b]],
                         std, k, int(bounds[a]), moments)
    level = 0
    while len(keys) > 1:
        name = f"naps-merge{level}-{token}"
        groups = [keys[j : j + FAN_IN] for j in range(0, len(keys), FAN_IN)]
        keys = [(name, j) for j in range(len(groups))]
        dsk.update({key: (_merge, *group) for key, group in zip(keys, groups)})
        level += 1
    if first or base is not None:
        dsk[f"naps-rebase-{token}"] = (partial(_rebase, base=base, drop=n_groups if first > offset else None),
                                       keys[0])
        keys = [f"naps-rebase-{token}"]
    final = f"naps-final-{token}"
    dsk[final] = (_finalize, keys[0], n_groups, shape, std, k)
    return _outputs(dsk, final, token, n_groups, shape, std, k, moments)


def _rebase(part, *, base=None, drop=None):
    """The pass's merged partial result without the group ``drop`` (the samples before its first,
    read with it from a chunk file), merged with ``base`` (the partial result of those before)."""
    if drop is not None:
        if isinstance(part, tuple):
            mom, ex = part
            keep = ex.codes != drop
            rows = np.repeat(keep, ex.counts)
            part = ({g: m for g, m in mom.items() if g != drop} if mom is not None else None,
                    Exemplars(ex.k, ex.codes[keep], ex.counts[keep], ex.value[:, :, rows],
                              ex.sample[:, :, rows], ex.position[:, :, rows], ex.ranked))
        else:
            part = {g: m for g, m in part.items() if g != drop}
    return part if base is None else _merge(base, part)


def _outputs(dsk: dict, final, token: str, n_groups: int, shape: tuple, std: bool, k, moments) -> dict:
    """The lazy arrays of the pass whose last task is ``final`` in the graph ``dsk``."""
    import operator

    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    out_shapes = {"mean": (n_groups, *shape), "std": (n_groups, *shape)}
    dtypes = {"mean": np.float64, "std": np.float64, "sample": np.int64, "value": np.float64,
              "position": np.int32}
    if k is not None:
        ex = (2, n_groups, k, shape[-1])
        out_shapes.update(sample=ex, value=ex, position=(*ex, len(shape) - 1))
    wanted = [w for w in OUTPUTS if w in out_shapes and (w != "std" or std)
              and (moments or w not in ("mean", "std"))]
    out = {}
    for what in wanted:
        name = f"naps-{what}-{token}"
        dims = out_shapes[what]
        layer = {**dsk, (name, *(0,) * len(dims)): (operator.getitem, final, OUTPUTS.index(what))}
        out[what] = da.Array(HighLevelGraph.from_collections(name, layer), name,
                             tuple((d,) for d in dims), dtype=dtypes[what])
    return out


def base_partial(codes, count, mean=None, m2=None, exemplars=None, k: int | None = None,
                 spatial: tuple = ()):
    """A stored result as a partial result of the pass, to merge new samples into (``base`` of
    :func:`stored_layer_pass`).

    ``codes`` are the stored groups' codes in the pass, ``count`` their sample
    counts. The moments ``{code: (count, sum[, m2])}`` come from ``mean`` (the
    NAPs, ``(group, *shape)``: sum = mean × count, exact to rounding) and
    ``m2`` (``std² × count``, when the standard deviations are stored);
    without ``mean`` they are None (exemplars only). With ``k``, the exemplars
    ``(sample, value, position)`` as :func:`finalize_exemplars` gives them
    (``(end, group, rank, unit[, axis])``; ``spatial`` the layer's spatial
    shape) become the candidates of their groups: the ``min(k, count)`` ranked
    first. Returns the moments, or ``(moments, exemplars)`` with ``k``.
    """
    codes = np.asarray(codes, np.int64)
    count = np.asarray(count, np.int64)
    mom = None
    if mean is not None:
        sums = np.asarray(mean, np.float64).reshape(len(codes), -1) * count[:, None]
        m2 = None if m2 is None else np.asarray(m2, np.float64).reshape(len(codes), -1)
        mom = {int(g): (int(c), sums[i]) if m2 is None else (int(c), sums[i], m2[i])
               for i, (g, c) in enumerate(zip(codes, count))}
    if k is None:
        return mom
    sample, value, position = (np.asarray(a) for a in exemplars)
    order = np.argsort(codes, kind="stable")
    kept = np.minimum(count, k)[order]
    flat = np.zeros(sample.shape, np.int32)  # the flat spatial index, as the kernels keep it
    if spatial:
        flat = np.ravel_multi_index(tuple(np.maximum(position[..., i], 0) for i in range(len(spatial))),
                                    tuple(int(d) for d in spatial)).astype(np.int32)

    def rows(a, dtype):  # (2, group, rank, unit) -> (2, unit, the kept ranks of the groups in order)
        parts = [a[:, g, : kept[j]].transpose(0, 2, 1) for j, g in enumerate(order)]
        return np.concatenate(parts, axis=2).astype(dtype) if parts else np.zeros((2, a.shape[-1], 0), dtype)

    ex = Exemplars(int(k), codes[order], kept.astype(np.int64), rows(value, np.float64),
                   rows(sample, np.int64), rows(flat, np.int32), ranked=True)  # as stored: ranked
    return mom, ex


def dask_layer_pass(data, grads, names, codes, std: bool, k: int | None = None,
                    moments: bool = True, *, first: int = 0, base=None) -> dict:
    """Lazy arrays of one pass over a layer, from the blocks of its dask arrays: as
    :func:`stored_layer_pass` gives them.

    ``data`` (and ``grads``, or None to average unaligned) are the layer's
    DataArrays, chunked along samples only; ``names`` the groups, ``codes``
    each sample's group code. With ``k``, ``data`` must be the raw
    activations (the exemplars are theirs). ``first`` and ``base`` as for
    :func:`stored_layer_pass`.
    """
    import dask
    from dask.base import tokenize

    if data.data.numblocks[1:] != (1,) * (data.ndim - 1):
        raise StoreError("activations must be chunked along samples only.")
    if first:  # samples `first` and after only
        data = data[first:]
        grads = grads[first:] if grads is not None else None
    blocks = data.data.to_delayed().reshape(-1)
    gblocks = grads.data.rechunk(data.data.chunks).to_delayed().reshape(-1) if grads is not None \
        else [None] * len(blocks)
    task = dask.delayed(_chunk, pure=True)
    bounds = first + np.cumsum((0, *data.data.chunks[0]))
    parts = [task(a, codes[lo:hi], g, std, k, int(lo), moments)
             for a, g, lo, hi in zip(blocks, gblocks, bounds, bounds[1:])]
    merge = dask.delayed(_merge, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i : i + FAN_IN]) for i in range(0, len(parts), FAN_IN)]
    shape = tuple(int(s) for s in data.shape[1:])
    if base is not None:
        parts = [dask.delayed(partial(_rebase, base=base), pure=True)(parts[0])]
    final = dask.delayed(_finalize, pure=True)(parts[0], len(names), shape, std, k)
    token = tokenize(final.key, "pass")
    return _outputs(dict(final.__dask_graph__()), final.key, token, len(names), shape, std, k, moments)
