"""Does an incremental NAP update after appending 10 % cost at most 15 % of a full NAP pass? Side by side.

What is compared
----------------
A store written with the public writer API (``inntrospect.open_writer``) from
``bench_naps.py``'s store (real MNIST CNN activations and gradients of
``conv2d_24``, ``conv2d_25``, ``flatten_8`` repeated to ``--samples`` samples,
40,000 by default: 4.9 GB of activations, chunks of 256 / 1024 / 1024
samples; built once by that script's code and cached): its first 90 %
(``--fraction``) written, their NAPs persisted, then the other 10 % appended
(``open_writer(..., append=True)``; the old last block is completed, not
written again). Built once and kept at ``--store``. On dask's threaded
scheduler with ``--threads`` threads:

(f)  a full NAP pass, persisted: ``inntrospect.naps(store, persist=True, incremental=False)``;
(u)  the update after the append, persisted: ``inntrospect.naps(store, persist=True)``: the
     stored NAPs of the first 90 % merged with the moments of the new samples,
     read alone (the chunks from the one holding the first new sample).
     Target: u / f <= 0.15.

both unaligned and aligned (alignment fused, on the fly: the gradients are
read too). Besides, the passes alone, without opening the store's results and
persisting (what the two share: the result nodes written through xarray, the
swap, the records, ~0.1-0.2 s here whatever the store's size):

(fp) the full pass computed: ``dask.compute(inntrospect.naps(store))``;
(up) the update's pass: (u) less its time in ``steps.persist`` (the update
     computes before it persists): the stored NAPs read, the chunks of the new
     samples read, their moments merged. Before each run of (u) the store's NAPs and their record are
put back as they were before the append (a copy kept beside the store), so
every run updates the same 90 %. Each is the median of ``--repeats`` runs in
rounds (each method once per round). The page cache is warm; ``--cold``
evicts the store before each run. The updated NAPs are checked against the
full pass (1e-12).

Run::

    python benchmarks/bench_append.py             # 40,000 samples (builds its store once, ~1 min)
    python benchmarks/bench_append.py --quick     # tiny (1,000 samples, 4 MiB chunks)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from bench_naps import SOURCE, STORE, STORE_QUICK, arrays, get_store  # beside this script
from common import evict

BATCH = 512


def _source_arrays(source: Path) -> tuple[dict, dict, list]:
    import zarr

    from inntrospect.store import store_attrs

    layers = store_attrs(source)["layers"]
    root = zarr.open_group(str(source), mode="r")
    acts = {layer: root[f"layers/{layer}/acts"] for layer in layers}
    grads = {layer: root[f"layers/{layer}/grads"] for layer in layers if f"layers/{layer}/grads" in root}
    return acts, grads, layers


def write_rows(writer, acts: dict, grads: dict, lo: int, hi: int) -> None:
    for a in range(lo, hi, BATCH):
        b = min(hi, a + BATCH)
        writer.write({k: v[a:b] for k, v in acts.items()}, {k: v[a:b] for k, v in grads.items()})


def build(path: Path, source: Path, fraction: float, params: list[dict]) -> dict:
    """The appended store, and a copy of its NAPs (and their records) from before the append."""
    import inntrospect
    from inntrospect.store import group_labels, store_attrs, update_attrs

    acts, grads, layers = _source_arrays(source)
    groups = group_labels(source, layers[0])
    n = len(groups)
    n0 = int(round(n * fraction))
    shapes = {layer: tuple(acts[layer].shape[1:]) for layer in layers}
    kw = dict(source={"name": "bench_append", "from": str(source)}, grads=list(grads),
              chunk_mib=(store_attrs(source).get("bench_naps") or {}).get("chunk_mib"))  # its chunks
    t0 = time.perf_counter()
    with inntrospect.open_writer(path, shapes, groups[:n0], overwrite=True, **kw) as w:
        write_rows(w, acts, grads, 0, n0)
    first = time.perf_counter() - t0
    saved = {}
    for p in params:
        inntrospect.naps(path, persist=True, **p)
        key = json.dumps(p, sort_keys=True)
        keep = path.parent / f"{path.name}.naps-{'aligned' if p['aligned'] else 'raw'}"
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(path / "naps", keep)
        saved[key] = {"node": str(keep), "record": store_attrs(path)["steps"]["naps"]}
    t0 = time.perf_counter()
    with inntrospect.open_writer(path, shapes, groups, append=True, **kw) as w:
        assert w.next_sample == n0
        write_rows(w, acts, grads, n0, n)
    appended = time.perf_counter() - t0
    desc = {"n": n, "n0": n0, "source": str(source), "saved": saved, "write_s": first, "append_s": appended}
    update_attrs(path, bench_append=desc)
    return desc


def restore(path: Path, saved: dict) -> None:
    """Put the NAPs of the first samples (and their record) back, as they were before the append."""
    from inntrospect.store import consolidate, store_attrs, update_attrs

    shutil.rmtree(path / "naps", ignore_errors=True)
    shutil.copytree(saved["node"], path / "naps")
    update_attrs(path, steps={**store_attrs(path).get("steps", {}), "naps": saved["record"]})
    consolidate(path)


class PersistTimer:
    """Seconds spent in ``inntrospect.store.steps.persist`` (writing a step's results) while active."""

    def __init__(self):
        from inntrospect.store import steps

        self.steps, self.real, self.seconds = steps, steps.persist, 0.0

    def __enter__(self):
        def persist(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        self.steps.persist = persist
        return self

    def __exit__(self, *exc):
        self.steps.persist = self.real


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=40000)
    p.add_argument("--fraction", type=float, default=0.9, help="the store's samples before the append")
    p.add_argument("--store", type=Path, default=None, help="the appended store (default: beside bench_naps')")
    p.add_argument("--naps-store", type=Path, default=None, help="bench_naps.py's store (its cached default)")
    p.add_argument("--source", type=Path, default=SOURCE, help="as bench_naps.py's --source")
    p.add_argument("--chunk-mib", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true")
    p.add_argument("--rebuild", action="store_true")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats, a.chunk_mib = 1000, 1, a.chunk_mib or 4.0
    src = a.naps_store or Path(str(STORE_QUICK if a.quick else STORE).format(n=a.samples))
    get_store(src, a.source, a.samples, a.chunk_mib, False)
    path = a.store or src.parent / f"append_{a.samples}_{a.fraction:g}.zarr"
    params = [{"aligned": False, "std": False}, {"aligned": True, "std": False}]

    import dask

    import inntrospect
    from inntrospect.store import is_store, store_attrs

    desc = store_attrs(path).get("bench_append") if is_store(path) and not a.rebuild else None
    if not desc or desc["n"] != a.samples or desc["source"] != str(src) \
            or abs(desc["n0"] - round(a.samples * a.fraction)) > 0:
        print(f"building {path}: {round(a.samples * a.fraction)} samples, their NAPs, then the rest appended ...",
              flush=True)
        desc = build(path, src, a.fraction, params)
    acts_gb = sum(x.nbytes for x in arrays(path)) / 1e9
    n, n0 = desc["n"], desc["n0"]
    print(f"store: {path}, {n} samples ({n0} + {n - n0} appended, {100 * (n - n0) / n:.0f} %), "
          f"{acts_gb:.2f} GB of activations; chunks {store_attrs(path)['chunks']}; "
          f"written in {desc['write_s']:.1f} s, the append in {desc['append_s']:.1f} s")
    print(f"threads: {a.threads}; repeats: {a.repeats}; page cache: {'cold' if a.cold else 'warm'}; "
          "a shared, noisy machine: ratios vary by a few points between runs\n")

    results = []
    with dask.config.set(scheduler="threads", num_workers=a.threads):
        for prm in params:
            saved = desc["saved"][json.dumps(prm, sort_keys=True)]
            out: dict = {}
            tf, tu, tfp, tup = [], [], [], []
            for _ in range(a.repeats):  # in rounds: the shared machine's load hits both alike
                if a.cold:
                    evict(path)
                t0 = time.perf_counter()
                out["full"] = inntrospect.naps(path, persist=True, incremental=False, **prm)
                tf.append(time.perf_counter() - t0)
                restore(path, saved)  # the NAPs of the first samples, as before the append (not timed)
                if a.cold:
                    evict(path)
                with PersistTimer() as persisting:
                    t0 = time.perf_counter()
                    out["update"] = inntrospect.naps(path, persist=True, **prm)
                    tu.append(time.perf_counter() - t0)
                tup.append(tu[-1] - persisting.seconds)
                rec = store_attrs(path)["steps"]["naps"]
                assert rec.get("update_of", {}).get("n_samples") == n0, rec  # it did update
                if a.cold:
                    evict(path)
                t0 = time.perf_counter()
                dask.compute(inntrospect.naps(path, **prm))
                tfp.append(time.perf_counter() - t0)
            tf, tu = statistics.median(tf), statistics.median(tu)
            tfp, tup = statistics.median(tfp), statistics.median(tup)
            for layer, ds in out["full"].items():
                np.testing.assert_allclose(out["update"][layer].nap.values, ds.nap.values, rtol=0, atol=1e-12)
            results.append((prm, tf, tu, tfp, tup))
    print(f"{'NAPs':<8} {'(f) full, persisted':>20} {'(u) update, persisted':>22} {'u / f':>6}   "
          f"{'(fp) full pass':>15} {'(up) update pass':>17} {'up / fp':>8}   target <= 0.15")
    for prm, tf, tu, tfp, tup in results:
        what = "aligned" if prm["aligned"] else "raw"
        print(f"{what:<8} {tf:>18.2f} s {tu:>20.2f} s {tu / tf:>6.3f} {'met' if tu / tf <= 0.15 else 'NOT':>3}"
              f" {tfp:>13.2f} s {tup:>15.2f} s {tup / tfp:>8.3f} {'met' if tup / tfp <= 0.15 else 'NOT':>3}"
              f"   ({acts_gb / tfp:.2f} GB/s of activations in the full pass)")
    print(f"\nsamples read by the update: {n - n0} new (from the chunk holding sample {n0}); "
          "its NAPs equal the full pass's to 1e-12")


if __name__ == "__main__":
    main()
