"""Step records: what each derived result was computed from, and whether it is current.

Every analysis step that writes into a store (``align``, ``naps``,
``exemplars``, ``contrast``, ``layout``, ``topomap``, ``projection``) leaves a record in the root attribute ``steps``::

    steps = {"naps": {"step": "naps", "id": "3f2a…", "state": "complete",
                      "params": {"aligned": true, "std": false},
                      "inputs": {"extraction": "9c1e…", "align": null},
                      "layers": [...], "started": "...", "finished": "..."}}

and each node it writes carries ``step`` and ``id`` (plus the parameters and
inputs) in its attributes. A result is current when its record is complete,
its inputs are the ids the store holds now (the extraction's id, and the
records of the steps it read), those are current in turn, and its nodes carry
its id. Anything else is stale: reading it raises an error naming the command
to re-run. Nothing asks questions.

A run never deletes the results it replaces first: it writes its nodes beside
them (``<node>.next``) and swaps them in once all are written
(:func:`replacing`), so a run that fails part way leaves the previous results
readable, and current if they were.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import (
    LayerNotFoundError,
    ParameterError,
    ParameterTypeError,
    StaleResultError,
    StepNotFoundError,
    StoreError,
)
from .format import layer_path, timestamp
from .handle import Store
from .localnode import read_local
from .nodes import ASIDE, STAGED, consolidate, open_tree, remove_staged, swap_in, write_node

__all__ = ["STEPS", "load", "new_record", "status", "is_current", "check_current", "begin", "finish",
           "write_results", "persist", "persist_together", "recording", "replacing", "RERUN", "writable", "select_layers", "check_node", "node_attrs", "stored_node"]

#: derived steps in pipeline order, and where their nodes live in the store
STEPS = {"align": "layers", "naps": "naps", "exemplars": "exemplars", "contrast": "contrast",
         "layout": "layout", "topomap": "topomap", "projection": "projection"}
#: how to recompute each step, for messages
RERUN = {
    "extract": "inntrospect extract CONFIG --overwrite",
    "align": "inntrospect align CONFIG (or inntrospect.align(store, persist=True))",
    "naps": "inntrospect naps CONFIG (or inntrospect.naps(store, persist=True))",
    "exemplars": "inntrospect exemplars CONFIG (or inntrospect.exemplars(store, persist=True))",
    "contrast": "inntrospect contrast CONFIG (or inntrospect.contrastive_naps(store, persist=True))",
    "layout": "inntrospect layout CONFIG (or inntrospect.topomap_layout(store))",
    "topomap": "inntrospect layout CONFIG (or inntrospect.topomap_images(store))",
    "projection": "inntrospect project CONFIG (or inntrospect.instance_projection(store))",
}


def writable(store, what: str) -> Store:
    """The store's handle, or an error when an opened tree came instead (it cannot be written)."""
    import xarray as xr

    if isinstance(store, xr.DataTree):
        raise StoreError(f"{what} writes into the store: pass its path, not an opened tree.")
    return Store.open(store)


def select_layers(available, layers, what: str) -> list[str]:
    """``layers`` (one name or several; None: all ``available``), checked to exist, in order.

    Raises
    ------
    LayerNotFoundError
        A name is not among ``available``; the message lists them. ``what``
        says what was looked in, e.g. ``"the contrast results"``.
    """
    available = list(available)
    if layers is None:
        return available
    wanted = [layers] if isinstance(layers, str) else list(layers)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise LayerNotFoundError(
            f"no layer(s) {', '.join(map(repr, unknown))} in {what}; the layers are: "
            f"{', '.join(available)}."
        )
    return list(dict.fromkeys(wanted))


def new_record(step: str, params: dict, inputs: dict, layers: list[str]) -> dict:
    """A fresh record of ``step`` with a new id; ``inputs`` maps input names to ids."""
    return {
        "step": step, "id": uuid.uuid4().hex, "state": "running", "params": dict(params),
        "inputs": dict(inputs), "layers": list(layers), "started": timestamp(),
    }


def node_attrs(record: dict, layer: str) -> dict:
    """The attributes a node written by ``record`` carries."""
    return {"step": record["step"], "id": record["id"], "layer": layer,
            "params": record["params"], "inputs": record["inputs"]}


