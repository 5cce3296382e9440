"""PyTorch extraction on a small CNN trained here on the real MNIST test set.

Activations equal direct torch calls, gradients equal per-sample autograd
(REFERENCE.md §2), arrays are stored channels-last with the conversion
recorded, mistakes raise errors that name the fix, and ``inntrospect run``
and a real process cluster work from a factory and its ``state_dict`` file.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

import inntrospect
from inntrospect import ConfigError, CorpusError, LayerNotFoundError, ModelError
from inntrospect.config import load_config
from inntrospect.extraction.corpus import write_corpus
from inntrospect.extraction.local import prepare_extraction
from inntrospect.extraction.models import model_source, open_model, torch_source

from ..conftest import python_env, write_config

torch = pytest.importorskip("torch")

#: the model's factory file, written beside its weights
NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.relu1 = nn.ReLU(inplace=True)  # changes conv1's output in place
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(0.5)  # off in eval mode
        self.fc = nn.Linear(16 * 11 * 11, 10)

    def forward(self, x):
        h = self.pool(self.relu1(self.conv1(x)))
        return self.fc(self.dropout(self.flatten(self.relu2(self.conv2(h)))))


def make_model():
    return Net()


class Twice(nn.Module):  # one ReLU module used twice
    def __init__(self):
        super().__init__()
        self.a, self.b, self.act = nn.Linear(784, 20), nn.Linear(20, 10), nn.ReLU()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x.flatten(1)))))


class Pair(nn.Module):  # a layer returning a tuple
    def __init__(self):
        super().__init__()
        self.lstm, self.fc = nn.LSTM(28, 6, batch_first=True), nn.Linear(6, 10)

    def forward(self, x):
        out, _ = self.lstm(x[:, 0])
        return self.fc(out[:, -1])


def make_twice():
    return Twice()


def make_pair():
    return Pair()


def not_a_model():
    return 42


NOT_CALLABLE = 3
'''
LAYERS = ["conv1", "relu1", "conv2", "flatten"]
STORED = ["input", *LAYERS, "fc"]  # the input and output layer added, in model order
N, BATCH = 600, 50  # batches straddle the 77-sample files and the chunks


@pytest.fixture(scope="module")
def net(tmp_path_factory, mnist_arrays):
    """``(folder, trained module)``: ``net.py`` and ``model.pt`` of a CNN trained for a few seconds
    on MNIST test images 1000..9999, and a corpus ``corpus/corpus.csv`` of the first 600 (n, 1, 28, 28)."""
    x, y = mnist_arrays
    folder = tmp_path_factory.mktemp("torchnet")
    (folder / "net.py").write_text(NET)
    namespace: dict = {}
    exec(compile(NET, str(folder / "net.py"), "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["make_model"]()
    xs = torch.from_numpy(x[1000:].astype(np.float32)[:, None] / 255.0)
    ys = torch.from_numpy(y[1000:].astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(1):  # one epoch: a few seconds, ~95 % accuracy
        for idx in torch.randperm(len(xs), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx]).backward()
            opt.step()
    model.eval()
    torch.save(model.state_dict(), folder / "model.pt")
    write_corpus(x[:N].astype(np.float32)[:, None] / 255.0, y[:N], folder / "corpus", targets=y[:N],
                 per_file=77)
    return folder, model


@pytest.fixture(scope="module")
def factory_store(net, tmp_path_factory):
    folder, _ = net
    path = tmp_path_factory.mktemp("torchstore") / "s.zarr"
    inntrospect.extract(f"{folder / 'net.py'}:make_model", folder / "corpus", path, layers=LAYERS,
                        weights=folder / "model.pt", chunk_mib=0.5, batch_size=BATCH)
    return path


def corpus_arrays(folder):
    rows = [line.split(",") for line in (folder / "corpus" / "corpus.csv").read_text().splitlines()]
    x = np.concatenate([np.load(folder / "corpus" / f) for f, _, _ in rows])
    labels = np.concatenate([[int(t)] * len(np.load(folder / "corpus" / f)) for f, _, t in rows])
    return x, labels


def manual(model, x):
    """The forward step by step by direct submodule calls, every layer's output kept."""
    outs = {}
    h = outs["conv1"] = model.conv1(x)
    h = outs["relu1"] = torch.relu(h)  # not in place: conv1's output stays
    h = outs["conv2"] = model.conv2(model.pool(h))
    h = outs["flatten"] = model.flatten(model.relu2(h))
    outs["fc"] = model.fc(model.dropout(h))
    return outs


