"""Neuron Activation Profiles and contrastive NAPs (``REFERENCE.md`` §4–5).

A NAP is the exact mean activation of each group, ``(group, *spatial, unit)``.
It is computed as a reduction in three parts, each a plain numpy function:

* :func:`chunk_moments` — per chunk of samples, for each group present in it,
  the count, the float64 sum and (for the standard deviation) the float64 sum
  of squared deviations from the chunk's group mean;
* :func:`merge_moments` — merges any number of those (Chan et al.'s update),
  so partial results combine in a tree;
* :func:`finalize_moments` — divides: mean and population standard deviation.

:func:`naps` wraps them lazily: one task per stored chunk (reading it, aligning
it on the fly when asked, reducing it), merged eight at a time. One pass over
each layer, never a whole layer in memory; partial results hold only the groups
a chunk contains. :func:`contrast` is the numpy kernel of contrastive NAPs and
:func:`contrastive_naps` its xarray wrapper.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import steps
from . import store as st
from .errors import GroupNotFoundError, StoreError

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
#: below this many values per sample, a one-hot product beats per-group sums
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
    Samples of one group lying next to each other (a corpus sorted by group)
    are summed in place; otherwise each group's rows are gathered, and very
    narrow layers use a one-hot matrix product.
    """
    n = len(x)
    if len(codes) != n:
        raise ValueError(f"{n} samples but {len(codes)} group codes.")
    flat = x.reshape(n, -1)
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
    for part in parts:
        for g, mom in part.items():
            have = out.get(g)
            if have is None:
                out[g] = mom
                continue
            na, nb = have[0], mom[0]
            n = na + nb
            s = have[1] + mom[1]
            if len(mom) == 2:
                out[g] = (n, s)
            else:
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


def _chunk(acts, codes, grads=None, std=False):
    """One task: align a chunk (when gradients are given), then its moments."""
    if grads is not None:
        from .align import align_kernel

        acts = align_kernel(acts, grads)
    return chunk_moments(acts, codes, std)


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
def _open(store):
    """``(path or None, tree, root attrs)`` of a store given as a path or an opened tree."""
    import xarray as xr

    if isinstance(store, xr.DataTree):
        return None, store, dict(store.attrs)
    return store, st.open_store(store), st.store_attrs(store)


def _need_path(path, what: str):
    if path is None:
        raise StoreError(f"{what} writes into the store: pass its path, not an opened tree.")
    return path


def _tree_reduce(parts: list, fan_in: int = FAN_IN):
    import dask

    merge = dask.delayed(merge_moments, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _aligned_source(path, attrs: dict, node):
    """How to get a layer's aligned activations: (array, grads or None, align id or None)."""
    acts = node["acts"]
    if acts.ndim <= 2 or "grads" not in node:  # nothing to align: raw activations
        return acts, None, None
    if "aligned" in node and path is not None:
        rec = attrs.get("steps", {}).get("align")
        if rec and steps.status(path, attrs).get("align", "absent") is None \
                and node["aligned"].attrs.get("id") == rec["id"]:
            return node["aligned"], None, rec["id"]
    return acts, node["grads"], None


def _layer_naps(data, grads, names, codes, std: bool):
    """Lazy ``(nap, std or None)`` dask arrays of one layer."""
    import dask
    import dask.array as da

    if data.data.numblocks[1:] != (1,) * (data.ndim - 1):
        raise StoreError("activations must be chunked along samples only.")
    blocks = data.data.to_delayed().reshape(-1)
    gblocks = grads.data.rechunk(data.data.chunks).to_delayed().reshape(-1) if grads is not None \
        else [None] * len(blocks)
    task = dask.delayed(_chunk, pure=True)
    bounds = np.cumsum((0, *data.data.chunks[0]))
    parts = [task(a, codes[lo:hi], g, std) for a, g, lo, hi in zip(blocks, gblocks, bounds, bounds[1:])]
    shape = tuple(data.shape[1:])
    final = dask.delayed(finalize_moments, pure=True, nout=2)(_tree_reduce(parts), len(names), shape, std)
    out = (len(names), *shape)
    mean = da.from_delayed(final[0], out, dtype=np.float64)
    sd = da.from_delayed(final[1], out, dtype=np.float64) if std else None
    return mean, sd


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

    path, tree, attrs = _open(store)
    if persist:
        return _persist_naps(_need_path(path, "naps(persist=True)"), aligned, std, progress)
    params = {"aligned": bool(aligned), "std": bool(std)}
    result = {}
    for layer in attrs["layers"]:
        node = tree[f"layers/{layer}"]
        names, codes = group_codes(node["group"].values)
        if aligned:
            data, grads, align_id = _aligned_source(path, attrs, node)
        else:
            data, grads, align_id = node["acts"], None, None
        mean, sd = _layer_naps(data, grads, names, codes, std)
        dims = ("group", *node["acts"].dims[1:])
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
    from .cluster import compute

    with st.writer_lock(path):
        lazy = naps(path, aligned=aligned, std=std)
        attrs = st.store_attrs(path)
        align_ids = {ds.attrs["inputs"]["align"] for ds in lazy.values()} - {None}
        inputs = {"extraction": attrs["extraction"]["id"], "align": next(iter(align_ids), None)}
        rec = steps.new_record("naps", {"aligned": bool(aligned), "std": bool(std)}, inputs, list(lazy))
        steps.begin(path, rec)
        st.remove_node(path, "naps")
        done = {}
        for layer, ds in lazy.items():
            (ds,) = compute(ds, progress=progress, desc=f"naps {layer}")
            ds.attrs = steps.node_attrs(rec, layer)
            st.write_node(path, f"naps/{layer}", ds)
            done[layer] = ds
        steps.finish(path, rec)
    return done


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
    from .cluster import compute

    path = _need_path(_open(path)[0], "contrastive_naps(persist=True)")
    with st.writer_lock(path):
        source = steps.load(path, "naps")
        lazy = contrastive_naps(path, groups, weight_by_group_size, naps=source)
        attrs = st.store_attrs(path)
        params = next(iter(lazy.values())).attrs["params"] if lazy else {}
        inputs = {"extraction": attrs["extraction"]["id"], "naps": attrs["steps"]["naps"]["id"]}
        rec = steps.new_record("contrast", params, inputs, list(lazy))
        steps.begin(path, rec)
        st.remove_node(path, "contrast")
        done = {}
        for layer, ds in lazy.items():
            (ds,) = compute(ds, progress=progress, desc=f"contrast {layer}")
            ds.attrs = steps.node_attrs(rec, layer)
            st.write_node(path, f"contrast/{layer}", ds)
            done[layer] = ds
        steps.finish(path, rec)
    return done
