"""Instance projection: a subset of samples per group, embedded in 2-D per layer (``REFERENCE.md`` §8).

Per layer, the chosen samples' activations are flattened per sample and
embedded in two dimensions with UMAP, to be drawn as a scatter coloured by
group. Plain parts, each testable alone:

* :func:`choose_samples` — which samples: ``samples_per_group`` of each group,
  the first ones in store order (as the reference, which takes the first
  batches of each group) or a seeded random subset; sorted, so reads go forward;
* :class:`Scratch` — the chosen rows of one layer, read once: the layer's
  stored chunks are walked in order, each chunk holding chosen rows is read
  alone and only its chosen rows are kept, as float32, cut into column blocks
  (:func:`plan_blocks`: ``n × width`` float64 values fit in :data:`BLOCK_MIB`
  MiB). The blocks stay in memory while the rows take at most
  :data:`SCRATCH_MIB` MiB, else they go to an anonymous temporary file,
  written and read back block by block with plain file I/O (gone when closed,
  or when the process ends);
* the PCA of wide layers (more values per sample than ``pca_components``),
  from the scratch, one column block at a time, each block centred by its own
  exact column means (every block holds all ``n`` rows):
  :func:`gram_pca` (``"exact"``, up to :data:`EXACT_MAX_SAMPLES` rows)
  accumulates the ``n × n`` Gram matrix of the centred rows and takes its top
  eigenpairs, whose ``U √λ`` are exactly the PCA scores;
  :func:`randomized_pca` (``"randomized"``, more rows) never forms it: a
  seeded subspace iteration, one pass over the blocks per iteration, then
  the Rayleigh–Ritz eigenpairs of ``Qᵀ G Q``. :func:`scratch_pca` chooses;
  each result records its route in the attribute ``pca_method``;
* :func:`embed_2d` — UMAP (the default, through :func:`inntrospect.analysis.umapfit.fit_umap`)
  or PCA to 2-D.

:func:`instance_projection` ties them together, eagerly (UMAP is eager), and
with ``persist=True`` writes ``projection/<layer>`` into the store.

Memory per layer: the chosen rows (float32, or on disk), one stored chunk,
one float64 column block, and the Gram matrix (``n × n`` float64) or the
iteration's few ``n × (k + oversampling)`` matrices; never the whole layer,
never float64 copies of whole rows.

Tiny layers: UMAP needs a few neighbours, so with fewer than
:data:`MIN_UMAP_SAMPLES` chosen samples the 2-D coordinates are the first two
principal components (zero-padded), and when all chosen samples have the same
activations they are all 0; both cases warn, naming the layer.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np

from .. import store as st
from ..checks import check_bool, check_choice
from ..errors import MissingDependencyError, ParameterError
from ..store import steps

__all__ = ["instance_projection", "persist_projection", "choose_samples", "plan_blocks", "Scratch", "gram_pca",
           "randomized_pca", "scratch_pca", "embed_2d"]

SAMPLINGS = ("random", "first")
METHODS = ("umap", "pca")
#: at most this many MiB of float64 values in one column block of ``n`` rows (at least one column)
BLOCK_MIB = 32.0
#: chosen rows of a layer taking more float32 MiB than this wait in a temporary file, not in memory
#: (with one stored chunk, a float64 block and the libraries, a process then stays near 1.2 GB)
SCRATCH_MIB = 768.0
#: folder of that temporary file (None: Python's temporary folder, i.e. ``TMPDIR``)
SCRATCH_DIR: str | None = None
#: up to this many chosen samples the PCA is exact (Gram matrix); beyond, randomized. The Gram
#: matrix takes n² float64 values and its eigenpairs ~n³ time (measured, one thread: 0.5 s at
#: 2,048 rows, 5 s at 4,096, with 128 MiB), while each randomized pass costs ~n × features × 120
EXACT_MAX_SAMPLES = 4096
#: randomized PCA: columns beyond the components kept, and subspace iterations (passes over the rows)
OVERSAMPLING = 10
POWER_ITERATIONS = 4
#: BLAS threads while the PCA runs (None: BLAS's own default). One, because the
#: passes are large products on a machine whose cores are often busy with other work: there a
#: multi-threaded OpenBLAS waits on its own threads (measured, 210 rows × 20,000 columns per
#: block on 2 busy vCPUs: 35 ms a block with one thread, 200-460 ms with two)
PCA_BLAS_THREADS: int | None = 1
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
    check_choice("sampling", sampling, SAMPLINGS)
    if isinstance(samples_per_group, bool) or int(samples_per_group) != samples_per_group \
            or samples_per_group < 1:
        raise ParameterError(f"samples_per_group must be a positive integer, got {samples_per_group!r}. "
                             f"Pass how many samples of each group to project, e.g. 100.")
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


def plan_blocks(n: int, features: int, block_mib: float | None = None,
                width: int | None = None) -> list[slice]:
    """Consecutive column slices covering ``features``: ``n × width`` float64 values fit in ``block_mib`` MiB.

    ``width`` (columns per block) overrides the budget; every block but the
    last has that many columns, and each has at least one.
    """
    if width is None:
        mib = BLOCK_MIB if block_mib is None else block_mib
        width = int(mib * 2**20 // (8 * max(n, 1)))
    width = max(1, min(int(width), features))
    return [slice(lo, min(lo + width, features)) for lo in range(0, features, width)]


class Scratch:
    """The chosen rows of one layer, flattened, float32, kept as column blocks.

    Rows are written in consecutive runs with :meth:`put`; :meth:`blocks`
    then yields each column block as an ``(n, width)`` float32 array. The
    blocks live in memory when the rows take at most ``budget_mib`` MiB
    (default :data:`SCRATCH_MIB`), else in an anonymous temporary file in
    ``folder`` (default :data:`SCRATCH_DIR`) laid out block after block, each
    block row-major, written and read back with plain unbuffered file I/O at
    computed offsets (no memory map: the file's pages stay in the page cache,
    not in this process). Use it as a context manager: closing removes the
    file (which, where the system allows, has no name in ``folder`` at all).
    """

    def __init__(self, n: int, features: int, width: int | None = None,
                 budget_mib: float | None = None, folder: str | None = None):
        self.n, self.features = int(n), int(features)
        self.slices = plan_blocks(self.n, self.features, width=width)
        budget = SCRATCH_MIB if budget_mib is None else budget_mib
        self.on_disk = self.n * self.features * 4 > budget * 2**20
        self._arrays: list[np.ndarray] | None = None
        self._file = None
        if self.on_disk:
            self._file = tempfile.TemporaryFile(prefix="inntrospect-projection-", buffering=0,
                                                dir=SCRATCH_DIR if folder is None else folder)
        else:
            self._arrays = [np.empty((self.n, s.stop - s.start), np.float32) for s in self.slices]

    def put(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (``(r, features)``) as the scratch rows ``start`` to ``start + r``."""
        rows = np.asarray(rows, dtype=np.float32).reshape(len(rows), self.features)
        for j, s in enumerate(self.slices):
            part = rows[:, s]
            if self._arrays is not None:
                self._arrays[j][start : start + len(rows)] = part
            else:
                _write_at(self._file, np.ascontiguousarray(part),
                          4 * (self.n * s.start + start * (s.stop - s.start)))

    def blocks(self) -> Iterator[np.ndarray]:
        """Each column block in turn: an ``(n, width)`` float32 array."""
        for j, s in enumerate(self.slices):
            if self._arrays is not None:
                yield self._arrays[j]
            else:
                out = np.empty((self.n, s.stop - s.start), np.float32)
                _read_at(self._file, out, 4 * self.n * s.start)
                yield out

    def close(self) -> None:
        """Free the blocks and remove the temporary file."""
        self._arrays = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_at(file, arr: np.ndarray, offset: int) -> None:
    """Write the C-contiguous ``arr`` into the unbuffered ``file`` from byte ``offset``."""
    view = memoryview(arr).cast("B")
    file.seek(offset)
    while len(view):
        view = view[file.write(view):]


