"""Model formats: Keras 3 .keras/.h5, keras.applications by name, channels-first refusal."""

from __future__ import annotations

import numpy as np
import pytest

import inntrospect
from inntrospect import ModelError

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")


def small_model(data_format="channels_last"):
    keras.utils.set_random_seed(1)
    shape = (6, 6, 2) if data_format == "channels_last" else (2, 6, 6)
    inp = keras.Input(shape, name="pixels")
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv", data_format=data_format)(inp)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(h)
    out = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inp, out)


def corpus(tmp_path, shape, n=(7, 5), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i, k in enumerate(n):
        np.save(tmp_path / f"b{i}.npy", rng.random((k, *shape), dtype=np.float32))
        rows.append(f"b{i}.npy,g{i},{i}")
    (tmp_path / "corpus.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "corpus.csv", np.concatenate([np.load(tmp_path / f"b{i}.npy") for i in range(len(n))])


def reference(model, x, names, targets=None):
    sub = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    acts = [a.numpy() for a in sub(x, training=False)]
    t = acts[-1].argmax(1) if targets is None else targets
    grads = []
    for i in range(len(x)):
        xi = tf.constant(x[i : i + 1])
        with tf.GradientTape() as tape:
            tape.watch(xi)
            outs = sub(xi, training=False)
            y = outs[-1][0, int(t[i])]
        grads.append([g.numpy()[0] for g in tape.gradient(y, [xi, *outs[:-1]])])
    return acts, [np.stack([g[k] for g in grads]) for k in range(len(names))]


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_files(tmp_path, suffix):
    model = small_model()
    path = tmp_path / f"m{suffix}"
    model.save(path)
    csv, x = corpus(tmp_path, (6, 6, 2))
    tree = inntrospect.extract(path, csv, tmp_path / "s.zarr", layers=["hidden", "conv"],
                               gradient_target="target", batch_size=4)
    assert tree.attrs["layers"] == ["pixels", "conv", "hidden", "out"]
    targets = np.array([0] * 7 + [1] * 5)
    acts, grads = reference(model, x, ["conv", "hidden", "out"], targets)
    for name, ref in zip(["conv", "hidden", "out"], acts):
        np.testing.assert_allclose(tree[f"layers/{name}"].acts.values, ref, rtol=1e-6, atol=1e-7)
    for name, ref in zip(["pixels", "conv", "hidden"], grads):
        np.testing.assert_allclose(tree[f"layers/{name}"].grads.values, ref, rtol=1e-5, atol=1e-7)
    assert tree["layers/conv"].acts.dims == ("sample", "y", "x", "unit")


def test_keras_applications_by_name_with_local_weights(tmp_path):
    built = keras.applications.MobileNetV3Small(weights=None)
    weights = tmp_path / "mnv3.weights.h5"
    built.save_weights(weights)
    csv, x = corpus(tmp_path, (224, 224, 3), n=(2, 1))
    tree = inntrospect.extract("MobileNetV3Small", csv, tmp_path / "s.zarr", weights=weights,
                               layers=["conv"], batch_size=2)
    out = built.layers[-1].name
    first, *rest = tree.attrs["layers"]
    assert first.startswith("input_layer") and rest == ["conv", out]  # input and output added
    assert tree.attrs["model"]["name"] == "MobileNetV3Small"
    expected = built(x * 255.0 / 255.0, training=False).numpy()
    np.testing.assert_allclose(tree[f"layers/{out}"].acts.values, expected, rtol=1e-5, atol=1e-6)


def test_channels_first_is_refused(tmp_path):
    path = tmp_path / "cf.keras"
    small_model("channels_first").save(path)
    csv, _ = corpus(tmp_path, (2, 6, 6))
    with pytest.raises(ModelError, match="channels_first.*assumes channels-last"):
        inntrospect.extract(path, csv, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


def test_model_path_errors(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "m.txt").write_text("x")
    csv, _ = corpus(tmp_path, (6, 6, 2))
    with pytest.raises(ModelError, match="without saved_model.pb"):
        inntrospect.extract(tmp_path / "folder", csv, tmp_path / "s.zarr")
    with pytest.raises(ModelError, match="not a model file"):
        inntrospect.extract(tmp_path / "m.txt", csv, tmp_path / "s.zarr")
    with pytest.raises(ModelError, match="weights file .* not found"):
        inntrospect.extract("VGG16", csv, tmp_path / "s.zarr", weights=tmp_path / "none.h5")
