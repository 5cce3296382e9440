"""Every mistake a user can make on the command line ends in one line ``error: ...`` naming the fix.

Each case feeds the CLI a bad input (config, store, argument) and checks: a
failure exit code, exactly one non-empty line on standard error starting
with ``error:``, no traceback anywhere, and that the line says what to do.
No TensorFlow: the stores are small synthetic ones from
:mod:`inntrospect.testing`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import inntrospect
from inntrospect.cli import main
from inntrospect.testing import store_from_arrays

from .conftest import python_env, write_config

#: exit code of a handled error: ``main`` returns 2 for an InntrospectError, as argparse does
#: for usage errors
ERROR_EXIT = (2,)


def _store(path, nan: bool = False):
    """60 samples in 3 groups, one layer of 2 x 2 x 20 units; NaN in sample 0 if ``nan``."""
    rng = np.random.default_rng(3)
    x = rng.random((60, 2, 2, 20), np.float32)
    groups = np.repeat(["cat", "dog", "eel"], 20)
    x[groups == "cat", ..., :10] += 1
    if nan:
        x[0, 0, 0, 3] = np.nan
    store_from_arrays(path, {"conv": x}, groups, chunks=16)
    inntrospect.naps(path, persist=True)
    return path


class _Stores(dict):
    """``stores["good"]``: a store with NAPs; ``stores["nan"]``: one with NaN in its NAPs.

    Each is made on first use (cases without a store do not pay for one), then copied by each case.
    """

    def __init__(self, base):
        super().__init__()
        self.base = base

    def __missing__(self, key):
        self[key] = _store(self.base / f"{key}.zarr", nan=key == "nan")
        return self[key]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return _Stores(tmp_path_factory.mktemp("stores"))


def config(tmp_path, sections: dict | None = None, store: str | None = None, stores=None, *,
           text: str | None = None, name: str = "c.toml"):
    """Write a config (:func:`write_config`) beside a copy of ``stores[store]`` at ``s.zarr``; its path."""
    if store is not None:
        shutil.copytree(stores[store], tmp_path / "s.zarr")
    return str(write_config(tmp_path, sections, text=text, name=name))


STORE = {"store": {"path": "s.zarr"}}
LAYOUT = {**STORE, "topomap": {"method": "pca", "resolution": 16, "from": "naps"}}


def _bad_utf8(t, s):
    (t / "c.toml").write_bytes(b'\xff\xfe[store]\npath = "s.zarr"\n')
    return ["naps", str(t / "c.toml")]


#: id -> (argv from (tmp_path, stores), what the error line must say: the fix)
CASES = {
    "missing config": (
        lambda t, s: ["naps", str(t / "nope.toml")], r"nope\.toml does not exist\. Check the path"),
    "config is a folder": (
        lambda t, s: ["layout", str(t)], r"is a folder, not a file\. Check the path"),
    "config not UTF-8": (_bad_utf8, r"save it as UTF-8"),
    "config not TOML": (
        lambda t, s: ["naps", config(t, text="[store\n")], r"is not valid TOML: .*line 1"),
    "unknown section": (
        lambda t, s: ["layout", config(t, {**STORE, "topomapp": {"method": "pca"}})],
        r"unknown section \[topomapp\].*Did you mean 'topomap'\?"),
    "unknown key": (
        lambda t, s: ["layout", config(t, {**STORE, "topomap": {"methd": "pca"}})],
        r"unknown key 'methd' in \[topomap\].*Did you mean 'method'\?"),
    "wrong type": (
        lambda t, s: ["naps", config(t, {**STORE, "naps": {"aligned": 1}})],
        r"\[naps\] aligned must be bool, got 1"),
    "unknown JSON key": (
        lambda t, s: ["naps", config(t, text='{"use_aligned_nap": true}', name="c.json")],
        r"known keys: model_path.*Use a TOML config"),
    "corpus csv missing": (
        lambda t, s: ["extract", config(t, {"model": {"path": "m.keras"}, "corpus": {"path": "nope.csv"},
                                           **STORE})],
        r"corpus file .*nope\.csv does not exist\. Give the path of a corpus\.csv"),
    "bad layout method": (
        lambda t, s: ["layout", config(t, {**STORE, "topomap": {"method": "umapp"}})],
        r"\[topomap\] method must be one of 'umap', .*Did you mean 'umap'\?"),
    "bad layout metric": (
        lambda t, s: ["layout", config(t, {**STORE, "topomap": {"metric": "manhattan"}})],
        r"\[topomap\] metric must be one of 'euclidean', 'cosine'"),
    "bad compare list": (
        lambda t, s: ["compare-layouts", config(t, {**STORE, "topomap": {"compare": ["pca", "best"]}})],
        r"compare must list layout methods out of umap, tsne"),
    "bad compare methods option": (
        lambda t, s: ["compare-layouts", config(t, LAYOUT, "good", s), "--methods", "pca,best"],
        r"unknown method 'best'; choose one of 'umap'"),
    "bad layout seed": (
        lambda t, s: ["layout", config(t, {**STORE, "topomap": {"seed": -1}})],
        r"\[topomap\] seed must be at least 0; got -1"),
    "bad resolution": (
        lambda t, s: ["layout", config(t, {**STORE, "topomap": {"resolution": 1}})],
        r"\[topomap\] resolution must be at least 2; got 1"),
    "info on a folder that is not a store": (
        lambda t, s: ["info", str(t)], r"not a Zarr store .*run inntrospect extract first"),
    "naps on a store that does not exist": (
        lambda t, s: ["naps", config(t, STORE)], r"s\.zarr.*(inntrospect extract|extract first)"),
    "layout before contrast": (
        lambda t, s: ["layout", config(t, STORE, "good", s)],
        r"no contrast results yet\. Run inntrospect contrast CONFIG"),
    "unknown contrast group": (
        lambda t, s: ["contrast", config(t, {**STORE, "contrast": {"groups": ["cat", "bird"]}}, "good", s)],
        r"unknown group 'bird'; the groups are: cat, dog, eel"),
    "bad --from step": (
        lambda t, s: ["run", config(t, STORE), "--from", "napz"],
        r"unknown step 'napz' for --from; the steps are: extract, align, naps"),
    "bad cluster size": (
        lambda t, s: ["run", config(t, {**STORE, "cluster": {"n_workers": 0}})],
        r"\[cluster\] n_workers must be at least 1; got 0"),
    "plot with an unknown format": (
        lambda t, s: ["plot", config(t, {**STORE, "plot": {"format": "jpg"}})],
        r"\[plot\] format must be one of 'png', 'pdf', 'svg'; got 'jpg'"),
    "plot with an unknown mode": (
        lambda t, s: ["plot", config(t, {**STORE, "plot": {"mode": "grid"}})],
        r"\[plot\] mode must be one of 'row', 'individual'"),
    "project with no samples": (
        lambda t, s: ["project", config(t, {**STORE, "projection": {"samples_per_group": 0}})],
        r"\[projection\] samples_per_group must be at least 1; got 0"),
    "project with an unknown sampling": (
        lambda t, s: ["project", config(t, {**STORE, "projection": {"sampling": "last"}})],
        r"\[projection\] sampling must be one of 'random', 'first'; got 'last'"),
    "project with a negative seed": (
        lambda t, s: ["project", config(t, {**STORE, "projection": {"seed": -2}})],
        r"\[projection\] seed must be at least 0; got -2"),
    "non-finite NAP for layout": (
        lambda t, s: ["layout", config(t, LAYOUT, "nan", s), "--no-progress"],
        r"holds \d+ NaN or infinite values.*check the corpus inputs and the model, extract again"),
}

#: cases whose traceback comes from a file this test's change could not touch
def run_main(argv):
    """``(exit code, stdout, stderr)`` of ``main(argv)`` in this process; a traceback fails."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:
            code = exit_.code
        except Exception as exc:  # noqa: BLE001 - what the user would see as a traceback
            pytest.fail(f"Traceback: {type(exc).__name__}: {exc}")
    return code, out.getvalue(), err.getvalue()


