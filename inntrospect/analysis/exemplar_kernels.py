"""The numpy kernels of top exemplars: the samples that excite (or not) each unit most, per group.

For a layer whose per-sample activations are ``(*spatial, unit)``, a sample's
*score* for a unit is the maximum of that unit's activation over the spatial
positions (with no spatial axes, the activation itself) and its *position*
the spatial index of that maximum (the first one in C order on ties, as
:func:`numpy.argmax` over the flattened spatial axes). For every group and
unit we keep, at each of two *ends*:

* end 0, "top": the ``k`` samples of highest score, by score descending;
* end 1, "bottom": the ``k`` samples of lowest score, by score ascending;

ties in both broken by the lower global sample index first. Sample indices
are unique, so this is a strict total order: the ``k`` best of a union of
sets are the ``k`` best of the union of each set's ``k`` best, and the
result is exact and the same, bit for bit, whatever the chunking of the
samples and the order or tree in which partial results are merged.

It is a reduction in three parts, like :mod:`inntrospect.analysis.nap_kernels`:

* :func:`chunk_exemplars` — per chunk of consecutive samples, the candidates
  of the groups present in it, as an :class:`Exemplars`;
* :func:`merge_exemplars` — merges any number of those (of disjoint sets of
  samples), so partial results combine in a tree;
* :func:`finalize_exemplars` — ranks them: dense arrays over all groups.

A partial result holds, per group present, the *set* of its best
``min(k, samples of the group)`` samples per unit and end, unordered: they
are ranked once, by :func:`finalize_exemplars` (ordering them in every chunk
and merge would be wasted). It holds no reference to the chunk it came from.

Activations are expected finite (stores refuse NaN and infinity, see
:class:`inntrospect.errors.NonFiniteError`); with NaN, which samples are
kept is undefined. Negative and positive zero compare equal, as everywhere
in numpy.

Only numpy is used, in a few vectorised steps per chunk: no Python loop over
groups or units. Groups of more than ``k`` samples are padded into blocks of
similar sizes (within a factor 2, so O(log n) blocks) and selected with
:meth:`numpy.ndarray.partition`. For float32 activations (what stores hold)
each score and its tie-breaking index are packed into one uint64 key, in the
order of the pair: numpy's fast, unstable partition and sort of these keys
are exact. float64 activations take a slower path (:func:`_order`).

No dask, Zarr or xarray here.

Examples
--------
>>> import numpy as np
>>> x = np.array([[1.0, 5.0], [3.0, 2.0], [3.0, 0.0], [0.0, 4.0]])  # 4 samples, 2 units
>>> codes = np.array([0, 0, 1, 0])
>>> a = chunk_exemplars(x[:2], codes[:2], start=0, k=2)
>>> b = chunk_exemplars(x[2:], codes[2:], start=2, k=2)
>>> sample, value, position = finalize_exemplars(merge_exemplars(a, b), 2, 2, (), 2)
>>> sample[0, 0]  # top of group 0, (rank, unit)
array([[1, 0],
       [0, 3]])
>>> value[1, 1]  # bottom of group 1, which has one sample
array([[ 3.,  0.],
       [nan, nan]])
>>> position.shape  # no spatial axes: an empty last axis
(2, 2, 2, 2, 0)
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from ..errors import ParameterError, ParameterTypeError

__all__ = [
    "Exemplars",
    "chunk_exemplars",
    "merge_exemplars",
    "finalize_exemplars",
    "RunningExemplars",
    "merge_compiled",
]

#: bytes of samples whose spatial maximum is taken at once (plus a scratch copy of half that)
BLOCK = 1 << 22
#: scores queued by the compiled pass before they are ranked in, sorted by group and unit
QUEUE = 1 << 16
#: values gathered at once to find the positions of the selected scores
GATHER = 1 << 17

#: what :meth:`RunningExemplars.add` hands the compiled pass when no group sums are added
_NO_SUMS = np.zeros((0, 0))
_NO_INDEX = np.zeros(0, np.intp)

_LOW = np.uint64(0xFFFFFFFF)
#: the index of the high 32 bits of a uint64 seen as two uint32
_HIGH = 1 if sys.byteorder == "little" else 0


class Exemplars(NamedTuple):
    """Partial top exemplars: the candidates of some groups.

    The rows of the ``i``-th group are ``counts[:i].sum()`` to
    ``counts[:i + 1].sum()``; for each unit and end they hold the group's
    best samples, in no particular order (:func:`finalize_exemplars` ranks them).

    Attributes
    ----------
    k : int
        How many exemplars are kept per group, unit and end.
    codes : ndarray of int64, shape (group,)
        The group codes held, sorted and distinct.
    counts : ndarray of int64, shape (group,)
        Rows of each group: ``min(k, its samples)``.
    value : ndarray, shape (2, unit, row)
        Scores, in the activations' dtype (float64 once float32 and float64
        parts are merged). End 0 holds the top, end 1 the bottom.
    sample : ndarray of int64, shape (2, unit, row)
        Global sample indices.
    position : ndarray of int32, shape (2, unit, row)
        Flat (C-order) spatial index of each score, 0 without spatial axes;
        :func:`finalize_exemplars` unravels it.
    ranked : bool
        Each group's rows are in rank order already (best first, ties to the
        lower sample), as the compiled loops keep them: finalizing skips the sort.

    A named tuple of numpy arrays: it pickles, and dask moves it between
    tasks as it is.
    """

    k: int
    codes: np.ndarray
    counts: np.ndarray
    value: np.ndarray
    sample: np.ndarray
    position: np.ndarray
    ranked: bool = False

    @property
    def n_units(self) -> int:
        return self.value.shape[1]


def chunk_exemplars(x: np.ndarray, codes: np.ndarray, start: int, k: int) -> Exemplars:
    """Top and bottom ``k`` exemplars of each group present in a chunk.

    Parameters
    ----------
    x : ndarray, shape (n, *spatial, unit)
        Activations of ``n`` consecutive samples (float32 or float64); any
        number of spatial axes, including none. Not modified and not
        referenced by the result, so it may be a buffer reused afterwards.
    codes : ndarray of int, shape (n,)
        Each sample's group code, a small non-negative integer
        (:func:`inntrospect.analysis.nap_kernels.group_codes`).
    start : int
        Global index of the first sample: sample ``i`` of the chunk is
        ``start + i``.
    k : int
        How many exemplars to keep per group, unit and end.

    Returns
    -------
    Exemplars
        The groups present in the chunk, each with ``min(k, its samples)``
        candidates per unit and end.

    Notes
    -----
    The spatial maximum is taken a block of samples at a time, by halving
    the spatial axis (long contiguous inner loops: numpy's ``max(axis=1)`` is
    several times slower). Groups of at most ``k`` samples keep them all;
    larger ones are partitioned. The position of the maximum is searched
    only for the kept (sample, unit) pairs. Scratch memory is a few times
    the scores, ``n * unit`` values, plus :data:`BLOCK` bytes.
    """
    k = _check_k(k)
    x = np.asarray(x)
    if x.ndim < 2:
        raise ParameterError(
            f"x has shape {x.shape}; expected (sample, *spatial, unit), at least 2 axes: "
            "give a chunk of samples, e.g. x[None] for a single sample."
        )
    if x.dtype.kind != "f":
        raise ParameterTypeError(
            f"x has dtype {x.dtype}; expected float32 or float64 activations: convert with x.astype(np.float32)."
        )
    n, n_units = len(x), x.shape[-1]
    if n_units == 0:
        raise ParameterError(f"x has shape {x.shape}, no units: give activations with at least one unit on the last axis.")
    codes = np.asarray(codes)
    if codes.ndim != 1 or len(codes) != n:
        raise ParameterError(f"{n} samples but group codes of shape {codes.shape}: give one group code per sample, shape ({n},).")
    if n and codes.dtype.kind not in "iu":
        raise ParameterTypeError(f"group codes have dtype {codes.dtype}; expected integers: use nap_kernels.group_codes(labels).")
    if n and codes.min() < 0:
        raise ParameterError(f"group codes must be >= 0, got {codes.min()}: use nap_kernels.group_codes(labels).")
    if isinstance(start, (bool, np.bool_)) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ParameterError(
            f"start must be a non-negative integer (the global index of the chunk's first sample), got {start!r}."
        )
    spatial = int(np.prod(x.shape[1:-1], dtype=np.int64))
    if spatial > np.iinfo(np.int32).max:
        raise ParameterError(f"{spatial} spatial positions per unit; at most 2**31 - 1 are supported: split the spatial axes.")
    if n == 0:
        return _empty(k, n_units, x.dtype)

    x3 = x.reshape(n, spatial, n_units)
    score = x3[:, 0, :] if spatial == 1 else _spatial_max(x3)  # (n, unit)

    # samples sorted by group, stably: by sample index within a group
    order = None if np.all(codes[1:] >= codes[:-1]) else np.argsort(codes, kind="stable")
    sorted_codes = codes if order is None else codes[order]
    first = np.concatenate(([0], np.flatnonzero(sorted_codes[1:] != sorted_codes[:-1]) + 1))
    counts = np.diff(np.append(first, n))
    groups = sorted_codes[first].astype(np.int64)
    scores = _transpose(score, order)  # (unit, n): column j is the j-th sample in group order
    kept = np.minimum(counts, k)
    offsets = np.cumsum(kept) - kept

    columns = np.empty((2, n_units, int(kept.sum())), np.intp)  # the column of `scores` in each row
    small = counts <= k  # groups of at most k samples keep all, at both ends
    columns[:, :, np.flatnonzero(np.repeat(small, kept))] = np.flatnonzero(np.repeat(small, counts))
    for block in _blocks(counts, ~small):
        width = int(counts[block].max())
        at = np.arange(width)
        real = at < counts[block, None]  # (group, width): the rest is padding
        base = np.take(scores, np.where(real, first[block, None] + at, 0), axis=1)  # (unit, group, width)
        bits = _float_order(base) if base.dtype == np.float32 else None
        dest = (offsets[block, None] + np.arange(k)).reshape(-1)
        for end in (1, 0):  # bottom first: the top inverts `bits` in place
            pos = _select(base, at, real, k, top=end == 0, bits=bits, slots=True)  # (unit, group, k) within the group
            columns[end][:, dest] = (first[block, None] + pos).reshape(n_units, -1)

    units = np.arange(n_units)[:, None]
    value = np.take(scores.reshape(-1), columns + units * n)  # flat: 3 times faster than scores[units, columns]
    rows = columns if order is None else order[columns]
    position = np.zeros(rows.shape, np.int32)
    if spatial > 1:
        # each (sample, unit) pair once (small groups have the same at both ends), by sample: cache friendly
        pairs, inverse = np.unique(rows.astype(np.int64) * n_units + units, return_inverse=True)
        pos, val = np.empty(len(pairs), np.int32), np.empty(len(pairs), x.dtype)
        step = max(1, GATHER // spatial)
        for i in range(0, len(pairs), step):
            r, u = np.divmod(pairs[i : i + step], n_units)
            maps = x3[r, :, u]  # (pairs, spatial)
            p = maps.argmax(axis=1)
            pos[i : i + step] = p
            val[i : i + step] = maps[np.arange(len(p)), p]  # the activation there (equal to the score)
        position = pos[inverse].reshape(rows.shape)
        value = val[inverse].reshape(rows.shape)
    return Exemplars(k, groups, kept.astype(np.int64), value, rows.astype(np.int64) + int(start), position)


def merge_exemplars(*parts: Exemplars) -> Exemplars:
    """Merge partial exemplars of disjoint sets of samples (exact).

    Parameters
    ----------
    *parts : Exemplars
        One or more partial results (of :func:`chunk_exemplars` or of this
        function), all with the same ``k`` and number of units. Their groups
        may differ or overlap; their samples must not.

    Returns
    -------
    Exemplars
        For every group of any part, its ``k`` best candidates per unit and
        end among all parts. A single part is returned as it is.
    """
    if not parts:
        raise ParameterError("merge_exemplars got no partial result: give at least one.")
    shapes = {(p.k, p.n_units) for p in parts}
    if len(shapes) > 1:
        raise ParameterError(
            f"partial exemplars of different (k, units): {sorted(shapes)}; merge only partials "
            "of one layer computed with the same k."
        )
    if len(parts) == 1:
        return parts[0]
    k, n_units = parts[0].k, parts[0].n_units
    codes = np.concatenate([p.codes for p in parts])
    counts = np.concatenate([p.counts for p in parts])
    arrays = [np.concatenate([getattr(p, a) for p in parts], axis=2) for a in ("value", "sample", "position")]
    groups, inverse = np.unique(codes, return_inverse=True)
    by_group = np.argsort(np.repeat(inverse, counts), kind="stable")  # rows, grouped, groups in order
    if len(groups) == len(codes):  # no group in two parts: nothing to select
        return Exemplars(k, groups, counts[np.argsort(codes)], *(a[:, :, by_group] for a in arrays))

    total = np.bincount(inverse, weights=counts, minlength=len(groups)).astype(np.int64)
    first = np.cumsum(total) - total  # of each group in `by_group`
    kept = np.minimum(total, k)
    offsets = np.cumsum(kept) - kept
    out = [np.empty((2, n_units, int(kept.sum())), a.dtype) for a in arrays]
    small = total <= k  # groups of at most k candidates keep all
    src = by_group[np.flatnonzero(np.repeat(small, total))]
    dst = np.flatnonzero(np.repeat(small, kept))
    for o, a in zip(out, arrays):
        o[:, :, dst] = a[:, :, src]
    value, sample = arrays[:2]
    units = np.arange(n_units)[:, None] * value.shape[2]
    for block in _blocks(total, ~small):
        width = int(total[block].max())
        at = np.arange(width)
        real = at < total[block, None]
        rows = by_group[np.minimum(first[block, None] + at, len(by_group) - 1)]  # (group, width); padding: any row
        dest = (offsets[block, None] + np.arange(k)).reshape(-1)
        for end in range(2):
            pos = _select(np.take(value[end], rows, axis=1), np.take(sample[end], rows, axis=1), real, k, top=end == 0)
            src = rows[np.arange(len(block))[:, None], pos].reshape(n_units, -1) + units  # flat, (unit, group * k)
            for o, a in zip(out, arrays):
                o[end][:, dest] = np.take(a[end].reshape(-1), src)
    return Exemplars(k, groups, kept, *out)


def finalize_exemplars(part: Exemplars, n_groups: int, k: int, spatial_shape: tuple[int, ...], n_units: int):
    """Dense arrays of the ranked exemplars of every group.

    Parameters
    ----------
    part : Exemplars
        The merged partial result of all samples.
    n_groups : int
        Number of groups (codes are ``0 .. n_groups - 1``); groups without
        any sample get empty ranks.
    k : int
        As given to :func:`chunk_exemplars`.
    spatial_shape : tuple of int
        The layer's spatial axes (``()`` for a dense layer).
    n_units : int
        The layer's number of units.

    Returns
    -------
    sample : ndarray of int64, shape (2, n_groups, k, unit)
        Global sample indices; axis 0 is the end (0 top, 1 bottom), axis 2
        the rank. -1 where a group has fewer than ``k`` samples (or none).
    value : ndarray of float64, shape (2, n_groups, k, unit)
        The scores (the activations at ``position``); NaN where no sample.
    position : ndarray of int32, shape (2, n_groups, k, unit, len(spatial_shape))
        Spatial index of each score, one int per spatial axis; -1 where no
        sample. With no spatial axes the last axis has length 0 (always an
        array, never None).
    """
    k = _check_k(k)
    if (part.k, part.n_units) != (k, n_units):
        raise ParameterError(
            f"the partial exemplars have k={part.k} and {part.n_units} units, but k={k} and "
            f"n_units={n_units} were given: pass the k and layer shape the chunks were computed with."
        )
    if len(part.codes) and part.codes[-1] >= n_groups:
        raise ParameterError(
            f"group code {part.codes[-1]} but n_groups={n_groups}: pass the number of groups of the whole corpus."
        )
    spatial_shape = tuple(int(s) for s in spatial_shape)
    size = int(np.prod(spatial_shape, dtype=np.int64))
    if part.position.size and part.position.max() >= size:
        raise ParameterError(
            f"a position {part.position.max()} beyond spatial shape {spatial_shape}: pass the layer's "
            "spatial shape (activations' shape without the sample and unit axes)."
        )
    if part.ranked and len(part.codes) == n_groups and (part.counts == k).all():
        # every group full and in rank order (the compiled pass's usual result): rows are
        # (group, rank) in order, so the arrays are reshaped, not scattered
        def dense(a, dtype):  # (2, unit, group * k) -> (2, group, k, unit)
            return a.reshape(2, n_units, n_groups, k).transpose(0, 2, 3, 1).astype(dtype)

        flat = dense(part.position, np.int32)
        position = np.stack(np.unravel_index(flat, spatial_shape), axis=-1).astype(np.int32, copy=False) \
            if spatial_shape else np.empty((*flat.shape, 0), np.int32)
        return dense(part.sample, np.int64), dense(part.value, np.float64), position
    group = np.repeat(part.codes, part.counts)
    slot = np.arange(len(group)) - np.repeat(np.cumsum(part.counts) - part.counts, part.counts)
    real = np.zeros((n_groups, k), bool)
    real[part.codes] = np.arange(k) < part.counts[:, None]
    shape = (n_units, n_groups, k)
    sample = np.full((2, n_groups, k, n_units), -1, np.int64)
    value = np.full((2, n_groups, k, n_units), np.nan)
    position = np.full((2, n_groups, k, n_units, len(spatial_shape)), -1, np.int32)
    for end in range(2):
        v, s, p = np.zeros(shape, part.value.dtype), np.zeros(shape, np.int64), np.zeros(shape, np.int32)
        v[:, group, slot], s[:, group, slot], p[:, group, slot] = part.value[end], part.sample[end], part.position[end]
        if not part.ranked:
            rank = _rank(v, s, real, top=end == 0)
            v, s, p = (np.take_along_axis(a, rank, axis=-1) for a in (v, s, p))
        filled = real[:, :, None]
        sample[end] = np.where(filled, s.transpose(1, 2, 0), -1)
        value[end] = np.where(filled, v.transpose(1, 2, 0), np.nan)
        if spatial_shape:
            flat = p.transpose(1, 2, 0)
            position[end] = np.where(filled[..., None], np.stack(np.unravel_index(flat, spatial_shape), axis=-1), -1)
    return sample, value, position


class RunningExemplars:
    """Partial exemplars kept ranked by compiled loops (:mod:`inntrospect.analysis.compiled`):
    a task's chunks added one after the other (:meth:`add`), or partial results merged
    (:meth:`merge`); then an :class:`Exemplars` (:meth:`result`).

    ``codes`` are the group codes of all the samples to add (or of the parts
    to merge) and ``start`` the global index of the first; chunks must come in
    order. Each score costs two comparisons with the current ``k``-th best and
    worst of its group and unit once those are filled, so a pass runs at about
    the speed of reading the chunk. The state is ``k`` × units × groups per
    end. Results equal those of :func:`chunk_exemplars` and
    :func:`merge_exemplars`, bit for bit.
    """

    def __init__(self, kernels, codes: np.ndarray, start: int, k: int):
        self.kernels, self.k, self.start = kernels, _check_k(k), int(start)
        self.groups, index = np.unique(np.asarray(codes), return_inverse=True)
        self.index = index.reshape(-1).astype(np.intp)
        self.lo = 0
        self.state = self.queue = None
        self.running = None
        #: the groups (rows of the state) no sample was added to yet
        self.empty = np.ones(len(self.groups), bool)

    def _state(self, units: int, dtype, running: bool, spatial: bool = True) -> tuple:
        """The ranks (value, sample, position), counts and thresholds, made on first use.

        Adding chunks, the samples are kept relative to ``start`` in int32
        where the codes span fewer than 2**31 samples, and a layer without
        spatial axes keeps no positions (a view of one zero): the state of a
        wide layer is touched at each score ranked in, so its size is its speed.
        """
        if self.state is None:
            self.running = running
            shape = (2, len(self.groups), units, self.k)
            above = np.full(shape[1:3], -np.inf, dtype)
            small = running and len(self.index) < 2**31
            self.offset = 0 if small else self.start  # what the kernels are given as a sample's start
            position = np.zeros(shape, np.int32) if spatial or not running else \
                np.lib.stride_tricks.as_strided(np.zeros(1, np.int32), shape, (0,) * 4, writeable=True)
            self.state = (np.zeros(shape, dtype), np.zeros(shape, np.int32 if small else np.int64), position,
                          np.zeros((2, *shape[1:3]), np.int64), above, -above)
        return self.state

    def _queue(self, units: int, dtype) -> tuple:
        """The compiled pass's queue of scores that may enter (:data:`QUEUE`, and at least a
        sample's worth: one sample's scores always fit)."""
        size = max(QUEUE, units)
        return (np.empty(size, np.int64), np.empty(size, dtype), np.empty(size, np.int64),
                np.empty(size, np.int32))

    def add(self, x: np.ndarray, sums: np.ndarray | None = None, sums_index: np.ndarray | None = None) -> None:
        """The next chunk's activations ``(n, *spatial, unit)`` (not kept).

        With ``sums`` (float64, ``(groups, values per sample)``), each sample is
        also added to ``sums[sums_index[i]]``, in the same loop (the NAP pass's
        group sums, :func:`inntrospect.analysis.nap_kernels.add_sums`, bit for bit).
        """
        n, units = len(x), x.shape[-1]
        state = self._state(units, x.dtype, running=True, spatial=x.ndim > 2)
        if not self.running:
            raise ParameterError("chunks are added before any partial is merged, not after.")
        if self.queue is None or self.queue[1].dtype != x.dtype:
            self.queue = self._queue(units, x.dtype)
        x, rows = x.reshape(n, -1, units), self.index[self.lo : self.lo + n]
        if self.empty[rows].any():
            present = np.bincount(rows, minlength=len(self.groups))
            fill = np.flatnonzero(self.empty & (present >= self.k))
            if len(fill):  # groups whose first samples these are, k or more: filled from this chunk
                self.kernels.fill(x, rows, self.offset + self.lo, fill, *state)
                rows = np.where(np.isin(rows, fill), -1, rows)
            self.empty &= present == 0
        if sums is None:
            sums, sums_index = _NO_SUMS, _NO_INDEX
        self.kernels.top_bottom(x, rows, self.offset + self.lo, *state, *self.queue, sums, sums_index)
        self.lo += n

    def merge(self, part: Exemplars) -> None:
        """Rank the candidates of a partial result in (its groups must be among ``codes``)."""
        if part.k != self.k:
            raise ParameterError(f"a partial of k={part.k} merged into k={self.k}: merge partials of one k.")
        state = self._state(part.n_units, np.float64 if self.state is None else self.state[0].dtype,
                            running=False)
        if self.running:
            raise ParameterError("partials are merged into a RunningExemplars of merges only.")
        if part.ranked:  # each group's rows best first: merged list by list
            starts = np.concatenate(([0], np.cumsum(part.counts))).astype(np.intp)
            rows = np.searchsorted(self.groups, part.codes).astype(np.intp)
            self.kernels.merge_sorted(part.value, part.sample, part.position, starts, rows, *state[:4])
        else:
            rows = np.searchsorted(self.groups, np.repeat(part.codes, part.counts)).astype(np.intp)
            self.kernels.merge_ranked(part.value, part.sample, part.position, rows, *state[:4])

    def result(self) -> Exemplars:
        if self.state is None:
            raise ParameterError("nothing was added: add a chunk or merge a partial first.")
        value, sample, position, count = self.state[:4]
        counts = count[0, :, 0].astype(np.int64)  # every unit of a group saw the same samples
        keep = (np.arange(self.k)[None, :] < counts[:, None]).reshape(-1)  # (group, rank), flattened
        every = bool(keep.all())  # each group full (usual): one copy per array, no selection

        def rows(a, dtype=None):  # (2, group, unit, k) -> (2, unit, rows of the groups one after the other)
            out = np.empty((2, a.shape[2], a.shape[1] * a.shape[3]), dtype or a.dtype)  # never a view
            out.reshape(2, a.shape[2], a.shape[1], a.shape[3])[...] = a.transpose(0, 2, 1, 3)
            return out if every else out[:, :, keep]

        first = self.start - self.offset if self.running else 0  # samples kept relative to it
        samples = rows(sample, np.int64)
        if first:
            samples += first
        return Exemplars(self.k, self.groups.astype(np.int64), counts, rows(value), samples, rows(position),
                         ranked=True)


def merge_compiled(kernels, *parts: Exemplars) -> Exemplars:
    """:func:`merge_exemplars` by the compiled loops (the same result, in float64)."""
    if len(parts) == 1:
        return parts[0]
    if all(p.ranked for p in parts):  # the usual case: a linear merge, two at a time
        merged = parts[0]
        for part in parts[1:]:
            merged = _merge_two(kernels, merged, part)
        return merged
    running = RunningExemplars(kernels, np.concatenate([p.codes for p in parts]), 0, parts[0].k)
    for part in parts:
        running.merge(part)
    return running.result()


def _merge_two(kernels, a: Exemplars, b: Exemplars) -> Exemplars:
    """Two ranked partials merged straight into the layout of the result (:func:`compiled.merge_two`)."""
    if a.k != b.k:
        raise ParameterError(f"a partial of k={b.k} merged into k={a.k}: merge partials of one k.")
    codes = np.union1d(a.codes, b.codes)

    def lists(part: Exemplars) -> tuple[np.ndarray, np.ndarray]:  # each merged group's rows in part
        start, count = np.zeros(len(codes), np.intp), np.zeros(len(codes), np.intp)
        at = np.searchsorted(codes, part.codes)
        count[at] = part.counts
        start[at] = np.concatenate(([0], np.cumsum(part.counts)[:-1]))
        return start, count

    (astart, acount), (bstart, bcount) = lists(a), lists(b)
    counts = np.minimum(acount + bcount, a.k)
    ostart = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.intp)
    shape = (2, a.value.shape[1], int(counts.sum()))
    out = (np.empty(shape, np.float64), np.empty(shape, np.int64), np.empty(shape, np.int32))
    kernels.merge_two(a.value, a.sample, a.position, astart, acount, b.value, b.sample, b.position,
                      bstart, bcount, ostart, counts, *out)
    return Exemplars(a.k, codes.astype(np.int64), counts.astype(np.int64), *out, ranked=True)


def _check_k(k) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise ParameterTypeError(f"k must be a positive integer (exemplars per group and unit), got {k!r}.")
    if k < 1:
        raise ParameterError(f"k must be a positive integer (exemplars per group and unit), got {k}: use k >= 1.")
    return int(k)


def _empty(k: int, n_units: int, dtype) -> Exemplars:
    shape = (2, n_units, 0)
    none = np.empty(0, np.int64)
    return Exemplars(k, none, none, np.empty(shape, dtype), np.empty(shape, np.int64), np.empty(shape, np.int32))


def _spatial_max(x3: np.ndarray) -> np.ndarray:
    """``x3.max(axis=1)`` of ``(n, spatial, unit)``, by halving the spatial axis, a block of samples at a time."""
    n, size, n_units = x3.shape
    out = np.empty((n, n_units), x3.dtype)
    rows = max(1, BLOCK // (size * n_units * x3.itemsize))
    half = size // 2
    buf = np.empty((min(rows, n), half, n_units), x3.dtype)
    for i in range(0, n, rows):
        v = x3[i : i + rows]
        b = buf[: len(v)]
        np.maximum(v[:, :half], v[:, half : 2 * half], out=b)
        if size % 2:
            np.maximum(b[:, 0], v[:, -1], out=b[:, 0])
        s = half
        while s > 1:
            h = s // 2
            np.maximum(b[:, :h], b[:, h : 2 * h], out=b[:, :h])
            if s % 2:
                np.maximum(b[:, 0], b[:, s - 1], out=b[:, 0])
            s = h
        out[i : i + rows] = b[:, 0]
    return out


def _transpose(score: np.ndarray, order: np.ndarray | None) -> np.ndarray:
    """``score[order].T``, contiguous, in strips of rows (several times faster than numpy's transposing copy)."""
    n, n_units = score.shape
    out = np.empty((n_units, n), score.dtype)
    for i in range(0, n, 16):
        out[:, i : i + 16] = (score[i : i + 16] if order is None else score[order[i : i + 16]]).T
    return out


def _blocks(sizes: np.ndarray, chosen: np.ndarray) -> list[np.ndarray]:
    """The chosen groups by size class (``2**j`` to ``2**(j+1) - 1``): padding to the largest wastes less than half."""
    cls = np.floor(np.log2(np.maximum(sizes, 1))).astype(np.int64)
    return [np.flatnonzero(chosen & (cls == c)) for c in np.unique(cls[chosen])]


def _keys(value, tie, real, top: bool, bits=None):
    """One uint64 per value, in the order of (value, tie), padding last; None unless float32 and ties below 2**32.

    ``value`` is ``(unit, group, width)``, ``tie`` non-negative integers
    broadcasting to it, ``real`` (group, width) False on padding. ``bits``,
    if given, are :func:`_float_order` of ``value``; for the top they are
    inverted in place.
    """
    if value.dtype != np.float32 or (tie.size and tie.max() >= 2**32):
        return None
    bits = _float_order(value) if bits is None else bits
    if top:
        np.invert(bits, out=bits)  # highest value first
    key = np.empty(value.shape, np.uint64)
    halves = key.view(np.uint32).reshape(*value.shape, 2)  # written directly: no shift
    halves[..., _HIGH] = bits
    halves[..., 1 - _HIGH] = tie
    if not real.all():
        key[:, ~real] = ~np.uint64(0)
    return key


def _select(value, tie, real, k: int, top: bool, bits=None, slots: bool = False) -> np.ndarray:
    """Positions along the last axis of the ``k`` best values, ties to the lowest ``tie``, in no order.

    ``value`` is ``(unit, group, width)``, every group with more than ``k``
    real values; ``tie`` broadcasts to it, with non-negative integers
    distinct along the last axis: sample indices, or (``slots``) the
    positions themselves. Returns ``(unit, group, k)``.
    """
    key = _keys(value, tie, real, top, bits)
    if key is None:
        return _rank(value, tie, real, top)[..., :k]
    if slots:  # the low half of the k lowest keys is their position
        key.partition(k - 1, axis=-1)
        return (key[..., :k] & _LOW).astype(np.intp)
    return np.argpartition(key, k - 1, axis=-1)[..., :k]  # exact: keys are distinct


def _rank(value, tie, real, top: bool) -> np.ndarray:
    """Argsort along the last axis: best value first, ties to the lowest ``tie``, padding last."""
    key = _keys(value, tie, real, top)
    if key is not None:
        return np.argsort(key, axis=-1)
    key = np.where(real, -value if top else value, np.inf).astype(np.float64, copy=False)
    last = int(tie.max(initial=0)) + 1
    tie = np.broadcast_to(np.where(real, tie, last + np.arange(key.shape[-1])), key.shape)  # padding after any tie
    return _order(key, tie)


def _float_order(value: np.ndarray) -> np.ndarray:
    """float32 as uint32 in the same order (-0 and 0 equal, as numpy compares them)."""
    signed = np.add(value, np.float32(0)).view(np.int32)  # -0 + 0 is 0
    flip = signed >> np.int32(31)  # negative: flip all bits (-1); else only the sign bit
    flip |= np.int32(-(2**31))
    flip ^= signed
    return flip.view(np.uint32)


def _order(key: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Argsort along the last axis by ``key``, then ``tie`` (non-negative integers, distinct along that axis)."""
    order = np.argsort(key, axis=-1)
    sorted_key = np.take_along_axis(key, order, axis=-1)
    new = sorted_key[..., 1:] != sorted_key[..., :-1]
    if new.all():
        return order
    # ties: sort again by (run of equal keys, tie), as one integer
    sorted_tie = np.take_along_axis(tie, order, axis=-1).astype(np.int64)
    base = int(sorted_tie.max()) + 1
    if key.shape[-1] * base >= 2**62:  # never for sample indices below 2**40
        return np.lexsort((tie, key), axis=-1)
    run = np.zeros(key.shape, np.int64)
    np.cumsum(new, axis=-1, out=run[..., 1:])
    run *= base
    run += sorted_tie
    return np.take_along_axis(order, np.argsort(run, axis=-1), axis=-1)
