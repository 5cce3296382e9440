"""The tests' shared config writer (``conftest.write_config``): what it writes reads back as given."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from .conftest import CNN, pipeline_sections, toml_text, write_config


def test_sections_round_trip_through_tomllib(tmp_path):
    sections = {
        "store": {"path": Path("/data/s.zarr"), "chunk_mib": 0.25,
                  "storage_options": {"key": "k", "client_kwargs": {"region_name": "us-east-1"}}},
        "naps": {"aligned": True, "std": False},
        "topomap": {"method": "pca", "resolution": 32, "seed": -1, "compare": ["pca", "random"],
                    "from": "naps"},
        "odd": {"quote \"and\" back\\slash": 'tab\there\nnew line "q" \\ \x01 é', "empty": [],
                "mixed": [1, 2.5, True, "s"], "neg": -0.0},
    }
    cfg = write_config(tmp_path / "sub", sections)
    assert cfg == tmp_path / "sub" / "c.toml"
    got = tomllib.loads(cfg.read_text())
    want = {name: {k: (str(v) if isinstance(v, Path) else v) for k, v in table.items()}
            for name, table in sections.items()}
    assert got == want
    assert list(got) == list(sections) and list(got["topomap"]) == list(sections["topomap"])
    # the types as given: an int stays an int (not a bool, not a float), a float a float
    assert type(got["store"]["chunk_mib"]) is float and type(got["topomap"]["resolution"]) is int
    assert got["naps"]["aligned"] is True and math.copysign(1, got["odd"]["neg"]) == -1


def test_top_level_keys_come_first_and_text_is_appended(tmp_path):
    cfg = write_config(tmp_path, {"naps": {"aligned": 1}, "store": "run.zarr"},
                       text="# a <comment> & more\n", name="run.toml")
    assert cfg.name == "run.toml"
    assert cfg.read_text() == 'store = "run.zarr"\n[naps]\naligned = 1\n# a <comment> & more\n'
    assert tomllib.loads(cfg.read_text()) == {"store": "run.zarr", "naps": {"aligned": 1}}


def test_raw_text_only_and_non_finite_floats(tmp_path):
    assert write_config(tmp_path, text="[store\n").read_text() == "[store\n"
    assert write_config(tmp_path).read_text() == ""
    got = tomllib.loads(toml_text({"x": {"a": math.inf, "b": -math.inf, "c": math.nan}}))["x"]
    assert got["a"] == math.inf and got["b"] == -math.inf and math.isnan(got["c"])


def test_a_value_toml_cannot_hold_is_refused(tmp_path):
    with pytest.raises(TypeError, match="no TOML value for NoneType"):
        write_config(tmp_path, {"store": {"path": None}})


def test_pipeline_sections(tmp_path):
    corpus = tmp_path / "corpus.csv"
    a, b = pipeline_sections(CNN, corpus), pipeline_sections(CNN, corpus, "som", ["x", "y"])
    a["store"]["path"] = "elsewhere"  # a new dict each time
    assert pipeline_sections(CNN, corpus)["store"]["path"] == "run.zarr"
    got = tomllib.loads(write_config(tmp_path, b).read_text())
    assert list(got) == ["model", "corpus", "store", "naps", "topomap", "projection", "plot"]
    assert got["model"] == {"path": str(CNN), "layers": ["x", "y"]}
    assert got["corpus"] == {"path": str(corpus)} and got["topomap"] == {"method": "som", "resolution": 40}
    assert got["store"] == {"path": "run.zarr", "chunk_mib": 1} and got["naps"] == {"aligned": True}
