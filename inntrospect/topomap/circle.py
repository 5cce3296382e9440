"""Spread a 2-D unit layout into a disc (``REFERENCE.md`` §6 step 5).

``distribute_in_circle`` moves every unit by the mean of a pairwise force over
``n_steps`` steps, then min-max scales each column to [0, 1]. At step ``k``
(``t_k = linspace(-3, 6, n_steps)[k]``, ``w_k = (tanh(t_k) + 1) / 2``)::

    D_ij = max(|p_j - p_i|, 0.01)
    f_ij = w_k * (1.5 / (D_ij + 1)**3 - 15 * exp(-D_ij / 2)) / 2
    p_i += mean_j (p_j - p_i) * f_ij  (+ Gaussian jitter, sd ``jitter``)

with all units updated at once from the previous step's positions and ``j``
running over all units (``i`` itself included: it adds 0 but counts in the
mean). The force repels below a distance of about 23 and attracts beyond, so
the layout grows from the unit square to a disc some 45 across, whatever the
input.

Three implementations:

- :func:`distribute_reference`: the definition in vectorised float64 numpy
  (``n x n`` arrays per step, O(n^2) memory). The baseline for tests and
  benchmarks.
- ``method="exact"``: a numba kernel, float64, each pair's (symmetric) force
  evaluated once, ``exp`` written out as a polynomial so that the inner loop
  is SIMD-vectorised (numba has no vector ``exp`` without SVML), rows dealt to
  a fixed number of chunks with their own accumulators (run in parallel, and
  summed in a fixed order: results do not depend on the thread count).
- ``method="approx"``: particle-mesh. Unit masses are spread onto a square
  grid over the layout's bounding box (cloud-in-cell), convolved by FFT with
  the vector kernel ``r * f(|r|)`` sampled on the same grid, and the field
  interpolated back with the same cloud-in-cell weights (so a unit exerts no
  force on itself). O(n + G^2 log G) per step. The kernel is smooth and long
  range (its scale is ~2, the layout's ~1 to ~45), so a modest grid is
  accurate: see :data:`APPROX_GRID` for the measured error.

The same seed gives the same jitter draws in all three (one
``rng.standard_normal((n, 2))`` per step, after the step's displacement).
numba is imported, and the kernel compiled (and cached on disk), on the first
``"exact"`` call only.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from ..errors import NonFiniteError, ParameterError

__all__ = ["distribute_in_circle", "distribute_reference", "weights", "AUTO_THRESHOLD"]

#: ``method="auto"`` uses ``"approx"`` from this many units on. Measured with
#: ``benchmarks/bench_circle.py`` on the shared 2-core VM, 100 steps: exact takes
#: 2.0-2.4 s on 4,608 units and grows as n^2 (6.7 s at 8,000, 16 s at 12,000,
#: 62-68 s at 25,000 units); approx takes 1.2-2 s at any of these sizes. From
#: 6,000 units exact takes more than a few seconds (~3.5-4 s).
AUTO_THRESHOLD = 6_000

#: Grid side of the particle-mesh method. Error against exact after 100 steps, on
#: clustered (UMAP-like) layouts, in units of the final [0, 1] square: 4,608 units
#: max 1.1e-4, median 3.3e-5; 25,000 units max 1.6e-4 (2.5e-4 on another draw),
#: median 3.6e-5. It falls as grid^-2 (grid 128: ~4x larger, 512: ~4x smaller, at
#: ~2.5x the time).
APPROX_GRID = 256

# Chunks of rows for the exact kernel: a constant, so that the summation order,
# and hence the result, does not depend on the number of threads.
_CHUNKS = 8
# Units from which the exact kernel runs its chunks in parallel (below, waking
# threads costs more than it saves, and much more on a busy machine).
_PARALLEL_FROM = 1500

_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238  # ln 2 split in two (Cody-Waite) for the range reduction
_LN2_LO = 1.9082149292705877e-10
_TWO52 = 4503599627370496.0
# FFTs of the particle-mesh method
_FFT_DTYPE = np.float32


def weights(n_steps: int = 100) -> np.ndarray:
    """Step weights ``w_k = (tanh(linspace(-3, 6, n_steps)[k]) + 1) / 2``."""
    return (np.tanh(np.linspace(-3, 6, n_steps)) + 1) / 2


def _force(d: np.ndarray) -> np.ndarray:
    """``(1.5 / (D + 1)**3 - 15 * exp(-D / 2)) / 2`` with ``D = max(d, 0.01)`` (no ``w_k``)."""
    d = np.maximum(d, 0.01)
    u = d + 1
    return (1.5 / (u * u * u) - 15 * np.exp(-d / 2)) / 2


def _force_fast(d: np.ndarray) -> np.ndarray:
    """:func:`_force` with fewer temporaries (no ``**``)."""
    d = np.maximum(d, 0.01)
    u = d + 1.0
    u *= u * u
    np.divide(0.75, u, out=u)
    d *= -0.5
    np.exp(d, out=d)
    d *= 7.5
    u -= d
    return u


def _check(p) -> np.ndarray:
    p = np.array(p, dtype=np.float64, copy=True)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ParameterError(f"expected coordinates of shape (n, 2), got {p.shape}. Pass one row "
                             f"of x, y per unit (a layout's xy).")
    if not np.isfinite(p).all():
        bad = np.flatnonzero(~np.isfinite(p).all(axis=1))
        raise NonFiniteError(f"expected finite coordinates; {bad.size} of {len(p)} units hold NaN or "
                             f"infinity (first: unit {bad[0]}). Recompute the layout, or drop "
                             f"those units.")
    return p


def _minmax(p: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1]; a constant column becomes 0."""
    lo = p.min(axis=0) if len(p) else np.zeros(2)
    span = (p.max(axis=0) - lo) if len(p) else np.ones(2)
    span = np.where(span > 0, span, 1.0)
    return np.clip((p - lo) / span, 0.0, 1.0)


