"""The examples: MNIST and FairFace corpus scripts run as users run them, and the example configs.

The scripts run as subprocesses of this interpreter on tiny inputs written
here (gzip IDX files, a fake FairFace folder of small JPEGs); nothing is
downloaded.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import re
import shlex
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import inntrospect
from inntrospect.config import PATHS, SCHEMA, load_config

from .conftest import CNN, CNN_LAYERS, MLP, MLP_LAYERS, ROOT, needs_shared, python_env

EXAMPLES = ROOT / "examples"
MAKE_CORPUS = EXAMPLES / "mnist" / "make_corpus.py"
PREPARE = EXAMPLES / "fairface" / "prepare_fairface.py"
CONFIGS = sorted(EXAMPLES.rglob("*.toml"))
#: the sections of the whole pipeline, from extraction to plots
PIPELINE = {"model", "corpus", "store", "extract", "naps", "contrast", "topomap", "projection", "plot"}


def run(script: Path, *args, ok: bool = True) -> subprocess.CompletedProcess:
    """Run an example script from the repository root, as the README shows."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=ROOT,
                          env=python_env(), capture_output=True, text=True, timeout=120)
    if ok:
        assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    else:
        assert proc.returncode != 0, f"{script.name} should have failed:\n{proc.stdout}"
    return proc


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def corpus_by_group(csv_path: Path) -> dict[str, np.ndarray]:
    """Each group's samples of a corpus, in corpus order (plain numpy reader)."""
    parts: dict[str, list] = {}
    for line in csv_path.read_text().splitlines():
        f, g = line.split(",")[:2]
        parts.setdefault(g, []).append(np.load(csv_path.parent / f))
    return {g: np.concatenate(p) for g, p in parts.items()}


# -- MNIST ---------------------------------------------------------------------
def write_idx_gz(path: Path, data: np.ndarray, magic: int) -> Path:
    """A gzipped IDX file: big-endian magic (2051 images, 2049 labels), dims, uint8 data."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in data.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + data.astype(np.uint8).tobytes())
    return path


@pytest.fixture(scope="module")
def idx_files(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("idx")
    images = rng.integers(0, 256, (37, 28, 28), dtype=np.uint8)
    labels = np.array([i % 10 for i in range(30)] + [3] * 7, np.uint8)
    rng.shuffle(labels[:30])
    img = write_idx_gz(d / "t10k-images-idx3-ubyte.gz", images, 2051)
    lab = write_idx_gz(d / "t10k-labels-idx1-ubyte.gz", labels, 2049)
    return img, lab, images, labels


def test_mnist_make_corpus(tmp_path, idx_files):
    img, lab, images, labels = idx_files
    out = tmp_path / "corpus"
    proc = run(MAKE_CORPUS, img, lab, out, "--limit", 33, "--batch", 2)
    assert "corpus.csv" in proc.stdout
    corpus = inntrospect.read_corpus(out / "corpus.csv")
    x, y = images[:33], labels[:33]
    assert corpus.n_samples == 33
    assert corpus.groups == [str(d) for d in range(10)]
    assert corpus.sample_shape == (28, 28, 1) and corpus.dtype == np.float32
    assert corpus.has_target
    assert all(f.target == int(f.group) and f.n <= 2 for f in corpus.files)
    counts = {g: int((corpus.sample_table["group"] == g).sum()) for g in corpus.groups}
    assert counts == {str(d): int((y == d).sum()) for d in range(10)}
    for g, samples in corpus_by_group(out / "corpus.csv").items():
        np.testing.assert_array_equal(samples, (x[y == int(g)] / np.float32(255))[..., None])
    assert float(corpus.read(0, 33).min()) >= 0 and float(corpus.read(0, 33).max()) <= 1


def test_mnist_make_corpus_refuses_swapped_files(tmp_path, idx_files):
    img, lab, _, _ = idx_files
    proc = run(MAKE_CORPUS, lab, img, tmp_path / "c", ok=False)
    assert "images" in proc.stderr and "labels" in proc.stderr


# -- FairFace ------------------------------------------------------------------
# (file, age, gender, race, size or mode of the image)
FAKE = {
    "val": [("val/1.jpg", "20-29", "Male", "White", (224, 224)),
            ("val/2.jpg", "3-9", "Female", "Black", (64, 48)),
            ("val/3.jpg", "more than 70", "Female", "East Asian", (224, 224)),
            ("val/4.jpg", "20-29", "Male", "White", "L"),
            ("val/5.jpg", "30-39", "Female", "Black", (300, 300)),
            ("val/6.jpg", "0-2", "Male", "White", (224, 224)),
            ("val/7.jpg", "40-49", "Female", "White", (224, 224))],
    "train": [("train/1.jpg", "10-19", "Male", "Indian", (224, 224)),
              ("train/2.jpg", "50-59", "Female", "White", (224, 224))],
}


@pytest.fixture(scope="module")
def fairface(tmp_path_factory):
    """A fake FairFace download: label CSVs and small JPEGs in train/ and val/."""
    Image = pytest.importorskip("PIL.Image", reason="prepare_fairface.py needs Pillow")
    root = tmp_path_factory.mktemp("fairface")
    rng = np.random.default_rng(1)
    for split, rows in FAKE.items():
        (root / split).mkdir()
        with open(root / f"fairface_label_{split}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "age", "gender", "race", "service_test"])
            for file, age, gender, race, kind in rows:
                w.writerow([file, age, gender, race, "True"])
                if kind == "L":
                    im = Image.fromarray(rng.integers(0, 256, (224, 224), dtype=np.uint8), "L")
                else:
                    im = Image.fromarray(rng.integers(0, 256, (*kind[::-1], 3), dtype=np.uint8), "RGB")
                im.save(root / file, quality=90)
    return root


def resized(path: Path) -> np.ndarray:
    """The test's own load: RGB, 224x224 bilinear, uint8."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (224, 224):
            im = im.resize((224, 224), Image.Resampling.BILINEAR)
        return np.asarray(im)


