"""Appending samples to a store: the checks, and growing its arrays (``storage/README.md``, *Appending*).

A store of ``N`` samples takes the samples ``N .. M`` of a longer corpus (more
rows in its csv, or more csv files after the store's) or sample table whose
first ``N`` rows are the store's. :func:`check_append`
refuses anything else with the difference named; :func:`grow` makes the store
``M`` samples long, crash-safely:

1. one write of the root attributes: the new ``corpus``, and an extraction
   record with a new ``id``, state ``incomplete``, the append in ``appends``
   and the marker ``resizing`` (``from``, ``to``, and the hash of the first
   ``from`` rows of the sample table, to check them against on a redo);
2. every per-sample array (``acts``, ``grads``, ``prediction``, ``aligned``)
   resized to ``M`` (metadata only: the new chunks are written later), the
   sample table written anew (one chunk of ``M``, as a fresh store has), the
   block records resized, and the old last block un-recorded when it is
   partial (it is written again whole, its stored rows read back: ``kept``);
3. the marker removed.

A writer killed in 2 leaves the marker: the next writer (``--append`` or a
plain resume) does 2 again from ``from`` and goes on. The store's chunk plan
is kept (the chunk lengths chosen for its first samples).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import StoreMismatchError
from .format import (
    BLOCKS_DONE,
    ChunkPlan,
    LayerSpec,
    changed_files,
    corpus_csvs,
    layer_path,
    plan_for,
    timestamp,
)
from .nodes import (
    array_meta,
    consolidate,
    has_node,
    open_array,
    store_attrs,
    update_attrs,
    write_sample_table,
    zarr_store,
)

__all__ = ["table_sha256", "stored_plan", "base_samples", "growing", "check_append", "grow"]

#: the per-sample arrays of a layer that are resized (the sample table is written anew)
_RESIZED = ("acts", "grads", "prediction", "aligned")
_TABLE = ("group", "file", "index_in_file", "target")


def table_sha256(table: Mapping[str, np.ndarray]) -> str:
    """A hash of a sample table's ``group``, ``file``, ``index_in_file`` and ``target`` columns."""
    h = hashlib.sha256()
    for col in ("group", "file"):
        h.update("\x1f".join(str(v) for v in table[col]).encode())
        h.update(b"\x1e")
    for col in ("index_in_file", "target"):
        h.update(np.ascontiguousarray(table[col], "<i8").tobytes())
    return h.hexdigest()


def stored_plan(attrs: dict, names: Sequence[str], chunk_mib: float | None) -> ChunkPlan | None:
    """The chunk plan of a store (its ``chunks`` and block length), when it holds the layers ``names``
    and was planned at ``chunk_mib`` (None: any); else None."""
    chunks = attrs.get("chunks")
    block = (attrs.get("extraction") or {}).get("block")
    mib = attrs.get("chunk_mib")
    if not isinstance(chunks, dict) or sorted(chunks) != sorted(names) or not isinstance(block, int) \
            or mib is None or (chunk_mib is not None and float(chunk_mib) != float(mib)):
        return None
    return ChunkPlan({name: int(chunks[name]) for name in names}, int(block), float(mib))


def growing(attrs: dict) -> bool:
    """Whether an append into the store was interrupted while its arrays were being resized."""
    return isinstance((attrs.get("extraction") or {}).get("resizing"), dict)


def base_samples(attrs: dict) -> int:
    """The samples the store holds whole: those before an interrupted resize, else its corpus's."""
    ext = attrs.get("extraction") or {}
    if growing(attrs):
        return int(ext["resizing"]["from"])
    return int((attrs.get("corpus") or {}).get("n_samples") or 0)


def _stored_table(path, layer: str, n: int) -> dict[str, np.ndarray]:
    out = {}
    for col in _TABLE:
        values = open_array(path, layer, col)[:n]
        out[col] = np.array([str(v) for v in values], dtype=object) if col in ("group", "file") \
            else np.asarray(values, np.int64)
    return out


def _table_difference(have: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], n: int) -> str | None:
    """How the first ``n`` rows of two sample tables differ (their first differing sample), or None."""
    for col in _TABLE:
        a, b = np.asarray(have[col][:n]), np.asarray(want[col][:n])
        if col in ("group", "file"):
            a, b = a.astype(str), b.astype(str)
        bad = np.flatnonzero(a != b)
        if len(bad):
            i = int(bad[0])
            file = str(want["file"][i])
            where = f"it is {file}[{int(want['index_in_file'][i])}] now; " if col != "file" and file else ""
            return (f"the {col} of sample {i} is {a[i].item()!r} in the store, {b[i].item()!r} now "
                    f"({where}{len(bad)} of the first {n} samples differ)")
    return None


