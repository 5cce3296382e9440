"""End to end: the commands a user types (`inntrospect run`, each step alone), in fresh processes.

What is measured
----------------
Every command runs in a fresh process (``inntrospect`` beside ``sys.executable``),
as a user runs it: no ``TF_CPP_MIN_LOG_LEVEL`` set by this script, progress bars
on, output kept in ``WORKDIR/<recipe>/logs/``. Per command: the wall time, the
peak RSS of the whole process tree (the sum over the process and its descendants,
sampled with psutil every 0.05 s) and the largest single process (GB = 1e9 bytes).

Recipe A, the MNIST CNN example: the first 150 test images of each digit of the
real MNIST test set (1,500), layers conv2d_24, conv2d_25, flatten_8, aligned NAPs,
umap layout, 100 projected samples per group, png plots (``examples/mnist/cnn.toml``).
Recipe B, VGG16 at small scale: ``keras.applications.VGG16(weights=None)``
(seeded, saved once as ``vgg16.keras``), 7 groups x 30 smooth synthetic
224 x 224 x 3 images, layers block1_pool ... block5_pool, fc1, chunk_mib 64,
batch 16, 30 projected samples per group.

Per recipe: (1) cold: ``inntrospect run CONFIG`` with an empty numba cache
(``NUMBA_CACHE_DIR`` a fresh folder, which both umap-learn's and our kernels use)
and a fresh store; (2) warm: the same again with that cache, fresh store;
(3) each step alone on the finished store (extract first, on a fresh store):
extract, align, naps, contrast, layout, project, plot, report. The per-step
times that ``inntrospect run`` prints are parsed too.

Side by side, on recipe A's contrastive NAPs of flatten_8 (4,608 units), each in
a fresh process, imports included: the reference recipe (``umap.UMAP()``
defaults + min-max + numpy ``distribute_reference`` + griddata images, from
``bench_layout.py``) against ours (``Layout("umap", seed=0)`` +
``distribute_in_circle`` + ``interpolate``). Then the issue's targets, against
the figures measured before this change, and the floor: ``import tensorflow``
and ``import inntrospect.cli`` in fresh processes.

Run::

    python benchmarks/bench_e2e.py                  # both recipes (~15-25 min on 2 cores)
    python benchmarks/bench_e2e.py --quick          # 20 images per digit; VGG16 2 groups x 4 images,
                                                    # block5_pool and fc1 only; side by side on 1,000
                                                    # of flatten_8's units (a few minutes)
    python benchmarks/bench_e2e.py --skip-vgg --workdir /tmp/e2e --out e2e.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
MNIST = SHARED / "data" / "mnist"
CNN = SHARED / "models" / "mnist_cnn_shallow"
STEPS = ["extract", "align", "naps", "contrast", "layout", "project", "plot", "report"]
# the steps `inntrospect run` prints, and which command alone they belong to
RUN_STEPS = {"extract": "extract", "align": "align", "naps": "naps", "contrast": "contrast", "layout": "layout",
             "topomap": "layout", "projection": "project", "plots": "plot", "report": "report"}
BEFORE_DATE = "2026-11-27"
VGG_LAYERS = ["block1_pool", "block2_pool", "block3_pool", "block4_pool", "block5_pool", "fc1"]


# -- running a command and watching its memory ------------------------------------
def monitored(cmd, env, log: Path, cwd: Path) -> dict:
    """Run ``cmd``; wall time, peak RSS of the process tree and of its largest process, exit code, stdout."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        root, tree, single = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            rss = []
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        rss.append(p.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            tree, single = max(tree, sum(rss)), max(single, max(rss, default=0))
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    stdout, stderr = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    res = {"wall": wall, "tree": tree / 1e9, "single": single / 1e9, "rc": proc.returncode, "out": stdout}
    if proc.returncode != 0:
        tail = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()][-3:]
        res["error"] = " / ".join(tail)[-300:]
        print(f"    FAILED (exit {proc.returncode}): {res['error']}", flush=True)
    return res


