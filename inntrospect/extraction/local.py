"""Stream a corpus through a model into the store, resumably: the driver and :func:`extract`.

The corpus is cut into extraction blocks of ``plan.block`` samples, computed
here or by tasks on a cluster's workers (:mod:`.distributed`) and written by
the store writer of the public writer API (:class:`.writer.StoreWriter`). A
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
from .prepare import Extraction, keep_store_plan, measure_ratios, prepare_extraction

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
    append: bool = False,
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

    With ``append``, a store holding the first samples of the corpus takes the
    others (see :func:`extract`). An existing store keeps its chunk plan
    (:func:`~inntrospect.extraction.prepare.keep_store_plan`) unless ``overwrite``.
    """
    from ..checks import check_bool
    from ..errors import ParameterError
    from .distributed import cluster_client, extract_on_cluster
    from .writer import StoreWriter, write_blocks

    check_bool(overwrite=overwrite, append=append)
    if append and overwrite:
        raise ParameterError("append=True adds the corpus's new rows to the store, overwrite=True deletes "
                             "it first: give one of them.")
    if not overwrite:
        ex = keep_store_plan(ex)
    corpus = ex.attrs["corpus"]
    record = {"corpus": {k: corpus.get(k) for k in ("path", "csv_sha256", "n_files")}}
    if corpus.get("csvs"):  # a corpus of several csv files: all of them
        record["corpus"]["paths"] = [c["path"] for c in corpus["csvs"]]
    client = cluster_client(where)
    here = client is None
    # the writer takes the lock, then creates the store (or resumes it: checks it holds this
    # extraction, and un-records its damaged blocks); it marks it complete when every block is recorded
    with StoreWriter.open(ex.path, ex.attrs, ex.model.layers, ex.plan, ex.corpus.sample_table,
                          codecs=lambda: st.choose_codecs(measure_ratios(ex)), overwrite=overwrite,
                          verify=verify, on_damaged=on_damaged, on_block=on_block if here else None,
                          progress=progress and here, desc="extract", append=append,
                          append_record=record) as writer:
        todo = writer.blocks_todo
        if here:
            write_blocks(ex, writer, todo)
        else:
            writer.wait_made()  # the workers open it
            done = np.ones(ex.n_blocks, bool)
            done[todo] = False
            computed = extract_on_cluster(client, ex, todo, done, progress, on_block)
    return writer.blocks_recorded if here else computed


def extract(
    *args,
    overwrite: bool = False,
    append: bool = False,
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
        ``corpus.csv`` (or its folder): rows ``file,group[,target]``; or a list of them, read in
        order as one corpus (e.g. ``["jan/corpus.csv", "feb/corpus.csv"]``).
    store
        Path of the Zarr store to write. An existing store of the same
        extraction is resumed; one of another model or corpus is refused
        (a corpus that grew: see ``append``).
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
    append
        The corpus has new rows after those the store holds (new batch files
        listed after the extracted ones, or a second csv listed after the
        store's: ``[jan.csv, feb.csv]`` to a store of ``jan.csv``): extract
        only their samples, as new blocks, into the same store. Refused
        (``StoreMismatchError``, naming the difference) when the rows already
        extracted changed (other files, groups or targets; a batch file whose
        size, modification time or sha256 changed; the csvs in another order)
        or the model, layers or gradient target differ. New
        groups may come. The store keeps its chunk plan and gets a new
        extraction id (derived results become stale; ``inntrospect.naps``
        then updates stored NAPs from the new samples alone). An incomplete
        store is resumed and appended to in the same run. Without a store,
        the whole corpus is extracted.
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
                   verify=verify, append=append)
    return st.open_store(ex.path)


def _signature(what: Callable, options: Callable) -> inspect.Signature:
    """``what``'s parameters followed by the keyword-only ones of ``options``: one signature, written once."""
    own = [p for p in inspect.signature(options).parameters.values() if p.kind is p.KEYWORD_ONLY]
    first = inspect.signature(what)
    return first.replace(parameters=[*first.parameters.values(), *own], return_annotation="xarray.DataTree")


extract.__signature__ = _signature(prepare_extraction, extract)


