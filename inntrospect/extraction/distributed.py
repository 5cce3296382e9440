"""Extraction on the workers of a ``dask.distributed`` cluster: one task per extraction block.

The client holds the writer lock, creates the store (or finds what is
recorded in it), submits one task per block not yet recorded, and marks the
extraction complete once every block is. A worker prepares the extraction
once per process (it loads the model from its path, or builds a torch model
from its factory and ``state_dict`` file, since model objects do not pickle
reliably: a torch module object is refused; and reads the corpus table), checks that the store
still holds the extraction the task belongs to and the same model and
corpus, and then writes the block as a local run does (:mod:`inntrospect.extraction.local`):
whole chunks of every array, then the block's predictions, then its record
in ``extraction/block_done``. Every chunk belongs to one block, so workers
never write the same chunk.

The resume rules are the local ones. A block is recorded only after all of
it is written, so a client killed at any point (its running blocks finish
and record themselves; queued ones are dropped by the scheduler) leaves a
store that running the same extraction again completes, submitting only
the blocks not recorded. A worker killed in a block leaves it unrecorded;
the scheduler gives it to another worker, which writes all of it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .. import store as st
from ..errors import ConfigError, StoreMismatchError

if TYPE_CHECKING:
    from .prepare import Extraction

__all__ = ["cluster_client", "extract_on_cluster", "extract_block"]

#: per worker process: the prepared extraction (one at a time) and how often one was prepared
_PREPARED: dict[tuple, Extraction] = {}
MODEL_LOADS = {"count": 0}
#: one block at a time per process: TensorFlow already uses every core it has
_LOCK = threading.Lock()


def cluster_client(where: str):
    """The client whose workers compute the blocks, or None to extract in this process.

    ``"auto"``: the active client, unless its workers are threads of this
    process (an in-process ``LocalCluster``, ``inproc://``), where the local
    writer pipeline does the same work without a second copy of the model.
    """
    from ..scheduler import active_client

    if where not in ("auto", "local", "cluster"):
        raise ConfigError(f"where must be 'auto', 'local' or 'cluster', got {where!r}.")
    if where == "local":
        return None
    client = active_client()
    if client is None:
        if where == "cluster":
            raise ConfigError(
                "where='cluster' needs an active dask.distributed client: create one with "
                "distributed.Client(address) first (or use inntrospect run --scheduler ADDRESS)."
            )
        return None
    if where == "auto" and str(client.scheduler.address).startswith("inproc://"):
        return None
    return client


def _prepared(request: dict, extraction_id: str) -> Extraction:
    """This process's extraction of ``request``, prepared once; checked against the store."""
    from .prepare import keep_store_plan, prepare_extraction

    store = st.Store.open(request["store"])
    now = store.extraction_id
    if now != extraction_id:
        raise StoreMismatchError(
            f"{request['store']} holds extraction {now} now, not {extraction_id} whose block this "
            "task was to write: the extraction was started again since. Nothing was written."
        )
    # prepared again for every new extraction: the corpus or model files may have changed since
    key = (extraction_id, *sorted((k, str(v)) for k, v in request.items()))
    ex = _PREPARED.get(key)
    if ex is None:
        _PREPARED.clear()  # one model per worker process
        ex = keep_store_plan(prepare_extraction(**request), store.attrs)  # a grown store keeps its chunks
        MODEL_LOADS["count"] += 1
        _PREPARED[key] = ex
    st.check_same(store.attrs, ex.attrs, ex.path)  # this worker sees the same model and corpus
    return ex


def extract_block(request: dict, extraction_id: str, block: int) -> int:
    """The task: write and record ``block`` of the extraction (a no-op when it is recorded)."""
    from .writer import StoreWriter, write_blocks

    with _LOCK:
        ex = _prepared(request, extraction_id)
        # the client holds the lock: this writer writes this block only, and leaves completing to it
        with StoreWriter.attach(ex.path, ex.model.layers, ex.plan, ex.corpus.n_samples, [block],
                                gradient_target=ex.gradient_target, table=ex.corpus.sample_table) as writer:
            write_blocks(ex, writer, writer.blocks_todo)
        return block


def extract_on_cluster(client, ex: Extraction, todo: list[int], done: np.ndarray, progress: bool,
                       on_block: Callable[[int, int], None] | None) -> list[int]:
    """Submit the blocks ``todo`` to the cluster; return them in the order they were recorded."""
    from distributed import as_completed

    if ex.request is None:
        raise ConfigError("this extraction was not made by prepare_extraction(); it cannot be "
                          "sent to a cluster.")
    if getattr(ex.request["model"], "module", None) is not None:
        raise ConfigError(
            f"{ex.model.source.describe()} is an object in this process and cannot be built on the "
            "cluster's workers. Give the model as a factory and its weights instead (workers build it "
            "from them): inntrospect.extract('file.py:make_model', ..., weights='model.pt') with "
            "torch.save(module.state_dict(), 'model.pt'); or extract here with where='local'."
        )
    extraction_id = st.Store.open(ex.path).extraction_id
    n, B = ex.corpus.n_samples, ex.plan.block
    bar = None
    if progress:
        from ..scheduler import bar as make_bar

        already = sum(min(B, n - b * B) for b in range(ex.n_blocks) if done[b])
        bar = make_bar(total=n, initial=already, unit="sample", desc="extract on the cluster",
                       smoothing=0.1)
    futures = [client.submit(extract_block, ex.request, extraction_id, b,
                             key=f"extract-block-{b}-{extraction_id}", retries=0) for b in todo]
    computed: list[int] = []
    try:
        for future in as_completed(futures):
            b = future.result()  # re-raises a worker's error (a NaN input, a missing file…)
            computed.append(b)
            if bar is not None:
                bar.update(min(B, n - b * B))
            if on_block is not None:
                on_block(b, ex.n_blocks)
    except BaseException:
        client.cancel(futures)  # blocks already running finish and record themselves
        raise
    finally:
        if bar is not None:
            bar.close()
    return computed
