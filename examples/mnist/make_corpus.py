"""Write an MNIST corpus (corpus.csv + .npy batches) from the IDX files.

Usage::

    python examples/mnist/make_corpus.py IMAGES.gz LABELS.gz OUT_DIR [--limit N] [--batch 500]

IMAGES and LABELS are the MNIST IDX files (``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``; gzipped or not). ``--limit N`` keeps the first
N images. Images become float32 in [0, 1] (pixel / 255), shaped
(n, 28, 28, 1); one group per digit (groups "0" … "9"), with the digit as
target. Each digit's samples are split into batch files of at most
``--batch`` samples.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

from inntrospect.extraction.corpus import write_corpus


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzipped or not): magic, dims, then big-endian data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] != b"\0\0":
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4]!r}).")
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[raw[2]]
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    return data.reshape(shape)


def write_mnist_corpus(images, labels, out: str | Path, limit: int | None = None, batch: int = 500) -> Path:
    """Write ``out/corpus.csv`` and its batch files (one digit each); return the csv path."""
    x = read_idx(images) if not isinstance(images, np.ndarray) else images
    y = read_idx(labels) if not isinstance(labels, np.ndarray) else labels
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"expected images (n, rows, cols) and labels (n,), got {x.shape} and {y.shape}; "
            "give the images file first, then the labels file of the same set."
        )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x = (x.astype(np.float32) / 255.0)[..., None]
    return write_corpus(x, y, out, targets=y, per_file=batch)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images")
    p.add_argument("labels")
    p.add_argument("out")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--batch", type=int, default=500, help="samples per batch file")
    a = p.parse_args(argv)
    try:
        csv = write_mnist_corpus(a.images, a.labels, a.out, a.limit, a.batch)
    except (OSError, ValueError, KeyError) as err:
        p.error(str(err))
    print(f"wrote {csv}")


if __name__ == "__main__":
    main()