def _reason(attrs: dict, step: str) -> tuple[str, str] | None:
    """Why ``step``'s result is not current, and the first step to re-run (None: current)."""
    rec = attrs.get("steps", {}).get(step)
    if rec is None:
        return step, f"there are no {step} results in the store"
    if rec.get("state") != "complete":
        return step, f"the {step} step started {rec.get('started')} did not finish"
    inputs = rec.get("inputs", {})
    ext = attrs.get("extraction", {}).get("id")
    if inputs.get("extraction") != ext:
        return step, (f"the {step} results were computed from extraction "
                      f"{inputs.get('extraction')}, but the store now holds extraction {ext}")
    for dep, dep_id in inputs.items():
        if dep == "extraction" or dep_id is None:
            continue
        dep_rec = attrs.get("steps", {}).get(dep)
        if dep_rec is None or dep_rec.get("id") != dep_id:
            now = "gone" if dep_rec is None else f"now {dep_rec.get('id')}"
            return step, (f"the {step} results were computed from {dep} results {dep_id}, "
                          f"but the store's {dep} results are {now}")
        why = _reason(attrs, dep)
        if why:
            return why[0], f"{why[1]}, and the {step} results depend on them"
    return None


def status(store) -> dict[str, str | None]:
    """``{step: None if current, else why not}`` for every step with a record."""
    attrs = Store.open(store).attrs
    out = {}
    for s in STEPS:
        if s in attrs.get("steps", {}):
            why = _reason(attrs, s)
            out[s] = None if why is None else why[1]
    return out


def is_current(attrs: dict, step: str) -> bool:
    """Whether ``step``'s result is current, from the store's root attributes."""
    return _reason(attrs, step) is None


def check_current(store, step: str) -> dict:
    """The record of ``step`` if its result is current; else a clear error naming the fix.

    Raises
    ------
    StepNotFoundError
        The step has not been run on this store.
    StaleResultError
        The step's inputs have changed since, or it was interrupted.
    """
    if step not in STEPS:
        raise ParameterError(f"unknown step {step!r}; the steps with results are: {', '.join(STEPS)}.")
    store = Store.open(store)
    attrs = store.attrs
    rec = attrs.get("steps", {}).get(step)
    if rec is not None and not (isinstance(rec, dict) and isinstance(rec.get("id"), str)):
        raise StoreError(
            f"{store}: the record of the {step} step is damaged (no id: {rec!r}); the store's "
            f"attributes were edited. Re-run {RERUN[step]}.")
    if rec is None:
        raise StepNotFoundError(f"{store} has no {step} results yet. Run {RERUN[step]}.")
    why = _reason(attrs, step)
    if why:
        first, message = why
        then = f", then {RERUN[step]}" if first != step else ""
        raise StaleResultError(f"{store}: {message}. Re-run {RERUN[first]}{then}.")
    return rec


def check_node(path, step: str, layer: str, node_attrs_: dict, rec: dict) -> None:
    """Refuse a node left over from an earlier run of ``step`` (its id differs)."""
    if node_attrs_.get("id") != rec["id"]:
        raise StaleResultError(
            f"{path}: {STEPS[step]}/{layer} was written by another {step} run "
            f"({node_attrs_.get('id')}, the store's record is {rec['id']}). Re-run {RERUN[step]}."
        )


def begin(store, record: dict) -> None:
    """Write ``record`` (state ``running``) as its step's: from now on its old result is no longer current.

    :func:`replacing` calls it right before it swaps a run's new nodes in.
    """
    store = Store.open(store)
    store.update_attrs(steps={**store.records, record["step"]: record})


def finish(store, record: dict) -> dict:
    """Mark ``record``'s step complete: from now on its result is current."""
    store = Store.open(store)
    record = {**record, "state": "complete", "finished": timestamp()}
    store.update_attrs(steps={**store.records, record["step"]: record})
    return record


@contextmanager
def recording(store, step: str, params: dict, inputs: dict, layers, **extra) -> Iterator[dict]:
    """Record a run of ``step``: a new record on entry, written complete when the block ends without error.

    The record's inputs are the store's extraction and ``inputs`` (``{step:
    record id}``); ``extra`` adds keys to it. The block writes the step's nodes
    through :func:`replacing` (which writes the record ``running`` just before
    it swaps them in) and gives each :func:`node_attrs` of the record it gets.
    Until then the step's old record and results stay as they were: a run that
    fails leaves them readable. The caller holds the writer lock
    (:meth:`Store.writing`).
    """
    store = Store.open(store)
    record = new_record(step, params, {"extraction": store.extraction_id, **inputs}, list(layers))
    record.update(extra)
    yield record
    finish(store, record)