def check_one_line(code, out: str, err: str, fix: str) -> str:
    """The error line, after checking the exit code, one ``error:`` line, no traceback, the fix."""
    assert "Traceback" not in out + err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert code in ERROR_EXIT, (code, lines[0])
    assert re.search(fix, lines[0]), f"{fix!r} not in: {lines[0]}"
    return lines[0]


@pytest.mark.parametrize(
    "case",
    list(CASES),
)
def test_cli_error_is_one_line_naming_the_fix(case, tmp_path, stores, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make, fix = CASES[case]
    argv = make(tmp_path, stores)
    code, out, err = run_main(argv)
    check_one_line(code, out, err, fix)


def test_usage_error_is_argparse_exit_2_without_traceback(tmp_path):
    code, out, err = run_main(["run", config(tmp_path, STORE), "--frm", "naps"])
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().splitlines()[-1].endswith("error: unrecognized arguments: --frm naps")


@pytest.mark.parametrize("case", ["missing config", "non-finite NAP for layout"])
def test_cli_error_in_a_real_process(case, tmp_path, stores):
    """``python -m inntrospect``: the same one line on stderr, no traceback, a failure exit code."""
    make, fix = CASES[case]
    argv = make(tmp_path, stores)
    res = subprocess.run([sys.executable, "-m", "inntrospect", *argv], capture_output=True, text=True,
                         env=python_env(), cwd=tmp_path, timeout=300)
    check_one_line(res.returncode, res.stdout, res.stderr, fix)
