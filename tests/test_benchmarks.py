"""The benchmarks run at tiny size, so they keep working (their checks included)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, needs_shared, python_env


def run(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                         text=True, env=python_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_bench_align_quick():
    out = run("bench_align.py", "--quick")
    assert "per-sample loop" in out and "align_kernel" in out and "x" in out


@needs_shared
def test_bench_naps_quick(cnn_store, tmp_path):
    out = run("bench_naps.py", "--quick", "--source", str(cnn_store), "--store", str(tmp_path / "b.zarr"))
    for label in ("(a3)", "b/a =", "c/b =", "c2/b =", "(e) LocalCluster", "workers alive throughout"):
        assert label in out, out


def test_bench_scaling_quick():
    out = run("bench_scaling.py", "--quick")
    assert "LocalCluster 2 workers x 1 thread" in out and "speed-up 2 workers / 1 worker" in out
    assert "results equal across all" in out and ": True" in out


@needs_shared
def test_bench_checksum_quick(cnn_store):
    out = run("bench_checksum.py", "--quick", "--source", str(cnn_store))
    for label in ("naps with/without checksums =", "aligned naps with/without checksums =",
                  "extract with/without checksums =", "verify: "):
        assert label in out, out


@needs_shared
def test_bench_exemplars_quick(cnn_store, tmp_path):
    out = run("bench_exemplars.py", "--quick", "--source", str(cnn_store), "--store", str(tmp_path / "e.zarr"))
    for label in ("(b)   NAP pass alone", "(bx)  NAPs + exemplars, one pass", "b / bx =",
                  "(c)  contrast step in this process", "(c') inntrospect contrast CONFIG, fresh process"):
        assert label in out, out
