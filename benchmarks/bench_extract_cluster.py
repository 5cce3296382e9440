"""Extraction on dask workers vs in-process: ``inntrospect.extract`` on 0, 1 and 2 worker processes.

What is compared
----------------
``inntrospect.extract(model, corpus, store, layers, chunk_mib, batch_size=128, where=...)``
of the MNIST CNN (``../shared/models/mnist_cnn_shallow``, layers
``conv2d_24``, ``conv2d_25``, ``flatten_8``; inntrospect adds the input and
output layers) over the first ``--samples`` MNIST test images, timed end to end
(the call as a user makes it: the client loads the model, creates the store and
chooses codecs, the blocks are written, the store is opened):

* in-process: ``where="local"``, no client (the baseline);
* ``LocalCluster(processes=True, n_workers=1, threads_per_worker=1)``, ``where="cluster"``;
* ``LocalCluster(processes=True, n_workers=2, threads_per_worker=1)``, ``where="cluster"``.

Each configuration first runs one untimed warm-up extraction (of
``--warmup-samples`` images, into a store of its own): the in-process one
imports TensorFlow in this process; on a cluster every worker imports
TensorFlow and inntrospect (the script checks that each worker computed a
block). ``--quick`` starts one 2-worker cluster, takes the 1-worker row after
scaling it down to one (already warm) worker, and runs in-process last
without a warm-up of its own (the cluster's warm-up already imported
TensorFlow and loaded the model in this process): worker start-up dominates
at that size; it checks that the script works, its numbers mean little. Then ``--repeats`` timed runs (median), each into a fresh store after
``os.sync()``. Note that a worker prepares (loads and compiles) the model again
for every new extraction, so each timed cluster run includes one model load
per worker: "first block" is when the first block was recorded, "after" the
rate over the rest.

Printed: samples/s per configuration, the ratio to in-process, 2 workers / 1
worker; whether every run's stored acts, grads and predictions of every layer
equal the in-process run's (``np.array_equal`` on the xarray values); worker
peak RSS; load average and versions. Stores live in a temp folder deleted at
the end.

``--chunk-mib`` defaults to 2: the block (the unit a worker computes) is then
128 samples = one batch, 79 blocks for 10,000 images. With ``chunk_mib=1`` the
block is 64 samples and every batch of 128 is half padding (the compiled step
has one shape), so both sides would compute twice the samples they store.

Run::

    python benchmarks/bench_extract_cluster.py              # 10,000 images, 3 repeats (~8 min on 2 cores)
    python benchmarks/bench_extract_cluster.py --repeats 1 --samples 4096
    python benchmarks/bench_extract_cluster.py --quick      # 600 images, 1 repeat, one 2-worker cluster
                                                            # scaled down to 1 for the 1-worker row (~1.5 min)
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Warnings(logging.Handler):
    """Collects the warnings and errors ``distributed`` logs (worker restarts, kills, lost tasks)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])


WARNINGS = _Warnings()


def _quiet_distributed() -> None:
    """INFO lines of ``distributed`` off (it sets its loggers' levels when imported); warnings collected."""
    import distributed  # noqa: F401

    log = logging.getLogger("distributed")
    log.setLevel(logging.WARNING)
    if WARNINGS not in log.handlers:
        log.addHandler(WARNINGS)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "mnist_cnn_shallow"
IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
LABELS = ROOT.parent / "shared" / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
LAYERS = ["conv2d_24", "conv2d_25", "flatten_8"]

LOCAL = 'in-process (where="local")'
W1 = "LocalCluster 1 worker x 1 thread"
W2 = "LocalCluster 2 workers x 1 thread"


