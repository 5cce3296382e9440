"""The steps, written once: what ``inntrospect run``, the step commands and the demo run.

Each :class:`Step` in :data:`STEPS` (pipeline order) says what computes it from a
config (:data:`RUNNERS`), the config section of its parameters, the steps whose
results it reads, the command that runs it and what that command prints, the
parameters its record holds, and whether it is redone on every run.
:func:`inntrospect.run` runs them in order, skipping what is current; the
command line has one command per ``command`` (``layout`` runs two steps); the
demo runs those the report needs. Where a step's results live in a store, and
the command that re-runs it in messages, are the store's own facts
(:data:`inntrospect.store.steps.STEPS` and ``RERUN``).

The functions import what they run when called: importing this module loads
no TensorFlow, matplotlib or UMAP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

__all__ = ["Step", "STEPS", "RUNNERS", "commands", "leading_to", "wanted_params"]


@dataclass(frozen=True)
class Step:
    """One step: its place among the others, its command and its record.

    Attributes
    ----------
    name : str
        As in ``inntrospect run --from`` and the store's records.
    section : str or None
        The config section of its parameters (None: it has none).
    after : tuple of str
        The steps whose results it reads.
    command : str
        The command that runs it (with the other steps of the same command).
    help : str
        The command's help, on its first step.
    summary : callable, optional
        ``summary(cfg, results)``: what the command prints when the step is done,
        from ``{step: what its function returned}`` of the command's steps so far.
    params : callable, optional
        ``params(cfg)``: the parameters its record holds when done with ``cfg``
        (None: it keeps no record; the extraction resumes by itself).
    when : callable, optional
        ``when(cfg)``: whether ``cfg`` asks for it at all (None: always).
    always : bool
        Redone on every run (the figures and the report).
    """

    name: str
    section: str | None
    after: tuple[str, ...]
    command: str
    help: str = ""
    summary: Callable[[Config, dict[str, Any]], str] | None = None
    params: Callable[[Config], dict] | None = None
    when: Callable[[Config], bool] | None = None
    always: bool = False

    @property
    def run(self) -> Callable[..., Any]:
        """``run(cfg, path, progress, **options)``: the step, here; looked up in :data:`RUNNERS`."""
        return RUNNERS[self.name]

    def applies(self, cfg: Config) -> bool:
        """Whether ``cfg`` asks for this step (``align`` only with ``[naps] aligned``)."""
        return self.when is None or self.when(cfg)


# -- what each step runs: (cfg, store path, progress, **options) -> its result -------------
# Options from the pipeline: ``overwrite`` (the extraction starts over), ``append`` (it takes the
# corpus's new rows) and ``aside`` (the projections, computed in another process, to store
# here); the other steps ignore them.
def _extract(cfg, path, progress, overwrite=False, append=False, **_) -> list[int]:
    from .extraction.local import prepare_extraction, run_extraction

    return run_extraction(prepare_extraction(**cfg.extract_kwargs()), overwrite=overwrite, append=append,
                          progress=progress)


def _align(cfg, path, progress, **_):
    from .analysis.alignment import align

    return align(path, persist=True, progress=progress)


def _naps(cfg, path, progress, **_):
    from .analysis.profiles import naps, naps_and_exemplars

    if STEPS["exemplars"].applies(cfg):  # one read of the store for both; the exemplars step is then current
        return naps_and_exemplars(path, **cfg.naps_kwargs(), k=cfg.exemplars_k(), progress=progress)[0]
    return naps(path, **cfg.naps_kwargs(), persist=True, progress=progress)


def _exemplars(cfg, path, progress, **_):
    from .analysis.profiles import exemplars

    return exemplars(path, cfg.exemplars_k(), persist=True, progress=progress)


def _contrast(cfg, path, progress, **_):
    from .analysis.profiles import contrastive_naps

    return contrastive_naps(path, **cfg.contrast_kwargs(), persist=True, progress=progress)


def _layout(cfg, path, progress, **_):
    from .topomap.api import topomap_layout

    return topomap_layout(path, **cfg.layout_kwargs(), progress=progress)


def _topomap(cfg, path, progress, **_):
    from .topomap.api import topomap_images

    return topomap_images(path, cfg.resolution(), fade=cfg.fade_q(), progress=progress)


def _projection(cfg, path, progress, aside=None, **_):
    from .analysis.projection import instance_projection, persist_projection

    if aside is not None:  # a future of the projections, computed elsewhere: stored here, at its turn
        return persist_projection(path, aside.result())
    return instance_projection(path, **cfg.projection_kwargs(), persist=True, progress=progress)


def _plots(cfg, path, progress, **_):
    from .viz.plots import plot_all

    return plot_all(path, cfg.plot_output(), cfg.get("plot", "mode", "row"), cfg.get("plot", "format", "png"))


def _report(cfg, path, progress, **_):
    from .viz.reporting import report

    out = cfg.plot_output()
    csv = out / "compare_layouts.csv"
    return report(path, out / "report", config=cfg.path, compare_csv=csv if csv.is_file() else None,
                  progress=progress)


#: the function of each step, looked up when it runs (a test may replace one)
RUNNERS: dict[str, Callable[..., Any]] = {
    "extract": _extract, "align": _align, "naps": _naps, "exemplars": _exemplars, "contrast": _contrast,
    "layout": _layout,
    "topomap": _topomap, "projection": _projection, "plots": _plots, "report": _report,
}


# -- what each command prints ------------------------------------------------------------
def _aligned(cfg, results) -> str:
    done = results["align"]
    return f"aligned {len(done)} layers with spatial axes ({', '.join(done) or 'none'}) in {cfg.store_path()}"


def _profiled(cfg, results) -> str:
    done, kwargs = results["naps"], cfg.naps_kwargs()
    first = next(iter(done.values()))
    groups = ", ".join(f"{g} ({c})" for g, c in zip(first.group.values, first["count"].values))
    return (f"NAPs of {len(done)} layers ({'aligned' if kwargs['aligned'] else 'raw'} activations"
            f"{', with std' if kwargs['std'] else ''}) in {cfg.store_path()}/naps; groups: {groups}"
            + (f"; in the same pass, the top {cfg.exemplars_k()} exemplars in {cfg.store_path()}/exemplars"
               if STEPS["exemplars"].applies(cfg) else ""))


def _exemplified(cfg, results) -> str:
    done = results["exemplars"]
    return (f"top and bottom {cfg.exemplars_k()} exemplars per unit and group of {len(done)} layers "
            f"in {cfg.store_path()}/exemplars")


def _significant_units(q):
    """Per (group, unit): whether the unit is significant (q < 0.05) at some position of its layer."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        hit = q < 0.05
    return hit.reshape(hit.shape[0], -1, hit.shape[-1]).any(axis=1)


