"""Write a FairFace corpus for ImageNet VGG16 (corpus.csv + .npy batches).

Usage::

    python examples/fairface/prepare_fairface.py FAIRFACE_DIR OUT_DIR
        [--split val|train|all] [--group-by race|gender|age]
        [--per-group N] [--sampling first|random] [--seed 0] [--batch 256]

``FAIRFACE_DIR`` holds the FairFace label CSVs ``fairface_label_train.csv`` and
``fairface_label_val.csv`` (columns ``file,age,gender,race,service_test``) and
the image folders ``train/`` and ``val/`` their ``file`` column points into
(``val/1.jpg``). Samples are grouped by one attribute (default ``race``);
``--per-group N`` keeps N samples of each group (the first N in CSV order, or
N drawn at random with ``--seed``, kept in CSV order). Each image is converted
to RGB, resized to 224x224 (bilinear) and preprocessed as
``keras.applications.vgg16.preprocess_input`` does (RGB -> BGR, ImageNet mean
subtracted; float32), in numpy, so TensorFlow is not needed here. Batch files
hold one group each, at most ``--batch`` samples; ``OUT_DIR/sources.csv`` names
the image behind every sample.

The images are staged in a memory-mapped temporary file inside ``OUT_DIR``,
so memory stays small however many images there are (disk needs about twice
the corpus size, 602 KB per image, while this runs).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from inntrospect.extraction.corpus import write_corpus

#: VGG16's input size (pixels per side)
SIZE = 224
#: ImageNet channel means in BGR order, as keras.applications.vgg16 ("caffe" mode) subtracts them
VGG16_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
ATTRIBUTES = ("race", "gender", "age")
COLUMNS = ("file", "age", "gender", "race")
SPLITS = {"val": ("val",), "train": ("train",), "all": ("train", "val")}


def vgg16_preprocess(rgb) -> np.ndarray:
    """``keras.applications.vgg16.preprocess_input`` in numpy: RGB 0..255 -> BGR minus ImageNet mean.

    ``rgb`` is ``(..., 3)``, channels last, uint8 or float. Returns float32.
    """
    x = np.asarray(rgb, dtype=np.float32)
    if x.shape[-1:] != (3,):
        raise ValueError(f"expected RGB images (..., 3), got shape {x.shape}")
    return x[..., ::-1] - VGG16_MEAN_BGR


def load_image(path: str | Path, size: int = SIZE) -> np.ndarray:
    """An image file as uint8 RGB ``(size, size, 3)``: converted to RGB, resized bilinearly if needed."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def read_labels(root: Path, split: str) -> list[dict[str, str]]:
    """Rows of ``fairface_label_<split>.csv`` (one dict per image), checked for the needed columns."""
    path = root / f"fairface_label_{split}.csv"
    if not path.is_file():
        raise SystemExit(
            f"error: {path} not found. FAIRFACE_DIR must hold the FairFace label CSVs "
            f"(fairface_label_train.csv, fairface_label_val.csv) and the train/ and val/ image folders."
        )
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(
                f"error: {path} lacks the column(s) {', '.join(missing)}; expected a header "
                "'file,age,gender,race,service_test'."
            )
        rows = [{k: (v or "").strip() for k, v in r.items() if k} for r in reader]
    for i, r in enumerate(rows, start=2):
        if not r["file"]:
            raise SystemExit(f"error: {path}, line {i}: empty 'file'.")
    return rows


