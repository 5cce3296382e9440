"""The command line: fast help without TensorFlow, dry run, extract, info, errors, demo."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import inntrospect
from inntrospect.cli import main

from .conftest import CNN, needs_shared, python_env, write_config


def test_help_and_import_do_not_load_tensorflow():
    code = (
        "import sys\nfrom inntrospect.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "import inntrospect\n"
        "print('LOADED', 'tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=python_env(), timeout=120)
    assert "extract" in res.stdout and "demo" in res.stdout and "info" in res.stdout
    assert "LOADED False False" in res.stdout


def test_main_collects_cycles_rarely_and_restores_the_thresholds(monkeypatch):
    """A command runs with the cycle collector's first threshold at least 70,000 (its imports made
    it run ~100 ms per command), and the caller's thresholds come back afterwards, error or not."""
    import gc

    from inntrospect import cli

    seen = []
    monkeypatch.setattr(cli, "_main", lambda argv: seen.append(gc.get_threshold()) or 0)
    before = gc.get_threshold()
    assert main([]) == 0
    assert seen[0][0] >= 70_000 and seen[0][1:] == before[1:]
    assert gc.get_threshold() == before

    def boom(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_main", boom)
    with pytest.raises(RuntimeError, match="boom"):
        main([])
    assert gc.get_threshold() == before


def test_the_console_command_exits_without_walking_its_objects(monkeypatch):
    """``inntrospect`` (the console script, ``python -m inntrospect``) returns main's code with the
    objects frozen out of the collector: Python's exit then skips 0.17 s of collecting them."""
    import gc

    from inntrospect import cli

    monkeypatch.setattr(cli, "main", lambda argv=None: 3)
    gc.unfreeze()
    try:
        assert cli.console() == 3
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    res = subprocess.run([sys.executable, "-m", "inntrospect", "--help"], capture_output=True, text=True,
                         env=python_env(), timeout=120)
    assert res.returncode == 0 and "usage: inntrospect" in res.stdout


def extract_config(tmp_path, corpus):
    return write_config(tmp_path, {
        "model": {"path": CNN, "layers": ["conv2d_25"]}, "corpus": {"path": corpus},
        "store": {"path": "out.zarr", "chunk_mib": 1}, "extract": {"batch_size": 64}})


@needs_shared
def test_dry_run_extract_info(tmp_path, mnist_corpus, capsys):
    pytest.importorskip("tensorflow")
    cfg = extract_config(tmp_path, mnist_corpus)
    assert main(["extract", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "600 samples in 10 files" in out
    assert "conv2d_25" in out and "(6, 6, 128)" in out and "acts+grads" in out
    assert "uncompressed: 25.9 MB" in out  # 600 x (2 x (3136 + 18432) + 40) bytes
    assert "estimated on disk" in out and "nothing written" in out
    assert not (tmp_path / "out.zarr").exists()

    assert main(["extract", str(cfg), "--no-progress"]) == 0
    assert "extracted 3 of 3 blocks" in capsys.readouterr().out
    tree = inntrospect.open_store(tmp_path / "out.zarr")
    assert tree["layers/conv2d_25"].acts.shape == (600, 6, 6, 128)

    assert main(["info", str(tmp_path / "out.zarr")]) == 0
    out = capsys.readouterr().out
    assert "extraction: complete" in out
    assert "conv2d_25" in out and "sample, y, x, unit" in out and "(600, 6, 6, 128)" in out
    assert "groups (10): 0 (" in out and "naps       not run (inntrospect naps CONFIG)" in out

    assert main(["extract", str(cfg), "--no-progress"]) == 0  # again: nothing left to do
    assert "extracted 0 of 3 blocks" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    cfg = write_config(tmp_path, {"model": {"path": "m.keras"}, "corpus": {"path": "nope.csv"},
                                  "store": {"path": "s.zarr"}})
    assert main(["extract", str(cfg)]) == 2
    assert "error: corpus file" in capsys.readouterr().err
    assert main(["info", str(tmp_path)]) == 2
    assert "not a Zarr store" in capsys.readouterr().err
    cfg = write_config(tmp_path, {"model": {"path": "m.keras"}, "corpus": {"path": "c.csv"},
                            "store": {"path": "s.zarr"}, "extract": {"gradient_target": "label"}})
    assert main(["extract", str(cfg)]) == 2
    assert "gradient_target must be 'predicted' or 'target', got 'label'" in capsys.readouterr().err


@needs_shared
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("tensorflow")
    from inntrospect.demo import run_demo

    path = run_demo(tmp_path / "demo", progress=False)
    out = capsys.readouterr().out
    assert "training accuracy" in out and str(path) in out
    tree = inntrospect.open_store(path)
    assert tree.attrs["layers"] == ["image", "conv1", "conv2", "dense", "logits"]
    node = tree["layers/conv2"]
    assert node.acts.shape == (1797, 3, 3, 32)
    accuracy = float((node.prediction == node.target).mean())
    assert accuracy > 0.9  # a trained model, not noise
    assert np.isfinite(node.grads.values).all()
    assert node.acts.chunks is not None  # lazy
    means = node.acts.groupby("group").mean()  # works on the opened store as it comes
    labels = np.array([str(g) for g in node.group.values])
    acts = node.acts.values
    expected = np.stack([acts[labels == g].mean(axis=0) for g in sorted(set(labels))])
    np.testing.assert_allclose(means.values, expected, rtol=1e-5, atol=1e-6)
    # the analysis steps ran and are current; their NAPs are the aligned per-group means
    assert "most group-specific unit of layer 'dense'" in out
    for step in ("align", "naps", "contrast", "layout", "topomap", "projection"):
        assert f"{step:<10} current" in out
    assert set(inntrospect.load(path, "topomap")) == {"conv1", "conv2", "dense"}
    report = tmp_path / "demo" / "figures" / "report"
    for name in ("figures/topomap_conv1.png", "figures/topomap_dense.png", "figures/overview.png",
                 "figures/projection_dense.png", "index.html"):
        assert (report / name).stat().st_size > 1000, name
    profiles = inntrospect.load(path, "naps")
    aligned = inntrospect.load(path, "align")["conv2"].values
    expected = np.stack([aligned[labels == g].mean(axis=0) for g in sorted(set(labels))])
    np.testing.assert_allclose(profiles["conv2"].nap.values, expected, rtol=1e-5, atol=1e-6)
    assert set(inntrospect.load(path, "contrast")) == set(tree.attrs["layers"])
    assert (tmp_path / "demo" / "config.toml").is_file()


def test_analysis_steps_from_the_command_line(tmp_path, capsys):
    from inntrospect.testing import store_from_arrays

    rng = np.random.default_rng(0)
    x = rng.random((24, 3, 3, 2), np.float32)
    store_from_arrays(tmp_path / "s.zarr", {"conv": x, "dense": x[:, 0, 0]}, np.repeat(["cat", "dog", "eel"], 8),
                      grads={"conv": rng.standard_normal(x.shape)}, chunks=5)
    cfg = write_config(tmp_path, {"store": {"path": "s.zarr"}, "naps": {"aligned": True, "std": True},
                                  "contrast": {"groups": ["dog", "cat"], "weight_by_group_size": True}})
    assert main(["align", str(cfg), "--no-progress"]) == 0
    assert "aligned 1 layers with spatial axes (conv)" in capsys.readouterr().out
    assert main(["naps", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NAPs of 2 layers (aligned activations, with std)" in out and "cat (8), dog (8), eel (8)" in out
    assert main(["contrast", str(cfg), "--no-progress"]) == 0
    assert "for groups cat, dog" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "naps       current (2 layers; aligned=True, std=True" in out
    assert "contrast   current" in out
    rec = inntrospect.open_store(tmp_path / "s.zarr").attrs["steps"]
    assert rec["naps"]["inputs"]["align"] == rec["align"]["id"]  # read the persisted aligned arrays

    cfg = write_config(tmp_path, {"store": {"path": "s.zarr"}, "naps": {"aligned": False}})
    assert main(["naps", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s.zarr")]) == 0
    assert "contrast   STALE: the contrast results were computed from naps results" in capsys.readouterr().out
    cfg = write_config(tmp_path, {"store": {"path": "s.zarr"}, "contrast": {"groups": ["dog", "bird"]}})
    assert main(["contrast", str(cfg), "--no-progress"]) == 2
    assert "unknown group 'bird'; the groups are: cat, dog, eel." in capsys.readouterr().err
    cfg = write_config(tmp_path, {"store": {"path": "s.zarr"}, "naps": {"aligned": 1}})  # not a bool
    assert main(["naps", str(cfg)]) == 2
    assert "[naps] aligned must be bool, got 1" in capsys.readouterr().err


def test_topomap_projection_plot_and_report_commands(tmp_path, capsys, caplog):
    from inntrospect.testing import store_from_arrays

    rng = np.random.default_rng(1)
    x = rng.random((60, 2, 2, 20), np.float32)
    groups = np.repeat(["cat", "dog", "eel"], 20)
    x[groups == "cat", ..., :10] += 1
    store_from_arrays(tmp_path / "s.zarr", {"conv": x, "small": x[:, 0, 0, :5]}, groups, chunks=16)
    cfg = write_config(tmp_path, {
        "store": {"path": "s.zarr"}, "topomap": {"method": "pca", "resolution": 32, "compare": ["pca", "random"]},
        "projection": {"samples_per_group": 10}, "plot": {"format": "svg", "output": "out"}})
    assert main(["layout", str(cfg), "--no-progress"]) == 2
    assert "no contrast results yet. Run inntrospect contrast CONFIG" in capsys.readouterr().err
    assert main(["naps", str(cfg), "--no-progress"]) == 0
    assert main(["contrast", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["layout", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "topomaps (pca layout, euclidean distance, profiles from contrast)" in out
    assert "conv" in out and "no topomap for layer 'small': 5 units" in caplog.text
    assert inntrospect.load(tmp_path / "s.zarr", "topomap")["conv"].image.shape == (3, 32, 32)
    assert main(["compare-layouts", str(cfg), "--no-progress"]) == 0
    table = pd.read_csv(tmp_path / "out" / "compare_layouts.csv")
    assert list(table.method) == ["pca", "random"] and set(table.layer) == {"conv"}
    assert main(["project", str(cfg), "--no-progress"]) == 0
    assert "instance projections of 2 layers (10 random samples per group)" in capsys.readouterr().out
    assert main(["plot", str(cfg), "--no-progress"]) == 0
    assert (tmp_path / "out" / "topomap_conv.svg").read_text().lstrip().startswith("<")
    assert (tmp_path / "out" / "projection_conv.svg").is_file()
    assert main(["report", str(cfg), "--no-progress"]) == 0
    html = (tmp_path / "out" / "report" / "index.html").read_text()
    assert "compare" in html.lower() and "random" in html
    cfg = write_config(tmp_path, {"store": {"path": "s.zarr"}, "topomap": {"method": "umapp"}})
    assert main(["layout", str(cfg)]) == 2
    assert "[topomap] method must be one of 'umap', 'tsne'" in capsys.readouterr().err
