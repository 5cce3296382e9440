"""``inntrospect demo``: a small real run, end to end, in well under a minute.

Builds a corpus from scikit-learn's bundled 8x8 digits (one group per
digit, the digit as target), trains a small Keras CNN on it (seeded), writes
corpus, model and config under the output folder, and runs the pipeline's
steps (:mod:`inntrospect.registry`) that the HTML report needs: extraction,
alignment, NAPs, contrastive NAPs, topomap layouts and images, instance
projections and the report, which draws its own figures. It prints where the
results are.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import registry

__all__ = ["run_demo", "write_digits_corpus", "train_digits_cnn"]

LAYERS = ["conv1", "conv2", "dense"]

CONFIG = """\
# inntrospect demo: a small CNN trained on scikit-learn's digits.
# Paths are relative to this file.
[model]
path = "model.keras"
layers = {layers}

[corpus]
path = "corpus/corpus.csv"

[store]
path = "digits.zarr"

[extract]
gradient_target = "predicted"
batch_size = 128

[naps]
aligned = true
std = true

[contrast]
weight_by_group_size = false

[topomap]
method = "umap"
metric = "euclidean"
distribute_in_circle = true
seed = 0
resolution = 100
from = "contrast"

[projection]
samples_per_group = 100
sampling = "random"
seed = 0

[plot]
mode = "row"
format = "png"
output = "figures"
"""


def write_digits_corpus(out: Path, per_file: int = 50) -> Path:
    """Write ``out/corpus.csv`` and batch files of the digits, scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    from .extraction.corpus import write_corpus

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target
    return write_corpus(x, [f"digit {d}" for d in y], out, targets=y, per_file=per_file)


def train_digits_cnn(path: Path, seed: int = 0, epochs: int = 12) -> float:
    """Train a small CNN on the digits (seeded), save it to ``path``; return accuracy."""
    from .extraction.models.keras import import_tensorflow

    import_tensorflow()  # TensorFlow first, without its start-up INFO lines
    import keras
    from sklearn.datasets import load_digits

    keras.utils.set_random_seed(seed)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    h = keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(32, activation="relu", name="dense")(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out, name="digits_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, shuffle=True)
    acc = float(model.evaluate(x, y, verbose=0)[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return acc


def _most_specific_units(con, nap) -> str:
    """For each group, the unit of a layer its contrastive NAP singles out most."""
    lines = [f"most group-specific unit of layer {con.attrs['layer']!r} "
             "(contrastive NAP; the group's mean activation beside it):"]
    for g in con.group.values:
        c = con.nap.sel(group=g).values
        u = int(np.argmax(c))
        lines.append(f"  {g}: unit {u:>2}  contrast {c[u]:+.2f}  mean {float(nap.nap.sel(group=g)[u]):.2f}")
    return "\n".join(lines)


def run_demo(out: str | Path = "storage/demo", progress: bool = True) -> Path:
    """Run the demo into ``out``; return the store path."""
    from .config import load_config
    from .store.info import describe_store

    out = Path(out)
    t0 = time.perf_counter()
    csv = write_digits_corpus(out / "corpus")
    print(f"corpus: {csv} (1797 digits, 10 groups)")
    acc = train_digits_cnn(out / "model.keras")
    print(f"model:  {out / 'model.keras'} (small CNN, training accuracy {acc:.3f})")
    cfg_path = out / "config.toml"
    cfg_path.write_text(CONFIG.format(layers="[" + ", ".join(f'"{n}"' for n in LAYERS) + "]"))
    print(f"config: {cfg_path}")
    cfg = load_config(cfg_path)
    path = cfg.store_path()
    results = {}
    for name in registry.leading_to("report"):  # the steps the report reads, in order; not `plots`
        step = registry.STEPS[name]
        if step.applies(cfg):
            results[name] = step.run(cfg, path, progress, overwrite=True)
    profiles, contrasts, index = results["naps"], results["contrast"], results["report"]
    figures = sorted((index.parent / "figures").iterdir())
    print()
    print(describe_store(path))
    print()
    print(_most_specific_units(contrasts["dense"], profiles["dense"]))
    print(
        f"\ndone in {time.perf_counter() - t0:.0f} s. Outputs in {out}/:\n"
        f"  {path}  (open it with: xarray.open_datatree({str(path)!r}, engine='zarr'))\n"
        f"  {index}  (the report: open it in a browser)\n"
        f"  {index.parent / 'figures'}/  ({len(figures)} figures: topomaps per layer, overview, "
        f"projections; PDF or SVG: inntrospect plot {cfg_path})\n"
        f"  rerun what a config change touches: inntrospect run {cfg_path}\n"
        f"  or one step:  inntrospect {'|'.join(registry.commands())} {cfg_path}\n"
        f"  compare layout methods: inntrospect compare-layouts {cfg_path}\n"
        f"  describe:     inntrospect info {path}\n"
        f"  in Python:    inntrospect.load({str(path)!r}, 'naps')['conv2'].nap"
    )
    return path
