"""Instance projection: a subset of samples per group, embedded in 2-D per layer (``REFERENCE.md`` §8).

Per layer, the chosen samples' activations are flattened per sample and
embedded in two dimensions with UMAP, to be drawn as a scatter coloured by
group. Three plain parts, each testable alone:

* :func:`choose_samples` — which samples: ``samples_per_group`` of each group,
  the first ones in store order (as the reference, which takes the first
  batches of each group) or a seeded random subset; sorted, so reads go forward;
* :func:`streamed_pca` — wide layers (more values per sample than
  ``pca_components``) are reduced first by an incremental PCA fitted over
  batches of the chosen rows and applied batch by batch: memory holds one
  batch and the PCA model, never a layer nor the whole subset;
* :func:`embed_2d` — UMAP (the default) or PCA to 2-D.

:func:`instance_projection` ties them together, eagerly (UMAP is eager), and
with ``persist=True`` writes ``projection/<layer>`` into the store.

Batches (:func:`plan_batches`) hold consecutive chosen rows: as many as fit in
:data:`BATCH_MIB` MiB of float64 values, but never fewer than the PCA's
number of components (an incremental PCA step needs that many rows); a short
last batch is merged into the one before it. Each batch is read through the
layer's dask array, one small take per stored chunk it touches, so only the
chosen rows of each chunk are kept.

Tiny layers: UMAP needs a few neighbours, so with fewer than
:data:`MIN_UMAP_SAMPLES` chosen samples the 2-D coordinates are the first two
principal components (zero-padded), and when all chosen samples have the same
activations they are all 0; both cases warn, naming the layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np

from . import steps
from . import store as st

__all__ = ["instance_projection", "choose_samples", "plan_batches", "streamed_pca", "embed_2d"]

SAMPLINGS = ("random", "first")
METHODS = ("umap", "pca")
#: most float64 values one batch of rows holds, in MiB (the PCA needs at least its components' rows)
BATCH_MIB = 64.0
#: fewer chosen samples than this: no UMAP (too few neighbours), PCA to 2-D instead
MIN_UMAP_SAMPLES = 5
#: UMAP's neighbourhood size (its default), capped at the number of samples - 1
N_NEIGHBORS = 15


# -- numpy kernels ---------------------------------------------------------------
def choose_samples(labels: Sequence, samples_per_group: int = 100,
                   sampling: Literal["random", "first"] = "random", seed: int = 0) -> np.ndarray:
    """Row indices of the chosen samples, sorted: ``samples_per_group`` of each group.

    ``"first"`` takes the first samples of each group in store order;
    ``"random"`` a random subset of each group, drawn with
    ``numpy.random.default_rng(seed)`` group after group in sorted group order.
    Groups with fewer samples give all of them.
    """
    _check_choice("sampling", sampling, SAMPLINGS)
    if isinstance(samples_per_group, bool) or int(samples_per_group) != samples_per_group \
            or samples_per_group < 1:
        raise ValueError(f"samples_per_group must be a positive integer, got {samples_per_group!r}.")
    n = int(samples_per_group)
    labels = np.asarray(labels)
    if labels.dtype.kind != "U":
        labels = labels.astype(object).astype(str)
    rng = np.random.default_rng(seed)
    chosen = []
    for g in np.unique(labels):
        rows = np.flatnonzero(labels == g)
        if len(rows) <= n:
            chosen.append(rows)
        elif sampling == "first":
            chosen.append(rows[:n])
        else:
            chosen.append(rng.choice(rows, size=n, replace=False))
    out = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return np.sort(out).astype(np.int64)


def plan_batches(n: int, features: int, min_rows: int = 1, batch_mib: float | None = None) -> list[slice]:
    """Consecutive slices of ``n`` rows: at most ``batch_mib`` MiB of float64 each, at least ``min_rows``.

    A short last batch is merged into the one before it, so every batch has at
    least ``min_rows`` rows (when ``n`` does).
    """
    mib = BATCH_MIB if batch_mib is None else batch_mib
    rows = max(int(min_rows), 1, int(mib * 2**20 // (8 * max(features, 1))))
    bounds = list(range(0, n, rows)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < min_rows:
        del bounds[-2]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _fresh_ipca(k: int):
    from sklearn.decomposition import IncrementalPCA

    return IncrementalPCA(n_components=k)


def streamed_pca(batches, n_components: int, progress: bool = False, desc: str = "pca"):
    """Fit an incremental PCA over ``batches`` and project them: ``(reduced, explained variance)``.

    ``batches`` is a callable returning a fresh iterator of ``(rows, features)``
    float arrays (it is walked twice: to fit, then to transform), each with at
    least ``n_components`` rows. ``reduced`` is ``(n, n_components)``; the
    explained variance is the fraction of the total variance the components
    keep (1.0 when there is no variance at all).
    """
    ipca = _fresh_ipca(n_components)
    for x in _bar(batches(), progress, f"{desc} fit"):
        ipca.partial_fit(x)
    reduced = [ipca.transform(x) for x in _bar(batches(), progress, f"{desc} transform")]
    total = float(np.sum(ipca.var_)) * ipca.n_samples_seen_
    explained = float(np.sum(ipca.explained_variance_)) * (ipca.n_samples_seen_ - 1) / total \
        if total > 0 else 1.0
    return np.concatenate(reduced).astype(np.float64), min(explained, 1.0)


def _pca_2d(x: np.ndarray) -> np.ndarray:
    """The first two principal components of ``x`` (rows), zero-padded to 2 columns."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    out = np.zeros((len(x), 2))
    if len(x) < 2 or not np.any(centred):
        return out
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = min(2, len(s))
    xy = u[:, :k] * s[:k]
    signs = np.sign(xy[np.argmax(np.abs(xy), axis=0), np.arange(k)])  # deterministic signs
    out[:, :k] = xy * np.where(signs == 0, 1.0, signs)
    return out


