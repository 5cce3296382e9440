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

from .. import scheduler
from .. import store as st
from ..checks import check_bool
from ..errors import (
    GroupNotFoundError,
    IncompleteStoreError,
    ParameterError,
    ParameterTypeError,
    StoreError,
)
from ..store import chunkio, steps
from ..store.localnode import read_array
from .nap_graph import base_partial, dask_layer_pass, stored_layer_pass
from .nap_kernels import contrast, contrast_weights, group_codes

__all__ = ["naps", "contrastive_naps", "exemplars", "naps_and_exemplars", "check_k"]


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


def _direct_sources(store, attrs: dict, aligned: bool, raw: bool = False, first: int = 0) -> dict | None:
    """Per layer, from the Zarr metadata alone: ``(labels, acts dims, shape, chunk files,
    gradient chunk files or None, align id or None, raw activations' chunk files)``; None if an
    array must be read through dask. The raw activations' files are listed with ``raw`` when
    the NAPs read persisted aligned arrays (else they are the first files, or None). With
    ``first``, only the chunks of samples ``first`` and after are checked to be there.
    """
    out = {}
    every = st.layer_arrays(store)  # every layer's arrays' metadata in one Zarr call
    for layer in attrs["layers"]:
        node = every.get(layer, {})
        if "acts" not in node:
            return None
        acts = node["acts"]
        data, grads, align_id = _aligned_source(store, attrs, node) if aligned else (acts, None, None)
        st.check_chunks(store, arrays=[a for a in (data, grads) if a is not None], start=first)  # no NaN read
        files = chunkio.chunk_files(data)
        gfiles = chunkio.chunk_files(grads) if grads is not None else None
        dims = getattr(acts.metadata, "dimension_names", None)
        if files is None or (grads is not None and (gfiles is None or [f[1:3] for f in gfiles]
                                                    != [f[1:3] for f in files])) \
                or dims is None or None in dims or "group" not in node:
            return None
        afiles = files if data is acts else None
        if raw and afiles is None:
            st.check_chunks(store, arrays=[acts], start=first)
            afiles = chunkio.chunk_files(acts)
            if afiles is None:
                return None
        out[layer] = (node["group"], tuple(dims), tuple(data.shape), files, gfiles, align_id, afiles)
    return out


def _codes_of(labels, known: dict) -> tuple[np.ndarray, np.ndarray]:
    """``group_codes`` of a layer's ``group`` array (Zarr), decoded once for all layers whose sample
    tables are the same bytes on disk (every layer's, in a store written by inntrospect)."""
    folder, key = _table_key(labels)
    if key is None or key not in known:
        values = read_array(folder) if folder is not None else None  # straight from its file, else Zarr
        found = group_codes(labels[:] if values is None else values)
        if key is None:
            return found
        known[key] = found
    return known[key]


