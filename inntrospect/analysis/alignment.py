"""Gradient-based alignment (``REFERENCE.md`` §3): a numpy kernel and a lazy wrapper.

For layers with spatial axes, each sample's activations are shifted so that
the position of highest saliency (mean over units of ``|grad|``, first maximum
in C order) lands on the centre ``spatial_shape // 2``; positions shifted in
from outside are 0. The unit axis is never shifted (the reference toolbox's
defect of shifting it too is not copied). Constant saliency: no shift.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError, StoreError

__all__ = ["shifts", "align_kernel", "align_reference", "align"]


# Slab size in bytes: |grads| is taken and summed, and output rows are gathered and
# their margins zeroed, one slab at a time (buffers reused, and small enough to stay
# in the core's 512 KiB L2 cache). Full-size memory traffic is then one read of
# grads, one read of acts and one write of the output.
_SLAB = 1 << 18
# Samples smaller than this (with rows of at least _MIN_ROW bytes) are gathered row
# by row, a slab at a time, with no Python work per sample; bigger samples get one
# slice copy per run of equal shift, whose Python overhead is small next to the
# bytes it moves.
_SMALL_SAMPLE = 1 << 17
_MIN_ROW = 64
# A fresh output at least this big is mmap'ed (glibc's largest dynamic mmap
# threshold is 32 MiB), so np.zeros costs no more than np.empty (the kernel zeroes
# the pages at first touch either way) and the slice path skips the margins.
_CALLOC_FREE = 1 << 25


def _saliency_sums(grads: np.ndarray, slab: int) -> np.ndarray:
    """Sums of ``|grads|`` over units, ``(n, P)``, in einsum's summation order.

    ``grads`` must be C-contiguous float32/64. ``|grads|`` goes into a reused
    L2-sized slab that ``np.einsum("ij->i")`` sums (SIMD, single-threaded): one
    pass over ``grads``, no full-size temporary. BLAS (``slab @ ones``) measured
    no faster here, as the pass is bound by reading ``grads`` from memory, and its
    thread pool would compete with dask's workers. A float64 sum would add a cast
    and gain nothing: exactness comes from the error bound in :func:`shifts`.
    """
    n, units = grads.shape[0], grads.shape[-1]
    rows = grads.reshape(-1, units)  # a view: grads is C-contiguous
    sums = np.empty(len(rows), grads.dtype)
    step = max(1, slab // (units * grads.itemsize))
    tmp = np.empty((min(step, len(rows)), units), grads.dtype)
    for lo in range(0, len(rows), step):
        part = np.abs(rows[lo : lo + step], out=tmp[: len(rows) - lo])
        np.einsum("ij->i", part, out=sums[lo : lo + len(part)])
    return sums.reshape(n, -1)


def _exact_argmax(grads: np.ndarray, which: np.ndarray, slab: int) -> tuple[np.ndarray, np.ndarray]:
    """First argmax, and "saliency not constant", of samples ``which`` by the reference's
    own expression ``np.abs(g).mean(axis=-1)``: same dtype, same pairwise float sum over
    the contiguous unit axis, same division, so element for element the reference's
    value and ties resolve alike. Vectorised: a slab of (sample, position) rows at a
    time (whole samples at a time if ``grads`` is not C-contiguous)."""
    size = int(np.prod(grads.shape[1:-1], dtype=np.int64))
    units = grads.shape[-1]
    parts = []
    if grads.flags.c_contiguous and units:
        rows = grads.reshape(-1, units)
        index = (which[:, None] * size + np.arange(size)).reshape(-1)  # rows to evaluate
        step = max(1, slab // max(1, units * grads.itemsize))
        buf = np.empty((min(step, len(index)), units), grads.dtype)
        for lo in range(0, len(index), step):
            part = index[lo : lo + step]
            first, last = int(part[0]), int(part[-1])
            if last - first == len(part) - 1:  # consecutive rows: no gather needed
                g = np.abs(rows[first : last + 1], out=buf[: len(part)])
            else:
                g = np.take(rows, part, axis=0, out=buf[: len(part)], mode="clip")
                np.abs(g, out=g)
            parts.append(g.mean(axis=-1))
    else:
        step = max(1, slab // max(1, grads[0].nbytes))
        buf = np.empty((min(step, len(which)), *grads.shape[1:]), grads.dtype)
        for lo in range(0, len(which), step):
            part = which[lo : lo + step]
            g = np.take(grads, part, axis=0, out=buf[: len(part)], mode="clip")
            parts.append(np.abs(g, out=g).mean(axis=-1).reshape(-1))
    saliency = np.concatenate(parts).reshape(len(which), size)
    return saliency.argmax(axis=1), ~(saliency.min(axis=1) == saliency.max(axis=1))


def shifts(grads: np.ndarray, slab: int = _SLAB) -> np.ndarray:
    """Per-sample shift ``d = argmax(saliency) - centre``, shape ``(n, n_spatial)``.

    ``grads`` is ``(n, *spatial, unit)``; rows with constant saliency get 0. Equal to
    the reference's (:func:`align_reference`: float mean of ``|grads|`` over units,
    first maximum in C order), in two steps:

    1. Fast, one pass over ``grads``: sums of ``|grads|`` (:func:`_saliency_sums`).
       They are summed in another order than numpy's pairwise mean, so they are trusted
       only where the maximum is *clear*: finite and of normal size, with every other
       position more than ``tol`` (relative) below it. Summing ``U`` non-negative
       numbers in any order is within ``(U - 1) u`` of the exact sum (``u`` the unit
       roundoff), and so is the reference's sum; with ``tol = 16 (U + 2) u`` its means
       (float sum, then division by ``U``) keep a strict unique maximum at the same
       position, hence the same argmax, and are not constant.
       A maximum sum of 0 means all-zero gradients: constant saliency, no shift.
    2. Exact: the other samples (ties, near-ties within ``tol``, constant nonzero
       saliency, NaN/inf, float16 or non-contiguous grads) get the reference's own
       mean (:func:`_exact_argmax`), so even exact ties resolve as in the reference.
    """
    n, spatial, units = grads.shape[0], grads.shape[1:-1], grads.shape[-1]
    if not spatial:
        return np.zeros((n, 0), np.int64)
    flat = np.zeros(n, np.intp)
    moved = np.ones(n, bool)
    unclear = np.arange(n)
    if grads.dtype in (np.float32, np.float64) and grads.flags.c_contiguous and grads.size:
        sums = _saliency_sums(grads, slab)
        flat = sums.argmax(axis=1)
        top = sums[np.arange(n), flat]
        tol = 16 * (units + 2) * np.finfo(grads.dtype).eps / 2
        clear = (top >= units * 2.0**-100) & (top <= 2.0**100)  # False for NaN too
        clear &= np.count_nonzero(sums > (top * (1 - tol))[:, None], axis=1) == 1
        still = top == 0  # every |grad| is 0: the reference's saliency is constant
        moved[still] = False
        unclear = np.flatnonzero(~clear & ~still)
    if len(unclear):
        flat[unclear], moved[unclear] = _exact_argmax(grads, unclear, slab)
    d = np.stack(np.unravel_index(flat, spatial), axis=1) - np.asarray(spatial, np.int64) // 2
    d[~moved] = 0
    return d.astype(np.int64)


def _slices(d: list[int], spatial: tuple[int, ...]) -> tuple[tuple, tuple, list]:
    """Destination and source slices of a shift (``out[x] = a[x + d]`` where inside),
    and the disjoint destination regions outside it, which are 0."""
    dst, src, margins = [], [], []
    for di, size in zip(d, spatial):
        di = int(di)
        lo, hi = max(0, -di), min(size, size - di)  # x with 0 <= x + d < size
        if lo >= hi:  # shifted out entirely: all margin
            return (), (), [()]
        if lo > 0:
            margins.append((*dst, slice(0, lo)))
        if hi < size:
            margins.append((*dst, slice(hi, size)))
        dst.append(slice(lo, hi))
        src.append(slice(lo + di, hi + di))
    return tuple(dst), tuple(src), margins


def _copy_runs(
    acts: np.ndarray, d: np.ndarray, out: np.ndarray, starts: list, zeroed: bool
) -> None:
    """One slice copy per run of consecutive samples with equal shift, plus the run's
    margins (skipped when ``out`` is known to be zero)."""
    spatial = acts.shape[1:-1]
    for lo, hi, shift in zip(starts, [*starts[1:], len(d)], d[starts].tolist()):
        dst, src, margins = _slices(shift, spatial)
        for region in [] if zeroed else margins:
            out[(slice(lo, hi), *region)] = 0
        if dst:
            out[(slice(lo, hi), *dst)] = acts[(slice(lo, hi), *src)]


def _copy_gather(acts: np.ndarray, d: np.ndarray, out: np.ndarray, slab: int) -> None:
    """Row gather: ``out`` row (sample, x) = ``acts`` row (sample, x + d), or zero.

    One ``np.take`` per L2-sized slab of samples reads the source rows straight from
    ``acts`` (rows outside the sample read a clipped, already cached edge row), then
    one ``np.put`` overwrites those rows with zeros while they are still in cache.
    No Python work per sample; ``acts`` and ``out`` must be C-contiguous.
    """
    n, spatial, units = acts.shape[0], acts.shape[1:-1], acts.shape[-1]
    size = int(np.prod(spatial, dtype=np.int64))
    index = np.empty((n, *spatial), np.intp)
    index[...] = (np.arange(n, dtype=np.intp) * size).reshape(n, *[1] * len(spatial))
    inside = np.ones((n, *spatial), bool)
    stride = size
    for axis, extent in enumerate(spatial):
        stride //= extent
        x = np.arange(extent) + d[:, axis : axis + 1]
        shape = (n, *[extent if a == axis else 1 for a in range(len(spatial))])
        index += (np.clip(x, 0, extent - 1) * stride).reshape(shape)
        inside &= ((x >= 0) & (x < extent)).reshape(shape)
    index = index.reshape(-1)
    outside = np.flatnonzero(~inside.reshape(-1))
    rows = out.reshape(-1, units)
    whole_rows = rows.view(np.dtype((np.void, units * acts.itemsize))).reshape(-1)
    zero = np.zeros((), whole_rows.dtype)
    k = int(min(n, max(1, slab // (size * units * acts.itemsize))))
    cuts = np.searchsorted(outside, np.arange(0, n + k, k) * size).tolist()
    source = acts.reshape(-1, units)
    for j, lo in enumerate(range(0, n, k)):
        r0, r1 = lo * size, min(n, lo + k) * size
        np.take(source, index[r0:r1], axis=0, out=rows[r0:r1], mode="clip")
        np.put(whole_rows, outside[cuts[j] : cuts[j + 1]], zero, mode="clip")


def align_kernel(acts: np.ndarray, grads: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Aligned activations of a chunk of samples, ``(n, *spatial, unit)``.

    Equal to :func:`align_reference`. Vectorised over samples: the shifts come from
    one pass over ``grads`` in cache-sized slabs (:func:`shifts`); then every output
    byte is written once, by a row gather per cache-sized slab of small samples
    (:func:`_copy_gather`), or by one slice copy per run of equal shift for big
    samples or few runs (:func:`_copy_runs`). ``out``, if given, is overwritten
    entirely (it need not be zeroed first). Arrays without spatial axes are
    returned as they are.
    """
    if acts.shape != grads.shape:
        raise ParameterError(f"acts {acts.shape} and grads {grads.shape} must have one shape: pass "
                             "the activations and gradients of the same layer and samples.")
    spatial = acts.shape[1:-1]
    if not spatial:
        return acts
    d = shifts(grads)
    starts = [0, *(np.flatnonzero(np.any(d[1:] != d[:-1], axis=1)) + 1).tolist()]
    sample = acts.nbytes // max(1, len(acts))
    rows_ok = acts.flags.c_contiguous and acts.shape[-1] * acts.itemsize >= _MIN_ROW
    if out is not None:
        rows_ok &= out.flags.c_contiguous and out.dtype == acts.dtype
    if sample < _SMALL_SAMPLE and len(starts) > 1 and rows_ok:
        if out is None:
            out = np.empty(acts.shape, acts.dtype)
        _copy_gather(acts, d, out, _SLAB)
        return out
    zeroed = out is None and acts.nbytes >= _CALLOC_FREE
    if out is None:
        out = (np.zeros if zeroed else np.empty)(acts.shape, acts.dtype)
    if len(acts):
        _copy_runs(acts, d, out, starts, zeroed)
    return out