def per_sample_grads(model, x, targets):
    """d output[t] / d layer, one torch.autograd.grad per sample: input first, then LAYERS."""
    result = {name: [] for name in ["input", *LAYERS]}
    for xi, ti in zip(x, targets):
        xt = torch.from_numpy(xi[None]).requires_grad_(True)
        outs = manual(model, xt)
        grads = torch.autograd.grad(outs["fc"][0, int(ti)], [xt, *(outs[n] for n in LAYERS)])
        for name, g in zip(result, grads):
            result[name].append(g[0].numpy())
    return {k: np.stack(v) for k, v in result.items()}


def last(a):
    """Channels first -> last, as the store holds it."""
    return np.moveaxis(a, 1, -1) if a.ndim >= 3 else a


def store_array(path, layer, var):
    return zarr.open_array(str(path), path=f"layers/{layer}/{var}")[:]


@pytest.mark.parametrize("target", ["predicted", "target"])
def test_acts_and_grads_equal_direct_torch(net, factory_store, tmp_path, target):
    folder, model = net
    if target == "predicted":
        path = factory_store
    else:
        path = tmp_path / "t.zarr"
        inntrospect.extract(f"{folder / 'net.py'}:make_model", folder / "corpus", path, layers=LAYERS,
                            weights=folder / "model.pt", chunk_mib=0.5, batch_size=BATCH,
                            gradient_target="target")
    tree = inntrospect.open_store(path)
    assert tree.attrs["layers"] == STORED
    x, labels = corpus_arrays(folder)
    model.eval()
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in manual(model, torch.from_numpy(x)).items()}
    np.testing.assert_array_equal(store_array(path, "input", "acts"), last(x))
    for name in [*LAYERS, "fc"]:
        want = last(ref[name])
        np.testing.assert_allclose(store_array(path, name, "acts"), want, rtol=1e-6,
                                   atol=1e-6 * np.abs(want).max(), err_msg=name)
    pred = ref["fc"].argmax(1)
    np.testing.assert_array_equal(tree["layers/conv1"].prediction.values, pred)
    wrong = np.flatnonzero(pred != labels)
    assert 0 < len(wrong) < 0.2 * N, "the trained CNN should be good, and wrong on a few samples"
    pick = np.concatenate([wrong[:8], np.arange(0, N, 97)])
    grads = per_sample_grads(model, x[pick], (pred if target == "predicted" else labels)[pick])
    for name, want in grads.items():
        want = last(want)
        np.testing.assert_allclose(store_array(path, name, "grads")[pick], want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max(), err_msg=name)
    assert "grads" not in tree["layers/fc"]  # none for the output layer


def test_stored_channels_last_with_the_conversion_recorded(factory_store, net):
    folder, _ = net
    tree = inntrospect.open_store(factory_store)
    conv = tree["layers/conv1"].acts
    assert conv.dims == ("sample", "y", "x", "unit") and conv.shape == (N, 26, 26, 8)
    assert tree["layers/input"].acts.shape == (N, 28, 28, 1)
    assert tree["layers/flatten"].acts.dims == ("sample", "unit")
    model = tree.attrs["model"]
    assert model["framework"] == "torch" and model["versions"]["torch"] == torch.__version__
    assert model["factory"] == f"{folder / 'net.py'}:make_model" and len(model["sha256"]) == 64
    layout = model["layout"]
    assert (layout["torch"], layout["stored"]) == ("channels_first", "channels_last")
    assert layout["layers"]["conv1"] == {"torch_shape": [8, 26, 26], "axes": [1, 2, 0]}
    assert layout["layers"]["input"] == {"torch_shape": [1, 28, 28], "axes": [1, 2, 0]}
    assert layout["layers"]["flatten"] == {"torch_shape": [1936], "axes": [0]}
    means = tree["layers/conv2"].acts.groupby("group").mean()  # plain xarray, as for Keras
    assert means.dims == ("group", "y", "x", "unit") and means.shape == (10, 11, 11, 16)


