"""Neuron Activation Profiles and contrastive NAPs (``REFERENCE.md`` §4–5).

A NAP is the exact mean activation of each group, ``(group, *spatial, unit)``.
It is computed as a reduction in three parts, each a plain numpy function:

* :func:`chunk_moments` — per chunk of samples, for each group present in it,
  the count, the float64 sum and (for the standard deviation) the float64 sum
  of squared deviations from the chunk's group mean;
* :func:`merge_moments` — merges any number of those (Chan et al.'s update),
  so partial results combine in a tree;
* :func:`finalize_moments` — divides: mean and population standard deviation.

:func:`naps` wraps them lazily: tasks over the stored chunks (reading them,
aligning them on the fly when asked, reducing them), merged eight at a time.
One pass over each layer, never a whole layer in memory; partial results hold
only the groups their chunks contain. :func:`contrast` is the numpy kernel of
contrastive NAPs and :func:`contrastive_naps` its xarray wrapper.

Speed (``benchmarks/bench_naps.py``): a NAP pass should run at the speed of
reading the store. So for a store given by its path, each task reads a few
consecutive chunk files itself, one at a time, decoding each into a buffer of
its thread that is reused from chunk to chunk and task to task (Zarr's own
read decodes into fresh memory and copies it again, at about 60 % of that
speed; on this kind of VM touching fresh memory is slow). Each thread keeps
those buffers, a few chunks' worth, for the next NAP pass. The float64 group
sums are a compiled loop (numba, which ``umap-learn`` brings; plain numpy when
it is missing) that reads each chunk once, while it is still in cache. The
alignment is fused into the sums: only the shifts are computed (from the
gradients, by :func:`inntrospect.analysis.alignment.shifts`), each sample is added shifted
into its group's sum, and no aligned copy is made. Chunks of other encodings,
and trees given instead of paths, are read through their dask arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .. import store as st
from ..errors import GroupNotFoundError, StoreError
from ..store import chunkio, steps
from . import compiled

__all__ = [
    "group_codes",
    "chunk_moments",
    "merge_moments",
    "finalize_moments",
    "contrast",
    "contrast_weights",
    "naps",
    "contrastive_naps",
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
#: below this many values per sample, a one-hot product beats per-group sums
#: (numpy path, when numba is missing)
NARROW = 64


# -- numpy kernels -------------------------------------------------------------
def group_codes(labels: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct group names and each sample's index into them."""
    labels = np.asarray(labels)
    if labels.dtype.kind != "U":  # zarr's variable-width strings, objects, numbers
        labels = labels.astype(object).astype(str)
    names, codes = np.unique(labels, return_inverse=True)
    dtype = np.int16 if len(names) < 2**15 else np.int32
    return names, codes.reshape(-1).astype(dtype)


def chunk_moments(x: np.ndarray, codes: np.ndarray, std: bool = False) -> dict:
    """``{group code: (count, sum[, m2])}`` for the groups present in a chunk.

    ``x`` is ``(n, ...)``; sums are float64 of shape ``x.shape[1:]``; ``m2`` is
    the sum of squared deviations from the group's mean within this chunk.
    With numba, one compiled pass adds each sample into its group's float64
    sum (a second one for ``m2``). Without it: samples of one group lying next
    to each other (a corpus sorted by group) are summed in place; otherwise
    each group's rows are gathered, and very narrow layers use a one-hot
    matrix product.
    """
    n = len(x)
    if len(codes) != n:
        raise ValueError(f"{n} samples but {len(codes)} group codes.")
    flat = x.reshape(n, -1)
    kernels = compiled.kernels()
    if kernels is not None and flat.dtype in (np.float32, np.float64):
        present, index, counts = np.unique(codes, return_inverse=True, return_counts=True)
        flat = np.ascontiguousarray(flat)
        index = index.reshape(-1).astype(np.intp)
        sums = np.zeros((len(present), flat.shape[1]))
        _add_sums(kernels, flat, index, sums)
        m2 = None
        if std:
            m2 = np.zeros_like(sums)
            kernels.group_m2(flat, index, sums / counts[:, None], m2)
        return _as_moments(present, counts, sums, m2)
    present, first, counts = np.unique(codes, return_index=True, return_counts=True)
    contiguous = n < 2 or np.count_nonzero(np.diff(codes)) + 1 == len(present)  # one run per group
    sums = None
    if not contiguous and flat.shape[1] < NARROW:
        onehot = (codes[None, :] == present[:, None]).astype(np.float64)
        sums = onehot @ flat.astype(np.float64)
    out = {}
    for k, (g, lo, c) in enumerate(zip(present, first, counts)):
        rows = flat[lo : lo + c] if contiguous else None
        if sums is not None:
            s = sums[k]
        else:
            rows = flat[codes == g] if rows is None else rows
            s = rows.sum(axis=0, dtype=np.float64)
        if std:
            rows = flat[codes == g] if rows is None else rows
            dev = rows - s / c
            m2 = np.einsum("ij,ij->j", dev, dev)
            out[int(g)] = (int(c), s, m2)
        else:
            out[int(g)] = (int(c), s)
    return out