@contextmanager
def replacing(store, record: dict | list[dict], names) -> Iterator[dict[str, str]]:
    """Replace the nodes ``names`` by new ones written beside them, swapped in only once all are complete.

    Yields ``{name: staged name}`` (``<name>.next``, e.g. ``naps.next`` or
    ``layers/conv/aligned.next``): the block writes the run's new nodes there,
    while the old nodes and their record stay untouched, current if they were.

    - The block raises (a damaged chunk, an interrupt): the staged nodes are
      deleted and the error goes on; the store is as it was.
    - The block ends: the run's record (or each of ``record``, a list, when one
      pass computes several steps) is written ``running`` (the old results
      are no longer current: they are about to go), each staged node is
      swapped in (:func:`~inntrospect.store.nodes.swap_in`: a rename on a local
      disk, a copy then delete on object storage) and the consolidated metadata
      refreshed. :func:`recording` then writes the record ``complete``. A crash
      in between leaves the record ``running``: the results are refused as
      stale, never read as current (the consolidated metadata may still
      describe the old nodes until then); and once consolidated, each new
      node carries the new run's id, which :func:`check_node` compares with
      the record.

    Staged nodes an interrupted run left (``<name>.next``, ``<name>.old``) are
    deleted on entry. The caller holds the writer lock.
    """
    store = Store.open(store)
    names = list(names)
    remove_staged(store, names)
    staged = {name: f"{name}{STAGED}" for name in names}
    try:
        yield staged
    except BaseException:
        try:
            remove_staged(store, names)
        except Exception:  # noqa: BLE001 - the next run deletes them; the block's error matters
            pass
        raise
    for rec in record if isinstance(record, list) else [record]:
        begin(store, rec)
    for name, new in staged.items():
        swap_in(store, new, name, consolidated=False)
    consolidate(store, changed=[n for name in names for n in (name, staged[name], f"{name}{ASIDE}")])  # once


def persist(store, step: str, params: dict, inputs: dict, results: dict, *,
            progress: bool = False, **extra) -> dict:
    """Store ``results`` (``{layer: Dataset}``) as ``step``'s: the one way a step's results enter the store.

    A :func:`recording` of the step around :func:`write_results`; returns the
    results computed, with their node attributes.
    """
    with recording(store, step, params, inputs, results, **extra) as record:
        return write_results(store, record, results, progress)


def persist_together(store, runs: list[tuple[str, dict, dict, dict]], *, progress: bool = False,
                     extra: list[dict] | None = None) -> list[dict]:
    """Store the results of several steps computed by one pass: each layer's datasets of every step
    are computed together (shared tasks run once) and each step gets its own record.

    ``runs`` is ``[(step, params, inputs, {layer: Dataset}), …]`` with the same
    layers; returns each step's results computed, in that order. All steps'
    nodes are swapped in together (:func:`replacing`); a failure leaves every
    step's old results as they were. ``extra`` adds keys to each run's record.
    """
    from contextlib import ExitStack

    from ..scheduler import compute

    store = Store.open(store)
    layers = list(runs[0][3])
    with ExitStack() as stack:
        records = [stack.enter_context(recording(store, step, params, inputs, layers,
                                                 **(extra[i] if extra else {})))
                   for i, (step, params, inputs, _) in enumerate(runs)]
        names = [STEPS[step] for step, *_ in runs]
        done: list[dict] = [{} for _ in runs]
        with replacing(store, records, names) as staged, _node_writer(store) as write:
            for layer in layers:
                computed = compute(*(results[layer] for *_, results in runs), progress=progress,
                                   desc=f"{'+'.join(names)} {layer}")
                for i, (record, ds) in enumerate(zip(records, computed)):
                    ds.attrs = {**ds.attrs, **node_attrs(record, layer)}
                    write(f"{staged[names[i]]}/{layer}", ds)
                    done[i][layer] = ds
    return done