def test_module_object_equals_factory_and_is_left_as_it_was(net, factory_store, tmp_path):
    folder, model = net
    model.train()  # the user's module, in training mode: extracted in eval mode, then as it was
    tree = inntrospect.extract(model, folder / "corpus", tmp_path / "m.zarr", layers=LAYERS,
                               chunk_mib=0.5, batch_size=BATCH)
    assert model.training and model.dropout.training
    assert not any(m._forward_hooks for m in model.modules())  # no hook left behind
    assert tree.attrs["model"]["name"].endswith("Net") and tree.attrs["model"]["sha256"]
    for name in STORED:  # the factory's model runs in channels_last memory format, this one not
        for var in ("acts", "grads") if name != "fc" else ("acts",):
            want = store_array(factory_store, name, var)
            np.testing.assert_allclose(store_array(tmp_path / "m.zarr", name, var), want, rtol=1e-6,
                                       atol=1e-6 * np.abs(want).max(), err_msg=f"{name}/{var}")
    model.eval()


def test_batching_and_padding_change_nothing(net):
    folder, _ = net
    m = open_model(model_source(f"{folder / 'net.py'}:make_model", folder / "model.pt"), ["conv2"])
    x, _ = corpus_arrays(folder)
    m.fix_shapes(x.shape[1:])
    assert [i.name for i in m.layers] == ["input", "conv2", "fc"] and m.n_outputs == 10
    assert m.input_shape == (1, 28, 28) and m.layers[1].shape == (11, 11, 16)
    acts, grads, pred = m.compute(x[:20])
    acts3, grads3, pred3 = m.compute(x[:3], targets=np.array([-1, 4, -1]), pad_to=20)
    assert [a.shape[0] for a in acts3 + grads3] == [3] * 5 and pred3.dtype == np.int64
    np.testing.assert_array_equal(pred3, pred[:3])
    for a, b in zip(acts3, acts):
        np.testing.assert_allclose(a, b[:3], rtol=1e-6, atol=1e-6)
    for k in (0, 2):  # argmax targets: the same gradients; sample 1 asked for output 4
        np.testing.assert_allclose(grads3[0][k], grads[0][k], rtol=1e-5, atol=1e-7)
    if pred[1] != 4:
        assert not np.allclose(grads3[1][1], grads[1][1])
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in acts3 + grads3)


def test_output_changed_after_the_last_module_is_the_layer_output(net):
    folder, model = net

    class LogSoftmax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return torch.log_softmax(self.net(x), dim=1)

    m = open_model(model_source(LogSoftmax()), ["net.fc"])
    x, _ = corpus_arrays(folder)
    m.fix_shapes(x.shape[1:])
    assert [(i.name, i.has_grads) for i in m.layers] == [("input", True), ("net.fc", True),
                                                          ("output", False)]
    acts, grads, pred = m.compute(x[:10])
    with torch.no_grad():
        logits = model(torch.from_numpy(x[:10])).numpy()
    np.testing.assert_allclose(acts[1], logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.exp(acts[2]).sum(1), 1, rtol=1e-5)
    # d log_softmax_t / d logits = onehot(t) - softmax
    want = np.eye(10)[pred] - np.exp(acts[2])
    np.testing.assert_allclose(grads[1], want, rtol=1e-5, atol=1e-6)
    nested = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Sequential(torch.nn.Linear(784, 10)))
    m = open_model(model_source(nested), ["1"])  # the container "1" and its child "1.0" return it
    m.fix_shapes(x.shape[1:])
    assert [i.name for i in m.layers] == ["input", "1", "1.0"]


