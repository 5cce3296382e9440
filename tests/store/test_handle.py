"""A step opens the store once: its root attributes are read once, then handed down."""

from __future__ import annotations

import numpy as np
import pytest

import inntrospect
from inntrospect import store as st
from inntrospect.store import Location, Store
from inntrospect.store.info import describe_store
from inntrospect.testing import store_from_arrays

READS: list[str] = []


class CountingLocation(Location):
    """A store's place that counts reads of the root ``zarr.json`` (its attributes)."""

    def read_text(self, key):
        if key == "zarr.json":
            READS.append(key)
        return super().read_text(key)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 4, 4, 20)).astype(np.float32)
    g = rng.standard_normal((60, 4, 4, 20)).astype(np.float32)
    return store_from_arrays(tmp_path_factory.mktemp("h") / "s.zarr", {"conv": x, "dense": x[:, 0, 0]},
                             np.repeat(list("abc"), 20), grads={"conv": g}, chunks=16)


def reads(step, path, *args, **kwargs) -> int:
    """Root-attribute reads of one call of ``step`` on the store (given as a place, as users do)."""
    READS.clear()
    step(CountingLocation(str(path), {}), *args, **kwargs)
    return len(READS)


def test_each_step_reads_the_root_attributes_once(path, tmp_path):
    # in pipeline order: each step needs the one before it
    assert reads(inntrospect.align, path, persist=True) == 1
    assert reads(inntrospect.naps, path, aligned=True, persist=True) == 1
    assert reads(inntrospect.naps, path, aligned=True) == 1
    assert reads(inntrospect.contrastive_naps, path, persist=True) == 1
    assert reads(inntrospect.topomap_layout, path, method="pca") == 1
    assert reads(inntrospect.topomap_images, path, resolution=16) == 1
    assert reads(inntrospect.instance_projection, path, 10, method="pca", persist=True) == 1
    assert reads(inntrospect.load, path, "topomap") == 1
    assert reads(inntrospect.report, path, tmp_path / "report") == 1
    assert reads(describe_store, path) == 1


def test_the_count_sees_each_read(path):
    assert reads(lambda where: [st.store_attrs(where) for _ in range(3)], path) == 3


def test_a_handle_keeps_what_it_writes_and_reads_afresh_under_the_lock(path):
    a, b = Store.open(path), Store.open(path)
    assert Store.open(a) is a and st.location(a) is a.location
    assert "note" not in b.attrs  # read now, on first use
    a.update_attrs(note="one")
    assert a.attrs["note"] == "one" and st.store_attrs(path)["note"] == "one"
    assert "note" not in b.attrs  # b keeps what it read
    with b.writing():
        assert b.attrs["note"] == "one"  # under the lock, read afresh
        b.update_attrs(note="two")
    assert a.attrs["note"] == "one" and st.store_attrs(path)["note"] == "two"