def _read_at(file, out: np.ndarray, offset: int) -> None:
    """Fill the C-contiguous ``out`` from the unbuffered ``file``, from byte ``offset``."""
    view = memoryview(out).cast("B")
    file.seek(offset)
    while len(view):
        done = file.readinto(view)
        if not done:
            raise OSError(f"the projection's scratch file ended early, {len(view)} bytes short.")
        view = view[done:]


def _centred(block: np.ndarray) -> np.ndarray:
    """``block`` as float64, each column minus its mean (float64, over all rows)."""
    return np.subtract(block, block.mean(axis=0, dtype=np.float64), dtype=np.float64)


def _blas_threads():
    """Limit BLAS to :data:`PCA_BLAS_THREADS` threads for the passes over the blocks (when set)."""
    import contextlib

    if PCA_BLAS_THREADS is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=PCA_BLAS_THREADS, user_api="blas")


def _top_eigen(g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (descending, negatives clipped to 0) of symmetric ``g`` (upper triangle
    read), and their eigenvectors."""
    from scipy.linalg import eigh

    n = len(g)
    lam, vec = eigh(g, lower=False, subset_by_index=[n - k, n - 1], overwrite_a=True, check_finite=False)
    return np.maximum(lam[::-1], 0.0), vec[:, ::-1]


def _scores(vec: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """PCA scores ``vec √lam``, each column's largest-magnitude entry made positive."""
    s = vec * np.sqrt(lam)
    if s.size:
        signs = np.sign(s[np.argmax(np.abs(s), axis=0), np.arange(s.shape[1])])
        s *= np.where(signs == 0, 1.0, signs)
    return s


def _explained(lam: np.ndarray, trace: float) -> float:
    return min(float(np.sum(lam)) / trace, 1.0) if trace > 0 else 1.0


def gram_pca(scratch: Scratch, n_components: int, progress: bool = False,
             desc: str = "pca") -> tuple[np.ndarray, float]:
    """Exact PCA scores of the scratch's rows: ``(scores (n, k) float64, explained variance)``.

    Each column block, centred by its column means, adds ``Xc Xcᵀ`` to the
    ``n × n`` float64 Gram matrix ``G`` (BLAS ``syrk``, in place). With ``G``'s
    top eigenpairs ``(λ, U)`` the scores are ``U √λ``, the projections of the
    centred rows on the top principal axes (as ``sklearn.decomposition.PCA``'s
    ``transform``, up to each column's sign, which here makes each column's
    largest-magnitude entry positive). The explained variance is the
    fraction of ``trace(G)`` the ``k`` eigenvalues hold (1.0 when all rows
    are equal).
    """
    from scipy.linalg.blas import dsyrk

    n, k = scratch.n, min(int(n_components), scratch.n)
    g = np.zeros((n, n), order="F")
    with _blas_threads():
        for block in _bar(scratch.blocks(), progress, desc, len(scratch.slices)):
            xc = _centred(block)
            g = dsyrk(1.0, xc.T, beta=1.0, c=g, trans=1, overwrite_c=True)  # upper triangle of G + Xc Xcᵀ
        trace = float(np.trace(g))
        lam, vec = _top_eigen(g, k)
    return _scores(vec, lam), _explained(lam, trace)


def _gram_times(scratch: Scratch, q: np.ndarray, bar) -> tuple[np.ndarray, float]:
    """``(G q, trace G)`` in one pass over the blocks, ``G`` the Gram matrix of the centred rows."""
    y = np.zeros_like(q)
    trace = 0.0
    for block in scratch.blocks():
        xc = _centred(block)
        y += xc @ (xc.T @ q)
        trace += float(np.einsum("ij,ij->", xc, xc))
        bar.update(1)
    return y, trace


def randomized_pca(scratch: Scratch, n_components: int, seed: int = 0,
                   iterations: int | None = None, oversampling: int | None = None,
                   progress: bool = False, desc: str = "pca") -> tuple[np.ndarray, float]:
    """Randomized PCA scores of the scratch's rows, without the Gram matrix: ``(scores, explained variance)``.

    Subspace iteration on ``G = Xc Xcᵀ`` (never formed): from a Gaussian
    ``(n, k + oversampling)`` matrix drawn with ``numpy.random.default_rng(seed)``,
    ``iterations`` times ``Q ← qr(G Q)``, each product one pass over the
    column blocks (``Σ_b Xc_b (Xc_bᵀ Q)``); then one more pass gives
    ``Qᵀ G Q``, whose top ``k`` eigenpairs ``(λ, V)`` give the scores
    ``Q V √λ`` (signs as :func:`gram_pca`'s) and, with ``trace G`` summed on
    the way, the explained variance. Defaults: :data:`POWER_ITERATIONS`,
    :data:`OVERSAMPLING`. Accurate where the spectrum has a gap after the
    ``k``-th component; the same inputs give the same scores.
    """
    iterations = POWER_ITERATIONS if iterations is None else int(iterations)
    oversampling = OVERSAMPLING if oversampling is None else int(oversampling)
    n, k = scratch.n, min(int(n_components), scratch.n)
    p = min(n, k + oversampling)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, p)))
    bar = _bar(None, progress, desc, (iterations + 1) * len(scratch.slices))
    with bar, _blas_threads():
        for _ in range(iterations):
            q, _ = np.linalg.qr(_gram_times(scratch, q, bar)[0])
        gq, trace = _gram_times(scratch, q, bar)
        b = q.T @ gq
        lam, v = _top_eigen((b + b.T) / 2, k)
    return _scores(q @ v, lam), _explained(lam, trace)


