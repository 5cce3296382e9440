"""A store opened once: its location, root attributes and step records, handed down a step.

Every public step takes ``store`` as a path, a URL, a :class:`Location` or a
:class:`Store`; it opens it once with :meth:`Store.open` and hands the handle
to everything it calls, so the root attributes are read once (again only under
the writer lock, where another writer may have changed them) instead of at
every turn — each read is a round trip on object storage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .backends import Location, location
from .nodes import open_store, store_attrs, update_attrs, writer_lock

__all__ = ["Store"]


class Store:
    """An opened store: it reads the root attributes when first needed, and keeps them.

    Attributes written through the handle (:meth:`update_attrs`) update its copy;
    :meth:`writing` takes the writer lock and reads them afresh (once, if they
    were not read before).
    """

    def __init__(self, where: Location, attrs: dict | None = None):
        self.location = where
        self._attrs = attrs
        self._tree = None

    @classmethod
    def open(cls, store) -> Store:
        """``store`` itself if it is a handle, else a handle of it."""
        if isinstance(store, Store):
            return store
        return cls(location(store))

    def __repr__(self) -> str:
        return f"Store({self.location.url!r})"

    def __str__(self) -> str:
        return str(self.location)

    # -- the root attributes -------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The root attributes, as first read (or last refreshed) and written since.

        Raises
        ------
        StoreError
            There is no inntrospect store here.
        """
        if self._attrs is None:
            self._attrs = store_attrs(self.location)
        return self._attrs

    def refresh(self) -> dict:
        """Read the root attributes again (they may have been changed by another process)."""
        self._attrs = store_attrs(self.location)
        self._tree = None
        return self._attrs

    def update_attrs(self, **changes) -> None:
        """Write root attributes, and keep the handle's copy the same (a tree opened before is let go:
        a step changes the store's nodes before it records that)."""
        update_attrs(self.location, **changes)
        self._attrs = {**self.attrs, **changes}
        self._tree = None

    @property
    def format(self) -> str:
        """The store's format and its version, e.g. ``inntrospect v1``."""
        return f"{self.attrs.get('format')} v{self.attrs.get('format_version')}"

    @property
    def layers(self) -> list[str]:
        return list(self.attrs.get("layers", []))

    @property
    def extraction(self) -> dict:
        """The extraction record (``id``, ``state``, ``block``, ...); empty while being created."""
        return dict(self.attrs.get("extraction", {}))

    @property
    def extraction_id(self) -> str | None:
        return self.attrs.get("extraction", {}).get("id")

    @property
    def records(self) -> dict[str, dict]:
        """The step records, ``{step: record}``."""
        return dict(self.attrs.get("steps", {}))

    # -- reading and writing -------------------------------------------------------
    def tree(self):
        """The store as a lazy :class:`xarray.DataTree` (see :func:`open_store`), opened once."""
        if self._tree is None:
            self._tree = open_store(self.location, attrs=self.attrs)
        return self._tree

    @contextmanager
    def writing(self) -> Iterator[Store]:
        """Hold the writer lock (or raise StoreLockedError), with the attributes read afresh."""
        with writer_lock(self.location):
            if self._attrs is not None or self._tree is not None:
                self.refresh()
            yield self
