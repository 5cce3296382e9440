"""Per-unit significance of a contrast, from the moments the NAP pass merges (no second read).

For each group against all other samples pooled, per unit (and spatial
position): Welch's t, its two-sided p-value, Benjamini–Hochberg q-values
across the layer's units and positions, and Hedges' g. The inputs are each
group's count, mean and M2 (sum of squared deviations from its mean), as
:func:`~inntrospect.analysis.nap_kernels.finalize_moments` gives them; the
rest's moments are merged exactly from the other groups' (Chan et al.'s
pairwise update), never recomputed from samples.

Pure numpy (and ``scipy.special`` for the t distribution, which the larger
arrays evaluate on two threads): the kernels here
take arrays ``(group, ...)`` and return arrays of the same shape.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError

__all__ = ["merge_pair", "rest_moments", "welch", "hedges_g", "bh_qvalues", "contrast_statistics"]


def merge_pair(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Count, mean and M2 of two disjoint sets of samples from theirs (exact, order-free)."""
    n = n_a + n_b
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = mean_b - mean_a
        frac = np.where(n > 0, n_b / np.where(n > 0, n, 1), 0.0)
        mean = mean_a + delta * frac
        m2 = m2_a + m2_b + delta**2 * n_a * frac
    return n, mean, m2


def rest_moments(count, mean, m2):
    """For each group, the moments of all the other groups' samples pooled.

    ``count`` is ``(group,)``; ``mean`` and ``m2`` are ``(group, ...)``. Returns
    ``(count, mean, m2)`` of the same shapes.
    """
    count = np.asarray(count, dtype=np.float64)
    mean, m2 = np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)
    if count.ndim != 1 or mean.shape[0] != len(count) or m2.shape != mean.shape:
        raise ParameterError(f"expected count (group,) and mean, m2 (group, ...) of one shape; got "
                             f"{count.shape}, {mean.shape} and {m2.shape}.")
    # prefix[g] pools groups < g, suffix[g] groups > g: O(groups) exact merges, no subtraction
    shape = mean.shape[1:]
    G = len(count)
    suffix = [(0.0, np.zeros(shape), np.zeros(shape))]
    for g in range(G - 1, 0, -1):
        suffix.append(merge_pair(count[g], mean[g], m2[g], *suffix[-1]))
    suffix.reverse()  # suffix[g]: the groups after g
    n_r, mean_r, m2_r = np.empty(G), np.empty_like(mean), np.empty_like(m2)
    prefix = (0.0, np.zeros(shape), np.zeros(shape))
    for g in range(G):
        n_r[g], mean_r[g], m2_r[g] = merge_pair(*prefix, *suffix[g])
        prefix = merge_pair(*prefix, count[g], mean[g], m2[g])
    return n_r, mean_r, m2_r


