"""Out of core: NAPs and exemplars of a store several times a worker's memory, on a real LocalCluster.

Plus the parts that make the NAP pass fast, against their definitions: the
stored chunks read directly, the compiled kernels and their numpy fallback,
and the alignment fused into the sums.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time

import numpy as np
import pytest

import inntrospect
from inntrospect.analysis import compiled as compiled_module
from inntrospect.analysis import nap_graph, nap_kernels
from inntrospect.analysis.alignment import align_reference
from inntrospect.store import chunkio
from inntrospect.testing import store_from_arrays

#: the worker's memory limit: an idle worker process takes ~65 MB, ~190 MB
#: once inntrospect, xarray, zarr and the numba kernels are loaded
LIMIT = 500_000_000
GROUPS = np.array(["cat", "dog", "eel", "emu", "fox", "gnu", "yak"])
#: exemplars kept per unit, group and end
K = 16


def _vm_hwm() -> int:
    """Peak RSS of this process (``VmHWM``, bytes): reset by writing 5 to ``/proc/self/clear_refs``."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _worker_state(dask_worker=None) -> dict:
    """In the worker: its pid, peak RSS since it started, and anything spilled to disk."""
    data = dask_worker.data
    slow = getattr(data, "slow", {})
    spilled = getattr(data, "spilled_total", None)
    return {"pid": os.getpid(), "peak": _vm_hwm(), "slow": len(slow),
            "disk": int(spilled.disk) if spilled is not None else 0, "status": str(dask_worker.status)}


