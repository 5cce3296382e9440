"""Alignment (REFERENCE.md §3): the vectorised kernel against the per-sample definition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from inntrospect.analysis.alignment import align_kernel, align_reference, shifts

from ..conftest import NoCompute, needs_shared


@st.composite
def chunks(draw):
    rank = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 6), min_size=rank, max_size=rank)))
    n = draw(st.integers(1, 12))
    units = draw(st.integers(1, 4))
    shape = (n, *spatial, units)
    acts = draw(hnp.arrays(np.float32, shape, elements=st.floats(-5, 5, width=32)))
    # few distinct gradient values: ties, constant saliency and maxima at every edge happen often
    grads = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0, -1.0, 2.0])))
    return acts, grads


@settings(max_examples=300, deadline=None)
@given(chunks())
def test_kernel_equals_per_sample_loop(chunk):
    acts, grads = chunk
    np.testing.assert_array_equal(align_kernel(acts, grads), align_reference(acts, grads))


def test_shift_to_every_edge_and_constant_saliency():
    acts = np.arange(5 * 5 * 2, dtype=np.float32).reshape(1, 5, 5, 2) + 1
    for py in range(5):
        for px in range(5):
            grads = np.zeros_like(acts)
            grads[0, py, px, 1] = 3.0  # one unit's gradient decides the position
            out = align_kernel(acts, grads)
            d = (py - 2, px - 2)
            assert tuple(shifts(grads)[0]) == d
            for y in range(5):
                for x in range(5):
                    sy, sx = y + d[0], x + d[1]
                    inside = 0 <= sy < 5 and 0 <= sx < 5
                    expect = acts[0, sy, sx] if inside else 0
                    np.testing.assert_array_equal(out[0, y, x], expect)
            assert out[0, 2, 2, 0] == acts[0, py, px, 0]  # the salient position is now the centre
    flat = np.ones_like(acts)
    np.testing.assert_array_equal(align_kernel(acts, flat), acts)  # constant saliency: no shift


def test_first_maximum_in_c_order_and_units_never_move():
    acts = np.random.default_rng(0).random((1, 3, 4, 6), dtype=np.float32)
    grads = np.zeros_like(acts)
    grads[0, 0, 3] = 1.0  # tie between (0, 3) and (2, 0): (0, 3) comes first in C order
    grads[0, 2, 0] = 1.0
    assert tuple(shifts(grads)[0]) == (0 - 1, 3 - 2)
    out = align_kernel(acts, grads)
    np.testing.assert_array_equal(out[0, 1, 2, :], acts[0, 0, 3, :])  # all units, same order


def test_layers_without_spatial_axes_pass_through():
    acts = np.random.default_rng(1).random((4, 7), dtype=np.float32)
    assert align_kernel(acts, acts) is acts
    with pytest.raises(ValueError, match="one shape"):
        align_kernel(acts, acts[:2])


@needs_shared
def test_lazy_align_on_the_mnist_cnn_store(cnn_store):
    import dask

    import inntrospect
    from inntrospect.analysis.alignment import align

    tree = inntrospect.open_store(cnn_store)
    with dask.config.set(scheduler=NoCompute()):  # building the graph computes nothing
        aligned = align(tree)
    assert set(aligned) == set(tree.attrs["layers"])
    conv = aligned["conv2d_24"]
    assert conv.dims == ("sample", "y", "x", "unit") and conv.chunks[0][0] == 8
    assert conv.name == "aligned" and "group" in conv.coords
    acts = tree["layers/conv2d_24"].acts.values
    grads = tree["layers/conv2d_24"].grads.values
    expected = align_reference(acts, grads)
    np.testing.assert_array_equal(conv.values, expected)
    moved = np.any(shifts(grads) != 0, axis=1)
    assert moved.mean() > 0.5  # real saliency maps do move most samples
    np.testing.assert_array_equal(aligned["flatten_8"].values, tree["layers/flatten_8"].acts.values)


def test_persisted_alignment_is_written_chunk_by_chunk_and_read_by_naps(tmp_path):
    import xarray as xr

    import inntrospect
    from inntrospect.errors import StaleResultError
    from inntrospect.testing import store_from_arrays

    rng = np.random.default_rng(4)
    x = rng.random((21, 5, 4, 3), np.float32)
    g = rng.standard_normal((21, 5, 4, 3)).astype(np.float32)
    path = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, np.repeat(list("abc"), 7),
                             grads={"conv": g}, chunks=4, codec={"name": "zstd", "level": 1})
    done = inntrospect.align(path, persist=True)
    assert list(done) == ["conv"]  # the dense layer has nothing to align
    expected = align_reference(x, g)
    np.testing.assert_array_equal(done["conv"].values, expected)
    plain = xr.open_datatree(str(path), engine="zarr")["layers/conv"]
    np.testing.assert_array_equal(plain.aligned.values, expected)
    assert plain.aligned.encoding["chunks"] == (4, 5, 4, 3)
    assert "group" in plain.aligned.coords and plain.aligned.attrs["step"] == "align"
    assert "aligned" not in plain.aligned.attrs.get("coordinates", "")

    profiles = inntrospect.naps(path, aligned=True, persist=True)
    rec = inntrospect.open_store(path).attrs["steps"]
    assert rec["naps"]["inputs"]["align"] == rec["align"]["id"]
    np.testing.assert_allclose(profiles["conv"].nap.sel(group="b").values, expected[7:14].mean(0), rtol=1e-6)
    inntrospect.align(path, persist=True)  # aligned again: NAPs read the old arrays, so are stale
    with pytest.raises(StaleResultError, match="computed from align results .* Re-run inntrospect naps"):
        inntrospect.load(path, "naps")
