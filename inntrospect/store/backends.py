"""Where a store lives: a local folder, or any fsspec URL (``s3://bucket/run.zarr``, ``gs://…``).

A :class:`Location` is what every function taking a ``store`` accepts, besides
a plain path or URL string. It carries the URL and the fsspec
``storage_options`` (credentials, ``endpoint_url`` of an S3-compatible
server…), and it pickles, so dask workers that share no disk with the client
open the same store themselves. A bare ``"s3://…"`` string uses fsspec's
defaults (environment variables, ``~/.aws``).

The few things that differ between a folder and an object store are here
and nowhere else: the Zarr store object, reading a metadata file, deleting a
store or a node, renaming a node (an atomic rename on a local disk, a copy
then delete on object storage), and the writer lock (an ``flock`` on a local
file; on object storage a lease object created only-if-absent and renewed
while the writer runs).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ParameterTypeError, StoreAccessError

__all__ = ["Location", "location"]

#: an object-storage lease lasts this long unless renewed (a crashed writer's lease expires)
LEASE_SECONDS = 120.0
#: …and the writer renews it this often
RENEW_SECONDS = 30.0


@dataclass(frozen=True)
class Location:
    """A store's place: ``url`` (an absolute local path, or a URL with a protocol) and fsspec options.

    Examples
    --------
    >>> loc = Location("s3://bucket/run.zarr",
    ...                {"endpoint_url": "http://127.0.0.1:9000", "key": "…", "secret": "…"})
    >>> inntrospect.naps(loc, persist=True)  # doctest: +SKIP
    """

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def name(self) -> str:
        """The store's own name (its last path component)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        if not self.is_local:  # os.fspath() of a URL would silently make a local folder named s3:
            raise ParameterTypeError(f"{self.url} is an object-store URL, not a local path; open it "
                                     "through inntrospect (or fsspec), not as a file.")
        return self.url

    # -- zarr and fsspec ------------------------------------------------------------
    @property
    def fsspec_options(self) -> dict:
        """The ``storage_options`` handed to fsspec, zarr and xarray: the user's, without listing caches.

        fsspec keeps one filesystem instance per thread, each with its own cache
        of directory listings, and a write through one instance does not
        invalidate another's. Zarr lists the store to consolidate its metadata,
        and writes happen in dask's threads: a cached listing would leave
        freshly written nodes out of the consolidated metadata, and readers
        would not see them. Stores are listed rarely, so nothing is cached.
        """
        return {**self.storage_options, "use_listings_cache": False}

    def zarr_store(self, read_only: bool = False):
        """What to hand to ``zarr.open_*``: the folder's path, or a ``zarr.storage.FsspecStore``."""
        if self.is_local:
            return self.url
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url, storage_options=self.fsspec_options, read_only=read_only)

    def xarray_kwargs(self) -> dict:
        """The ``storage_options`` keyword for ``xarray.open_datatree``/``to_zarr`` (none when local)."""
        if self.is_local:
            return {}
        return {"storage_options": self.fsspec_options}

    @property
    def fs(self):
        """The fsspec filesystem of a remote store."""
        import fsspec

        return fsspec.core.url_to_fs(self.url, **self.fsspec_options)[0]

    def _key(self, name: str = "") -> str:
        root = self.fs._strip_protocol(self.url).rstrip("/")
        return f"{root}/{name}" if name else root

    def read_text(self, name: str) -> str | None:
        """The text of the file ``name`` inside the store, or None when it is missing."""
        if self.is_local:
            try:
                return (Path(self.url) / name).read_text()
            except (FileNotFoundError, NotADirectoryError):
                return None
        try:
            return self.fs.cat_file(self._key(name)).decode()
        except FileNotFoundError:
            return None

    def size(self, name: str = "") -> int:
        """Bytes stored under ``name`` (a folder of the store; the whole store by default)."""
        if self.is_local:
            root = Path(self.url) / name
            return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        try:  # sizes from one listing (du asks for every object on its own)
            found = self.fs.find(self._key(name), detail=True)
        except FileNotFoundError:
            return 0
        return int(sum(info.get("size") or 0 for info in found.values()))

    def exists(self) -> bool:
        if self.is_local:
            return Path(self.url).exists()
        return self.fs.exists(self._key())

    def remove(self) -> None:
        """Delete the store and everything in it (callers check it is a store first)."""
        if self.is_local:
            import shutil

            p = Path(self.url)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif self.fs.exists(self._key()):
            self.fs.rm(self._key(), recursive=True)

    def has(self, name: str) -> bool:
        """Whether anything is stored under ``name`` (a folder or file of the store)."""
        if self.is_local:
            return (Path(self.url) / name).exists()
        return bool(self.fs.exists(self._key(name)))

    def delete(self, name: str) -> None:
        """Delete ``name`` (a folder of the store, or a file) and everything under it, if present."""
        if self.is_local:
            import shutil

            p = Path(self.url) / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        elif self.fs.exists(self._key(name)):
            self.fs.rm(self._key(name), recursive=True)

    def move(self, src: str, dst: str) -> None:
        """Rename the folder (or file) ``src`` of the store to ``dst``, which must not exist.

        On a local disk one ``os.replace``: atomic on one filesystem, so ``dst``
        appears whole or not at all. Object storage has no rename: every object
        is copied (server side), then the originals are deleted; a crash in
        between leaves both, or part of ``src`` (the caller's records must not
        trust ``dst`` before this returns).
        """
        if self.is_local:
            target = Path(self.url) / dst
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(self.url) / src, target)
        else:  # object by object: fs.mv(recursive=True) also tries to copy the folders, which S3 lacks
            source, target = self._key(src), self._key(dst)
            objects = self.fs.find(source)
            if not objects:
                raise FileNotFoundError(f"{self.url}: nothing to move at {src}")
            self.fs.copy(objects, [target + key[len(source):] for key in objects], on_error="raise")
            self.fs.rm(objects)

    def is_nonempty_non_store(self) -> bool:
        """Something other than a Zarr store is at this place (refuse to overwrite it)."""
        if self.read_text("zarr.json") is not None:
            return False
        if self.is_local:
            p = Path(self.url)
            return p.exists() and (not p.is_dir() or any(p.iterdir()))
        return bool(self.fs.exists(self._key()) and self.fs.ls(self._key()))

    # -- the writer lock ----------------------------------------------------------
    @contextmanager
    def lock(self, locked_error) -> Iterator[str]:
        """Hold the writer lock of the store, or raise ``locked_error(message)``."""
        if self.is_local:
            with _flock(Path(self.url.rstrip("/") + ".lock"), self.url, locked_error) as where:
                yield where
        else:
            with _lease(self.fs, self._key() + ".lock", self.url, locked_error) as where:
                yield where

    def is_locked(self) -> bool:
        if self.is_local:
            return _flock_held(Path(self.url.rstrip("/") + ".lock"))
        lease = _read_lease(self.fs, self._key() + ".lock")
        return lease is not None and lease.get("expires", 0) > time.time()


