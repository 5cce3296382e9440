"""Running dask work: on whatever scheduler the caller set up, with an optional progress bar.

Library code never creates a cluster. With a ``dask.distributed`` client
active, work runs there (watch its dashboard); otherwise on dask's default
(threaded) scheduler.
"""

from __future__ import annotations

import sys

__all__ = ["compute", "active_client", "progress_bar"]


def active_client():
    """The current ``dask.distributed`` client, or None."""
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return get_client()
    except ValueError:
        return None


def compute(*collections, progress: bool = False, desc: str | None = None):
    """``dask.compute(*collections)``, showing a progress bar when asked.

    On a distributed client the bar follows the cluster's tasks; otherwise a
    ``tqdm`` bar follows the local scheduler's.
    """
    import dask

    if not progress:
        return dask.compute(*collections)
    client = active_client()
    if client is not None:
        from distributed import progress as dist_progress

        futures = client.compute(list(collections))
        dist_progress(futures, notebook=False)
        print(file=sys.stderr)
        return tuple(client.gather(futures))
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc=desc, unit="task", smoothing=0.1):
        return dask.compute(*collections)


def progress_bar(items, progress: bool, desc: str, total: int | None = None):
    """``items``, wrapped in a ``tqdm`` bar when ``progress`` (for eager work over layers)."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, unit="layer")
