"""inntrospect: what a deep network has learned, per layer and group, out of core.

The public API is flat. Nothing here imports TensorFlow; :func:`extract`
imports it when called.
"""

from .align import align
from .corpus import read_corpus
from .errors import (
    ConfigError,
    CorpusError,
    GroupNotFoundError,
    IncompleteStoreError,
    InntrospectError,
    LayerNotFoundError,
    ModelError,
    NonFiniteError,
    StaleResultError,
    StepNotFoundError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
)
from .extract import extract
from .legacy import import_legacy
from .location import Location
from .naps import contrastive_naps, naps
from .pipeline import run
from .stack import stack
from .steps import load
from .store import open_store
from .topomap.api import compare_layouts, topomap_images, topomap_layout

#: functions whose modules import matplotlib or UMAP: loaded on first use
_LAZY = {"plot_topomaps": "plots", "plot_overview": "plots", "plot_projection": "plots",
         "plot_all": "plots",
         "report": "reporting", "instance_projection": "projection"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'inntrospect' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "run",
    "extract",
    "import_legacy",
    "align",
    "naps",
    "contrastive_naps",
    "stack",
    "load",
    "topomap_layout",
    "topomap_images",
    "compare_layouts",
    "instance_projection",
    "plot_topomaps",
    "plot_overview",
    "plot_projection",
    "plot_all",
    "report",
    "open_store",
    "Location",
    "read_corpus",
    "InntrospectError",
    "ConfigError",
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
]