def merge_moments(*parts: dict) -> dict:
    """Merge partial moments of disjoint sets of samples (exact, in float64)."""
    out: dict = {}
    owned: set = set()  # groups whose sum is a new array of ours: added to in place
    for part in parts:
        for g, mom in part.items():
            have = out.get(g)
            if have is None:
                out[g] = mom
                continue
            na, nb = have[0], mom[0]
            n = na + nb
            if len(mom) == 2:
                if g in owned:
                    s = have[1]
                    s += mom[1]
                else:
                    s = have[1] + mom[1]
                    owned.add(g)
                out[g] = (n, s)
            else:
                s = have[1] + mom[1]
                delta = mom[1] / nb - have[1] / na
                out[g] = (n, s, have[2] + mom[2] + delta * delta * (na * nb / n))
    return out


def finalize_moments(part: dict, n_groups: int, shape: tuple[int, ...], std: bool = False):
    """Means ``(n_groups, *shape)`` and population standard deviations (or None)."""
    mean = np.full((n_groups, int(np.prod(shape, dtype=np.int64))), np.nan)
    sd = np.full_like(mean, np.nan) if std else None
    for g, mom in part.items():
        mean[g] = mom[1] / mom[0]
        if std:
            sd[g] = np.sqrt(np.maximum(mom[2], 0.0) / mom[0])
    mean = mean.reshape(n_groups, *shape)
    return mean, (sd.reshape(n_groups, *shape) if std else None)


def _as_moments(present, counts, sums, m2=None) -> dict:
    if m2 is None:
        return {int(g): (int(c), sums[k]) for k, (g, c) in enumerate(zip(present, counts))}
    return {int(g): (int(c), sums[k], m2[k]) for k, (g, c) in enumerate(zip(present, counts))}


def _fusable(shape: tuple, grads_shape: tuple) -> bool:
    """Whether alignment can be fused into the sums: 1 to 3 spatial axes, gradients alike."""
    return 1 <= len(shape) - 2 <= 3 and tuple(shape) == tuple(grads_shape)


def _shifts3(grads) -> np.ndarray:
    """:func:`inntrospect.analysis.alignment.shifts` as ``(n, 3)``: 1 or 2 spatial axes padded with leading zeros."""
    from .alignment import shifts

    d = np.zeros((len(grads), 3), np.int64)
    d[:, 3 - (grads.ndim - 2):] = shifts(grads)
    return d


def _add_sums(kernels, x, index, sums, grads=None, shift=None) -> None:
    """Add each sample of ``x`` (aligned when ``grads`` are given) to ``sums[index[i]]``, in float64.

    ``sums`` is ``(groups, values per sample)``. When :func:`_fusable`, the
    alignment is fused: each sample is added shifted (by ``shift``, the
    :func:`_shifts3` of ``grads``, computed here unless given), no aligned
    copy is made; otherwise the chunk is aligned into a buffer of this thread first.
    """
    from .alignment import align_kernel

    n = len(x)
    if grads is not None and not _fusable(x.shape, grads.shape):
        out = chunkio.buffer("aligned", x.size, x.dtype).reshape(x.shape) if x.size else None
        x, grads = align_kernel(x, grads, out=out), None
    if grads is None:
        kernels.group_sums(np.ascontiguousarray(x.reshape(n, -1)), index, sums)
        return
    shift = _shifts3(grads) if shift is None else shift
    spatial = x.shape[1:-1]
    shape3 = (1,) * (3 - len(spatial)) + tuple(spatial)
    units = x.shape[-1]
    x = np.ascontiguousarray(x).reshape(n, *shape3[:2], shape3[2] * units)
    kernels.shifted_sums(x, index, shift, units, sums.reshape(len(sums), *x.shape[1:]))