def inntrospect_cmd() -> list[str]:
    script = Path(sys.executable).with_name("inntrospect")
    return [str(script)] if script.exists() else [sys.executable, "-m", "inntrospect"]


def user_env(numba_cache: Path | None = None) -> dict:
    env = dict(os.environ)  # what the user has; nothing added but the numba cache folder
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    return env


def step_times(stdout: str) -> dict:
    """``extract    done in 6.2 s`` lines of ``inntrospect run`` -> ``{step: seconds}``."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+done in ([\d.]+) s", stdout, re.M)}


# -- recipe A: the MNIST CNN example -------------------------------------------------
def prepare_mnist(folder: Path, per_class: int) -> Path:
    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import read_idx

    from inntrospect.extraction.corpus import write_corpus

    x = read_idx(MNIST / "t10k-images-idx3-ubyte.gz")
    y = read_idx(MNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    idx = np.sort(np.concatenate([np.flatnonzero(y == d)[:per_class] for d in range(10)]))
    shutil.rmtree(folder / "corpus", ignore_errors=True)
    write_corpus((x[idx].astype(np.float32) / 255.0)[..., None], y[idx].astype(str), folder / "corpus",
                 targets=y[idx])
    return write_config(folder, CNN, ["conv2d_24", "conv2d_25", "flatten_8"], chunk_mib=32, batch=128,
                        per_group=100)


def write_config(folder: Path, model: Path, layers, chunk_mib: int, batch: int, per_group: int) -> Path:
    cfg = folder / "config.toml"
    cfg.write_text(f"""[model]
path = "{model}"
layers = {json.dumps(layers)}

[corpus]
path = "corpus/corpus.csv"

[store]
path = "run.zarr"
chunk_mib = {chunk_mib}

[extract]
gradient_target = "predicted"
batch_size = {batch}

[naps]
aligned = true
std = false

[topomap]
method = "umap"
metric = "euclidean"
distribute_in_circle = true
seed = 0
resolution = 100
from = "contrast"

[projection]
samples_per_group = {per_group}
sampling = "random"
seed = 0