def align_reference(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Plain per-sample loop with ``np.pad`` and crop: the definition, for tests and benchmarks."""
    spatial = acts.shape[1:-1]
    if not spatial:
        return acts.copy()
    out = np.empty_like(acts)
    for i in range(len(acts)):
        s = np.abs(grads[i]).mean(axis=-1)
        if s.min() == s.max():
            out[i] = acts[i]
            continue
        p = np.array(np.unravel_index(np.argmax(s), spatial))
        d = p - np.array(spatial) // 2
        width = [(max(0, -k), max(0, k)) for k in d] + [(0, 0)]
        padded = np.pad(acts[i], width)
        start = [max(0, k) for k in d]
        crop = tuple(slice(b, b + n) for b, n in zip(start, spatial))
        out[i] = padded[crop]
    return out


def align(store, persist: bool = False, *, progress: bool = False, incremental: bool = True) -> dict:
    """Aligned activations of every layer, lazily: ``{layer: DataArray}``.

    ``store`` is a store path or the tree :func:`inntrospect.open_store` returns.
    Layers without spatial axes, and the output layer (it has no gradients),
    pass through unchanged. Nothing is computed until asked: each chunk of
    samples is aligned by :func:`align_kernel` when it is read.

    With ``persist=True`` (``store`` must be a path) the aligned activations
    are written chunk by chunk as ``aligned`` into ``layers/<layer>`` of the
    layers that have spatial axes, recorded as the ``align`` step, and
    returned as stored (lazy): ``{layer: DataArray}`` of those layers only.
    :func:`inntrospect.naps` with ``aligned=True`` then reads them instead of
    aligning again. After samples were appended to the store, persisted
    ``aligned`` arrays are extended (``incremental``, the default): only the
    chunks from the one holding the first new sample are written, in place
    (the samples before keep their values); ``incremental=False`` writes all
    of them anew.
    """
    import dask.array as da
    import xarray as xr

    from .. import store as st
    from ..checks import check_bool

    check_bool(persist=persist, progress=progress, incremental=incremental)
    if persist:
        if isinstance(store, xr.DataTree):
            raise StoreError("align(persist=True) writes into the store: pass its path, not an opened tree.")
        return _persist(st.Store.open(store), progress, incremental)
    handle = None if isinstance(store, xr.DataTree) else st.Store.open(store)
    tree = store if handle is None else handle.tree()
    result = {}
    for name in tree.attrs["layers"]:
        node = tree[st.layer_path(name)]
        acts = node["acts"]
        if "grads" not in node or acts.ndim <= 2:
            result[name] = acts
            continue
        a, g = acts.data, node["grads"].data
        if handle is not None:  # from a path: a chunk failing its checksum is named, not Zarr's error
            a, g = (st.checked_dask_array(handle, st.layer_path(name, v)) for v in ("acts", "grads"))
        data = da.map_blocks(align_kernel, a, g, dtype=acts.dtype)
        result[name] = acts.copy(data=data).rename("aligned")
    return result


def _persist(store, progress: bool, incremental: bool = True) -> dict:
    """Write ``aligned`` chunk by chunk (one task per stored chunk) and record the step."""
    import dask.array as da

    from .. import store as st
    from ..scheduler import compute
    from ..store import steps
    from ..store.nodes import STAGED

    with store.writing():
        lazy = {k: v for k, v in align(store).items() if v.name == "aligned"}
        n = int(st.array_meta(store, store.layers[0])["shape"][0])
        prior = _prior(store, list(lazy), n) if incremental else None
        if prior is not None:
            return _extend(store, lazy, prior, n, progress)
        st.check_chunks(store)  # a missing chunk of acts or grads would be aligned into NaN: refused
        # written as aligned.next beside the old arrays, swapped in once all are: a failed run keeps them
        with steps.recording(store, "align", {}, {}, lazy, n_samples=n) as rec, \
                steps.replacing(store, rec, [st.layer_path(layer, "aligned") for layer in lazy]):
            writes = []
            for layer, arr in lazy.items():
                target = st.create_derived_array(
                    store, layer, f"aligned{STAGED}", dims=arr.dims,
                    codec=store.attrs["codecs"][layer]["acts"], attributes=steps.node_attrs(rec, layer))
                writes.append(da.store(arr.data, target, lock=False, compute=False))
            compute(*writes, progress=progress, desc="align")
    return steps.load(store, "align")


def _prior(store, layers: list, n: int) -> dict | None:
    """The align record to extend after an append (None: align every sample): complete, of these
    layers, covering (``n_samples``) all the samples of an earlier extraction id of the store, fewer
    than ``n``, each layer's ``aligned`` carrying its id and already ``n`` long (:func:`inntrospect.store.grow`)."""
    from .. import store as st

    attrs = store.attrs
    ext = attrs.get("extraction") or {}
    rec = (attrs.get("steps") or {}).get("align")
    if not ext.get("appends") or ext.get("state") != "complete" or not isinstance(rec, dict) \
            or rec.get("state") != "complete" or rec.get("layers") != layers or not layers:
        return None
    covered = rec.get("n_samples")
    before = {e.get("id_before"): e.get("n_samples_before") for e in ext["appends"]}
    if not isinstance(covered, int) or before.get((rec.get("inputs") or {}).get("extraction"), -1) != covered \
            or not 0 < covered < n:
        return None
    for layer in layers:
        node = st.layer_group(store, layer)
        if "aligned" not in node or node["aligned"].attrs.get("id") != rec["id"] \
                or node["aligned"].shape != node["acts"].shape:
            return None
    return rec


def _extend(store, lazy: dict, prior: dict, n: int, progress: bool) -> dict:
    """Write the chunks of ``aligned`` from the one holding sample ``prior["n_samples"]`` on, in place,
    and record the step anew (the samples before keep their stored values, which are the same)."""
    import dask.array as da

    from .. import store as st
    from ..scheduler import compute
    from ..store import steps

    first = prior["n_samples"]
    targets = {layer: st.open_array(store, layer, "aligned", write=True) for layer in lazy}
    st.check_chunks(store, start=first)
    update = {"id": prior["id"], "n_samples": first}
    with steps.recording(store, "align", {}, {}, lazy, n_samples=n, update_of=update) as rec:
        writes = []
        for layer, arr in lazy.items():
            target = targets[layer]
            lo = first // target.chunks[0] * target.chunks[0]  # whole chunks: the first one holds old samples too
            writes.append(da.store(arr.data[lo:], target, regions=(slice(lo, n),), lock=False, compute=False))
        compute(*writes, progress=progress, desc="align (new samples)")
        steps.begin(store, rec)  # the arrays now carry the new run's values: the old record no longer holds
        for layer, target in targets.items():
            target.attrs.update(steps.node_attrs(rec, layer))
        st.consolidate(store)
    return steps.load(store, "align")
