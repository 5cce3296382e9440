"""Store layout pieces that need no model: chunk plan, lock, config. No TensorFlow."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inntrospect import ConfigError, StoreError, StoreLockedError, store
from inntrospect.config import load_config

from ..conftest import python_env, write_config


@given(
    sizes=st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(1, 50_000_000),
                          min_size=1, max_size=6),
    mib=st.floats(0.01, 256),
)
def test_chunk_plan_properties(sizes, mib):
    plan = store.plan_chunks(sizes, mib)
    target = mib * 2**20
    assert set(plan.chunks) == set(sizes)
    assert plan.block & (plan.block - 1) == 0  # a power of two
    for name, c in plan.chunks.items():
        assert 1 <= c <= plan.block <= store.MAX_CHUNK_SAMPLES
        assert plan.block % c == 0  # every block writes whole chunks of every layer
        assert c == 1 or c * sizes[name] <= target  # within the target size
        # maximal: twice as long would exceed the target, the cap or the block
        assert 2 * c * sizes[name] > target or c == plan.block
    assert plan.block <= max(plan.chunks.values())
    # a block holds at most BLOCK_CHUNKS target chunks of all arrays, unless one sample is more
    assert plan.block == 1 or plan.block * 2 * sum(sizes.values()) <= store.BLOCK_CHUNKS * target


def test_chunk_plan_examples():
    # MNIST CNN: input, conv2d_24, conv2d_25, flatten_8, output; bytes per sample
    b = {"in": 3136, "c24": 86528, "c25": 18432, "f": 18432, "out": 40}
    plan = store.plan_chunks(b, 32)
    assert plan.chunks["c24"] == 256  # 256 * 86.5 kB = 21 MiB
    assert plan.chunks["c25"] == 1024
    assert plan.block == 2048
    vgg = store.plan_chunks({"block1_conv1": 224 * 224 * 64 * 4, "fc1": 16384}, 32)
    assert vgg.chunks["block1_conv1"] == 2  # 2 samples = 25.7 MB
    with pytest.raises(StoreError, match="positive"):
        store.plan_chunks(b, 0)


def test_dims_by_rank():
    assert store.layer_dims((10,)) == ("unit",)
    assert store.layer_dims((5, 10)) == ("t", "unit")
    assert store.layer_dims((3, 4, 10)) == ("y", "x", "unit")
    assert store.layer_dims((2, 3, 4, 10)) == ("z", "y", "x", "unit")


def test_second_writer_is_refused_and_lock_is_released(tmp_path):
    path = tmp_path / "s.zarr"
    with store.writer_lock(path):
        assert store.is_locked(path)
        with pytest.raises(StoreLockedError, match="being written by another process"):
            with store.writer_lock(path):
                pass
    assert not store.is_locked(path)
    with store.writer_lock(path):  # free again
        pass
    assert not (tmp_path / "s.zarr.lock").exists()


def test_lock_of_a_killed_writer_is_free(tmp_path):
    path = tmp_path / "s.zarr"
    code = (
        "import sys, time; from inntrospect.store import writer_lock\n"
        f"with writer_lock({str(path)!r}):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=python_env())
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(StoreLockedError, match="pid"):
            with store.writer_lock(path):
                pass
        proc.send_signal(signal.SIGKILL)  # kill -9: no cleanup runs
        proc.wait(10)
        time.sleep(0.05)
        with store.writer_lock(path):  # the OS released it
            pass
    finally:
        proc.kill()


def test_remove_store_refuses_other_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a Zarr store; refusing"):
        store.remove_store(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_store_attrs_errors(tmp_path):
    with pytest.raises(StoreError, match="no zarr.json"):
        store.store_attrs(tmp_path)
    (tmp_path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(StoreError, match="not an inntrospect store"):
        store.open_store(tmp_path)


def test_config_paths_resolve_against_its_folder(tmp_path):
    sub = tmp_path / "cfg"
    sub.mkdir()
    cfg = write_config(sub, {
        "model": {"path": "m.keras", "layers": ["a"]}, "corpus": {"path": "../data/corpus.csv"},
        "store": {"path": "out.zarr", "chunk_mib": 8}, "extract": {"gradient_target": "target"}})
    kw = load_config(cfg).extract_kwargs()
    assert kw["model"] == str(sub / "m.keras")
    assert kw["corpus"] == str(tmp_path / "data" / "corpus.csv")
    assert str(kw["store"]) == str(sub / "out.zarr") and kw["store"].is_local
    assert kw["chunk_mib"] == 8 and kw["gradient_target"] == "target" and kw["batch_size"] == 128


@pytest.mark.parametrize(
    "sections, text, match",
    [
        ({"modle": {"path": "m"}}, None, r"unknown section \[modle\].*Did you mean 'model'"),
        ({"model": {"paht": "m"}}, None, r"unknown key 'paht' in \[model\].*Did you mean 'path'"),
        ({"store": {"chunk_mib": "big"}}, None, r"\[store\] chunk_mib must be int or float"),
        ({"model": {"path": "m", "name": "VGG16"}, "corpus": {"path": "c"}, "store": {"path": "s"}}, None,
         "exactly one of 'path'"),
        ({"model": {"path": "m"}, "store": {"path": "s"}}, None, r"\[corpus\] needs 'path'"),
        (None, "[model\n", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path, sections, text, match):
    cfg = write_config(tmp_path, sections, text=text)
    with pytest.raises(ConfigError, match=match):
        load_config(cfg).extract_kwargs()


def test_example_configs_point_at_the_shared_models():
    from ..conftest import CNN, MLP, ROOT

    for name, model in [("cnn", CNN), ("mlp", MLP)]:
        kw = load_config(ROOT / "examples" / "mnist" / f"{name}.toml").extract_kwargs()
        assert kw["model"] == str(model.resolve())
        assert str(kw["store"]) == str(ROOT / "storage" / "mnist" / f"{name}.zarr")
        assert kw["corpus"] == str(ROOT / "storage" / "mnist" / "corpus" / "corpus.csv")
