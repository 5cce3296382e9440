"""Extraction in real processes: kill -9 and resume, a second writer, bounded memory."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import inntrospect
from inntrospect import StoreLockedError
from inntrospect.extraction.local import prepare_extraction, run_extraction

from ..conftest import CNN, CNN_LAYERS, needs_shared, python_env, write_mnist_corpus

pytestmark = [needs_shared, pytest.mark.slow]
pytest.importorskip("tensorflow")

EXTRACT = """
import os, sys, time, inntrospect

def hold(block, n_blocks):  # after 3 blocks the writer waits while the test tries a second writer
    while block >= 2 and os.path.exists({hold!r}):
        time.sleep(0.01)

inntrospect.extract({model!r}, {corpus!r}, {store!r}, layers={layers!r}, chunk_mib=1, batch_size=16,
                    on_block=hold)
"""


def blocks_done(path) -> int:
    folder = path / "extraction" / "block_done" / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_kill_9_then_resume_gives_identical_arrays(tmp_path, mnist_arrays):
    x, y = mnist_arrays
    csv = write_mnist_corpus(tmp_path / "corpus", x, y, 2000, 300)
    path = tmp_path / "k.zarr"
    held = tmp_path / "hold"
    held.touch()
    code = EXTRACT.format(model=str(CNN), corpus=str(csv), store=str(path), layers=CNN_LAYERS,
                          hold=str(held))
    proc = subprocess.Popen([sys.executable, "-c", code], env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while blocks_done(path) < 3:  # let it record a few blocks
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "extraction did not start"
            time.sleep(0.01)
        with pytest.raises(StoreLockedError, match="being written by another process"):
            inntrospect.extract(CNN, csv, path, layers=CNN_LAYERS, batch_size=16)
        held.unlink()  # let it go on, then kill it mid-block
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    done_before = np.asarray(zarr.open_array(str(path / "extraction" / "block_done"))[:], bool)
    assert 3 <= done_before.sum() < len(done_before), "the kill should land mid-run"
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    assert attrs["extraction"]["state"] == "incomplete"  # never claims completion

    ex = prepare_extraction(CNN, csv, path, CNN_LAYERS, batch_size=16)
    computed = run_extraction(ex)
    assert computed == [int(b) for b in np.flatnonzero(~done_before)]  # recorded blocks kept

    ref = tmp_path / "ref.zarr"
    inntrospect.extract(CNN, csv, ref, layers=CNN_LAYERS, chunk_mib=1, batch_size=16)
    for layer in ["conv2d_24_input", *CNN_LAYERS, "dense_14"]:
        for var in ["acts", "grads", "prediction"][: 1 if layer == "dense_14" else 3]:
            a = zarr.open_array(str(path), path=f"layers/{layer}/{var}")[:]
            b = zarr.open_array(str(ref), path=f"layers/{layer}/{var}")[:]
            np.testing.assert_array_equal(a, b, err_msg=f"{layer}/{var}")


MEMORY = """
import json, resource, inntrospect
inntrospect.extract({model!r}, {corpus!r}, {store!r}, layers={layers!r}, chunk_mib={mib},
                    batch_size=128)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""


def peak_rss_of_extraction(corpus, store, mib) -> int:
    """Peak resident memory of a fresh process that extracts ``corpus`` (TensorFlow included)."""
    code = MEMORY.format(corpus=str(corpus), store=str(store), model=str(CNN), layers=CNN_LAYERS, mib=mib)
    res = subprocess.run([sys.executable, "-c", code], env=python_env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path, mnist_arrays):
    x, y = mnist_arrays
    mib = 16  # chunks of conv2d_24: 128 samples, 10.6 MiB
    small = write_mnist_corpus(tmp_path / "small", x, y, 1500, 500)
    large = write_mnist_corpus(tmp_path / "large", x, y, 6000, 500)  # 4x: 2 GB of arrays
    peak_small = peak_rss_of_extraction(small, tmp_path / "small.zarr", mib)
    peak_large = peak_rss_of_extraction(large, tmp_path / "large.zarr", mib)
    tree = inntrospect.open_store(tmp_path / "large.zarr")
    layer_bytes = tree["layers/conv2d_24"].acts.nbytes * 2  # acts + grads of the widest layer
    chunk_bytes = tree["layers/conv2d_24"].acts.encoding["chunks"][0] * 13 * 13 * 128 * 4
    growth = peak_large - peak_small
    print(f"peak RSS: 1500 samples {peak_small / 2**20:.0f} MiB, 6000 samples "
          f"{peak_large / 2**20:.0f} MiB, growth {growth / 2**20:.1f} MiB; widest layer "
          f"{layer_bytes / 2**20:.0f} MiB, its chunk {chunk_bytes / 2**20:.1f} MiB")
    assert layer_bytes > 900 * 2**20  # loading it whole would show
    assert growth < 4 * chunk_bytes  # within a few chunks, nowhere near a layer
