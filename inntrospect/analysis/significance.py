"""Per-unit significance of a contrast, from the moments the NAP pass merges (no second read).

For each group against all other samples pooled, per unit (and spatial
position): Welch's t, its two-sided p-value, Benjamini–Hochberg q-values
across the layer's units and positions, and Hedges' g. The inputs are each
group's count, mean and M2 (sum of squared deviations from its mean), as
:func:`~inntrospect.analysis.nap_kernels.finalize_moments` gives them; the
rest's moments are merged exactly from the other groups' (Chan et al.'s
pairwise update), never recomputed from samples.

Pure numpy and ``scipy.special`` (``erfc`` in the t distribution's series,
``stdtr`` where the series does not apply, :func:`student_two_sided`): the kernels here take arrays
``(group, ...)`` and return arrays of the same shape, computed in blocks
that stay in cache.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ParameterError

__all__ = ["merge_pair", "rest_moments", "welch", "student_two_sided", "hedges_g", "bh_qvalues",
           "contrast_statistics"]


def merge_pair(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Count, mean and M2 of two disjoint sets of samples from theirs (exact, order-free)."""
    n = n_a + n_b
    shape = np.broadcast_shapes(*(np.shape(x) for x in (n_a, mean_a, m2_a, n_b, mean_b, m2_b)))
    with np.errstate(invalid="ignore", divide="ignore"):  # in place: three arrays, not seven
        frac = np.where(n > 0, n_b / np.where(n > 0, n, 1), 0.0)
        delta = np.subtract(mean_b, mean_a, out=np.empty(shape))
        m2 = np.add(m2_a, m2_b, out=np.empty(shape))  # m2_a + m2_b + delta² n_a frac
        spread = np.multiply(delta, delta, out=np.empty(shape))
        spread *= n_a
        spread *= frac
        m2 += spread
        mean = np.multiply(delta, frac, out=spread)  # mean_a + delta frac
        mean += mean_a
    return n, mean, m2


def _merge_into(n_a, mean_a, m2_a, n_b, mean_b, m2_b, mean_out, m2_out, work) -> float:
    """:func:`merge_pair` of two sets with scalar counts into ``mean_out`` and ``m2_out`` (which may be
    either set's arrays), the same arithmetic in the same order (the same bits); ``work``: two scratch
    arrays of their shape. Returns the count."""
    n = n_a + n_b
    frac = n_b / n if n > 0 else 0.0
    delta = np.subtract(mean_b, mean_a, out=work[0])
    np.add(m2_a, m2_b, out=m2_out)
    spread = np.multiply(delta, delta, out=work[1])
    spread *= n_a
    spread *= frac
    m2_out += spread
    np.multiply(delta, frac, out=spread)
    np.add(spread, mean_a, out=mean_out)
    return n


def rest_moments(count, mean, m2):
    """For each group, the moments of all the other groups' samples pooled.

    ``count`` is ``(group,)``; ``mean`` and ``m2`` are ``(group, ...)``. Returns
    ``(count, mean, m2)`` of the same shapes.
    """
    count, flat_mean, flat_m2 = _moments(count, mean, m2)
    n_r, mean_r, m2_r = _rest_moments(count, flat_mean, flat_m2, np.empty(flat_mean.shape), np.empty(flat_mean.shape))
    return n_r, mean_r.reshape(np.shape(mean)), m2_r.reshape(np.shape(m2))