def contrast_statistics(count, mean, m2) -> dict[str, np.ndarray]:
    """Each group against all other samples pooled: ``t``, ``p``, ``q``, ``effect`` and ``rest_count``.

    ``count`` is ``(group,)``, ``mean`` and ``m2`` ``(group, *spatial, unit)``
    (the moments of *every* group of the store). ``t`` and ``p`` are Welch's,
    ``q`` the Benjamini–Hochberg q-values of each group across its units and
    positions, ``effect`` Hedges' g; all ``(group, *spatial, unit)`` float64.
    A group with fewer than two samples, or whose rest has fewer, gets NaN
    (and stays out of the q-values' count). Arrays of :data:`SPLIT` values
    or more are computed on two threads, half of the groups each (every
    statistic is a group's own: the results are the same).
    """
    count = np.asarray(count, dtype=np.float64)
    n_r, mean_r, m2_r = rest_moments(count, mean, m2)
    mean = np.asarray(mean, dtype=np.float64)
    m2 = np.asarray(m2, dtype=np.float64)
    ok = (count >= 2) & (n_r >= 2)
    out = {k: np.empty(mean.shape) for k in ("t", "p", "q", "effect")}

    def groups(rows: slice, split: bool = False) -> None:
        t, p, effect, good = out["t"][rows], out["p"][rows], out["effect"][rows], ok[rows]
        moments = (count[rows], mean[rows], m2[rows], n_r[rows], mean_r[rows], m2_r[rows])
        if good.all():  # the usual case: no masked copies
            t[...], _, p[...] = _welch(*moments, split=split)
            effect[...] = hedges_g(*moments)
        else:
            for a in (t, p, effect):
                a[...] = np.nan
            if good.any():
                some = [a[good] for a in moments]
                t[good], _, p[good] = _welch(*some, split=split)
                effect[good] = hedges_g(*some)
        out["q"][rows] = bh_qvalues(p)

    G = len(count)
    if mean.size < SPLIT or G < 2:
        groups(slice(0, G), split=True)  # the t distribution alone on two threads, if large
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(groups, (slice(0, G // 2), slice(G // 2, G))))
    return {**out, "rest_count": n_r.astype(np.int64)}


def welch(n_a, mean_a, m2_a, n_b, mean_b, m2_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Welch's t of set a against set b, its degrees of freedom and two-sided p-value.

    Each set needs at least two samples. Where both variances are zero the t
    is NaN (equal means) or infinite, as ``scipy.stats.ttest_ind`` gives them.
    """
    return _welch(n_a, mean_a, m2_a, n_b, mean_b, m2_b, split=True)


def _welch(n_a, mean_a, m2_a, n_b, mean_b, m2_b, split: bool):
    """:func:`welch`; ``split``: the t distribution of large arrays evaluated on two threads."""
    n_a, n_b = _counts(n_a, mean_a), _counts(n_b, mean_b)
    if np.any(n_a < 2) or np.any(n_b < 2):
        raise ParameterError("Welch's t needs at least two samples in each set; a group (or the "
                             "rest) has fewer. Leave such groups out of the contrast.")
    with np.errstate(invalid="ignore", divide="ignore"):
        va, vb = m2_a / (n_a - 1) / n_a, m2_b / (n_b - 1) / n_b  # squared standard errors
        se2 = va + vb
        t = (mean_a - mean_b) / np.sqrt(se2)
        df = se2**2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
        p = _two_sided(df, t, split)
    return t, df, p


#: below this many values the statistics (and the t distribution) are computed on one thread
SPLIT = 1 << 14


def _two_sided(df: np.ndarray, t: np.ndarray, split: bool = True) -> np.ndarray:
    """``2 * stdtr(df, -|t|)``: Student's t distribution (``scipy.special``, exact to the last digits),
    on two threads for large arrays unless not ``split`` (about 150 ns a value; it runs without the GIL)."""
    from scipy.special import stdtr

    df, t = np.broadcast_arrays(df, t)
    if df.size < SPLIT or not split:
        return 2 * stdtr(df, -np.abs(t))
    from concurrent.futures import ThreadPoolExecutor

    flat_df, flat_t = df.reshape(-1), t.reshape(-1)
    out = np.empty(flat_t.shape)
    half = len(out) // 2

    def part(piece: slice) -> None:
        out[piece] = 2 * stdtr(flat_df[piece], -np.abs(flat_t[piece]))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(part, (slice(0, half), slice(half, None))))
    return out.reshape(t.shape)


def hedges_g(n_a, mean_a, m2_a, n_b, mean_b, m2_b) -> np.ndarray:
    """Hedges' g of set a against set b: Cohen's d with the pooled SD, times the small-sample
    correction ``1 - 3 / (4 (n_a + n_b) - 9)``."""
    n_a, n_b = _counts(n_a, mean_a), _counts(n_b, mean_b)
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.sqrt((m2_a + m2_b) / (n_a + n_b - 2))
        return (mean_a - mean_b) / pooled * (1 - 3 / (4 * (n_a + n_b) - 9))


def bh_qvalues(p: np.ndarray, axis_from: int = 1) -> np.ndarray:
    """Benjamini–Hochberg q-values, each index of the leading axes separately, across the rest.

    ``p`` is ``(group, *spatial, unit)``: q-values per group across the layer's
    units and positions (``axis_from=1``). NaN p-values are left out of the
    count and stay NaN, as ``scipy.stats.false_discovery_control`` would not
    take them at all.
    """
    p = np.asarray(p, dtype=np.float64)
    lead = p.shape[:axis_from]
    flat = p.reshape(int(np.prod(lead, dtype=np.int64)), -1)
    if flat.size == 0:
        return np.full(p.shape, np.nan)
    missing = np.isnan(flat)
    m = (~missing).sum(axis=1, keepdims=True)  # each row's count of p-values
    # NaN sorted last as inf (numpy sorts NaN 4x slower); the order of tied p-values does not change q
    rows = np.arange(len(flat))[:, None] * flat.shape[1]
    order = (np.argsort(np.where(missing, np.inf, flat), axis=1) + rows).reshape(-1)
    ranked = flat.reshape(-1)[order].reshape(flat.shape)
    rank = np.arange(1, flat.shape[1] + 1)
    with np.errstate(invalid="ignore"):
        ranked = ranked * m / rank
    ranked[rank > m] = np.inf  # the NaN tail: out of the running minimum
    q_sorted = np.minimum(np.minimum.accumulate(ranked[:, ::-1], axis=1)[:, ::-1], 1.0)
    q_sorted[rank > m] = np.nan
    q = np.empty(flat.size)
    q[order] = q_sorted.reshape(-1)
    return q.reshape(p.shape)


def _counts(n, mean) -> np.ndarray:
    """``n`` as float64, shaped to broadcast over ``mean``'s trailing axes."""
    n = np.asarray(n, dtype=np.float64)
    mean = np.asarray(mean)
    return n.reshape(n.shape + (1,) * (mean.ndim - n.ndim))
