"""Exceptions raised by inntrospect.

Every error derives from :class:`InntrospectError` and from the built-in
exception that best describes it, so ``except ValueError`` keeps working.
Messages say what was expected, what came, and what to do.
"""


class InntrospectError(Exception):
    """Base class of every error inntrospect raises on purpose."""


class ConfigError(InntrospectError, ValueError):
    """A configuration file or argument is missing, malformed or unknown."""


class CorpusError(InntrospectError, ValueError):
    """The corpus (``corpus.csv`` and its batch files) is not usable."""


class ModelError(InntrospectError, ValueError):
    """The model cannot be loaded or does not fit what inntrospect needs."""


class LayerNotFoundError(ModelError):
    """A requested layer name is not a layer of the model."""


class NonFiniteError(InntrospectError, ValueError):
    """Inputs or model outputs contain NaN or infinity."""


class StoreError(InntrospectError, ValueError):
    """A store is missing, malformed, or not an inntrospect store."""


class StoreMismatchError(StoreError):
    """An existing store was made from another model, corpus or setting."""


class StoreLockedError(StoreError, RuntimeError):
    """Another process is writing to the store."""


class IncompleteStoreError(StoreError):
    """The store's extraction has not finished."""


class GroupNotFoundError(InntrospectError, ValueError):
    """A requested group name is not a group of the corpus."""


class StepNotFoundError(StoreError):
    """A derived result (NAPs, contrasts, ...) has not been computed into the store."""


class StaleResultError(StoreError):
    """A derived result was computed from inputs the store no longer holds."""