[plot]
mode = "row"
format = "png"
output = "figures"
""")
    return cfg


# -- recipe B: VGG16 at small scale --------------------------------------------------
VGG_BUILD = """import sys, keras
keras.utils.set_random_seed(0)
keras.applications.VGG16(weights=None).save(sys.argv[1])"""


def prepare_vgg(folder: Path, groups: int, per_group: int, layers) -> Path:
    from scipy.ndimage import zoom

    model = folder / "vgg16.keras"
    if not model.exists():  # built in a process of its own (TensorFlow stays out of this one), then cached
        print(f"  building {model} (once) ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", VGG_BUILD, str(model) + ".tmp.keras"], check=True,
                       capture_output=True)
        Path(str(model) + ".tmp.keras").rename(model)
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(0)
    x = np.empty((groups * per_group, 224, 224, 3), np.float32)
    for g in range(groups):  # a smooth pattern per group, plus a smooth variation per image
        base = rng.random((8, 8, 3))
        for i in range(per_group):
            x[g * per_group + i] = zoom(base + 0.3 * rng.random((8, 8, 3)), (28, 28, 1), order=1)
    labels = np.repeat(np.arange(groups), per_group)
    from inntrospect.extraction.corpus import write_corpus

    shutil.rmtree(folder / "corpus", ignore_errors=True)
    write_corpus(x, [f"g{g}" for g in labels], folder / "corpus", targets=labels, per_file=16)
    return write_config(folder, model, layers, chunk_mib=64, batch=16, per_group=30)


# -- one recipe: cold run, warm run, each step alone -------------------------------------
def fresh_store(folder: Path) -> None:
    for sub in ("run.zarr", "figures"):
        shutil.rmtree(folder / sub, ignore_errors=True)


def run_recipe(name: str, folder: Path, cfg: Path) -> dict:
    cache = folder / "numba-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    env, cmd, logs, res = user_env(cache), inntrospect_cmd(), folder / "logs", {}
    for mode in ("cold", "warm"):
        fresh_store(folder)
        print(f"  {name}: inntrospect run ({mode}) ...", flush=True)
        r = res[f"run whole ({mode})"] = monitored([*cmd, "run", str(cfg)], env, logs / f"run_{mode}", folder)
        r["steps"] = step_times(r["out"])
        print(f"    {r['wall']:.1f} s, peak {r['tree']:.2f} GB; steps {r['steps']}", flush=True)
    fresh_store(folder)
    for step in STEPS:
        r = res[f"{step} alone"] = monitored([*cmd, step, str(cfg)], env, logs / step, folder)
        print(f"  {name}: inntrospect {step:<9} {r['wall']:6.1f} s, peak {r['tree']:.2f} GB", flush=True)
    return res


# -- side by side: the reference recipe vs ours, flatten_8 layout --------------------------
def child_layout(which: str, npy: str) -> None:
    """In a fresh process: one layout of ``npy``'s (group, unit) contrast, imports included; prints JSON."""
    t, t0 = {}, time.perf_counter()
    had = "TF_CPP_MIN_LOG_LEVEL" in os.environ
    # bench_layout sets TF_CPP_MIN_LOG_LEVEL when imported: undone below
    from bench_layout import griddata_images, reference_layout

    if not had:
        os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)
    from inntrospect.topomap.circle import distribute_in_circle, distribute_reference
    from inntrospect.topomap.images import interpolate, unit_values
    from inntrospect.topomap.layout import Layout, minmax, profile_matrix

    c = np.load(npy)
    P, values = profile_matrix(c), unit_values(c)
    t["imports"] = time.perf_counter() - t0
    if which == "reference":
        t1 = time.perf_counter()
        import umap  # noqa: F401  (the reference's own import, TensorFlow with it)

        t["import umap"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        xy = minmax(reference_layout("umap", P))
        t["UMAP() + min-max"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        xy = distribute_reference(xy, seed=0)
        t["numpy circle"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        griddata_images(xy, values)
        t["griddata images"] = time.perf_counter() - t1
    else:
        t1 = time.perf_counter()
        xy = Layout("umap", seed=0).fit(P).xy_
        t["Layout('umap', seed=0)"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        xy = distribute_in_circle(xy, seed=0)
        t["distribute_in_circle"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        interpolate(xy, values, resolution=100)
        t["interpolate"] = time.perf_counter() - t1
    t["total in process"] = time.perf_counter() - t0
    print("CHILD " + json.dumps({"units": int(P.shape[0]), **t}))


def side_by_side(folder: Path, units: int | None) -> dict:
    """Both layouts of flatten_8's contrast (its first ``units`` units if given), one fresh process each."""
    import inntrospect

    npy = folder / "contrast_flatten_8.npy"
    c = np.asarray(inntrospect.load(folder / "run.zarr", "contrast")["flatten_8"]["nap"].values)
    np.save(npy, c[:, :units])
    res = {}
    for which in ("reference", "ours"):
        print(f"  side by side: {which} layout of flatten_8 in a fresh process ...", flush=True)
        r = monitored([sys.executable, str(Path(__file__).resolve()), "--child", which, str(npy)],
                      user_env(folder / "numba-cache"), folder / "logs" / f"layout_{which}", HERE)
        m = re.search(r"^CHILD (.*)$", r["out"], re.M)
        r["parts"] = json.loads(m.group(1)) if m else {}
        res[which] = r
    return res


# -- tables ------------------------------------------------------------------------
def md_table(headers, rows) -> str:
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def fig(r: dict | None, key="wall", digits=1) -> str:
    if r is None:
        return "not run"
    return f"{r[key]:.{digits}f}" + (f" (FAILED, exit {r['rc']})" if r["rc"] != 0 and key == "wall" else "")


def recipe_tables(title: str, res: dict) -> str:
    rows = [(k, fig(r), fig(r, "tree", 2), fig(r, "single", 2)) for k, r in res.items()]
    text = f"### {title}\n\n" + md_table(["command (fresh process)", "wall s", "peak RSS (tree) GB",
                                          "largest process GB"], rows)
    cold, warm = res["run whole (cold)"]["steps"], res["run whole (warm)"]["steps"]
    srows = [(s, f"{cold[s]:.1f}" if s in cold else "–", f"{warm[s]:.1f}" if s in warm else "–",
              f"`inntrospect {RUN_STEPS[s]}`") for s in RUN_STEPS if s in cold or s in warm]
    text += "\n\nper-step times printed by `inntrospect run`:\n\n" + md_table(
        ["step", "cold s", "warm s", "alone as"], srows)
    errors = [f"- {k}: {r['error']}" for k, r in res.items() if r.get("error")]
    return text + ("\n\nfailures:\n\n" + "\n".join(errors) if errors else "")


def met(value, limit) -> str:
    return "–" if value is None else ("yes" if value <= limit else "no")


def targets_table(a: dict, b: dict | None) -> str:
    def ok(r):
        return r is not None and r["rc"] == 0

    def get(res, key):
        return res.get(key) if res else None

    def s(r):
        return f"{r['wall']:.1f} s" if ok(r) else ("not run" if r is None else fig(r))

    def w(r):
        return r["wall"] if ok(r) else None

    aw, ac, al, ap = (get(a, k) for k in ("run whole (warm)", "run whole (cold)", "layout alone", "project alone"))
    bp = get(b, "project alone")
    bruns = [r for r in (get(b, "run whole (cold)"), get(b, "run whole (warm)")) if ok(r)]
    bpeak = max((r["tree"] for r in bruns), default=None)
    bp_met = "–" if not ok(bp) else ("yes" if bp["wall"] <= 20 and bp["tree"] <= 1.5 else "no")
    rows = [
        ("`inntrospect run`, MNIST CNN example (warm)", "75–78 s", s(aw), "≤ 20 s", met(w(aw), 20)),
        ("same, first run after install (cold cache)", "—", s(ac), "≤ 40 s", met(w(ac), 40)),
        ("`inntrospect layout`, its 3 layers", "48–73 s", s(al), "≤ 6 s", met(w(al), 6)),
        ("`inntrospect project`, MNIST CNN example", "14.5 s", s(ap), "≤ 3 s", met(w(ap), 3)),
        ("`inntrospect project`, VGG16 recipe", "170 s, 5.1 GB",
         f"{bp['wall']:.1f} s, {bp['tree']:.2f} GB" if ok(bp) else ("skipped" if b is None else fig(bp)),
         "≤ 20 s, ≤ 1.5 GB", bp_met),
        ("`inntrospect run`, VGG16 recipe, peak RSS", "10.3 GB",
         f"{bpeak:.2f} GB" if bpeak is not None else ("skipped" if b is None else "FAILED"), "≤ 6.5 GB",
         met(bpeak, 6.5)),
    ]
    return md_table(["what", f"before (measured {BEFORE_DATE}, before this change)", "now", "target", "met?"],
                    rows)


def floor(work: Path) -> dict:
    return {what: monitored([sys.executable, "-c", what], user_env(), work / "logs" / f"floor_{what.split()[1]}", HERE)
            for what in ("import tensorflow", "import inntrospect.cli")}


# -- main --------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny corpora (20 images per digit; VGG16 2 x 4 images)")
    ap.add_argument("--skip-vgg", action="store_true", help="recipe A only")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/inntrospect-bench/e2e"))
    ap.add_argument("--out", type=Path, default=None, help="also write the tables as markdown to this file")
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "NPY"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child_layout(*a.child)
        return 0
    for f in (MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz", CNN):
        if not f.exists():
            sys.exit(f"{f} not found: this benchmark needs ../shared (MNIST data and models) beside the checkout")
    t_start, load0 = time.perf_counter(), os.getloadavg()
    work = a.workdir.resolve()
    per_class = 20 if a.quick else 150
    print(f"workdir {work}; {os.cpu_count()} cores, load average {load0[0]:.2f}"
          f"{'; --quick: tiny sizes, NOT representative' if a.quick else ''}", flush=True)

    print(f"recipe A: MNIST CNN, {per_class} test images per digit", flush=True)
    cfg_a = prepare_mnist(work / "mnist", per_class)
    res_a = run_recipe("A", work / "mnist", cfg_a)
    # --quick: the first 1,000 units (numpy's circle step alone takes 1-2 min on all 4,608)
    sbs = side_by_side(work / "mnist", 1000 if a.quick else None) if res_a["contrast alone"]["rc"] == 0 else None
    res_b = None
    if a.skip_vgg:
        print("recipe B (VGG16) skipped: --skip-vgg", flush=True)
    else:
        groups, per, layers = (2, 4, VGG_LAYERS[-2:]) if a.quick else (7, 30, VGG_LAYERS)
        print(f"recipe B: VGG16 (random weights), {groups} groups x {per} images, layers {', '.join(layers)}",
              flush=True)
        cfg_b = prepare_vgg(work / "vgg16", groups, per, layers)
        res_b = run_recipe("B", work / "vgg16", cfg_b)
    fl = floor(work)

    parts = [f"## End to end in fresh processes ({'--quick: tiny sizes, NOT representative' if a.quick else 'full sizes'})",
             f"{os.cpu_count()} cores; load average {load0[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
             f"logs in {work}/*/logs/",
             recipe_tables(f"Recipe A: MNIST CNN example, {10 * per_class:,} images", res_a)]
    if res_b is not None:
        parts.append(recipe_tables("Recipe B: VGG16 (random weights), small scale", res_b))
    if sbs:
        ref, ours = sbs["reference"], sbs["ours"]
        rows = [(w, fig(r), fig(r, "tree", 2), ", ".join(f"{k} {v:.1f} s" for k, v in r["parts"].items()
                                                          if k != "units"))
                for w, r in (("reference: umap.UMAP() + min-max + numpy circle + griddata", ref),
                             ("ours: Layout('umap', seed=0) + distribute_in_circle + interpolate", ours))]
        parts.append(f"### Side by side: layout of flatten_8 ({ours['parts'].get('units', '?')} units), one fresh "
                     "process each, imports included, numba cache warm\n\n"
                     + md_table(["recipe", "wall s", "peak RSS GB", "inside the process"], rows))
        if ref["rc"] == 0 and ours["rc"] == 0:
            parts.append(f"side by side, flatten_8 layout in a fresh process: reference {ref['wall']:.1f} s, "
                         f"ours {ours['wall']:.1f} s, ratio {ref['wall'] / ours['wall']:.1f}x")
    parts.append("### Targets (from the issue)\n\n" + targets_table(res_a, res_b)
                 + ("\n\n(--quick: sizes differ from the targets' recipes; met? is not meaningful)" if a.quick else ""))
    parts.append("### Floor: a fresh process that only imports\n\n" + md_table(
        ["command", "wall s", "peak RSS GB"],
        [(f"`python -c \"{w}\"`", fig(r), fig(r, "tree", 2)) for w, r in fl.items()]))
    text = "\n\n".join(parts) + "\n"
    print("\n" + text)
    print(f"bench_e2e finished in {time.perf_counter() - t_start:.0f} s")
    if a.out:
        a.out.write_text(text)
        print(f"written to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
