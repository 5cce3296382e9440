"""Run every benchmark and print one summary table (our speed, the baseline's, ratio, target, met?).

Each ``bench_*.py`` beside this script runs as a subprocess (``sys.executable``),
with ``--quick`` when asked; its output is kept (``--logs``) and its key numbers
are parsed from what it prints (regexes on its existing lines: the scripts are
not changed for this). A number that cannot be found shows as "see output".
Also recorded: the machine (cores, memory, CPU model), the date, the load
average before and after each script, the versions of the packages involved.

Run::

    python benchmarks/run_all.py --quick                    # every benchmark at tiny size (~3 min)
    python benchmarks/run_all.py --out results.md           # full sizes (~30 min on 2 cores)
    python benchmarks/run_all.py --only naps,scaling --quick
    python benchmarks/run_all.py --only e2e             # the commands a user types, in fresh processes
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the order they run in: cheap and model-free first
BENCHES = ["align", "circle", "layout", "naps", "exemplars", "scaling", "codecs", "extract", "extract-torch", "checksum",
           "extract-cluster", "startup", "e2e", "append"]
PACKAGES = ["inntrospect", "numpy", "numba", "scipy", "dask", "distributed", "zarr", "numcodecs", "xarray", "flox",
            "tensorflow", "tf_keras", "umap-learn", "scikit-learn", "pynndescent"]
SEE = "see output"
NUM = r"([\d,]+(?:\.\d+)?)"


def num(s: str) -> float:
    return float(s.replace(",", ""))


def fmt(x, unit: str = "", digits: int = 2) -> str:
    if x is None:
        return SEE
    if isinstance(x, str):
        return x
    if unit in ("samples/s", "MB"):
        digits = 0
    return (f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}") + (f" {unit}" if unit else "")


def row(bench, what, ours=None, base=None, ratio=None, target=None, met=None, unit="") -> dict:
    """One summary row; ``target`` a number (ratio >= target) or text; ``met`` computed when both known."""
    if met is None and isinstance(target, (int, float)) and ratio is not None:
        met = ratio >= target
    return {"bench": bench, "what": what, "ours": fmt(ours, unit), "base": fmt(base, unit),
            "ratio": SEE if ratio is None else ratio if isinstance(ratio, str) else f"{ratio:.2f}x",
            "target": "–" if target is None else (f">= {target:g}x" if isinstance(target, (int, float)) else target),
            "met": "–" if met is None else ("yes" if met else "**no**")}


def search(pattern: str, text: str, flags=re.M):
    return re.search(pattern, text, flags)


# -- parsers: output text -> summary rows --------------------------------------------
def parse_align(out: str) -> list[dict]:
    rows, rates = [], {}
    for m in re.finditer(r"^(\(\d+(?:, \d+)*\))\s+(per-sample loop, np\.pad \+ crop|align_kernel|"
                         r"align_kernel, reused output)\s+" + NUM + r"\s+" + NUM + r"\s+" + NUM + "x", out, re.M):
        rates[(m.group(1), m.group(2))] = (num(m.group(3)), num(m.group(5)))
    for shape in dict.fromkeys(s for s, _ in rates):
        loop, kern = rates.get((shape, "per-sample loop, np.pad + crop")), rates.get((shape, "align_kernel"))
        rows.append(row("align", f"`align_kernel` vs per-sample loop, {shape}", kern and kern[0], loop and loop[0],
                        kern and kern[1], 5, unit="samples/s"))
    return rows or [row("align", "`align_kernel` vs per-sample loop")]


def parse_circle(out: str) -> list[dict]:
    rows, found = [], {}
    pat = r"^(.+?)\s{2,}" + NUM + r"\s+(\d+)\s+" + NUM + r"\s+" + NUM + r"\s+" + NUM + "x"
    for m in re.finditer(pat, out, re.M):
        name, units = m.group(1).strip(), int(num(m.group(2)))
        found[(name.split(" (")[0].split(",")[0], units)] = (num(m.group(5)), num(m.group(6)))
    ref = [(k, v) for k, v in found.items() if k[0].startswith("numpy reference")]
    if ref:
        (_, n_small), (ref100, _) = ref[0]
        for name, target in (("exact", 30), ("approx", None)):
            got = found.get((name, n_small))
            rows.append(row("circle", f"`distribute_in_circle` {name} vs numpy reference, {n_small:,} units, "
                            "100 steps (s)", got and got[0], ref100, got and got[1], target, unit="s"))
        large = sorted(u for _, u in found if u > n_small)
        if large:
            n = large[-1]
            ex, ap = found.get(("exact", n)), found.get(("approx", n))
            rows.append(row("circle", f"approx vs exact, {n:,} units, 100 steps (s)", ap and ap[0], ex and ex[0],
                            ex[0] / ap[0] if ex and ap else None, unit="s"))
    return rows or [row("circle", "`distribute_in_circle` vs numpy reference")]


def parse_layout(out: str) -> list[dict]:
    rows = []
    tot = {}
    for m in re.finditer(r"^\(([ab])\) (.+?)\s{2,}" + r"\s+".join([NUM] * 4) + r"\s+" + NUM + "x", out, re.M):
        tot[m.group(1)] = num(m.group(6))
    a, b = tot.get("a"), tot.get("b")
    rows.append(row("layout", "topomap end to end: (b) ours vs (a) reference, total s", b, a,
                    a / b if a and b else None, unit="s"))
    ca = search(r"numpy distribute_reference\s+" + NUM + " s", out)
    ex = search(r"compiled exact \(median of \d+\)\s+" + NUM + r" s\s+" + NUM + r"x.*?\(target >= (\d+)x at ([\d,]+) "
                r"units: (met|NOT met)\)", out)
    n = search(r"^circle step alone .*?, ([\d,]+) units", out)
    t = int(ex.group(3)) if ex else 30
    note = f">= {t}x (at {ex.group(4)} units)" if ex else f">= {t}x"
    rows.append(row("layout", f"circle step alone, compiled exact vs numpy, {n.group(1) if n else '?'} units (s)",
                    ex and num(ex.group(1)), ca and num(ca.group(1)), ex and num(ex.group(2)), note,
                    (num(ex.group(2)) >= t) if ex else None, unit="s"))
    big = search(r"^circle step on ([\d,]+) units", out)
    bex = search(r"^\s+exact \(numba\)\s+" + NUM + " s", out)
    bap = search(r"^\s+approx \(particle-mesh, grid \d+\)\s+" + NUM + " s", out)
    if big:
        rows.append(row("layout", f"circle step, approx vs exact, {big.group(1)} units (s)",
                        bap and num(bap.group(1)), bex and num(bex.group(1)) if bex else "skipped",
                        num(bex.group(1)) / num(bap.group(1)) if bex and bap else None, unit="s"))
    return rows


def parse_naps(out: str) -> list[dict]:
    r = {}
    for m in re.finditer(r"^\((\w+)\)\s.*?\s(\d+\.\d+)\s+(\d+\.\d+)\s+\d+\.\d+-\d+\.\d+", out, re.M):
        r[m.group(1)] = num(m.group(3))  # GB/s
    best = search(r"ceiling a = the fastest: (a\d)", out)
    a = r.get(best.group(1)) if best else None
    b, c, c2, d = r.get("b"), r.get("c"), r.get("c2"), r.get("d")
    ta = search(r"b/a = ([\d.]+)\s+\(target >= ([\d.]+)\)\s+c/b = ([\d.]+)\s+\(target >= ([\d.]+)\)", out)
    rows = [
        row("naps", f"`naps(store)` vs read-only ceiling ({best.group(1) if best else 'a'}), GB/s of acts",
            b, a, num(ta.group(1)) if ta else None, num(ta.group(2)) if ta else 0.8, unit="GB/s"),
        row("naps", "`naps(store, aligned=True)` (on the fly) vs `naps(store)`", c, b,
            num(ta.group(3)) if ta else None, num(ta.group(4)) if ta else 0.9, unit="GB/s"),
        row("naps", "aligned NAPs after `align(persist=True)` vs `naps(store)`", c2, b,
            c2 / b if c2 and b else None, unit="GB/s"),
    ]
    if d is not None or "(d)" in out:
        rows.append(row("naps", "`naps(store)` vs xarray `groupby().mean()` (flox)", b, d,
                        b / d if b and d else None, unit="GB/s"))
    e = search(r"then ([\d.]+) s = ([\d.]+) GB/s", out)
    lim = search(r"\(e\) LocalCluster: (\d+) worker process\(es\) x (\d+) thread\(s\), memory_limit ([\d.]+) GB", out)
    rows.append(row("naps", f"(e) `naps` on LocalCluster ({lim.group(1)} workers x {lim.group(2)} thread) vs "
                    "threaded (b)" if lim else "(e) `naps` on a LocalCluster vs threaded (b)",
                    e and num(e.group(2)), b, num(e.group(2)) / b if e and b else None, unit="GB/s"))
    peaks = [int(p) for p in re.findall(r"peak RSS (\d+) MB = \d+% of the limit", out)]
    alive = search(r"workers alive throughout \(same addresses and pids\): (\w+)", out)
    if lim and peaks:
        limit_mb = num(lim.group(3)) * 1000
        rows.append(row("naps", "(e) worker peak RSS vs `memory_limit` (MB; ratio = limit / peak)", max(peaks),
                        limit_mb, limit_mb / max(peaks), "peak < limit, no restarts",
                        max(peaks) < limit_mb and bool(alive and alive.group(1) == "True"), unit="MB"))
    return rows


def parse_scaling(out: str) -> list[dict]:
    rows = []
    for mode in ("cold", "warm"):
        m = search(rf"^{mode}: speed-up 2 workers / 1 worker = ([\d.]+)x", out)
        if not m:
            continue
        modes = re.search(r"^\s+(\w+) s\s+\w+ GB/s\s+range(?:\s+(\w+) s\s+\w+ GB/s\s+range)?", out, re.M)
        k = [g for g in modes.groups() if g].index(mode) if modes else 0
        gbs = {}
        for lm in re.finditer(r"^(LocalCluster \d+ workers? x \d threads?|threaded scheduler, \d threads?)"
                              r"(?: \(of 2, --quick\))?\s+(.*)$", out, re.M):
            vals = re.findall(r"(\d+\.\d+)\s+(\d+\.\d+)\s+\d+\.\d+-\d+\.\d+", lm.group(2))
            if len(vals) > k:
                gbs[lm.group(1)] = num(vals[k][1])
        one, two = gbs.get("LocalCluster 1 worker x 1 thread"), gbs.get("LocalCluster 2 workers x 1 thread")
        rows.append(row("scaling", f"`naps` on LocalCluster 2 workers vs 1 worker (1 thread each), page cache {mode}",
                        two, one, num(m.group(1)), "<= 2x on 2 cores", unit="GB/s"))
        t2 = gbs.get("threaded scheduler, 2 threads")
        rows.append(row("scaling", f"LocalCluster 2 workers vs threaded scheduler 2 threads, {mode}", two, t2,
                        two / t2 if two and t2 else None, unit="GB/s"))
    eq = search(r"results equal across all (\d+) runs .*?: (\w+)", out)
    if eq:
        rows.append(row("scaling", f"results equal across {eq.group(1)} runs (np.allclose)", "–", "–", "–", target="equal",
                        met=eq.group(2) == "True"))
    return rows or [row("scaling", "`naps` 2 workers vs 1")]


def parse_codecs(out: str) -> list[dict]:
    t = {}
    for m in re.finditer(r"^(\S+)\s+\|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\|\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+\|"
                         r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M):
        t[m.group(1)] = [num(x) for x in m.groups()[1:]]
    z, n = t.get("zstd-1"), t.get("none")
    return [
        row("codecs", "zstd-1 (chosen) vs none: acts write GB/s (ratio column: acts compression ratio)",
            z and z[1], n and n[1], z and z[0], unit="GB/s"),
        row("codecs", "zstd-1 vs none: acts cold read GB/s (ratio: read speed)", z and z[2], n and n[2],
            z[2] / n[2] if z and n else None, unit="GB/s"),
    ]


def parse_extract(out: str) -> list[dict]:
    c = search(r"^\(c\) run_extraction\s+" + NUM + r"\s+" + NUM, out)
    s = search(r"^s = 1/\(1/a \+ 1/b\).*?\s" + NUM + r"\s+" + NUM, out)
    a = search(r"^\(a\) model only.*?\s" + NUM + r"\s+" + NUM, out)
    b = search(r"^\(b\) Zarr writes only, 2 writer threads\s+" + NUM + r"\s+" + NUM, out)
    cs = search(r"^c/s\s+= ([\d.]+)\s+\(target >= ([\d.]+)\)", out)
    cm = search(r"^c/min\(a,b\) = ([\d.]+)", out)
    e2e = search(r"end to end inntrospect\.extract\(\): [\d.]+ s = " + NUM + " samples/s", out)
    cv = c and num(c.group(2))
    mn = min(num(a.group(2)), num(b.group(2))) if a and b else None
    return [
        row("extract", "`run_extraction` (c) vs serial model-then-writes s = 1/(1/a+1/b)", cv, s and num(s.group(2)),
            cs and num(cs.group(1)), cs and num(cs.group(2)), unit="samples/s"),
        row("extract", "(c) vs min(model alone, writes alone) (1.0 = fully overlapped)", cv, mn,
            cm and num(cm.group(1)), unit="samples/s"),
        row("extract", "`inntrospect.extract()` end to end (model load included)", e2e and num(e2e.group(1)),
            "–", "–", unit="samples/s") if e2e else
        row("extract", "`inntrospect.extract()` end to end"),
    ]


def parse_checksum(out: str) -> list[dict]:
    rates = {}
    for m in re.finditer(r"^(naps\(store(?:, aligned=True)?\)|run_extraction), (with|without) checksums\s+"
                         + NUM + r"\s+" + NUM, out, re.M):
        rates[(m.group(1), m.group(2))] = num(m.group(4))
    rows = []
    for what, label, unit in (("naps(store)", "`naps(store)` with vs without crc32c", "GB/s"),
                              ("naps(store, aligned=True)", "`naps(store, aligned=True)` with vs without crc32c "
                               "(raw gradients: the worst case)", "GB/s"),
                              ("run_extraction", "extraction with vs without crc32c", "samples/s")):
        w, wo = rates.get((what, "with")), rates.get((what, "without"))
        rows.append(row("checksum", label, w, wo, w / wo if w and wo else None, 0.95, unit=unit))
    return rows


def parse_exemplars(out: str) -> list[dict]:
    """bench_exemplars: one pass for NAPs and exemplars against the NAP pass alone; the statistics' cost."""
    rows = []
    m = search(r"^one pass vs NAPs alone: b / bx = " + NUM + r" \(target >= 0.8\); aligned: ba / bax = " + NUM, out)
    if m:
        rows.append(row("exemplars", "NAP pass alone vs NAPs + exemplars in one pass (b / bx)",
                        ratio=num(m.group(1)), target=0.8))
        rows.append(row("exemplars", "aligned NAP pass alone vs aligned NAPs + exemplars (ba / bax)",
                        ratio=num(m.group(2)), target=0.8))
    c = search(r"^\(c\) contrast step: " + NUM + r" s without statistics, " + NUM + r" s with", out)
    if c:
        rows.append(row("exemplars", "contrast step without / with statistics (s)", num(c.group(2)),
                        num(c.group(1)), num(c.group(1)) / num(c.group(2)), ">= 0.95", unit="s"))
    return rows or [row("exemplars", "NAPs and exemplars in one pass")]


