"""Exceptions raised by inntrospect.

Every error a user can cause derives from :class:`InntrospectError` and from
the built-in exception that best describes it, so ``except ValueError`` (or
``TypeError``, ``ImportError``) keeps working. Messages say what was
expected, what came, and what to do; the command line prints them as one
line (``error: ...``), without a traceback.

::

    InntrospectError
    ├── ConfigError (ValueError)            a config file or its values
    ├── ParameterError (ValueError)         an argument of a Python function
    │   └── ParameterTypeError (TypeError)  ... of the wrong type
    ├── CorpusError (ValueError)            corpus.csv and its batch files
    ├── ModelError (ValueError)             the model
    │   └── LayerNotFoundError
    ├── NonFiniteError (ValueError)         NaN or infinity, wherever found
    ├── GroupNotFoundError (ValueError)     a group name
    ├── StoreError (ValueError)             the store
    │   ├── StoreMismatchError, IncompleteStoreError
    │   ├── StoreLockedError (RuntimeError)
    │   ├── StepNotFoundError, StaleResultError
    │   ├── StoreAccessError                no space, read-only, credentials, damaged metadata
    │   └── DamagedStoreError               a chunk missing, truncated or failing its checksum
    └── MissingDependencyError (ImportError)  a package to install

Which to raise: a value read from a config file is a :class:`ConfigError`;
the same value passed to a Python function is a :class:`ParameterError`
(unknown method, metric, mode or format name; a number out of range; an
array of the wrong shape). NaN or infinity is always a
:class:`NonFiniteError`, an unknown group always a
:class:`GroupNotFoundError`, whichever function finds it. Errors that only a
bug in inntrospect can cause (broken internal invariants) stay built-in.
"""


class InntrospectError(Exception):
    """Base class of every error inntrospect raises on purpose."""


class ConfigError(InntrospectError, ValueError):
    """A configuration file or argument is missing, malformed or unknown."""


class ParameterError(InntrospectError, ValueError):
    """An argument of a Python function has a value it cannot take.

    An unknown name (method, metric, mode, format, ...), a number out of
    range, or an array of the wrong shape or size. From a config file the
    same mistake is a :class:`ConfigError`.
    """


class ParameterTypeError(ParameterError, TypeError):
    """An argument of a Python function is of a type it cannot take."""


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


class MissingDependencyError(InntrospectError, ImportError):
    """A package that a function needs is not installed; the message says what to install."""


class StoreAccessError(StoreError):
    """The store cannot be reached, read or written: no space left, a read-only place, no
    permission, missing credentials, an unknown URL protocol, or damaged root metadata."""


class DamagedStoreError(StoreError):
    """A chunk of the store is missing, fails its checksum, or does not decode to its array's shape.

    The message names the chunk, what is wrong with it, and the command that
    repairs it (``inntrospect verify STORE`` lists all damage; ``inntrospect
    extract CONFIG --verify`` re-extracts the damaged blocks).
    """