def _model_difference(stored: dict, wanted: dict) -> str | None:
    sm, wm = stored.get("model") or {}, wanted.get("model") or {}
    same = sm.get("sha256") == wm.get("sha256") if sm.get("sha256") and wm.get("sha256") else sm == wm
    if same:
        return None
    was = sm.get("path") or sm.get("name") or json.dumps(sm, sort_keys=True)
    now = wm.get("path") or wm.get("name") or json.dumps(wm, sort_keys=True)
    return (f"model: the store was made from {was} (sha256 {str(sm.get('sha256'))[:12]}), now {now} "
            f"(sha256 {str(wm.get('sha256'))[:12]}); appended samples must come from the same model")


def check_append(path, stored: dict, wanted: dict, layers: Sequence[LayerSpec],
                 table: Mapping[str, np.ndarray]) -> int:
    """Refuse to append the rows of ``table`` to the store unless its first rows are the store's.

    ``stored`` are the store's root attributes, ``wanted`` those of the longer
    extraction (:func:`~inntrospect.store.root_attrs`, with the store's chunk
    plan). Checked: the model (its sha256, or the whole source record), the
    layers (names, shapes, gradients), the gradient target, the chunk plan,
    the samples' shape and dtype, the first ``N`` rows of the sample table
    (files, groups, index in file, targets), and the batch files of the rows
    already extracted (size and modification time, or sha256 where both have
    one: :func:`~inntrospect.store.format.changed_files`). Returns ``N``.

    Raises
    ------
    StoreMismatchError
        Naming each difference and the fix.
    """
    n_before = base_samples(stored)
    n = len(table["group"])
    diffs = []
    if n < n_before:
        diffs.append(f"samples: the store holds {n_before}, the corpus now has {n}: rows were removed, "
                     "and appending only adds rows after those extracted")
    model = _model_difference(stored, wanted)
    if model:
        diffs.append(model)
    have = []
    for name in stored.get("layers", []):
        try:
            shape = tuple(array_meta(path, name)["shape"][1:])
        except (TypeError, KeyError, ValueError):
            shape = None
        have.append((name, shape, has_node(path, layer_path(name, "grads"))))
    want = [(spec.name, tuple(spec.shape), spec.has_grads) for spec in layers]
    if have != want:
        diffs.append(f"layers: the store has {_describe(have)}; now {_describe(want)}")
    se, we = stored.get("extraction", {}), wanted["extraction"]
    if se.get("gradient_target") != we.get("gradient_target"):
        diffs.append(f"gradient target: the store has {se.get('gradient_target')!r}, now "
                     f"{we.get('gradient_target')!r}")
    if stored.get("chunks") != wanted.get("chunks") or se.get("block") != we.get("block"):
        diffs.append(f"chunking: the store has chunks {stored.get('chunks')} (block {se.get('block')}, "
                     f"chunk_mib {stored.get('chunk_mib')}), now {wanted.get('chunks')} (block {we.get('block')}); "
                     "an append keeps the store's chunking: leave chunk_mib out")
    sc, wc = stored.get("corpus") or {}, wanted.get("corpus") or {}
    for key in ("sample_shape", "dtype"):
        if sc.get(key) is not None and wc.get(key) is not None and sc[key] != wc[key]:
            diffs.append(f"corpus: the samples' {key.replace('_', ' ')} is {sc[key]} in the store, {wc[key]} now")
    if not diffs and n_before:
        if growing(stored):  # the table is being rewritten: its first rows are checked against their hash
            if table_sha256({c: table[c][:n_before] for c in _TABLE}) != stored["extraction"]["resizing"].get(
                    "table_sha256"):
                diffs.append(f"sample table: the first {n_before} samples differ from those the store held "
                             "when the append that was interrupted began")
        else:
            why = _table_difference(_stored_table(path, stored["layers"][0], n_before), table, n_before)
            if why:
                diffs.append(f"sample table: {why}")
    sf, wf = sc.get("files"), wc.get("files")
    if not diffs and sf and wf:
        rows = int(((stored.get("extraction") or {}).get("resizing") or {}).get("rows", len(sf)))
        renamed = [(s.get("file"), w.get("file")) for s, w in zip(sf[:rows], wf[:rows]) if s.get("file") != w.get("file")]
        if renamed:
            diffs.append(f"corpus: row {len(sf[:rows]) - len(renamed) + 1} names {renamed[0][1]!r}, the store's "
                         f"{renamed[0][0]!r}")
        changed = changed_files(sf[:rows], wf[:rows])
        if changed:
            named = [f"{f} ({what})" for f, what in list(changed.items())[:10]]
            more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
            diffs.append(f"corpus: batch file(s) of the rows already extracted changed since: {', '.join(named)}"
                         f"{more}. New samples go into new batch files on new rows after those extracted; "
                         "restore the changed files as they were")
    was, now = corpus_csvs(sc), corpus_csvs(wc)
    if diffs and max(len(was), len(now)) > 1 and now[:len(was)] != was:
        diffs.append(f"corpus csv files: the store's samples come from {' + '.join(was)}, now from "
                     f"{' + '.join(now)}. The csv files of a corpus are read in order: list the store's first, "
                     "in their order and with their rows as they were, then the new ones")
    if diffs:
        raise StoreMismatchError(
            f"{path} cannot take the new samples: its first {n_before} samples are not the first of this "
            "corpus, or were made otherwise:\n  - " + "\n  - ".join(diffs)
            + "\nFix the difference (an append adds rows after those extracted, from the same model), "
            "or extract the whole corpus anew with overwrite=True (--overwrite), or into another store path.")
    return n_before