def parse_extract_torch(out: str) -> list[dict]:
    """bench_extract_torch: PyTorch extraction against the serial combination of bare model and writes."""
    m = search(r"^c/s\s+= " + NUM, out)
    return [row("extract-torch", "PyTorch extraction vs 1/(1/a + 1/b) (bare torch loop a, bare writes b)",
                ratio=num(m.group(1)) if m else None, target=1.0)]


def parse_append(out: str) -> list[dict]:
    """bench_append: the incremental NAP update after appending against a full NAP pass (u / f <= 0.15)."""
    rows = []
    for m in re.finditer(r"^(raw|aligned)\s+" + NUM + r" s\s+" + NUM + r" s\s+" + NUM, out, re.M):
        f, u = num(m.group(2)), num(m.group(3))
        rows.append(row("append", f"NAP update after appending 10 % ({m.group(1)}) vs a full NAP pass, "
                        "persisted (s; ratio full / update)", u, f, f / u, "update <= 0.15 x full",
                        u / f <= 0.15, unit="s"))
    return rows or [row("append", "incremental NAPs after an append")]


def parse_extract_cluster(out: str) -> list[dict]:
    rate = {}
    for m in re.finditer(r'^(in-process \(where="local"\)|LocalCluster (\d) workers? x 1 thread(?: \(of 2, --quick\))?)'
                         r"\s+" + NUM + r"\s+\d+\.\d+\s", out, re.M):
        rate["local" if m.group(2) is None else int(m.group(2))] = num(m.group(3))
    loc, one, two = rate.get("local"), rate.get(1), rate.get(2)
    r21 = search(r"^2 workers / 1 worker = ([\d.]+)x", out)
    blocks = search(r"chunk_mib ([\d.]+): (\d+) blocks", out)
    how = f", chunk_mib {blocks.group(1)}, {blocks.group(2)} blocks" if blocks else ""
    rows = [
        row("extract-cluster", f"`extract()` on LocalCluster 2 workers x 1 thread vs in-process (`where=\"local\"`)"
            f"{how}", two, loc, two / loc if two and loc else None, unit="samples/s"),
        row("extract-cluster", "`extract()` on LocalCluster 2 workers vs 1 worker", two, one,
            num(r21.group(1)) if r21 else (two / one if two and one else None), "<= 2x on 2 cores", unit="samples/s"),
        row("extract-cluster", "`extract()` on LocalCluster 1 worker vs in-process", one, loc,
            one / loc if one and loc else None, unit="samples/s"),
    ]
    eq = search(r"results equal to the in-process run .*?across all (\d+) runs: (\w+)", out)
    if eq:
        rows.append(row("extract-cluster", f"stored acts, grads, predictions equal to in-process across {eq.group(1)} "
                        "runs (np.array_equal)", "–", "–", "–", target="equal", met=eq.group(2) == "True"))
    return rows


