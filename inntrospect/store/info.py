"""``inntrospect info``: what a store holds, in words."""

from __future__ import annotations

import json
import os

import numpy as np

from .. import store as st
from . import steps as steps_

__all__ = ["describe_store", "format_bytes"]



def format_bytes(n: float) -> str:
    """``12 B``, ``513.5 kB``, ``1.1 GB``: decimal units, as ``du -h --si``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _codec_name(spec: dict | None) -> str:
    return "none" if spec is None else f"{spec['name']}-{spec.get('level', '')}".rstrip("-")


def describe_store(path: str | os.PathLike) -> str:
    """A readable summary: provenance, extraction state, layers, groups, steps."""
    import zarr

    path = st.location(path)
    attrs = st.store_attrs(path)
    ex = attrs.get("extraction", {})
    root = zarr.open_group(st.zarr_store(path, read_only=True), mode="r")
    model, corpus = attrs.get("model", {}), attrs.get("corpus", {})
    n_done = int(np.asarray(root[st.BLOCKS_DONE][:]).astype(bool).sum()) if st.BLOCKS_DONE in root else 0
    state = ex.get("state", "being created")
    if state != "complete":
        running = "running now" if st.is_locked(path) else "not running: run the same extraction to resume"
        state = f"{state}: {n_done} of {ex.get('n_blocks', '?')} blocks written ({running})"
    lines = [
        f"store:      {path} (format {attrs.get('format_version')})",
        f"model:      {model.get('path') or model.get('name')} ({model.get('framework')}, "
        f"sha256 {str(model.get('sha256'))[:12]})",
        f"corpus:     {corpus.get('path')} ({corpus.get('n_samples')} samples, "
        f"{corpus.get('n_files')} files)",
        f"extraction: {state}; id {ex.get('id')}; gradient target {ex.get('gradient_target')}",
        f"chunks:     ~{attrs.get('chunk_mib')} MiB target; block {ex.get('block')} samples",
        "",
        f"{'layer':<24} {'dims':<28} {'shape':<22} {'chunk':>6} {'codec acts/grads':>17} {'on disk':>10}",
    ]
    total = 0
    for name in attrs.get("layers", []):
        meta = json.loads(path.read_text(f"layers/{name}/acts/zarr.json"))
        size = path.size(f"layers/{name}")
        total += size
        codecs = attrs.get("codecs", {}).get(name, {})
        names = "/".join(_codec_name(codecs[v]) for v in ("acts", "grads") if v in codecs)
        lines.append(
            f"{name:<24} {', '.join(meta['dimension_names']):<28} {str(tuple(meta['shape'])):<22} "
            f"{meta['chunk_grid']['configuration']['chunk_shape'][0]:>6} {names:>17} {format_bytes(size):>10}"
        )
    lines.append(f"{'total':<24} {'':<28} {'':<22} {'':>6} {'':>17} {format_bytes(total):>10}")
    if attrs.get("layers"):
        labels = np.array([str(g) for g in root[f"layers/{attrs['layers'][0]}/group"][:]])
        names, counts = np.unique(labels, return_counts=True)
        lines += ["", f"groups ({len(names)}): " + ", ".join(f"{g} ({c})" for g, c in zip(names, counts))]
    lines += ["", "steps:"] + _describe_steps(path, attrs)
    return "\n".join(lines)


def _describe_steps(path, attrs: dict) -> list[str]:
    """One line per analysis step: current, stale (and why, and what to run), or absent."""
    records = attrs.get("steps", {})
    status = steps_.status(path, attrs)
    lines = []
    for step in steps_.STEPS:
        rec = records.get(step)
        if rec is None:
            lines.append(f"  {step:<10} not run ({steps_.RERUN[step].split(' (')[0]})")
            continue
        params = ", ".join(f"{k}={v}" for k, v in rec.get("params", {}).items())
        what = f"{len(rec.get('layers', []))} layers" + (f"; {params}" if params else "")
        why = status.get(step)
        if why is None:
            lines.append(f"  {step:<10} current ({what}; {rec.get('finished')})")
        else:
            lines.append(f"  {step:<10} STALE: {why} ({what}). Re-run {steps_.RERUN[step].split(' (')[0]}")
    return lines
