"""Checks of the arguments of public functions: a wrong value or type is a clear error, not a guess.

``naps(std="no")`` would otherwise count as true; an unknown method name would
fail deep inside a library.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .errors import ParameterError, ParameterTypeError

__all__ = ["check_bool", "check_choice"]


def check_bool(**values) -> None:
    """Each keyword's value must be a bool (numpy's included): ``check_bool(std=std, persist=persist)``."""
    for name, value in values.items():
        if not isinstance(value, (bool, np.bool_)):
            raise ParameterTypeError(
                f"{name} must be True or False, got {value!r} ({type(value).__name__}); "
                f"pass {name}={bool(value) if isinstance(value, (int, float)) else True}.")


def check_choice(name: str, value, choices: Iterable) -> None:
    """``value`` must be one of ``choices``; the message lists them."""
    choices = tuple(choices)
    if value not in choices:
        raise ParameterError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
