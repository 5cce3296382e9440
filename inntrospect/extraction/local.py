"""Stream a corpus through a model into the store, resumably: the driver and :func:`extract`.

The corpus is cut into extraction blocks of ``plan.block`` samples, written by
:mod:`.writer` here or by tasks on a cluster's workers (:mod:`.distributed`). A
block is recorded in ``extraction/block_done`` only after every write of it has
finished, so a run killed at any point resumes at the first unrecorded block
and recomputes nothing that was recorded.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Literal

import numpy as np

from .. import store as st
from .prepare import Extraction, measure_ratios, prepare_extraction

__all__ = ["extract", "prepare_extraction", "run_extraction", "Where"]


Where = Literal["auto", "local", "cluster"]


def run_extraction(
    ex: Extraction,
    overwrite: bool = False,
    progress: bool = False,
    on_block: Callable[[int, int], None] | None = None,
    where: Where = "auto",
    verify: bool = False,
    on_damaged: Callable[[list[int], int], None] | None = None,
) -> list[int]:
    """Write (or resume) the extraction; return the blocks computed by this call.

    ``where="auto"`` computes the blocks on the workers of the active
    ``dask.distributed`` client when it has workers in other processes
    (see :mod:`inntrospect.extraction.distributed`), else in this process.

    In an existing store, recorded blocks with a chunk of ``acts``, ``grads``
    or ``prediction`` missing are un-recorded and extracted again (a listing,
    always); with ``verify`` also those with a chunk that fails its checksum or
    does not decode (every chunk of the recorded blocks is read:
    :func:`inntrospect.store.integrity.verify`). ``on_damaged(blocks, n_blocks)``
    is told which (default: a warning logged on the ``inntrospect`` logger).
    """
    from .distributed import cluster_client, extract_on_cluster
    from .writer import write_blocks

    client = cluster_client(where)

    with st.writer_lock(ex.path):
        fresh = overwrite or not st.is_store(ex.path)
        if not fresh:
            attrs = st.store_attrs(ex.path)
            if "extraction" not in attrs:  # interrupted while being created: nothing to keep
                fresh = True
            else:
                st.check_same(attrs, ex.attrs, ex.path)
        if fresh:
            st.remove_store(ex.path)
            attrs = {**st.new_extraction(ex.attrs), "codecs": st.choose_codecs(measure_ratios(ex))}
            st.create_store(ex.path, attrs, ex.model.layers, ex.plan, ex.corpus.sample_table)
        done_arr = st.blocks_done(ex.path, write=True)
        if not fresh:  # recorded blocks whose chunks are missing or damaged: extracted again
            _unrecord_damaged(ex, done_arr, verify, progress, on_damaged)
        done = np.asarray(done_arr[:], dtype=bool)
        todo = [b for b in range(ex.n_blocks) if not done[b]]
        if client is None:
            computed = write_blocks(ex, done_arr, todo, done, progress, on_block)
        else:
            computed = extract_on_cluster(client, ex, todo, done, progress, on_block)
        if np.asarray(done_arr[:], dtype=bool).all():
            st.finish_extraction(ex.path)
    return computed


def _unrecord_damaged(ex: Extraction, done_arr, verify: bool, progress: bool,
                      on_damaged: Callable[[list[int], int], None] | None) -> list[int]:
    """Un-record the recorded blocks with missing (and, with ``verify``, damaged) chunks; return them.

    A complete store becomes incomplete again until they are extracted (its
    extraction id is kept: they are written again as they were).
    """
    bad: set[int] = set()
    names = [st.layer_path(info.name, var) for info in ex.model.layers
             for var in ("acts", "grads", "prediction") if var != "grads" or info.has_grads]
    if verify:
        from ..store.integrity import verify as verify_store

        bad.update(verify_store(ex.path, progress=progress, arrays=[st.BLOCKS_DONE, *names]).damaged_blocks)
        for b in bad:  # a damaged record first: reading the records would fail on it
            done_arr[b] = 0
    done = _read_records(ex, done_arr)
    for name in names:
        layer, var = name.split("/")[1:]
        arr = st.open_array(ex.path, layer, var)
        c = int(arr.chunks[0])
        bad.update(int(k) * c // ex.plan.block for k in _chunk_indices(
            st.missing_chunks(ex.path, layer, var, recorded=done, block=ex.plan.block, arr=arr)))
    bad = sorted(bad)
    if not bad:
        return []
    for b in bad:
        done_arr[b] = 0
    extraction = dict(st.store_attrs(ex.path)["extraction"])
    if extraction.get("state") == "complete":
        extraction.update(state="incomplete")
        st.update_attrs(ex.path, extraction=extraction)
    if on_damaged is not None:
        on_damaged(bad, ex.n_blocks)
    else:
        import logging

        logging.getLogger("inntrospect").warning(
            "%s: %d recorded blocks had missing or damaged chunks (%s); extracting them again",
            ex.path, len(bad), ", ".join(map(str, bad[:20])))
    return bad


def _chunk_indices(keys: list[str]) -> list[int]:
    """The index along ``sample`` of each chunk key (``c/3/0/0`` or ``c.3.0.0``: 3)."""
    return [int(k.replace(".", "/").split("/")[1]) for k in keys]


def _read_records(ex: Extraction, done_arr) -> np.ndarray:
    """The block records as bools; a damaged record raises an error naming it and the fix."""
    from ..store.nodes import decode_problem

    try:
        return np.asarray(done_arr[:], dtype=bool)
    except (ValueError, RuntimeError):
        for (b,), key in st.chunk_grid(done_arr):
            try:
                done_arr[b]
            except (ValueError, RuntimeError) as err:
                raise st.damaged_error(ex.path, st.BLOCKS_DONE, key, decode_problem(err)) from err
        raise


def extract(
    *args,
    overwrite: bool = False,
    progress: bool = False,
    on_block: Callable[[int, int], None] | None = None,
    where: Where = "auto",
    verify: bool = False,
    **kwargs,
):
    """Stream a corpus through a model into a Zarr store; resume if it was interrupted.

    Its signature is :func:`prepare_extraction`'s (``model, corpus, store, layers,
    gradient_target, chunk_mib, batch_size, weights``: what to extract), then the
    options of the run (``overwrite, progress, on_block, where``).

    Parameters
    ----------
    model
        A ``.keras``/``.h5`` file, a TensorFlow SavedModel folder, or a
        ``keras.applications`` name (with ``weights``, a local file, or random weights).
    corpus
        ``corpus.csv`` (or its folder): rows ``file,group[,target]``.
    store
        Path of the Zarr store to write. An existing store of the same
        extraction is resumed; one of another model or corpus is refused.
    layers
        Layer names of interest; the input and output layers are always added.
    gradient_target
        ``"predicted"`` (argmax of the output) or ``"target"`` (the corpus column).
    chunk_mib
        Target chunk size in MiB (default 32; on resume, the store's own).
    batch_size
        Inference batch size.
    overwrite
        Start over, deleting an existing store at ``store``.
    progress
        Show a progress bar.
    on_block
        Called as ``on_block(block, n_blocks)`` after each block is recorded.
    where
        ``"auto"``: on the workers of the active ``dask.distributed`` client
        when its workers are processes of their own (each loads the model once
        from its path and writes whole blocks), else here; ``"local"``: here;
        ``"cluster"``: on the client's workers (an error without one).
    verify
        In an existing store, also read every chunk of the recorded blocks and
        extract again the blocks whose chunks fail their checksum or do not
        decode (blocks with missing chunks always are).

    Returns
    -------
    xarray.DataTree
        The store, opened lazily.

    Examples
    --------
    >>> tree = inntrospect.extract("model.keras", "corpus/corpus.csv", "run.zarr",
    ...                            layers=["conv2d"])  # doctest: +SKIP
    >>> tree["layers/conv2d"].acts.groupby("group").mean()  # doctest: +SKIP
    """
    ex = prepare_extraction(*args, **kwargs)
    run_extraction(ex, overwrite=overwrite, progress=progress, on_block=on_block, where=where,
                   verify=verify)
    return st.open_store(ex.path)


def _signature(what: Callable, options: Callable) -> inspect.Signature:
    """``what``'s parameters followed by the keyword-only ones of ``options``: one signature, written once."""
    own = [p for p in inspect.signature(options).parameters.values() if p.kind is p.KEYWORD_ONLY]
    first = inspect.signature(what)
    return first.replace(parameters=[*first.parameters.values(), *own], return_annotation="xarray.DataTree")


extract.__signature__ = _signature(prepare_extraction, extract)