def _contrasted(cfg, results) -> str:
    done = results["contrast"]
    first = next(iter(done.values()))
    text = (f"contrastive NAPs of {len(done)} layers for groups {', '.join(map(str, first.group.values))} "
            f"in {cfg.store_path()}/contrast")
    if "q" in first:
        found = sum(int(_significant_units(ds["q"].values).sum()) for ds in done.values())
        text += f"; {found} (group, unit) pairs significant at q < 0.05 (Welch's t, Benjamini-Hochberg)"
    return text


def _mapped(cfg, results) -> str:
    kwargs, layouts = cfg.layout_kwargs(), results["layout"]
    lines = [f"topomaps ({kwargs['method']} layout, {kwargs['metric']} distance, profiles from "
             f"{kwargs['source']}) in {cfg.store_path()}/topomap:"]
    for layer, ds in results["topomap"].items():
        q, sec = ds.attrs["quality"], layouts[layer].attrs["seconds"]
        lines.append(f"  {layer:<24} {ds.sizes['unit']:>6} units  quality blur {q['blur']:.4f} "
                     f"resize {q['resize']:.5f}  layout {sec['layout']:.1f} s + circle {sec['circle']:.1f} s")
    return "\n".join(lines)


def _projected(cfg, results) -> str:
    done, kwargs = results["projection"], cfg.projection_kwargs()
    return (f"instance projections of {len(done)} layers ({kwargs['samples_per_group']} "
            f"{kwargs['sampling']} samples per group) in {cfg.store_path()}/projection")


