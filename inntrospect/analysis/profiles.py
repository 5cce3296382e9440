"""Neuron Activation Profiles and contrastive NAPs (``REFERENCE.md`` §4–5): the public API.

:func:`naps` opens the store, finds each layer's source (stored chunk files
read directly when it can, else its dask arrays; persisted ``aligned`` arrays
when current, else activations aligned on the fly) and wraps the lazy NAP pass
of :mod:`inntrospect.analysis.nap_graph` in xarray; :func:`contrastive_naps`
wraps :func:`inntrospect.analysis.nap_kernels.contrast`. Both persist their
results into the store when asked. The numpy kernels (chunk / merge /
finalize of the moments, the contrasts) are in
:mod:`inntrospect.analysis.nap_kernels`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .. import store as st
from ..checks import check_bool
from ..errors import GroupNotFoundError, IncompleteStoreError, ParameterTypeError, StoreError
from ..store import chunkio, steps
from .nap_graph import dask_layer_naps, stored_layer_naps
from .nap_kernels import contrast, contrast_weights, group_codes

__all__ = ["naps", "contrastive_naps"]


# -- the store's layers ---------------------------------------------------------
def _aligned_source(store, attrs: dict, node):
    """How to get a layer's aligned activations: (array, grads or None, align id or None).

    ``node`` is the layer's node of the tree, or its Zarr group: arrays of the same kind come back.
    """
    acts = node["acts"]
    if acts.ndim <= 2 or "grads" not in node:  # nothing to align: raw activations
        return acts, None, None
    if "aligned" in node and store is not None:
        rec = attrs.get("steps", {}).get("align")
        if rec and steps.is_current(attrs, "align") and node["aligned"].attrs.get("id") == rec["id"]:
            return node["aligned"], None, rec["id"]
    return acts, node["grads"], None


def _direct_sources(store, attrs: dict, aligned: bool) -> dict | None:
    """Per layer, from the Zarr metadata alone: ``(labels, acts dims, shape, chunk files,
    gradient chunk files or None, align id or None)``; None if an array must be read through dask.
    """
    out = {}
    for layer in attrs["layers"]:
        node = st.layer_group(store, layer)
        acts = node["acts"]
        data, grads, align_id = _aligned_source(store, attrs, node) if aligned else (acts, None, None)
        st.check_chunks(store, arrays=[a for a in (data, grads) if a is not None])  # none may read as NaN
        files = chunkio.chunk_files(data)
        gfiles = chunkio.chunk_files(grads) if grads is not None else None
        dims = getattr(acts.metadata, "dimension_names", None)
        if files is None or (grads is not None and (gfiles is None or [f[1:3] for f in gfiles]
                                                    != [f[1:3] for f in files])) \
                or dims is None or None in dims or "group" not in node:
            return None
        out[layer] = (node["group"][:], tuple(dims), tuple(data.shape), files, gfiles, align_id)
    return out


def _checked(store, layer: str, data, grads):
    """The layer's arrays read chunk by chunk through Zarr, after checking none of their chunks is
    missing; a chunk failing its checksum raises :class:`~inntrospect.errors.DamagedStoreError`
    naming it. (A tree given instead of a path is read as xarray reads it: Zarr's own errors.)"""
    arrays = [a for a in (data, grads) if a is not None]
    st.check_chunks(store, [layer], [a.name for a in arrays])
    out = [a.copy(data=st.checked_dask_array(store, st.layer_path(layer, a.name))) for a in arrays]
    return out[0], (out[1] if grads is not None else None)


def _tree_source(tree, attrs: dict):
    """The local store a tree was opened from (``tree.encoding["source"]``), when it still holds
    the tree's extraction; else None."""
    import os

    source = (getattr(tree, "encoding", None) or {}).get("source")
    if not isinstance(source, str) or "://" in source or not os.path.isdir(source):
        return None
    try:
        same = st.store_attrs(source).get("extraction", {}).get("id") == attrs.get("extraction", {}).get("id")
    except StoreError:
        return None
    return st.Store.open(source) if same else None


# -- public API -------------------------------------------------------------------
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

    check_bool(aligned=aligned, std=std, persist=persist, progress=progress)
    if persist:
        return _persist_naps(steps.writable(store, "naps(persist=True)"), aligned, std, progress)
    if isinstance(store, xr.DataTree):
        handle, tree, attrs = None, store, dict(store.attrs)
        if attrs.get("extraction", {}).get("state", "complete") != "complete":
            raise IncompleteStoreError(
                "this tree is of an extraction that has not finished (opened with "
                "allow_incomplete=True): its unwritten samples read as NaN, and so would the NAPs. "
                "Finish the extraction (run it again to resume), then compute the NAPs.")
    else:  # a path: the tree only when some array must be read through dask
        handle, tree = st.Store.open(store), None
        attrs = handle.attrs
        if attrs.get("extraction", {}).get("state") != "complete":
            handle.tree()  # raises IncompleteStoreError
    source = _tree_source(tree, attrs) if handle is None else None
    direct = _direct_sources(handle, attrs, aligned) if tree is None else None
    if tree is None and direct is None:
        tree = handle.tree()
    params = {"aligned": bool(aligned), "std": bool(std)}
    result = {}
    for layer in attrs["layers"]:
        if direct is not None:
            labels, dims, shape, files, gfiles, align_id = direct[layer]
            names, codes = group_codes(labels)
            mean, sd = stored_layer_naps(files, gfiles, len(names), codes, shape[1:], std)
        else:
            node = tree[st.layer_path(layer)]
            names, codes = group_codes(node["group"].values)
            if aligned:
                data, grads, align_id = _aligned_source(handle, attrs, node)
            else:
                data, grads, align_id = node["acts"], None, None
            if handle is not None:  # read through Zarr, but no chunk missing and none damaged silently
                data, grads = _checked(handle, layer, data, grads)
            elif source is not None:  # a tree read as it is; still, no missing chunk reads as NaN
                st.check_chunks(source, [layer], [a.name for a in (data, grads) if a is not None])
            mean, sd = dask_layer_naps(data, grads, names, codes, std)
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


def _persist_naps(store: st.Store, aligned: bool, std: bool, progress: bool) -> dict:
    with store.writing():
        lazy = naps(store, aligned=aligned, std=std)
        align_ids = {ds.attrs["inputs"]["align"] for ds in lazy.values()} - {None}
        return steps.persist(store, "naps", {"aligned": bool(aligned), "std": bool(std)},
                             {"align": next(iter(align_ids), None)}, lazy, progress=progress)


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

    check_bool(weight_by_group_size=weight_by_group_size, persist=persist, progress=progress)
    if persist:
        if naps is not None:
            raise StoreError("persist=True contrasts the store's own NAPs; leave naps= out.")
        return _persist_contrast(store, groups, weight_by_group_size, progress)
    if naps is None:
        if isinstance(store, xr.DataTree):
            raise ParameterTypeError(
                "contrastive_naps reads the store's current NAPs, which needs its path (to check "
                "they are current), not an opened tree; pass the path, or the NAPs themselves: "
                "contrastive_naps(tree, naps=inntrospect.naps(tree)).")
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


def _persist_contrast(store, groups, weight_by_group_size, progress) -> dict:
    store = steps.writable(store, "contrastive_naps(persist=True)")
    with store.writing():
        source = steps.load(store, "naps")
        lazy = contrastive_naps(store, groups, weight_by_group_size, naps=source)
        params = next(iter(lazy.values())).attrs["params"] if lazy else {}
        return steps.persist(store, "contrast", params, {"naps": store.records["naps"]["id"]}, lazy,
                             progress=progress)
