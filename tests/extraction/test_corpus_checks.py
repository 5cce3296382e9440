"""Nothing silently wrong: corpus checks, the batch files' identity on resume, bad numbers, padding.

The corpus checks need no TensorFlow; the extraction cases use the real MNIST CNN on small corpora.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

import inntrospect
from inntrospect import ConfigError, CorpusError, ModelError, StoreMismatchError, read_corpus
from inntrospect.config import load_config
from inntrospect.extraction.prepare import prepare_extraction
from inntrospect.store.info import describe_store

from ..conftest import CNN, needs_shared, pipeline_sections, write_config, write_mnist_corpus


def make(tmp: Path, rows: list[str], arrays: dict[str, np.ndarray], encoding: str = "utf-8") -> Path:
    for name, a in arrays.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        np.save(tmp / name, a)
    (tmp / "corpus.csv").write_text("\n".join(rows) + "\n", encoding=encoding)
    return tmp / "corpus.csv"


def floats(n: int = 2) -> np.ndarray:
    return np.zeros((n, 3), np.float32)


# -- read_corpus ---------------------------------------------------------------------------
def test_a_file_listed_twice_is_refused_with_both_lines(tmp_path):
    csv = make(tmp_path, ["a.npy,g", "b.npy,g", "./a.npy,g"], {"a.npy": floats(2), "b.npy": floats(3)})
    with pytest.raises(CorpusError, match=r"line 3: batch file './a.npy'.*listed again \(line 1 .*"
                                          r"counted twice.*allow_duplicates=True"):
        read_corpus(csv)
    corpus = read_corpus(csv, allow_duplicates=True)  # the switch: each row counts
    assert corpus.n_samples == 7 and list(corpus.sample_table["file"][-2:]) == ["./a.npy"] * 2


def test_a_file_in_two_groups_is_refused_with_both_lines(tmp_path):
    csv = make(tmp_path, ["b.npy,cat", "a.npy,cat", "a.npy,dog"], {"a.npy": floats(), "b.npy": floats()})
    with pytest.raises(CorpusError, match=r"line 3: .*'a.npy'.*group 'dog', but line 2 lists it in "
                                          r"group 'cat'"):
        read_corpus(csv)
    assert read_corpus(csv, allow_duplicates=True).groups == ["cat", "dog"]


def test_config_switches_reach_read_corpus(tmp_path):
    (tmp_path / "data").mkdir()
    make(tmp_path / "data", ["a.npy,g", "a.npy,h", "../o.npy,g"], {"a.npy": floats(), "../o.npy": floats()})
    cfg = write_config(tmp_path, {"model": {"path": "m.keras"},
                                  "corpus": {"path": "data/corpus.csv", "allow_duplicates": True,
                                             "allow_outside": True},
                                  "store": {"path": "s.zarr"}, "extract": {"verify_corpus": True}})
    kw = load_config(cfg).extract_kwargs()
    assert (kw["allow_duplicates"], kw["allow_outside"], kw["verify_corpus"]) == (True, True, True)
    corpus = read_corpus(kw["corpus"], allow_duplicates=kw["allow_duplicates"],
                         allow_outside=kw["allow_outside"])
    assert corpus.n_samples == 6
    with pytest.raises(ConfigError, match="allow_duplicates must be bool"):
        load_config(write_config(tmp_path, {"corpus": {"allow_duplicates": 1}}, name="e.toml"))


def test_integer_inputs_are_warned_about_once_and_recorded(tmp_path):
    images = np.arange(4 * 16 * 16).reshape(4, 16, 16).astype(np.uint8)  # values 0..255
    csv = make(tmp_path, ["a.npy,g", "b.npy,g"], {"a.npy": images, "b.npy": images[:2]})
    with pytest.warns(UserWarning) as caught:
        corpus = read_corpus(csv)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "uint8" in msg and "0..255" in msg and "a.npy" in msg
    assert "most models expect floats, e.g. scaled to [0, 1]" in msg.lower()
    assert "passed as float32 unchanged" in msg
    assert corpus.identity()["integer_inputs"] == {"dtype": "uint8", "min": 0, "max": 255, "samples": 4}
    assert corpus.identity()["dtype"] == "uint8"
    (tmp_path / "f").mkdir()
    make(tmp_path / "f", ["a.npy,g"], {"a.npy": floats()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # floats: no warning
        assert read_corpus(tmp_path / "f").identity()["integer_inputs"] is None


def test_csv_with_a_utf8_bom_is_read(tmp_path):
    csv = make(tmp_path, ["a.npy,café", "b.npy,g"], {"a.npy": floats(), "b.npy": floats()},
               encoding="utf-8-sig")
    assert csv.read_bytes().startswith(b"\xef\xbb\xbf")
    corpus = read_corpus(csv)
    assert [f.file for f in corpus.files] == ["a.npy", "b.npy"] and corpus.groups == ["café", "g"]


@pytest.mark.parametrize("where", ["../outside.npy", "sub/../../outside.npy", "ABSOLUTE"])
def test_paths_leaving_the_corpus_folder_are_refused(tmp_path, where):
    folder = tmp_path / "corpus"
    folder.mkdir()
    np.save(tmp_path / "outside.npy", floats())
    row = str(tmp_path / "outside.npy") if where == "ABSOLUTE" else where
    csv = make(folder, ["in.npy,g", f"{row},g"], {"in.npy": floats()})
    with pytest.raises(CorpusError, match=r"line 2: batch file .*outside.npy' is outside the corpus folder.*"
                                          r"every worker.*allow_outside=True"):
        read_corpus(csv)
    assert read_corpus(csv, allow_outside=True).n_samples == 4


def test_paths_inside_the_corpus_folder_are_fine(tmp_path):
    csv = make(tmp_path, ["sub/a.npy,g", "sub/../b.npy,g", "./c.npy,g"],
               {"sub/a.npy": floats(), "b.npy": floats(), "c.npy": floats()})
    assert read_corpus(csv).n_samples == 6


def test_a_garbage_npy_file_says_it_is_not_npy(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"this is no numpy file, just some text\n" * 4)
    (tmp_path / "corpus.csv").write_text("junk.npy,g\n")
    with pytest.raises(CorpusError, match=r"line 1: .*junk.npy.* is not a .npy file at all") as err:
        read_corpus(tmp_path)
    assert "pickle" not in str(err.value)
    np.savez(tmp_path / "z.npy", a=floats())  # an .npz saved under a .npy name
    os.replace(tmp_path / "z.npy.npz", tmp_path / "junk.npy")
    with pytest.raises(CorpusError, match="zip archive"):
        read_corpus(tmp_path)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_garbage_model_file_says_it_is_not_a_keras_model(tmp_path, suffix):
    csv = make(tmp_path, ["a.npy,g"], {"a.npy": floats()})
    (tmp_path / f"m{suffix}").write_bytes(b"garbage, not a model" * 10)
    with pytest.raises(ModelError, match=rf"m{suffix} is not a Keras model: .*(zip archive|HDF5)") as err:
        prepare_extraction(tmp_path / f"m{suffix}", csv, tmp_path / "s.zarr")
    assert "not found" not in str(err.value)
    assert not (tmp_path / "s.zarr").exists()


# -- numbers in the config and the arguments ---------------------------------------------------
@pytest.mark.parametrize("text", ["chunk_mib = inf", "chunk_mib = nan", "chunk_mib = -inf", "chunk_mib = 0",
                                  "chunk_mib = -1", "chunk_mib = 5000", "chunk_mib = 1e300"])
def test_bad_chunk_mib_in_a_config_is_refused_at_load(tmp_path, text):
    cfg = write_config(tmp_path, text=f"[store]\npath = 's.zarr'\n{text}\n")
    with pytest.raises(ConfigError, match=r"\[store\] chunk_mib must be"):
        load_config(cfg)


def test_good_chunk_mib_loads(tmp_path):
    for value in ("0.25", "32", "4096"):
        cfg = write_config(tmp_path, text=f"[store]\npath = 's.zarr'\nchunk_mib = {value}\n")
        assert load_config(cfg).get("store", "chunk_mib") == float(value)


@pytest.mark.parametrize("kwargs, match", [
    ({"chunk_mib": float("inf")}, "chunk_mib must be a finite number"),
    ({"chunk_mib": float("nan")}, "chunk_mib must be a finite number"),
    ({"chunk_mib": 0}, "chunk_mib must be"),
    ({"chunk_mib": 10_000}, "at most 4096"),
    ({"batch_size": True}, "batch_size must be a positive integer"),
    ({"batch_size": 12.5}, "batch_size must be a positive integer"),
])
def test_bad_numbers_are_refused_before_the_corpus_is_read(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        prepare_extraction(tmp_path / "no.keras", tmp_path / "no.csv", tmp_path / "s.zarr", **kwargs)


# -- with the MNIST CNN ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, mnist_arrays):
    """200 MNIST images in files of at most 25 (a digit each), with targets."""
    x, y = mnist_arrays
    return write_mnist_corpus(tmp_path_factory.mktemp("small"), x, y, 200, 25)


def copy_corpus(csv: Path, to: Path) -> Path:
    to.mkdir()
    for f in csv.parent.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to / "corpus.csv"


@needs_shared
def test_a_huge_batch_is_refused_before_anything_is_computed(tmp_path, small_corpus, monkeypatch):
    pytest.importorskip("tensorflow")
    from inntrospect.extraction.models.keras import KerasModel

    def no_compute(*a, **k):
        raise AssertionError("computed something")

    monkeypatch.setattr(KerasModel, "compute", no_compute)
    with pytest.raises(ConfigError, match=r"batch_size 10000000000 needs .* more than half of this "
                                          r"machine's memory .*Use a smaller batch_size \(at most \d+"):
        prepare_extraction(CNN, small_corpus, tmp_path / "s.zarr", batch_size=10**10)
    assert not (tmp_path / "s.zarr").exists()


@needs_shared
def test_a_huge_batch_is_refused_by_dry_run(tmp_path, small_corpus, capsys):
    pytest.importorskip("tensorflow")
    from inntrospect import cli

    cfg = write_config(tmp_path, {"model": {"path": CNN}, "corpus": {"path": small_corpus},
                                  "store": {"path": "s.zarr"}, "extract": {"batch_size": 10**10}})
    assert cli.main(["extract", str(cfg), "--dry-run"]) == 2
    assert "smaller batch_size" in capsys.readouterr().err


@needs_shared
def test_inference_batches_are_no_longer_than_a_block(tmp_path, small_corpus):
    pytest.importorskip("tensorflow")
    ex = prepare_extraction(CNN, small_corpus, tmp_path / "s.zarr", ["conv2d_25"], chunk_mib=0.25,
                            batch_size=128)
    assert ex.plan.block < ex.batch_size  # the case: blocks of 64 samples, batches of 128
    calls = []
    compute = ex.model.compute

    def counting(x, targets=None, pad_to=None):
        calls.append((len(x), pad_to))
        return compute(x, targets, pad_to=pad_to)

    ex.model.compute = counting
    inntrospect.extraction.local.run_extraction(ex)
    rows = [max(n, pad or 0) for n, pad in calls]  # rows the model computed, padding included
    assert max(rows) <= ex.plan.block
    assert len({pad for _, pad in calls}) == 1  # one padded shape for the whole run: no retracing
    assert sum(n for n, _ in calls) == ex.corpus.n_samples + min(ex.corpus.n_samples, ex.plan.block)
    ref = inntrospect.extract(CNN, small_corpus, tmp_path / "ref.zarr", ["conv2d_25"], chunk_mib=0.25,
                              batch_size=16)
    got = inntrospect.open_store(tmp_path / "s.zarr")
    for layer in ("conv2d_25", "dense_14"):
        np.testing.assert_allclose(got[f"layers/{layer}"].acts.values, ref[f"layers/{layer}"].acts.values,
                                   rtol=1e-5, atol=1e-6)


def interrupted(ex) -> None:
    """Run ``ex`` until its first block is recorded."""
    def stop(block, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        inntrospect.extraction.local.run_extraction(ex, on_block=stop)


@needs_shared
def test_a_changed_batch_file_is_refused_on_resume_and_named(tmp_path, small_corpus):
    pytest.importorskip("tensorflow")
    csv = copy_corpus(small_corpus, tmp_path / "c")
    path = tmp_path / "s.zarr"
    ex = prepare_extraction(CNN, csv, path, ["conv2d_25"], chunk_mib=0.25)
    interrupted(ex)
    files = inntrospect.open_store(path, allow_incomplete=True).attrs["corpus"]["files"]
    last = ex.corpus.files[-1]
    assert files[-1] == {"file": last.file, "bytes": last.path.stat().st_size,
                         "mtime_ns": last.path.stat().st_mtime_ns}
    # same name, shape and dtype; other values
    np.save(last.path, np.load(last.path)[::-1].copy())
    t = last.path.stat().st_mtime_ns
    os.utime(last.path, ns=(t + 10**9, t + 10**9))  # whatever the file system's time resolution
    with pytest.raises(StoreMismatchError, match=rf"(?s)batch file\(s\) changed since .*{last.file} "
                                                 r"\(modification time\).*--overwrite"):
        inntrospect.extract(CNN, csv, path, ["conv2d_25"])
    tree = inntrospect.extract(CNN, csv, path, ["conv2d_25"], overwrite=True)  # the fix the message names
    assert tree.attrs["extraction"]["state"] == "complete"
    assert "CORPUS CHANGED" not in describe_store(path)
    os.utime(last.path, ns=(t + 2 * 10**9, t + 2 * 10**9))  # changed after a complete extraction
    assert f"CORPUS CHANGED since the extraction: {last.file} (modification time)" in describe_store(path)


@needs_shared
def test_verify_corpus_compares_contents(tmp_path, small_corpus):
    pytest.importorskip("tensorflow")
    csv = copy_corpus(small_corpus, tmp_path / "c")
    path = tmp_path / "s.zarr"
    ex = prepare_extraction(CNN, csv, path, ["conv2d_25"], chunk_mib=0.25, verify_corpus=True)
    interrupted(ex)
    first, last = ex.corpus.files[0], ex.corpus.files[-1]
    rec = inntrospect.open_store(path, allow_incomplete=True).attrs["corpus"]["files"][0]
    assert len(rec["sha256"]) == 64
    # a copy: other time, same contents -> resumes
    t = first.path.stat().st_mtime_ns
    os.utime(first.path, ns=(t + 10**9, t + 10**9))
    again = prepare_extraction(CNN, csv, path, ["conv2d_25"], verify_corpus=True)
    interrupted(again)  # resumed: one more block recorded
    # other contents, same size and time -> only the hash sees it
    stat = last.path.stat()
    x = np.load(last.path)
    np.save(last.path, 1.0 - x)
    os.utime(last.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert last.path.stat().st_size == stat.st_size
    with pytest.raises(StoreMismatchError, match=rf"{last.file} \(contents\)"):
        inntrospect.extract(CNN, csv, path, ["conv2d_25"], verify_corpus=True)


@needs_shared
def test_cli_verify_corpus(tmp_path, small_corpus, capsys):
    pytest.importorskip("tensorflow")
    from inntrospect import cli

    cfg = write_config(tmp_path, {"model": {"path": CNN, "layers": ["conv2d_25"]},
                                  "corpus": {"path": small_corpus}, "store": {"path": "s.zarr"}})
    assert cli.main(["extract", str(cfg), "--verify-corpus", "--no-progress"]) == 0
    files = inntrospect.open_store(tmp_path / "s.zarr").attrs["corpus"]["files"]
    assert all(len(f["sha256"]) == 64 for f in files)
    assert load_config(cfg).extract_kwargs()["verify_corpus"] is False
    assert load_config(cfg).extract_kwargs(verify_corpus=True)["verify_corpus"] is True


@needs_shared
@pytest.mark.slow
def test_run_on_a_changed_corpus_refuses(tmp_path, small_corpus):
    pytest.importorskip("tensorflow")
    csv = copy_corpus(small_corpus, tmp_path / "c")
    sections = pipeline_sections(CNN, csv)
    cfg = write_config(tmp_path, sections)
    inntrospect.extract(CNN, csv, tmp_path / "run.zarr", sections["model"]["layers"],
                        chunk_mib=sections["store"]["chunk_mib"])  # a complete store of this config
    changed = read_corpus(csv).files[0]
    np.save(changed.path, np.load(changed.path)[::-1].copy())
    t = changed.path.stat().st_mtime_ns
    os.utime(changed.path, ns=(t + 10**9, t + 10**9))

    def echo(line: str) -> None:
        if line.startswith("extract"):
            raise AssertionError(f"the changed corpus was not noticed: {line}")

    with pytest.raises(StoreMismatchError, match=rf"{changed.file} \(modification time\)"):
        inntrospect.run(cfg, progress=False, echo=echo)
