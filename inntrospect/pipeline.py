"""``inntrospect run``: every step of a config, in dependency order, skipping what is current.

The steps are those of :mod:`inntrospect.registry`, in its order: ``extract``,
``align`` (only when ``[naps] aligned``), ``naps``, ``contrast``, ``layout``,
``topomap``, ``projection``, then the figures and the report (``plots``,
``report``), which are always redrawn. A step runs when its result is missing
or stale (:mod:`inntrospect.store.steps`), or was computed with other
parameters than the config's; ``from_step`` redoes that step and everything
after it, ``force`` everything (extraction too).

The pipeline owns its dask cluster, like the command line: with ``[cluster]
address`` (or ``scheduler=``) it connects to that scheduler, otherwise it
starts an in-process ``LocalCluster`` and prints its dashboard link. Library
functions never create one. With the in-process cluster, the extraction runs
in a process that ends with it, and the projection in a side process beside
align ... topomap (see the comment above :func:`_in_process`); the results are
those of the steps run one by one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

from . import registry
from . import store as st
from .errors import ConfigError
from .store import steps

__all__ = ["run", "PIPELINE", "is_done"]

#: the steps of :func:`run`, in order
PIPELINE = tuple(registry.STEPS)


def is_done(path, step: str, wanted: dict) -> bool:
    """Whether ``step``'s results in the store at ``path`` are current and were made with ``wanted``
    parameters (as :func:`inntrospect.registry.wanted_params` gives them): what ``run`` keeps."""
    if not st.is_store(path):
        return False
    attrs = st.store_attrs(path)
    rec = attrs.get("steps", {}).get(step)
    return rec is not None and steps.is_current(attrs, step) and rec.get("params") == wanted


def _current(step: registry.Step, path, wanted: dict, redo: set) -> bool:
    """Whether ``step`` is kept: never for the figures and the report, nor the extraction (it resumes)."""
    if step.always or step.params is None or step.name in redo:
        return False
    return is_done(path, step.name, wanted[step.name])


@contextlib.contextmanager
def cluster(cfg, scheduler: str | None = None, quiet: bool = False):
    """A ``dask.distributed`` client for the run: the config's scheduler, or an in-process cluster."""
    from distributed import Client, LocalCluster

    address = scheduler or cfg.get("cluster", "address")
    if address:
        client = Client(address)
        owned = None
    else:
        owned = LocalCluster(
            processes=False,
            n_workers=cfg.get("cluster", "n_workers", 1),
            threads_per_worker=cfg.get("cluster", "threads_per_worker", os.cpu_count() or 1),
            memory_limit=cfg.get("cluster", "memory_limit", "auto"),
            dashboard_address=cfg.get("cluster", "dashboard_address", ":0"),
        )
        client = Client(owned)
    if not quiet:
        where = address or "an in-process LocalCluster"
        print(f"dask: {where}; dashboard: {client.dashboard_link}")
    try:
        yield client
    finally:
        client.close()
        if owned is not None:
            owned.close()


