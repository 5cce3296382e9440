"""Compiled loops (numba, which umap-learn brings): the NAP pass and the graph layout.

Plain-Python definitions, compiled on first use with the GIL released and
cached on disk; :func:`kernels` returns them, or None without numba (or with
``INNTROSPECT_NUMBA=0``), and :mod:`inntrospect.analysis.profiles` and
:mod:`inntrospect.topomap.layout` then use their numpy kernels. The tests
run both ways.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

#: ``numba.prange`` once compiled (set by :class:`_Compiled`); a plain range for the Python definition
prange = range

__all__ = ["kernels", "group_sums", "group_m2", "shifted_sums", "insert", "top_bottom", "rank_queued", "fill", "merge_ranked", "merge_sorted",
           "merge_two", "fr_displacement"]


def group_sums(x, index, sums):  # pragma: no cover - compiled by numba
    """``sums[index[i]] += x[i]`` for every sample, in float64."""
    n, m = x.shape
    for i in range(n):
        g = index[i]
        for j in range(m):
            sums[g, j] += x[i, j]


def group_m2(x, index, mean, m2):  # pragma: no cover - compiled by numba
    """``m2[index[i]] += (x[i] - mean[index[i]])**2`` for every sample, in float64."""
    n, m = x.shape
    for i in range(n):
        g = index[i]
        for j in range(m):
            dev = x[i, j] - mean[g, j]
            m2[g, j] += dev * dev


def shifted_sums(x, index, d, units, sums):  # pragma: no cover - compiled by numba
    """Aligned group sums: ``sums[g][p] += x[i][p + d[i]]`` where ``p + d[i]`` is inside.

    ``x`` is ``(n, Z, Y, X * units)`` (1 or 2 spatial axes padded with leading
    ones), ``d`` the ``(z, y, x)`` shift of each sample, ``sums`` ``(groups, Z, Y, X * units)``.
    """
    n, nz, ny, nxu = x.shape
    nx = nxu // units
    for i in range(n):
        g = index[i]
        dz, dy, dx = d[i, 0], d[i, 1], d[i, 2]
        z0, z1 = max(0, -dz), min(nz, nz - dz)
        y0, y1 = max(0, -dy), min(ny, ny - dy)
        x0, x1 = max(0, -dx), min(nx, nx - dx)
        if z0 >= z1 or y0 >= y1 or x0 >= x1:
            continue
        lo, width = x0 * units, (x1 - x0) * units
        src_lo = lo + dx * units
        for z in range(z0, z1):
            for y in range(y0, y1):
                dst = sums[g, z, y, lo : lo + width]  # slices, not index arithmetic: vectorised
                src = x[i, z + dz, y + dy, src_lo : src_lo + width]
                for k in range(width):
                    dst[k] += src[k]


def fr_displacement(pos, indptr, indices, k, disp):  # pragma: no cover - compiled by numba
    """Fruchterman–Reingold forces on every point: repulsion from all, attraction along edges.

    ``disp[i] = sum_j (p_i - p_j) * (k² / d_ij² - a_ij d_ij / k)`` with
    ``d_ij = max(|p_i - p_j|, 0.01)`` and the edges ``a`` in CSR form
    (``indptr``, ``indices``). Rows run in parallel; each writes only its own.
    """
    n = pos.shape[0]
    k2 = k * k
    for i in prange(n):
        xi, yi = pos[i, 0], pos[i, 1]
        sx, sy = 0.0, 0.0
        for j in range(n):
            dx, dy = xi - pos[j, 0], yi - pos[j, 1]
            d2 = max(dx * dx + dy * dy, 1e-4)
            f = k2 / d2
            sx += dx * f
            sy += dy * f
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            dx, dy = xi - pos[j, 0], yi - pos[j, 1]
            f = -max(math.sqrt(dx * dx + dy * dy), 0.01) / k
            sx += dx * f
            sy += dy * f
        disp[i, 0] = sx
        disp[i, 1] = sy


def insert(value, sample, position, count, end, g, u, v, ident, where):  # pragma: no cover
    """Put ``(v, ident, where)`` at its rank in ``value[end, g, u]`` if it enters the best ``k``.

    Ranks are kept sorted: end 0 (top) by value descending, end 1 (bottom)
    ascending, ties by the lower ``ident`` (sample index); ``count[end, g, u]``
    ranks are filled. Returns whether it entered; when full, the last rank is dropped.
    """
    k = value.shape[3]
    c = count[end, g, u]
    j = min(c, k - 1)
    if c >= k:  # full: it must beat the k-th
        w = value[end, g, u, k - 1]
        if not ((v > w if end == 0 else v < w) or (v == w and ident < sample[end, g, u, k - 1])):
            return False
    while j > 0:
        w = value[end, g, u, j - 1]
        if not ((v > w if end == 0 else v < w) or (v == w and ident < sample[end, g, u, j - 1])):
            break
        value[end, g, u, j] = w
        sample[end, g, u, j] = sample[end, g, u, j - 1]
        position[end, g, u, j] = position[end, g, u, j - 1]
        j -= 1
    value[end, g, u, j] = v
    sample[end, g, u, j] = ident
    position[end, g, u, j] = where
    if c < k:
        count[end, g, u] = c + 1
    return True


def top_bottom(x, index, start, value, sample, position, count, above, below, key, score, ident,
               where, sums, sums_index):  # pragma: no cover - compiled by numba
    """Add the samples of ``x`` into each group's running top and bottom ``k`` per unit.

    ``x`` is ``(n, spatial, unit)``; a sample's score for a unit is its maximum
    over the spatial positions (its first position in C order); ``index`` the
    sample's row of the state, ``start`` the global index of ``x[0]``. The
    state, per group row ``g`` and unit ``u``: ``value``, ``sample`` and
    ``position`` ``(2, g, u, k)`` and ``count`` ``(2, g, u)`` (:func:`insert`),
    and the thresholds a score must pass to enter once full, ``above`` (the
    top's k-th, else -inf) and ``below`` (the bottom's k-th, else +inf),
    ``(g, u)``. Each score is compared with its thresholds in a branch-free
    loop; those that pass are queued in ``key`` (``g * units + u``),
    ``score``, ``ident`` and ``where`` and ranked in (:func:`rank_queued`)
    when the queue is full and at the end, sorted by group and unit: the
    state (megabytes for wide layers) is then walked in order rather than
    hit at random, a cache miss per score. Samples come in increasing index
    order, and the sort is stable, so ties go to the lower index. Samples
    whose ``index`` is negative are skipped (their group was filled: :func:`fill`).

    ``sums`` (float64, ``(groups, size * units)``; empty for none) also gets
    each sample added to its row ``sums_index[i]``, as :func:`group_sums`
    adds it, while the sample is in the cache: the NAP pass and the
    exemplars then read a chunk from memory once.
    """
    n, size, units = x.shape
    add = sums.shape[0] > 0
    best = np.empty(units, x.dtype)
    words = (units + 7) // 8
    enter = np.zeros(words * 8, np.uint8)  # padded to whole words, the padding never set
    flags = enter.view(np.uint64)  # eight units at a time: the few that pass are found word by word
    m = 0
    for i in range(n):
        if add:  # as group_sums: one flat, vectorised loop
            flat, into = x[i].reshape(size * units), sums[sums_index[i]]
            for j in range(size * units):
                into[j] += flat[j]
        g = index[i]
        if g < 0:
            continue
        maxima = x[i, 0]  # no spatial axes: the activations themselves
        if size > 1:
            best[:] = x[i, 0]
            for p in range(1, size):  # the spatial maximum, vectorised; where it is, below, if needed
                row = x[i, p]
                for u in range(units):
                    v = row[u]
                    best[u] = v if v > best[u] else best[u]  # as max(best[u], v); 20 % faster compiled
            maxima = best
        top, bottom = above[g], below[g]
        hits = 0
        for u in range(units):  # branch-free, vectorised: which units may take this sample
            enter[u] = (maxima[u] > top[u]) | (maxima[u] < bottom[u])
            hits += enter[u]
        if hits == 0:
            continue
        if m + hits > len(key):
            rank_queued(m, key, score, ident, where, value, sample, position, count, above, below)
            m = 0
        # queued in unit order; a unit's flag is tested only in the words holding one (a test per
        # unit mispredicts at every unit that passes: in a wide layer that was most of the time)
        for w in range(words):
            if flags[w] == 0:
                continue
            for u in range(8 * w, 8 * w + 8):
                if enter[u]:
                    p = 0
                    if size > 1:  # the first position of the maximum, for the units that may take it only
                        while x[i, p, u] != maxima[u]:
                            p += 1
                    key[m] = g * units + u
                    score[m] = maxima[u]
                    ident[m] = start + i
                    where[m] = p
                    m += 1
    rank_queued(m, key, score, ident, where, value, sample, position, count, above, below)


def rank_queued(m, key, score, ident, where, value, sample, position, count, above, below):  # pragma: no cover
    """Rank the first ``m`` queued scores of :func:`top_bottom` in, by group and unit (stable)."""
    units = above.shape[1]
    # a stable counting sort by key (group * units + unit): linear, and the queue stays in sample order
    lo, hi = key[0] if m else 0, key[0] if m else 0
    for j in range(m):
        lo, hi = min(lo, key[j]), max(hi, key[j])
    starts = np.zeros(hi - lo + 2, np.int64)
    for j in range(m):
        starts[key[j] - lo + 1] += 1
    for b in range(1, len(starts)):
        starts[b] += starts[b - 1]
    # the scores themselves moved into bucket order: the ranking below then reads them in order
    # (through an index, a cache miss per score once the queue outgrows the cache: a wide layer's)
    by_key, ident_by_key, where_by_key = np.empty(m, score.dtype), np.empty(m, ident.dtype), np.empty(m, where.dtype)
    for j in range(m):
        b = key[j] - lo
        d = starts[b]
        by_key[d], ident_by_key[d], where_by_key[d] = score[j], ident[j], where[j]
        starts[b] = d + 1  # then the end of bucket b
    # The buckets in key order, group and unit stepped along (a division per score cost as much as
    # ranking it). Each score is ranked in at both ends where it passes the thresholds (insert's
    # ranks), the thresholds moved once an end is full. Written out here rather than calling insert:
    # a compiled call handed the state's arrays counts their references at every score, even inlined,
    # ~60 ns, ten times the ranking itself (fill writes its ranking out for the same reason).
    k = value.shape[3]
    g, u, t = lo // units, lo % units, 0
    for b in range(hi - lo + 1):
        while t < starts[b]:
            v, me, at = by_key[t], ident_by_key[t], where_by_key[t]
            for end in range(2):
                if not (v > above[g, u] if end == 0 else v < below[g, u]):
                    continue
                c = count[end, g, u]
                i = min(c, k - 1)
                if c >= k:  # full: it must beat the k-th (ties: the lower sample)
                    w = value[end, g, u, k - 1]
                    if not ((v > w if end == 0 else v < w) or (v == w and me < sample[end, g, u, k - 1])):
                        continue
                while i > 0:
                    w = value[end, g, u, i - 1]
                    if not ((v > w if end == 0 else v < w) or (v == w and me < sample[end, g, u, i - 1])):
                        break
                    value[end, g, u, i] = w
                    sample[end, g, u, i] = sample[end, g, u, i - 1]
                    position[end, g, u, i] = position[end, g, u, i - 1]
                    i -= 1
                value[end, g, u, i] = v
                sample[end, g, u, i] = me
                position[end, g, u, i] = at
                if c < k:
                    count[end, g, u] = c + 1
                if c + 1 >= k:  # full: the threshold is the k-th
                    if end == 0:
                        above[g, u] = value[0, g, u, k - 1]
                    else:
                        below[g, u] = value[1, g, u, k - 1]
            t += 1
        u += 1
        if u == units:
            u = 0
            g += 1


def fill(x, index, start, groups, value, sample, position, count, above, below):  # pragma: no cover
    """Fill the empty ends of the state rows ``groups`` from the chunk ``x`` alone (a task's first chunk).

    The state is :func:`top_bottom`'s; each of ``groups`` has no score yet and at
    least ``k`` samples in ``x`` (rows where ``index`` is the group). Per unit,
    its scores (spatial maxima, at their first position) are ranked into a
    small sorted list while they sit in a cache-sized tile, each compared
    with the list's last entry first: about ``k (1 + ln(n / k))`` insertions
    per unit and end, against one per score through the queue of
    :func:`top_bottom`, which then skips these samples. The same ranks as
    :func:`insert` would give (samples in order, ties to the lower); the
    thresholds are set as when an end fills.
    """
    n, size, units = x.shape
    k = value.shape[3]
    tile = 64
    for g in groups:
        rows = np.flatnonzero(index == g)
        m = len(rows)
        tv = np.empty((tile, m), x.dtype)  # a unit's scores contiguous
        tp = np.zeros((tile, m), np.int32)
        for u0 in range(0, units, tile):
            w = min(tile, units - u0)
            for r in range(m):
                i = rows[r]
                for j in range(w):
                    tv[j, r] = x[i, 0, u0 + j]
                    tp[j, r] = 0
                for p in range(1, size):
                    for j in range(w):
                        v = x[i, p, u0 + j]
                        if v > tv[j, r]:
                            tv[j, r] = v
                            tp[j, r] = p
            for j in range(w):
                u = u0 + j
                for end in range(2):
                    c = 0
                    for r in range(m):
                        v = tv[j, r]
                        if c == k:
                            last = value[end, g, u, k - 1]
                            if not (v > last if end == 0 else v < last):
                                continue
                            at = k - 1
                        else:
                            at = c
                            c += 1
                        while at > 0:
                            prev = value[end, g, u, at - 1]
                            if not (v > prev if end == 0 else v < prev):
                                break
                            value[end, g, u, at] = prev
                            sample[end, g, u, at] = sample[end, g, u, at - 1]
                            position[end, g, u, at] = position[end, g, u, at - 1]
                            at -= 1
                        value[end, g, u, at] = v
                        sample[end, g, u, at] = start + rows[r]
                        position[end, g, u, at] = tp[j, r]
                    count[end, g, u] = c
                above[g, u] = value[0, g, u, k - 1]
                below[g, u] = value[1, g, u, k - 1]


def merge_ranked(cvalue, csample, cposition, crow, value, sample, position, count):  # pragma: no cover
    """Add candidates ``(2, unit, row)`` (row ``r`` of state group ``crow[r]``) into the state of
    :func:`top_bottom` by :func:`insert`: the merge of partial results, exact in any order."""
    units, rows = cvalue.shape[1], cvalue.shape[2]
    for end in range(2):
        for u in range(units):
            for r in range(rows):
                insert(value, sample, position, count, end, crow[r], u, cvalue[end, u, r],
                       csample[end, u, r], cposition[end, u, r])


def merge_sorted(cvalue, csample, cposition, starts, crow, value, sample, position, count):  # pragma: no cover
    """:func:`merge_ranked` for candidates already ranked (``Exemplars.ranked``): a linear merge.

    The rows ``starts[i]`` to ``starts[i + 1]`` of the candidates ``(2, unit,
    row)`` are state group ``crow[i]``'s, best first; each unit's two ranked
    lists (the state's and the candidates') are merged into the best ``k``,
    ties to the lower sample, as :func:`insert` would rank them one by one.
    """
    units = cvalue.shape[1]
    k = value.shape[3]
    tv = np.empty(k, value.dtype)
    ts = np.empty(k, sample.dtype)
    tp = np.empty(k, position.dtype)
    for end in range(2):
        for i in range(len(crow)):
            g, a, b = crow[i], starts[i], starts[i + 1]
            for u in range(units):
                c = count[end, g, u]
                p, q, m = 0, a, 0
                while m < k and (p < c or q < b):
                    take = q < b
                    if take and p < c:
                        v, w = cvalue[end, u, q], value[end, g, u, p]
                        take = (v > w if end == 0 else v < w) or (v == w and csample[end, u, q] < sample[end, g, u, p])
                    if take:
                        tv[m], ts[m], tp[m] = cvalue[end, u, q], csample[end, u, q], cposition[end, u, q]
                        q += 1
                    else:
                        tv[m], ts[m], tp[m] = value[end, g, u, p], sample[end, g, u, p], position[end, g, u, p]
                        p += 1
                    m += 1
                for j in range(m):
                    value[end, g, u, j] = tv[j]
                    sample[end, g, u, j] = ts[j]
                    position[end, g, u, j] = tp[j]
                count[end, g, u] = m


def merge_two(av, asample, aposition, astart, acount, bv, bsample, bposition, bstart, bcount,
              ostart, ocount, value, sample, position):  # pragma: no cover - compiled by numba
    """Two ranked partial results ``(2, unit, row)`` merged into a third of the same layout.

    For each of the merged groups ``j``, rows ``astart[j]`` (``acount[j]`` of
    them) of a and ``bstart[j]`` of b hold its lists, best first; the best
    ``ocount[j]`` of both go to rows ``ostart[j]`` of the output, ties to the
    lower sample: what :func:`merge_sorted` gives merging b into a's state,
    without the state (or the copies into and out of it).
    """
    units = value.shape[1]
    for end in range(2):
        for u in range(units):
            for j in range(len(ostart)):
                p, p_end = astart[j], astart[j] + acount[j]
                q, q_end = bstart[j], bstart[j] + bcount[j]
                o = ostart[j]
                for m in range(ocount[j]):
                    take = q < q_end
                    if take and p < p_end:
                        v, w = bv[end, u, q], av[end, u, p]
                        take = (v > w if end == 0 else v < w) or (v == w and bsample[end, u, q] < asample[end, u, p])
                    if take:
                        value[end, u, o + m] = bv[end, u, q]
                        sample[end, u, o + m] = bsample[end, u, q]
                        position[end, u, o + m] = bposition[end, u, q]
                        q += 1
                    else:
                        value[end, u, o + m] = av[end, u, p]
                        sample[end, u, o + m] = asample[end, u, p]
                        position[end, u, o + m] = aposition[end, u, p]
                        p += 1


KERNELS: list = []
_KERNELS_LOCK = threading.Lock()


class _Compiled:
    """The kernels, compiled on first use (cached on disk where numba can write; GIL released)."""

    def __init__(self, numba):
        def jit(fn):
            try:
                return numba.njit(nogil=True, cache=True)(fn)
            except RuntimeError:  # no writable cache location: compile in each process
                return numba.njit(nogil=True)(fn)

        self.group_sums = jit(group_sums)
        self.group_m2 = jit(group_m2)
        self.shifted_sums = jit(shifted_sums)
        # called by those below, compiled first (and into merge_ranked: a call handed arrays counts
        # their references, several times the cost of ranking a score in)
        globals()["insert"] = numba.njit(nogil=True, inline="always")(insert)
        globals()["rank_queued"] = jit(rank_queued)
        self.top_bottom = jit(top_bottom)
        self.merge_ranked = jit(merge_ranked)
        self.merge_sorted = jit(merge_sorted)
        self.merge_two = jit(merge_two)
        self.fill = jit(fill)
        globals()["prange"] = numba.prange
        try:
            self.fr_displacement = numba.njit(parallel=True, cache=True)(fr_displacement)
        except RuntimeError:  # no writable cache location
            self.fr_displacement = numba.njit(parallel=True)(fr_displacement)


def kernels():
    """The compiled kernels, or None without numba (or with ``INNTROSPECT_NUMBA=0``): numpy then."""
    if not KERNELS:
        with _KERNELS_LOCK:
            if not KERNELS:
                compiled = None
                if os.environ.get("INNTROSPECT_NUMBA", "1") != "0":
                    try:
                        import numba
                    except ImportError:  # pragma: no cover - umap-learn depends on numba
                        numba = None
                    compiled = _Compiled(numba) if numba is not None else None
                KERNELS.append(compiled)
    return KERNELS[0]