def location(store, storage_options: Mapping[str, Any] | None = None) -> Location:
    """The :class:`Location` of ``store``: a Location, a URL, or a local path (made absolute).

    An opened store (:class:`~inntrospect.store.handle.Store`) gives its own.
    """
    if isinstance(getattr(store, "location", None), Location):  # an opened store
        store = store.location
    if isinstance(store, Location):
        if storage_options:
            return Location(store.url, {**store.storage_options, **storage_options})
        return store
    text = os.fspath(store) if isinstance(store, os.PathLike) else store
    if not isinstance(text, str):
        raise ParameterTypeError(f"a store is a path, a URL or an inntrospect.Location, not "
                                 f"{type(store).__name__}.")
    if text.startswith("file://"):
        text = text[len("file://"):]
    if "://" in text:
        _check_protocol(text)
        return Location(text.rstrip("/"), dict(storage_options or {}))
    return Location(str(Path(text).expanduser().resolve()), {})


def _check_protocol(url: str) -> None:
    """Refuse a URL whose protocol fsspec does not know, before anything tries to open it."""
    from fsspec.registry import get_filesystem_class

    protocol = url.split("://", 1)[0]
    try:
        get_filesystem_class(protocol)
    except (ValueError, ImportError) as err:
        raise StoreAccessError(
            f"{url}: fsspec cannot open {protocol}:// URLs ({err}). A store is a local path or a "
            "URL of a protocol fsspec knows (s3://, gs://, az://, ...) with its package installed "
            "(e.g. pip install s3fs).") from err


# -- local lock: flock, released by the OS when the holder dies ------------------------
@contextmanager
def _flock(lock: Path, what: str, locked_error) -> Iterator[str]:
    import errno
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            try:
                holder = lock.read_text().strip()
            except OSError:
                holder = "unknown"
            raise locked_error(
                f"{what} is being written by another process ({holder}). Wait for it to "
                "finish, or stop it; a stopped run resumes where it left off."
            ) from None
        try:  # the file may have been removed by a holder that just finished
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield str(lock)
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def _flock_held(lock: Path) -> bool:
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


# -- object-storage lock: a lease object, created only if absent, renewed while held ----------
def _read_lease(fs, key: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(key))
    except FileNotFoundError:
        return None
    except ValueError:
        return {"holder": "unreadable lease", "expires": 0}


@contextmanager
def _lease(fs, key: str, what: str, locked_error) -> Iterator[str]:
    token = uuid.uuid4().hex
    holder = f"pid {os.getpid()} on {socket.gethostname()}"

    def body() -> bytes:
        return json.dumps({"holder": holder, "token": token, "expires": time.time() + LEASE_SECONDS}).encode()

    try:
        fs.pipe_file(key, body(), mode="create")
    except FileExistsError:
        lease = _read_lease(fs, key) or {}
        if lease.get("expires", 0) > time.time():
            until = time.strftime("%H:%M:%S", time.localtime(lease["expires"]))
            raise locked_error(
                f"{what} is being written by another process ({lease.get('holder')}). Wait for it "
                f"to finish, or stop it; a stopped run resumes where it left off (a crashed "
                f"writer's lease expires at {until})."
            ) from None
        if (_read_lease(fs, key) or {}).get("token") == lease.get("token"):
            fs.rm_file(key)  # an expired lease (its writer died), unless just taken over
        try:
            fs.pipe_file(key, body(), mode="create")
        except FileExistsError:
            raise locked_error(f"{what} was just locked by another writer; wait for it to finish.") from None
    stop = threading.Event()

    def renew():
        while not stop.wait(RENEW_SECONDS):
            try:
                lease = _read_lease(fs, key)
                if lease is None or lease.get("token") != token:
                    warnings.warn(f"{what}: the writer lease {key} was taken over by another writer "
                                  f"({(lease or {}).get('holder')}); it is no longer renewed.",
                                  RuntimeWarning, stacklevel=1)
                    return
                fs.pipe_file(key, body())
            except Exception:  # noqa: BLE001 - a failed renewal is retried at the next one
                continue

    renewer = threading.Thread(target=renew, name="inntrospect-lease", daemon=True)
    renewer.start()
    try:
        yield key
    finally:
        stop.set()
        renewer.join()
        lease = _read_lease(fs, key)
        if lease is not None and lease.get("token") == token:
            fs.rm_file(key)
