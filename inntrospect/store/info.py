"""``inntrospect info``: what a store holds, in words."""

from __future__ import annotations

import os

import numpy as np

from . import steps as steps_
from .format import BLOCKS_DONE, changed_files
from .handle import Store
from .nodes import array_meta, blocks_done, group_labels, has_node, is_locked, node_bytes

__all__ = ["describe_store", "format_bytes", "corpus_changes"]



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
    store = Store.open(path)
    path, attrs = store.location, store.attrs
    ex = attrs.get("extraction", {})
    model, corpus = attrs.get("model", {}), attrs.get("corpus", {})
    csvs = f"{len(corpus['csvs'])} csv files" if corpus.get("csvs") else corpus.get("path")
    n_done = int(np.asarray(blocks_done(path)[:]).astype(bool).sum()) if has_node(path, BLOCKS_DONE) else 0
    state = ex.get("state", "being created")
    if state != "complete":
        running = "running now" if is_locked(path) else "not running: run the same extraction to resume"
        state = f"{state}: {n_done} of {ex.get('n_blocks', '?')} blocks written ({running})"
    lines = [
        f"store:      {path} (format {attrs.get('format_version')})",
        f"model:      {model.get('path') or model.get('name')} ({model.get('framework')}, "
        f"sha256 {str(model.get('sha256'))[:12]})",
        f"corpus:     {csvs} ({corpus.get('n_samples')} samples, {corpus.get('n_files')} files)",
        *[f"            {i}. {c.get('path')} ({c.get('n_samples')} samples, {c.get('n_files')} files)"
          for i, c in enumerate(corpus.get("csvs") or [], 1)],
        f"extraction: {state}; id {ex.get('id')}; gradient target {ex.get('gradient_target')}"
        + "".join(f"; appended {a.get('n_samples_before')} -> {a.get('n_samples_after')} samples {a.get('at')}"
                  for a in (ex.get("appends") or [])[-3:]),
        f"chunks:     ~{attrs.get('chunk_mib')} MiB target; block {ex.get('block')} samples",
        "",
        f"{'layer':<24} {'dims':<28} {'shape':<22} {'chunk':>6} {'codec acts/grads':>17} {'on disk':>10}",
    ]
    total = 0
    for name in attrs.get("layers", []):
        meta = array_meta(path, name)
        size = node_bytes(path, name)
        total += size
        codecs = attrs.get("codecs", {}).get(name, {})
        names = "/".join(_codec_name(codecs[v]) for v in ("acts", "grads") if v in codecs)
        lines.append(
            f"{name:<24} {', '.join(meta['dims']):<28} {str(meta['shape']):<22} "
            f"{meta['chunk']:>6} {names:>17} {format_bytes(size):>10}"
        )
    lines.append(f"{'total':<24} {'':<28} {'':<22} {'':>6} {'':>17} {format_bytes(total):>10}")
    if attrs.get("layers"):
        labels = group_labels(path, attrs["layers"][0])
        names, counts = np.unique(labels, return_counts=True)
        lines += ["", f"groups ({len(names)}): " + ", ".join(f"{g} ({c})" for g, c in zip(names, counts))]
    changed = corpus_changes(corpus)
    if changed:
        lines += ["", f"CORPUS CHANGED since the extraction: {', '.join(changed[:5])}"
                  + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
                  + ". The store and every result in it describe the old files; extract again "
                  "with --overwrite."]
    lines += ["", "steps:"] + _describe_steps(store)
    return "\n".join(lines)


def corpus_changes(corpus: dict) -> list[str]:
    """Batch files of the store's corpus record whose size or modification time is not what was
    extracted (``"a.npy (size)"``); [] when they are the same or cannot be seen from here.

    Each ``file`` is found from the folder of the corpus's (first) csv, ``path``: a later csv's
    batch files are recorded relative to it."""
    from pathlib import Path

    folder = Path(corpus.get("path") or "").parent
    if not corpus.get("files") or not folder.is_dir():
        return []
    now, missing = [], []
    for rec in corpus["files"]:
        try:
            stat = (folder / rec["file"]).stat()
        except OSError:
            missing.append(f"{rec['file']} (missing)")
            stat = None
        now.append({"file": rec["file"], "bytes": stat and stat.st_size,
                    "mtime_ns": stat and stat.st_mtime_ns})
    changed = changed_files(corpus["files"], now)
    return list(dict.fromkeys(missing + [f"{f} ({what})" for f, what in changed.items()
                                         if f"{f} (missing)" not in missing]))


def _describe_steps(store: Store) -> list[str]:
    """One line per analysis step: current, stale (and why, and what to run), or absent."""
    records = store.records
    status = steps_.status(store)
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
