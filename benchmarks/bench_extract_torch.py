"""Is PyTorch extraction as fast as its parts? A bare torch loop, Zarr writes alone, and the real thing.

What is compared
----------------
A small MNIST CNN in PyTorch (``conv1`` 1->C1 3x3, ReLU, max-pool 2, ``conv2``
C1->C2 3x3, ReLU, ``flatten``, ``fc`` -> 10; default C1, C2 = 8, 16; random
weights from seed 0, saved as a ``state_dict``; the factory is a file written
into the temp dir) with layers ``conv1``, ``conv2``, ``flatten`` (inntrospect
adds ``input`` and ``fc``), batch 128, the first ``--samples`` MNIST test
images as (n, 1, 28, 28), in one run:

(a) bare torch: what one writes by hand. Forward hooks keep the three layers'
    outputs, ``torch.autograd.grad`` of the picked (argmax) logit with respect
    to the input and those outputs, ``.numpy()`` of everything; eval mode, the
    corpus already in memory, nothing stored, no layout change. Timed with
    torch's default intra-op threads (a-default) and with 1 thread (a-1); a is
    the faster of the two, so that s below is the best serial combination.
(a2) ``TorchModel.compute(x)``, what the extraction calls: the same, plus a
    copy of each recorded output (in-place safety) and channels-first ->
    channels-last copies of every array of rank >= 3, with its own thread
    count (torch's default minus 2, at least 1: the writers get the rest).
(b) Zarr only: the same arrays written as the extraction writes them (its
    chunk plan and per-array codec choice), no model in the loop, by a pool of
    2 writer threads (bench_extract.py's (b), reused).
(c) ``run_extraction`` of ``prepare_extraction("net.py:make_model", ...,
    weights="model.pt")`` into a fresh temp store (model building timed apart).

Printed: samples/s of a, a2, b, c; s = 1 / (1/a + 1/b), the rate of doing a
then b with no overlap; c/s (target >= 1.0) and c/min(a, b) (1.0 = perfect
overlap); the store's size on disk. Each timed phase starts after
``os.sync()`` and is the median of ``--repeats``.

Run::

    python benchmarks/bench_extract_torch.py                 # 10000 samples
    python benchmarks/bench_extract_torch.py --channels 32,64
    python benchmarks/bench_extract_torch.py --quick         # tiny smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import (  # benchmarks/common.py, beside this script
    print_main_thread,
    print_plan,
    print_rates,
    print_store_size,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
LABELS = ROOT.parent / "shared" / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
LAYERS = ["conv1", "conv2", "flatten"]

NET = '''
import torch
from torch import nn

C1, C2 = {c1}, {c2}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, C1, 3)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(C1, C2, 3)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(C2 * 11 * 11, 10)

    def forward(self, x):
        h = self.pool(self.relu1(self.conv1(x)))
        return self.fc(self.flatten(self.relu2(self.conv2(h))))


def make_model():
    return Net()
'''


# -- (a) ----------------------------------------------------------------------
def bench_bare(net, x: np.ndarray, batch: int) -> float:
    """Forward hooks, autograd.grad, .numpy(): the loop one writes by hand."""
    import torch

    modules = dict(net.named_modules())
    outs: dict = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in LAYERS]
    net.eval()
    try:
        t0 = time.perf_counter()
        for lo in range(0, len(x), batch):
            xt = torch.from_numpy(x[lo : lo + batch]).requires_grad_(True)
            y = net(xt)
            pred = y.detach().argmax(1)
            wrt = [xt, *(outs[n] for n in LAYERS)]
            grads = torch.autograd.grad(y.gather(1, pred[:, None]).sum(), wrt)
            acts = [a.detach().numpy() for a in (*wrt, y)]
            grads = [g.numpy() for g in grads]
            del acts, grads
        return time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()


def bench_compute(m, x: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for lo in range(0, len(x), batch):
        m.compute(x[lo : lo + batch])
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=10000, help="corpus size (default 10000, all of MNIST test)")
    p.add_argument("--batch", type=int, default=128, help="inference batch size")
    p.add_argument("--channels", default="8,16", help="channels of conv1,conv2 (default 8,16)")
    p.add_argument("--chunk-mib", type=float, default=None, help="chunk size (default: the extraction's)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of a, b, c (median)")
    p.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    p.add_argument("--quick", action="store_true", help="tiny run: 512 samples, chunks of 1 MiB, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.repeats = 512, 1
        a.chunk_mib = a.chunk_mib or 1.0
    R = a.repeats
    c1, c2 = (int(c) for c in a.channels.split(","))
    load0 = os.getloadavg()

    t0 = time.perf_counter()
    import torch
    t_torch = time.perf_counter() - t0

    sys.path.insert(0, str(HERE))
    from bench_extract import (
        arrays_of,
        bench_writes,
        fresh,
        instrumented_run,
        precompute,
        time_extractions,
    )

    from inntrospect.extraction.corpus import read_corpus, write_corpus
    from inntrospect.extraction.local import prepare_extraction, run_extraction
    from inntrospect.extraction.prepare import measure_ratios
    from inntrospect.store.codecs import choose_codecs

    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import read_idx

    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_torch-", dir=a.tmp))
    try:
        (tmp / "net.py").write_text(NET.format(c1=c1, c2=c2))
        namespace: dict = {}
        exec(compile((tmp / "net.py").read_text(), str(tmp / "net.py"), "exec"), namespace)
        torch.manual_seed(0)
        net = namespace["make_model"]()
        torch.save(net.state_dict(), tmp / "model.pt")
        net.requires_grad_(False)

        t0 = time.perf_counter()
        images, labels = read_idx(IMAGES)[: a.samples], read_idx(LABELS)[: a.samples]
        csv = write_corpus(images.astype(np.float32)[:, None] / 255.0, labels, tmp / "corpus",
                           targets=labels, per_file=500)
        t_corpus = time.perf_counter() - t0
        corpus = read_corpus(csv)
        n = corpus.n_samples
        x = np.ascontiguousarray(corpus.read(0, n), dtype=np.float32)  # the corpus's samples, its order

        t0 = time.perf_counter()
        ex = prepare_extraction(str(tmp / "net.py") + ":make_model", csv, tmp / "c0.zarr", layers=LAYERS,
                                weights=tmp / "model.pt", batch_size=a.batch, chunk_mib=a.chunk_mib)
        t_load = time.perf_counter() - t0
        m, plan = ex.model, ex.plan
        codecs = choose_codecs(measure_ratios(ex))
        raw_per_sample = sum(info.bytes_per_sample for info, _, _ in arrays_of(m.layers))
        raw = n * raw_per_sample

        default_threads = torch.get_num_threads()
        bench_bare(net, x[: a.batch], a.batch)  # warm-up (allocator, oneDNN kernels)
        ta_default, ta_1, ta2 = [], [], []
        for _ in range(R):
            os.sync()
            ta_default.append(bench_bare(net, x, a.batch))
            torch.set_num_threads(1)
            os.sync()
            ta_1.append(bench_bare(net, x, a.batch))
            torch.set_num_threads(default_threads)
            os.sync()
            ta2.append(bench_compute(m, x, a.batch))
        ta = min(ta_default, ta_1, key=statistics.median)

        n_pre = min(n, 8 * a.batch)
        src = precompute(m, x, a.batch, plan, n_pre)
        tb = []
        for _ in range(R):
            tb.append(bench_writes(fresh(tmp / "b"), m.layers, plan, n, src, 2, codecs))
        shutil.rmtree(tmp / "b")
        del src

        tc, (c_alloc, c_apparent) = time_extractions(ex, tmp, R, run_extraction)
        t_inst, timers = instrumented_run(dataclasses.replace(ex, path=fresh(tmp / "ci.zarr")), run_extraction)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = statistics.median
    ra, ra2, rb, rc = n / med(ta), n / med(ta2), n / med(tb), n / med(tc)
    s = 1.0 / (1.0 / ra + 1.0 / rb)

    print(f"\nPyTorch MNIST CNN (conv {c1}, {c2}), layers {', '.join(i.name for i in m.layers)}; "
          f"{n} samples, batch {a.batch}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_plan(codecs, plan, raw_per_sample, raw, load0[0], R)
    print("\nnot counted in a, b, c:")
    print(f"  import torch               {t_torch:6.2f} s")
    print(f"  prepare_extraction         {t_load:6.2f} s  (builds the model, loads its weights, reads the corpus)")
    print(f"  write_corpus               {t_corpus:6.2f} s")
    print_rates([
        (f"(a-default) bare torch, {default_threads} threads", ta_default, n / med(ta_default)),
        ("(a-1) bare torch, 1 thread", ta_1, n / med(ta_1)),
        ("(a) = the faster of a-default and a-1", ta, ra),
        (f"(a2) TorchModel.compute(), {m.threads} threads", ta2, ra2),
        ("(b) Zarr writes only, 2 writer threads", tb, rb),
        ("(c) run_extraction", tc, rc),
    ], n, s, raw_per_sample)
    print(f"\nc/s        = {rc / s:.2f}   (target >= 1.0)")
    print(f"c/min(a,b) = {rc / min(ra, rb):.2f}   (1.0 = model and writes fully overlapped)")
    print(f"a2/a       = {ra2 / ra:.2f}   (TorchModel.compute against the bare loop)")
    print_store_size(c_alloc, c_apparent, raw)
    print_main_thread(timers, t_inst, n)


if __name__ == "__main__":
    main()