def aligned_moments(acts, codes, grads, std: bool = False) -> dict:
    """:func:`chunk_moments` of the aligned activations of a chunk (see :mod:`inntrospect.analysis.alignment`).

    Without ``std`` and with numba, the alignment is fused into the sums
    (:func:`_add_sums`); otherwise the chunk is aligned into a buffer of this
    thread first.
    """
    from .alignment import align_kernel

    kernels = compiled.kernels()
    if std or kernels is None or acts.dtype not in (np.float32, np.float64):
        out = chunkio.buffer("aligned", acts.size, acts.dtype).reshape(acts.shape) if acts.size else None
        return chunk_moments(align_kernel(acts, grads, out=out), codes, std)
    n = len(acts)
    if len(codes) != n:
        raise ValueError(f"{n} samples but {len(codes)} group codes.")
    present, index, counts = np.unique(codes, return_inverse=True, return_counts=True)
    sums = np.zeros((len(present), int(np.prod(acts.shape[1:], dtype=np.int64))))
    _add_sums(kernels, acts, index.reshape(-1).astype(np.intp), sums, grads)
    return _as_moments(present, counts, sums)


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
            shift = _shifts3(g) if _fusable(acts.shape, grads.shape) else None
        x = chunkio.read_chunk(acts, "acts")
        if sums is None:
            sums = np.zeros((len(present), int(np.prod(x.shape[1:], dtype=np.int64))))
        _add_sums(kernels, x, index[lo : lo + len(x)], sums, g, shift)
        lo += len(x)
    if lo != len(codes):
        raise ValueError(f"{lo} samples but {len(codes)} group codes.")
    return _as_moments(present, counts, sums)


def contrast_weights(counts: np.ndarray, weight_by_group_size: bool = False) -> np.ndarray:
    """``w_h``: ``1/|G'|`` each, or proportional to the group sizes."""
    counts = np.asarray(counts, dtype=np.float64)
    if weight_by_group_size:
        return counts / counts.sum()
    return np.full(len(counts), 1.0 / len(counts))


def contrast(nap, counts, weight_by_group_size: bool = False):
    """Contrastive NAPs of the groups of interest: ``C_g = NAP_g - sum_h w_h NAP_h``.

    ``nap`` is ``(group, ...)`` holding only the groups of interest (numpy or
    dask); ``counts`` their sizes.
    """
    w = contrast_weights(counts, weight_by_group_size)
    return nap - np.tensordot(w, nap, axes=1)[None]