def parse_e2e(out: str) -> list[dict]:
    """bench_e2e's targets table (what | before | now | target | met?) and its side-by-side line."""
    rows = []
    sec = out.split("### Targets", 1)[1] if "### Targets" in out else ""
    for m in re.finditer(r"^\| (.+?) \| (.+?) \| (.+?) \| (.+?) \| (yes|no|–) \|$", sec, re.M):
        what, before, now, target, met = m.groups()
        b, n = re.match(NUM + r"(?:–[\d.]+)? (s|GB)", before), re.match(NUM + " (s|GB)", now)
        rows.append(row("e2e", f"{what} (baseline: before this change)", now, before,
                        num(b.group(1)) / num(n.group(1)) if b and n and b.group(2) == n.group(2) else "–", target,
                        None if met == "–" else met == "yes"))
    sbs = search(r"^side by side, flatten_8 layout in a fresh process: reference " + NUM + r" s, ours " + NUM
                 + r" s, ratio " + NUM + "x", out)
    if sbs:
        rows.append(row("e2e", "flatten_8 layout in a fresh process (imports included): ours vs the reference "
                        "recipe (s)", num(sbs.group(2)), num(sbs.group(1)), num(sbs.group(3)), unit="s"))
    return rows or [row("e2e", "`inntrospect run` and each step in fresh processes")]


