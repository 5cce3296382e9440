"""Writing a store: samples from any source, in corpus order, as chunk-aligned region writes with block records.

:class:`StoreWriter` is the package's one writing path for per-sample arrays.
:func:`open_writer` opens one for activations from any framework (the public
API); :func:`inntrospect.extract` feeds one the model's outputs
(:func:`write_blocks`, here and in each cluster task of :mod:`.distributed`);
``import-legacy`` (:mod:`.legacy`) feeds one the reference toolbox's batch files.

Each array's rows are kept as views of the caller's arrays (or, with
``copy``, copied into a chunk buffer) until they fill a chunk; a writer thread
writes each chunk as one chunk-aligned region while the caller computes the
next batches (the bytes in flight are bounded; when the caller would wait for
the writes, it writes the next queued chunk itself). A block of ``plan.block``
samples is recorded in ``extraction/block_done`` only after every write of it
has finished, so a writer stopped at any point (an exception, ``kill -9``)
leaves a store that the next writer resumes at the first block not recorded.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import store as st
from ..errors import (
    LayerNotFoundError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    StoreError,
    StoreMismatchError,
)
from .prepare import MAX_CHUNK_MIB, Extraction, batch_targets

__all__ = ["open_writer", "StoreWriter", "write_blocks", "check_finite", "PROBE_ROWS"]

#: rows of each array (at most a chunk) compressed to choose its codec, when the store is made by the writer
PROBE_ROWS = 128
#: bytes of an array checked for NaN and infinity at a time
_FINITE_SLICE = 4 << 20
#: how much nicer the writer threads run than the model's (Linux): a small PyTorch model on 2 cores
#: extracted 15 % faster (its thread no longer shares a core with compression at equal weight)
WRITER_NICE = 10


class _ArrayStream:
    """Collects one array's rows into chunk-aligned region writes on a writer pool.

    Rows are kept as views of the caller's arrays until they fill a chunk; a
    writer thread writes them as the chunk, one after the other (a local
    store's chunk files compress them as one stream: nothing is joined), so
    the caller's thread copies nothing and goes straight back to its model (views
    pushed with ``check`` are passed to ``check(rows, first sample)`` there
    first, which may raise). With ``copy`` they are copied at once into a
    chunk buffer of the stream instead (the caller may reuse its arrays).
    ``array`` may be set after rows came, before the first write is submitted.
    """

    def __init__(self, array, chunk: int, row_shape: tuple[int, ...], writes: _Writes,
                 check: Callable[[np.ndarray, int], None] | None = None):
        self.array, self.chunk, self.row_shape, self.writes = array, chunk, row_shape, writes
        self.check = check
        self.free: list[np.ndarray] = []  # chunk buffers whose writes have finished
        self.parts: list[tuple[np.ndarray, bool, bool]] = []  # (rows, copied into self.buf, to check)
        self.buf: np.ndarray | None = None  # the pending chunk's buffer, once rows were copied into it
        self.fill = 0
        self.pos = 0  # sample index of the first pending row
        self.files: list | None = None  # the array's chunk files, listed at the first write (or [])

    def start(self, pos: int) -> None:
        assert self.fill == 0
        self.pos = pos

    def _buffer(self) -> np.ndarray:
        try:
            return self.free.pop()
        except IndexError:  # none free (or the other writer thread took the last one)
            return np.empty((self.chunk, *self.row_shape), np.float32)

    def _submit(self, parts: list[tuple[np.ndarray, bool, bool]], n: int) -> None:
        lo, own = self.pos, self.buf
        self.buf = None

        def write():
            self.writes.wait_ready()
            at = lo
            for rows, _, check in parts:
                if check:
                    self.check(rows, at)
                at += len(rows)
            if own is None:  # views: written as they are, the parts of a chunk one after the other
                self._write(lo, [rows for rows, _, _ in parts])
                return
            at = 0
            for rows, copied, _ in parts:
                if not copied:
                    own[at : at + len(rows)] = rows
                at += len(rows)
            self._write(lo, [own[:n]])
            self.free.append(own)

        self.writes.submit(write, n * int(np.prod(self.row_shape)) * 4)
        self.pos += n
        self.writes.throttle()  # copies are made chunk by chunk: bounded here, not per batch

    def _write(self, lo: int, parts: list[np.ndarray]) -> None:
        """Rows ``lo ..`` (``parts``, following each other: whole chunks from a chunk's start, the array's
        last maybe partial) into the store: straight to their chunk files where
        :func:`~inntrospect.store.chunkio.chunk_files` lists them (a local store: each chunk's parts
        compressed as a stream, never joined), else joined and written through Zarr."""
        from ..store import chunkio

        if self.files is None:
            self.files = chunkio.chunk_files(self.array) or []
        c, n = self.chunk, sum(len(p) for p in parts)
        if lo % c or not self.files or (lo + n - 1) // c >= len(self.files):
            self.array[lo : lo + n] = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return
        if len(parts) == 1 and n > c:  # whole chunks straight from one batch
            for j in range(0, n, c):
                chunkio.write_chunk(chunkio.ChunkFile(*self.files[(lo + j) // c]), parts[0][j : j + c])
            return
        chunkio.write_chunk(chunkio.ChunkFile(*self.files[lo // c]), parts)

    def push(self, data: np.ndarray, copy: bool = False, check: bool = False) -> None:
        i, n, c = 0, len(data), self.chunk
        check = check and not copy and self.check is not None
        while i < n:
            if not copy and self.fill == 0 and n - i >= c:  # whole chunks straight from the batch
                k = (n - i) // c * c
                self._submit([(data[i : i + k], False, check)], k)
                i += k
                continue
            take = min(c - self.fill, n - i)
            if copy:
                if self.buf is None:
                    self.buf = self._buffer()
                part = self.buf[self.fill : self.fill + take]
                np.copyto(part, data[i : i + take], casting="unsafe")
                self.parts.append((part, True, False))
            else:
                self.parts.append((data[i : i + take], False, check))
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
    """A writer pool (started by the first write) with a bound on the bytes in flight, and per-block bookkeeping.

    :data:`WRITERS` threads take the writes in order; the caller's thread, when
    it would wait for them (the bound on the bytes in flight, a block's
    record, closing), takes the next queued write itself instead. So the
    model and the writes share the cores without more threads than cores
    (a third thread on 2 vCPUs cost ~15 % more CPU for the same writes), and
    what the caller does not compute it writes.
    """

    def __init__(self, max_bytes: int, workers: int | None = None):
        self.workers = WRITERS if workers is None else workers
        self.max_bytes = max_bytes
        self.queue: deque[tuple[Future, Callable[[], Any]]] = deque()
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.inflight: deque[tuple[Future, int]] = deque()
        self.bytes = 0
        self.block: list[Future] = []  # futures of the block being written
        self.ready: Future | None = None  # the store being made in the background (StoreWriter._make)

    def wait_ready(self) -> None:
        """Wait until the store is made and its arrays open, if it is being made; re-raises its error."""
        if self.ready is not None:
            self.ready.result()

    def submit(self, fn, nbytes: int) -> None:
        f: Future = Future()
        with self.cond:
            if not self.threads and not self.stopping:
                for i in range(self.workers):
                    t = threading.Thread(target=self._work, name=f"inntrospect-write-{i}", daemon=True)
                    t.start()
                    self.threads.append(t)
            self.queue.append((f, fn))
            self.cond.notify()
        self.inflight.append((f, nbytes))
        self.block.append(f)
        self.bytes += nbytes

    def _work(self) -> None:
        _writer_priority()
        while True:
            with self.cond:
                while not self.queue and not self.stopping:
                    self.cond.wait()
                if not self.queue:
                    return
                f, fn = self.queue.popleft()
            _run(f, fn)

    def help(self) -> bool:
        """Run the oldest queued write on this thread; False if none is queued."""
        with self.cond:
            if not self.queue:
                return False
            f, fn = self.queue.popleft()
        _run(f, fn)
        return True

    def wait(self, futures: Sequence[Future]) -> None:
        """Wait for ``futures``, writing queued writes meanwhile; re-raises the first failed write's error."""
        for f in futures:
            while not f.done() and self.help():
                pass
            f.result()

    def throttle(self) -> None:
        """Wait for the oldest writes until the bytes in flight are within the bound (writing meanwhile)."""
        while self.inflight and (self.bytes > self.max_bytes or self.inflight[0][0].done()):
            f, nbytes = self.inflight.popleft()
            self.bytes -= nbytes
            self.wait([f])  # re-raises a failed write

    def end_block(self) -> list[Future]:
        futures, self.block = self.block, []
        return futures

    def shutdown(self, cancel: bool = False) -> None:
        """Finish the writes running and (unless ``cancel``) those queued, this thread helping; their errors
        stay in their futures."""
        with self.cond:
            self.stopping = True
            if cancel:
                for f, _ in self.queue:
                    f.cancel()
                self.queue.clear()
            self.cond.notify_all()
        while self.help():
            pass
        for t in self.threads:
            t.join()


