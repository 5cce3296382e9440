"""Validate an extraction's model, corpus, layers and settings, and plan its store (nothing written)."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .. import store as st
from ..errors import ConfigError, CorpusError
from ..store.info import format_bytes
from .corpus import Corpus, read_corpus
from .models.source import ModelSource, model_source

__all__ = ["Extraction", "GradientTarget", "prepare_extraction", "measure_ratios", "estimate_ratio",
           "batch_targets", "MAX_CHUNK_MIB", "memory_bytes", "check_chunk_mib", "keep_store_plan"]


GradientTarget = Literal["predicted", "target"]

#: the largest ``chunk_mib`` taken: a chunk is read, compressed and written whole, by every step
MAX_CHUNK_MIB = 4096


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (psutil, else ``os.sysconf``; None if unknown)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - not installed, or no answer: ask the OS
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_chunk_mib(chunk_mib) -> None:
    """Refuse a ``chunk_mib`` that is no number, not finite, not positive or absurdly large."""
    if chunk_mib is None:
        return
    if isinstance(chunk_mib, bool) or not isinstance(chunk_mib, numbers.Real):
        raise ConfigError(f"chunk_mib must be a number of MiB, got {chunk_mib!r}.")
    if not (math.isfinite(chunk_mib) and 0 < chunk_mib <= MAX_CHUNK_MIB):
        raise ConfigError(
            f"chunk_mib must be a finite number of MiB above 0 and at most {MAX_CHUNK_MIB}, got "
            f"{chunk_mib!r}. Leave it out for the default (32), or give e.g. chunk_mib = 32."
        )


@dataclass
class Extraction:
    """Everything an extraction needs, validated; nothing written yet."""

    corpus: Corpus
    model: object  # KerasModel or TorchModel; typed loosely so this module imports without either
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

    @property
    def pad_to(self) -> int:
        """Samples of every inference batch (shorter ones are padded): one shape for the whole run,
        so the compiled step is traced once, and never longer than a block or the corpus."""
        return max(1, min(self.batch_size, self.plan.block, self.corpus.n_samples))

    def arrays(self):
        """``(layer, variable, index into model outputs)`` for every array written."""
        for i, info in enumerate(self.model.layers):
            yield info, "acts", i
            if info.has_grads:
                yield info, "grads", i

    def summary(self, estimate_ratio: float | None = None) -> str:
        """What ``--dry-run`` prints: samples, layers, shapes, sizes."""
        n, corp = self.corpus.n_samples, self.corpus
        csvs = corp.csv_paths
        each = []  # a corpus of several csv files: each on a line of its own
        for i, csv in enumerate(csvs if len(csvs) > 1 else (), 1):
            rows = [f for f in corp.files if f.csv == csv]
            each.append(f"         {i}. {csv}: {sum(f.n for f in rows)} samples in {len(rows)} files")
        lines = [
            f"model:   {self.model.source.describe()} ({self.model.framework})",
            f"corpus:  {corp.csv_path if len(csvs) == 1 else f'{len(csvs)} csv files'}: {n} samples in "
            f"{len(corp.files)} files, groups {', '.join(corp.groups)}",
            *each,
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
    model: str | os.PathLike | ModelSource | object,
    corpus: str | os.PathLike | Sequence[str | os.PathLike] | Corpus,
    store: str | os.PathLike,
    layers: Sequence[str] | None = None,
    gradient_target: GradientTarget = "predicted",
    chunk_mib: float | None = None,
    batch_size: int = 128,
    weights: str | os.PathLike | None = None,
    verify_corpus: bool = False,
    allow_duplicates: bool = False,
    allow_outside: bool = False,
) -> Extraction:
    """Validate corpus, model, layers and settings; load the model. Writes nothing.

    ``model`` is a Keras model path or ``keras.applications`` name, a torch factory
    ``"package.module:function"``/``"file.py:function"`` (``weights``: its
    ``state_dict`` file) or a ``torch.nn.Module`` object (see
    :func:`~inntrospect.extraction.models.model_source`).

    ``verify_corpus`` records each batch file's sha256 in the store (read in full once),
    besides its size and modification time; a resumed extraction compares them, so
    a batch file changed since is found even when its size and time are the same
    (and a copy with another time but the same contents is accepted).
    ``corpus`` is a ``corpus.csv`` (or its folder), or a list of them read in order as one corpus
    (:func:`~inntrospect.extraction.corpus.read_corpus`).
    ``allow_duplicates`` and ``allow_outside`` are :func:`read_corpus`'s switches.
    Refused before anything is computed: a ``batch_size`` that is no positive
    integer or whose batch (inputs and every recorded array) would need more
    than half the machine's memory, and a ``chunk_mib`` out of range.
    """
    from .models import open_model

    if gradient_target not in ("predicted", "target"):
        raise ConfigError(
            f"gradient_target must be 'predicted' or 'target', got {gradient_target!r}."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}; e.g. batch_size = 128.")
    batch_size = int(batch_size)
    check_chunk_mib(chunk_mib)
    if isinstance(corpus, Corpus):
        corp = corpus
    else:
        corp = read_corpus(corpus, allow_duplicates=allow_duplicates, allow_outside=allow_outside)
    if gradient_target == "target" and not corp.has_target:
        raise CorpusError(
            f"gradient_target='target' needs a target column in {corp.csv_names} "
            "(rows 'file,group,target'); add it or use gradient_target='predicted'."
        )
    source = model_source(model, weights)
    km = open_model(source, layers)
    if km.input_shape is not None:  # a torch module declares none: fix_shapes runs it on the corpus's
        corp.check_input_shape(km.input_shape, source.describe())
    km.fix_shapes(corp.sample_shape)
    _check_batch_memory(km, corp, batch_size)
    if gradient_target == "target":
        top = int(corp.sample_table["target"].max())
        if top >= km.n_outputs:
            raise CorpusError(
                f"{corp.csv_names} has target {top}, but the model has only {km.n_outputs} "
                f"outputs (targets 0..{km.n_outputs - 1})."
            )
    path = st.location(store)
    if chunk_mib is None and st.is_store(path):  # resuming: keep the store's chunking
        chunk_mib = st.store_attrs(path).get("chunk_mib")
    plan = st.plan_for(km.layers, chunk_mib, corp.n_samples)
    attrs = st.root_attrs(model=km.identity(), corpus=corp.identity(verify=verify_corpus), layers=km.layers,
                          plan=plan, n_samples=corp.n_samples, gradient_target=gradient_target)
    request = {"model": source, "corpus": corp.request, "store": path,
               "layers": None if layers is None else tuple(layers), "gradient_target": gradient_target,
               "chunk_mib": plan.chunk_mib, "batch_size": batch_size, "verify_corpus": verify_corpus,
               "allow_duplicates": corp.allow_duplicates, "allow_outside": corp.allow_outside}
    return Extraction(corp, km, path, plan, gradient_target, batch_size, attrs, request)


def keep_store_plan(ex: Extraction, stored: dict | None = None) -> Extraction:
    """``ex`` with the chunk plan of the store it writes into, when that store holds its layers at its
    ``chunk_mib``: a store keeps the chunks chosen for its first samples (those of a fresh extraction
    depend on the corpus size below 8192 samples, so a store grown by an append may have others).

    ``stored`` are the store's root attributes (read when not given); ``ex`` as it is without a store.
    """
    import dataclasses

    if stored is None:
        if not st.is_store(ex.path):
            return ex
        stored = st.store_attrs(ex.path)
    if "extraction" not in stored:
        return ex
    plan = st.stored_plan(stored, [info.name for info in ex.model.layers], ex.plan.chunk_mib)
    if plan is None or plan == ex.plan:
        return ex
    attrs = {**ex.attrs, "chunks": dict(plan.chunks),
             "extraction": {**ex.attrs["extraction"], "block": plan.block,
                            "n_blocks": plan.n_blocks(ex.corpus.n_samples)}}
    return dataclasses.replace(ex, plan=plan, attrs=attrs)


def measure_ratios(ex: Extraction, n: int | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """``{layer: {var: (raw bytes, zstd bytes)}}`` of the arrays of the first batch."""
    import numcodecs

    codec = numcodecs.Zstd(level=st.CODEC["level"])
    x = ex.corpus.read(0, min(n or ex.pad_to, ex.corpus.n_samples))
    acts, grads, _ = ex.model.compute(x, batch_targets(ex, 0, len(x)), pad_to=ex.pad_to)
    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    for info, var, i in ex.arrays():
        a = np.ascontiguousarray((acts if var == "acts" else grads)[i], dtype=np.float32)
        sizes.setdefault(info.name, {})[var] = (a.nbytes, len(codec.encode(a)))
    return sizes


def estimate_ratio(ex: Extraction, sizes=None) -> float:
    """Uncompressed / on-disk size, from the first batch and the codecs it selects."""
    sizes = sizes or measure_ratios(ex)
    codecs = st.choose_codecs(sizes)
    raw = disk = 0
    for layer, v in sizes.items():
        for var, (r, c) in v.items():
            raw += r
            disk += c if codecs[layer][var] else r
    return raw / max(disk, 1)


def _check_batch_memory(km, corp: Corpus, batch_size: int) -> None:
    """Refuse a batch whose inputs and recorded arrays would need more than half the machine's memory."""
    per_sample = sum(info.bytes_per_sample * (2 if info.has_grads else 1) for info in km.layers)
    per_sample += int(np.prod(corp.sample_shape, dtype=np.int64)) * corp.dtype.itemsize  # as read
    need = batch_size * per_sample
    total = memory_bytes()
    if total is None or need <= total // 2:
        return
    fits = max(1, (total // 2) // max(1, per_sample))
    raise ConfigError(
        f"batch_size {batch_size} needs {format_bytes(need)} per batch (inputs and the activations "
        f"and gradients of the recorded layers, {format_bytes(per_sample)} per sample), more than half "
        f"of this machine's memory ({format_bytes(total)}). Use a smaller batch_size (at most "
        f"{fits}; 32-256 is usual)."
    )


def batch_targets(ex: Extraction, lo: int, hi: int) -> np.ndarray | None:
    return ex.corpus.targets(lo, hi) if ex.gradient_target == "target" else None