def scratch_pca(scratch: Scratch, n_components: int, seed: int = 0, progress: bool = False,
                desc: str = "pca") -> tuple[np.ndarray, float, str]:
    """``(scores, explained variance, method)``: :func:`gram_pca` (``"exact"``) up to
    :data:`EXACT_MAX_SAMPLES` rows, else :func:`randomized_pca` (``"randomized"``)."""
    if scratch.n <= EXACT_MAX_SAMPLES:
        return (*gram_pca(scratch, n_components, progress, desc), "exact")
    return (*randomized_pca(scratch, n_components, seed, progress=progress, desc=desc), "randomized")


def pca_2d(x: np.ndarray) -> np.ndarray:
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

    UMAP runs through :func:`inntrospect.analysis.umapfit.fit_umap` with ``seed`` and
    ``n_jobs=1`` (the same inputs give the same coordinates) and
    ``n_neighbors=min(15, n - 1)``. With fewer than :data:`MIN_UMAP_SAMPLES`
    rows it falls back to PCA; when all rows are equal every coordinate is 0.
    Both fallbacks warn, naming ``name``.
    """
    check_choice("method", method, METHODS)
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
        return pca_2d(x)
    if n < MIN_UMAP_SAMPLES:
        warnings.warn(f"only {n} samples of {name}: UMAP needs at least {MIN_UMAP_SAMPLES}, so "
                      "the 2-D coordinates are the first two principal components instead. "
                      "Choose more samples per group for UMAP.", UserWarning, stacklevel=3)
        return pca_2d(x)
    try:
        from .umapfit import fit_umap
    except ImportError as err:  # pragma: no cover - umap-learn is a dependency
        raise MissingDependencyError("instance_projection needs umap-learn: pip install umap-learn "
                                     "(or pass method='pca').") from err
    return fit_umap(x, n_neighbors=min(N_NEIGHBORS, n - 1), seed=seed, n_jobs=1)


# -- reading ---------------------------------------------------------------------
def _chosen_chunks(data, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(position among the chosen rows, chosen rows)`` per stored chunk holding any, in order."""
    chunks = getattr(data, "chunks", None)
    lengths = chunks[0] if chunks is not None else (data.shape[0],)
    bounds = np.cumsum((0, *lengths))
    parts = np.split(rows, np.searchsorted(rows, bounds[1:-1]))
    starts = np.cumsum([0] + [len(p) for p in parts])
    return [(int(s), p) for s, p in zip(starts, parts) if len(p)]


