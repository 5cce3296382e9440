"""Extraction on the real MNIST models and data: values, coordinates, resume, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

import inntrospect
from inntrospect import (
    CorpusError,
    IncompleteStoreError,
    LayerNotFoundError,
    ModelError,
    NonFiniteError,
    StoreMismatchError,
)
from inntrospect.extraction.local import prepare_extraction, run_extraction
from inntrospect.store.info import describe_store

from ..conftest import (
    BATCH,
    CNN,
    CNN_LAYERS,
    MLP,
    MLP_LAYERS,
    corpus_inputs,
    nan_corpus,
    needs_shared,
)

pytestmark = needs_shared
tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")



def reference_model(path, names):
    """A plain tf_keras model returning the named layers' outputs."""
    m = tf_keras.models.load_model(str(path), compile=False)
    return m, tf_keras.Model(m.inputs, [m.get_layer(n).output for n in names])


def direct_acts(path, names, x):
    """Activations by a direct Keras call, batch by batch as the extraction batches them."""
    _, sub = reference_model(path, names)
    outs = [sub(x[i : i + BATCH], training=False) for i in range(0, len(x), BATCH)]
    return [np.concatenate([o[k].numpy() for o in outs]) for k in range(len(names))]


def per_sample_grads(path, names, x, targets):
    """d output[t] / d layer, one GradientTape per sample (REFERENCE.md §2)."""
    _, sub = reference_model(path, names)
    result = [[] for _ in range(len(names))]  # input first, then hidden layers
    for xi, ti in zip(x, targets):
        xi = tf.constant(xi[None])
        with tf.GradientTape() as tape:
            tape.watch(xi)
            outs = sub(xi, training=False)
            y = outs[-1][0, int(ti)]
        grads = tape.gradient(y, [xi, *outs[:-1]])
        for k, g in enumerate(grads):
            result[k].append(g.numpy()[0])
    return [np.stack(r) for r in result]


def store_array(path, layer, var):
    return zarr.open_array(str(path), path=f"layers/{layer}/{var}")[:]


@pytest.mark.parametrize(
    "model, layers, target",
    [(CNN, CNN_LAYERS, "predicted"), (CNN, CNN_LAYERS, "target"),
     (MLP, MLP_LAYERS, "predicted"), (MLP, MLP_LAYERS, "target")],
)
def test_acts_and_grads_equal_keras(tmp_path, mnist_corpus, cnn_store, model, layers, target):
    if model == CNN and target == "predicted":
        path = cnn_store
    else:
        path = tmp_path / "s.zarr"
        inntrospect.extract(model, mnist_corpus, path, layers=layers, gradient_target=target,
                            chunk_mib=1, batch_size=BATCH)
    m, _ = reference_model(model, layers)
    names = [m.layers[0].name, *layers, m.layers[-1].name]
    tree = inntrospect.open_store(path)
    assert tree.attrs["layers"] == names  # input and output added, in model order
    assert set(tree["layers"].children) == set(names)
    x = corpus_inputs(mnist_corpus)
    acts = direct_acts(model, names[1:], x)
    np.testing.assert_allclose(store_array(path, names[0], "acts"), x, rtol=0, atol=0)
    for name, ref in zip(names[1:], acts):
        got = store_array(path, name, "acts")
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    output = acts[-1]
    pred = output.argmax(axis=1)
    labels = np.concatenate([[int(line.split(",")[2])] * len(np.load(mnist_corpus.parent / line.split(",")[0]))
                             for line in mnist_corpus.read_text().splitlines()])
    node = tree[f"layers/{names[1]}"]
    np.testing.assert_array_equal(node.prediction.values, pred)
    np.testing.assert_array_equal(node.target.values, labels)
    # gradients: the samples the model gets wrong (where the targets differ) and a few more
    wrong = np.flatnonzero(pred != labels)
    assert len(wrong) > 0, "need misclassified samples to tell the gradient targets apart"
    pick = np.concatenate([wrong[:8], np.arange(0, 600, 97)])
    t = (pred if target == "predicted" else labels)[pick]
    ref_grads = per_sample_grads(model, names[1:], x[pick], t)
    for name, ref in zip(names[:-1], ref_grads):
        got = store_array(path, name, "grads")[pick]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert "grads" not in tree[f"layers/{names[-1]}"]  # none for the output layer


def test_store_is_plain_xarray(cnn_store, mnist_corpus):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata or dtype warnings
        tree = xr.open_datatree(str(cnn_store), engine="zarr")
    ds = xr.open_dataset(str(cnn_store), group="layers/conv2d_24", engine="zarr")
    assert ds.acts.dims == ("sample", "y", "x", "unit")
    assert ds.acts.shape == (600, 13, 13, 128)
    assert ds.acts.encoding["chunks"] == (8, 13, 13, 128)  # 1 MiB target: 8 x 86.5 kB
    assert tree["layers/flatten_8"].acts.dims == ("sample", "unit")
    for node in tree["layers"].children.values():  # every node carries the sample table
        assert {"group", "file", "index_in_file", "target", "prediction"} <= set(node.coords)
    x = corpus_inputs(mnist_corpus)
    means = ds.acts.groupby("group").mean()  # a user's first question, with plain xarray
    assert list(means.group.values) == [str(d) for d in range(10)]
    attrs = tree.attrs
    assert attrs["format"] == "inntrospect" and attrs["format_version"] == 1
    assert attrs["extraction"]["state"] == "complete"
    assert attrs["layers"] == ["conv2d_24_input", *CNN_LAYERS, "dense_14"]
    assert attrs["model"]["framework"] == "tf_keras" and len(attrs["model"]["sha256"]) == 64
    assert attrs["corpus"]["n_samples"] == len(x) == 600
    rows = [line.split(",") for line in mnist_corpus.read_text().splitlines()]
    sizes = [len(np.load(mnist_corpus.parent / f)) for f, _, _ in rows]
    np.testing.assert_array_equal([str(v) for v in ds.file.values], np.repeat([f for f, _, _ in rows], sizes))
    np.testing.assert_array_equal([str(v) for v in ds.group.values], np.repeat([g for _, g, _ in rows], sizes))
    np.testing.assert_array_equal(ds.index_in_file.values, np.concatenate([np.arange(n) for n in sizes]))


