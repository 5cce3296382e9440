"""inntrospect: what a deep network has learned, per layer and group, out of core.

The public API is flat. Nothing here imports TensorFlow; :func:`extract`
imports it when called.
"""

from .corpus import read_corpus
from .errors import (
    ConfigError,
    CorpusError,
    IncompleteStoreError,
    InntrospectError,
    LayerNotFoundError,
    ModelError,
    NonFiniteError,
    StoreError,
    StoreLockedError,
    StoreMismatchError,
)
from .extract import extract
from .store import open_store

__version__ = "0.1.0"

__all__ = [
    "extract",
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
]
