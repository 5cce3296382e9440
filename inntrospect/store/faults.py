"""Faults of the place a store lives in, as one-line errors naming the cause and the fix.

:func:`translate` turns what the operating system, fsspec, botocore or the JSON
parser raise while a store is read or written (a full disk, a read-only folder,
missing credentials, an unknown URL protocol, a damaged ``zarr.json``) into a
:class:`~inntrospect.errors.StoreAccessError`; :func:`guarded` does it around a
block of store work. Other errors pass through unchanged.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import InntrospectError, StoreAccessError

__all__ = ["translate", "guarded"]

_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError",
                "CredentialRetrievalError", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


def translate(err: BaseException, where) -> StoreAccessError | None:
    """The error a user should see for ``err`` met at the store ``where``, or None to let it be."""
    if isinstance(err, InntrospectError):
        return None
    names = {c.__name__ for c in type(err).__mro__}
    if names & _CREDENTIALS:
        return StoreAccessError(
            f"no valid credentials for {where} ({type(err).__name__}: {err}). Set them in the "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) or in the config's "
            "[store] storage_options.")
    if isinstance(err, json.JSONDecodeError):
        return StoreAccessError(
            f"the metadata of {where} is damaged ({err}). If a run was killed while writing it, "
            "run the same extraction again with --overwrite (or restore the store from a copy).")
    if isinstance(err, OSError):
        what = f"{where}" + (f" ({err.filename})" if getattr(err, "filename", None) else "")
        code = err.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            return StoreAccessError(
                f"no space left on the device holding {what}. Free some space (or choose a store "
                "path on another device) and run the same command again: finished work is kept.")
        if code in (errno.EROFS, errno.EACCES, errno.EPERM):
            return StoreAccessError(
                f"{err.strerror or err}: {getattr(err, 'filename', None) or where}. Where that is the "
                f"store {where} or the folder it is in (its lock file <store>.lock goes beside it), "
                "it is read-only for this user: copy the store somewhere writable, or run as a user "
                "who may write there.")
    if isinstance(err, ValueError) and str(err).startswith("Protocol not known"):
        return StoreAccessError(
            f"{where}: {err}. A store is a local path or a URL whose protocol fsspec knows "
            "(file://, s3://, gs://, ...); install the fsspec package of that protocol.")
    return None


@contextmanager
def guarded(where) -> Iterator[None]:
    """Run a block of store work; its store faults come out as :class:`StoreAccessError`."""
    try:
        yield
    except Exception as err:
        mapped = translate(err, where)
        if mapped is None:
            raise
        raise mapped from err
