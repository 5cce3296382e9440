"""Topographic layouts of a layer's units (``REFERENCE.md`` §6 steps 1–4).

Units with similar activation profiles over groups land close together.
:func:`profile_matrix` turns a (contrastive) NAP into one profile per unit;
:class:`Layout` places the profiles in 2-D with one of the methods of the
paper and scales the coordinates to [0, 1]. Spreading them over a disc
(step 5) is :mod:`inntrospect.topomap.circle`.

Methods, all reproducible with ``seed``:

* ``umap`` — UMAP with its defaults (the reference toolbox's method);
* ``tsne`` — t-SNE, ``init="pca"``, ``learning_rate="auto"`` (the reference's other one);
* ``pca`` — the first two principal components;
* ``som`` — a self-organising map: each unit at its best-matching node of a
  square grid, nudged toward the second best;
* ``graph`` — edges between units whose profile distance is below its 7.5th
  percentile, smaller components joined to the largest by their closest pair,
  placed by Fruchterman–Reingold;
* ``random`` — uniform positions, the baseline.

``metric="cosine"`` compares profiles by angle (rows scaled to unit length
for methods that only know Euclidean distance).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import NonFiniteError, ParameterError

__all__ = ["METHODS", "MIN_UNITS", "profile_matrix", "Layout", "minmax"]

METHODS = ("umap", "tsne", "pca", "som", "graph", "random")
#: layers with this many units or fewer get no layout (as in the reference)
MIN_UNITS = 15
#: the reference's column filter: columns whose largest |value| is at most this are dropped
COLUMN_THRESHOLD = 0.01


def profile_matrix(nap: np.ndarray, threshold: float = COLUMN_THRESHOLD) -> np.ndarray:
    """Profiles ``(unit, group * prod(spatial))`` of a NAP ``(group, *spatial, unit)``.

    Row ``u`` is unit ``u``'s NAP flattened over groups and spatial positions;
    columns whose largest absolute value over all units is at most
    ``threshold`` are dropped (the reference's filter).
    """
    nap = np.asarray(nap, dtype=np.float64)
    if nap.ndim < 2:
        raise ParameterError(
            f"expected a NAP shaped (group, *spatial, unit), at least 2 axes; got shape "
            f"{nap.shape}. Pass a layer's 'nap' variable (inntrospect.load(store, 'naps') or "
            f"'contrast'); add the group axis (nap[None]) for a single group."
        )
    profiles = np.moveaxis(nap, -1, 0).reshape(nap.shape[-1], -1)
    if not np.isfinite(profiles).all():
        bad = ~np.isfinite(profiles)
        raise NonFiniteError(
            f"expected a finite NAP; it holds {int(bad.sum())} NaN or infinite values of "
            f"{bad.size} (first at unit {int(np.argwhere(bad)[0][0])}), which no layout can place. "
            f"They come from NaN or infinity in the activations: check the corpus inputs and the "
            f"model, extract again, then recompute the NAPs (inntrospect naps CONFIG)."
        )
    keep = np.abs(profiles).max(axis=0) > threshold
    return profiles[:, keep]


def minmax(xy: np.ndarray) -> np.ndarray:
    """Scale each column to [0, 1] (a constant column becomes 0.5)."""
    xy = np.asarray(xy, dtype=np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    out = (xy - lo) / span
    out[:, hi <= lo] = 0.5
    return out


class Layout:
    """2-D coordinates of a layer's units from their profiles, scikit-learn style.

    Parameters
    ----------
    method : {"umap", "tsne", "pca", "som", "graph", "random"}
    metric : {"euclidean", "cosine"}
        Distance between profiles.
    seed : int
        Same profiles and seed, same coordinates.

    Attributes
    ----------
    xy_ : ndarray (unit, 2)
        Coordinates min-max scaled to [0, 1], after :meth:`fit`.

    Examples
    --------
    >>> xy = Layout("pca", seed=0).fit(profile_matrix(nap)).xy_     # doctest: +SKIP
    """

    def __init__(self, method: Literal["umap", "tsne", "pca", "som", "graph", "random"] = "umap",
                 metric: Literal["euclidean", "cosine"] = "euclidean", seed: int = 0):
        self.method = method
        self.metric = metric
        self.seed = seed

    def fit(self, profiles: np.ndarray) -> Layout:
        if self.method not in METHODS:
            raise ParameterError(f"unknown layout method {self.method!r}; choose one of "
                                 f"{', '.join(METHODS)}.")
        if self.metric not in ("euclidean", "cosine"):
            raise ParameterError(f"unknown metric {self.metric!r}; choose 'euclidean' or 'cosine'.")
        x = np.asarray(profiles, dtype=np.float64)
        if x.ndim != 2:
            raise ParameterError(f"profiles must be (unit, features); got shape {x.shape}. "
                                 f"Make them with profile_matrix(nap).")
        if len(x) <= MIN_UNITS:
            raise ParameterError(f"layouts need more than {MIN_UNITS} units (as in the reference); "
                                 f"got {len(x)}. Leave this layer out of the topomaps.")
        if not np.isfinite(x).all():
            raise NonFiniteError(f"expected finite profiles; got {int((~np.isfinite(x)).sum())} NaN "
                                 f"or infinite values. Recompute the NAPs they come from.")
        if x.shape[1] == 0:  # every column filtered out: nothing tells units apart
            x = np.zeros((len(x), 1))
        self.xy_ = minmax(getattr(self, f"_{self.method}")(x))
        return self

    # -- methods -----------------------------------------------------------------
    def _unit_rows(self, x):
        if self.metric != "cosine":
            return x
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 0, norm, 1.0)

    def _umap(self, x):
        from ..analysis.umapfit import fit_umap

        return fit_umap(x, n_neighbors=min(15, len(x) - 1), metric=self.metric, seed=self.seed)

    def _tsne(self, x):
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(x) - 1) / 3)
        return TSNE(2, init="pca", learning_rate="auto", metric=self.metric, perplexity=perplexity,
                    random_state=self.seed).fit_transform(x)

    def _pca(self, x):
        from sklearn.decomposition import PCA

        x = self._unit_rows(x)
        k = min(2, *x.shape)
        xy = PCA(k, random_state=self.seed).fit_transform(x) if k else np.zeros((len(x), 0))
        return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))

    def _random(self, x):
        return np.random.default_rng(self.seed).random((len(x), 2))

    def _som(self, x, epochs: int = 20):
        x = self._unit_rows(x)
        rng = np.random.default_rng(self.seed)
        side = max(2, int(np.ceil(np.sqrt(len(x) / 4))))  # about 4 units per node
        grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
        nodes = x[rng.choice(len(x), len(grid), replace=len(x) < len(grid))].copy()
        gd2 = ((grid[:, None, :] - grid[None, :, :]) ** 2).sum(-1)
        for e in range(epochs):  # batch SOM: neighbourhood shrinks from half the grid to a node
            sigma = max(0.5, side / 2 * (1 - e / max(1, epochs - 1)))
            bmu = _nearest(x, nodes)
            h = np.exp(-gd2[:, bmu] / (2 * sigma**2))  # (node, unit)
            weight = h.sum(1, keepdims=True)
            nodes = np.where(weight > 1e-12, h @ x / np.maximum(weight, 1e-12), nodes)
        d = _sq_dists(x, nodes)
        order = np.argsort(d, axis=1)[:, :2]
        first, second = grid[order[:, 0]], grid[order[:, 1]]
        d1 = np.take_along_axis(d, order[:, :1], 1)
        d2 = np.take_along_axis(d, order[:, 1:2], 1)
        pull = 0.5 * d1 / np.maximum(d1 + d2, 1e-12)  # 0 at the best node, up to half way
        return first + (second - first) * pull

    def _graph(self, x, iterations: int = 100):
        d = _distances(self._unit_rows(x) if self.metric == "cosine" else x, self.metric)
        n = len(d)
        iu = np.triu_indices(n, 1)
        cut = np.percentile(d[iu], 7.5)
        adj = (d < cut) & ~np.eye(n, dtype=bool)
        adj = _join_components(adj, d)
        return _fruchterman_reingold(adj, np.random.default_rng(self.seed), iterations)


def _sq_dists(a, b):
    return np.maximum((a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :], 0.0)


def _nearest(a, b):
    return _sq_dists(a, b).argmin(axis=1)


def _distances(x, metric):
    if metric == "cosine":  # rows already unit length: 1 - cos
        return np.clip(1.0 - x @ x.T, 0.0, 2.0)
    return np.sqrt(_sq_dists(x, x))


def _join_components(adj, d):
    """Join every smaller connected component to the largest by its closest pair of units."""
    from scipy.sparse.csgraph import connected_components

    n_comp, labels = connected_components(adj, directed=False)
    if n_comp == 1:
        return adj
    adj = adj.copy()
    largest = np.bincount(labels).argmax()
    main = labels == largest
    for c in range(n_comp):
        if c == largest:
            continue
        members = np.flatnonzero(labels == c)
        sub = d[np.ix_(members, np.flatnonzero(main))]
        i, j = np.unravel_index(sub.argmin(), sub.shape)
        a, b = members[i], np.flatnonzero(main)[j]
        adj[a, b] = adj[b, a] = True
    return adj


def fr_displacement(pos: np.ndarray, adj: np.ndarray, k: float) -> np.ndarray:
    """Fruchterman–Reingold forces (numpy): repulsion ``k²/d`` from all, attraction ``d²/k`` on edges."""
    n = len(pos)
    disp = np.empty_like(pos)
    w = adj.astype(np.float64)
    for lo in range(0, n, 512):  # row blocks: memory O(512 n), not O(n²)
        delta = pos[lo : lo + 512, None, :] - pos[None, :, :]
        dist = np.maximum(np.sqrt((delta**2).sum(-1)), 0.01)
        force = k * k / dist**2 - w[lo : lo + 512] * dist / k
        disp[lo : lo + 512] = (delta * force[..., None]).sum(1)
    return disp


def _fruchterman_reingold(adj, rng, iterations: int):
    """Force-directed placement (Fruchterman & Reingold 1991) in the unit square, O(n²) per step.

    The forces run as a compiled parallel loop (:func:`inntrospect.analysis.compiled.fr_displacement`)
    when numba is there, else as :func:`fr_displacement` in numpy.
    """
    from scipy.sparse import csr_matrix

    from ..analysis.compiled import kernels

    n = len(adj)
    pos = rng.random((n, 2))
    k = np.sqrt(1.0 / n)
    t = 0.1
    compiled = kernels()
    if compiled is not None:
        edges = csr_matrix(adj)
        indptr, indices = edges.indptr.astype(np.int64), edges.indices.astype(np.int64)
        disp = np.empty_like(pos)
    for _ in range(iterations):
        if compiled is not None:
            compiled.fr_displacement(pos, indptr, indices, k, disp)
        else:
            disp = fr_displacement(pos, adj, k)
        length = np.maximum(np.sqrt((disp**2).sum(1, keepdims=True)), 1e-12)
        pos += disp / length * np.minimum(length, t)
        t -= 0.1 / (iterations + 1)
    return pos
