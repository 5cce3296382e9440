"""``inntrospect run``: every step in order on the real MNIST CNN, skipping what is current."""

from __future__ import annotations

import numpy as np
import pytest

import inntrospect
from inntrospect.cli import main
from inntrospect.errors import ConfigError
from inntrospect.pipeline import run

from .conftest import CNN, needs_shared

CONFIG = """\
[model]
path = "{model}"
layers = {layers}
[corpus]
path = "{corpus}"
[store]
path = "run.zarr"
chunk_mib = 1
[naps]
aligned = true
[topomap]
method = "{method}"
resolution = 40
[projection]
samples_per_group = 20
[plot]
output = "out"
"""


def _config(tmp_path, corpus, method="pca"):
    cfg = tmp_path / "c.toml"
    cfg.write_text(CONFIG.format(model=CNN, corpus=corpus, method=method, layers='["conv2d_25"]'))
    return cfg


@needs_shared
def test_run_does_every_step_once_then_only_what_changed(tmp_path, mnist_corpus):
    pytest.importorskip("tensorflow")
    cfg = _config(tmp_path, mnist_corpus)
    lines = []
    done = run(cfg, progress=False, echo=lines.append)
    assert done == {s: "ran" for s in ("extract", "align", "naps", "contrast", "layout", "topomap",
                                       "projection", "plots", "report")}
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
    cfg.write_text(cfg.read_text().replace('method = "pca"', 'method = "som"'))
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
    cfg = tmp_path / "c.toml"
    cfg.write_text('[store]\npath = "s.zarr"\n')
    with pytest.raises(ConfigError, match="unknown step 'napz' for --from; the steps are: extract"):
        run(cfg, from_step="napz", progress=False)
