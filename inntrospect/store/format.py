"""What the store holds and where: names, dims, chunk plan, layer specs, root attributes.

The format is specified in ``storage/README.md`` (format version 1). This module
spells it: the node paths (:func:`layer_path`), the dims of a layer's arrays,
the chunk plan, the description of a layer (:class:`LayerSpec`) and the root
attributes of a new store (:func:`root_attrs`). It reads and writes nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from ..errors import StoreError, StoreMismatchError

__all__ = [
    "FORMAT", "FORMAT_VERSION", "DEFAULT_CHUNK_MIB", "MAX_CHUNK_SAMPLES", "BLOCK_CHUNKS", "BLOCKS_DONE",
    "LAYERS", "LayerSpec", "ChunkPlan", "plan_chunks", "plan_for", "spatial_dims", "layer_dims",
    "layer_path", "root_attrs", "changed_files", "new_extraction", "timestamp", "check_same", "corpus_csvs",
]

FORMAT = "inntrospect"
FORMAT_VERSION = 1
DEFAULT_CHUNK_MIB = 32.0
#: Longest chunk (in samples) of any layer: keeps narrow layers' chunk counts sensible.
MAX_CHUNK_SAMPLES = 8192
#: An extraction block holds at most this many target chunks' worth of all arrays:
#: it bounds the work a crash can lose (the block is the unit of resume).
BLOCK_CHUNKS = 16
#: the group of the layers' nodes, and the array recording finished extraction blocks
LAYERS = "layers"
BLOCKS_DONE = "extraction/block_done"


def layer_path(layer: str, var: str | None = None) -> str:
    """The node of a layer (``layers/<layer>``), or one of its arrays (``layers/<layer>/<var>``)."""
    return f"{LAYERS}/{layer}" if var is None else f"{LAYERS}/{layer}/{var}"


def timestamp() -> str:
    """Now, as every time in the store is written: ISO 8601 in UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class LayerSpec:
    """One layer as the store holds it: its name, the shape of one sample, and whether it has grads."""

    name: str
    shape: tuple[int, ...]
    has_grads: bool

    @property
    def bytes_per_sample(self) -> int:
        """Bytes of one sample of one of its arrays (float32)."""
        return int(np.prod(self.shape, dtype=np.int64)) * 4


def spatial_dims(rank: int) -> tuple[str, ...]:
    """Names of a layer's spatial dims by their number: ``t``; ``y, x``; ``z, y, x``."""
    named = {0: (), 1: ("t",), 2: ("y", "x"), 3: ("z", "y", "x")}
    return named.get(rank, tuple(f"s{i}" for i in range(rank)))


def layer_dims(shape: tuple[int, ...]) -> tuple[str, ...]:
    """Dims of a per-sample layer array: spatial dims by rank, then ``unit``."""
    return (*spatial_dims(len(shape) - 1), "unit")


@dataclass(frozen=True)


