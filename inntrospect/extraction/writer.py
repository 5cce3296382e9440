"""Writing extraction blocks: the model's outputs into chunk-aligned region writes, then the block's record.

Inside a block, inference batches go through the model; each array's rows are
kept as views of the model's output until they fill a chunk, and a small
writer pool joins and writes each chunk as one chunk-aligned region while the
model computes the next batches (the bytes in flight are bounded). A block is
recorded in ``extraction/block_done`` only after every write of it has
finished. Used by the local driver (:mod:`.local`) and by each cluster task
(:mod:`.distributed`).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np

from .. import store as st
from ..errors import NonFiniteError
from .prepare import Extraction, batch_targets

__all__ = ["write_blocks", "wait_writes", "check_finite"]


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


def write_blocks(ex, done_arr, todo, done, progress, on_block) -> list[int]:
    """Compute and write the blocks ``todo`` in order, recording each once all its writes are done."""
    n, B = ex.corpus.n_samples, ex.plan.block

    def open_(layer, var):
        return st.open_array(ex.path, layer, var, write=True)

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
                        x, batch_targets(ex, start, start + len(x)), pad_to=ex.pad_to
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