def test_resume_after_interruption_skips_finished_blocks(tmp_path, mnist_corpus, cnn_store):
    path = tmp_path / "r.zarr"
    seen = []

    def crash_after_three(block, n_blocks):
        seen.append(block)
        if len(seen) == 3:
            raise KeyboardInterrupt  # as if the user pressed ctrl-c

    ex = prepare_extraction(CNN, mnist_corpus, path, CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    assert ex.n_blocks == 10  # 600 samples in blocks of 64
    with pytest.raises(KeyboardInterrupt):
        run_extraction(ex, on_block=crash_after_three)
    with pytest.raises(IncompleteStoreError, match="has not finished"):
        inntrospect.open_store(path)
    assert "incomplete: 3 of 10 blocks" in describe_store(path)
    again = prepare_extraction(CNN, mnist_corpus, path, CNN_LAYERS, batch_size=BATCH)
    computed = run_extraction(again)
    assert computed == list(range(3, 10))  # finished blocks are not recomputed
    assert run_extraction(again) == []  # a complete store has nothing left to do
    for layer in ["conv2d_24_input", *CNN_LAYERS, "dense_14"]:
        for var in ("acts", "grads") if layer != "dense_14" else ("acts",):
            np.testing.assert_array_equal(store_array(path, layer, var), store_array(cnn_store, layer, var))
    assert inntrospect.open_store(path).attrs["extraction"]["state"] == "complete"


def test_resuming_with_another_model_or_corpus_is_refused(tmp_path, mnist_corpus, mnist_corpus_no_target):
    path = tmp_path / "m.zarr"
    ex = prepare_extraction(CNN, mnist_corpus, path, CNN_LAYERS, chunk_mib=1, batch_size=BATCH)
    with pytest.raises(KeyboardInterrupt):
        run_extraction(ex, on_block=lambda b, n: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(StoreMismatchError, match=r"model: the store was made from .*mnist_cnn_shallow"):
        inntrospect.extract(MLP, mnist_corpus, path, layers=MLP_LAYERS)
    with pytest.raises(StoreMismatchError, match="corpus: corpus.csv differs"):
        inntrospect.extract(CNN, mnist_corpus_no_target, path, layers=CNN_LAYERS)
    with pytest.raises(StoreMismatchError, match="layers: store has"):
        inntrospect.extract(CNN, mnist_corpus, path, layers=["conv2d_24"])
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        inntrospect.extract(CNN, mnist_corpus, path, layers=CNN_LAYERS, gradient_target="target")
    tree = inntrospect.extract(MLP, mnist_corpus, path, layers=MLP_LAYERS, overwrite=True)
    assert tree.attrs["layers"] == ["flatten_7_input", "layer_2", "dense_13"]


def test_bad_inputs_raise_and_leave_no_complete_store(tmp_path, mnist_corpus, mnist_corpus_no_target):
    path = tmp_path / "bad.zarr"
    with pytest.raises(LayerNotFoundError, match=r"no layer named 'conv9'.*conv2d_24_input, conv2d_24"):
        inntrospect.extract(CNN, mnist_corpus, path, layers=["conv9"])
    with pytest.raises(CorpusError, match="needs a target column"):
        inntrospect.extract(CNN, mnist_corpus_no_target, path, gradient_target="target")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    np.save(wrong / "a.npy", np.zeros((4, 28, 28), np.float32))
    (wrong / "corpus.csv").write_text("a.npy,g\n")
    with pytest.raises(CorpusError, match=r"shape \(28, 28\), but .*expects inputs of shape \(28, 28, 1\)"):
        inntrospect.extract(CNN, wrong, path)
    with pytest.raises(ModelError, match="not found"):
        inntrospect.extract(tmp_path / "nope.keras", mnist_corpus, path)
    with pytest.raises(ModelError, match="neither an existing model path nor a keras.applications"):
        inntrospect.extract("NoSuchNet", mnist_corpus, path)
    assert not path.exists()  # nothing was written by any of these
    nan = nan_corpus(tmp_path / "nan")
    with pytest.raises(NonFiniteError, match=r"input of sample 100 \(a.npy, index 100\)"):
        inntrospect.extract(CNN, nan, path, chunk_mib=0.1, batch_size=32)
    assert inntrospect.open_store(path, allow_incomplete=True).attrs["extraction"]["state"] == "incomplete"
    with pytest.raises(IncompleteStoreError):
        inntrospect.open_store(path)