def test_mistakes_raise_errors_naming_the_fix(net, tmp_path):
    folder, _ = net
    csv, spec, w = folder / "corpus", f"{folder / 'net.py'}:make_model", folder / "model.pt"
    path = tmp_path / "bad.zarr"
    with pytest.raises(LayerNotFoundError, match=r"no layer named 'conv9'.*input, conv1, relu1, pool"):
        inntrospect.extract(spec, csv, path, layers=["conv9"], weights=w)
    with pytest.raises(ModelError, match=r"net.py is a Python file, not a model: give .*net.py:function"):
        inntrospect.extract(str(folder / "net.py"), csv, path)
    with pytest.raises(ModelError, match="'nets.py' is not a torch model factory"):
        inntrospect.extract("nets.py", csv, path)
    with pytest.raises(ModelError, match=r"weights file .*nope.pt does not exist"):
        inntrospect.extract(spec, csv, path, weights=folder / "nope.pt")
    with pytest.raises(ModelError, match="factory file .*none.py .*does not exist"):
        inntrospect.extract(f"{folder / 'none.py'}:make_model", csv, path)
    with pytest.raises(ModelError, match=r"has no 'make_modle'.*make_model"):
        inntrospect.extract(f"{folder / 'net.py'}:make_modle", csv, path)
    with pytest.raises(ModelError, match="returned a int, not a torch.nn.Module"):
        inntrospect.extract(f"{folder / 'net.py'}:not_a_model", csv, path)
    with pytest.raises(ModelError, match="'NOT_CALLABLE' is a int, not a function"):
        inntrospect.extract(f"{folder / 'net.py'}:NOT_CALLABLE", csv, path)
    with pytest.raises(ModelError, match="cannot import the module 'no_such_pkg.nets'"):
        inntrospect.extract("no_such_pkg.nets:make_model", csv, path)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match="do not fit the model"):
        inntrospect.extract(spec, csv, path, weights=tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"layer 'act' .* used more than once .*\(2 calls\)"):
        inntrospect.extract(f"{folder / 'net.py'}:make_twice", csv, path, layers=["act"])
    with pytest.raises(ModelError, match="layer 'lstm' .* returns a tuple, not a single tensor"):
        inntrospect.extract(f"{folder / 'net.py'}:make_pair", csv, path, layers=["lstm"])
    keras_layout = tmp_path / "k"
    keras_layout.mkdir()
    np.save(keras_layout / "a.npy", np.zeros((4, 28, 28, 1), np.float32))  # channels last: refused
    (keras_layout / "corpus.csv").write_text("a.npy,g\n")
    with pytest.raises(CorpusError, match=r"cannot take the corpus's samples of shape \(28, 28, 1\)"):
        inntrospect.extract(spec, keras_layout, path, weights=w)
    assert not path.exists()  # nothing was written by any of these


def test_config_torch_model(net, tmp_path, monkeypatch):
    folder, _ = net
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "net.py").write_text(NET)
    (tmp_path / "m" / "model.pt").write_bytes((folder / "model.pt").read_bytes())

    def kwargs(model, **more):
        return load_config(write_config(tmp_path, {"model": model, "corpus": {"path": folder / "corpus"},
                                                   "store": {"path": "s.zarr"}, **more})).extract_kwargs()

    kw = kwargs({"torch": "m/net.py:make_model", "weights": "m/model.pt", "layers": ["conv2"]})
    source = kw["model"]  # both relative to the config's folder
    assert source.factory == f"{tmp_path / 'm' / 'net.py'}:make_model" and kw["weights"] is None
    assert source.weights == tmp_path / "m" / "model.pt"
    ex = prepare_extraction(**kw)
    assert [i.name for i in ex.model.layers] == ["input", "conv2", "fc"]
    assert ex.request["model"] == source  # what the workers build the model from
    for model, match in [
        ({"torch": "m/net.py:make_model", "path": "x.keras"}, "exactly one of .*got 'path' and 'torch'"),
        ({"torch": "m/net.py", "weights": "m/model.pt"}, r"\[model\] 'm/net.py' is not a torch model factory"),
        ({"torch": "m/net.py:make_model", "weights": "m/none.pt"}, r"\[model\] the weights file .*none.pt does not"),
        ({"torch": "m/none.py:make_model"}, r"factory file .*none.py .*relative to the config's folder"),
        ({"torch": "m/net.py:make_model", "weights": "c.toml"}, r"is not a .pt or .pth file"),
    ]:
        with pytest.raises(ConfigError, match=match):
            kwargs(model)
    for factory, match in [("m/net.py:missing", "has no 'missing'"), ("m/net.py:not_a_model", "returned a int")]:
        kw = kwargs({"torch": factory})  # found when the model is built: still the config's mistake
        with pytest.raises(ConfigError, match=rf"c.toml: \[model\] the torch factory .*{match}"):
            prepare_extraction(**kw)
    monkeypatch.delitem(sys.modules, "torch")  # as if PyTorch were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"PyTorch is not installed: pip install 'inntrospect\[torch\]'"):
        torch_source("m/net.py:make_model", base=tmp_path, config=tmp_path / "c.toml")


