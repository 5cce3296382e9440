"""inntrospect: what a deep network has learned, per layer and group, out of core.

The public API is flat. Nothing here imports TensorFlow; :func:`extract`
imports it when called.
"""

import os as _os

# OpenBLAS (numpy's and scipy's: two libraries) starts a thread per core that spins for about 0.1 s
# before it sleeps, at load and after each call: 0.2 s of CPU per process on 2 cores, taken from
# the work beside it. Idle threads sleep at once instead (results are the same; a value the user
# set is kept). Set before numpy is first imported, or it has no effect.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .analysis.alignment import align  # noqa: E402
from .analysis.profiles import (
    contrast_significance,
    contrastive_naps,
    exemplars,
    naps,
    naps_and_exemplars,
)
from .analysis.stacking import stack
from .errors import (
    ConfigError,
    CorpusError,
    DamagedStoreError,
    GroupNotFoundError,
    IncompleteStoreError,
    InntrospectError,
    LayerNotFoundError,
    MissingDependencyError,
    ModelError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
    StaleResultError,
    StepNotFoundError,
    StoreAccessError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
)
from .extraction.corpus import read_corpus
from .extraction.legacy import import_legacy
from .extraction.local import extract
from .extraction.writer import StoreWriter, open_writer
from .pipeline import run
from .store import open_store
from .store.backends import Location
from .store.integrity import verify
from .store.steps import load
from .topomap.api import compare_layouts, topomap_images, topomap_layout
from .version import __version__ as __version__

#: functions whose modules import matplotlib or UMAP: loaded on first use
_LAZY = {"plot_topomaps": "viz.plots", "plot_overview": "viz.plots", "plot_projection": "viz.plots",
         "plot_all": "viz.plots", "plot_volcano": "viz.plots",
         "report": "viz.reporting", "instance_projection": "analysis.projection"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'inntrospect' has no attribute {name!r}")



__all__ = [
    "run",
    "extract",
    "import_legacy",
    "open_writer",
    "StoreWriter",
    "align",
    "naps",
    "contrastive_naps",
    "contrast_significance",
    "exemplars",
    "naps_and_exemplars",
    "stack",
    "load",
    "verify",
    "topomap_layout",
    "topomap_images",
    "compare_layouts",
    "instance_projection",
    "plot_topomaps",
    "plot_overview",
    "plot_projection",
    "plot_volcano",
    "plot_all",
    "report",
    "open_store",
    "Location",
    "read_corpus",
    "InntrospectError",
    "ConfigError",
    "ParameterError",
    "ParameterTypeError",
    "CorpusError",
    "ModelError",
    "LayerNotFoundError",
    "NonFiniteError",
    "StoreError",
    "StoreMismatchError",
    "StoreLockedError",
    "IncompleteStoreError",
    "GroupNotFoundError",
    "StepNotFoundError",
    "StaleResultError",
    "DamagedStoreError",
    "StoreAccessError",
    "MissingDependencyError",
]
