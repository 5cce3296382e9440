"""Gradient-based alignment (``REFERENCE.md`` §3): a numpy kernel and a lazy wrapper.

For layers with spatial axes, each sample's activations are shifted so that
the position of highest saliency (mean over units of ``|grad|``, first maximum
in C order) lands on the centre ``spatial_shape // 2``; positions shifted in
from outside are 0. The unit axis is never shifted (the reference toolbox's
defect of shifting it too is not copied). Constant saliency: no shift.
"""

from __future__ import annotations

import numpy as np

__all__ = ["shifts", "align_kernel", "align_reference", "align"]


def shifts(grads: np.ndarray, slab: int = 16) -> np.ndarray:
    """Per-sample shift ``d = argmax(saliency) - centre``, shape ``(n, n_spatial)``.

    ``grads`` is ``(n, *spatial, unit)``; rows with constant saliency get 0.
    The sum over units stands in for the mean (same argmax, same ties); it is
    taken ``slab`` samples at a time so the temporary ``|grads|`` stays small.
    """
    n, spatial = grads.shape[0], grads.shape[1:-1]
    saliency = np.empty((n, int(np.prod(spatial, dtype=np.int64))), np.float64)
    tmp = np.empty((min(slab, n), *grads.shape[1:]), grads.dtype)
    for lo in range(0, n, slab):
        part = grads[lo : lo + slab]
        absolute = np.abs(part, out=tmp[: len(part)])
        saliency[lo : lo + len(part)] = absolute.reshape(len(part), -1, grads.shape[-1]).sum(axis=-1)
    flat = saliency.argmax(axis=1)  # first maximum in C order
    pos = np.stack(np.unravel_index(flat, spatial), axis=1) if spatial else np.zeros((n, 0), int)
    d = pos - np.asarray(spatial, dtype=np.int64) // 2
    d[saliency.min(axis=1) == saliency.max(axis=1)] = 0
    return d.astype(np.int64)


def _slices(d: np.ndarray, spatial: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Destination and source slices of a shift: ``out[x] = a[x + d]`` where inside."""
    dst, src = [], []
    for di, size in zip(d, spatial):
        di = int(di)
        lo, hi = max(0, -di), min(size, size - di)  # x with 0 <= x + d < size
        if lo >= hi:
            return (), ()
        dst.append(slice(lo, hi))
        src.append(slice(lo + di, hi + di))
    return tuple(dst), tuple(src)


def align_kernel(acts: np.ndarray, grads: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Aligned activations of a chunk of samples, ``(n, *spatial, unit)``.

    Vectorised over samples: samples sharing a shift are copied together, one
    slice copy per distinct shift (at most the number of spatial positions).
    Arrays without spatial axes are returned as they are.
    """
    if acts.shape != grads.shape:
        raise ValueError(f"acts {acts.shape} and grads {grads.shape} must have one shape.")
    spatial = acts.shape[1:-1]
    if not spatial:
        return acts
    d = shifts(grads)
    if out is None:
        out = np.zeros_like(acts)
    else:
        out[...] = 0
    unique, inverse = np.unique(d, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(unique) == 1:  # the whole chunk moves alike: plain slices, no gather
        dst, src = _slices(unique[0], spatial)
        if dst:
            out[(slice(None), *dst)] = acts[(slice(None), *src)]
        return out
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
    for k, shift in enumerate(unique):
        dst, src = _slices(shift, spatial)
        if not dst:
            continue
        idx = order[bounds[k] : bounds[k + 1]]
        if len(idx) == 1:  # a shift of its own: a plain slice copy, no gathered temporary
            out[(int(idx[0]), *dst)] = acts[(int(idx[0]), *src)]
        else:
            out[(idx, *dst)] = acts[(idx, *src)]
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


def align(store) -> dict:
    """Aligned activations of every layer, lazily: ``{layer: DataArray}``.

    ``store`` is a store path or the tree :func:`inntrospect.open_store` returns.
    Layers without spatial axes, and the output layer (it has no gradients),
    pass through unchanged. Nothing is computed until asked: each chunk of
    samples is aligned by :func:`align_kernel` when it is read.
    """
    import dask.array as da
    import xarray as xr

    from .store import open_store

    tree = store if isinstance(store, xr.DataTree) else open_store(store)
    result = {}
    for name in tree.attrs["layers"]:
        node = tree[f"layers/{name}"]
        acts = node["acts"]
        if "grads" not in node or acts.ndim <= 2:
            result[name] = acts
            continue
        data = da.map_blocks(align_kernel, acts.data, node["grads"].data, dtype=acts.dtype)
        result[name] = acts.copy(data=data).rename("aligned")
    return result