def parse_startup(out: str) -> list[dict]:
    """bench_startup's speed-up lines: umap-learn as is against umapfit, fresh processes."""
    rows = []
    for m in re.finditer(r"^speed-up (UMAP \d+ points): cold " + NUM + "x, warm " + NUM + "x", out, re.M):
        rows.append(row("startup", f"{m.group(1)}, fresh process, cold cache (as is / ours)",
                        ratio=num(m.group(2))))
        rows.append(row("startup", f"{m.group(1)}, fresh process, warm cache (as is / ours)",
                        ratio=num(m.group(3))))
    imp = search(r"^speed-up import umap: " + NUM + "x", out)
    if imp:
        rows.append(row("startup", "import umap (as is imports TensorFlow)", ratio=num(imp.group(1))))
    return rows or [row("startup", "UMAP start-up costs in fresh processes")]


PARSERS = {"align": parse_align, "circle": parse_circle, "layout": parse_layout, "naps": parse_naps,
           "exemplars": parse_exemplars, "extract-torch": parse_extract_torch, "append": parse_append,
           "scaling": parse_scaling, "codecs": parse_codecs, "extract": parse_extract, "checksum": parse_checksum,
           "extract-cluster": parse_extract_cluster, "startup": parse_startup, "e2e": parse_e2e}