#: threads that write chunks beside the caller's (which writes too when it would wait for them)
WRITERS = 1


def _run(f: Future, fn: Callable[[], Any]) -> None:
    """Run one queued write into its future (unless it was cancelled)."""
    if not f.set_running_or_notify_cancel():
        return
    try:
        f.set_result(fn())
    except BaseException as err:  # noqa: BLE001 - kept in the future, raised where it is waited for
        f.set_exception(err)


def _writer_priority() -> None:
    """Run this writer thread :data:`WRITER_NICE` steps nicer than the process (Linux: each thread has its
    own): the model's threads get the cores first, the writes take what is left; when they fall
    behind, the bound on the bytes in flight makes the model wait (:meth:`_Writes.throttle`)."""
    if not sys.platform.startswith("linux") or not WRITER_NICE:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WRITER_NICE))
    except OSError:  # not allowed here: the writes then share the cores as they come
        pass


@dataclass
class _Block:
    """The block being written: its samples ``lo:hi`` and their predictions (-1 until given)."""

    b: int
    lo: int
    hi: int
    preds: np.ndarray = field(repr=False)
    has_preds: bool = False


class StoreWriter:
    """Writes samples into a store in corpus order: every layer's activations (and gradients), batch by batch.

    Opened by :func:`open_writer`; use it as a context manager (or call
    :meth:`close`). :meth:`write` takes a batch of consecutive samples, of any
    size; each array is written in whole chunks, and each block of
    ``plan.block`` samples is recorded once all of it is written. The store
    is marked complete when the writer closes after every sample was written.
    An exception inside the ``with`` block (or a killed process) leaves it
    incomplete; the next writer opened on it with the same arguments resumes:
    :attr:`next_sample` says where.

    Attributes
    ----------
    path : inntrospect.Location
        Where the store is.
    layers : list of LayerSpec
        The layers, in order: name, shape per sample, whether they have gradients.
    n_samples : int
        Samples the store holds.
    blocks_recorded : list of int
        The blocks this writer recorded, in order.
    complete : bool
        Whether the store was complete when the writer closed.

    Examples
    --------
    >>> with inntrospect.open_writer("run.zarr", {"fc": (16,)}, groups=["a", "b"] * 50,
    ...                              source={"name": "my model"}) as writer:  # doctest: +SKIP
    ...     for lo in range(writer.next_sample, 100, 32):
    ...         writer.write({"fc": np.random.rand(min(32, 100 - lo), 16)})
    """

    def __init__(self, path, layers: Sequence[st.LayerSpec], plan: st.ChunkPlan, n_samples: int, *,
                 gradient_target: str | None = None, table: Mapping[str, np.ndarray] | None = None,
                 on_block: Callable[[int, int], None] | None = None):
        self.path = st.location(path)
        self.layers = list(layers)
        self.plan = plan
        self.n_samples = int(n_samples)
        self.gradient_target = gradient_target
        self.blocks_recorded: list[int] = []
        self.complete = False
        self._table = table
        self._groups: np.ndarray | None = None  # the table's groups as str, once a write checks groups
        self._on_block = on_block
        self._n_blocks = plan.n_blocks(self.n_samples)
        self._done = np.zeros(self._n_blocks, bool)  # recorded blocks (and, attached, those not ours)
        # blocks whose first rows are stored and kept (an append's partial last block): {block: first
        # sample to write}; the rows before it are read back from the store when the block begins
        self._first: dict[int, int] = {}
        self.appended: tuple[int, int] | None = None  # (samples before, after) when this writer appended
        self._cursor = 0
        self._vars = [(spec, var) for spec in self.layers
                      for var in (("acts", "grads") if spec.has_grads else ("acts",))]
        self._chunk_bytes = sum(plan.chunks[spec.name] * spec.bytes_per_sample for spec, _ in self._vars)
        # in flight at most: half a chunk of every array when rows are copied (with the chunks being
        # filled, about a chunk of every array in buffers); two batches more when views are kept (_push)
        self._writes = _Writes(max(1, self._chunk_bytes // 2))
        self._streams = {(spec.name, var): _ArrayStream(None, plan.chunks[spec.name], spec.shape, self._writes,
                                                        check=self._checker((spec.name, var)))
                         for spec, var in self._vars}
        self._predictions: list = []  # every layer's prediction array
        self._prediction_files: list | None = None  # their chunk files (chunkio), once listed
        self._records = None  # the block records
        self._active: _Block | None = None
        self._pending: deque[tuple[_Block, list[Future]]] = deque()  # written, their writes in flight
        self._deferred: tuple[dict, Mapping] | None = None  # attrs and table of a store made at the first rows
        self._early: list[tuple] = []  # batches accepted before that
        self._stack: ExitStack | None = None  # the writer lock, held by a writer that opened the store
        self._finish = False
        self._bar = None
        self._broken: BaseException | None = None
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"next sample {self._cursor} of {self.n_samples}"
        return f"StoreWriter({self.path.url!r}, {len(self.layers)} layers, {state})"

    # -- opening --------------------------------------------------------------------
    @classmethod
    def open(cls, store, attrs: dict, layers: Sequence[st.LayerSpec], plan: st.ChunkPlan,
             table: Mapping[str, np.ndarray], *, codecs=None, overwrite: bool = False,
             check: Callable[[dict], None] | None = None, verify: bool = False,
             on_damaged: Callable[[list[int], int], None] | None = None,
             on_block: Callable[[int, int], None] | None = None, progress: bool = False,
             desc: str = "write", append: bool = False, append_record: Mapping | None = None) -> StoreWriter:
        """Take the store's writer lock, then create the store or resume it; the writer holds the lock until closed.

        ``attrs`` are the root attributes the store is to have
        (:func:`inntrospect.store.root_attrs`), ``table`` its sample table
        (``group``, ``file``, ``index_in_file``, ``target``). An existing store
        with an extraction record is resumed when ``check(stored attrs)`` (if
        given) and :func:`inntrospect.store.check_same` accept it: its recorded
        blocks with missing chunks of ``acts``, ``grads`` (or ``prediction``,
        when it has a gradient target) are un-recorded, with ``verify`` also
        those with chunks failing their checksum, and ``on_damaged(blocks,
        n_blocks)`` is told (default: a warning logged). Otherwise (or with
        ``overwrite``) it is made anew, with ``codecs`` (``{layer: {var: codec
        record or None}}``, or a function returning them); without, they are
        chosen from the first rows written (:data:`PROBE_ROWS` of each array,
        at most a chunk), and the store is made then.

        With ``append``, a store holding fewer samples than ``table`` whose
        first rows are the store's (:func:`inntrospect.store.check_append`) is
        grown first (:func:`inntrospect.store.grow`; ``append_record`` adds keys
        to its entry in ``extraction.appends``): only the new samples are to be
        written, from :attr:`next_sample` on. A store whose append was
        interrupted while it was being grown is grown again first, with or
        without ``append``.
        """
        path = st.location(store)
        stack = ExitStack()
        stack.enter_context(st.writer_lock(path))
        try:
            writer = cls(path, layers, plan, len(table["group"]), table=table, on_block=on_block,
                         gradient_target=attrs["extraction"].get("gradient_target"))
            writer._stack = stack
            fresh = overwrite or not st.is_store(path)
            if not fresh:
                stored = st.store_attrs(path)
                fresh = "extraction" not in stored  # interrupted while being created: nothing to keep
            if fresh:
                st.remove_store(path)
                new = st.new_extraction(attrs)
                if codecs is None:
                    writer._deferred = (new, table)
                else:
                    chosen = codecs() if callable(codecs) else codecs
                    writer._make({**new, "codecs": {k: dict(v) for k, v in chosen.items()}}, table)
            else:
                if append or st.growing(stored):
                    stored = writer._grow(stored, attrs, table, append, append_record)
                if check is not None:
                    check(stored)
                st.check_same(stored, attrs, path)
                writer._open_arrays()
                writer._done = writer._unrecord_damaged(stored, verify, progress, on_damaged)
                writer._keep(stored)
            writer._finish = True
            writer._start(progress, desc)
            return writer
        except BaseException as err:
            if not stack.__exit__(type(err), err, err.__traceback__):  # store faults come out translated
                raise
            raise

    @classmethod
    def attach(cls, store, layers: Sequence[st.LayerSpec], plan: st.ChunkPlan, n_samples: int,
               blocks: Sequence[int], *, gradient_target: str | None = None,
               table: Mapping[str, np.ndarray] | None = None) -> StoreWriter:
        """A writer of ``blocks`` of a store another process made and holds the lock of (a cluster task's:
        the client holds it). Those blocks recorded already, and all others, are skipped (rows written
        into them are dropped); closing it neither checks nor marks the store complete."""
        writer = cls(store, layers, plan, n_samples, gradient_target=gradient_target, table=table)
        writer._open_arrays()
        writer._done[:] = True
        for b in blocks:
            writer._done[b] = bool(writer._records[b])
        writer._keep(st.store_attrs(writer.path))
        writer._start(False, "")
        return writer

    # -- appending ------------------------------------------------------------------
    def _grow(self, stored: dict, attrs: dict, table, append: bool, record: Mapping | None) -> dict:
        """Grow the store to the writer's samples when they extend it (an append, or the redo of an
        interrupted one); the store's attributes then. Anything else is left to the resume checks."""
        before = st.base_samples(stored)
        if not st.growing(stored) and self.n_samples == before:
            return stored  # the same samples: a resume
        st.check_append(self.path, stored, attrs, self.layers, table)  # refuses fewer samples too
        grown = st.grow(self.path, stored, attrs, self.layers, self.plan, table, append_record=record)
        self.appended = (before, self.n_samples)
        return grown

    def _keep(self, stored: dict) -> None:
        """Find the unrecorded blocks whose first rows are stored and kept (``extraction.kept``): an
        append's partial last block, whose stored chunks are completed rather than computed again.
        Rows that fail to read back whole and finite are not kept: their block is written whole."""
        B = self.plan.block
        for lo, hi in (stored.get("extraction") or {}).get("kept") or []:
            b = int(lo) // B
            if b < self._n_blocks and not self._done[b] and int(lo) == b * B < int(hi) <= self.n_samples \
                    and self._readable(int(lo), int(hi)):
                self._first[b] = int(hi)

    def _readable(self, lo: int, hi: int) -> bool:
        """Whether samples ``lo:hi`` of every array are stored: every chunk present, the last partial one
        decoding (checksum) to finite values, and their predictions readable."""
        try:
            for (name, var), stream in self._streams.items():
                arr, c = stream.array, stream.chunk
                zeros = (0,) * (arr.ndim - 1)
                keys = [arr.metadata.encode_chunk_key((k, *zeros)) for k in range(lo // c, -(-hi // c))]
                if len(st.stored_chunks(self.path, st.layer_path(name, var), keys)) != len(keys):
                    return False
                if hi % c and _first_non_finite(np.asarray(arr[hi // c * c : hi])) is not None:
                    return False
            self._predictions[0][lo:hi]
        except (ValueError, RuntimeError, OSError) as err:
            logging.getLogger("inntrospect").warning(
                "%s: samples %d..%d before the appended ones do not read back (%s); their block is "
                "written whole", self.path, lo, hi - 1, err)
            return False
        return True

    def first_sample(self, block: int) -> int:
        """The first sample of ``block`` to write: its start, or after the rows of it that are kept
        (the stored samples of the partial block an append continues)."""
        return self._first.get(block, block * self.plan.block)

    def _open_arrays(self) -> None:
        for (name, var), stream in self._streams.items():
            stream.array = st.open_array(self.path, name, var, write=True)
        self._predictions = [st.open_array(self.path, spec.name, "prediction", write=True) for spec in self.layers]
        self._prediction_files = None
        self._records = st.blocks_done(self.path, write=True)

    def wait_made(self) -> None:
        """Wait until the store exists with its arrays (a writer that creates it makes it in the
        background); before other processes open it (a cluster's workers). Re-raises its error."""
        self._writes.wait_ready()

    def _make(self, attrs: dict, table) -> None:
        """Create the store and open its arrays on a thread of their own, while the caller goes on to
        compute (a small model's store takes ~0.1 s to make: its first batches). Every chunk write, the
        first block record and :meth:`close` wait for it (:meth:`_Writes.wait_ready`), and see its error."""
        def make() -> None:
            st.create_store(self.path, attrs, self.layers, self.plan, table)
            self._open_arrays()

        pool = ThreadPoolExecutor(1, thread_name_prefix="inntrospect-create")
        self._writes.ready = pool.submit(make)
        pool.shutdown(wait=False)

    def _start(self, progress: bool, desc: str) -> None:
        B, n = self.plan.block, self.n_samples
        todo = np.flatnonzero(~self._done)
        self._cursor = self.first_sample(int(todo[0])) if len(todo) else n
        if progress:
            from ..scheduler import bar as make_bar

            already = sum(min(B, n - int(b) * B) for b in np.flatnonzero(self._done))
            already += sum(first - b * B for b, first in self._first.items() if not self._done[b])
            self._bar = make_bar(total=n, initial=already, unit="sample", desc=desc, smoothing=0.1)

    def _unrecord_damaged(self, stored: dict, verify: bool, progress: bool,
                          on_damaged: Callable[[list[int], int], None] | None) -> np.ndarray:
        """Un-record the recorded blocks with missing (and, with ``verify``, damaged) chunks; the records then.

        A complete store becomes incomplete again until they are written (its
        extraction id is kept: they are written again as they were).
        """
        B = self.plan.block
        extracted = ("acts", "grads", "prediction") if stored["extraction"].get("gradient_target") is not None \
            else ("acts", "grads")
        arrays = [(spec.name, var) for spec in self.layers for var in extracted if var != "grads" or spec.has_grads]
        bad: set[int] = set()
        if verify:
            from ..store.integrity import verify as verify_store

            names = [st.layer_path(name, var) for name, var in arrays]
            bad.update(verify_store(self.path, progress=progress, arrays=[st.BLOCKS_DONE, *names]).damaged_blocks)
            for b in bad:  # a damaged record first: reading the records would fail on it
                self._records[b] = 0
        done = self._read_records()
        for name, var in arrays:
            arr = st.open_array(self.path, name, var)
            c = int(arr.chunks[0])
            bad.update(int(k) * c // B for k in _chunk_indices(
                st.missing_chunks(self.path, name, var, recorded=done, block=B, arr=arr)))
        bad = sorted(bad)
        if not bad:
            return done
        for b in bad:
            self._records[b] = 0
        done[bad] = False
        extraction = dict(st.store_attrs(self.path)["extraction"])
        if extraction.get("state") == "complete":
            extraction.update(state="incomplete")
            st.update_attrs(self.path, extraction=extraction)
        if on_damaged is not None:
            on_damaged(bad, self._n_blocks)
        else:
            logging.getLogger("inntrospect").warning(
                "%s: %d recorded blocks had missing or damaged chunks (%s); writing them again",
                self.path, len(bad), ", ".join(map(str, bad[:20])))
        return done

    def _read_records(self) -> np.ndarray:
        """The block records as bools; a damaged record raises an error naming it and the fix."""
        from ..store.nodes import decode_problem

        try:
            return np.asarray(self._records[:], dtype=bool)
        except (ValueError, RuntimeError):
            for (b,), key in st.chunk_grid(self._records):
                try:
                    self._records[b]
                except (ValueError, RuntimeError) as err:
                    raise st.damaged_error(self.path, st.BLOCKS_DONE, key, decode_problem(err)) from err
            raise

    # -- where to write -----------------------------------------------------------
    @property
    def next_sample(self) -> int:
        """The first sample of the next :meth:`write`: 0 in a new store; on a resumed one, the first
        sample of the first block not recorded (the samples before it are kept: skip them)."""
        return self._cursor

    @property
    def todo(self) -> list[tuple[int, int]]:
        """The samples still to write, from :attr:`next_sample` on, as ``(start, stop)`` ranges.

        One range ``(next_sample, n_samples)`` unless blocks after it were
        recorded before (a store repaired after damage): rows written into
        those are dropped, or a write may skip them with ``start=``.
        """
        B, n = self.plan.block, self.n_samples
        out: list[tuple[int, int]] = []
        for b in np.flatnonzero(~self._done):
            lo, hi = max(self.first_sample(int(b)), self._cursor), min(n, (int(b) + 1) * B)
            if lo >= hi:
                continue
            if out and out[-1][1] == lo:
                out[-1] = (out[-1][0], hi)
            else:
                out.append((lo, hi))
        return out

    @property
    def blocks_todo(self) -> list[int]:
        """The blocks not recorded (all blocks a writer writes are recorded, in order, once written)."""
        return [int(b) for b in np.flatnonzero(~self._done)]

    # -- writing --------------------------------------------------------------------
    def write(self, acts: Mapping[str, Any], grads: Mapping[str, Any] | None = None,
              predictions=None, *, groups=None, start: int | None = None, copy: bool = True) -> None:
        """Write a batch of consecutive samples: every layer's activations, and gradients where declared.

        Parameters
        ----------
        acts
            ``{layer: array (samples, *shape)}`` for every layer, each with the
            shape per sample the writer was opened with (channels last), of
            real numbers (stored as float32). Any number of samples.
        grads
            The same for the layers opened with gradients.
        predictions
            The predicted class of each sample (integers); stored in the
            sample table's ``prediction``, -1 where not given. Needed by every
            write when the writer was opened with a ``gradient_target``.
        groups
            The group of each sample, to check against the sample table the
            writer was opened with (optional).
        start
            The batch's first sample (default :attr:`next_sample`). Samples are
            written in order; ``start`` may skip ahead only to the start of a
            block (``writer.plan.block`` samples), leaving the samples skipped
            unwritten.
        copy
            Copy the arrays (default). ``False`` keeps views of them until their
            chunks are written, which saves a copy and time of this thread: the
            arrays must not change after the call, and they are checked for NaN
            and infinity as their chunks are written, by the writer's threads
            (found, a later call raises ``NonFiniteError`` and the writer stops).

        Raises
        ------
        ParameterError
            A layer missing or of the wrong shape, arrays with different sample
            counts, samples out of order or past ``n_samples``, groups not
            those of the sample table, predictions missing or misshapen.
        ParameterTypeError, LayerNotFoundError
            Arrays that are not real numbers; a layer the writer does not have.
        NonFiniteError
            NaN or infinity in an array (after conversion to float32).

        Nothing of a batch is written when it raises one of these; the writer
        stays usable. Any other error (a write that failed, or NaN found in
        arrays written with ``copy=False``) stops the writer: close it and open
        it again to resume.
        """
        self._check_usable()
        arrays, k = self._checked_arrays(acts, grads)
        start = self._cursor if start is None else self._checked_start(start)
        n = self.n_samples
        if start + k > n:
            raise ParameterError(
                f"this write of {k} samples from sample {start} goes past the end of the store: it holds "
                f"{n} samples (0..{n - 1}), as the writer was opened. Write only those, or open the store "
                "anew (overwrite=True) with the longer sample table.")
        preds = self._checked_predictions(predictions, k)
        if groups is not None:
            self._check_groups(groups, start, k)
        # how each array goes: "copy" (into chunk buffers), "view" (kept until written; ours after a
        # conversion), "later" (views checked for NaN as their chunks are written, off this thread)
        modes = {}
        for key, a in arrays.items():  # last: reads every value
            modes[key] = "copy" if copy else "later"
            if a.dtype != np.float32:
                with np.errstate(over="ignore"):  # a value beyond float32 becomes infinity: refused below
                    arrays[key] = a = a.astype(np.float32)
                modes[key] = "view"
            if modes[key] != "later" and (bad := _first_non_finite(a)) is not None:
                raise self._non_finite(key, start + bad)
        if k == 0:
            return
        self._cursor = start + k
        try:
            if self._deferred is not None:
                self._defer((start, k, arrays, modes, preds))
            else:
                self._push(start, k, arrays, modes, preds)
        except BaseException as err:
            self._broken = err
            raise

    def _check_usable(self) -> None:
        if self._closed:
            raise StoreError(f"the writer of {self.path} is closed. Open it again (open_writer with the same "
                             "arguments) to write more: it resumes at the first sample not recorded.")
        if self._broken is not None:
            raise StoreError(
                f"an earlier write to {self.path} failed ({type(self._broken).__name__}: {self._broken}), so "
                "this writer writes nothing more. Close it and open it again: it resumes at the first block "
                "not recorded.")

    def _checked_arrays(self, acts, grads) -> tuple[dict[tuple[str, str], np.ndarray], int]:
        given = {"acts": _mapping("acts", acts), "grads": _mapping("grads", {} if grads is None else grads)}
        names = [spec.name for spec in self.layers]
        with_grads = [spec.name for spec in self.layers if spec.has_grads]
        for var, declared in (("acts", names), ("grads", with_grads)):
            unknown = [k for k in given[var] if k not in declared]
            if unknown and var == "acts":
                raise LayerNotFoundError(f"acts has layer(s) {', '.join(map(repr, unknown))}, which the writer "
                                         f"was not opened with; its layers are: {', '.join(names)}.")
            if unknown:
                raise LayerNotFoundError(
                    f"grads has layer(s) {', '.join(map(repr, unknown))}, which the writer was not opened with "
                    f"gradients for (layers with gradients: {', '.join(with_grads) or 'none'}). Open it with "
                    "grads=True or grads=[names], or leave them out.")
            missing = [k for k in declared if k not in given[var]]
            if missing:
                raise ParameterError(
                    f"{var} lacks layer(s) {', '.join(map(repr, missing))}: every write gives the rows of "
                    f"every layer for the same samples (acts of {', '.join(names)}; grads of "
                    f"{', '.join(with_grads) or 'none'}).")
        arrays: dict[tuple[str, str], np.ndarray] = {}
        k, first = None, None
        for spec, var in self._vars:
            what = f"{var}[{spec.name!r}]"
            try:
                a = np.asarray(given[var][spec.name])
            except (TypeError, ValueError, RuntimeError) as err:  # e.g. a tensor on a GPU
                raise ParameterTypeError(
                    f"{what} is not an array numpy can read ({type(err).__name__}: {err}); pass a numpy "
                    "array (a torch tensor: t.detach().cpu().numpy()).") from None
            if a.dtype.kind not in "fiu":
                raise ParameterTypeError(
                    f"{what} holds {a.dtype} values; the store holds float32: pass real numbers (floats "
                    "or integers), e.g. np.asarray(x, dtype=np.float32).")
            if a.ndim != len(spec.shape) + 1 or a.shape[1:] != spec.shape:
                raise ParameterError(
                    f"{what} has shape {a.shape}; expected (samples, {', '.join(map(str, spec.shape))}): "
                    f"{spec.name!r} was opened with shape {spec.shape} per sample. Give a batch of that "
                    "shape (channels last), or open the writer with the layer's true shape.")
            if k is None:
                k, first = len(a), what
            elif len(a) != k:
                raise ParameterError(f"{what} has {len(a)} samples but {first} has {k}: every array of a "
                                     "write holds the same samples.")
            arrays[(spec.name, var)] = a
        return arrays, int(k or 0)

    def _checked_start(self, start) -> int:
        if isinstance(start, bool) or not isinstance(start, numbers.Integral):
            raise ParameterTypeError(f"start must be a sample index (an integer), got {start!r}.")
        start, c, B, n = int(start), self._cursor, self.plan.block, self.n_samples
        if start == c:
            return start
        if start < c:
            raise ParameterError(
                f"samples are written in order: this write starts at sample {start}, but the writer is at "
                f"sample {c} (the samples before it are written, or were recorded before). Write sample "
                f"{c} next (writer.next_sample).")
        if c < n and c != self.first_sample(c // B) and not self._done[c // B]:
            raise ParameterError(
                f"samples are written in order: the writer is at sample {c}, inside a block of {B} samples "
                f"({c // B * B}..{min(n, (c // B + 1) * B) - 1}); write sample {c} next, not {start}.")
        if start < n and start != self.first_sample(start // B) and not self._done[start // B]:
            raise ParameterError(
                f"a write may skip ahead only to the start of a block of {B} samples: sample {start} is "
                f"inside the block starting at sample {start // B * B}"
                + (f" (whose samples before {self.first_sample(start // B)} are kept from the store)"
                   if start // B in self._first else "")
                + f". Write from sample {c} on, in order.")
        return start

    def _checked_predictions(self, predictions, k: int) -> np.ndarray | None:
        if predictions is None:
            if self.gradient_target is not None:
                raise ParameterError(
                    f"{self.path} records gradients of the {self.gradient_target} output "
                    f"(gradient_target={self.gradient_target!r}): every write gives predictions, the "
                    "predicted class of each sample (e.g. logits.argmax(axis=1)).")
            return None
        p = np.asarray(predictions)
        if p.dtype.kind not in "iu":
            raise ParameterTypeError(f"predictions holds {p.dtype} values; expected integers, the predicted "
                                     "class of each sample (e.g. logits.argmax(axis=1)).")
        if p.shape != (k,):
            raise ParameterError(f"predictions has shape {p.shape}; expected ({k},): one class per sample of "
                                 "the write.")
        return p.astype(np.int64)

    def _check_groups(self, groups, start: int, k: int) -> None:
        if self._table is None:
            return
        if self._groups is None:
            self._groups = np.asarray(self._table["group"]).astype(str)
        g = np.asarray(groups).astype(str)
        if g.shape != (k,):
            raise ParameterError(f"groups has shape {g.shape}; expected ({k},): one label per sample of the write.")
        want = self._groups[start : start + k]
        bad = np.flatnonzero(g != want)
        if len(bad):
            i = int(bad[0])
            raise ParameterError(
                f"groups do not match the sample table the writer was opened with: sample {start + i} is "
                f"{str(want[i])!r} there but {str(g[i])!r} in this write ({len(bad)} of {k} samples differ). Write the "
                "samples in the order of the groups given to open_writer.")

    def _non_finite(self, key: tuple[str, str], sample: int, written: bool = False) -> NonFiniteError:
        """The error of NaN or infinity in array ``key`` at ``sample``; ``written``: found as its chunk was
        written (a write with ``copy=False``), which stops the writer."""
        name, var = key
        where = ""
        if self._table is not None and str(self._table["file"][sample]):
            where = f" ({self._table['file'][sample]}, index {int(self._table['index_in_file'][sample])})"
        then = ("The block was not recorded and the writer stops; write finite values, then open the writer "
                "again: it resumes at the first block not recorded." if written else
                "Nothing of this write was stored; write finite values")
        err = NonFiniteError(
            f"the {var} of layer {name!r} at sample {sample}{where} contain NaN or infinity (after conversion "
            f"to float32). {then} (check the model and its inputs for that sample).")
        err.layer, err.var, err.sample = name, var, sample
        return err

    def _checker(self, key: tuple[str, str]) -> Callable[[np.ndarray, int], None]:
        """What a writer thread runs on rows of ``key`` written as views (``copy=False``) before writing them."""
        def check(rows: np.ndarray, first: int) -> None:
            bad = _first_non_finite(rows)
            if bad is not None:
                raise self._non_finite(key, first + bad, written=True)

        return check

    def _defer(self, batch: tuple) -> None:
        """Before the store is made (its codecs chosen from the first rows): keep the batch, or make it now."""
        start, k, arrays, modes, preds = batch
        need = min(PROBE_ROWS, max(self.plan.chunks.values()), self.n_samples)
        if sum(b[1] for b in self._early) + k >= need:
            self._create([*self._early, batch])
            return
        kept = {key: np.array(a) if modes[key] == "copy" else a for key, a in arrays.items()}  # ours to keep
        self._early.append((start, k, kept, {key: "view" if m == "copy" else m for key, m in modes.items()}, preds))

    def _create(self, batches: list[tuple]) -> None:
        """Make the store, its codecs chosen from the first rows of each array (at most a chunk), then write ``batches``."""
        import numcodecs

        attrs, table = self._deferred
        codec = numcodecs.Zstd(level=st.CODEC["level"])
        sizes: dict[str, dict[str, tuple[int, int]]] = {}
        for spec, var in self._vars:
            rows, parts = min(PROBE_ROWS, self.plan.chunks[spec.name], self.n_samples), []
            for batch in batches:
                got = sum(len(p) for p in parts)
                if got < rows:
                    parts.append(batch[2][(spec.name, var)][: rows - got])
            a = np.ascontiguousarray(np.concatenate(parts) if parts else np.empty((0, *spec.shape)), np.float32)
            sizes.setdefault(spec.name, {})[var] = (a.nbytes, len(codec.encode(a)))
        self._make({**attrs, "codecs": st.choose_codecs(sizes)}, table)
        self._deferred, self._early = None, []
        for start, k, arrays, modes, preds in batches:
            self._push(start, k, arrays, modes, preds)

    def _push(self, start: int, k: int, arrays, modes, preds) -> None:
        """Hand rows ``start:start+k`` to the streams, block by block; rows of recorded blocks are dropped."""
        B, n = self.plan.block, self.n_samples
        if any(m != "copy" for m in modes.values()):  # views kept: the batches in flight bound the bytes
            nbytes = k * sum(spec.bytes_per_sample for spec, _ in self._vars)
            self._writes.max_bytes = max(self._writes.max_bytes, 2 * nbytes + self._chunk_bytes)
        pos, i = start, 0
        while i < k:
            b = pos // B
            lo, hi = b * B, min(n, (b + 1) * B)
            take = min(k - i, hi - pos)
            if not self._done[b]:
                if pos == self.first_sample(b):
                    self._begin(b, lo, hi)
                for key, stream in self._streams.items():
                    stream.push(arrays[key][i : i + take], copy=modes[key] == "copy",
                                check=modes[key] == "later")
                if preds is not None:
                    self._active.preds[pos - lo : pos - lo + take] = preds[i : i + take]
                    self._active.has_preds = True
                if pos + take == hi:
                    self._end_block()
                if self._bar is not None:
                    self._bar.update(take)
            pos += take
            i += take
        self._writes.throttle()  # the caller computed while earlier writes went on
        self._record(wait_all=False)

    def _begin(self, b: int, lo: int, hi: int) -> None:
        self._active = _Block(b, lo, hi, np.full(hi - lo, -1, np.int64))
        first = self.first_sample(b)
        for stream in self._streams.values():
            start = first // stream.chunk * stream.chunk  # lo, or the chunk the kept rows end in
            stream.start(start)
            if start < first:  # the kept rows of that chunk, read back: it is written whole
                stream.push(np.asarray(stream.array[start:first]), copy=True)
        if first > lo:
            self._active.preds[: first - lo] = self._predictions[0][lo:first]
            self._active.has_preds = True

    def _end_block(self) -> None:
        for stream in self._streams.values():
            stream.flush()
        self._pending.append((self._active, self._writes.end_block()))
        self._active = None

    def _record(self, wait_all: bool) -> None:
        """Record blocks whose writes have all finished, in order."""
        while self._pending and (wait_all or all(f.done() for f in self._pending[0][1])):
            self._writes.wait_ready()  # its arrays open (done long before a block's writes, but for tiny ones)
            block, futures = self._pending.popleft()
            self._writes.wait(futures)
            if block.has_preds:
                self._write_predictions(block)
            self._records[block.b] = 1  # recorded only once all of the block is written
            self._done[block.b] = True
            self.blocks_recorded.append(block.b)
            if self._on_block is not None:
                self._on_block(block.b, self._n_blocks)

    def _write_predictions(self, block: _Block) -> None:
        """A block's predictions into every layer's ``prediction`` (one chunk per block): straight to the
        chunk files of a local store (Zarr took 2-5 ms an array, on the caller's thread), else through Zarr."""
        from ..store import chunkio

        if self._prediction_files is None:
            self._prediction_files = [chunkio.chunk_files(arr, dtype="int64") or [] for arr in self._predictions]
        for arr, files in zip(self._predictions, self._prediction_files):
            if arr.chunks[0] == self.plan.block and block.b < len(files):
                chunkio.write_chunk(chunkio.ChunkFile(*files[block.b]), block.preds)
            else:
                arr[block.lo : block.hi] = block.preds

    # -- closing --------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the writes, record the blocks written whole, and mark the store complete if every block is.

        Then the writer lock is released. A store left incomplete (samples not
        written) is resumed by the next writer opened on it; a warning says so.
        Closing twice does nothing.
        """
        if self._closed:
            return
        if self._broken is not None:  # nothing more is recorded after a failed write
            self._shutdown(None, None, None, abort=True)
            return
        try:
            if self._deferred is not None:  # fewer rows than the codecs are chosen from: the store is made now
                self._create(self._early)
            self.wait_made()
            self._record(wait_all=True)
            self._writes.shutdown()  # and the writes of a block left part-written: never recorded
            if self._finish:
                done = self._read_records()
                if done.all():
                    st.finish_extraction(self.path)
                    self.complete = True
                else:
                    todo = np.flatnonzero(~done)
                    logging.getLogger("inntrospect").warning(
                        "%s: %d of %d blocks recorded; the store stays incomplete. Open the writer again "
                        "with the same arguments to write the rest: it resumes at sample %d.",
                        self.path, len(done) - len(todo), len(done), int(todo[0]) * self.plan.block)
        except BaseException as err:
            self._shutdown(type(err), err, err.__traceback__, abort=True)
            raise
        self._shutdown(None, None, None, abort=False)

    def _shutdown(self, exc_type, exc, tb, abort: bool) -> None:
        """Stop the writer pool (``abort``: queued writes dropped, nothing recorded), the progress bar and the lock."""
        self._closed = True
        try:
            self._writes.shutdown(cancel=abort)
            if self._writes.ready is not None:  # the store still being made: finished before the lock goes
                wait([self._writes.ready])
        finally:
            if self._bar is not None:
                self._bar.close()
            stack, self._stack = self._stack, None
            if stack is not None:
                stack.__exit__(exc_type, exc, tb)  # raises a store fault translated (a full disk...)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        elif not self._closed:
            self._shutdown(exc_type, exc, tb, abort=True)
        return False


def write_blocks(ex: Extraction, writer: StoreWriter, todo: Sequence[int]) -> None:
    """Compute the blocks ``todo`` of an extraction in order and write them with ``writer``.

    Each block's inference batches go through the model and into the writer
    as views of the model's outputs (nothing is copied; inputs and outputs are
    checked for NaN here, every other array by the writer's threads); the
    writer records each block once all of it is written. Used by the local driver
    (:mod:`.local`) and by each cluster task (:mod:`.distributed`).
    """
    n, B, size = ex.corpus.n_samples, ex.plan.block, ex.batch_size
    names = [info.name for info in ex.model.layers]
    with_grads = [(i, info.name) for i, info in enumerate(ex.model.layers) if info.has_grads]
    for b in todo:
        lo, hi = b * B, min(n, (b + 1) * B)
        # a block continued after rows kept from the store (an append): its batches are those of the
        # whole block (the same computation, bit for bit), from the one holding its first new sample
        first = writer.first_sample(b)
        for start, x in ex.corpus.batches(lo + (first - lo) // size * size, hi, size):
            check_finite(ex, x, start, "input")
            acts, grads, pred = ex.model.compute(x, batch_targets(ex, start, start + len(x)), pad_to=ex.pad_to)
            check_finite(ex, acts[-1], start, "output")
            skip = max(0, first - start)
            writer.write({name: a[skip:] for name, a in zip(names, acts)},
                         {name: grads[i][skip:] for i, name in with_grads}, pred[skip:],
                         start=start + skip, copy=False)
            del acts, grads


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


def open_writer(
    store,
    layers: Mapping[str, Sequence[int]],
    groups: Sequence,
    *,
    source: Mapping[str, Any],
    grads: bool | Collection[str] = False,
    n_samples: int | None = None,
    targets: Sequence[int] | None = None,
    files: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    gradient_target: Literal["predicted", "target"] | None = None,
    chunk_mib: float | None = None,
    overwrite: bool = False,
    append: bool = False,
    progress: bool = False,
    on_block: Callable[[int, int], None] | None = None,
) -> StoreWriter:
    """Open a writer of activations (and gradients) from any source into a store; resume it if interrupted.

    The store has the format, chunks, codecs, block records, writer lock and
    resume rules of :func:`inntrospect.extract`'s stores, and every later step
    reads it the same way. Write the samples in order with
    :meth:`StoreWriter.write`, in batches of any size; the store is complete
    once the writer is closed with every sample written.

    Parameters
    ----------
    store
        Path or URL of the store. An existing store written by the same source,
        with the same layers and sample table, is resumed (its recorded samples
        are kept: start at :attr:`StoreWriter.next_sample`); any other store is
        refused (``StoreMismatchError``), unless ``overwrite``.
    layers
        ``{name: shape of one sample}``, in model order, e.g. ``{"conv":
        (7, 7, 32), "fc": (128,)}``: spatial axes first, channels (units) last.
    groups
        The group of each sample, in the order the samples are written; its
        length is the number of samples.
    source
        What the activations come from, recorded as the store's model identity
        (e.g. ``{"name": "resnet18", "sha256": "…", "framework": "torch"}``;
        JSON values). A store written from another source is not resumed.
    grads
        Whether gradients are written too: ``True`` for every layer, or the
        names of the layers that have them.
    n_samples
        The number of samples, if given checked against ``groups``.
    targets, files, indices
        Per sample: the target class (-1: none), the file it came from, and
        its index in that file. Default: -1, ``""``, and the sample's number.
    gradient_target
        What the gradients are of, if known: ``"predicted"`` (the argmax of the
        output) or ``"target"``; then every write gives the predictions.
    chunk_mib
        Target chunk size in MiB (default 32; on resume, the store's own).
    overwrite
        Start over, deleting an existing store at ``store``.
    append
        Add samples to a complete (or interrupted) store: ``groups`` (and the
        other columns) hold the store's samples first, then the new ones. The
        store grows to hold them all; write only the new ones, from
        :attr:`StoreWriter.next_sample` (the store's old sample count) on. The
        store keeps its chunk plan; the source and layers must be the store's.
        Derived results become stale (a new extraction id); ``inntrospect.naps``
        then updates stored NAPs from the new samples alone. Without a store at
        ``store``, a new one is written.
    progress
        Show a progress bar.
    on_block
        Called as ``on_block(block, n_blocks)`` after each block is recorded.

    Returns
    -------
    StoreWriter
        Holds the store's writer lock until closed; use it as a context manager.

    Raises
    ------
    ParameterError, ParameterTypeError
        An argument is malformed (the message names it and the fix).
    StoreMismatchError
        The store holds samples of another source, layers or sample table
        (with ``append``: its samples are not the first of ``groups``).
    StoreLockedError
        Another process writes to the store.

    Examples
    --------
    >>> import numpy as np
    >>> import inntrospect
    >>> rng = np.random.default_rng(0)
    >>> groups = np.repeat(["cat", "dog"], 500)
    >>> with inntrospect.open_writer("run.zarr", {"conv": (7, 7, 32), "fc": (128,)}, groups,
    ...                              source={"name": "my model"}, grads=["conv"]) as writer:  # doctest: +SKIP
    ...     for lo in range(writer.next_sample, len(groups), 64):
    ...         k = min(64, len(groups) - lo)
    ...         writer.write({"conv": rng.random((k, 7, 7, 32)), "fc": rng.random((k, 128))},
    ...                      grads={"conv": rng.standard_normal((k, 7, 7, 32))})
    >>> inntrospect.naps("run.zarr")["fc"].nap.compute()  # doctest: +SKIP
    """
    from ..checks import check_bool

    check_bool(append=append)
    if append and overwrite:
        raise ParameterError("append=True adds samples to the store, overwrite=True deletes it first: give "
                             "one of them.")
    path = st.location(store)
    specs = _layer_specs(layers, grads)
    table = _sample_table(groups, n_samples, targets, files, indices)
    n = len(table["group"])
    if gradient_target not in (None, "predicted", "target"):
        raise ParameterError(f"gradient_target must be 'predicted', 'target' or None, got {gradient_target!r}.")
    if gradient_target == "target" and (targets is None or (table["target"] < 0).any()):
        raise ParameterError("gradient_target='target' needs targets: the target class of every sample "
                             "(0 or more).")
    _check_chunk_mib(chunk_mib)
    model = _source_identity(source)
    plan = None
    if not overwrite and st.is_store(path):  # resuming (or appending): keep the store's chunking
        stored = st.store_attrs(path)
        if chunk_mib is None:
            chunk_mib = stored.get("chunk_mib")
        plan = st.stored_plan(stored, [spec.name for spec in specs], chunk_mib)
    plan = plan or st.plan_for(specs, chunk_mib, n)
    files_named = {str(f) for f in table["file"]} - {""}
    corpus = {"path": None, "csv_sha256": None, "files_sha256": None, "table_sha256": st.table_sha256(table),
              "n_samples": n, "n_files": len(files_named), "sample_shape": None, "dtype": None,
              "groups": sorted({str(g) for g in table["group"]}), "has_target": targets is not None}
    attrs = st.root_attrs(model=model, corpus=corpus, layers=specs, plan=plan, n_samples=n,
                          gradient_target=gradient_target, source="writer")

    def check(stored: dict) -> None:
        _check_resumable(path, stored, attrs, specs, table)

    return StoreWriter.open(path, attrs, specs, plan, table, overwrite=overwrite, check=check,
                            progress=progress, on_block=on_block, desc="write", append=append)


# -- the arguments of open_writer ------------------------------------------------------
def _layer_specs(layers, grads) -> list[st.LayerSpec]:
    if not isinstance(layers, Mapping) or not layers:
        raise ParameterTypeError(
            f"layers must be a non-empty mapping {{name: shape of one sample}}, e.g. {{'fc': (128,)}}, got "
            f"{layers!r}.")
    names = [str(k) for k in layers]
    bad = [k for k in layers if not isinstance(k, str) or not k or "/" in k or k.startswith(".")]
    if bad:
        raise ParameterError(f"layer names must be non-empty strings without '/' (and not starting with '.'), "
                             f"got {bad}.")
    if isinstance(grads, bool):
        with_grads = set(names) if grads else set()
    elif isinstance(grads, str):
        with_grads = {grads}
    elif isinstance(grads, Collection):
        with_grads = {str(g) for g in grads}
    else:
        raise ParameterTypeError(f"grads must be True, False or the names of the layers with gradients, "
                                 f"got {grads!r}.")
    unknown = sorted(with_grads - set(names))
    if unknown:
        raise LayerNotFoundError(f"grads names {unknown}, which are not among the layers: {', '.join(names)}.")
    specs = []
    for name, shape in layers.items():
        try:
            dims = tuple(shape)
        except TypeError:
            dims = (shape,)
        if not dims or not all(isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0
                               for d in dims):
            raise ParameterError(
                f"the shape of layer {name!r} must be the shape of one sample: positive integers, at least "
                f"a unit axis (channels last), e.g. (128,) or (7, 7, 32); got {shape!r}.")
        specs.append(st.LayerSpec(name, tuple(int(d) for d in dims), name in with_grads))
    return specs


def _column(name: str, values, n: int, kind: str) -> np.ndarray:
    a = np.asarray(values)
    if a.shape != (n,):
        raise ParameterError(f"{name} must hold one value per sample ({n}, as groups), got shape {a.shape}.")
    if kind == "int" and (a.dtype.kind not in "iu" if a.size else False):
        raise ParameterTypeError(f"{name} must hold integers, got {a.dtype} values.")
    return a


def _sample_table(groups, n_samples, targets, files, indices) -> dict[str, np.ndarray]:
    if isinstance(groups, str | bytes | Mapping) or not (isinstance(groups, Sequence) or hasattr(groups, "__array__")):
        raise ParameterTypeError(f"groups must be a sequence of one group label per sample, got "
                                 f"{type(groups).__name__}.")
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) == 0:
        raise ParameterError(f"groups must hold one label per sample (at least one sample), got shape {g.shape}.")
    n = len(g)
    if n_samples is not None and n_samples != n:
        raise ParameterError(f"n_samples is {n_samples} but groups has {n} labels: give one group label per "
                             "sample.")
    labels = np.array([str(x) for x in g.tolist()], dtype=object)
    empty = np.flatnonzero(labels == "")
    if len(empty):
        raise ParameterError(f"group labels must not be empty; sample {int(empty[0])} has an empty label.")
    target = np.full(n, -1, np.int64) if targets is None else _column("targets", targets, n, "int").astype(np.int64)
    if (target < -1).any():
        raise ParameterError("targets must be classes (0 or more), or -1 where a sample has none.")
    index = np.arange(n, dtype=np.int64) if indices is None else _column("indices", indices, n, "int").astype(np.int64)
    file = np.full(n, "", dtype=object) if files is None else \
        np.array([str(f) for f in _column("files", files, n, "str").tolist()], dtype=object)
    return {"group": labels, "file": file, "index_in_file": index, "target": target}


def _check_chunk_mib(chunk_mib) -> None:
    if chunk_mib is None:
        return
    if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, numbers.Real) or not (
            math.isfinite(chunk_mib) and 0 < chunk_mib <= MAX_CHUNK_MIB):
        raise ParameterError(f"chunk_mib must be a number of MiB above 0 and at most {MAX_CHUNK_MIB}, got "
                             f"{chunk_mib!r}; leave it out for the default (32).")


def _source_identity(source) -> dict:
    """The store's ``model`` record of a writer's ``source``: its JSON values, ``framework`` "external" unless named."""
    if not isinstance(source, Mapping) or not source:
        raise ParameterTypeError(
            f"source must be a non-empty dict saying what the activations come from, e.g. {{'name': 'resnet18', "
            f"'sha256': '…'}}, got {source!r}.")
    try:
        record = json.loads(json.dumps({"framework": "external", **source}, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ParameterTypeError(f"source must hold JSON values (strings, numbers, lists, dicts): {err}.") from None
    return record


def _check_resumable(path, stored: dict, attrs: dict, specs: Sequence[st.LayerSpec], table) -> None:
    """Refuse to resume a store of another source, other layers (or shapes) or another sample table."""
    diffs = []
    if stored.get("model") != attrs["model"]:
        diffs.append(f"source: the store was written from {json.dumps(stored.get('model'), sort_keys=True)}, "
                     f"now {json.dumps(attrs['model'], sort_keys=True)}")
    have = [(name, tuple(st.array_meta(path, name)["shape"][1:]), st.has_node(path, st.layer_path(name, "grads")))
            for name in stored.get("layers", [])]
    want = [(spec.name, spec.shape, spec.has_grads) for spec in specs]
    if have != want:
        diffs.append(f"layers: the store has {_describe_layers(have)}; now {_describe_layers(want)}")
    if stored.get("corpus", {}).get("table_sha256") != attrs["corpus"]["table_sha256"]:
        diffs.append("sample table: " + _table_difference(path, stored, table))
    if diffs:
        raise StoreMismatchError(
            f"{path} holds other samples, so this writer cannot resume it:\n  - " + "\n  - ".join(diffs)
            + "\nUse another store path, or overwrite=True to start over.")


def _describe_layers(layers) -> str:
    return ", ".join(f"{name} {shape}{' with grads' if g else ''}" for name, shape, g in layers) or "none"


def _table_difference(path, stored: dict, table) -> str:
    """How the store's sample table differs from ``table``, by its first differing sample."""
    layer = stored["layers"][0]
    n = len(table["group"])
    for col in ("group", "file", "index_in_file", "target"):
        have = st.open_array(path, layer, col)[:]
        if len(have) != n:
            return f"the store holds {len(have)} samples, now {n}" + (
                f" (if the first {len(have)} are the store's, open_writer(..., append=True) adds the others)"
                if len(have) < n else "")
        want = table[col]
        if col in ("group", "file"):
            have, want = (np.array([str(v) for v in values]) for values in (have, want))
        bad = np.flatnonzero(np.asarray(have) != np.asarray(want))
        if len(bad):
            i = int(bad[0])
            return (f"the {col} of sample {i} is {have[i].item()!r} in the store, {want[i].item()!r} now "
                    f"({len(bad)} of {n} samples differ)")
    return "it was written with another sample table"


def _mapping(what: str, value) -> Mapping:
    if not isinstance(value, Mapping):
        raise ParameterTypeError(f"{what} must be a mapping {{layer: array}}, got {type(value).__name__}.")
    return value


def _first_non_finite(a: np.ndarray) -> int | None:
    """The first row of ``a`` holding NaN or infinity, or None (integers always are finite)."""
    if a.dtype.kind != "f" or not a.size:
        return None
    step = max(1, _FINITE_SLICE // max(1, a[0].nbytes))
    for lo in range(0, len(a), step):
        part = a[lo : lo + step]
        if np.isfinite(part.max()) and np.isfinite(part.min()):  # NaN propagates; no temporaries
            continue
        bad = ~np.isfinite(part.reshape(len(part), -1)).all(axis=1)
        return lo + int(np.flatnonzero(bad)[0])
    return None


def _chunk_indices(keys: list[str]) -> list[int]:
    """The index along ``sample`` of each chunk key (``c/3/0/0`` or ``c.3.0.0``: 3)."""
    return [int(k.replace(".", "/").split("/")[1]) for k in keys]