def embed_2d(x: np.ndarray, method: Literal["umap", "pca"] = "umap", seed: int = 0,
             name: str = "the samples") -> np.ndarray:
    """2-D coordinates ``(n, 2)`` float64 of the rows of ``x``, by UMAP (default) or PCA.

    UMAP runs with ``random_state=seed`` (so single-threaded: the same inputs
    give the same coordinates) and ``n_neighbors=min(15, n - 1)``. With fewer
    than :data:`MIN_UMAP_SAMPLES` rows it falls back to PCA; when all rows are
    equal every coordinate is 0. Both fallbacks warn, naming ``name``.
    """
    _check_choice("method", method, METHODS)
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = len(x)
    if n == 0:
        return np.zeros((0, 2))
    if n < 2 or not np.any(x != x[0]):
        if n > 1:
            warnings.warn(f"all {n} chosen samples of {name} have the same activations: "
                          "their 2-D coordinates are all 0.", UserWarning, stacklevel=3)
        return np.zeros((n, 2))
    if method == "pca":
        return _pca_2d(x)
    if n < MIN_UMAP_SAMPLES:
        warnings.warn(f"only {n} samples of {name}: UMAP needs at least {MIN_UMAP_SAMPLES}, so "
                      "the 2-D coordinates are the first two principal components instead. "
                      "Choose more samples per group for UMAP.", UserWarning, stacklevel=3)
        return _pca_2d(x)
    try:
        import umap
    except ImportError as err:  # pragma: no cover - umap-learn is a dependency
        raise ImportError("instance_projection needs umap-learn: pip install umap-learn "
                          "(or pass method='pca').") from err
    with warnings.catch_warnings():  # a seed makes UMAP single-threaded, and it says so each time
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden", category=UserWarning)
        reducer = umap.UMAP(n_components=2, n_neighbors=min(N_NEIGHBORS, n - 1),
                            random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64)