def sources(out: Path) -> list[dict[str, str]]:
    with open(out / "sources.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_prepare_fairface_by_race(tmp_path, fairface):
    out = tmp_path / "corpus"
    proc = run(PREPARE, fairface, out, "--batch", 2, "--no-progress")
    assert "grouped by race" in proc.stdout
    corpus = inntrospect.read_corpus(out)
    assert corpus.groups == ["Black", "East Asian", "White"]
    assert corpus.n_samples == 7 and not corpus.has_target
    assert corpus.sample_shape == (224, 224, 3) and corpus.dtype == np.float32
    assert all(f.n <= 2 for f in corpus.files)
    by_group = corpus_by_group(out / "corpus.csv")
    val = FAKE["val"]
    for g, samples in by_group.items():
        want = [r[0] for r in val if r[3] == g]  # CSV order within the group
        assert len(samples) == len(want)
        for s, file in zip(samples, want):
            rgb = resized(fairface / file).astype(np.float32)
            np.testing.assert_allclose(s, rgb[..., ::-1] - [103.939, 116.779, 123.68], atol=1e-4)
    # sources.csv names the image behind every sample, in corpus order
    src = sources(out)
    assert [r["image"] for r in src] == [r[0] for g in corpus.groups for r in val if r[3] == g]
    for r in src[:3]:
        stored = np.load(out / r["batch_file"])[int(r["index_in_file"])]
        np.testing.assert_allclose(stored[..., ::-1] + [123.68, 116.779, 103.939],
                                   resized(fairface / r["image"]), atol=1e-4)
    assert not (out / ".images.tmp.npy").exists()


def test_vgg16_preprocess_equals_keras(fairface):
    keras = pytest.importorskip("keras")
    mod = load_module(PREPARE)
    batch = np.stack([resized(fairface / r[0]) for r in FAKE["val"]])
    want = keras.applications.vgg16.preprocess_input(batch.astype(np.float32))
    np.testing.assert_array_equal(mod.vgg16_preprocess(batch), want)
    np.testing.assert_array_equal(mod.vgg16_preprocess(batch.astype(np.float32)), want)
    # and the module's loading is the test's: the corpus holds keras's values
    for r in FAKE["val"]:
        np.testing.assert_array_equal(mod.load_image(fairface / r[0]), resized(fairface / r[0]))
    rgb = np.random.default_rng(2).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(mod.vgg16_preprocess(rgb),
                                  keras.applications.vgg16.preprocess_input(rgb.copy()))


def test_prepare_fairface_by_gender_per_group(tmp_path, fairface):
    rows = FAKE["train"] + FAKE["val"]  # --split all: train, then val
    out = tmp_path / "first"
    run(PREPARE, fairface, out, "--group-by", "gender", "--per-group", 2, "--split", "all",
        "--no-progress")
    corpus = inntrospect.read_corpus(out)
    assert corpus.groups == ["Female", "Male"] and corpus.n_samples == 4
    assert [r["image"] for r in sources(out)] == (
        [r[0] for r in rows if r[2] == "Female"][:2] + [r[0] for r in rows if r[2] == "Male"][:2])

    picks = []
    for name in ("random_a", "random_b"):
        run(PREPARE, fairface, tmp_path / name, "--group-by", "gender", "--per-group", 3,
            "--sampling", "random", "--seed", 5, "--no-progress")
        picks.append([r["image"] for r in sources(tmp_path / name)])
    assert picks[0] == picks[1]  # seeded
    val = [r[0] for r in FAKE["val"]]
    assert len(picks[0]) == 6 and set(picks[0]) <= set(val)
    for g in ("Female", "Male"):  # each group's picks stay in CSV order
        mine = [f for f in picks[0] if f in {r[0] for r in FAKE["val"] if r[2] == g}]
        assert mine == sorted(mine, key=val.index) and len(mine) == 3

    out = tmp_path / "age"
    run(PREPARE, fairface, out, "--group-by", "age", "--per-group", 10, "--no-progress")
    assert inntrospect.read_corpus(out).groups == sorted({r[1] for r in FAKE["val"]})


def test_prepare_fairface_errors(tmp_path, fairface):
    proc = run(PREPARE, tmp_path, tmp_path / "out", ok=False)
    assert "fairface_label_val.csv" in proc.stderr
    broken = tmp_path / "broken"
    (broken / "val").mkdir(parents=True)
    (broken / "fairface_label_val.csv").write_text("file,age,gender,race,service_test\n"
                                                    "val/1.jpg,20-29,Male,White,True\n")
    proc = run(PREPARE, broken, tmp_path / "out", ok=False)
    assert "not found" in proc.stderr and "val/1.jpg" in proc.stderr
    proc = run(PREPARE, fairface, tmp_path / "out", "--group-by", "hair", ok=False)
    assert "--group-by" in proc.stderr


# -- configs and README ----------------------------------------------------------
def test_example_configs_found():
    names = {p.relative_to(EXAMPLES).as_posix() for p in CONFIGS}
    assert {"mnist/cnn.toml", "mnist/mlp.toml", "fairface/vgg16.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(EXAMPLES).as_posix())
def test_example_config_loads(path):
    cfg = load_config(path)
    raw = tomllib.loads(path.read_text())
    assert PIPELINE <= set(raw), f"example configs set every pipeline section; missing {PIPELINE - set(raw)}"
    assert set(raw) <= set(SCHEMA)
    for section, key in PATHS:
        if key in raw.get(section, {}):  # relative to the config file, whatever the cwd
            assert not Path(raw[section][key]).is_absolute()
            assert cfg.get(section, key) == str((path.parent / raw[section][key]).resolve())
    kwargs = cfg.extract_kwargs()
    assert kwargs["layers"]
    cfg.naps_kwargs(), cfg.contrast_kwargs(), cfg.layout_kwargs(), cfg.compare_methods()
    cfg.resolution(), cfg.projection_kwargs()
    storage = (ROOT / "storage").resolve()
    for p in (kwargs["store"], kwargs["corpus"], cfg.plot_output()):
        assert Path(p).is_relative_to(storage), f"{p}: example outputs go under storage/"
    assert cfg.layout_kwargs()["method"] == "umap" and cfg.layout_kwargs()["seed"] == 0


def test_example_configs_models():
    cnn, mlp = load_config(EXAMPLES / "mnist/cnn.toml"), load_config(EXAMPLES / "mnist/mlp.toml")
    assert cnn.get("model", "path") == str(CNN.resolve()) and cnn.get("model", "layers") == CNN_LAYERS
    assert mlp.get("model", "path") == str(MLP.resolve()) and mlp.get("model", "layers") == MLP_LAYERS
    assert cnn.naps_kwargs()["aligned"] is True
    assert cnn.get("corpus", "path") == mlp.get("corpus", "path")
    vgg = load_config(EXAMPLES / "fairface/vgg16.toml")
    assert vgg.get("model", "name") == "VGG16"
    assert vgg.get("model", "weights") == str(EXAMPLES / "fairface/vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    assert vgg.get("store", "chunk_mib") >= 32


def test_vgg16_config_layers_exist():
    """The layers named in vgg16.toml are VGG16's (random weights: nothing downloaded)."""
    keras = pytest.importorskip("keras")
    layers = load_config(EXAMPLES / "fairface/vgg16.toml").get("model", "layers")
    model = keras.applications.VGG16(weights=None)
    names = [layer.name for layer in model.layers]
    assert set(layers) <= set(names)
    assert model.get_layer("block1_conv2").output.shape[1:] == (224, 224, 64)


@needs_shared
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_mnist_config_layers_exist(name):
    pytest.importorskip("tf_keras")
    from inntrospect.extraction.models.keras import load_model

    kw = load_config(EXAMPLES / f"mnist/{name}.toml").extract_kwargs()
    model = load_model(kw["model"], kw["layers"])  # raises LayerNotFoundError otherwise
    assert model.input_shape == (28, 28, 1)


def test_readme_commands():
    """Every command in examples/README.md names an existing script or config and a real subcommand."""
    from inntrospect.cli import build_parser

    text = (EXAMPLES / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ")
    commands = [shlex.split(line) for line in blocks.splitlines() if line.strip()]
    seen = set()
    for cmd in commands:
        if cmd[0] == "python":
            assert (ROOT / cmd[1]).is_file(), cmd
            seen.add(cmd[1])
        elif cmd[0] == "inntrospect":
            build_parser().parse_args(cmd[1:])  # a real subcommand with valid options
            target = cmd[2]
            assert (ROOT / target).is_file() or target.endswith(".zarr"), cmd
            seen.add(cmd[1])
    assert {"examples/mnist/make_corpus.py", "examples/fairface/prepare_fairface.py"} <= seen
    assert {"extract", "align", "naps", "contrast", "layout", "project", "plot", "report", "run"} <= seen


def test_prepare_fairface_needs_no_tensorflow(tmp_path, fairface):
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__'); "
            "bad = [m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules]; "
            "assert not bad, f'imported {bad}'")
    proc = subprocess.run([sys.executable, "-c", code, str(PREPARE), str(fairface), str(tmp_path / "c"),
                           "--no-progress"], cwd=ROOT, env=python_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
