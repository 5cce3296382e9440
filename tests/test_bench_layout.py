"""benchmarks/bench_layout.py runs at tiny size (synthetic input, no model), its checks included."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT, python_env


def test_bench_layout_quick():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_layout.py"), "--quick"],
                         capture_output=True, text=True, env=python_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    for label in ("(a) reference", "(b) ours", "Layout('som')", "Layout('graph')", "Layout('random')",
                  "compiled exact", "max |exact - numpy|", "approx (particle-mesh", "displacement vs exact"):
        assert label in out, out
