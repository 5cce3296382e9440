"""What every new process pays: no TensorFlow outside extraction, no recompilation, quiet output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from inntrospect.testing import store_from_arrays

from .conftest import python_env, write_config


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A complete store (a conv layer, a 40-unit dense layer, 3 groups) and a config for every step."""
    folder = tmp_path_factory.mktemp("startup")
    rng = np.random.default_rng(0)
    n = 90
    groups = np.repeat(["a", "b", "c"], n // 3)
    conv = np.maximum(rng.normal(size=(n, 4, 4, 20)), 0).astype(np.float32)
    dense = (rng.normal(size=(n, 40)) + (np.arange(n)[:, None] % 3) * 0.5).astype(np.float32)
    store_from_arrays(folder / "run.zarr", {"conv": conv, "dense": dense}, groups,
                      grads={"conv": rng.normal(size=conv.shape).astype(np.float32)}, chunks=32)
    return write_config(folder, {
        "store": {"path": "run.zarr"}, "naps": {"aligned": True},
        "topomap": {"method": "umap", "resolution": 20},
        "projection": {"samples_per_group": 20}, "plot": {"output": "figures"}}, name="run.toml")


def _python(code: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=env or python_env(), **kwargs)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_no_step_but_extraction_imports_tensorflow(small_run):
    """align, naps, contrast, layout (UMAP), project (UMAP), plot, report: TensorFlow never loads."""
    steps = ["align", "naps", "contrast", "layout", "project", "plot", "report"]
    code = (
        "import sys\nfrom inntrospect.cli import main\n"
        f"for step in {steps!r}:\n"
        f"    assert main([step, {str(small_run)!r}, '--no-progress']) == 0, step\n"
        "print('LOADED', 'tensorflow' in sys.modules, 'keras' in sys.modules, 'umap' in sys.modules,\n"
        "      'umap.parametric_umap' in sys.modules)\n"
    )
    res = _python(code)
    assert "LOADED False False True False" in res.stdout
    assert (small_run.parent / "figures" / "report" / "index.html").is_file()


def test_a_warm_process_compiles_nothing(small_run):
    """The second process to lay out and project loads every numba kernel from the on-disk cache."""
    code = (
        "from inntrospect.cli import main\n"
        "for step in ['layout', 'project']:\n"
        f"    assert main([step, {str(small_run)!r}, '--no-progress']) == 0, step\n"
    )
    # the steps before, and whatever no earlier process of this install compiled (the cache's place)
    _python(code.replace("['layout', 'project']", "['align', 'naps', 'contrast', 'layout', 'project']"))
    res = _python(code, dict(python_env(), NUMBA_DEBUG_CACHE="1"))
    log = res.stdout + res.stderr
    assert "data saved" not in log, "a warm process compiled (and saved) a kernel:\n" + log[-2000:]
    loaded = [line for line in log.splitlines() if "data loaded" in line]
    assert any("umap" in line for line in loaded), "umap-learn's kernels do not come from the cache"
    assert any("inntrospect" in line for line in loaded), "our kernels do not come from the cache"


def test_output_in_logs_has_no_progress_bars(small_run):
    """Standard error is not a terminal: no bars, no carriage returns; INNTROSPECT_PROGRESS=1 forces them."""
    code = (f"from inntrospect.cli import main\nmain(['align', {str(small_run)!r}, '--no-progress'])\n"
            f"main(['naps', {str(small_run)!r}])\n")
    quiet = _python(code)
    assert "\r" not in quiet.stderr and "%|" not in quiet.stderr
    assert "NAPs of 2 layers" in quiet.stdout
    forced = _python(code, dict(python_env(), INNTROSPECT_PROGRESS="1"))
    assert "%|" in forced.stderr


@pytest.mark.slow
def test_tensorflow_start_up_lines_are_filtered_and_the_rest_passes():
    pytest.importorskip("tensorflow")
    env = {k: v for k, v in python_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = (
        "import os, sys\n"
        "from inntrospect.extraction.models.keras import import_tensorflow\n"
        "os.write(2, b'before\\n')\n"
        "tf = import_tensorflow()\n"
        "print(float(tf.constant(2.0) + 1))\n"
        "os.write(2, b'after\\n')\n"
    )
    res = _python(code, env)
    assert res.stdout.strip() == "3.0"
    assert res.stderr.splitlines()[0] == "before" and res.stderr.splitlines()[-1] == "after"
    assert "I0000" not in res.stderr and "absl::InitializeLog" not in res.stderr, res.stderr
    assert "cuInit" not in res.stderr, res.stderr
