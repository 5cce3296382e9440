"""Per-process start-up costs of UMAP, each choice of ``inntrospect/analysis/umapfit.py`` against umap-learn as is.

Every figure comes from a fresh process (``sys.executable -c``), with numba's
cache in a folder of this run (``NUMBA_CACHE_DIR``): empty for "cold" (the
first process after an install), filled by the process before for "warm".

1. ``import umap`` as umap-learn ships it (its package init imports the
   parametric module, hence TensorFlow) against ``umapfit.import_umap()``
   (that module kept from importing).
2. UMAP of 4,608 points (10-D, clustered, the size of the MNIST CNN's
   flatten_8 layout), ``UMAP(n_neighbors=15, random_state=0)``: umap-learn as
   is (NN-descent from 4,096 points up; its own kernels are not cached
   across processes) against ``umapfit.fit_umap`` (exact neighbours from
   scikit-learn, umap-learn's kernels cached on disk), cold and warm.
3. UMAP of 128 points (a conv layer's units; umap-learn computes exact
   neighbours itself at this size): as is against ``fit_umap``, cold and warm.

Fit times exclude the imports (they are item 1). Run::

    python benchmarks/bench_startup.py            # ~3 min on 2 cores
    python benchmarks/bench_startup.py --quick    # the import and the 128-point UMAP (~1 min)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DATA = """
import numpy as np
rng = np.random.default_rng(0)
centres = rng.normal(size=(10, 10)) * 4
x = centres[rng.integers(0, 10, {n})] + rng.normal(size=({n}, 10))
"""
AS_IS = """
import time, warnings
import umap
t = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    umap.UMAP(n_neighbors=15, random_state=0).fit_transform(x)
print("FIT", time.perf_counter() - t)
"""
OURS = """
import time
from inntrospect.analysis.umapfit import fit_umap
import inntrospect.analysis.umapfit as u; u.import_umap()
t = time.perf_counter()
fit_umap(x, n_neighbors=15, seed=0)
print("FIT", time.perf_counter() - t)
"""
IMPORT = """
import sys, time
t = time.perf_counter()
{stmt}
print("FIT", time.perf_counter() - t, "tensorflow" in sys.modules)
"""


def child(code: str, cache: Path) -> tuple[float, str]:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("FIT")][-1].split()
    return float(line[1]), " ".join(line[2:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 128-point UMAP and the import only")
    quick = ap.parse_args(argv).quick
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_startup-") as tmp:
        tmp = Path(tmp)
        plain, tf = child(IMPORT.format(stmt="import umap"), tmp / "c0")
        ours, tf2 = child(IMPORT.format(stmt="from inntrospect.analysis.umapfit import import_umap; import_umap()"),
                          tmp / "c0")
        rows.append(("import umap (TensorFlow imported: as is / ours)", plain, ours, f"{tf} / {tf2}"))
        for n in (128,) if quick else (4608, 128):
            for name, code in (("as is", AS_IS), ("ours", OURS)):
                cache = tmp / f"{name.replace(' ', '')}-{n}"
                cold, _ = child(DATA.format(n=n) + code, cache)
                warm, _ = child(DATA.format(n=n) + code, cache)
                rows.append((f"UMAP {n} points, {name}: cold / warm", cold, warm, ""))
    print(f"{'what':<58} {'a (s)':>8} {'b (s)':>8}  note")
    for what, a, b, note in rows:
        print(f"{what:<58} {a:>8.2f} {b:>8.2f}  {note}")
    as_is = {r[0].split(",")[0]: r for r in rows if r[0].startswith("UMAP") and ", as is" in r[0]}
    for r in rows:
        if r[0].startswith("UMAP") and ", ours" in r[0]:
            base = as_is[r[0].split(",")[0]]
            print(f"speed-up {r[0].split(',')[0]}: cold {base[1] / r[1]:.1f}x, warm {base[2] / r[2]:.1f}x")
    print(f"speed-up import umap: {rows[0][1] / rows[0][2]:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