def run(config, *, from_step: str | None = None, force: bool = False, append: bool = False,
        scheduler: str | None = None, progress: bool = True,
        echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run every step of ``config`` that is not current; return ``{step: "ran" | "current" | "skipped"}``.

    Parameters
    ----------
    config : str, os.PathLike or Config
        The TOML config (all sections; see the README).
    from_step : str, optional
        Redo this step and all after it (one of :data:`PIPELINE`).
    force : bool
        Redo every step, the extraction included (the store is written anew).
    append : bool
        The corpus has new rows (or csv files) after those the store holds:
        the extraction adds their samples (:func:`inntrospect.extract`'s
        ``append``); the NAPs and exemplars are then updated from the new
        samples alone, the later steps run again.
    scheduler : str, optional
        Address of a running ``dask.distributed`` scheduler (overrides ``[cluster] address``).
    progress : bool
        Progress bars and the dashboard link.

    Raises
    ------
    ConfigError
        An unknown ``from_step``, or a config that names no store, or ``append`` with ``force``.
    """
    from .config import Config, load_config

    cfg = config if isinstance(config, Config) else load_config(config)
    if append and force:
        raise ConfigError("--append adds the corpus's new rows to the store, --force writes it anew: "
                          "give one of them.")
    if from_step is not None and from_step not in PIPELINE:
        raise ConfigError(f"unknown step {from_step!r} for --from; the steps are: {', '.join(PIPELINE)}.")
    redo = set(PIPELINE) if force else set(PIPELINE[PIPELINE.index(from_step):]) if from_step else set()
    path = cfg.store_path()
    wanted = registry.wanted_params(cfg)
    skipped = {name for name, step in registry.STEPS.items() if not step.applies(cfg)}
    done: dict[str, str] = {}
    t0 = time.perf_counter()
    with cluster(cfg, scheduler, quiet=not progress) as client, contextlib.ExitStack() as stack:
        side = _Pool(stack) if _in_process(client) else None  # started at its first task
        warm = aside = None  # UMAP's kernels loaded there, then the projection computed there
        for name, step in registry.STEPS.items():
            if name in skipped:
                done[name] = "skipped"
                continue
            if name == "exemplars" and done.get("naps") == "ran" and is_done(path, name, wanted[name]):
                done[name] = "ran"  # the NAP pass computed them too
                echo(f"{name:<10} done in the naps step's pass over the store")
                continue
            if _current(step, path, wanted, redo):
                done[name] = "current"
                echo(f"{name:<10} current, kept")
                continue
            t = time.perf_counter()
            if name == "layout" and warm is not None:
                with contextlib.suppress(Exception):  # a failed warm-up: the layout says why itself
                    warm.result()
            _run_step(client, name, cfg, path, progress, overwrite="extract" in redo, append=append,
                      aside=aside)
            done[name] = "ran"
            beside = " (computed beside the steps before it)" if name == "projection" and aside else ""
            echo(f"{name:<10} done in {time.perf_counter() - t:.1f} s{beside}")
            if name == "extract" and side is not None:  # not before: that process holds GBs
                # the layout waits for the warm-up rather than compile the same kernels beside it
                if any(s in redo or not is_done(path, s, wanted[s])
                       for s in _UMAP_BEFORE if s not in skipped):
                    warm = side.submit(_warm_up, cfg.layout_kwargs()["metric"])
                    _import_umap_aside()  # and here, in a thread, for the layout
                if "projection" in redo or not is_done(path, "projection", wanted["projection"]):
                    # opened here, before any other step writes: the side process only reads chunks
                    aside = side.submit(_project_here, cfg.projection_kwargs(), st.open_store(path),
                                        progress)
    echo(f"pipeline finished in {time.perf_counter() - t0:.0f} s; report: "
         f"{cfg.plot_output() / 'report' / 'index.html'}")
    return done


# -- the steps ----------------------------------------------------------------------
# With an in-process cluster, work also runs in processes of their own (spawned: they share
# nothing with this one):
# - the extraction, in a process that ends with it: TensorFlow's memory (GBs for VGG16) is given
#   back before the later steps add theirs, and this process never imports TensorFlow;
# - a side process, from the end of the extraction: it loads (first after an install: compiles)
#   UMAP's kernels while align ... contrast run here, then computes the projection, whose seeded
#   UMAP fits run on one core, while the layout runs here on the other. It gets the store opened
#   here before those steps start, so it reads only chunks of the layers, which they never
#   write; this process stores the projection at its place in the order.
# With a cluster of its own, every step runs there, one after the other.
def _in_process(client) -> bool:
    return client is None or str(client.scheduler.address).startswith("inproc://")


class _Pool:
    """One spawned process for tasks in turn, closed with ``stack``; it ends if this process dies.

    A spawned process would first run the caller's script again (as
    ``__mp_main__``), so a script calling :func:`run` without an ``if __name__
    == "__main__"`` guard would fail; its process starts with the script hidden.
    """

    def __init__(self, stack: contextlib.ExitStack):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = stack.enter_context(ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("spawn"), initializer=_end_with_parent))

    def submit(self, fn, *args):
        import sys

        main = sys.modules["__main__"]
        saved = {k: vars(main)[k] for k in ("__file__", "__spec__") if k in vars(main)}
        try:  # what multiprocessing reads, when the first task starts the process, to re-run it
            main.__spec__ = None
            vars(main).pop("__file__", None)
            return self._pool.submit(fn, *args)
        finally:
            vars(main).pop("__spec__", None)
            vars(main).update(saved)


def _run_step(client, name: str, cfg, path, progress: bool, **options) -> None:
    """The registry's step ``name``: here, or (the extraction with an in-process cluster) in a process."""
    fn = registry.RUNNERS[name]
    if name == "extract" and _in_process(client):
        cfg.extract_kwargs()  # a config error is raised here, before the process starts
        with contextlib.ExitStack() as stack:
            _Pool(stack).submit(fn, cfg, path, progress, options["overwrite"], options["append"]).result()
        return
    fn(cfg, path, progress, **options)  # the extraction on a cluster of its own: blocks on its workers


def _project_here(kwargs: dict, tree, progress: bool) -> dict:
    """The projections of every layer of the opened store ``tree``, not stored."""
    from .analysis.projection import instance_projection

    return instance_projection(tree, **kwargs, progress=progress)


#: steps that lead to a UMAP fit when they run (the layout follows them)
_UMAP_BEFORE = ("align", "naps", "contrast", "layout", "projection")


def _warm_up(metric: str) -> None:
    import numpy as np

    from .analysis.umapfit import warm_up
    from .topomap.circle import distribute_in_circle

    for m in dict.fromkeys(("euclidean", metric)):  # the projections' metric and the layout's
        warm_up(m)
    distribute_in_circle(np.random.default_rng(0).random((20, 2)), n_steps=1, method="exact")


def _import_umap_aside() -> None:
    """Import umap-learn (2-3 s) in a thread while align ... contrast mostly wait for numpy and disk."""
    import threading

    from .analysis.umapfit import import_umap

    threading.Thread(target=import_umap, name="inntrospect-import-umap", daemon=True).start()


def _end_with_parent() -> None:
    """In a spawned process: be stopped if the pipeline's process dies (Linux; else nothing)."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
