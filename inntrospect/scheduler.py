"""Running dask work on whatever scheduler the caller set up, and the one progress style of the package.

Library code never creates a cluster. With a ``dask.distributed`` client
active, work runs there (watch its dashboard); otherwise on dask's default
(threaded) scheduler.

Every progress bar is a ``tqdm`` bar made by :func:`bar`, on standard error.
Bars are drawn only on a terminal: in logs and CI (standard error not a
terminal) they stay silent, and the callers' one line per finished step is
what is printed. ``INNTROSPECT_PROGRESS=1`` draws them anyway, ``=0`` never.
"""

from __future__ import annotations

import os
import sys

__all__ = ["compute", "active_client", "threads", "bar", "progress_bar", "interactive"]


def active_client():
    """The current ``dask.distributed`` client, or None.

    None without importing ``distributed`` when nothing imported it (no client
    can exist then, and importing it costs a fresh process about 0.25 s).
    """
    if "distributed" not in sys.modules:
        return None
    try:
        from distributed import get_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return get_client()
    except ValueError:
        return None


def threads() -> int:
    """How many tasks run at once on the scheduler work goes to now: the threads of the active
    client's workers, else those of dask's local scheduler (its ``num_workers``, else one per core)."""
    client = active_client()
    if client is not None:
        return max(1, sum(client.nthreads().values()))
    import dask
    from dask.system import CPU_COUNT

    if dask.config.get("scheduler", None) in ("sync", "synchronous", "single-threaded"):
        return 1
    return max(1, int(dask.config.get("num_workers", None) or CPU_COUNT))


def interactive() -> bool:
    """Whether progress bars are drawn: standard error is a terminal (or ``INNTROSPECT_PROGRESS``)."""
    forced = os.environ.get("INNTROSPECT_PROGRESS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # closed or replaced stderr
        return False


def bar(items=None, *, progress: bool = True, desc: str, total: int | None = None,
        unit: str = "it", leave: bool = True, **kwargs):
    """A ``tqdm`` bar over ``items`` (or to ``update`` by hand), silent unless ``progress`` and :func:`interactive`."""
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr,
                disable=not (progress and interactive()), dynamic_ncols=True, **kwargs)


def compute(*collections, progress: bool = False, desc: str | None = None):
    """``dask.compute(*collections)``, showing a progress bar over its tasks when asked.

    On a distributed client the bar follows the cluster's tasks; otherwise the
    local scheduler's.
    """
    import dask

    if not (progress and interactive()):
        return dask.compute(*collections)
    client = active_client()
    if client is not None:
        futures = client.compute(list(collections))
        _follow(futures, desc or "compute")
        return tuple(client.gather(futures))
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc=desc, unit="task", smoothing=0.1, file=sys.stderr, dynamic_ncols=True):
        return dask.compute(*collections)


def _follow(futures, desc: str) -> None:
    """Draw a :func:`bar` over the tasks behind ``futures`` on the distributed scheduler, until done."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class _Bar(TextProgressBar):  # the scheduler's task counts, drawn as our tqdm bar
        def __init__(self, keys, tq):
            self._tq = tq
            super().__init__(keys, complete=True)

        def _draw_bar(self, remaining, all, **kwargs):
            self._tq.total = all
            self._tq.n = all - remaining
            self._tq.refresh()

        def _draw_stop(self, **kwargs):
            pass

    with bar(desc=desc, unit="task") as tq:
        _Bar(futures, tq)


def progress_bar(items, progress: bool, desc: str, total: int | None = None):
    """``items`` in a :func:`bar` counting layers (for eager work over layers)."""
    return bar(items, progress=progress, desc=desc, total=total, unit="layer")