def _rng(jitter: float, seed):
    return np.random.default_rng(seed) if jitter else None


def distribute_reference(p, n_steps: int = 100, jitter: float = 1e-6, seed=None) -> np.ndarray:
    """The definition, transcribed in float64 numpy (O(n^2) memory per step)."""
    p = _check(p)
    n = len(p)
    rng = _rng(jitter, seed)
    for w in weights(n_steps):
        x, y = p[:, 0], p[:, 1]
        dx = x[None, :] - x[:, None]  # dx[i, j] = x_j - x_i
        dy = y[None, :] - y[:, None]
        f = w * _force(np.sqrt(dx**2 + dy**2))
        p = p + np.stack([(dx * f).mean(axis=1), (dy * f).mean(axis=1)], axis=1)
        if rng is not None:
            p = p + jitter * rng.standard_normal((n, 2))
    return _minmax(p)


# --------------------------------------------------------------------------- exact
# Kernel sources are plain Python here; numba compiles them on first use.
# ``prange``, ``_f2i``, ``_i2f`` and ``_rows`` are filled in by compiled_kernels() before
# compiling the drivers.
prange = range


def _f2i(v):  # pragma: no cover - replaced by a numba intrinsic (bitcast float64 -> int64)
    raise NotImplementedError


def _i2f(v):  # pragma: no cover - replaced by a numba intrinsic (bitcast int64 -> float64)
    raise NotImplementedError


_rows = None  # replaced by the compiled _chunk_rows


def _chunk_rows(x, y, ax, ay, c, nchunk):  # pragma: no cover - compiled by numba
    """Rows ``i = c, c + nchunk, ...``: add each pair ``i < j``'s ``(p_j - p_i) * f0_ij``
    to ``(ax, ay)[i]`` and subtract it from ``(ax, ay)[j]`` (each pair evaluated once).

    ``f0`` is the force without ``w_k / 2``. Loops over slices starting at 0 so that
    numba knows the indices are non-negative and LLVM vectorises the inner loop.
    """
    n = x.shape[0]
    for k in range(n):
        ax[k] = 0.0
        ay[k] = 0.0
    for i in range(c, n, nchunk):
        xi = x[i]
        yi = y[i]
        xs = x[i + 1 :]
        ys = y[i + 1 :]
        axs = ax[i + 1 :]
        ays = ay[i + 1 :]
        sx = 0.0
        sy = 0.0
        for j in range(n - i - 1):
            dx = xs[j] - xi
            dy = ys[j] - yi
            d = max(math.sqrt(dx * dx + dy * dy), 0.01)
            u = d + 1.0
            # exp(-d / 2) = 2**k * exp(r), |r| <= ln2 / 2, degree-12 Taylor (rel. err < 2e-16)
            t = max(-0.5 * d, -700.0)
            kf = np.floor(t * _LOG2E + 0.5)
            r = (t - kf * _LN2_HI) - kf * _LN2_LO
            e = 1.0 / 479001600.0
            e = e * r + 1.0 / 39916800.0
            e = e * r + 1.0 / 3628800.0
            e = e * r + 1.0 / 362880.0
            e = e * r + 1.0 / 40320.0
            e = e * r + 1.0 / 5040.0
            e = e * r + 1.0 / 720.0
            e = e * r + 1.0 / 120.0
            e = e * r + 1.0 / 24.0
            e = e * r + 1.0 / 6.0
            e = e * r + 0.5
            e = e * r + 1.0
            e = e * r + 1.0
            # 2**k: k + 1023 sits in the low mantissa bits of k + 1023 + 2**52
            scale = _i2f(_f2i(kf + 1023.0 + _TWO52) << 52)
            f = 1.5 / (u * u * u) - 15.0 * (e * scale)
            fx = f * dx
            fy = f * dy
            sx += fx
            sy += fy
            axs[j] -= fx
            ays[j] -= fy
        ax[i] += sx
        ay[i] += sy


