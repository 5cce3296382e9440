"""Compare Zarr v3 codecs on real activations and gradients of the MNIST CNN.

What is compared
----------------
The MNIST CNN (``../shared/models/mnist_cnn_shallow``, layers ``conv2d_24``,
``conv2d_25``, ``flatten_8`` plus the input and output layers that inntrospect
always adds) is run over the first ``--samples`` MNIST test images with
inntrospect's own loader (``KerasModel.compute``), in batches of 256. Every
layer's activations and gradients are then written, once per candidate codec,
into fresh Zarr v3 arrays on local disk (``zarr.create_array`` with chunks
along the sample axis only, ``arr[:] = data``), and read back.

Per codec, separately for activations, gradients and both together:

* ``ratio``: uncompressed bytes / bytes of the arrays' files on disk;
* ``write GB/s``: uncompressed bytes / seconds of ``arr[:] = data`` over all
  layers (median of ``--repeats``; into the page cache, no fsync, as the
  extraction writes; fill value NaN and ``write_empty_chunks=False`` as in the
  store, see ``--write-empty-chunks``);
* ``read GB/s``: uncompressed bytes / seconds of reading every array whole
  (Zarr's concurrent chunk reads) into a reused, already touched buffer, after
  the files were fsynced and dropped from the page cache with
  ``posix_fadvise(DONTNEED)`` (cold; median of ``--repeats``).

Also printed: each codec's single-threaded CPU cost (``numcodecs`` encode and
decode of every chunk in memory, GB/s of uncompressed data: what the codec
takes from the 2 cores the model also needs), how sparse each layer's arrays
are, and each codec's ratio per layer.

Run::

    python benchmarks/bench_codecs.py                # 2048 samples
    python benchmarks/bench_codecs.py --samples 4096
    python benchmarks/bench_codecs.py --quick        # tiny smoke run

(``--quick`` writes only a few MB; loading TensorFlow and the model still takes
about 10 s of its run time.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import evict  # benchmarks/common.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT.parent / "shared" / "models" / "mnist_cnn_shallow"
IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
LAYERS = ["conv2d_24", "conv2d_25", "flatten_8"]


def candidates():
    """``(label, codec or None)`` for every codec compared."""
    from zarr.codecs import BloscCodec, ZstdCodec

    return [
        ("none", None),
        ("zstd-1", ZstdCodec(level=1)),
        ("zstd-3", ZstdCodec(level=3)),
        ("blosc-lz4-shuffle", BloscCodec(cname="lz4", shuffle="shuffle")),
        ("blosc-lz4-noshuffle", BloscCodec(cname="lz4", shuffle="noshuffle")),
        ("blosc-zstd1-bitshuffle", BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle")),
        ("blosc-lz4-bitshuffle", BloscCodec(cname="lz4", shuffle="bitshuffle")),
    ]


def load_images(n: int) -> np.ndarray:
    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import read_idx

    x = read_idx(IMAGES)[:n]
    return (x.astype(np.float32) / 255.0)[..., None]


def compute_arrays(model_path: Path, n: int, batch: int = 256):
    """Real arrays of ``n`` samples: ``{"acts": {layer: array}, "grads": {layer: array}}``."""
    from inntrospect.extraction.models.keras import load_model

    t0 = time.perf_counter()
    m = load_model(str(model_path), layers=LAYERS)
    t_load = time.perf_counter() - t0
    x = load_images(n)
    parts = {"acts": [[] for _ in m.layers], "grads": [[] for _ in m.layers]}
    t0 = time.perf_counter()
    for lo in range(0, len(x), batch):
        acts, grads, _ = m.compute(x[lo : lo + batch])
        for i, a in enumerate(acts):
            parts["acts"][i].append(a)
        for i, g in enumerate(grads):
            parts["grads"][i].append(g)
    t_compute = time.perf_counter() - t0
    out = {"acts": {}, "grads": {}}
    for var in out:
        for info, chunks in zip(m.layers, parts[var]):
            if chunks:
                out[var][info.name] = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    return out, t_load, t_compute


def disk_bytes(path: Path) -> int:
    """Sum of the file sizes under ``path`` (chunks plus the small zarr.json files)."""
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
    )


def write_set(base: Path, data: dict, codec, chunk: int, write_empty_chunks: bool = False) -> float:
    """Write every array of ``data`` into fresh Zarr arrays under ``base``; return seconds.

    The arrays are made like the store's: fill value NaN (what xarray gives
    float arrays) and Zarr's default ``write_empty_chunks=False``, under which
    Zarr compares every chunk with the fill value before encoding it. (With
    fill value 0.0 that comparison runs at ~0.4 GB/s on sparse activations and
    would dominate this benchmark; with NaN at ~5 GB/s.)
    """
    import zarr

    compressors = None if codec is None else [codec]
    arrays = []
    for name, a in data.items():  # array creation (metadata only) is not timed
        arr = zarr.create_array(
            store=str(base / name), shape=a.shape, chunks=(min(chunk, len(a)), *a.shape[1:]),
            dtype="float32", compressors=compressors, fill_value=np.nan,
            config={"write_empty_chunks": write_empty_chunks},
        )
        arrays.append((arr, a))
    t0 = time.perf_counter()
    for arr, a in arrays:
        arr[:] = a
    return time.perf_counter() - t0


def read_set(base: Path, data: dict, buffers: dict) -> float:
    """Read every array under ``base`` whole into its reused buffer; return seconds."""
    import zarr
    from zarr.core.buffer import cpu

    evict(base)
    t0 = time.perf_counter()
    for name in data:
        arr = zarr.open_array(str(base / name), mode="r")
        arr.get_basic_selection(Ellipsis, out=cpu.NDBuffer.from_numpy_array(buffers[name]))
    return time.perf_counter() - t0


def numcodecs_twin(codec):
    """The ``numcodecs`` codec doing what the Zarr v3 ``codec`` does (None for no codec)."""
    import numcodecs
    from zarr.codecs import BloscCodec, ZstdCodec

    if codec is None:
        return None
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level)
    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[codec.shuffle.value]
        return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=shuffle, typesize=4)
    raise TypeError(codec)


def cpu_cost(data: dict, chunk: int, repeats: int) -> dict:
    """Single-threaded in-memory encode and decode GB/s of every chunk, per codec."""
    from numcodecs import blosc

    blosc.use_threads = False
    pieces = [a[lo : lo + chunk] for d in data.values() for a in d.values() for lo in range(0, len(a), chunk)]
    raw = sum(x.nbytes for x in pieces)
    outs = [np.empty_like(x) for x in pieces]
    result = {}
    for label, codec in candidates():
        nc = numcodecs_twin(codec)
        if nc is None:
            continue
        enc_t, dec_t = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoded = [nc.encode(x) for x in pieces]
            enc_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for e, o in zip(encoded, outs):
                nc.decode(e, out=o)
            dec_t.append(time.perf_counter() - t0)
        assert all(np.array_equal(o, x) for o, x in zip(outs, pieces)), label
        ratio = raw / sum(len(e) for e in encoded)
        result[label] = (raw / statistics.median(enc_t) / 1e9, raw / statistics.median(dec_t) / 1e9, ratio)
    return result


def bench(data: dict, chunk: int, repeats: int, tmp: Path, check: bool = True,
          write_empty_chunks: bool = False) -> list[dict]:
    buffers = {var: {k: np.ones_like(v) for k, v in d.items()} for var, d in data.items()}
    rows = []
    for label, codec in candidates():
        row = {"codec": label, "layer_ratio": {}}
        for var, d in data.items():
            raw = sum(a.nbytes for a in d.values())
            writes, reads = [], []
            for r in range(repeats):
                base = tmp / f"{label}-{var}-{r}"
                os.sync()  # earlier runs' dirty pages are not this run's cost
                writes.append(write_set(base, d, codec, chunk, write_empty_chunks))
                reads.append(read_set(base, d, buffers[var]))
                if r == 0:
                    on_disk = disk_bytes(base)
                    for name in d:
                        row["layer_ratio"][(var, name)] = d[name].nbytes / disk_bytes(base / name)
                    if check:
                        for name, a in d.items():
                            assert np.array_equal(buffers[var][name], a), (label, var, name)
                shutil.rmtree(base)
            row[var] = {
                "raw": raw, "disk": on_disk,
                "write_s": statistics.median(writes), "read_s": statistics.median(reads),
            }
        rows.append(row)
    return rows


def print_tables(rows: list[dict], data: dict, cpu: dict, chunk: int) -> None:
    def gbs(nbytes, s):
        return nbytes / s / 1e9

    head = f"{'codec':<24}" + "".join(
        f" | {v + ' ratio':>11} {'write':>6} {'read':>6}" for v in ("acts", "grads", "all")
    )
    print("\nratio = uncompressed / on disk; write, read in GB/s of uncompressed data "
          "(median; read is cold, after fsync + fadvise DONTNEED)")
    print(head)
    print("-" * len(head))
    for row in rows:
        a, g = row["acts"], row["grads"]
        tot = {k: a[k] + g[k] for k in ("raw", "disk", "write_s", "read_s")}
        cells = ""
        for c in (a, g, tot):
            cells += (f" | {c['raw'] / c['disk']:>11.2f} {gbs(c['raw'], c['write_s']):>6.2f}"
                      f" {gbs(c['raw'], c['read_s']):>6.2f}")
        print(f"{row['codec']:<24}{cells}")

    print(f"\nCPU cost, 1 thread, in memory, acts+grads in {chunk}-sample chunks (numcodecs)")
    print(f"{'codec':<24} {'encode GB/s':>11} {'decode GB/s':>11} {'ratio':>6}")
    for label, (enc, dec, ratio) in cpu.items():
        print(f"{label:<24} {enc:>11.2f} {dec:>11.2f} {ratio:>6.2f}")

    keys = [(var, name) for var, d in data.items() for name in d]
    print("\nper-layer compression ratio (and fraction of exact zeros, size)")
    print(f"{'array':<28} {'zeros':>6} {'MB':>7} " + " ".join(f"{r['codec'][:12]:>12}" for r in rows))
    for var, name in keys:
        a = data[var][name]
        zeros = 1.0 - np.count_nonzero(a) / a.size
        print(f"{var + '/' + name:<28} {zeros:>6.1%} {a.nbytes / 1e6:>7.1f} "
              + " ".join(f"{r['layer_ratio'][(var, name)]:>12.2f}" for r in rows))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2048, help="samples to compute (default 2048)")
    p.add_argument("--chunk", type=int, default=256, help="chunk length along the sample axis")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per codec (median)")
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    p.add_argument("--write-empty-chunks", action="store_true",
                   help="skip Zarr's per-chunk comparison with the fill value (the store does not)")
    p.add_argument("--quick", action="store_true", help="tiny run: 128 samples, chunk 32, 1 repeat")
    a = p.parse_args(argv)
    if a.quick:
        a.samples, a.chunk, a.repeats = 128, 32, 1

    import zarr

    data, t_load, t_compute = compute_arrays(a.model, a.samples)
    n_raw = sum(x.nbytes for d in data.values() for x in d.values())
    load0 = os.getloadavg()[0]
    print(f"zarr {zarr.__version__}; {a.samples} samples, chunk {a.chunk} samples, "
          f"{a.repeats} repeats, fill NaN, write_empty_chunks={a.write_empty_chunks}; model load {t_load:.1f} s, compute {t_compute:.1f} s "
          f"({a.samples / t_compute:,.0f} samples/s)")
    print(f"arrays: {len(data['acts'])} acts ({sum(x.nbytes for x in data['acts'].values()) / 1e6:.0f} MB), "
          f"{len(data['grads'])} grads ({sum(x.nbytes for x in data['grads'].values()) / 1e6:.0f} MB), "
          f"{n_raw / 1e6:.0f} MB in all")
    tmp = Path(tempfile.mkdtemp(prefix="bench_codecs-", dir=a.tmp))
    try:
        t0 = time.perf_counter()
        rows = bench(data, a.chunk, a.repeats, tmp, write_empty_chunks=a.write_empty_chunks)
        cpu = cpu_cost(data, a.chunk, a.repeats)
        print_tables(rows, data, cpu, a.chunk)
        print(f"\nbenchmark time {time.perf_counter() - t0:.1f} s; load average "
              f"{load0:.2f} at start, {os.getloadavg()[0]:.2f} at end (2 cores)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