def make_corpus(out: Path, n: int) -> Path:
    spec = importlib.util.spec_from_file_location("mnist_make_corpus", ROOT / "examples" / "mnist" / "make_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x, y = mod.read_idx(IMAGES), mod.read_idx(LABELS)
    return mod.write_mnist_corpus(x[:n], y[:n], out, batch=500)


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    t = os.times()
    return t.user + t.system


def extract_timed(corpus: Path, store: Path, a, where: str, client=None) -> dict:
    """One ``inntrospect.extract`` into a fresh ``store``: seconds, CPU seconds, when each block was recorded."""
    import inntrospect

    if store.exists():
        shutil.rmtree(store)
    os.sync()
    stamps: list[float] = []
    w0 = worker_state(client) if client is not None else {}
    c0, t0 = cpu_s(), time.perf_counter()
    inntrospect.extract(str(MODEL), str(corpus), str(store), layers=LAYERS, chunk_mib=a.chunk_mib,
                        batch_size=a.batch_size, where=where,
                        on_block=lambda b, n: stamps.append(time.perf_counter()))
    t, cpu = time.perf_counter() - t0, cpu_s() - c0
    w1 = worker_state(client) if client is not None else {}
    return {"s": t, "first": stamps[0] - t0 if stamps else None, "last": stamps[-1] - t0 if stamps else None,
            "n_blocks": len(stamps), "cpu_client": cpu,
            "cpu_workers": sum(w1[w]["cpu"] - w0[w]["cpu"] for w in w1 if w in w0)}


def read_all(store: Path) -> dict:
    """``{(layer, var): values}`` of every layer's acts, grads and predictions, via the xarray tree."""
    import inntrospect

    tree = inntrospect.open_store(str(store))
    out = {}
    for name, node in tree["layers"].children.items():
        ds = node.to_dataset()
        for var in ("acts", "grads", "prediction"):
            if var in ds.variables:
                out[(name, var)] = np.asarray(ds[var].values)
    return out


def equal_to(ref: dict, got: dict) -> tuple[bool, list[str]]:
    bad = [f"{k[0]}/{k[1]}" for k in ref if k not in got or not np.array_equal(ref[k], got[k])]
    bad += [f"{k[0]}/{k[1]} (extra)" for k in got if k not in ref]
    return not bad, bad


def _probe():
    """Runs on a worker: model preparations so far, CPU seconds, peak and current RSS (MB), pid."""
    from inntrospect.extraction import distributed as de

    status = Path("/proc/self/status").read_text()
    kb = {k: int(line.split()[1]) for line in status.splitlines()
          for k in ("VmHWM", "VmRSS") if line.startswith(k + ":")}
    t = os.times()
    return {"loads": de.MODEL_LOADS["count"], "peak_mb": kb.get("VmHWM", 0) / 1024, "rss_mb": kb.get("VmRSS", 0) / 1024,
            "pid": os.getpid(), "cpu": t.user + t.system}


def worker_state(client) -> dict:
    return client.run(_probe)


def timed_config(label: str, corpus: Path, warm_corpus: Path, tmp: Path, a, ref_holder: dict, client=None,
                 warm: bool = True) -> dict:
    """Warm-up (unless ``warm`` is False: already warm), then ``a.repeats`` timed runs, each checked."""
    where = "local" if client is None else "cluster"
    tag = "".join(ch for ch in label if ch.isalnum())[:24]
    info = {"label": label, "ts": [], "firsts": [], "lasts": [], "cpu_client": [], "cpu_workers": [],
            "equal": [], "bad": [], "warmup": None}
    if client is not None:
        info["pids"] = {w: s["pid"] for w, s in worker_state(client).items()}
    if warm:
        t0 = time.perf_counter()
        extract_timed(warm_corpus, tmp / f"warmup_{tag}.zarr", a, where)
        info["warmup"] = time.perf_counter() - t0
        shutil.rmtree(tmp / f"warmup_{tag}.zarr", ignore_errors=True)
    if client is not None:
        ws = worker_state(client)
        info["warm_loads"] = {w: s["loads"] for w, s in ws.items()}
        idle = [w for w, s in ws.items() if s["loads"] == 0]
        if idle:
            print(f"  warning: {label}: worker(s) {idle} computed no block during the warm-up", flush=True)
    info["load0"] = os.getloadavg()
    for r in range(a.repeats):
        store = tmp / f"{tag}_{r}.zarr"
        res = extract_timed(corpus, store, a, where, client)
        for k in ("first", "last", "cpu_client", "cpu_workers"):
            info[k + "s" if k in ("first", "last") else k].append(res[k])
        info["ts"].append(res["s"])
        info["n_blocks"] = res["n_blocks"]
        got = read_all(store)
        if ref_holder.get("ref") is None and client is None:
            ref_holder["ref"] = got  # the first in-process run is the reference
            info["equal"].append(True)
            for other, g in ref_holder.pop("pending", []):  # --quick: cluster runs made before it
                ok, bad = equal_to(got, g)
                other["equal"].append(ok)
                other["bad"] += bad
        elif ref_holder.get("ref") is None:
            ref_holder.setdefault("pending", []).append((info, got))
        else:
            ok, bad = equal_to(ref_holder["ref"], got)
            info["equal"].append(ok)
            info["bad"] += bad
        del got
        shutil.rmtree(store, ignore_errors=True)
    info["load1"] = os.getloadavg()
    if client is not None:
        info["workers"] = worker_state(client)
        info["alive"] = all(info["pids"].get(w) == s["pid"] for w, s in info["workers"].items())
    print(f"  {label}: done, {', '.join(f'{t:.2f}' for t in info['ts'])} s; load {os.getloadavg()[0]:.2f}",
          flush=True)
    return info


def cluster_configs(n_workers: int, labels: list[str], corpus: Path, warm_corpus: Path, tmp: Path, a,
                    ref_holder: dict) -> list[dict]:
    """A ``LocalCluster`` of ``n_workers``; with two labels, the second after scaling down to one worker."""
    import dask
    from distributed import Client, LocalCluster

    _quiet_distributed()
    out = []
    with dask.config.set({"distributed.logging.distributed": "warning"}):
        t0 = time.perf_counter()
        with LocalCluster(processes=True, n_workers=n_workers, threads_per_worker=1,
                          dashboard_address=None) as lc, Client(lc) as client:
            client.wait_for_workers(n_workers)
            start = time.perf_counter() - t0
            out.append(timed_config(labels[0], corpus, warm_corpus, tmp, a, ref_holder, client))
            out[-1]["start"] = start
            if len(labels) > 1:  # --quick: the same, already warm workers, one of them retired
                lc.scale(1)
                deadline = time.time() + 30
                while len(client.scheduler_info()["workers"]) > 1 and time.time() < deadline:
                    time.sleep(0.1)
                out.append(timed_config(labels[1], corpus, warm_corpus, tmp, a, ref_holder, client, warm=False))
            t1 = time.perf_counter()
        out[-1]["close"] = time.perf_counter() - t1
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000, help="MNIST test images to extract (default 10000)")
    p.add_argument("--warmup-samples", type=int, default=1024, help="images of the untimed warm-up extraction")
    p.add_argument("--chunk-mib", type=float, default=2.0,
                   help="chunk_mib of the extraction (default 2: blocks of 128 samples = one batch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median)")
    p.add_argument("--quick", action="store_true", help="600 images, 1 repeat, warm-up of 256, one cluster (~1.5 min)")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats, a.warmup_samples = 600, 1, 256
    for f in (MODEL, IMAGES, LABELS):
        if not f.exists():
            sys.exit(f"{f} not found: this benchmark needs ../shared (MNIST data and models) beside the checkout")

    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_cluster-"))
    t_all = time.perf_counter()
    try:
        corpus = make_corpus(tmp / "corpus", a.samples)
        warm = make_corpus(tmp / "warm_corpus", min(a.warmup_samples, a.samples))
        results: list[dict] = []
        ref: dict = {}
        if a.quick:
            # one cluster (its workers' warm-up dominates): 2 workers, then scaled down to 1; then in-process,
            # already warm: the cluster's warm-up imported TensorFlow and loaded the model in this process too
            two, one = cluster_configs(2, [W2, W1 + " (of 2, --quick)"], corpus, warm, tmp, a, ref)
            results += [timed_config(LOCAL, corpus, warm, tmp, a, ref, warm=False), one, two]
        else:
            results.append(timed_config(LOCAL, corpus, warm, tmp, a, ref))
            results += cluster_configs(1, [W1], corpus, warm, tmp, a, ref)
            results += cluster_configs(2, [W2], corpus, warm, tmp, a, ref)
        w1, w2 = results[1]["label"], results[2]["label"]
        nbytes = sum(v.nbytes for (_, var), v in ref["ref"].items() if var != "prediction")
        del ref

        import dask
        import distributed
        import tensorflow as tf

        med = statistics.median
        print(f"\nMNIST CNN {MODEL.name}, layers {', '.join(LAYERS)} (+ input, output); {a.samples} MNIST test "
              f"images; batch {a.batch_size}; chunk_mib {a.chunk_mib:g}: {results[0]['n_blocks']} blocks; "
              f"{nbytes / 1e9:.2f} GB of acts + grads")
        print(f"{os.cpu_count()} cores; tensorflow {tf.__version__}, dask {dask.__version__}, "
              f"distributed {distributed.__version__}; load average at start "
              f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
        print(f"timed: inntrospect.extract() end to end, median of {a.repeats}; each after one untimed warm-up "
              f"extraction of {min(a.warmup_samples, a.samples)} images in the same process / on the same cluster")
        hdr = (f"{'':<46} {'samples/s':>10} {'s':>7} {'range s':>13} {'vs in-process':>13} {'first block s':>13} "
               f"{'after: samples/s':>16} {'CPU cores':>9} {'start s':>7} {'warm-up s':>9} {'close s':>7} "
               f"{'load avg (1 min)':>16}")
        print("\n" + hdr)
        print("-" * len(hdr))
        rate = {}
        for r in results:
            t = med(r["ts"])
            rate[r["label"]] = a.samples / t
            first, last = med(r["firsts"]), med(r["lasts"])
            per_block = a.samples / r["n_blocks"]
            after = (r["n_blocks"] - 1) * per_block / (last - first) if r["n_blocks"] > 1 and last > first else None
            cores = (sum(r["cpu_client"]) + sum(r["cpu_workers"])) / sum(r["ts"])
            start = f"{r['start']:.1f}" if "start" in r else "-"
            close = f"{r['close']:.1f}" if "close" in r else "-"
            warmup = f"{r['warmup']:.2f}" if r["warmup"] is not None else "-"
            print(f"{r['label']:<46} {rate[r['label']]:>10,.0f} {t:>7.2f} {min(r['ts']):>6.2f}-{max(r['ts']):<6.2f} "
                  f"{rate[r['label']] / rate[LOCAL]:>12.2f}x {first:>13.2f} "
                  f"{f'{after:,.0f}' if after else '-':>16} {cores:>9.2f} {start:>7} {warmup:>9} {close:>7} "
                  f"{r['load0'][0]:>7.2f}-{r['load1'][0]:<7.2f}")
        print("(first block s: when the first block was recorded (model load, store creation, codec choice, "
              "compilation);\n after: samples/s from the first block's record to the last; CPU cores: CPU seconds "
              "of this process + the workers / wall seconds of the timed runs)")
        print()
        print(f"2 workers / 1 worker = {rate[w2] / rate[w1]:.2f}x")
        print(f"2 workers / in-process = {rate[w2] / rate[LOCAL]:.2f}x;  1 worker / in-process = "
              f"{rate[w1] / rate[LOCAL]:.2f}x")
        for r in results[1:]:
            ws = r["workers"]
            print(f"{r['label']}: model prepared per worker (after warm-up, after the timed runs): "
                  + "; ".join(f"{r['warm_loads'][w]} -> {s['loads']}" for w, s in ws.items())
                  + "; RSS peak " + ", ".join(f"{s['peak_mb']:.0f}" for s in ws.values()) + " MB, at the end "
                  + ", ".join(f"{s['rss_mb']:.0f}" for s in ws.values()) + " MB"
                  + f"; workers alive throughout (same pids): {r['alive']}")
        print(f"distributed warnings and errors logged: {len(WARNINGS.messages)}"
              + "".join(f"\n  {m}" for m in dict.fromkeys(WARNINGS.messages)))
        runs = sum(len(r["equal"]) for r in results)
        all_eq = all(all(r["equal"]) for r in results)
        print(f"\nresults equal to the in-process run (acts, grads, predictions of every layer, np.array_equal) "
              f"across all {runs} runs: {all_eq}")
        for r in results:
            if r["bad"]:
                print(f"  DIFFERENT in {r['label']}: {', '.join(sorted(set(r['bad'])))}")
        print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"total {time.perf_counter() - t_all:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