def _pairs_parallel(x, y, acc):  # pragma: no cover - compiled by numba
    """``acc[c]`` = the sums of chunk ``c`` (:func:`_chunk_rows`), chunks in parallel."""
    nchunk = acc.shape[0]
    for c in prange(nchunk):
        _rows(x, y, acc[c, 0], acc[c, 1], c, nchunk)


def _pairs_serial(x, y, acc):  # pragma: no cover - compiled by numba
    """:func:`_pairs_parallel` on one thread (no thread wake-ups: for small layers)."""
    nchunk = acc.shape[0]
    for c in range(nchunk):
        _rows(x, y, acc[c, 0], acc[c, 1], c, nchunk)


_KERNELS: dict = {}
_LOCK = threading.Lock()


def compiled_kernels():
    """Compile (or load from numba's on-disk cache) the exact kernels, once per process."""
    with _LOCK:
        if not _KERNELS:
            _compile()
    return _KERNELS


def _compile():
    """Define the intrinsics, fill in the globals and compile the kernels (cache=True)."""
    import numba
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def f2i(typingctx, v):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.int64))

        return types.int64(types.float64), codegen

    @intrinsic
    def i2f(typingctx, v):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float64))

        return types.float64(types.int64), codegen

    g = globals()
    g["prange"], g["_f2i"], g["_i2f"] = numba.prange, f2i, i2f
    # reassoc etc. (not nnan/ninf): lets LLVM vectorise the row sums.
    flags = {"nsz", "arcp", "contract", "afn", "reassoc"}
    opts = dict(fastmath=flags, error_model="numpy", cache=True, nogil=True)
    g["_rows"] = numba.njit(
        "void(float64[::1], float64[::1], float64[::1], float64[::1], int64, int64)", **opts
    )(_chunk_rows)
    sig = "void(float64[::1], float64[::1], float64[:, :, ::1])"
    _KERNELS["parallel"] = numba.njit(sig, parallel=True, **opts)(_pairs_parallel)
    _KERNELS["serial"] = numba.njit(sig, **opts)(_pairs_serial)


def _run_exact(p: np.ndarray, n_steps: int, jitter: float, seed) -> np.ndarray:
    n = len(p)
    rng = _rng(jitter, seed)
    kernel = compiled_kernels()["parallel" if n >= _PARALLEL_FROM else "serial"]
    x = np.ascontiguousarray(p[:, 0])
    y = np.ascontiguousarray(p[:, 1])
    acc = np.empty((_CHUNKS, 2, n))
    for w in weights(n_steps):
        kernel(x, y, acc)
        s = acc.sum(axis=0)  # fixed order over chunks
        s *= w / 2 / n
        x = x + s[0]
        y = y + s[1]
        if rng is not None:
            z = rng.standard_normal((n, 2))
            x = x + jitter * z[:, 0]
            y = y + jitter * z[:, 1]
    return np.stack([x, y], axis=1)


