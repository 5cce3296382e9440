"""The step registry: the pipeline, the step commands and the demo all run its steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xarray as xr

from inntrospect import demo, pipeline, registry
from inntrospect.cli import build_parser, main
from inntrospect.store import steps as store_steps

from .conftest import write_config


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """Every step's function replaced by one that records ``(step, options)`` and returns a stand-in."""
    made = []
    nap = xr.Dataset({"nap": (("group", "unit"), np.arange(6.0).reshape(2, 3))},
                     coords={"group": ["a", "b"]}, attrs={"layer": "dense"})
    index = tmp_path / "report" / "index.html"
    (index.parent / "figures").mkdir(parents=True)
    results = {"naps": {"dense": nap}, "contrast": {"dense": nap}, "report": index}

    def recorder(name):
        def run(cfg, path, progress, **options):
            made.append((name, options))
            return results.get(name, {})
        return run

    for name in registry.RUNNERS:
        monkeypatch.setitem(registry.RUNNERS, name, recorder(name))
    return made


def _config(tmp_path, aligned=True):
    return write_config(tmp_path, {"store": {"path": "s.zarr"}, "naps": {"aligned": aligned},
                                   "plot": {"output": "out"}})


def test_the_steps_are_in_dependency_order():
    assert pipeline.PIPELINE == tuple(registry.STEPS)
    seen = set()
    for name, step in registry.STEPS.items():
        assert step.name == name
        assert set(step.after) <= seen, f"{name} depends on {set(step.after) - seen}, not run before it"
        seen.add(name)
    assert registry.leading_to("report") == [s for s in pipeline.PIPELINE if s != "plots"]
    assert registry.leading_to("contrast") == ["extract", "align", "naps", "contrast"]


def test_the_registry_agrees_with_the_store_s_step_facts():
    """Steps that keep a record are the store's, in its order; its messages name their commands."""
    assert [s for s, step in registry.STEPS.items() if step.params is not None] == list(store_steps.STEPS)
    for name, command in store_steps.RERUN.items():
        assert command.startswith(f"inntrospect {registry.STEPS[name].command} CONFIG"), name
    assert all(step.params is None for step in registry.STEPS.values() if step.always)
    assert set(registry.RUNNERS) == set(registry.STEPS)


def test_every_step_command_comes_from_the_registry():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    commands = registry.commands()
    assert list(sub.choices) == [*commands, "compare-layouts", "run", "import-legacy", "info", "verify",
                                 "demo"]
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert all(helps[c] == steps[0].help for c, steps in commands.items())
    assert commands["layout"] == [registry.STEPS["layout"], registry.STEPS["topomap"]]


def test_a_step_command_runs_its_steps_and_prints_their_summaries(calls, tmp_path, monkeypatch, capsys):
    for name, step in registry.STEPS.items():
        if step.summary is not None:
            summary = dataclasses.replace(step, summary=lambda cfg, done, n=name: f"{n} after {list(done)}")
            monkeypatch.setitem(registry.STEPS, name, summary)
    cfg = _config(tmp_path)
    for command, steps in registry.commands().items():
        if command == "extract":  # its own command: --dry-run, --scheduler
            continue
        calls.clear()
        assert main([command, str(cfg), "--no-progress"]) == 0
        names = [s.name for s in steps]
        assert [name for name, _ in calls] == names
        assert capsys.readouterr().out == f"{names[-1]} after {names}\n"


def test_the_pipeline_and_the_demo_run_the_registry_s_steps_in_order(calls, tmp_path, monkeypatch, capsys):
    from distributed import LocalCluster

    with LocalCluster(processes=False, n_workers=1, protocol="tcp://", dashboard_address=":0") as cluster:
        # a scheduler of its own: every step runs in this process, none in another
        done = pipeline.run(_config(tmp_path), scheduler=cluster.scheduler_address, progress=False,
                            force=True, echo=lambda _: None)
        ran = [name for name, _ in calls]
        assert ran == list(done) == list(registry.STEPS)
        assert calls[0] == ("extract", {"overwrite": True, "append": False, "aside": None})
        calls.clear()
        done = pipeline.run(_config(tmp_path, aligned=False), scheduler=cluster.scheduler_address,
                            progress=False, echo=lambda _: None)
        assert done["align"] == "skipped" and "align" not in [name for name, _ in calls]

    monkeypatch.setattr(demo, "write_digits_corpus", lambda out: out / "corpus.csv")
    monkeypatch.setattr(demo, "train_digits_cnn", lambda path: 1.0)
    monkeypatch.setattr("inntrospect.store.info.describe_store", lambda path: "the store")
    calls.clear()
    (tmp_path / "demo").mkdir()
    demo.run_demo(tmp_path / "demo", progress=False)
    assert [name for name, _ in calls] == [s for s in ran if s in registry.leading_to("report")]
    assert all(options == {"overwrite": True} for _, options in calls)
    out = capsys.readouterr().out
    assert "most group-specific unit of layer 'dense'" in out
    assert "inntrospect extract|align|naps|exemplars|contrast|layout|project|plot|report" in out
