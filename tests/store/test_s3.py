"""Stores in object storage: ``s3://`` URLs on a real S3 server (moto, a process of its own).

Extraction of the real MNIST CNN into S3 gives the chunk files and values a
local store holds; the analysis steps on it give what they give locally and what plain
numpy gives; an interrupted extraction resumes; the writer lock is a lease
object that a second writer respects and that expires; ``inntrospect run`` and
``inntrospect info`` take the URL (with ``storage_options`` from the config).

S3 here is slow per request (tens of ms): the stores are kept small and the
extraction into S3 is shared by the tests of this module.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import zarr

import inntrospect
from inntrospect import pipeline, registry
from inntrospect import store as st
from inntrospect.errors import IncompleteStoreError, StoreLockedError
from inntrospect.store.backends import Location

from ..conftest import BATCH, CNN, CNN_LAYERS, needs_shared, pipeline_sections, write_config

pytestmark = needs_shared

#: the arrays of each layer node compared with the local store
ARRAYS = ("acts", "grads", "prediction", "group", "file", "index_in_file", "target")


class Interrupt(Exception):
    """Raised by ``on_block`` to stop an extraction the way a crash would."""


@pytest.fixture(scope="module")
def s3_store(s3, mnist_corpus):
    """The MNIST CNN's store of the 600-sample corpus extracted into S3, as ``cnn_store`` is locally."""
    pytest.importorskip("tensorflow")
    loc = s3.location("cnn.zarr")
    t = time.perf_counter()
    inntrospect.extract(CNN, mnist_corpus, loc, layers=CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    print(f"\nextraction into {loc}: {time.perf_counter() - t:.1f} s")
    return loc


def _layer_arrays(tree, layer: str) -> dict[str, np.ndarray]:
    node = tree[f"layers/{layer}"]
    return {k: node[k].values for k in ARRAYS if k in node.variables}


def test_extraction_into_s3_holds_what_the_local_store_holds(s3_store, cnn_store, s3):
    """Bit for bit: the same model on the same batches (padded to one batch size, in one
    process) computes the same float32 values, and both stores encode them losslessly
    with the same codecs, so S3 holds a chunk object for every local chunk file, decoding
    to the same values; plain xarray decodes them to the local values."""
    import xarray as xr

    local = inntrospect.open_store(cnn_store)
    remote_attrs = st.store_attrs(s3_store)
    assert remote_attrs["extraction"]["state"] == "complete"
    for key in ("layers", "chunks", "codecs"):
        assert remote_attrs[key] == local.attrs[key], key
    assert remote_attrs["extraction"]["n_blocks"] == local.attrs["extraction"]["n_blocks"] == 10
    fs, root = s3_store.fs, s3_store.url.removeprefix("s3://")
    for layer in local.attrs["layers"]:
        node = cnn_store / "layers" / layer
        for name in ("acts", "grads", "prediction"):
            files = sorted(p.relative_to(node / name).as_posix() for p in (node / name).rglob("*")
                           if p.is_file() and p.name != "zarr.json")
            if not (node / name).is_dir():
                assert not fs.exists(f"{root}/layers/{layer}/{name}"), (layer, name)
                continue
            keys = sorted(k.removeprefix(f"{root}/layers/{layer}/{name}/")
                          for k in fs.find(f"{root}/layers/{layer}/{name}") if not k.endswith("zarr.json"))
            assert keys == files and files, (layer, name)
            # the same values (the local chunk files are compressed as a stream of batches: a zstd frame
            # a few bytes apart from the one-shot frame Zarr writes to S3)
            np.testing.assert_array_equal(zarr.open_array(s3_store.zarr_store(), path=f"layers/{layer}/{name}",
                                                          mode="r")[:],
                                          zarr.open_array(str(node / name), mode="r")[:], err_msg=f"{layer} {name}")

    # plain xarray reads it, given the URL and fsspec's options
    plain = xr.open_datatree(s3_store.url, engine="zarr", storage_options=s3.storage_options)
    node = plain["layers/conv2d_25"]
    assert node["acts"].dims == ("sample", "y", "x", "unit")
    assert node["acts"].shape == (600, 6, 6, 128)
    assert plain["layers/flatten_8"]["acts"].dims == ("sample", "unit")
    for layer in ("conv2d_25", "flatten_8"):
        for name in ("acts", "grads", "prediction"):
            np.testing.assert_array_equal(plain[f"layers/{layer}"][name].values,
                                          local[f"layers/{layer}"][name].values, err_msg=f"{layer} {name}")
    assert sorted(set(_labels(node["group"]))) == [str(g) for g in range(10)]


def _labels(group) -> np.ndarray:
    """Group labels as numpy strings (Zarr v3 strings read as numpy's variable-width StringDType)."""
    return np.array([str(g) for g in group.values])


def _group_mean(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.stack([values[labels == g].mean(0, dtype=np.float64) for g in sorted(set(labels))])


#: the layers of the smaller S3 store (the input and output layers come with them)
SMALL = {"layers": ["conv2d_25"], "chunk_mib": 0.2, "batch_size": BATCH}
SMALL_LAYERS = ["conv2d_24_input", "conv2d_25", "dense_14"]


@pytest.fixture(scope="module")
def resumed(s3, mnist_corpus):
    """An extraction into S3 stopped after 2 of its 10 blocks, looked at, then run again.

    One conv layer only (its 10 blocks of 64 samples at ``chunk_mib=0.2``: the same
    blocks, so the same batches, as ``cnn_store``) keeps the S3 traffic small.
    """
    from inntrospect.store.info import describe_store

    pytest.importorskip("tensorflow")
    loc = s3.location()
    out = {"loc": loc, "seen": [], "locked": [], "resumed": [], "again": []}

    def stop_after_two(block: int, n_blocks: int) -> None:
        out["seen"].append(block)
        out["locked"].append(st.is_locked(loc))
        if len(out["seen"]) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        inntrospect.extract(CNN, mnist_corpus, loc, on_block=stop_after_two, **SMALL)
    out["lock_left"] = st.is_locked(loc) or loc.fs.exists(loc.url + ".lock")
    try:
        inntrospect.open_store(loc)
    except IncompleteStoreError as err:
        out["refused"] = str(err)
    out["info"] = describe_store(loc)
    out["tree"] = inntrospect.extract(CNN, mnist_corpus, loc, on_block=lambda b, n: out["resumed"].append(b),
                                      **SMALL)
    inntrospect.extract(CNN, mnist_corpus, loc, on_block=lambda b, n: out["again"].append(b), **SMALL)
    return out


def test_an_interrupted_extraction_into_s3_resumes_where_it_stopped(resumed, cnn_store):
    """Stopped after 2 of 10 blocks, the store is refused as incomplete; the same
    extraction again computes the other 8 blocks only and ends equal to the local store;
    once more, it computes nothing."""
    assert resumed["seen"] == [0, 1] and resumed["locked"] == [True, True]
    assert not resumed["lock_left"]  # the lease went with the interrupted writer
    assert "has not finished" in resumed.get("refused", "not refused")
    assert "incomplete: 2 of 10 blocks written (not running" in resumed["info"]

    assert resumed["resumed"] == list(range(2, 10)) and resumed["again"] == []
    tree = resumed["tree"]
    local = inntrospect.open_store(cnn_store)
    assert tree.attrs["extraction"]["state"] == "complete"
    assert tree.attrs["extraction"]["block"] == local.attrs["extraction"]["block"]
    assert tree.attrs["layers"] == SMALL_LAYERS
    for layer in SMALL_LAYERS:
        want, got = _layer_arrays(local, layer), _layer_arrays(tree, layer)
        assert set(got) == set(want), layer
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{layer} {name}")


def test_align_naps_and_contrast_on_s3_equal_the_local_ones_and_numpy(resumed, cnn_store, tmp_path):
    """Persisted on S3 they equal the same steps on a local copy of ``cnn_store`` (its
    layers are a superset; each layer's results depend on that layer alone).

    The aligned activations are the same float32 values moved, so they are equal;
    NAPs are float64 sums of those values, read from S3 through dask and locally
    straight from the chunk files, so they are equal to float64 rounding.
    """
    from inntrospect.analysis.alignment import align_reference

    remote = resumed["loc"]
    local = tmp_path / "cnn.zarr"
    shutil.copytree(cnn_store, local)
    timings = {}
    for where, store in (("s3", remote), ("local", local)):
        t = time.perf_counter()
        inntrospect.align(store, persist=True)
        inntrospect.naps(store, aligned=True, persist=True)
        inntrospect.contrastive_naps(store, persist=True)
        timings[where] = time.perf_counter() - t
    print(f"\nalign, naps, contrast: on S3 {timings['s3']:.1f} s, locally {timings['local']:.1f} s")

    aligned = {w: inntrospect.load(s, "align") for w, s in (("s3", remote), ("local", local))}
    assert list(aligned["s3"]) == ["conv2d_24_input", "conv2d_25"]
    for layer in aligned["s3"]:
        np.testing.assert_array_equal(aligned["s3"][layer].values, aligned["local"][layer].values)

    for step in ("naps", "contrast"):
        got, want = inntrospect.load(remote, step), inntrospect.load(local, step)
        assert list(got) == SMALL_LAYERS, step
        for layer in got:
            a, b = got[layer], want[layer]
            np.testing.assert_array_equal(a.group.values, b.group.values)
            np.testing.assert_array_equal(a["count"].values, b["count"].values)
            np.testing.assert_allclose(a.nap.values, b.nap.values, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{step} {layer}")

    # and the NAPs are plain numpy group means: of the reference alignment of the
    # activations where something is aligned, of the raw activations where not
    tree = resumed["tree"]
    naps = inntrospect.load(remote, "naps")
    for layer in ("conv2d_25", "dense_14"):
        node = tree[f"layers/{layer}"]
        labels = _labels(node["group"])
        acts = node["acts"].values
        if layer == "conv2d_25":
            acts = align_reference(acts, node["grads"].values)
        np.testing.assert_allclose(naps[layer].nap.values, _group_mean(acts, labels), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(naps[layer]["count"].values, np.bincount(labels.astype(int)))
    c = inntrospect.load(remote, "contrast")["dense_14"]
    nap = naps["dense_14"].nap.values
    np.testing.assert_allclose(c.nap.values, nap - nap.mean(0), rtol=1e-10, atol=1e-12)


def test_the_writer_lock_on_s3_is_a_lease_object(s3):
    """A second writer is refused while the lease is held; an expired lease is taken
    over, an unreadable one too; the lease object goes with its holder."""
    loc = s3.location()
    fs, key = loc.fs, loc.url + ".lock"
    with st.writer_lock(loc) as where:
        assert where.endswith("run.zarr.lock") and fs.exists(key)
        lease = json.loads(fs.cat_file(key))
        assert lease["expires"] > time.time() + 60 and "pid" in lease["holder"]
        assert st.is_locked(loc)
        with pytest.raises(StoreLockedError, match="is being written by another process"):
            with st.writer_lock(Location(loc.url, s3.storage_options)):
                pass
        assert json.loads(fs.cat_file(key))["token"] == lease["token"]  # the refused one changed nothing
    assert not fs.exists(key) and not st.is_locked(loc)

    for stale in (json.dumps({"holder": "pid 1 on gone", "token": "x", "expires": time.time() - 1}),
                  "not json"):
        fs.pipe_file(key, stale.encode())
        assert not st.is_locked(loc)
        with st.writer_lock(loc):
            held = json.loads(fs.cat_file(key))
            assert held["token"] != "x" and held["expires"] > time.time()
        assert not fs.exists(key)


def test_the_lease_is_renewed_while_held(s3, monkeypatch):
    from inntrospect.store import backends

    monkeypatch.setattr(backends, "RENEW_SECONDS", 0.2)
    loc = s3.location()
    fs, key = loc.fs, loc.url + ".lock"
    with st.writer_lock(loc):
        first = json.loads(fs.cat_file(key))
        deadline = time.monotonic() + 10
        while (now := json.loads(fs.cat_file(key)))["expires"] == first["expires"]:
            assert time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.05)
        assert now["token"] == first["token"] and now["expires"] > first["expires"]
    assert not fs.exists(key)


def _skip(*args, **kwargs) -> None:
    """A step left out: layout, topomap, projection and the figures are the same code on any store."""


def test_run_with_an_s3_store_in_the_config(s3, mnist_corpus, tmp_path, monkeypatch, capsys):
    """``[store] path = "s3://…"`` with ``storage_options``: extract, NAPs and contrast
    land in the bucket, and ``describe_store``/``inntrospect info`` read them there."""
    from inntrospect.cli import main
    from inntrospect.store.info import describe_store

    for step in ("layout", "topomap", "projection", "plots", "report"):
        monkeypatch.setitem(registry.RUNNERS, step, _skip)
    loc = s3.location()
    opts = s3.storage_options
    sections = pipeline_sections(CNN, mnist_corpus)
    sections["store"].update(path=loc.url, storage_options={
        "key": opts["key"], "secret": opts["secret"], "endpoint_url": opts["endpoint_url"],
        "client_kwargs": {"region_name": "us-east-1"}})
    sections["naps"]["aligned"] = False
    cfg = write_config(tmp_path, sections)
    done = pipeline.run(cfg, progress=False, echo=lambda _: None)
    assert [s for s, how in done.items() if how == "ran"] == [
        "extract", "naps", "exemplars", "contrast", "layout", "topomap", "projection", "plots", "report"]
    assert done["align"] == "skipped"
    assert not (tmp_path / "s3:").exists() and not any(tmp_path.glob("**/*.zarr"))

    tree = inntrospect.open_store(loc)
    node = tree["layers/conv2d_25"]
    labels = _labels(node["group"])
    naps = inntrospect.load(loc, "naps")["conv2d_25"]
    np.testing.assert_allclose(naps.nap.values, _group_mean(node["acts"].values, labels),
                               rtol=1e-10, atol=1e-12)
    assert inntrospect.load(loc, "contrast")["conv2d_25"].nap.shape == (10, 6, 6, 128)

    text = describe_store(loc)
    assert f"store:      {loc.url}" in text and "extraction: complete" in text
    assert "naps       current" in text and "contrast   current" in text
    sizes = {line.split()[0]: line.split()[-2:] for line in text.splitlines()
             if line.startswith(("conv2d_25 ", "total "))}
    assert sizes["conv2d_25"][1] in ("kB", "MB") and float(sizes["conv2d_25"][0]) > 0, text

    # the command line: a bare URL, fsspec's credentials and endpoint from the environment
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["secret"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    capsys.readouterr()
    assert main(["info", loc.url]) == 0
    assert "extraction: complete" in capsys.readouterr().out
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    assert main(["info", str(cfg)]) == 0  # or the config, with its storage_options
    assert "extraction: complete" in capsys.readouterr().out


def test_a_url_in_a_toml_config_is_not_resolved_against_its_folder(tmp_path, monkeypatch):
    from inntrospect.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "sub", {
        "store": {"path": "s3://bkt/run.zarr",
                  "storage_options": {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}},
        "plot": {"output": "figs"}})
    loc = load_config(cfg).store_path()
    assert isinstance(loc, Location) and loc.url == "s3://bkt/run.zarr" and not loc.is_local
    assert loc.storage_options == {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    assert load_config(cfg).plot_output() == cfg.parent / "figs"  # a path still is
    write_config(cfg.parent, {"store": {"path": "run.zarr"}})
    assert load_config(cfg).store_path().url == str(cfg.parent / "run.zarr")
    write_config(cfg.parent, {"store": {"path": "file://run.zarr"}})  # a file URL is a path: relative to the config
    assert load_config(cfg).store_path().url == str(cfg.parent / "run.zarr")
