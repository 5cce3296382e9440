"""Stream a corpus through a model into the store, resumably.

The corpus is cut into extraction blocks of ``plan.block`` samples. Inside a
block, inference batches go through the model; each array's rows are kept as
views of the model's output until they fill a chunk, and a small writer pool
joins and writes each chunk as one chunk-aligned region while the model
computes the next batches (the bytes in flight are bounded). A block is
recorded in ``extraction/block_done`` only after every write of it has
finished, so a run killed at any point resumes at the first unrecorded block
and recomputes nothing that was recorded.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .. import store as st
from ..errors import ConfigError, CorpusError, NonFiniteError
from ..store.info import format_bytes
from .corpus import Corpus, read_corpus
from .models.source import ModelSource, model_source

__all__ = ["extract", "prepare_extraction", "run_extraction", "Extraction", "CODEC", "MIN_RATIO"]

#: The codec of activation and gradient chunks, measured on real activations to
#: write fastest for its ratio (benchmarks/bench_codecs.py, benchmarks/README.md).
CODEC = {"name": "zstd", "level": 1}
#: Arrays that compress less than this on the first batch are stored uncompressed:
#: dense gradients gain ~10 % of space for CPU time extraction cannot spare.
MIN_RATIO = 1.25


GradientTarget = Literal["predicted", "target"]


@dataclass
class Extraction:
    """Everything an extraction needs, validated; nothing written yet."""

    corpus: Corpus
    model: object  # KerasModel; typed loosely so this module imports without TensorFlow
    path: st.Location
    plan: st.ChunkPlan
    gradient_target: str
    batch_size: int
    attrs: dict
    #: the arguments of :func:`prepare_extraction`, picklable: how a dask worker prepares the same
    request: dict | None = None

    @property
    def n_blocks(self) -> int:
        return self.plan.n_blocks(self.corpus.n_samples)

    def arrays(self):
        """``(layer, variable, index into model outputs)`` for every array written."""
        for i, info in enumerate(self.model.layers):
            yield info, "acts", i
            if info.has_grads:
                yield info, "grads", i

    def summary(self, estimate_ratio: float | None = None) -> str:
        """What ``--dry-run`` prints: samples, layers, shapes, sizes."""
        n = self.corpus.n_samples
        lines = [
            f"model:   {self.model.source.describe()} ({self.model.framework})",
            f"corpus:  {self.corpus.csv_path}: {n} samples in {len(self.corpus.files)} files, "
            f"groups {', '.join(self.corpus.groups)}",
            f"store:   {self.path}",
            f"gradient target: {self.gradient_target}; batch {self.batch_size}; "
            f"block {self.plan.block} samples ({self.n_blocks} blocks)",
            f"{'layer':<24} {'shape per sample':<20} {'arrays':<11} {'chunk':>7} {'size':>10}",
        ]
        total = 0
        for info in self.model.layers:
            k = 2 if info.has_grads else 1
            size = k * info.bytes_per_sample * n
            total += size
            lines.append(
                f"{info.name:<24} {str(info.shape):<20} {'acts+grads' if k == 2 else 'acts':<11} "
                f"{self.plan.chunks[info.name]:>7} {format_bytes(size):>10}"
            )
        lines.append(f"uncompressed: {format_bytes(total)}")
        if estimate_ratio:
            lines.append(
                f"estimated on disk: {format_bytes(total / estimate_ratio)} "
                f"(compression {estimate_ratio:.1f}x measured on the first batch)"
            )
        return "\n".join(lines)


def prepare_extraction(
    model: str | os.PathLike | ModelSource,
    corpus: str | os.PathLike | Corpus,
    store: str | os.PathLike,
    layers: Sequence[str] | None = None,
    gradient_target: GradientTarget = "predicted",
    chunk_mib: float | None = None,
    batch_size: int = 128,
    weights: str | os.PathLike | None = None,
) -> Extraction:
    """Validate corpus, model, layers and settings; load the model. Writes nothing."""
    from .models.keras import KerasModel

    if gradient_target not in ("predicted", "target"):
        raise ConfigError(
            f"gradient_target must be 'predicted' or 'target', got {gradient_target!r}."
        )
    if not (isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    corp = corpus if isinstance(corpus, Corpus) else read_corpus(corpus)
    if gradient_target == "target" and not corp.has_target:
        raise CorpusError(
            f"gradient_target='target' needs a target column in {corp.csv_path} "
            "(rows 'file,group,target'); add it or use gradient_target='predicted'."
        )
    source = model_source(model, weights)
    km = KerasModel(source, layers)
    corp.check_input_shape(km.input_shape, source.describe())
    km.fix_shapes(corp.sample_shape)
    if gradient_target == "target":
        top = int(corp.sample_table["target"].max())
        if top >= km.n_outputs:
            raise CorpusError(
                f"{corp.csv_path} has target {top}, but the model has only {km.n_outputs} "
                f"outputs (targets 0..{km.n_outputs - 1})."
            )
    path = st.location(store)
    if chunk_mib is None and st.is_store(path):  # resuming: keep the store's chunking
        chunk_mib = st.store_attrs(path).get("chunk_mib")
    plan = st.plan_chunks(
        {i.name: i.bytes_per_sample for i in km.layers},
        chunk_mib,
        sum(i.bytes_per_sample * (2 if i.has_grads else 1) for i in km.layers),
        # no chunk longer than the corpus needs (uncompressed chunks are stored whole)
        max_samples=min(st.MAX_CHUNK_SAMPLES, 1 << max(0, corp.n_samples - 1).bit_length()),
    )
    attrs = {
        "format": st.FORMAT,
        "format_version": st.FORMAT_VERSION,
        "model": km.identity(),
        "corpus": corp.identity(),
        "layers": [i.name for i in km.layers],
        "chunk_mib": plan.chunk_mib,
        "chunks": plan.chunks,
        "extraction": {
            "gradient_target": gradient_target,
            "block": plan.block,
            "n_blocks": plan.n_blocks(corp.n_samples),
        },
    }
    request = {"model": source, "corpus": str(corp.csv_path), "store": path,
               "layers": None if layers is None else tuple(layers), "gradient_target": gradient_target,
               "chunk_mib": plan.chunk_mib, "batch_size": batch_size}
    return Extraction(corp, km, path, plan, gradient_target, batch_size, attrs, request)


def measure_ratios(ex: Extraction, n: int | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """``{layer: {var: (raw bytes, zstd bytes)}}`` of the arrays of the first batch."""
    import numcodecs

    codec = numcodecs.Zstd(level=CODEC["level"])
    x = ex.corpus.read(0, min(n or ex.batch_size, ex.corpus.n_samples))
    acts, grads, _ = ex.model.compute(x, _targets(ex, 0, len(x)), pad_to=ex.batch_size)
    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    for info, var, i in ex.arrays():
        a = np.ascontiguousarray((acts if var == "acts" else grads)[i], dtype=np.float32)
        sizes.setdefault(info.name, {})[var] = (a.nbytes, len(codec.encode(a)))
    return sizes


def choose_codecs(sizes: dict[str, dict[str, tuple[int, int]]]) -> dict[str, dict[str, dict | None]]:
    """:data:`CODEC` for arrays that compress at least :data:`MIN_RATIO`, else none."""
    return {
        layer: {var: dict(CODEC) if raw >= MIN_RATIO * comp else None for var, (raw, comp) in v.items()}
        for layer, v in sizes.items()
    }


def estimate_ratio(ex: Extraction, sizes=None) -> float:
    """Uncompressed / on-disk size, from the first batch and the codecs it selects."""
    sizes = sizes or measure_ratios(ex)
    codecs = choose_codecs(sizes)
    raw = disk = 0
    for layer, v in sizes.items():
        for var, (r, c) in v.items():
            raw += r
            disk += c if codecs[layer][var] else r
    return raw / max(disk, 1)


def _targets(ex: Extraction, lo: int, hi: int) -> np.ndarray | None:
    return ex.corpus.targets(lo, hi) if ex.gradient_target == "target" else None


class _ArrayStream:
    """Collects one array's rows into chunk-aligned region writes on a writer pool.

    Rows are kept as views of the model's output until they fill a chunk; the
    writer thread joins them into a reused buffer and writes it, so the main
    thread never copies data and goes straight back to the model.
    """

    def __init__(self, array, chunk: int, row_shape: tuple[int, ...], writes: _Writes):
        self.array, self.chunk, self.row_shape, self.writes = array, chunk, row_shape, writes
        self.free: list[np.ndarray] = []  # chunk buffers whose writes have finished
        self.parts: list[np.ndarray] = []
        self.fill = 0
        self.pos = 0  # sample index of the first pending row

    def start(self, pos: int) -> None:
        assert self.fill == 0
        self.pos = pos

    def _submit(self, parts: list[np.ndarray], n: int) -> None:
        lo = self.pos

        def write():
            if len(parts) == 1:
                self.array[lo : lo + n] = parts[0]
                return
            buf = self.free.pop() if self.free else np.empty((self.chunk, *self.row_shape), np.float32)
            np.concatenate(parts, out=buf[:n])
            self.array[lo : lo + n] = buf[:n]
            self.free.append(buf)

        self.writes.submit(write, n * int(np.prod(self.row_shape)) * 4)
        self.pos += n

    def push(self, data: np.ndarray) -> None:
        i, n, c = 0, len(data), self.chunk
        while i < n:
            if self.fill == 0 and n - i >= c:  # whole chunks straight from the batch
                k = (n - i) // c * c
                self._submit([data[i : i + k]], k)
                i += k
                continue
            take = min(c - self.fill, n - i)
            self.parts.append(data[i : i + take])
            self.fill += take
            i += take
            if self.fill == c:
                self.flush()

    def flush(self) -> None:
        """Write what is pending (a whole chunk, or the corpus's last partial one)."""
        if self.fill:
            self._submit(self.parts, self.fill)
            self.parts, self.fill = [], 0


class _Writes:
    """A writer pool with a bound on the bytes in flight, and per-block bookkeeping."""

    def __init__(self, pool: ThreadPoolExecutor, max_bytes: int):
        self.pool, self.max_bytes = pool, max_bytes
        self.inflight: deque[tuple[Future, int]] = deque()
        self.bytes = 0
        self.block: list[Future] = []  # futures of the block being computed

    def submit(self, fn, nbytes: int) -> None:
        f = self.pool.submit(fn)
        self.inflight.append((f, nbytes))
        self.block.append(f)
        self.bytes += nbytes

    def throttle(self) -> None:
        """Wait for the oldest writes until the bytes in flight are within the bound."""
        while self.inflight and (self.bytes > self.max_bytes or self.inflight[0][0].done()):
            f, nbytes = self.inflight.popleft()
            f.result()  # re-raises a failed write
            self.bytes -= nbytes

    def end_block(self) -> list[Future]:
        futures, self.block = self.block, []
        return futures


Where = Literal["auto", "local", "cluster"]


def run_extraction(
    ex: Extraction,
    overwrite: bool = False,
    progress: bool = False,
    on_block: Callable[[int, int], None] | None = None,
    where: Where = "auto",
) -> list[int]:
    """Write (or resume) the extraction; return the blocks computed by this call.

    ``where="auto"`` computes the blocks on the workers of the active
    ``dask.distributed`` client when it has workers in other processes
    (see :mod:`inntrospect.extraction.distributed`), else in this process.
    """
    import zarr

    from .distributed import cluster_client, extract_on_cluster

    client = cluster_client(where)

    with st.writer_lock(ex.path):
        fresh = overwrite or not st.is_store(ex.path)
        if not fresh:
            attrs = st.store_attrs(ex.path)
            if "extraction" not in attrs:  # interrupted while being created: nothing to keep
                fresh = True
            else:
                st.check_same(attrs, ex.attrs, ex.path)
        if fresh:
            st.remove_store(ex.path)
            attrs = dict(ex.attrs)
            attrs["extraction"] = {
                **ex.attrs["extraction"],
                "id": uuid.uuid4().hex,
                "state": "incomplete",
                "started": _now(),
            }
            attrs["codecs"] = choose_codecs(measure_ratios(ex))
            st.create_store(ex.path, attrs, ex.model.layers, ex.plan, ex.corpus.sample_table)
        done_arr = zarr.open_array(st.zarr_store(ex.path), path=st.BLOCKS_DONE, mode="r+")
        done = np.asarray(done_arr[:], dtype=bool)
        todo = [b for b in range(ex.n_blocks) if not done[b]]
        if client is None:
            computed = write_blocks(ex, done_arr, todo, done, progress, on_block)
        else:
            computed = extract_on_cluster(client, ex, todo, done, progress, on_block)
        if np.asarray(done_arr[:], dtype=bool).all():
            extraction = dict(st.store_attrs(ex.path)["extraction"])
            if extraction.get("state") != "complete":
                extraction.update(state="complete", finished=_now())
                st.update_attrs(ex.path, extraction=extraction)
    return computed


def write_blocks(ex, done_arr, todo, done, progress, on_block) -> list[int]:
    import zarr

    n, B = ex.corpus.n_samples, ex.plan.block

    def open_(layer, var):  # every chunk written holds data: skip zarr's all-fill check
        return zarr.open_array(st.zarr_store(ex.path), path=f"layers/{layer}/{var}", mode="r+",
                               config={"write_empty_chunks": True})

    bar = None
    if progress:
        from ..scheduler import bar as make_bar

        already = sum(min(B, n - b * B) for b in range(ex.n_blocks) if done[b])
        bar = make_bar(total=n, initial=already, unit="sample", desc="extract", smoothing=0.1)
    batch_bytes = ex.batch_size * sum(i.bytes_per_sample for i, _, _ in ex.arrays())
    chunk_bytes = sum(ex.plan.chunks[i.name] * i.bytes_per_sample for i, _, _ in ex.arrays())
    predictions = [open_(info.name, "prediction") for info in ex.model.layers]
    computed: list[int] = []
    pending: deque[tuple[int, int, int, np.ndarray, list[Future]]] = deque()

    def record(wait_all: bool) -> None:
        """Record blocks whose writes have all finished, in order."""
        while pending and (wait_all or all(f.done() for f in pending[0][4])):
            b, lo, hi, preds, futures = pending.popleft()
            wait_writes(futures)
            for arr in predictions:
                arr[lo:hi] = preds
            done_arr[b] = 1  # recorded only once all of the block is written
            computed.append(b)
            if on_block is not None:
                on_block(b, ex.n_blocks)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="inntrospect-write") as pool:
        # in flight at most: two batches' outputs plus a chunk of every array
        writes = _Writes(pool, 2 * batch_bytes + chunk_bytes)
        streams = [
            (_ArrayStream(open_(info.name, var), ex.plan.chunks[info.name], info.shape, writes), var, i)
            for info, var, i in ex.arrays()
        ]
        try:
            for b in todo:
                lo, hi = b * B, min(n, (b + 1) * B)
                for s, _, _ in streams:
                    s.start(lo)
                preds = np.empty(hi - lo, np.int64)
                for start, x in ex.corpus.batches(lo, hi, ex.batch_size):
                    check_finite(ex, x, start, "input")
                    acts, grads, pred = ex.model.compute(
                        x, _targets(ex, start, start + len(x)), pad_to=ex.batch_size
                    )
                    check_finite(ex, acts[-1], start, "output")
                    preds[start - lo : start - lo + len(x)] = pred
                    for s, var, i in streams:
                        s.push((acts if var == "acts" else grads)[i])
                    del acts, grads
                    writes.throttle()  # the model ran while earlier writes went on
                    record(wait_all=False)
                    if bar is not None:
                        bar.update(len(x))
                for s, _, _ in streams:
                    s.flush()
                pending.append((b, lo, hi, preds, writes.end_block()))
            record(wait_all=True)
        finally:
            if bar is not None:
                bar.close()
    return computed


