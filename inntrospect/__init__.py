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
from .naps import contrastive_naps, naps
from .stack import stack
from .steps import load
from .store import open_store

__version__ = "0.1.0"

__all__ = [
    "extract",
    "align",
    "naps",
    "contrastive_naps",
    "stack",
    "load",
    "open_store",
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