# --------------------------------------------------------------------------- approx
def _run_approx(p: np.ndarray, n_steps: int, jitter: float, seed, grid: int) -> np.ndarray:
    import scipy.fft as sfft

    n = len(p)
    rng = _rng(jitter, seed)
    g = int(grid)
    shape = (sfft.next_fast_len(2 * g - 1, real=True),) * 2
    off = np.arange(-(g - 1), g, dtype=np.float64)  # kernel offsets in cells
    pad = np.zeros(shape, dtype=_FFT_DTYPE)
    kpad = np.zeros(shape, dtype=_FFT_DTYPE)
    for w in weights(n_steps):
        lo = p.min(axis=0)
        span = float((p.max(axis=0) - lo).max())
        h = span / (g - 1) if span > 0 else 1.0
        # cloud-in-cell weights; cells [i, i+1] x [j, j+1], i, j in [0, g-2]
        q = (p - lo) / h
        base = np.clip(np.floor(q).astype(np.int64), 0, g - 2)
        fr = q - base
        ix, iy = base[:, 0], base[:, 1]
        fx, fy = fr[:, 0], fr[:, 1]
        idx = [ix * g + iy, ix * g + iy + 1, (ix + 1) * g + iy, (ix + 1) * g + iy + 1]
        wts = [(1 - fx) * (1 - fy), (1 - fx) * fy, fx * (1 - fy), fx * fy]
        rho = np.zeros(g * g)
        for a, b in zip(idx, wts):
            rho += np.bincount(a, weights=b, minlength=g * g)
        rho = rho.reshape(g, g)
        # vector kernel K(r) = r * f(|r|) on offsets r = (a, b) * h, f from one quadrant
        r1 = np.arange(g, dtype=np.float64) * h
        fq = _force_fast(np.sqrt(r1[:, None] ** 2 + r1[None, :] ** 2))
        f = np.empty((2 * g - 1, 2 * g - 1))
        f[g - 1 :, g - 1 :] = fq
        f[: g - 1, g - 1 :] = fq[:0:-1, :]
        f[:, : g - 1] = f[:, : g - 1 : -1]
        pad[:g, :g] = rho
        rho_hat = sfft.rfft2(pad, workers=-1)
        field = []
        for axis in (0, 1):
            # F(a) = sum_b rho(b) K(b - a) = -(rho * K)(a), K odd; the circular
            # convolution of size >= 2g - 1 is exact on the slice kept.
            np.multiply(
                f,
                off[:, None] * h if axis == 0 else off[None, :] * h,
                out=kpad[: 2 * g - 1, : 2 * g - 1],
            )
            conv = sfft.irfft2(rho_hat * sfft.rfft2(kpad, workers=-1), shape, workers=-1)
            field.append(-conv[g - 1 : 2 * g - 1, g - 1 : 2 * g - 1].astype(np.float64).ravel())
        disp = np.zeros((n, 2))
        for a, b in zip(idx, wts):
            disp[:, 0] += b * field[0][a]
            disp[:, 1] += b * field[1][a]
        p = p + disp * (w / n)
        if rng is not None:
            p = p + jitter * rng.standard_normal((n, 2))
    return p


# --------------------------------------------------------------------------- API
def distribute_in_circle(
    p,
    n_steps: int = 100,
    jitter: float = 1e-6,
    seed=None,
    method: str = "auto",
    *,
    grid: int = APPROX_GRID,
) -> np.ndarray:
    """Spread coordinates ``p`` (n, 2), already min-max scaled to [0, 1], into a disc.

    Returns new coordinates, each column min-max scaled to [0, 1] (a constant
    column becomes 0). ``method``: ``"exact"`` (compiled O(n^2) per step, equal to
    :func:`distribute_reference` to ~1e-12), ``"approx"`` (particle-mesh on a
    ``grid x grid`` mesh, O(n) per step plus FFTs) or ``"auto"`` (``"approx"``
    from :data:`AUTO_THRESHOLD` units on). ``seed`` seeds the jitter (same
    inputs and seed, same output); ``jitter=0`` turns it off.
    """
    p = _check(p)
    if method == "auto":
        method = "approx" if len(p) >= AUTO_THRESHOLD else "exact"
    if method not in ("exact", "approx"):
        raise ParameterError(f"method must be 'auto', 'exact' or 'approx', not {method!r}. "
                             f"Leave it at 'auto' unless you need one of them.")
    if n_steps < 0:
        raise ParameterError(f"n_steps must be >= 0, got {n_steps!r}; pass 0 to only rescale "
                             f"(the default is 100).")
    if len(p) < 2:
        return _minmax(p)
    if method == "exact":
        out = _run_exact(p, n_steps, jitter, seed)
    else:
        if grid < 4:
            raise ParameterError(f"grid must be >= 4 mesh cells per side, got {grid!r}; the "
                                 f"default is {APPROX_GRID}.")
        out = _run_approx(p, n_steps, jitter, seed, grid)
    return _minmax(out)