def wait_writes(futures: list[Future]) -> None:
    wait(futures)
    for f in futures:
        f.result()  # re-raise a failed write


def check_finite(ex: Extraction, a: np.ndarray, start: int, what: str) -> None:
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        bad = start + int(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[0])
        f = int(np.searchsorted(ex.corpus.offsets, bad, side="right")) - 1
        bf = ex.corpus.files[f]
        raise NonFiniteError(
            f"the {what} of sample {bad} ({bf.file}, index {bad - int(ex.corpus.offsets[f])}) "
            "contains NaN or infinity. Clean the batch file (or check the model) and run again; "
            "the store resumes from the block that failed."
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def extract(
    model: str | os.PathLike | ModelSource,
    corpus: str | os.PathLike | Corpus,
    store: str | os.PathLike,
    layers: Sequence[str] | None = None,
    gradient_target: GradientTarget = "predicted",
    chunk_mib: float | None = None,
    *,
    batch_size: int = 128,
    weights: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_block: Callable[[int, int], None] | None = None,
    where: Where = "auto",
):
    """Stream a corpus through a model into a Zarr store; resume if it was interrupted.

    Parameters
    ----------
    model
        A ``.keras``/``.h5`` file, a TensorFlow SavedModel folder, or a
        ``keras.applications`` name (with ``weights``, a local file, or random weights).
    corpus
        ``corpus.csv`` (or its folder): rows ``file,group[,target]``.
    store
        Path of the Zarr store to write. An existing store of the same
        extraction is resumed; one of another model or corpus is refused.
    layers
        Layer names of interest; the input and output layers are always added.
    gradient_target
        ``"predicted"`` (argmax of the output) or ``"target"`` (the corpus column).
    chunk_mib
        Target chunk size in MiB (default 32; on resume, the store's own).
    batch_size
        Inference batch size.
    overwrite
        Start over, deleting an existing store at ``store``.
    progress
        Show a progress bar.
    on_block
        Called as ``on_block(block, n_blocks)`` after each block is recorded.
    where
        ``"auto"``: on the workers of the active ``dask.distributed`` client
        when its workers are processes of their own (each loads the model once
        from its path and writes whole blocks), else here; ``"local"``: here;
        ``"cluster"``: on the client's workers (an error without one).

    Returns
    -------
    xarray.DataTree
        The store, opened lazily.

    Examples
    --------
    >>> tree = inntrospect.extract("model.keras", "corpus/corpus.csv", "run.zarr",
    ...                            layers=["conv2d"])  # doctest: +SKIP
    >>> tree["layers/conv2d"].acts.groupby("group").mean()  # doctest: +SKIP
    """
    ex = prepare_extraction(model, corpus, store, layers, gradient_target, chunk_mib, batch_size, weights)
    run_extraction(ex, overwrite=overwrite, progress=progress, on_block=on_block, where=where)
    return st.open_store(ex.path)