def read_chunk_rows(data, rows: np.ndarray) -> np.ndarray:
    """The given rows of one stored chunk of a (lazy) layer array: ``(len(rows), features)`` float32.

    One take on that chunk, computed alone: the chunk is read, its other rows dropped.
    """
    part = data[rows]
    part = part.compute() if hasattr(part, "compute") else np.asarray(part)
    return np.asarray(part, dtype=np.float32).reshape(len(rows), -1)


def read_chosen(data, rows: np.ndarray, put: Callable[[int, np.ndarray], None], progress: bool,
                 desc: str) -> None:
    """Walk the stored chunks in order, handing each one's chosen rows to ``put(position, rows)``."""
    chunks = _chosen_chunks(data, np.asarray(rows, dtype=np.int64))
    with _bar(None, progress, desc, len(chunks), "chunk") as bar:
        for start, part in chunks:
            put(start, read_chunk_rows(data, part))
            bar.update(1)


def _bar(items, progress: bool, desc: str, total: int | None = None, unit: str = "block"):
    """``items`` with a transient progress bar (:func:`inntrospect.scheduler.bar`); with ``items=None``, one to update."""
    from ..scheduler import bar

    return bar(items, progress=progress, desc=desc, total=total, unit=unit, leave=False)


def _open(store):
    """(tree, root attributes, path or None) of a store given by path or as an opened tree."""
    import xarray as xr

    if isinstance(store, xr.DataTree):
        return store, dict(store.attrs), None
    store = st.Store.open(store)
    tree = store.tree()  # raises IncompleteStoreError
    return tree, dict(tree.attrs), store


def _project_layer(data, rows: np.ndarray, pca_components: int, method: str, seed: int,
                   layer: str, progress: bool) -> tuple[np.ndarray, int, float, str]:
    """One layer: (xy, PCA components used or 0, explained variance, PCA method or "none")."""
    features = int(np.prod(data.shape[1:], dtype=np.int64))
    n = len(rows)
    if pca_components > 0 and features > pca_components and n >= MIN_UMAP_SAMPLES:
        k = min(pca_components, n, features)
        with Scratch(n, features) as scratch:
            read_chosen(data, rows, scratch.put, progress, f"read {layer}")
            reduced, explained, how = scratch_pca(scratch, k, seed, progress, f"pca {layer}")
        return embed_2d(reduced, method, seed, f"layer {layer}"), k, explained, how
    x = np.empty((n, features), np.float32)  # no PCA: narrow rows (or very few, or asked for none)

    def put(start: int, part: np.ndarray) -> None:
        x[start : start + len(part)] = part

    read_chosen(data, rows, put, progress, f"read {layer}")
    return embed_2d(x, method, seed, f"layer {layer}"), 0, 1.0, "none"


