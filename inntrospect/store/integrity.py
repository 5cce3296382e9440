"""Integrity, ``inntrospect verify``: every chunk of every array of a store, there, decoding and checksummed.

:func:`verify` lists the chunks each array should have and finds the missing
ones (one ``stat`` per chunk file locally, one listing per array on object
storage), then reads every stored chunk as dask tasks on the scheduler in use
(one task per group of consecutive chunks of an array): local float32 arrays
chunked along samples through :func:`inntrospect.store.chunkio.read_chunk`
(crc32c, zstd frame and sizes checked, as the NAP pass reads them), anything
else through Zarr, which checks the crc32c itself. It returns a
:class:`Report` of the chunks that are missing or damaged, per array, with
the extraction blocks they belong to and the command that repairs them.

Which chunks must exist: those of ``acts``, ``grads`` and ``prediction`` in
the blocks recorded in ``extraction/block_done`` (blocks not extracted yet
have none), every chunk of the sample table (in stores with checksums:
before, a table column holding only its fill value, such as empty file
names, was not stored) and of ``aligned`` (once the ``align`` step finished on the store's
extraction: after an append, until it runs again, only its stored chunks). Elsewhere (block records, derived results, where a
chunk holding only the fill value is legitimately absent) only the stored
chunks are checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import DamagedStoreError
from . import chunkio
from .format import BLOCKS_DONE, LAYERS
from .handle import Store
from .nodes import (
    ASIDE,
    STAGED,
    chunk_grid,
    chunk_where,
    decode_problem,
    stored_chunks,
    zarr_store,
)
from .nodes import repair_hint as extraction_hint
from .steps import RERUN, STEPS

__all__ = ["verify", "Report", "ChunkProblem", "repair_hint", "EXTRACTED", "TASK_MIB"]

#: arrays written by extraction, block by block: their damage is repaired by extracting the blocks again
EXTRACTED = ("acts", "grads", "prediction")
#: uncompressed chunk bytes one verify task reads (at most 64 chunks)
TASK_MIB = 256
_SAMPLE_TABLE = ("sample", "group", "file", "index_in_file", "target")


@dataclass(frozen=True)
class ChunkProblem:
    """A chunk that is missing or damaged: its array, key, file or URL, what is wrong, its blocks."""

    array: str
    chunk: str
    where: str
    problem: str
    blocks: tuple[int, ...] = ()

    @property
    def missing(self) -> bool:
        return self.problem.startswith("is missing")


@dataclass
class Report:
    """What :func:`verify` found. ``ok`` when no chunk is missing or damaged.

    ``problems`` lists the chunks, ``damaged_blocks`` the extraction blocks whose
    ``acts``/``grads``/``prediction`` chunks are among them (``inntrospect
    extract CONFIG --verify`` extracts those again), ``unchecked`` the arrays
    without a checksum (a store written before checksums: their chunks are
    only decoded), ``blocks_pending`` the blocks not extracted yet.
    """

    store: str
    arrays: int = 0
    chunks: int = 0
    problems: list[ChunkProblem] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    blocks_pending: int = 0
    hints: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def damaged_blocks(self) -> list[int]:
        """Extraction blocks to extract again: those of damaged or missing chunks of extracted arrays
        (``acts``, ``grads``, ``prediction``) and of damaged block records."""
        out = set()
        for p in self.problems:
            if p.array == BLOCKS_DONE or p.array.rsplit("/", 1)[-1] in EXTRACTED:
                out.update(p.blocks)
        return sorted(out)

    def by_array(self) -> dict[str, list[ChunkProblem]]:
        out: dict[str, list[ChunkProblem]] = {}
        for p in self.problems:
            out.setdefault(p.array, []).append(p)
        return out

    def __str__(self) -> str:
        head = f"{self.store}: {self.chunks} chunks of {self.arrays} arrays checked"
        lines = []
        if self.blocks_pending:
            head += f" ({self.blocks_pending} extraction blocks not recorded, their chunks not checked)"
        if self.unchecked:
            lines.append(f"no checksums in {len(self.unchecked)} arrays (written before checksums): "
                         "their chunks were decoded, not verified")
        if self.ok:
            return "\n".join([head + ": no damage.", *lines])
        n_missing = sum(p.missing for p in self.problems)
        lines.insert(0, head + f": DAMAGED, {len(self.problems)} chunks ({n_missing} missing, "
                     f"{len(self.problems) - n_missing} failing to decode or verify).")
        for name, probs in self.by_array().items():
            lines.append(f"  {name}: {len(probs)} chunks")
            for p in probs[:20]:
                blocks = f" (block {', '.join(map(str, p.blocks))})" if 0 < len(p.blocks) <= 4 else (
                    f" (blocks {p.blocks[0]}-{p.blocks[-1]})" if p.blocks else "")
                lines.append(f"    {p.where} {p.problem}{blocks}")
            if len(probs) > 20:
                lines.append(f"    ... and {len(probs) - 20} more")
        if self.damaged_blocks:
            b = self.damaged_blocks
            lines.append(f"extraction blocks to extract again: {', '.join(map(str, b[:50]))}"
                         + (" ..." if len(b) > 50 else ""))
        lines.append("to repair:")
        lines += [f"  {name}: {hint}" for name, hint in self.hints.items()]
        return "\n".join(lines)


def verify(store, *, progress: bool = False, arrays: Sequence[str] | None = None) -> Report:
    """Check every chunk of every array of the store: it exists, decodes, and matches its checksum.

    Parameters
    ----------
    store
        Path, URL or :class:`~inntrospect.store.backends.Location` of a store.
    progress
        Show a progress bar over the check tasks.
    arrays
        Only these arrays (paths in the store, e.g. ``"layers/conv2d/acts"``);
        default all.

    Returns
    -------
    Report
        ``ok``, the ``problems`` per chunk (with their extraction ``blocks``),
        ``damaged_blocks``; ``str(report)`` is what ``inntrospect verify`` prints.

    Examples
    --------
    >>> report = inntrospect.verify("run.zarr")        # doctest: +SKIP
    >>> report.ok, report.damaged_blocks                # doctest: +SKIP
    (False, [3])
    """
    import dask
    import zarr
    from zarr.codecs import Crc32cCodec

    from ..scheduler import compute

    handle = Store.open(store)
    where, attrs = handle.location, handle.attrs
    ex = attrs.get("extraction", {})
    root = zarr.open_group(zarr_store(where, read_only=True), mode="r", use_consolidated=False)
    found = {name: node for name, node in root.members(max_depth=None)
             if isinstance(node, zarr.Array) and not name.endswith((STAGED, ASIDE))
             and not any(part.endswith((STAGED, ASIDE)) for part in name.split("/"))}
    wanted = sorted(found) if arrays is None else [a for a in arrays if a in found]
    report = Report(str(where))
    tasks, plans = [], []
    recorded, block = _recorded(where, found, ex, report)
    for name in wanted:
        arr = found[name]
        expect, blocks_of = _expectations(name, arr, attrs, recorded, block)
        grid = chunk_grid(arr)
        if expect == "recorded":
            grid = [(c, k) for c, k in grid if all(recorded[b] for b in blocks_of(c))]
        keys = [k for _, k in grid]
        have = stored_chunks(where, name, keys)
        for coords, key in grid:
            if key not in have and expect:
                report.problems.append(ChunkProblem(name, key, chunk_where(where, name, key),
                                                    "is missing (deleted, or never written)",
                                                    blocks_of(coords)))
        todo = [(c, k) for c, k in grid if k in have]
        if name == BLOCKS_DONE and recorded is not None:
            todo = []  # every record was read, and checked, to know which blocks to check
        if not any(isinstance(c, Crc32cCodec) for c in getattr(arr.metadata, "codecs", ())):
            report.unchecked.append(name)
        report.arrays += 1
        report.chunks += len(grid)
        files = chunkio.chunk_files(arr) if arr.ndim and arr.chunks[0] else None
        nbytes = int(np.prod(arr.chunks, dtype=np.int64)) * arr.dtype.itemsize
        per_task = max(1, min(64, (TASK_MIB << 20) // max(1, nbytes)))
        for i in range(0, len(todo), per_task):
            part = todo[i : i + per_task]
            direct = [files[c[0]] for c, _ in part] if files is not None else None
            tasks.append(dask.delayed(_check, pure=False)(where, name, part, direct))
            plans.append((name, blocks_of))
    if tasks:
        results = compute(*tasks, progress=progress, desc="verify")
        for (name, blocks_of), bad in zip(plans, results):
            for coords, key, what in bad:
                report.problems.append(ChunkProblem(name, key, chunk_where(where, name, key), what,
                                                    blocks_of(coords)))
    order = {name: i for i, name in enumerate([BLOCKS_DONE, *wanted])}
    report.problems.sort(key=lambda p: (order.get(p.array, -1), _natural(p.chunk)))
    report.hints = {name: repair_hint(where, name) for name in report.by_array()}
    return report


def repair_hint(store, name: str) -> str:
    """What repairs a damaged or missing chunk of the array ``name``: the commands to run."""
    top = name.split("/")[0]
    step = next((s for s, node in STEPS.items() if node == top and s != "align"), None)
    if step is not None:
        return f"Re-run {RERUN[step]}: it writes these results anew."
    return extraction_hint(store, name)


def _natural(key: str) -> list:
    """A chunk key's sort key: ``c/10/0`` after ``c/9/0``."""
    return [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in key.replace(".", "/").split("/")]