def _plotted(cfg, results) -> str:
    return f"{len(results['plots'])} figures in {cfg.plot_output()}"


def _reported(cfg, results) -> str:
    return f"report: {results['report']} (open it in a browser; the folder is self-contained)"


def _contrast_params(cfg) -> dict:
    kwargs = cfg.contrast_kwargs()
    return {**kwargs, "groups": None if kwargs["groups"] is None else sorted(kwargs["groups"])}


#: the steps in pipeline order; ``params`` are the config's values as the steps record them
STEPS: dict[str, Step] = {s.name: s for s in (
    Step("extract", "extract", (), "extract",  # its command is the CLI's own (--dry-run, --scheduler)
         "stream a corpus through a model into a Zarr store (resumes)"),
    Step("align", None, ("extract",), "align", "write gradient-aligned activations into the store",
         _aligned, params=lambda cfg: {}, when=lambda cfg: cfg.naps_kwargs()["aligned"]),
    Step("naps", "naps", ("extract", "align"), "naps",
         "neuron activation profiles: per-group mean activations ([naps])", _profiled,
         params=lambda cfg: cfg.naps_kwargs()),
    Step("exemplars", "exemplars", ("extract",), "exemplars",
         "top exemplars per unit and group: the samples that excite each unit most and least "
         "([exemplars]; inntrospect naps computes them in its pass)", _exemplified,
         params=lambda cfg: {"k": cfg.exemplars_k()}, when=lambda cfg: cfg.exemplars_k() > 0),
    Step("contrast", "contrast", ("naps",), "contrast",
         "contrastive NAPs of the groups of interest ([contrast])", _contrasted, params=_contrast_params),
    Step("layout", "topomap", ("naps", "contrast"), "layout",  # the profiles [topomap] from names
         "topomap layouts and images of every layer ([topomap])", params=lambda cfg: cfg.layout_kwargs()),
    Step("topomap", "topomap", ("layout",), "layout", summary=_mapped,
         params=lambda cfg: {**cfg.layout_kwargs(), "resolution": cfg.resolution(),
                             **({} if cfg.fade_q() is None else {"fade_q": cfg.fade_q()})}),
    Step("projection", "projection", ("extract",), "project",
         "2-D instance projections, a sample of each group ([projection])", _projected,
         params=lambda cfg: cfg.projection_kwargs()),
    Step("plots", "plot", ("topomap", "projection"), "plot",
         "topomap, overview and projection figures ([plot])", _plotted, always=True),
    Step("report", "plot", ("topomap", "projection", "exemplars"), "report",
         "a self-contained HTML report of the store ([plot] output)", _reported, always=True),
)}


def commands() -> dict[str, list[Step]]:
    """``{command: the steps it runs, in order}``, in pipeline order."""
    out: dict[str, list[Step]] = {}
    for step in STEPS.values():
        out.setdefault(step.command, []).append(step)
    return out


def leading_to(name: str) -> list[str]:
    """Step ``name`` and every step it depends on, directly or not, in pipeline order."""
    need, todo = set(), [name]
    while todo:
        step = todo.pop()
        if step not in need:
            need.add(step)
            todo.extend(STEPS[step].after)
    return [s for s in STEPS if s in need]


def wanted_params(cfg: Config) -> dict[str, dict]:
    """The parameters each step's record must hold to count as done with ``cfg``.

    Raises
    ------
    ConfigError
        A parameter of the config is invalid.
    """
    return {name: s.params(cfg) for name, s in STEPS.items() if s.params is not None}
