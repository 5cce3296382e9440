"""``inntrospect run``: every step in order on the real MNIST CNN, skipping what is current."""

from __future__ import annotations

import numpy as np
import pytest

import inntrospect
from inntrospect.cli import main
from inntrospect.errors import ConfigError
from inntrospect.pipeline import run

from .conftest import CNN, needs_shared, pipeline_sections, write_config


def _config(tmp_path, corpus, method="pca"):
    return write_config(tmp_path, pipeline_sections(CNN, corpus, method))


@needs_shared
def test_run_does_every_step_once_then_only_what_changed(tmp_path, mnist_corpus):
    pytest.importorskip("tensorflow")
    cfg = _config(tmp_path, mnist_corpus)
    lines = []
    done = run(cfg, progress=False, echo=lines.append)
    assert done == {s: "ran" for s in ("extract", "align", "naps", "exemplars", "contrast", "layout",
                                       "topomap", "projection", "plots", "report")}
    path = tmp_path / "run.zarr"
    # the results are those of the steps run one by one
    tree = inntrospect.open_store(path)
    node = tree["layers/conv2d_25"]
    labels = np.array([str(g) for g in node.group.values])
    aligned = inntrospect.load(path, "align")["conv2d_25"].values
    want = np.stack([aligned[labels == g].mean(0) for g in sorted(set(labels))])
    np.testing.assert_allclose(inntrospect.load(path, "naps")["conv2d_25"].nap.values, want, rtol=1e-5)
    assert inntrospect.load(path, "topomap")["conv2d_25"].image.shape == (10, 40, 40)
    assert (tmp_path / "out" / "report" / "index.html").is_file()
    assert (tmp_path / "out" / "topomap_conv2d_25.png").stat().st_size > 1000

    # again: nothing but the (cheap) figures is redone
    ids = {s: r["id"] for s, r in tree.attrs["steps"].items()}
    done = run(cfg, progress=False, echo=lines.append)
    assert [s for s, how in done.items() if how == "ran"] == ["extract", "plots", "report"]
    after = inntrospect.open_store(path).attrs
    assert {s: r["id"] for s, r in after["steps"].items()} == ids
    assert after["extraction"]["id"] == tree.attrs["extraction"]["id"]  # resumed, not redone

    # another layout method: layout and what follows it, not the NAPs
    cfg = _config(tmp_path, mnist_corpus, method="som")  # the same file, rewritten
    done = run(cfg, progress=False, echo=lines.append)
    assert done["naps"] == done["contrast"] == done["projection"] == "current"
    assert done["layout"] == done["topomap"] == "ran"
    assert inntrospect.load(path, "topomap")["conv2d_25"].attrs["params"]["method"] == "som"

    # --from contrast: contrast and everything after it
    assert main(["run", str(cfg), "--from", "contrast", "--no-progress"]) == 0
    now = inntrospect.open_store(path).attrs["steps"]
    assert now["naps"]["id"] == ids["naps"]
    assert now["contrast"]["id"] != ids["contrast"] and now["projection"]["id"] != ids["projection"]
    assert "current, kept" in "\n".join(lines)


def test_unknown_from_step_is_refused(tmp_path):
    cfg = write_config(tmp_path, {"store": {"path": "s.zarr"}})
    with pytest.raises(ConfigError, match="unknown step 'napz' for --from; the steps are: extract"):
        run(cfg, from_step="napz", progress=False)


def test_reference_toolbox_json_configs_are_read_as_they_are(tmp_path, monkeypatch):
    import json

    from inntrospect.config import load_config

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "configs" / "MNIST_CNN_SHALLOW.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({
        "model_path": "models/MNIST_CNN_SHALLOW", "layer_names_of_interest": ["conv2d_24", "flatten_8"],
        "data_path": "data/MNIST/", "processed_corpus_path": "output/MNIST_CNN/", "use_aligned_naps": True}))
    c = load_config(cfg)
    assert c.extract_kwargs()["model"] == str(tmp_path / "models" / "MNIST_CNN_SHALLOW")  # cwd-relative
    assert c.extract_kwargs()["layers"] == ["conv2d_24", "flatten_8"]
    assert c.extract_kwargs()["corpus"] == str(tmp_path / "data" / "MNIST" / "corpus.csv")
    assert str(c.store_path()) == str(tmp_path / "output" / "MNIST_CNN.zarr")
    assert c.plot_output() == tmp_path / "output" / "MNIST_CNN_figures"
    assert c.naps_kwargs()["aligned"] is True
    cfg.write_text(json.dumps({"model_name": "VGG16", "data_path": "d", "processed_corpus_path": "o",
                               "use_aligned_naps": False}))
    assert load_config(cfg).extract_kwargs()["model"] == "VGG16"
    cfg.write_text(json.dumps({"model_path": "m", "use_aligned_nap": True}))
    with pytest.raises(ConfigError, match="unknown key.*'use_aligned_nap'.*known keys: model_path"):
        load_config(cfg)
    cfg.write_text(json.dumps({"model_path": "m", "use_aligned_naps": "yes"}))
    with pytest.raises(ConfigError, match="aligned must be bool"):
        load_config(cfg)


@needs_shared
def test_json_config_runs_the_pipeline_steps(tmp_path, mnist_corpus, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "MNIST_CNN_SHALLOW.json"
    cfg.write_text(json.dumps({"model_path": str(CNN), "layer_names_of_interest": ["conv2d_25"],
                               "data_path": str(mnist_corpus.parent), "processed_corpus_path": "out",
                               "use_aligned_naps": True}))
    assert main(["extract", str(cfg), "--no-progress"]) == 0
    assert main(["naps", str(cfg), "--no-progress"]) == 0
    assert "NAPs of 3 layers (aligned activations, with std)" in capsys.readouterr().out
    assert (tmp_path / "out.zarr").is_dir()


@needs_shared
def test_run_from_a_script_without_a_main_guard(tmp_path, mnist_corpus):
    """The processes run() spawns do not run the caller's script again (as multiprocessing would)."""
    import subprocess
    import sys

    from .conftest import python_env

    pytest.importorskip("tensorflow")
    cfg = _config(tmp_path, mnist_corpus)
    script = tmp_path / "run_it.py"
    script.write_text("import inntrospect\nprint('SCRIPT RAN')\n"
                      f"inntrospect.run({str(cfg)!r}, progress=False)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         env=python_env(), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("SCRIPT RAN") == 1
    assert "projection done" in res.stdout and "report     done" in res.stdout
    assert inntrospect.store.store_attrs(tmp_path / "run.zarr")["steps"]["projection"]["state"] == "complete"
