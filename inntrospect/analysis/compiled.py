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

#: ``numba.prange`` once compiled (set by :class:`_Compiled`); a plain range for the Python definition
prange = range

__all__ = ["kernels", "group_sums", "group_m2", "shifted_sums", "fr_displacement"]


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