class ObservedChunks:
    """A lazy array sliced chunk by chunk, summing each slice per group (float64) as it goes.

    The reference NAPs come from the generated data itself, in plain numpy, in
    the same single pass that writes it: it is never all in memory, and never
    generated twice.
    """

    def __init__(self, lazy, codes: np.ndarray, n_groups: int):
        self.lazy, self.codes, self.shape = lazy, codes, lazy.shape
        self.sums = np.zeros((n_groups, int(np.prod(lazy.shape[1:]))))
        self.seen = np.zeros(len(codes), np.int64)
        # each sample's score per unit (maximum over positions) and its position: the exemplars' inputs
        self.score = np.zeros((len(codes), lazy.shape[-1]), np.float32)
        self.where = np.zeros((len(codes), lazy.shape[-1]), np.int32)

    def __getitem__(self, key: slice) -> np.ndarray:
        block = np.asarray(self.lazy[key])
        codes = self.codes[key]
        flat = block.reshape(len(block), -1)
        for g in np.unique(codes):
            self.sums[g] += flat[codes == g].sum(axis=0, dtype=np.float64)
        self.seen[key] += 1
        per_unit = block.reshape(len(block), -1, block.shape[-1])
        self.score[key], self.where[key] = per_unit.max(axis=1), per_unit.argmax(axis=1)
        return block

    def exemplars(self, k: int):
        """``sample``, ``value``, flat position (end, group, rank, unit) by sorting every sample."""
        G, U = self.sums.shape[0], self.shape[-1]
        sample = np.full((2, G, k, U), -1, np.int64)
        value = np.full((2, G, k, U), np.nan)
        where = np.full((2, G, k, U), -1, np.int64)
        for g in range(G):
            idx = np.flatnonzero(self.codes == g)
            for u in range(U):
                s = self.score[idx, u]
                for end, order in enumerate((np.lexsort((idx, -s)), np.lexsort((idx, s)))):
                    take = idx[order[:k]]
                    sample[end, g, : len(take), u] = take
                    value[end, g, : len(take), u] = self.score[take, u]
                    where[end, g, : len(take), u] = self.where[take, u]
        return sample, value, where


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS from /proc/self/status")
def test_naps_and_exemplars_of_a_store_4x_the_worker_memory_on_a_local_cluster(tmp_path, request):
    import dask
    import dask.array as da
    from distributed import Client, LocalCluster, get_task_stream

    t_start = time.perf_counter()
    n, shape, chunk = 131_072, (8, 8, 64), 1024  # 16 KiB a sample, 16 MiB chunks
    rng = np.random.default_rng(7)
    codes = rng.choice(len(GROUPS), n, p=[0.3, 0.2, 0.15, 0.15, 0.1, 0.05, 0.05])
    conv = ObservedChunks(da.random.default_rng(8).random((n, *shape), dtype=np.float32,
                                                            chunks=(chunk, *shape)), codes, len(GROUPS))
    dense = ObservedChunks(da.random.default_rng(9).standard_normal((n, 10), dtype=np.float32,
                                                                     chunks=(8192, 10)), codes, len(GROUPS))
    _reset_hwm()
    base = _vm_hwm()
    path = tmp_path / "big.zarr"
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))  # 2 GB: not kept by pytest
    store_from_arrays(path, {"conv": conv, "dense": dense}, GROUPS[codes],
                      chunks={"conv": chunk, "dense": 8192}, codec=None)
    test_process_growth = _vm_hwm() - base
    acts_bytes = n * (np.prod(shape) + 10) * 4
    assert acts_bytes >= 4 * LIMIT
    assert (conv.seen == 1).all() and (dense.seen == 1).all()  # each sample generated (and summed) once
    # the test process held a few chunks at a time, never the store
    assert test_process_growth < acts_bytes / 8, test_process_growth
    t_built = time.perf_counter()

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, memory_limit=LIMIT,
                      dashboard_address=None, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        before = client.run(_worker_state)
        # one pass for both; the library uses whatever scheduler is active: this client
        lazy, lazy_ex = inntrospect.naps_and_exemplars(path, k=K, persist=False)
        with get_task_stream(client) as stream:
            result, exemplars = dask.compute(lazy, lazy_ex)
        after = client.run(_worker_state)
        warnings = [line for log in client.get_worker_logs().values() for level, line in log
                    if level in ("WARNING", "ERROR", "CRITICAL")]
    t_done = time.perf_counter()

    # it ran on the cluster: one task per few stored chunks
    chunk_tasks = [t for t in stream.data if "naps-chunk" in str(t["key"])]
    assert len(chunk_tasks) == sum(len(nap_graph.task_chunks(codes, np.arange(0, n + 1, c), 1,
                                                             nap_graph.EXEMPLAR_MIN_TASKS,
                                                             nap_graph.EXEMPLAR_CHUNKS_PER_TASK,
                                                             threads=2))  # the worker's
                                   for c in (chunk, 8192))
    # the same worker throughout: never killed, restarted or replaced
    assert list(after) == list(before)
    addr = next(iter(after))
    assert after[addr]["pid"] == before[addr]["pid"]
    # below its memory limit, nothing spilled to disk, no memory warnings
    peak = after[addr]["peak"]
    assert peak < LIMIT, f"worker peak RSS {peak / 1e6:.0f} MB, limit {LIMIT / 1e6:.0f} MB"
    assert after[addr]["slow"] == 0 and after[addr]["disk"] == 0
    assert not warnings, warnings

    counts = np.bincount(codes, minlength=len(GROUPS))
    for layer, ref in (("conv", conv), ("dense", dense)):
        ds = result[layer]
        assert list(ds.group.values) == list(GROUPS)
        np.testing.assert_array_equal(ds["count"].values, counts)
        expected = (ref.sums / counts[:, None]).reshape(ds.nap.shape)
        np.testing.assert_allclose(ds.nap.values, expected, rtol=1e-10, atol=0)
        sample, value, where = ref.exemplars(K)
        ex = exemplars[layer]
        np.testing.assert_array_equal(ex["sample"].values, sample)
        np.testing.assert_array_equal(ex["value"].values, value)
        if layer == "conv":
            flat = np.ravel_multi_index(np.moveaxis(ex["position"].values, -1, 0), shape[:-1])
            np.testing.assert_array_equal(flat, where)
    print(f"\nstore {acts_bytes / 1e9:.2f} GB of acts = {acts_bytes / LIMIT:.1f}x the worker limit; "
          f"built in {t_built - t_start:.1f} s; cluster part {t_done - t_built:.1f} s; worker peak RSS "
          f"{peak / 1e6:.0f} MB (limit {LIMIT / 1e6:.0f} MB); test process grew {test_process_growth / 1e6:.0f} MB")