def test_inntrospect_run_end_to_end(net, mnist_arrays, tmp_path):
    """``python -m inntrospect run`` from a config of a torch factory and its state_dict."""
    folder, _ = net
    x, y = mnist_arrays
    write_corpus(x[:300].astype(np.float32)[:, None] / 255.0, y[:300], tmp_path / "corpus",
                 targets=y[:300], per_file=100)
    (tmp_path / "net.py").write_text(NET)
    (tmp_path / "model.pt").write_bytes((folder / "model.pt").read_bytes())
    cfg = write_config(tmp_path, {
        "model": {"torch": "net.py:make_model", "weights": "model.pt", "layers": ["conv2"]},
        "corpus": {"path": "corpus/corpus.csv"},
        "store": {"path": "run.zarr", "chunk_mib": 1},
        "naps": {"aligned": True},
        "topomap": {"method": "pca", "resolution": 40},
        "projection": {"samples_per_group": 10},
        "plot": {"output": "out"},
    })
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "inntrospect", "run", str(cfg), "--no-progress"],
                         capture_output=True, text=True, env=python_env(), timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    print(f"inntrospect run: {time.perf_counter() - t0:.1f} s")
    tree = inntrospect.open_store(tmp_path / "run.zarr")
    assert tree.attrs["model"]["framework"] == "torch" and tree.attrs["layers"] == ["input", "conv2", "fc"]
    assert inntrospect.load(tmp_path / "run.zarr", "topomap")["conv2"].image.shape == (10, 40, 40)
    assert (tmp_path / "out" / "topomap_conv2.png").stat().st_size > 1000
    report = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "net.py:make_model" in report


def test_extraction_on_a_process_cluster_equals_local(net, factory_store, tmp_path):
    """Two worker processes build the model from the factory and weights; the arrays are the local ones."""
    distributed = pytest.importorskip("distributed")
    folder, model = net
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        tree = inntrospect.extract(f"{folder / 'net.py'}:make_model", folder / "corpus",
                                   tmp_path / "c.zarr", layers=LAYERS, weights=folder / "model.pt",
                                   chunk_mib=0.5, batch_size=BATCH, where="cluster")
        with pytest.raises(ConfigError, match="object in this process and cannot be built on the cluster"):
            inntrospect.extract(model, folder / "corpus", tmp_path / "o.zarr", layers=LAYERS, where="cluster")

        def loads():
            from inntrospect.extraction.distributed import MODEL_LOADS

            return MODEL_LOADS["count"]

        assert sum(client.run(loads).values()) >= 1  # the workers built the model
    assert tree.attrs["extraction"]["state"] == "complete"
    for name in STORED:
        for var in ("acts", "grads", "prediction") if name != "fc" else ("acts", "prediction"):
            np.testing.assert_allclose(store_array(tmp_path / "c.zarr", name, var),
                                       store_array(factory_store, name, var), rtol=1e-6, atol=1e-7,
                                       err_msg=f"{name}/{var}")


def test_benchmark_runs_quick(mnist_arrays):
    """``benchmarks/bench_extract_torch.py --quick`` keeps working (its numbers are not checked)."""
    from ..conftest import ROOT

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_extract_torch.py"), "--quick"],
                         capture_output=True, text=True, env=python_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    for label in ("(a-1) bare torch, 1 thread", "(c) run_extraction", "c/s        =", "model.compute"):
        assert label in res.stdout, res.stdout