def select(rows: list[dict[str, str]], group_by: str, per_group: int | None = None,
           sampling: str = "first", seed: int = 0) -> dict[str, list[int]]:
    """Indices into ``rows`` of each group's samples, in CSV order (at most ``per_group`` each)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        g = r[group_by]
        if not g or "," in g:
            raise SystemExit(f"error: image {r['file']} has {group_by} {g!r}; a group name must be "
                             "non-empty and hold no comma.")
        groups.setdefault(g, []).append(i)
    if per_group is not None:
        rng = np.random.default_rng(seed)
        for g in sorted(groups):
            idx = groups[g]
            if len(idx) <= per_group:
                if len(idx) < per_group:
                    print(f"note: group {g!r} has only {len(idx)} images (asked for {per_group}); "
                          "taking all", file=sys.stderr)
                continue
            if sampling == "first":
                groups[g] = idx[:per_group]
            else:
                groups[g] = sorted(rng.choice(idx, size=per_group, replace=False).tolist())
    return {g: groups[g] for g in sorted(groups)}


def prepare_fairface(root: str | Path, out: str | Path, split: str = "val", group_by: str = "race",
                     per_group: int | None = None, sampling: str = "first", seed: int = 0,
                     batch: int = 256, progress: bool = True) -> Path:
    """Write ``out/corpus.csv``, its batch files and ``out/sources.csv``; return the csv path."""
    root, out = Path(root), Path(out)
    if group_by not in ATTRIBUTES:
        raise SystemExit(f"error: --group-by must be one of {', '.join(ATTRIBUTES)}, got {group_by!r}.")
    rows = [r for s in SPLITS[split] for r in read_labels(root, s)]
    chosen = select(rows, group_by, per_group, sampling, seed)
    order = [i for idx in chosen.values() for i in idx]
    if not order:
        raise SystemExit("error: no images selected.")
    missing = [rows[i]["file"] for i in order if not (root / rows[i]["file"]).is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} image(s) not found under {root}, e.g. "
                         f"{root / missing[0]}. Unpack the FairFace images into {root} "
                         "(folders train/ and val/).")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".images.tmp.npy"
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(order), SIZE, SIZE, 3))
    try:
        try:
            from tqdm import tqdm

            items = tqdm(order, desc="images", unit="img", disable=not progress)
        except ImportError:  # pragma: no cover - tqdm is a dependency of inntrospect
            items = order
        for k, i in enumerate(items):
            x[k] = vgg16_preprocess(load_image(root / rows[i]["file"]))
        x.flush()
        labels = [rows[i][group_by] for i in order]
        csv_path = write_corpus(x, labels, out, per_file=batch)
    finally:
        del x
        tmp.unlink(missing_ok=True)
    _write_sources(csv_path, chosen, rows)
    counts = ", ".join(f"{g} ({len(idx)})" for g, idx in chosen.items())
    print(f"wrote {csv_path}: {len(order)} images of {SIZE}x{SIZE}, grouped by {group_by}: {counts}")
    return csv_path


def _write_sources(csv_path: Path, chosen: dict[str, list[int]], rows: list[dict[str, str]]) -> None:
    """``sources.csv`` beside corpus.csv: batch file, index in it, and the image with its labels."""
    left = {g: list(idx) for g, idx in chosen.items()}
    lines = [["batch_file", "index_in_file", "image", "age", "gender", "race"]]
    for line in csv_path.read_text().splitlines():
        name, group = line.split(",")[:2]
        n = np.load(csv_path.parent / name, mmap_mode="r").shape[0]
        take, left[group] = left[group][:n], left[group][n:]
        lines += [[name, str(j), rows[i]["file"], rows[i]["age"], rows[i]["gender"], rows[i]["race"]]
                  for j, i in enumerate(take)]
    with open(csv_path.parent / "sources.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fairface_dir", help="folder with fairface_label_{train,val}.csv and train/, val/")
    p.add_argument("out", help="output folder for corpus.csv and the batch files")
    p.add_argument("--split", choices=tuple(SPLITS), default="val", help="which labels/images (default: val)")
    p.add_argument("--group-by", choices=ATTRIBUTES, default="race", help="attribute that makes the groups")
    p.add_argument("--per-group", type=int, default=None, metavar="N",
                   help="keep at most N images of each group (default: all)")
    p.add_argument("--sampling", choices=("first", "random"), default="first",
                   help="with --per-group: the first N in CSV order, or N at random (default: first)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling random (default: 0)")
    p.add_argument("--batch", type=int, default=256, help="most samples per batch file (default: 256)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.per_group is not None and a.per_group < 1:
        p.error("--per-group must be at least 1")
    if a.batch < 1:
        p.error("--batch must be at least 1")
    prepare_fairface(a.fairface_dir, a.out, a.split, a.group_by, a.per_group, a.sampling, a.seed,
                     a.batch, progress=not a.no_progress)


if __name__ == "__main__":
    main()