def _table_key(arr) -> tuple[str | None, tuple | None]:
    """A local array's folder, and its shape and chunk files' bytes (a sample table's are a few kB)
    as the key of its values; ``(None, None)`` elsewhere."""
    import os

    from zarr.storage import LocalStore

    if not isinstance(arr.store, LocalStore):
        return None, None
    base = os.path.join(str(arr.store.root), *arr.path.split("/"))
    keys = [arr.metadata.encode_chunk_key((k,)) for k in range(-(-arr.shape[0] // arr.chunks[0]))]
    contents = []
    try:
        for k in keys:
            with open(os.path.join(base, *k.split("/")), "rb") as fh:
                contents.append(fh.read())
    except OSError:  # a missing chunk: decoded (and refused) as Zarr reads it
        return None, None
    return base, (tuple(arr.shape), *contents)


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
         progress: bool = False, incremental: bool = True) -> dict:
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
        After samples were appended to the store (``extract(..., append=True)``),
        NAPs stored with the same ``aligned`` and ``std`` are updated: only the
        new samples are read, and their moments merged into the stored ones
        (exact to rounding: sums from ``nap × count``, squared deviations from
        ``std² × count``); new groups appear.
    progress
        Show a progress bar while persisting.
    incremental
        With ``persist``, update stored NAPs after an append (default) rather
        than read every sample again (``False``).

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
    check_bool(aligned=aligned, std=std, persist=persist, progress=progress, incremental=incremental)
    if persist:
        return _persist_naps(steps.writable(store, "naps(persist=True)"), aligned, std, progress, incremental)
    return _naps_datasets(*_passes(store, aligned, std, None), aligned, std)


def _open(store, what: str):
    """``(handle or None, tree or None, attrs)`` of a store path or an opened tree, refusing an
    extraction that has not finished (its unwritten samples would read as NaN)."""
    import xarray as xr

    if isinstance(store, xr.DataTree):
        attrs = dict(store.attrs)
        if attrs.get("extraction", {}).get("state", "complete") != "complete":
            raise IncompleteStoreError(
                "this tree is of an extraction that has not finished (opened with "
                f"allow_incomplete=True): its unwritten samples read as NaN, and so would the {what}. "
                f"Finish the extraction (run it again to resume), then compute the {what}.")
        return None, store, attrs
    handle = st.Store.open(store)  # a path: the tree only when some array must be read through dask
    if handle.attrs.get("extraction", {}).get("state") != "complete":
        handle.tree()  # raises IncompleteStoreError
    return handle, None, handle.attrs


def _passes(store, aligned: bool, std: bool, k: int | None, moments: bool = True,
            layers=None, *, first: int = 0, prior: dict | None = None) -> tuple[dict, dict]:
    """One lazy pass over each layer: ``(attrs, {layer: (dims, names, codes, arrays, align id)})``.

    ``arrays`` are :func:`~inntrospect.analysis.nap_graph.stored_layer_pass`'s:
    the NAPs (unless ``moments`` is False) and, with ``k``, the exemplars of the
    raw activations, from the same tasks (so the same read) whenever the NAPs
    read the raw activations (unaligned, or aligned on the fly); NAPs of
    persisted ``aligned`` arrays leave the exemplars a read of their own.

    With ``first`` and ``prior`` (:func:`_prior`: the stored results of the
    samples before ``first``), the passes read samples ``first`` and after only
    and merge the stored results in: an update after an append.
    """
    handle, tree, attrs = _open(store, "NAPs" if moments else "exemplars")
    source = _tree_source(tree, attrs) if handle is None else None
    direct = _direct_sources(handle, attrs, aligned and moments, raw=k is not None, first=first) \
        if tree is None else None
    if tree is None and direct is None:
        tree = handle.tree()
    out, known = {}, {}
    threads = scheduler.threads() if direct is not None else 1
    for layer in steps.select_layers(attrs["layers"], layers, "the store"):
        if direct is not None:
            labels, dims, shape, files, gfiles, align_id, afiles = direct[layer]
            names, codes = _codes_of(labels, known)
            n = len(names)
            mbase, ebase = _bases(prior, layer, names, k, shape[1:], moments)
            if k is not None and align_id is not None:  # the exemplars read the raw activations
                arrays = stored_layer_pass(files, gfiles, n, codes, shape[1:], std, first=first, base=mbase,
                                           threads=threads)
                arrays.update(stored_layer_pass(afiles, None, n, codes, shape[1:], False, k, moments=False,
                                                first=first, base=_pair(None, ebase), threads=threads))
            else:
                arrays = stored_layer_pass(files if moments else afiles, gfiles if moments else None,
                                           n, codes, shape[1:], std, k, moments, first=first,
                                           base=mbase if k is None else _pair(mbase, ebase), threads=threads)
        else:
            node = tree[st.layer_path(layer)]
            names, codes = group_codes(node["group"].values)
            if aligned and moments:
                data, grads, align_id = _aligned_source(handle, attrs, node)
            else:
                data, grads, align_id = node["acts"], None, None
            raw = None
            if k is not None and align_id is not None:
                raw = node["acts"]
            if handle is not None:  # read through Zarr, but no chunk missing and none damaged silently
                data, grads = _checked(handle, layer, data, grads)
                raw = _checked(handle, layer, raw, None)[0] if raw is not None else None
            elif source is not None:  # a tree read as it is; still, no missing chunk reads as NaN
                st.check_chunks(source, [layer], [a.name for a in (data, grads, raw) if a is not None])
            mbase, ebase = _bases(prior, layer, names, k, node["acts"].shape[1:], moments)
            if raw is not None:
                arrays = dask_layer_pass(data, grads, names, codes, std, first=first, base=mbase)
                arrays.update(dask_layer_pass(raw, None, names, codes, False, k, moments=False, first=first,
                                              base=_pair(None, ebase)))
            else:
                arrays = dask_layer_pass(data, grads, names, codes, std, k, moments, first=first,
                                         base=mbase if k is None else _pair(mbase, ebase))
            dims = node["acts"].dims
        out[layer] = (tuple(dims), names, codes, arrays, align_id)
    return attrs, out


def _pair(mom, ex):
    """The base of a pass keeping exemplars: ``(moments or None, exemplars)``, or None without any."""
    return None if ex is None else (mom, ex)


def _bases(prior: dict | None, layer: str, names, k, shape: tuple, moments: bool) -> tuple:
    """``(moments, exemplars)`` partial results of a layer's stored results (None where none), with
    the group codes of ``names`` (the groups of all samples now)."""
    if prior is None:
        return None, None
    stored = prior[layer]
    index = {str(g): i for i, g in enumerate(np.asarray(names).astype(str))}
    missing = [g for g in stored["group"] if g not in index]
    if missing:
        raise StoreError(f"the stored results of {layer} have groups {missing[:5]} that no sample of the store "
                         "has now: they cannot be updated. Compute them from every sample: incremental=False.")
    codes = [index[str(g)] for g in stored["group"]]
    mom = base_partial(codes, stored["count"], stored["nap"], stored.get("m2")) \
        if moments and "nap" in stored else None
    ex = base_partial(codes, stored["count"], exemplars=stored["exemplars"], k=k, spatial=tuple(shape[:-1]))[1] \
        if k is not None and "exemplars" in stored else None
    return mom, ex


def _ancestor_samples(extraction: dict, ext_id) -> int | None:
    """How many samples the store held under the extraction id ``ext_id``, if it is an earlier id of
    the store's extraction (one before an append; appends only add samples); else None."""
    for entry in extraction.get("appends") or []:
        if entry.get("id_before") == ext_id:
            return entry.get("n_samples_before")
    return None


def _prior(store: st.Store, wanted: dict, layers: list[str]) -> tuple[int, dict, dict] | None:
    """Where stored results can be updated from after appends: ``(first sample, {layer: stored
    results}, {step: old record id})``, or None (then a full pass).

    ``wanted`` is ``{step: params}`` (``naps`` and/or ``exemplars``). Each step's
    record must be complete, of those parameters and ``layers``, record the
    samples it covers (``n_samples``), and have been computed from an earlier
    extraction id of the store holding that many samples; all steps from the
    same sample, fewer than the store holds now. Its nodes must carry its id.
    """
    attrs = store.attrs
    ext = attrs.get("extraction") or {}
    if not ext.get("appends") or ext.get("state") != "complete":
        return None
    n = int(st.array_meta(store, attrs["layers"][0])["shape"][0])
    first, records = None, {}
    for step, params in wanted.items():
        rec = (attrs.get("steps") or {}).get(step)
        if not isinstance(rec, dict) or rec.get("state") != "complete" or rec.get("params") != params \
                or rec.get("layers") != layers:
            return None
        covered = rec.get("n_samples")
        if not isinstance(covered, int) or _ancestor_samples(ext, (rec.get("inputs") or {}).get("extraction")) \
                != covered or not 0 < covered < n or first not in (None, covered):
            return None
        first, records[step] = covered, rec
    prior: dict = {layer: {} for layer in layers}
    groups = set((attrs.get("corpus") or {}).get("groups") or [])  # those of all samples now
    for step, rec in records.items():
        for layer in layers:
            found = steps.stored_node(store, step, layer)
            if found is None:
                return None
            node, node_attrs = found
            names = [str(g) for g in node["group"]]
            if node_attrs.get("id") != rec["id"] or not set(names) <= groups:
                return None
            stored = prior[layer]
            stored["group"] = names
            stored["count"] = np.asarray(node["count"], np.int64)
            if step == "naps":
                stored["nap"] = node["nap"]
                if "std" in node:
                    sd = node["std"]
                    stored["m2"] = sd**2 * stored["count"].reshape(-1, *([1] * (sd.ndim - 1)))
            else:
                stored["exemplars"] = (node["sample"], node["value"], node["position"] if "position" in node
                                       else np.zeros((*node["sample"].shape, 0), np.int32))
    return first, prior, {step: rec["id"] for step, rec in records.items()}


def _computed(results: list[dict], update, progress: bool) -> list[dict]:
    """An update's results computed in one graph for all layers (it reads little: per layer, the
    threads would wait on each layer's last chunks); a full pass's as they are (computed layer by
    layer when persisted)."""
    if update is None:
        return results
    from ..scheduler import compute

    return list(compute(*results, progress=progress, desc="naps (new samples)"))


def _update_record(store: st.Store, update, step: str) -> dict:
    """What a persisting pass records beside its parameters: the samples it covers (``n_samples``) and,
    for an update, ``update_of``: the id of the record it updated and the samples that one covered."""
    extra = {"n_samples": int(st.array_meta(store, store.attrs["layers"][0])["shape"][0])}
    if update is not None:
        extra["update_of"] = {"id": update[2][step], "n_samples": update[0]}
    return extra


def _update_args(update) -> dict:
    """The arguments of :func:`_passes` for an update (none for a full pass)."""
    return {} if update is None else {"first": update[0], "prior": update[1]}


def _naps_datasets(attrs: dict, passes: dict, aligned: bool, std: bool) -> dict:
    """The NAPs' datasets (lazy) of the layers' passes."""
    import xarray as xr

    params = {"aligned": bool(aligned), "std": bool(std)}
    result = {}
    for layer, (dims, names, codes, arrays, align_id) in passes.items():
        dims = ("group", *dims[1:])
        inputs = {"extraction": attrs.get("extraction", {}).get("id"), "align": align_id}
        ds = xr.Dataset(
            {"nap": (dims, arrays["mean"]), "count": ("group", np.bincount(codes, minlength=len(names)))},
            coords={"group": names},
            attrs={"step": "naps", "layer": layer, "params": params, "inputs": inputs},
        )
        if std:
            ds["std"] = (dims, arrays["std"])
        result[layer] = ds
    return result


def _exemplar_datasets(attrs: dict, passes: dict, k: int) -> dict:
    """The exemplars' datasets (lazy) of the layers' passes."""
    import xarray as xr

    result = {}
    for layer, (dims, names, codes, arrays, _) in passes.items():
        spatial, unit = dims[1:-1], dims[-1]
        ex = ("end", "group", "rank", unit)
        ds = xr.Dataset(
            {"sample": (ex, arrays["sample"]), "value": (ex, arrays["value"]),
             "count": ("group", np.bincount(codes, minlength=len(names)))},
            coords={"end": ["top", "bottom"], "group": names, "rank": np.arange(k)},
            attrs={"step": "exemplars", "layer": layer, "params": {"k": int(k)},
                   "inputs": {"extraction": attrs.get("extraction", {}).get("id")}},
        )
        if spatial:
            ds["position"] = ((*ex, "axis"), arrays["position"])
            ds = ds.assign_coords(axis=list(spatial))
        result[layer] = ds
    return result


def _persist_naps(store: st.Store, aligned: bool, std: bool, progress: bool, incremental: bool = True) -> dict:
    params = {"aligned": bool(aligned), "std": bool(std)}
    with store.writing():
        update = _prior(store, {"naps": params}, store.layers) if incremental else None
        lazy = _naps_datasets(*_passes(store, aligned, std, None, **_update_args(update)), aligned, std)
        (lazy,) = _computed([lazy], update, progress)
        align_ids = {ds.attrs["inputs"]["align"] for ds in lazy.values()} - {None}
        return steps.persist(store, "naps", params, {"align": next(iter(align_ids), None)}, lazy,
                             progress=progress, **_update_record(store, update, "naps"))


def exemplars(store, k: int = 16, layers: Sequence[str] | str | None = None, *,
              persist: bool = False, progress: bool = False, incremental: bool = True) -> dict:
    """Each unit's top exemplars per group: the ``k`` samples that excite it most, and least.

    A sample's value for a unit is its activation, the maximum over the
    spatial positions for units with spatial axes (with the position of that
    maximum), of the raw activations. Per group and unit: the ``k`` highest
    (``end="top"``, descending) and the ``k`` lowest (``end="bottom"``,
    ascending), ties broken by the lower sample index; exact whatever the
    chunking (a chunk / merge / finalize reduction on the dask scheduler in use,
    memory per task ``k`` × units × groups).

    Parameters
    ----------
    store
        Path of a store, or the tree :func:`inntrospect.open_store` returned.
    k
        Exemplars kept at each end (default 16).
    layers
        Layer names (default: all).
    persist
        Compute now and write ``exemplars/<layer>`` into the store (needs its
        path), replacing earlier ones. In ``inntrospect run`` the NAP pass
        computes them in the same read of the store (:func:`naps_and_exemplars`).
        After an append, stored exemplars of the same ``k`` and layers are
        updated from the new samples alone (exactly: the stored ones are the
        candidates of the samples before).
    progress
        Show a progress bar while persisting.
    incremental
        With ``persist``, update stored exemplars after an append (default)
        rather than read every sample again (``False``).

    Returns
    -------
    dict of xarray.Dataset
        ``sample`` (``end``, ``group``, ``rank``, ``unit``) int64, the store's
        sample index, -1 where a group has fewer than ``k`` samples;
        ``value`` (same dims) float64, NaN there; ``position`` (…, ``axis``)
        int32, the spatial index of the maximum (layers with spatial axes);
        ``count`` (``group``). Lazy unless ``persist``.

    Examples
    --------
    >>> ex = inntrospect.exemplars("run.zarr", k=8)                          # doctest: +SKIP
    >>> ex["conv2d_25"].sample.sel(end="top", group="7", unit=3).values   # doctest: +SKIP
    """
    k = check_k(k)
    check_bool(persist=persist, progress=progress, incremental=incremental)
    if persist:
        store = steps.writable(store, "exemplars(persist=True)")
        with store.writing():
            chosen = steps.select_layers(store.layers, layers, "the store")
            update = _prior(store, {"exemplars": {"k": k}}, chosen) if incremental else None
            lazy = _exemplar_datasets(*_passes(store, False, False, k, moments=False, layers=chosen,
                                               **_update_args(update)), k)
            (lazy,) = _computed([lazy], update, progress)
            return steps.persist(store, "exemplars", {"k": k}, {}, lazy, progress=progress,
                                 **_update_record(store, update, "exemplars"))
    return _exemplar_datasets(*_passes(store, False, False, k, moments=False, layers=layers), k)


def naps_and_exemplars(store, aligned: bool = False, std: bool = False, k: int = 16, *,
                       persist: bool = True, progress: bool = False, incremental: bool = True) -> tuple[dict, dict]:
    """The NAPs and the exemplars from one pass over the store: ``(naps, exemplars)``.

    What :func:`naps` and :func:`exemplars` give, computed by the same tasks:
    each chunk is read once for both (unless the NAPs read persisted
    ``aligned`` arrays, whose exemplars come from the raw activations, read
    beside them). ``persist`` (default) computes and stores both, each with
    its own record; otherwise both are lazy and share their tasks when
    computed together (``dask.compute(naps, exemplars)``). After an append,
    stored NAPs and exemplars of the same parameters, both covering the same
    samples, are updated from the new samples alone (see :func:`naps`;
    ``incremental=False``: every sample read again).
    """
    k = check_k(k)
    check_bool(aligned=aligned, std=std, persist=persist, progress=progress, incremental=incremental)
    if not persist:
        attrs, passes = _passes(store, aligned, std, k)
        return _naps_datasets(attrs, passes, aligned, std), _exemplar_datasets(attrs, passes, k)
    store = steps.writable(store, "naps_and_exemplars")
    with store.writing():
        params = {"aligned": bool(aligned), "std": bool(std)}
        update = _prior(store, {"naps": params, "exemplars": {"k": k}}, store.layers) if incremental else None
        attrs, passes = _passes(store, aligned, std, k, **_update_args(update))
        nap, ex = _computed([_naps_datasets(attrs, passes, aligned, std), _exemplar_datasets(attrs, passes, k)],
                            update, progress)
        align_ids = {ds.attrs["inputs"]["align"] for ds in nap.values()} - {None}
        runs = [("naps", params, {"align": next(iter(align_ids), None)}, nap), ("exemplars", {"k": k}, {}, ex)]
        done = steps.persist_together(store, runs, progress=progress,
                                      extra=[_update_record(store, update, s) for s in ("naps", "exemplars")])
    return done[0], done[1]


def check_k(k) -> int:
    """``k`` as a positive int, or a :class:`~inntrospect.errors.ParameterError` naming the fix."""
    import numbers

    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ParameterError(f"k must be a positive whole number of exemplars, got {k!r}; e.g. k=16.")
    return int(k)


def contrastive_naps(store, groups: Sequence[str] | None = None, weight_by_group_size: bool = False,
                     *, significance: bool | None = None, naps: Mapping | None = None,
                     persist: bool = False, progress: bool = False) -> dict:
    """Contrastive NAPs of the groups of interest (``REFERENCE.md`` §5), lazy.

    ``C_g = NAP_g - sum_h w_h NAP_h`` for ``g`` in ``groups`` (default: all), in
    sorted group order, with ``w_h = 1/|groups|`` or, with
    ``weight_by_group_size``, proportional to the group sizes.

    NAPs come from the store (``naps/``, which must be current), or from
    ``naps=``, a result of :func:`naps` (lazy is fine). ``persist`` computes
    and writes ``contrast/<layer>`` (it needs the store's own NAPs).

    With ``significance`` (default: when the NAPs carry ``std``), each group
    is also tested against all other samples of the store pooled, per unit
    and position, from the group moments the NAP pass merged (no second read;
    :func:`inntrospect.analysis.significance.contrast_statistics`): Welch's
    ``t``, its two-sided ``p``, Benjamini–Hochberg ``q`` across the layer's
    units and positions for each group, and Hedges' g as ``effect``, with
    ``rest_count``. It needs NAPs computed with ``std=True``.

    Returns ``{layer: Dataset}`` with ``nap`` (``group``, spatial dims, ``unit``),
    ``weight`` and ``count`` (``group``); with significance also ``t``, ``p``,
    ``q``, ``effect`` (as ``nap``) and ``rest_count`` (``group``).

    Raises
    ------
    GroupNotFoundError
        A name in ``groups`` is not a group; the message lists the groups.
    """
    import xarray as xr

    check_bool(weight_by_group_size=weight_by_group_size, persist=persist, progress=progress)
    if significance is not None:
        check_bool(significance=significance)
    if persist:
        if naps is not None:
            raise StoreError("persist=True contrasts the store's own NAPs; leave naps= out.")
        return _persist_contrast(store, groups, weight_by_group_size, significance, progress)
    if naps is None:
        if isinstance(store, xr.DataTree):
            raise ParameterTypeError(
                "contrastive_naps reads the store's current NAPs, which needs its path (to check "
                "they are current), not an opened tree; pass the path, or the NAPs themselves: "
                "contrastive_naps(tree, naps=inntrospect.naps(tree)).")
        naps = steps.load(store, "naps")
    for ds in naps.values():  # an unknown group is the first thing to fix
        _choose_groups(ds.indexes["group"], groups)
    has_std = all("std" in ds for ds in naps.values())
    if significance is None:
        significance = has_std
    elif significance and not has_std:
        raise ParameterError(
            "significance needs each group's standard deviation, and these NAPs have none: compute "
            "them again with std (inntrospect naps CONFIG, whose [contrast] significance = true keeps "
            "them; or inntrospect.naps(store, std=True, persist=True)), or leave the statistics out "
            "([contrast] significance = false; significance=False).")
    params = {"groups": None if groups is None else sorted(str(g) for g in groups),
              "weight_by_group_size": bool(weight_by_group_size), "significance": bool(significance)}
    result = {}
    for layer, ds in naps.items():
        chosen = _choose_groups(ds.indexes["group"], groups)
        sub = ds.sel(group=chosen)
        counts = sub["count"].values
        weights = contrast_weights(counts, weight_by_group_size)
        attrs = {"step": "contrast", "layer": layer, "params": params, "inputs": {"naps": ds.attrs.get("id")}}
        if significance:
            attrs["statistics"] = dict(STATISTICS)
        result[layer] = xr.Dataset(  # one Dataset of every variable (an update aligns them again)
            {"nap": sub["nap"].copy(data=contrast(sub["nap"].data, counts, weight_by_group_size)),
             "weight": ("group", weights), "count": ("group", counts),
             **(_statistics(ds, chosen) if significance else {})},
            coords={"group": chosen}, attrs=attrs)
    return result


def contrast_significance(naps: Mapping, groups: Sequence[str] | None = None) -> dict:
    """The statistics of the contrasts, as a function of the NAPs: ``{layer: Dataset}``.

    ``naps`` is a result of :func:`naps` with ``std=True`` (lazy is fine) or
    the store's (``inntrospect.load(store, "naps")``); each group in ``groups``
    (default: all) against all other samples pooled, per unit and position:
    ``t``, ``p``, ``q``, ``effect`` and ``rest_count`` as
    :func:`contrastive_naps` stores them with ``significance=True``.

    Examples
    --------
    >>> stats = inntrospect.contrast_significance(inntrospect.naps("run.zarr", std=True))  # doctest: +SKIP
    >>> (stats["conv2d_25"].q < 0.05).sum("unit").compute()                                # doctest: +SKIP
    """
    import xarray as xr

    out = {}
    for layer, ds in naps.items():
        if "std" not in ds:
            raise ParameterError("contrast_significance needs NAPs with std: inntrospect.naps(store, std=True).")
        chosen = _choose_groups(ds.indexes["group"], groups)
        out[layer] = xr.Dataset(_statistics(ds, chosen), coords={"group": chosen},
                                attrs={"layer": layer, "statistics": dict(STATISTICS)})
    return out


#: how the contrast step's statistics are computed, as its record says
STATISTICS = {"test": "welch", "against": "all other samples", "sided": "two",
              "correction": "benjamini-hochberg, per group across units and positions",
              "effect": "hedges_g"}


def _statistics(ds, chosen) -> dict:
    """``t``, ``p``, ``q``, ``effect`` and ``rest_count`` of the groups ``chosen``, from the NAPs
    ``ds`` of all groups (``nap``, ``std``, ``count``); lazy when they are."""
    import dask
    import dask.array as da

    from .significance import contrast_statistics

    count = ds["count"].values
    position = {g: i for i, g in enumerate(np.asarray(ds.indexes["group"]).astype(str))}
    index = np.array([position[g] for g in chosen], dtype=np.intp)
    m2, per_group = ds["std"].data ** 2, count.reshape(-1, *([1] * (ds["std"].ndim - 1)))
    if isinstance(m2, np.ndarray) and np.result_type(m2, per_group) == m2.dtype:
        m2 *= per_group  # in place: a fresh array, as big as the layer's NAPs
    else:
        m2 = m2 * per_group
    dims = ds["nap"].dims
    out = {"rest_count": ("group", (count.sum() - count)[index])}
    if isinstance(ds["nap"].data, da.Array) or isinstance(m2, da.Array):
        stats = dask.delayed(contrast_statistics, pure=True)(count, ds["nap"].data, m2)
        for k in ("t", "p", "q", "effect"):
            out[k] = (dims, da.from_delayed(stats[k], ds["nap"].shape, dtype=np.float64)[index], {}, UNCOMPRESSED)
        return out
    stats = contrast_statistics(count, ds["nap"].values, m2)
    every = len(index) == len(count) and bool((index == np.arange(len(count))).all())  # no copies then
    out.update({k: (dims, stats[k] if every else stats[k][index], {}, UNCOMPRESSED) for k in ("t", "p", "q", "effect")})
    return out


#: the encoding of t, p, q and effect: stored without compression (checksummed). Float64 statistics
#: are noise in every bit but their dead units' NaN: zstd kept 0.64 of their bytes (a fraction of a
#: percent of the store) for a quarter of what the statistics add to `inntrospect contrast`
UNCOMPRESSED = {"compressors": None}


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


def _persist_contrast(store, groups, weight_by_group_size, significance, progress) -> dict:
    store = steps.writable(store, "contrastive_naps(persist=True)")
    with store.writing():
        source = steps.load(store, "naps", lazy=False)  # small: in memory, no task graph to build
        if significance is None:
            significance = all("std" in ds for ds in source.values())

        def layer(name: str):
            return contrastive_naps(store, groups, weight_by_group_size, significance=significance,
                                    naps={name: source[name]})[name]

        lazy = _OnDemand(source, layer)  # each layer's statistics computed while the one before is written
        params = next(iter(lazy.values())).attrs["params"] if lazy else {}
        return steps.persist(store, "contrast", params, {"naps": store.records["naps"]["id"]}, lazy,
                             progress=progress)


class _OnDemand(Mapping):
    """``{key: make(key)}`` for the keys given, each made when first looked up (and kept); ``make``
    raises KeyError for any other key."""

    def __init__(self, keys, make) -> None:
        self._keys, self._make, self._made = list(keys), make, {}

    def __getitem__(self, key):
        if key not in self._made:
            self._made[key] = self._make(key)
        return self._made[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