def _recorded(where, found: dict, ex: dict, report: Report):
    """The block records, read chunk by chunk (a damaged record counts as not recorded, and is
    reported); ``(recorded bools or None, block length or None)``."""
    arr = found.get(BLOCKS_DONE)
    block = ex.get("block")
    if arr is None or not block:
        return None, None
    try:
        recorded = np.asarray(arr[:], dtype=bool)
    except (ValueError, RuntimeError):  # one by one, to find the damaged ones
        recorded = np.zeros(arr.shape[0], bool)
        for (b,), key in chunk_grid(arr):
            try:
                recorded[b] = bool(arr[b])
            except (ValueError, RuntimeError) as err:
                report.problems.append(ChunkProblem(BLOCKS_DONE, key, chunk_where(where, BLOCKS_DONE, key),
                                                    decode_problem(err), (b,)))
    report.blocks_pending = int((~recorded).sum())
    return recorded, int(block)


def _expectations(name: str, arr, attrs: dict, recorded, block):
    """How an array's chunks are expected: ``"recorded"`` (those of recorded blocks must exist),
    True (all must), False (only stored ones are checked); and the blocks of a chunk."""
    parts = name.split("/")
    dims = getattr(arr.metadata, "dimension_names", None) or ()
    per_sample = len(parts) == 3 and parts[0] == LAYERS and dims[:1] == ("sample",) and block

    def blocks_of(coords) -> tuple[int, ...]:
        if name == BLOCKS_DONE:
            return (int(coords[0]),)
        if not per_sample:
            return ()
        c = int(arr.chunks[0])
        lo, hi = coords[0] * c, min(int(arr.shape[0]), (coords[0] + 1) * c)
        return tuple(range(lo // block, (max(hi, lo + 1) - 1) // block + 1))

    if not per_sample:
        return False, blocks_of
    var = parts[2]
    if var in ("acts", "grads") or (var == "prediction"
                                    and attrs.get("extraction", {}).get("gradient_target") is not None):
        return ("recorded" if recorded is not None else True), blocks_of
    if var in _SAMPLE_TABLE:  # stored whole since stores carry checksums (before: not if all fill)
        return "checksum" in attrs, blocks_of
    if var == "aligned":  # all its chunks once align finished on this extraction (an append makes it stale)
        rec = attrs.get("steps", {}).get("align") or {}
        current = (rec.get("inputs") or {}).get("extraction") == attrs.get("extraction", {}).get("id")
        return rec.get("state") == "complete" and current, blocks_of
    return False, blocks_of


def _check(where, name: str, items: list, files: list | None) -> list[tuple]:
    """One task: read chunks ``items`` (``(coords, key)``) of the array ``name``; ``(coords, key,
    what is wrong)`` of each that fails. ``files`` are their :mod:`.chunkio` records, to read directly."""
    import zarr

    bad = []
    arr = None
    for i, (coords, key) in enumerate(items):
        try:
            if files is not None:
                chunkio.read_chunk(chunkio.ChunkFile(*files[i]), "verify")
            else:
                if arr is None:
                    arr = zarr.open_array(zarr_store(where, read_only=True), path=name, mode="r")
                arr.get_block_selection(tuple(coords))
        except DamagedStoreError as err:
            bad.append((coords, key, getattr(err, "problem", str(err))))
        except (ValueError, RuntimeError, OSError) as err:
            bad.append((coords, key, decode_problem(err)))
    return bad