# -- public entry ----------------------------------------------------------------
def persist_projection(store, results: dict) -> dict:
    """Write projections computed by :func:`instance_projection` (``persist=False``) into the store.

    For computing them elsewhere (another process, while other steps write)
    and storing them afterwards. They must come from the extraction the store
    holds now: else :class:`~inntrospect.errors.StaleResultError`, naming the
    command to re-run. Returns them with their stored attributes.
    """
    from ..errors import StaleResultError

    store = steps.writable(store, "persist_projection")
    if not results:
        raise ParameterError("expected projections of at least one layer, got none. Pass what "
                             "instance_projection(store, persist=False) returned.")
    first = next(iter(results.values()))
    with store.writing():
        if any(ds.attrs["inputs"]["extraction"] != store.extraction_id for ds in results.values()):
            raise StaleResultError(f"{store} was extracted anew while these projections were "
                                   "computed; project again: inntrospect project CONFIG")
        return steps.persist(store, "projection", first.attrs["params"], {}, results)


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
        principal components (exact up to :data:`EXACT_MAX_SAMPLES` chosen
        samples, randomized beyond; see :func:`scratch_pca`); 0 turns it off.
    method : {"umap", "pca"}
        The 2-D embedding: UMAP (default, as the reference) or the first two
        principal components (fast and deterministic; for tests and previews).
    persist : bool
        Also write ``projection/<layer>`` into the store (needs a path).
    progress : bool
        Show progress bars over layers, the chunks read and the PCA's blocks.

    Returns
    -------
    dict of xarray.Dataset
        ``{layer: Dataset}`` with ``xy`` (``sample``, ``coord``) float64 and
        ``group`` (``sample``), ``sample`` being the row index in the store.
        Attributes ``step``, ``layer``, ``params`` (as requested), ``inputs``,
        ``pca_components_used`` (0 without PCA),
        ``explained_variance`` (1.0 without PCA), ``pca_method``
        (``"exact"``, ``"randomized"`` or ``"none"``); and ``id`` when persisted.

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
    check_choice("sampling", sampling, SAMPLINGS)
    check_choice("method", method, METHODS)
    check_bool(persist=persist, progress=progress)
    if isinstance(pca_components, bool) or int(pca_components) != pca_components or pca_components < 0:
        raise ParameterError(f"pca_components must be an integer >= 0 (0: no PCA), got "
                             f"{pca_components!r}. Pass e.g. 50 (the default).")
    params = {"samples_per_group": int(samples_per_group), "sampling": sampling, "seed": int(seed),
              "pca_components": int(pca_components), "method": method}
    if persist:
        store = steps.writable(store, "instance_projection(persist=True)")
        with store.writing():
            results = instance_projection(store, samples_per_group, sampling, seed, layers=layers,
                                          pca_components=pca_components, method=method,
                                          progress=progress)
            return steps.persist(store, "projection", params, {}, results)
    choose_samples([], samples_per_group, sampling, seed)  # validates before opening anything
    tree, attrs, path = _open(store)
    names = steps.select_layers(attrs.get("layers", []), layers, path if path is not None else "the store")
    if path is not None:
        st.check_chunks(path, names, ("acts",))  # a missing chunk would read as NaN
    inputs = {"extraction": attrs.get("extraction", {}).get("id")}
    result = {}
    if not names:
        return result
    labels = np.asarray(tree[st.layer_path(names[0])]["group"].values).astype(object).astype(str)
    rows = choose_samples(labels, samples_per_group, sampling, seed)
    import xarray as xr

    from ..scheduler import progress_bar

    for layer in progress_bar(names, progress, "projection", len(names)):
        data = tree[st.layer_path(layer)]["acts"].data
        xy, k, explained, how = _project_layer(data, rows, int(pca_components), method, int(seed),
                                               layer, progress)
        result[layer] = xr.Dataset(
            {"xy": (("sample", "coord"), xy), "group": ("sample", labels[rows])},
            coords={"sample": rows, "coord": ["x", "y"]},
            attrs={"step": "projection", "layer": layer, "params": params, "pca_components_used": k,
                   "inputs": inputs, "explained_variance": float(explained), "pca_method": how},
        )
    return result