# -- machine ------------------------------------------------------------------------
def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, AttributeError):
        pass
    vers = {}
    for p in PACKAGES:
        try:
            vers[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            pass
    return {"cores": os.cpu_count(), "memory": mem, "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "versions": vers}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="run every script with --quick")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--out", type=Path, default=None, help="also write the summary as markdown to this file")
    p.add_argument("--logs", type=Path, default=None,
                   help="directory for each script's full output (default: beside --out, else not kept)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()] or BENCHES
    bad = [n for n in names if n not in BENCHES]
    if bad:
        p.error(f"unknown benchmark(s) {bad}; choose from {BENCHES}")
    logs = a.logs or (a.out.with_suffix("").with_name(a.out.stem + "_logs") if a.out else None)
    if logs:
        logs.mkdir(parents=True, exist_ok=True)

    mach = machine()
    started = datetime.datetime.now().astimezone()
    print(f"{started:%Y-%m-%d %H:%M %Z}: {len(names)} benchmark(s){' --quick' if a.quick else ''}; "
          f"load average {load()}", flush=True)
    rows, runs = [], []
    for name in names:
        script = HERE / f"bench_{name.replace('-', '_')}.py"
        cmd = [sys.executable, str(script)] + (["--quick"] if a.quick else [])
        l0 = load()
        print(f"  {name:<15} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=HERE.parent)
            rc, out, err = res.returncode, res.stdout, res.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), ""
        secs = time.perf_counter() - t0
        l1 = load()
        print(f"{secs:6.1f} s, exit {rc}, load {l0} -> {l1}", flush=True)
        if logs:
            (logs / f"{name}.out").write_text(out)
            (logs / f"{name}.err").write_text(err)
        try:
            got = PARSERS[name](out) if rc == 0 else [row(name, f"FAILED (exit {rc}): {err.strip()[-200:]}")]
        except Exception as exc:  # a parser that breaks on changed output must not lose the other results
            got = [row(name, f"(could not parse the output: {type(exc).__name__}: {exc})")]
        rows += got
        runs.append({"name": name, "cmd": " ".join(["python", f"benchmarks/{script.name}"] + cmd[2:]),
                     "seconds": secs, "rc": rc, "load": (l0, l1)})

    md = render(rows, runs, mach, started, a.quick)
    print("\n" + md)
    if a.out:
        a.out.write_text(md)
        print(f"written to {a.out}" + (f"; full outputs in {logs}/" if logs else ""))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


def render(rows, runs, mach, started, quick) -> str:
    lines = [f"## Benchmark summary ({'--quick: tiny sizes, NOT representative' if quick else 'full sizes'})", "",
             f"- date: {started:%Y-%m-%d %H:%M %Z}; finished {datetime.datetime.now().astimezone():%H:%M}",
             f"- machine: {mach['cores']} cores, {mach['memory']}, {mach['cpu']}; {mach['platform']}",
             f"- Python {mach['python']}; " + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()),
             "- ratio = ours / baseline in speed (or baseline time / our time); the targets are the ones the "
             "scripts print (align's 5x and circle's 30x are the issues', see README)", "",
             "| benchmark | what is compared | ours | baseline | ratio | target | met? |",
             "| --- | --- | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        met = r["met"] + (" (quick)" if quick and r["met"] != "–" else "")
        lines.append(f"| {r['bench']} | {r['what']} | {r['ours']} | {r['base']} | {r['ratio']} | {r['target']} "
                     f"| {met} |")
    lines += ["", "| script | command | s | exit | load average before → after (1, 5, 15 min) |",
              "| --- | --- | ---: | --- | --- |"]
    for r in runs:
        lines.append(f"| {r['name']} | `{r['cmd']}` | {r['seconds']:.0f} | {r['rc']} | {r['load'][0]} → "
                     f"{r['load'][1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