def _moments(count, mean, m2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` ``(group,)``, ``mean`` and ``m2`` as float64 rows ``(group, values)``, checked."""
    count = np.asarray(count, dtype=np.float64)
    mean, m2 = np.asarray(mean, dtype=np.float64), np.asarray(m2, dtype=np.float64)
    if count.ndim != 1 or mean.ndim < 1 or mean.shape[0] != len(count) or m2.shape != mean.shape:
        raise ParameterError(f"expected count (group,) and mean, m2 (group, ...) of one shape; got "
                             f"{count.shape}, {mean.shape} and {m2.shape}.")
    size = int(np.prod(mean.shape[1:], dtype=np.int64))
    return count, mean.reshape(len(count), size), m2.reshape(len(count), size)  # also for (group,)


def _rest_moments(count, flat_mean, flat_m2, mean_r, m2_r):
    """:func:`rest_moments` of rows ``(group, values)``, into ``mean_r`` and ``m2_r`` (C-contiguous)."""
    # prefix pools groups < g, suffix[g] groups > g: O(groups) exact merges, no subtraction; in place,
    # each suffix in the row of the output it becomes part of (4 arrays of a group's size besides)
    G, size = flat_mean.shape
    shape = (size,)
    n_r = np.empty(G)
    if G:
        mean_r[-1] = 0.0  # no group after the last
        m2_r[-1] = 0.0
    work = (np.empty(shape), np.empty(shape))
    n_s = np.zeros(G)
    for g in range(G - 2, -1, -1):  # mean_r[g], m2_r[g]: the groups after g
        n_s[g] = _merge_into(count[g + 1], flat_mean[g + 1], flat_m2[g + 1], n_s[g + 1], mean_r[g + 1],
                             m2_r[g + 1], mean_r[g], m2_r[g], work)
    n_p, mean_p, m2_p = 0.0, np.zeros(shape), np.zeros(shape)
    for g in range(G):
        n_r[g] = _merge_into(n_p, mean_p, m2_p, n_s[g], mean_r[g], m2_r[g], mean_r[g], m2_r[g], work)
        n_p = _merge_into(n_p, mean_p, m2_p, count[g], flat_mean[g], flat_m2[g], mean_p, m2_p, work)
    return n_r, mean_r, m2_r


def contrast_statistics(count, mean, m2) -> dict[str, np.ndarray]:
    """Each group against all other samples pooled: ``t``, ``p``, ``q``, ``effect`` and ``rest_count``.

    ``count`` is ``(group,)``, ``mean`` and ``m2`` ``(group, *spatial, unit)``
    (the moments of *every* group of the store). ``t`` and ``p`` are Welch's,
    ``q`` the Benjamini–Hochberg q-values of each group across its units and
    positions, ``effect`` Hedges' g; all ``(group, *spatial, unit)`` float64.
    A group with fewer than two samples, or whose rest has fewer, gets NaN
    (and stays out of the q-values' count). Computed in blocks of
    :data:`BLOCK` values, on this thread: the temporaries stay in cache and
    are reused (on two threads, half of the groups each, the two only waited
    for each other's calls into numpy, and each thread's own memory was given
    back and faulted in again: slower here).
    """
    count, flat_mean, flat_m2 = _moments(count, mean, m2)
    G, size = flat_mean.shape
    # the four results in one allocation (numpy advises huge pages from 4 MiB: far fewer page faults
    # in a fresh process, where fresh memory costs more than the arithmetic); the rest's moments are
    # written where q and effect go: effect replaces them block by block (each block's m2 is read
    # before its effect is written over it), q once every block is done
    t, p, q, effect = np.empty((4, G, size))
    n_r, mean_r, m2_r = _rest_moments(count, flat_mean, flat_m2, q, effect)
    ok = (count >= 2) & (n_r >= 2)
    out = {"t": t, "p": p, "effect": effect}
    good = np.flatnonzero(ok)
    if len(good) < G:  # untestable groups: NaN, out of the q-values
        for k in out:
            out[k][~ok] = np.nan
    for run in np.split(good, np.flatnonzero(np.diff(good) > 1) + 1) if len(good) else []:
        rows = slice(run[0], run[-1] + 1)  # consecutive testable groups: row slices, no copies
        _tested(count[rows], flat_mean[rows], flat_m2[rows], n_r[rows], mean_r[rows], m2_r[rows],
                *(out[k][rows] for k in ("t", "p", "effect")))
    out["q"] = bh_qvalues(p, out=q)
    shape = np.shape(mean)
    return {**{k: v.reshape(shape) for k, v in out.items()}, "rest_count": n_r.astype(np.int64)}


def _tested(n_a, mean_a, m2_a, n_b, mean_b, m2_b, t, p, effect) -> None:
    """Welch's ``t`` and ``p`` and Hedges' g of groups that can be tested, into ``t``, ``p`` and
    ``effect``; each ``(group, values)`` C-contiguous (counts ``(group,)``), block by block: a block
    of whole rows if they are short, else a piece of one row. ``effect`` may be ``m2_b``."""
    G, size = mean_a.shape
    per_row = max(1, BLOCK // max(size, 1))
    width = min(max(size, 1), BLOCK)
    # the blocks' temporaries, allocated once: freed after each block, the heap shrank and the next
    # block faulted the same pages in again
    work = np.empty((3, min(G, per_row) * width))
    for r in range(0, G, per_row):
        g = slice(r, r + per_row)
        for c in range(0, size, width):
            v = slice(c, c + width)
            moments = (n_a[g], mean_a[g, v], m2_a[g, v], n_b[g], mean_b[g, v], m2_b[g, v])
            shape = t[g, v].shape
            temps = tuple(w[:shape[0] * shape[1]].reshape(shape) for w in work)
            _welch(*moments, out=(t[g, v], p[g, v]), work=temps)
            _hedges(*moments, out=effect[g, v], pooled=temps[0])


def welch(n_a, mean_a, m2_a, n_b, mean_b, m2_b) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Welch's t of set a against set b, its degrees of freedom and two-sided p-value.

    Each set needs at least two samples. Where both variances are zero the t
    is NaN (equal means) or infinite, as ``scipy.stats.ttest_ind`` gives them.
    """
    return _welch(n_a, mean_a, m2_a, n_b, mean_b, m2_b)


def _welch(n_a, mean_a, m2_a, n_b, mean_b, m2_b, out: tuple | None = None, work: tuple | None = None):
    """:func:`welch`; ``out``: arrays ``(t, p)`` of the broadcast shape to write them into; ``work``:
    three such arrays for the temporaries (the degrees of freedom are returned in the third)."""
    n_a, n_b = _counts(n_a, mean_a), _counts(n_b, mean_b)
    if np.any(n_a < 2) or np.any(n_b < 2):
        raise ParameterError("Welch's t needs at least two samples in each set; a group (or the "
                             "rest) has fewer. Leave such groups out of the contrast.")
    shape = np.broadcast_shapes(*(np.shape(x) for x in (n_a, mean_a, m2_a, n_b, mean_b, m2_b)))
    # in place, five arrays in all: fresh pages cost more than the arithmetic on these
    with np.errstate(invalid="ignore", divide="ignore"):
        va, vb, se2 = work if work is not None else (np.empty(shape) for _ in range(3))
        np.divide(m2_a, n_a - 1, out=va)  # squared standard errors
        va /= n_a
        np.divide(m2_b, n_b - 1, out=vb)
        vb /= n_b
        np.add(va, vb, out=se2)
        t = np.subtract(mean_a, mean_b, out=np.empty(shape) if out is None else out[0])
        t /= np.sqrt(se2)
        df = np.multiply(se2, se2, out=se2)  # se2² / (va² / (n_a - 1) + vb² / (n_b - 1))
        np.multiply(va, va, out=va)
        va /= n_a - 1
        np.multiply(vb, vb, out=vb)
        vb /= n_b - 1
        va += vb
        df /= va
        p = student_two_sided(df, t, out=None if out is None else out[1])
    return t, df, p


#: values of the statistics computed together: temporaries of 512 KiB, reused block after block
#: (smaller blocks make more calls into numpy; larger ones gained nothing here)
BLOCK = 1 << 16


def student_two_sided(df, t, out: np.ndarray | None = None) -> np.ndarray:
    """Two-sided p-value of Student's t: ``2 P(T_df > |t|)``, as ``2 * scipy.special.stdtr(df, -|t|)``.

    That is the regularized incomplete beta function ``I_x(df/2, 1/2)`` at
    ``x = df / (df + t²)``. Where ``df >= 100`` and ``log(1 + t²/df) <= 1``
    (every Welch test between groups of more than a few dozen samples) it is
    summed from its expansion for large ``df/2`` (:func:`_student_series`, an
    incomplete gamma series as in DiDonato & Morris's BGRAT, ACM TOMS 708,
    1992), several times faster than ``stdtr`` and within 1e-12 of it
    relative; there p-values below ``exp(-750)`` are 0 (below the smallest
    double, as ``stdtr`` gives them). Elsewhere, ``stdtr`` itself. ``out``: a
    float64 array of the broadcast shape to write the p-values into.
    """
    from scipy.special import stdtr

    df, t = np.broadcast_arrays(np.asarray(df, dtype=np.float64), np.asarray(t, dtype=np.float64))
    if out is not None and not out.flags.c_contiguous:  # reshape would copy: write the result over
        out[...] = student_two_sided(df, t)
        return out
    out = np.empty(t.shape) if out is None else out
    flat_df, flat_t, flat = df.reshape(-1), t.reshape(-1), out.reshape(-1)
    for lo in range(0, len(flat), _SERIES_BLOCK):  # blocks: the temporaries stay in cache
        piece = slice(lo, lo + _SERIES_BLOCK)
        d, x, p = flat_df[piece], flat_t[piece], flat[piece]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            y = np.multiply(x, x)
            y /= d
            np.log1p(y, out=y)  # NaN where t or df is (an untestable unit): p is NaN there
            half = 0.5 * d
            u = half - 0.25
            u *= y
            fast = np.greater_equal(d, _SERIES_DF)
            fast &= y <= _SERIES_Y  # False for NaN
            series = fast & (u <= _SERIES_EXP)
            zero = fast & (u > _SERIES_ZERO)
        at = np.flatnonzero(series)
        if len(at):
            p[at] = _student_series(half[at], u[at], y[at])
        np.putmask(p, zero, 0.0)  # (putmask: a third of the time of p[zero] = 0.0)
        missing = np.isnan(x)  # an untestable unit (both variances zero): NaN, as stdtr gives it
        missing |= np.isnan(d)
        np.putmask(p, missing, np.nan)
        rest = np.flatnonzero(~(series | zero | missing))
        if len(rest):
            p[rest] = 2 * stdtr(d[rest], -np.abs(x[rest]))
    return out


#: values of :func:`student_two_sided` computed together (their temporaries fit in a core's cache)
_SERIES_BLOCK = 1 << 14
#: where the series of :func:`_student_series` is used: df at least this, log(1 + t²/df) at most that
_SERIES_DF, _SERIES_Y = 100.0, 1.0
#: the series' coefficients d_n: (sinh(w/2) / (w/2))^(-1/2) = sum d_n w^(2n); the tests derive them
#: exactly, with fractions (sinh(z)/z = sum w^(2k) / (4^k (2k + 1)!) raised to the power -1/2)
SERIES_COEFFICIENTS = (
    1.0, -0.020833333333333332, 0.000390625, -7.879670965608466e-06, 1.6967665791721782e-07,
    -3.805064191721906e-09, 8.748377596315407e-11, -2.044523359411974e-12, 4.833351797967704e-14,
    -1.152434101767386e-15, 2.76605204359937e-17, -6.67428195089166e-19, 1.61745507718158e-20,
    -3.93397792009138e-22, 9.597634062586047e-24, -2.347690291162632e-25)
#: Gamma(a + 1/2) / (Gamma(a) sqrt(a)) = sum r_k a^-k for large a (7 terms: 2e-15 relative at a = 50)
_SERIES_R = (1.0, -1 / 8, 1 / 128, 5 / 1024, -21 / 32768, -399 / 262144, 869 / 4194304)
#: in the series' domain, u above the first gives p < exp(-u) < the smallest double (exp(-744.4)):
#: 0; from the second on e^-u nears the subnormals, where stdtr rounds as it does
_SERIES_ZERO, _SERIES_EXP = 750.0, 700.0
#: terms are summed until the next is below this (the sum is about 1)
_SERIES_TAIL = 1e-18


def _student_series(a: np.ndarray, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``I_x(a, 1/2)`` by its expansion for large ``a``, at ``y = -log x``, ``u = (a - 1/4) y``.

    With ``s = e^-w`` the integral of ``I_x`` is over ``w > y`` of
    ``e^(-T w) w^(-1/2) g(w)``, ``T = a - 1/4`` and ``g(w) = (sinh(w/2) /
    (w/2))^(-1/2) = sum d_n w^(2n)`` (:data:`SERIES_COEFFICIENTS`), so

        I = sum_n d_n Gamma(1/2 + 2n, u) / (T^(1/2 + 2n) B(a, 1/2)).

    ``Gamma(1/2, u) = sqrt(pi) erfc(sqrt(u))`` and ``Gamma(s + 1, u) =
    (s + h_s) Gamma(s, u)`` with ``h_s = u^s e^-u / Gamma(s, u) <= u``,
    ``h_(s+1) = u h_s / (s + h_s)``: each term is a ratio to the first, with
    no overflow. ``sqrt(pi) / B(a, 1/2) = Gamma(a + 1/2) / Gamma(a)`` comes
    from its series in ``1/a`` (:data:`_SERIES_R`). The terms alternate and
    the n-th is at most ``|d_n| prod_(k<=n) (y + (2k - 1/2)/T)²`` (each
    factor under 0.07 for ``y <= 1``, ``T > 49``) times the first: each value
    sums the terms its own bound says its last bit needs (the block's worst
    bound, never below any value's, ends the loop), so it gets the same bits
    in any block.
    """
    from scipy.special import erfc

    coefficients = SERIES_COEFFICIENTS
    T = a - 0.25
    inv_t = 1.0 / T
    # the block's worst bound, as each value's is computed (rounding is monotone: never below theirs)
    y_max, inv_t_max = float(y.max()), float(inv_t.max())
    worst, terms = 1.0, 0
    while terms + 1 < len(coefficients):
        n = terms + 1
        worst *= inv_t_max * (2 * n - 0.5) + y_max
        if worst < _SERIES_LAST[n]:
            break
        terms = n
    root = np.sqrt(u)
    first = erfc(root)  # (not below the smallest double: u <= _SERIES_EXP)
    decay = np.exp(-u)
    h = root * decay
    h /= math.sqrt(math.pi) * first
    inv_t2 = inv_t * inv_t
    total = np.ones_like(u)
    ratio = np.ones_like(u)
    f, bound, step = np.empty_like(u), np.ones_like(u), np.empty_like(u)
    needed = np.empty(u.shape, dtype=bool)
    s = 0.5
    for n in range(1, terms + 1):
        for _ in range(2):  # Gamma(s + 1, u) / Gamma(s, u), twice a term (and / T² once)
            np.add(h, s, out=f)
            ratio *= f
            h *= u
            h /= f
            s += 1.0
        ratio *= inv_t2
        np.multiply(inv_t, 2 * n - 0.5, out=step)  # this value's own bound: added only where it
        step += y  # says the last bit needs the term, so each value sums the same terms in any block
        bound *= step
        np.greater_equal(bound, _SERIES_LAST[n], out=needed)
        np.multiply(ratio, coefficients[n], out=step)
        step *= needed  # 0 where not needed: total + 0 is total (a masked add takes 3x as long)
        total += step
    inv_a = 1.0 / a
    gamma_ratio = np.full_like(u, _SERIES_R[-1])  # every term for every value: the same bits however cut
    for r in _SERIES_R[-2::-1]:
        gamma_ratio *= inv_a
        gamma_ratio += r
    total *= first
    total *= gamma_ratio
    total *= np.sqrt(a * inv_t)
    return np.minimum(total, 1.0)


#: the n-th term is added where ``prod_(k<=n) (y + (2k - 1/2)/T)`` is at least ``sqrt(tail / |d_n|)``
#: (its bound ``|d_n| prod (...)²`` at least the tail)
_SERIES_LAST = (0.0, *(math.sqrt(_SERIES_TAIL / abs(d)) for d in SERIES_COEFFICIENTS[1:]))


def hedges_g(n_a, mean_a, m2_a, n_b, mean_b, m2_b, out: np.ndarray | None = None) -> np.ndarray:
    """Hedges' g of set a against set b: Cohen's d with the pooled SD, times the small-sample
    correction ``1 - 3 / (4 (n_a + n_b) - 9)`` (into ``out``, an array of the broadcast shape, if given)."""
    return _hedges(n_a, mean_a, m2_a, n_b, mean_b, m2_b, out)


def _hedges(n_a, mean_a, m2_a, n_b, mean_b, m2_b, out=None, pooled=None) -> np.ndarray:
    """:func:`hedges_g`; ``pooled``: an array of the broadcast shape for the pooled SD. ``out`` may be
    ``m2_b`` itself (read before ``out`` is written)."""
    n_a, n_b = _counts(n_a, mean_a), _counts(n_b, mean_b)
    shape = np.broadcast_shapes(*(np.shape(x) for x in (n_a, mean_a, m2_a, n_b, mean_b, m2_b)))
    given = out is not None
    out = out if given else np.empty(shape)
    pooled = np.empty(shape) if pooled is None else pooled
    with np.errstate(invalid="ignore", divide="ignore"):
        pooled = np.add(m2_a, m2_b, out=pooled)
        pooled /= n_a + n_b - 2
        np.sqrt(pooled, out=pooled)
        np.subtract(mean_a, mean_b, out=out)
        out /= pooled
        out *= 1 - 3 / (4 * (n_a + n_b) - 9)
    return out if given else out[()]  # a scalar for scalars, as the arithmetic gives it


def bh_qvalues(p: np.ndarray, axis_from: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """Benjamini–Hochberg q-values, each index of the leading axes separately, across the rest.

    ``p`` is ``(group, *spatial, unit)``: q-values per group across the layer's
    units and positions (``axis_from=1``). NaN p-values are left out of the
    count and stay NaN, as ``scipy.stats.false_discovery_control`` would not
    take them at all. ``out``: a float64 array of ``p``'s shape to write them into.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.empty(p.shape) if out is None else out
    lead = int(np.prod(p.shape[:axis_from], dtype=np.int64))
    if p.size == 0:
        return q
    flat = p.reshape(lead, -1)
    if np.any(flat < 0):
        raise ParameterError("p-values cannot be negative; check what was passed (NaN stands for none).")
    into = q.reshape(lead, -1)  # a view where it can be (out is contiguous), else written back below
    size = flat.shape[1]
    rank = np.arange(1, size + 1, dtype=np.float64)
    for row, q_row in zip(flat, into):  # one row at a time: a few arrays of a row's size at most
        # only positive p-values are sorted: NaN is out of the count and p = 0 gets q = 0 at any rank
        # (0 * m / rank); the order of tied p-values does not change q
        positive = np.flatnonzero(row > 0)
        zeros = row == 0
        z = int(np.count_nonzero(zeros))
        m = z + len(positive)
        values = row[positive]
        order = np.argsort(values)
        ranked = values[order]
        ranked *= m
        ranked /= rank[z:m]
        backwards = ranked[::-1]
        np.minimum.accumulate(backwards, out=backwards)
        np.minimum(ranked, 1.0, out=ranked)
        q_row.fill(np.nan)
        np.putmask(q_row, zeros, 0.0)
        q_row[positive[order]] = ranked
    if not np.shares_memory(into, q):
        q[...] = into.reshape(q.shape)
    return q


def _counts(n, mean) -> np.ndarray:
    """``n`` as float64, shaped to broadcast over ``mean``'s trailing axes."""
    n = np.asarray(n, dtype=np.float64)
    mean = np.asarray(mean)
    return n.reshape(n.shape + (1,) * (mean.ndim - n.ndim))
