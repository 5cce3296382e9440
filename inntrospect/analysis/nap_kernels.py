"""The numpy kernels of NAPs and contrastive NAPs (``REFERENCE.md`` §4–5).

A NAP is the exact mean activation of each group, ``(group, *spatial, unit)``,
computed as a reduction in three parts, each a plain numpy function:

* :func:`chunk_moments` — per chunk of samples, for each group present in it,
  the count, the float64 sum and (for the standard deviation) the float64 sum
  of squared deviations from the chunk's group mean;
* :func:`merge_moments` — merges any number of those (Chan et al.'s update),
  so partial results combine in a tree;
* :func:`finalize_moments` — divides: mean and population standard deviation.

:func:`aligned_moments` is :func:`chunk_moments` of gradient-aligned
activations; :func:`add_sums` is its fast path, the float64 group sums as a
compiled loop (numba, which ``umap-learn`` brings; plain numpy when it is
missing) with the alignment fused in: only the shifts are computed (from the
gradients, by :func:`inntrospect.analysis.alignment.shifts`), each sample is
added shifted into its group's sum, and no aligned copy is made.
:func:`contrast` is the kernel of contrastive NAPs.

No dask, Zarr or xarray here: :mod:`inntrospect.analysis.nap_graph` runs these
over the stored chunks, :mod:`inntrospect.analysis.profiles` is the public API.
The only scratch memory is a per-thread buffer
(:func:`inntrospect.store.chunkio.buffer`, a plain numpy array reused from
chunk to chunk) into which a chunk is aligned when the alignment is not fused.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ParameterError
from ..store.chunkio import buffer
from . import compiled

__all__ = [
    "NARROW",
    "group_codes",
    "chunk_moments",
    "merge_moments",
    "finalize_moments",
    "as_moments",
    "fusable",
    "shifts3",
    "add_sums",
    "aligned_moments",
    "contrast",
    "contrast_weights",
]

#: below this many values per sample, a one-hot product beats per-group sums
#: (numpy path, when numba is missing)
NARROW = 64


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
        raise ParameterError(f"{n} samples but {len(codes)} group codes: give one group code per sample.")
    flat = x.reshape(n, -1)
    kernels = compiled.kernels()
    if kernels is not None and flat.dtype in (np.float32, np.float64):
        present, index, counts = np.unique(codes, return_inverse=True, return_counts=True)
        flat = np.ascontiguousarray(flat)
        index = index.reshape(-1).astype(np.intp)
        sums = np.zeros((len(present), flat.shape[1]))
        add_sums(kernels, flat, index, sums)
        m2 = None
        if std:
            m2 = np.zeros_like(sums)
            kernels.group_m2(flat, index, sums / counts[:, None], m2)
        return as_moments(present, counts, sums, m2)
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


def as_moments(present, counts, sums, m2=None) -> dict:
    """``{group code: (count, sum[, m2])}`` from per-group arrays (rows in the order of ``present``)."""
    if m2 is None:
        return {int(g): (int(c), sums[k]) for k, (g, c) in enumerate(zip(present, counts))}
    return {int(g): (int(c), sums[k], m2[k]) for k, (g, c) in enumerate(zip(present, counts))}


def fusable(shape: tuple, grads_shape: tuple) -> bool:
    """Whether alignment can be fused into the sums: 1 to 3 spatial axes, gradients alike."""
    return 1 <= len(shape) - 2 <= 3 and tuple(shape) == tuple(grads_shape)


def shifts3(grads) -> np.ndarray:
    """:func:`inntrospect.analysis.alignment.shifts` as ``(n, 3)``: 1 or 2 spatial axes padded with leading zeros."""
    from .alignment import shifts

    d = np.zeros((len(grads), 3), np.int64)
    d[:, 3 - (grads.ndim - 2):] = shifts(grads)
    return d


def add_sums(kernels, x, index, sums, grads=None, shift=None) -> None:
    """Add each sample of ``x`` (aligned when ``grads`` are given) to ``sums[index[i]]``, in float64.

    ``kernels`` are the compiled ones (:func:`inntrospect.analysis.compiled.kernels`);
    ``sums`` is ``(groups, values per sample)``. When :func:`fusable`, the
    alignment is fused: each sample is added shifted (by ``shift``, the
    :func:`shifts3` of ``grads``, computed here unless given), no aligned
    copy is made; otherwise the chunk is aligned into a buffer of this thread first.
    """
    from .alignment import align_kernel

    n = len(x)
    if grads is not None and not fusable(x.shape, grads.shape):
        out = buffer("aligned", x.size, x.dtype).reshape(x.shape) if x.size else None
        x, grads = align_kernel(x, grads, out=out), None
    if grads is None:
        kernels.group_sums(np.ascontiguousarray(x.reshape(n, -1)), index, sums)
        return
    shift = shifts3(grads) if shift is None else shift
    spatial = x.shape[1:-1]
    shape3 = (1,) * (3 - len(spatial)) + tuple(spatial)
    units = x.shape[-1]
    x = np.ascontiguousarray(x).reshape(n, *shape3[:2], shape3[2] * units)
    kernels.shifted_sums(x, index, shift, units, sums.reshape(len(sums), *x.shape[1:]))


def aligned_moments(acts, codes, grads, std: bool = False) -> dict:
    """:func:`chunk_moments` of the aligned activations of a chunk (see :mod:`inntrospect.analysis.alignment`).

    Without ``std`` and with numba, the alignment is fused into the sums
    (:func:`add_sums`); otherwise the chunk is aligned into a buffer of this
    thread first.
    """
    from .alignment import align_kernel

    kernels = compiled.kernels()
    if std or kernels is None or acts.dtype not in (np.float32, np.float64):
        out = buffer("aligned", acts.size, acts.dtype).reshape(acts.shape) if acts.size else None
        return chunk_moments(align_kernel(acts, grads, out=out), codes, std)
    n = len(acts)
    if len(codes) != n:
        raise ParameterError(f"{n} samples but {len(codes)} group codes: give one group code per sample.")
    present, index, counts = np.unique(codes, return_inverse=True, return_counts=True)
    sums = np.zeros((len(present), int(np.prod(acts.shape[1:], dtype=np.int64))))
    add_sums(kernels, acts, index.reshape(-1).astype(np.intp), sums, grads)
    return as_moments(present, counts, sums)


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