# -- lazy wrappers ---------------------------------------------------------------
def _tree_reduce(parts: list, fan_in: int = FAN_IN):
    import dask

    merge = dask.delayed(merge_moments, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _aligned_source(path, attrs: dict, node):
    """How to get a layer's aligned activations: (array, grads or None, align id or None).

    ``node`` is the layer's node of the tree, or its Zarr group: arrays of the same kind come back.
    """
    acts = node["acts"]
    if acts.ndim <= 2 or "grads" not in node:  # nothing to align: raw activations
        return acts, None, None
    if "aligned" in node and path is not None:
        rec = attrs.get("steps", {}).get("align")
        if rec and steps.is_current(attrs, "align") and node["aligned"].attrs.get("id") == rec["id"]:
            return node["aligned"], None, rec["id"]
    return acts, node["grads"], None


def _direct_sources(path, attrs: dict, aligned: bool) -> dict | None:
    """Per layer, from the Zarr metadata alone: ``(labels, acts dims, shape, chunk files,
    gradient chunk files or None, align id or None)``; None if an array must be read through dask.
    """
    import zarr

    root = zarr.open_group(st.zarr_store(path, read_only=True), mode="r")
    out = {}
    for layer in attrs["layers"]:
        node = root[f"layers/{layer}"]
        acts = node["acts"]
        data, grads, align_id = _aligned_source(path, attrs, node) if aligned else (acts, None, None)
        files = chunkio.chunk_files(data)
        gfiles = chunkio.chunk_files(grads) if grads is not None else None
        dims = getattr(acts.metadata, "dimension_names", None)
        if files is None or (grads is not None and (gfiles is None or [f[1:3] for f in gfiles]
                                                    != [f[1:3] for f in files])) \
                or dims is None or None in dims or "group" not in node:
            return None
        out[layer] = (node["group"][:], tuple(dims), tuple(data.shape), files, gfiles, align_id)
    return out


def _reduce_layer(parts: list, n_groups: int, shape: tuple, std: bool):
    """Lazy ``(nap, std or None)`` dask arrays from the per-chunk moment tasks of a layer."""
    import dask
    import dask.array as da

    final = dask.delayed(finalize_moments, pure=True, nout=2)(_tree_reduce(parts), n_groups, shape, std)
    out = (n_groups, *shape)
    mean = da.from_delayed(final[0], out, dtype=np.float64)
    sd = da.from_delayed(final[1], out, dtype=np.float64) if std else None
    return mean, sd


def _stored_layer_naps(files, gfiles, n_groups: int, codes, shape: tuple, std: bool):
    """Lazy ``(nap, std or None)`` of tasks that read their chunk files themselves (:func:`_stored_chunks`).

    The graph is written out directly (one ``dask.delayed`` call per chunk costs
    more than reading a small chunk): tasks of a few chunks (:func:`task_chunks`),
    merges :data:`FAN_IN` at a time, the final division.
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


def _layer_naps(data, grads, names, codes, std: bool):
    """Lazy ``(nap, std or None)`` dask arrays of one layer, from the blocks of its dask arrays."""
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


def naps(store, aligned: bool = False, std: bool = False, *, persist: bool = False,
         progress: bool = False) -> dict:
    """Neuron Activation Profiles of every layer: ``{layer: Dataset}``, lazy.

    Parameters
    ----------
    store
        Path of a store, or the tree :func:`inntrospect.open_store` returned.
    aligned
        Average gradient-aligned activations (``REFERENCE.md`` §3): persisted
        ``aligned`` arrays when current, else aligned on the fly, chunk by
        chunk. Layers without spatial axes use their raw activations.
    std
        Also return each group's population standard deviation ``std``.
    persist
        Compute now and write each layer to ``naps/<layer>`` in the store,
        replacing earlier NAPs (results that depend on those become stale).
    progress
        Show a progress bar while persisting.

    Returns
    -------
    dict of xarray.Dataset
        ``nap`` (``group``, spatial dims, ``unit``) float64 and ``count``
        (``group``) per layer; ``std`` when asked. Lazy unless ``persist``.

    Examples
    --------
    >>> profiles = inntrospect.naps("run.zarr", aligned=True)      # doctest: +SKIP
    >>> profiles["conv2d_24"].nap.sel(group="7").compute()          # doctest: +SKIP
    """
    import xarray as xr

    if persist:
        return _persist_naps(steps.need_path(store, "naps(persist=True)"), aligned, std, progress)
    if isinstance(store, xr.DataTree):
        path, tree, attrs = None, store, dict(store.attrs)
    else:  # a path: the tree only when some array must be read through dask
        path, tree, attrs = store, None, st.store_attrs(store)
        if attrs.get("extraction", {}).get("state") != "complete":
            st.open_store(path)  # raises IncompleteStoreError
    direct = _direct_sources(path, attrs, aligned) if tree is None else None
    if tree is None and direct is None:
        tree = st.open_store(path)
    params = {"aligned": bool(aligned), "std": bool(std)}
    result = {}
    for layer in attrs["layers"]:
        if direct is not None:
            labels, dims, shape, files, gfiles, align_id = direct[layer]
            names, codes = group_codes(labels)
            mean, sd = _stored_layer_naps(files, gfiles, len(names), codes, shape[1:], std)
        else:
            node = tree[f"layers/{layer}"]
            names, codes = group_codes(node["group"].values)
            if aligned:
                data, grads, align_id = _aligned_source(path, attrs, node)
            else:
                data, grads, align_id = node["acts"], None, None
            mean, sd = _layer_naps(data, grads, names, codes, std)
            dims = node["acts"].dims
        dims = ("group", *dims[1:])
        inputs = {"extraction": attrs.get("extraction", {}).get("id"), "align": align_id}
        ds = xr.Dataset(
            {"nap": (dims, mean), "count": ("group", np.bincount(codes, minlength=len(names)))},
            coords={"group": names},
            attrs={"step": "naps", "layer": layer, "params": params, "inputs": inputs},
        )
        if std:
            ds["std"] = (dims, sd)
        result[layer] = ds
    return result


def _persist_naps(path, aligned: bool, std: bool, progress: bool) -> dict:
    with st.writer_lock(path):
        lazy = naps(path, aligned=aligned, std=std)
        attrs = st.store_attrs(path)
        align_ids = {ds.attrs["inputs"]["align"] for ds in lazy.values()} - {None}
        inputs = {"extraction": attrs["extraction"]["id"], "align": next(iter(align_ids), None)}
        rec = steps.new_record("naps", {"aligned": bool(aligned), "std": bool(std)}, inputs, list(lazy))
        return steps.write_results(path, rec, lazy, progress)


def contrastive_naps(store, groups: Sequence[str] | None = None, weight_by_group_size: bool = False,
                     *, naps: Mapping | None = None, persist: bool = False,
                     progress: bool = False) -> dict:
    """Contrastive NAPs of the groups of interest (``REFERENCE.md`` §5), lazy.

    ``C_g = NAP_g - sum_h w_h NAP_h`` for ``g`` in ``groups`` (default: all), in
    sorted group order, with ``w_h = 1/|groups|`` or, with
    ``weight_by_group_size``, proportional to the group sizes.

    NAPs come from the store (``naps/``, which must be current), or from
    ``naps=``, a result of :func:`naps` (lazy is fine). ``persist`` computes
    and writes ``contrast/<layer>`` (it needs the store's own NAPs).

    Returns ``{layer: Dataset}`` with ``nap`` (``group``, spatial dims, ``unit``),
    ``weight`` and ``count`` (``group``).

    Raises
    ------
    GroupNotFoundError
        A name in ``groups`` is not a group; the message lists the groups.
    """
    import xarray as xr

    if persist:
        if naps is not None:
            raise StoreError("persist=True contrasts the store's own NAPs; leave naps= out.")
        return _persist_contrast(store, groups, weight_by_group_size, progress)
    if naps is None:
        naps = steps.load(store, "naps")
    params = {"groups": None if groups is None else sorted(str(g) for g in groups),
              "weight_by_group_size": bool(weight_by_group_size)}
    result = {}
    for layer, ds in naps.items():
        chosen = _choose_groups(ds.indexes["group"], groups)
        sub = ds.sel(group=chosen)
        counts = sub["count"].values
        weights = contrast_weights(counts, weight_by_group_size)
        result[layer] = xr.Dataset(
            {"nap": sub["nap"].copy(data=contrast(sub["nap"].data, counts, weight_by_group_size)),
             "weight": ("group", weights), "count": ("group", counts)},
            coords={"group": chosen},
            attrs={"step": "contrast", "layer": layer, "params": params,
                   "inputs": {"naps": ds.attrs.get("id")}},
        )
    return result


def _choose_groups(existing, groups) -> np.ndarray:
    existing = np.asarray(existing).astype(str)
    if groups is None:
        return existing
    if isinstance(groups, str):
        groups = [groups]
    wanted = [str(g) for g in groups]
    if not wanted:
        raise GroupNotFoundError("no groups of interest given; leave groups out to use all of them.")
    unknown = [g for g in wanted if g not in set(existing)]
    if unknown:
        raise GroupNotFoundError(
            f"unknown group{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
            f"the groups are: {', '.join(existing)}."
        )
    return np.array(sorted(set(wanted), key=list(existing).index))


def _persist_contrast(path, groups, weight_by_group_size, progress) -> dict:
    path = steps.need_path(path, "contrastive_naps(persist=True)")
    with st.writer_lock(path):
        source = steps.load(path, "naps")
        lazy = contrastive_naps(path, groups, weight_by_group_size, naps=source)
        attrs = st.store_attrs(path)
        params = next(iter(lazy.values())).attrs["params"] if lazy else {}
        inputs = {"extraction": attrs["extraction"]["id"], "naps": attrs["steps"]["naps"]["id"]}
        rec = steps.new_record("contrast", params, inputs, list(lazy))
        return steps.write_results(path, rec, lazy, progress)
