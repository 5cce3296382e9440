"""Validate an extraction's model, corpus, layers and settings, and plan its store (nothing written)."""

from __future__ import annotations

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
           "batch_targets"]


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
    plan = st.plan_for(km.layers, chunk_mib, corp.n_samples)
    attrs = st.root_attrs(model=km.identity(), corpus=corp.identity(), layers=km.layers, plan=plan,
                          n_samples=corp.n_samples, gradient_target=gradient_target)
    request = {"model": source, "corpus": str(corp.csv_path), "store": path,
               "layers": None if layers is None else tuple(layers), "gradient_target": gradient_target,
               "chunk_mib": plan.chunk_mib, "batch_size": batch_size}
    return Extraction(corp, km, path, plan, gradient_target, batch_size, attrs, request)


def measure_ratios(ex: Extraction, n: int | None = None) -> dict[str, dict[str, tuple[int, int]]]:
    """``{layer: {var: (raw bytes, zstd bytes)}}`` of the arrays of the first batch."""
    import numcodecs

    codec = numcodecs.Zstd(level=st.CODEC["level"])
    x = ex.corpus.read(0, min(n or ex.batch_size, ex.corpus.n_samples))
    acts, grads, _ = ex.model.compute(x, batch_targets(ex, 0, len(x)), pad_to=ex.batch_size)
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


def batch_targets(ex: Extraction, lo: int, hi: int) -> np.ndarray | None:
    return ex.corpus.targets(lo, hi) if ex.gradient_target == "target" else None


