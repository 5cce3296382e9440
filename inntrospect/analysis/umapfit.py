"""umap-learn's UMAP as the layouts and projections run it, without per-process start-up costs.

Two costs used to come with every process that ran UMAP, both outside the
method itself (``benchmarks/bench_e2e.py`` measures them):

* ``import umap`` imported TensorFlow (15 s cold), because umap-learn's
  package init imports its parametric (Keras) module. :func:`import_umap`
  keeps that one module from importing; ``umap.UMAP`` is untouched.
* numba compiled umap-learn's kernels anew in every process (20 s for the
  first layout), and from 4,096 points up UMAP builds its neighbour graph
  with pynndescent's NN-descent, whose compilation alone took 39 s.
  :func:`import_umap` turns on numba's on-disk cache for umap-learn's
  kernels (compiled once per install, loaded afterwards), and
  :func:`fit_umap` hands UMAP the exact k nearest neighbours from
  scikit-learn at that size instead of NN-descent's approximate ones (the
  same neighbours UMAP computes itself below 4,096 points).

The cache lives where numba puts it: beside umap-learn's sources when that
folder is writable, else in numba's per-user cache folder (or
``NUMBA_CACHE_DIR``), so read-only installs cache too.
"""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np

__all__ = ["import_umap", "fit_umap", "exact_knn", "warm_up", "SMALL_DATA"]

#: from this many points up, umap-learn would use NN-descent; here: exact neighbours from scikit-learn
SMALL_DATA = 4096
#: umap-learn's modules whose numba kernels get the on-disk cache
_KERNEL_MODULES = ("umap.umap_", "umap.layouts", "umap.utils", "umap.spectral", "umap.distances",
                   "umap.sparse")
_LOCK = threading.Lock()
_READY = False


def import_umap():
    """The ``umap`` module: imported without its TensorFlow part, its numba kernels cached on disk."""
    global _READY
    with _LOCK:
        if not _READY:
            blocked = "umap" not in sys.modules and "umap.parametric_umap" not in sys.modules
            if blocked:  # its import fails, and umap-learn's init carries on without it
                sys.modules["umap.parametric_umap"] = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ImportWarning)
                    import umap  # noqa: F401
            finally:
                if blocked:  # an explicit import of it later still works
                    del sys.modules["umap.parametric_umap"]
            _enable_kernel_cache()
            _READY = True
    return sys.modules["umap"]


def _enable_kernel_cache() -> None:
    import importlib

    from numba.core.dispatcher import Dispatcher

    for name in _KERNEL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - another umap-learn version
            continue
        for fn in vars(module).values():
            if isinstance(fn, Dispatcher) and type(fn._cache).__name__ == "NullCache":
                fn.enable_caching()


def exact_knn(x: np.ndarray, n_neighbors: int, metric: str = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """``(indices, distances)`` of each row's ``n_neighbors`` nearest rows, itself first (as UMAP's)."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=n_neighbors, metric=metric,
                          algorithm="brute" if metric == "cosine" else "auto").fit(x)
    dist, idx = nn.kneighbors(x)
    return idx.astype(np.int32), dist.astype(np.float32)


def warm_up(metric: str = "euclidean") -> None:
    """Compile umap-learn's kernels into numba's cache (or load them), on tiny inputs, in seconds when warm.

    Both routes of :func:`fit_umap` (umap-learn's own exact neighbours, and
    neighbours handed in) with ``metric``, two epochs each: the same kernels,
    of the same types, as real layouts and projections, so that a process
    running them later loads them instead of compiling them again.
    """
    x = np.random.default_rng(0).normal(size=(300, 4))
    fit_umap(x, metric=metric, n_epochs=2)
    fit_umap(x, metric=metric, n_epochs=2, given_neighbors=True)


def fit_umap(x: np.ndarray, *, n_neighbors: int = 15, metric: str = "euclidean", seed: int = 0,
             n_components: int = 2, given_neighbors: bool | None = None, **kwargs) -> np.ndarray:
    """``umap.UMAP(...).fit_transform(x)`` with exact neighbours from :data:`SMALL_DATA` rows up.

    Below :data:`SMALL_DATA` rows UMAP runs exactly as umap-learn runs it; from
    there on it gets scikit-learn's exact k nearest neighbours as
    ``precomputed_knn`` instead of building an approximate graph with
    NN-descent (``given_neighbors`` forces either way). Other keywords go to
    ``umap.UMAP``.
    """
    umap = import_umap()
    x = np.asarray(x)
    if len(x) >= SMALL_DATA if given_neighbors is None else given_neighbors:
        kwargs["precomputed_knn"] = (*exact_knn(x, n_neighbors, metric), None)
    with warnings.catch_warnings():
        # a seed makes UMAP single-threaded, and it says so each time; without a search index
        # it warns that transform() of new points is unavailable (never used here)
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*knn_search_index.*", category=UserWarning)
        reducer = umap.UMAP(n_components=n_components, n_neighbors=n_neighbors, metric=metric,
                            random_state=seed, **kwargs)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)