class ChunkPlan:
    """Chunk length along ``sample`` per layer, and the extraction block length.

    Every chunk length is a power of two dividing ``block``, so each block of
    ``block`` samples writes whole chunks of every layer.
    """

    chunks: dict[str, int]
    block: int
    chunk_mib: float

    def n_blocks(self, n_samples: int) -> int:
        return -(-n_samples // self.block)


def _pow2_floor(x: float) -> int:
    return 1 if x < 2 else 1 << int(np.floor(np.log2(x)))


def plan_chunks(
    bytes_per_sample: Mapping[str, int],
    chunk_mib: float | None = None,
    total_bytes_per_sample: int | None = None,
    max_samples: int = MAX_CHUNK_SAMPLES,
) -> ChunkPlan:
    """Choose per-layer chunk lengths so one chunk is about ``chunk_mib`` MiB.

    Parameters
    ----------
    bytes_per_sample
        Bytes of one sample of each layer's array (one array: acts or grads).
    chunk_mib
        Target chunk size (default :data:`DEFAULT_CHUNK_MIB`).
    total_bytes_per_sample
        Bytes per sample of every array written (default: twice the sum, acts
        and grads); sets the block length, which holds about
        :data:`BLOCK_CHUNKS` target chunks of all arrays together.

    A layer's ideal chunk length is the largest power of two whose chunk stays
    within ``chunk_mib`` (at least 1 sample, at most ``max_samples``). The
    block length is a power of two too, no longer than the longest ideal
    chunk; every chunk length is its layer's ideal capped at the block length,
    so every chunk length divides the block length.
    """
    mib = DEFAULT_CHUNK_MIB if chunk_mib is None else float(chunk_mib)
    if not mib > 0:
        raise StoreError(f"chunk_mib must be positive, got {chunk_mib!r}.")
    if not bytes_per_sample:
        raise StoreError("no layers to plan chunks for.")
    target = mib * 2**20
    cap = _pow2_floor(max_samples)
    ideal = {n: min(cap, _pow2_floor(target / max(1, b))) for n, b in bytes_per_sample.items()}
    total = total_bytes_per_sample or 2 * sum(bytes_per_sample.values())
    block = min(max(ideal.values()), _pow2_floor(BLOCK_CHUNKS * target / max(1, total)))
    return ChunkPlan({n: min(c, block) for n, c in ideal.items()}, block, mib)


def check_same(stored: dict, wanted: dict, path) -> None:
    """Refuse to resume when model, corpus or settings differ; name what differs."""
    diffs = []
    sm, wm = stored.get("model", {}), wanted["model"]
    if sm.get("sha256") != wm.get("sha256"):
        was = sm.get("path") or sm.get("name")
        now = wm.get("path") or wm.get("name")
        diffs.append(
            f"model: the store was made from {was} (sha256 {str(sm.get('sha256'))[:12]}), "
            f"now {now} (sha256 {str(wm.get('sha256'))[:12]})"
        )
    sc, wc = stored.get("corpus", {}), wanted["corpus"]
    grew = isinstance(sc.get("n_samples"), int) and isinstance(wc.get("n_samples"), int) \
        and wc["n_samples"] > sc["n_samples"]
    if sc.get("csv_sha256") != wc["csv_sha256"]:
        was, now = corpus_csvs(sc), corpus_csvs(wc)
        what = "corpus.csv differs" if len(was) == len(now) == 1 else "the corpus csv files differ"
        diffs.append(f"corpus: {what} (store: {' + '.join(was) or None}, now: {' + '.join(now) or None})"
                     + (f"; it has {wc['n_samples']} samples, the store {sc['n_samples']}: if the new ones "
                        "are rows added after those extracted (or csv files listed after the store's), "
                        "append them with --append (append=True)" if grew else ""))
    elif sc.get("files_sha256") != wc["files_sha256"]:
        diffs.append("corpus: the batch files' names or shapes differ")
    elif sc.get("files") and wc.get("files"):  # (stores made before sizes and times were recorded: unknown)
        changed = changed_files(sc["files"], wc["files"])
        if changed:
            named = [f"{f} ({what})" for f, what in list(changed.items())[:10]]
            more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
            diffs.append(f"corpus: batch file(s) changed since the store was made from them: "
                         f"{', '.join(named)}{more}")
    if stored.get("layers") != wanted["layers"]:
        diffs.append(f"layers: store has {stored.get('layers')}, now {wanted['layers']}")
    se, we = stored.get("extraction", {}), wanted["extraction"]
    for key in ("gradient_target", "block"):
        if se.get(key) != we.get(key):
            diffs.append(f"extraction.{key}: store has {se.get(key)!r}, now {we.get(key)!r}")
    if stored.get("chunks") != wanted["chunks"]:
        diffs.append(f"chunks: store has {stored.get('chunks')}, now {wanted['chunks']}")
    if diffs:
        raise StoreMismatchError(
            f"{path} holds another extraction, so it cannot be resumed:\n  - "
            + "\n  - ".join(diffs)
            + "\nUse another store path, or overwrite=True (--overwrite) to start over."
        )


def corpus_csvs(corpus: Mapping) -> list[str]:
    """The csv files of a store's ``corpus`` record, in order: its ``csvs``' paths, else its ``path``
    ([] for a store not made from a csv)."""
    if corpus.get("csvs"):
        return [str(c.get("path")) for c in corpus["csvs"]]
    return [str(corpus["path"])] if corpus.get("path") else []


def changed_files(stored: Sequence[dict], now: Sequence[dict]) -> dict[str, str]:
    """``{file: what changed}`` between two corpus ``files`` records, row by row: ``"size"``,
    ``"contents"`` (where both hashed the file), else ``"modification time"``."""
    changed: dict[str, str] = {}
    for s, w in zip(stored, now):
        hashed = s.get("sha256") and w.get("sha256")
        what = ("size" if s.get("bytes") != w.get("bytes") else
                "contents" if hashed and s["sha256"] != w["sha256"] else
                "modification time" if not hashed and s.get("mtime_ns") != w.get("mtime_ns") else None)
        if what:
            changed.setdefault(w["file"], what)
    return changed


def plan_for(layers: Sequence[LayerSpec], chunk_mib: float | None, n_samples: int) -> ChunkPlan:
    """The chunk plan of a store of ``layers`` and ``n_samples``: acts and grads counted, and no
    chunk longer than the corpus needs (uncompressed chunks are stored whole)."""
    return plan_chunks(
        {spec.name: spec.bytes_per_sample for spec in layers},
        chunk_mib,
        sum(spec.bytes_per_sample * (2 if spec.has_grads else 1) for spec in layers),
        max_samples=min(MAX_CHUNK_SAMPLES, 1 << max(0, n_samples - 1).bit_length()),
    )


def root_attrs(
    *,
    model: dict,
    corpus: dict,
    layers: Sequence[LayerSpec],
    plan: ChunkPlan,
    n_samples: int,
    gradient_target: str | None,
    codecs: Mapping[str, Mapping[str, dict | None]] | None = None,
    **extraction,
) -> dict:
    """The root attributes of a new store: provenance, layers, chunking, and its extraction record.

    The extraction record gets a fresh id, the state ``incomplete`` and its start
    time; ``extraction`` adds keys to it (e.g. ``source="import-legacy"``).
    ``codecs`` (``{layer: {var: codec record or None}}``) may come later.
    """
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(model),
        "corpus": dict(corpus),
        "layers": [spec.name for spec in layers],
        "chunk_mib": plan.chunk_mib,
        "chunks": dict(plan.chunks),
        "extraction": {
            "gradient_target": gradient_target,
            "block": plan.block,
            "n_blocks": plan.n_blocks(n_samples),
            **extraction,
        },
    }
    if codecs is not None:
        attrs["codecs"] = {k: dict(v) for k, v in codecs.items()}
    return attrs


def new_extraction(attrs: dict) -> dict:
    """``attrs`` with its extraction record started anew: a fresh id, ``incomplete``, started now."""
    return {**attrs, "extraction": {**attrs["extraction"], "id": uuid.uuid4().hex,
                                    "state": "incomplete", "started": timestamp()}}