def stored_node(store, step: str, layer: str) -> tuple[dict, dict] | None:
    """A step's node of ``layer`` as stored: ``({array: numpy array}, node attributes)``, or None.

    Not checked to be current: what an update after an append merges into,
    after checking the node's ``id`` against the record it updates.
    """
    import zarr

    from .nodes import zarr_store

    if step == "align":
        return None
    where = Store.open(store).location
    found = read_local(where.url, f"{STEPS[step]}/{layer}") if where.is_local else None
    if found is not None:  # straight from its files
        return None if found[1] is None else found
    try:
        node = zarr.open_group(zarr_store(where, read_only=True), path=f"{STEPS[step]}/{layer}",
                               mode="r", use_consolidated=False)
    except FileNotFoundError:  # zarr's GroupNotFoundError too
        return None
    return {key: arr[...] for key, arr in node.arrays()}, dict(node.attrs)


def write_results(store, record: dict, results: dict, progress: bool = False) -> dict:
    """Replace the nodes of ``record``'s step by ``results`` computed layer by layer, never deleting first.

    ``results`` is ``{layer: Dataset}`` (lazy is fine); returns them computed,
    with the record's node attributes. Each layer is written to
    ``<node>.next/<layer>`` beside the step's old nodes; once all are written
    the new group is swapped in (:func:`replacing`). A run that fails part way
    leaves the old results and record as they were. Inside :func:`recording`,
    which records the run complete after the swap.
    """
    from ..scheduler import compute

    step = record["step"]
    if step == "align":  # its arrays live inside the layers' nodes: alignment._persist writes them
        raise StoreError("the align step's arrays are written by inntrospect.align(store, persist=True).")
    store = Store.open(store)
    node = STEPS[step]
    done = {}
    with replacing(store, record, [node]) as staged, _node_writer(store) as write:
        for layer, ds in results.items():
            (ds,) = compute(ds, progress=progress, desc=f"{step} {layer}")
            ds.attrs = {**ds.attrs, **node_attrs(record, layer)}
            write(f"{staged[node]}/{layer}", ds)
            done[layer] = ds
    return done


#: nodes written at once beside the caller. Writing is compression and checksums without the GIL
#: and file-system calls: three at once finished a 3-layer contrast with statistics ~15 ms sooner
#: than two on 2 cores (bench_exemplars.py --contrast-only, 4 interleaved runs out of 4)
WRITERS = 3


@contextmanager
def _node_writer(store) -> Iterator:
    """``write(name, ds)``: :func:`write_node` on a thread beside the caller, which goes on to compute
    the next layer (and :data:`WRITERS` nodes are written at once); the block ends once every node is
    written, raising the first error."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(WRITERS, thread_name_prefix="inntrospect-write") as pool:
        futures = []

        def write(name: str, ds) -> None:
            for done in (f for f in futures if f.done()):
                if done.exception() is not None:  # an earlier node's write failed (a full disk): stop here
                    raise done.exception()
            futures.append(pool.submit(write_node, store, name, ds, consolidated=False))

        try:
            yield write
        finally:
            errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def load(store, step: str, *, lazy: bool = True) -> dict:
    """A step's results as stored, lazily, after checking they are current.

    ``{layer: Dataset}`` for ``naps``, ``contrast``, ``layout``, ``topomap`` and
    ``projection``; ``{layer: DataArray}``
    of the persisted ``aligned`` activations for ``align``. ``store`` is a
    path (results can only be checked against the store they live in).
    ``lazy=False`` reads them into memory at once, without dask (for steps
    whose inputs are small results: no task graph to build).

    Raises
    ------
    StepNotFoundError, StaleResultError
        The step has not been run, or its inputs changed since; the message
        names the command to run.
    """
    import xarray as xr

    if isinstance(store, xr.DataTree):
        raise ParameterTypeError("load() needs the store's path, to check its results are current; "
                                 "pass the path (or URL) rather than an opened tree.")
    store = Store.open(store)
    rec = check_current(store, step)
    if step == "align":
        tree = store.tree()
    else:  # only the step's own nodes: opening the whole tree costs more as it grows
        tree = open_tree(store, chunks={} if lazy else None, group=STEPS[step])
    out = {}
    for layer in rec["layers"]:
        if step == "align":
            node = tree[layer_path(layer)]
            arr = node["aligned"] if "aligned" in node else None
            check_node(store, step, layer, {} if arr is None else arr.attrs, rec)
            out[layer] = arr
        else:
            try:
                ds = tree[layer].to_dataset()
            except KeyError:
                ds = xr.Dataset()
            check_node(store, step, layer, ds.attrs, rec)
            out[layer] = ds if lazy else ds.load()
    return out