# -- reading ---------------------------------------------------------------------
def _read_rows(data, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows of a (lazy) layer array, flattened per sample, float64.

    One take per stored chunk the rows fall in, computed together: only the
    chosen rows of each chunk stay in memory.
    """
    import dask

    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        return np.zeros((0, int(np.prod(data.shape[1:], dtype=np.int64))))
    if not hasattr(data, "chunks") or data.chunks is None:  # a numpy array
        return np.asarray(data[rows], dtype=np.float64).reshape(len(rows), -1)
    bounds = np.cumsum((0, *data.chunks[0]))
    cut = np.searchsorted(rows, bounds[1:-1])
    parts = [data[part] for part in np.split(rows, cut) if len(part)]
    out = np.concatenate(dask.compute(*parts))
    return out.reshape(len(rows), -1).astype(np.float64, copy=False)


def _bar(items, progress: bool, desc: str):
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", leave=False)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def _open(store):
    """(tree, root attributes, path or None) of a store given by path or as an opened tree."""
    import xarray as xr

    if isinstance(store, xr.DataTree):
        return store, dict(store.attrs), None
    tree = st.open_store(store)  # raises IncompleteStoreError
    return tree, dict(tree.attrs), store


def _project_layer(data, rows: np.ndarray, pca_components: int, method: str, seed: int,
                   layer: str, progress: bool) -> tuple[np.ndarray, int, float]:
    """One layer: (xy, PCA components used or 0, explained variance)."""
    features = int(np.prod(data.shape[1:], dtype=np.int64))
    n = len(rows)
    k = min(pca_components, n, features)
    if pca_components > 0 and features > pca_components and n >= MIN_UMAP_SAMPLES:
        batches = plan_batches(n, features, min_rows=k)
        if len(batches) == 1:  # read once, for the fit and the transform
            x = _read_rows(data, rows)
            reduced, explained = streamed_pca(lambda: iter([x]), k)
            del x
        else:
            def read() -> Iterator[np.ndarray]:
                for b in batches:
                    yield _read_rows(data, rows[b])

            reduced, explained = streamed_pca(read, k, progress, f"pca {layer}")
        return embed_2d(reduced, method, seed, f"layer {layer}"), k, explained
    batches = plan_batches(n, features)  # no PCA: narrow rows (or very few, or asked for none)
    x = np.concatenate([_read_rows(data, rows[b]) for b in batches]) if n else np.zeros((0, features))
    return embed_2d(x, method, seed, f"layer {layer}"), 0, 1.0


# -- public entry ----------------------------------------------------------------
def instance_projection(store, samples_per_group: int = 100,
                        sampling: Literal["random", "first"] = "random", seed: int = 0, *,
                        layers: Sequence[str] | str | None = None, pca_components: int = 50,
                        method: Literal["umap", "pca"] = "umap", persist: bool = False,
                        progress: bool = False) -> dict:
    """2-D embeddings of a subset of samples per group, per layer (``REFERENCE.md`` §8).

    Parameters
    ----------
    store : str, os.PathLike or xarray.DataTree
        The store (a path; an opened tree works unless ``persist``).
    samples_per_group : int
        Samples taken from each group (groups with fewer give all of theirs).
    sampling : {"random", "first"}
        A random subset of each group (drawn with ``seed``), or its first
        samples in store order (as the reference).
    seed : int
        Seeds the sampling and UMAP: the same inputs give the same coordinates.
    layers : list of str, optional
        Layers to project (default: all layers of the store).
    pca_components : int
        Layers with more values per sample are first reduced to this many
        principal components by a streamed, incremental PCA; 0 turns it off.
    method : {"umap", "pca"}
        The 2-D embedding: UMAP (default, as the reference) or the first two
        principal components (fast and deterministic; for tests and previews).
    persist : bool
        Also write ``projection/<layer>`` into the store (needs a path).
    progress : bool
        Show progress bars over layers (and PCA batches).

    Returns
    -------
    dict of xarray.Dataset
        ``{layer: Dataset}`` with ``xy`` (``sample``, ``coord``) float64 and
        ``group`` (``sample``), ``sample`` being the row index in the store.
        Attributes ``step``, ``layer``, ``params`` (as requested), ``inputs``,
        ``pca_components_used`` (0 without PCA),
        ``explained_variance`` (1.0 without PCA); and ``id`` when persisted.

    Raises
    ------
    LayerNotFoundError
        A name in ``layers`` is not a layer of the store; the message lists them.
    ValueError
        An unknown ``sampling`` or ``method``, or ``samples_per_group < 1``.
    IncompleteStoreError
        The extraction into the store has not finished.

    Examples
    --------
    >>> xy = inntrospect.instance_projection("run.zarr", 100, "first")   # doctest: +SKIP
    >>> xy["dense_1"].xy.values.shape                                      # doctest: +SKIP
    (1000, 2)
    """
    _check_choice("sampling", sampling, SAMPLINGS)
    _check_choice("method", method, METHODS)
    if isinstance(pca_components, bool) or int(pca_components) != pca_components or pca_components < 0:
        raise ValueError(f"pca_components must be an integer >= 0 (0: no PCA), got {pca_components!r}.")
    params = {"samples_per_group": int(samples_per_group), "sampling": sampling, "seed": int(seed),
              "pca_components": int(pca_components), "method": method}
    if persist:
        steps.need_path(store, "instance_projection(persist=True)")
        with st.writer_lock(store):
            results = instance_projection(store, samples_per_group, sampling, seed, layers=layers,
                                          pca_components=pca_components, method=method,
                                          progress=progress)
            attrs = st.store_attrs(store)
            rec = steps.new_record("projection", params, {"extraction": attrs["extraction"]["id"]},
                                   list(results))
            return steps.write_results(store, rec, results)
    choose_samples([], samples_per_group, sampling, seed)  # validates before opening anything
    tree, attrs, path = _open(store)
    names = steps.select_layers(attrs.get("layers", []), layers, path if path is not None else "the store")
    inputs = {"extraction": attrs.get("extraction", {}).get("id")}
    result = {}
    if not names:
        return result
    labels = np.asarray(tree[f"layers/{names[0]}"]["group"].values).astype(object).astype(str)
    rows = choose_samples(labels, samples_per_group, sampling, seed)
    import xarray as xr

    from .cluster import progress_bar

    for layer in progress_bar(names, progress, "projection", len(names)):
        data = tree[f"layers/{layer}"]["acts"].data
        xy, k, explained = _project_layer(data, rows, int(pca_components), method, int(seed),
                                          layer, progress)
        result[layer] = xr.Dataset(
            {"xy": (("sample", "coord"), xy), "group": ("sample", labels[rows])},
            coords={"sample": rows, "coord": ["x", "y"]},
            attrs={"step": "projection", "layer": layer, "params": params, "pca_components_used": k,
                   "inputs": inputs, "explained_variance": float(explained)},
        )
    return result