def _describe(layers) -> str:
    return ", ".join(f"{name} {shape}{' with grads' if g else ''}" for name, shape, g in layers) or "none"


def grow(path, stored: dict, wanted: dict, layers: Sequence[LayerSpec], plan: ChunkPlan,
         table: Mapping[str, np.ndarray], *, append_record: Mapping | None = None) -> dict:
    """Make the store as long as ``table``, after :func:`check_append`; returns its new root attributes.

    ``wanted`` are the root attributes of the longer extraction (its ``corpus``
    becomes the store's); ``append_record`` adds keys to the append's entry in
    ``extraction.appends`` (e.g. the corpus file). Derived results become
    stale: the extraction gets a new id.
    """
    n_before, n = base_samples(stored), len(table["group"])
    B = plan.block
    ext = dict(stored["extraction"])
    if not growing(stored):
        done = np.asarray(_records(path)[:], bool)
        kept = [list(r) for r in ext.get("kept", []) if r[0] // B < len(done) and not done[r[0] // B]]
        if n_before % B and n_before // B < len(done) and done[n_before // B]:
            kept.append([n_before // B * B, n_before])  # stored rows of the partial last block: read back
        old = _stored_table(path, stored["layers"][0], n_before)
        new_id = uuid.uuid4().hex
        entry = {"n_samples_before": n_before, "n_samples_after": n, "id_before": ext.get("id"), "id": new_id,
                 "at": timestamp(), **dict(append_record or {})}
        ext.update(id=new_id, state="incomplete", kept=kept,
                   appends=[*ext.get("appends", []), entry],
                   resizing={"from": n_before, "to": n, "table_sha256": table_sha256(old),
                             "rows": len((stored.get("corpus") or {}).get("files") or [])})
        ext.pop("finished", None)
    else:  # redone, maybe to another length: the unfinished append's entry says so
        entry = {**ext["appends"][-1], "n_samples_after": n, "at": timestamp(), **dict(append_record or {})}
        ext.update(appends=[*ext["appends"][:-1], entry], resizing={**ext["resizing"], "to": n})
    ext["n_blocks"] = plan.n_blocks(n)
    update_attrs(path, corpus=wanted["corpus"], extraction=ext)  # 1: from now on the store is incomplete
    _resize(path, layers, plan, table, n_before)  # 2
    ext.pop("resizing")
    update_attrs(path, extraction=ext)  # 3
    consolidate(path)
    fresh = plan_for(layers, plan.chunk_mib, n)
    if fresh.chunks != plan.chunks or fresh.block != plan.block:
        logging.getLogger("inntrospect").warning(
            "%s keeps the chunks chosen for its first samples (%s; block %d); a fresh extraction of all %d "
            "samples would choose %s (block %d). The values are the same; re-extract with --overwrite for "
            "those chunks.", path, plan.chunks, plan.block, n, fresh.chunks, fresh.block)
    return store_attrs(path)


def _records(path):
    import zarr

    return zarr.open_array(zarr_store(path), path=BLOCKS_DONE, mode="r+")


def _resize(path, layers: Sequence[LayerSpec], plan: ChunkPlan, table, n_before: int) -> None:
    """Step 2 of :func:`grow` (each part can be done again)."""
    import zarr

    from .nodes import remove_staged

    n = len(table["group"])
    root = zarr.open_group(zarr_store(path), mode="r+", use_consolidated=False)
    for spec in layers:
        node = root[layer_path(spec.name)]
        for var in _RESIZED:
            if var in node:
                arr = node[var]
                if arr.shape[0] != n:
                    arr.resize((n, *arr.shape[1:]))
        remove_staged(path, [layer_path(spec.name, "aligned")])  # an interrupted align's leftovers
        write_sample_table(node, table)
    records = root[BLOCKS_DONE]
    if records.shape[0] != plan.n_blocks(n):
        records.resize((plan.n_blocks(n),))
    if n_before % plan.block:
        records[n_before // plan.block] = 0  # the old last block is written again, whole