# -- the fast path against its definitions -------------------------------------------
@pytest.fixture(params=["numba", "numpy"])
def kernels(request, monkeypatch):
    """Run a test with the compiled kernels and again with the plain numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(compiled_module, "KERNELS", [None])
    else:
        pytest.importorskip("numba")
    return request.param


@pytest.mark.parametrize("spatial", [(7,), (5, 6), (3, 4, 5)])
def test_fused_alignment_equals_aligning_then_averaging(kernels, spatial):
    rng = np.random.default_rng(len(spatial))
    n, units = 90, 3
    acts = rng.standard_normal((n, *spatial, units)).astype(np.float32)
    grads = rng.standard_normal((n, *spatial, units)).astype(np.float32)
    grads[:4] = 1.0  # constant saliency: not shifted
    labels = rng.choice(list("abc"), n)
    names, codes = nap_kernels.group_codes(labels)
    got = nap_kernels.finalize_moments(nap_kernels.aligned_moments(acts, codes, grads),
                                       len(names), acts.shape[1:])[0]
    ref = align_reference(acts, grads).astype(np.float64)
    expected = np.stack([ref[labels == g].mean(0) for g in names])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("codec", [None, {"name": "zstd", "level": 1}])
def test_chunk_files_read_directly_equal_the_dask_route(kernels, codec, tmp_path):
    import dask

    rng = np.random.default_rng(5)
    x = np.maximum(rng.standard_normal((75, 4, 5, 6)), 0).astype(np.float32)
    g = rng.standard_normal((75, 4, 5, 6)).astype(np.float32)
    labels = rng.choice(list("pqrs"), 75)
    path = store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, labels,
                             grads={"conv": g}, chunks=16, codec=codec)
    graph = inntrospect.naps(path, aligned=True, std=True)["conv"].nap.data.dask
    assert any("naps-chunk" in str(k) for k in graph)  # read directly
    for aligned in (False, True):
        direct = dask.compute(inntrospect.naps(path, aligned=aligned, std=True))[0]
        via_dask = dask.compute(inntrospect.naps(inntrospect.open_store(path), aligned=aligned, std=True))[0]
        for layer in ("conv", "dense"):
            np.testing.assert_allclose(direct[layer].nap.values, via_dask[layer].nap.values, rtol=1e-12)
            np.testing.assert_allclose(direct[layer]["std"].values, via_dask[layer]["std"].values,
                                       rtol=1e-9, atol=1e-12)
        data = align_reference(x, g) if aligned else x
        for k, name in enumerate(direct["conv"].group.values):
            np.testing.assert_allclose(direct["conv"].nap.values[k], data[labels == name].mean(0, dtype=np.float64),
                                       rtol=1e-10, atol=1e-12)


def test_a_chunk_never_written_is_an_error_not_the_fill_value(tmp_path):
    import zarr

    x = np.arange(40 * 6, dtype=np.float32).reshape(40, 2, 3)
    path = store_from_arrays(tmp_path / "s.zarr", {"l": x}, ["a"] * 20 + ["b"] * 20, chunks=10)
    arr = zarr.open_group(str(path), mode="r+")["layers/l/acts"]
    arr[10:20] = np.nan  # all fill value: Zarr deletes the chunk file
    files = chunkio.chunk_files(arr)
    assert not os.path.exists(files[1][0]) and os.path.exists(files[0][0])
    with pytest.raises(inntrospect.DamagedStoreError, match=r"acts/c/1/0/0 is missing"):
        chunkio.read_chunk(chunkio.ChunkFile(*files[1]), "test")  # Zarr would read NaN
    np.testing.assert_array_equal(chunkio.read_chunk(chunkio.ChunkFile(*files[3]), "test"), x[30:])
    with pytest.raises(inntrospect.DamagedStoreError, match="inntrospect verify"):
        inntrospect.naps(path)  # found before anything is computed (tests/store/test_integrity.py)


def test_store_from_arrays_takes_a_codec_per_variable_or_per_array(tmp_path):
    import zarr

    x = np.ones((8, 2, 3), np.float32)
    zstd = {"name": "zstd", "level": 1}
    cases = [
        (zstd, {"a": {"acts": zstd, "grads": zstd}, "b": {"acts": zstd}}),
        ({"acts": zstd, "grads": None}, {"a": {"acts": zstd, "grads": None}, "b": {"acts": zstd}}),
        ({"a": {"grads": zstd}}, {"a": {"acts": None, "grads": zstd}, "b": {"acts": None}}),
    ]
    for k, (codec, expected) in enumerate(cases):
        path = store_from_arrays(tmp_path / f"s{k}.zarr", {"a": x, "b": x}, list("pq") * 4,
                                 grads={"a": x}, chunks=4, codec=codec)
        root = zarr.open_group(str(path), mode="r")
        assert root.attrs["codecs"] == expected
        for layer, vs in expected.items():
            for var, rec in vs.items():
                names = [type(c).__name__ for c in root[f"layers/{layer}/{var}"].compressors]
                assert names == (["ZstdCodec"] if rec is not None else []) + ["Crc32cCodec"]
