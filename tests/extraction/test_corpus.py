"""Corpus reading and validation (REFERENCE.md §1). No TensorFlow needed."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inntrospect import CorpusError, read_corpus


def make(tmp: Path, rows: list[str], arrays: dict[str, np.ndarray]) -> Path:
    for name, a in arrays.items():
        np.save(tmp / name, a)
    (tmp / "corpus.csv").write_text("\n".join(rows) + "\n")
    return tmp / "corpus.csv"


def test_sample_table_follows_row_then_file_order(tmp_path):
    a = np.arange(3 * 4, dtype=np.float32).reshape(3, 2, 2)
    b = np.arange(2 * 4, dtype=np.float32).reshape(2, 2, 2) + 100
    c = np.arange(1 * 4, dtype=np.float32).reshape(1, 2, 2) + 200
    csv = make(tmp_path, ["a.npy,zebra,3", "b.npy,apple,1", "", "c.npy,zebra,0"],
               {"a.npy": a, "b.npy": b, "c.npy": c})
    corpus = read_corpus(tmp_path)  # the folder works too
    assert corpus.n_samples == 6
    assert corpus.sample_shape == (2, 2)
    assert corpus.groups == ["apple", "zebra"]  # sorted
    table = corpus.sample_table
    assert list(table["group"]) == ["zebra"] * 3 + ["apple"] * 2 + ["zebra"]
    assert list(table["file"]) == ["a.npy"] * 3 + ["b.npy"] * 2 + ["c.npy"]
    assert list(table["index_in_file"]) == [0, 1, 2, 0, 1, 0]
    assert list(table["target"]) == [3, 3, 3, 1, 1, 0]
    np.testing.assert_array_equal(corpus.read(0, 6), np.concatenate([a, b, c]))
    np.testing.assert_array_equal(corpus.read(2, 4), np.concatenate([a[2:], b[:1]]))
    assert corpus.identity()["csv_sha256"] == read_corpus(csv).identity()["csv_sha256"]


def test_no_target_column_gives_minus_one(tmp_path):
    make(tmp_path, ["a.npy,g"], {"a.npy": np.zeros((2, 3), np.float32)})
    corpus = read_corpus(tmp_path / "corpus.csv")
    assert not corpus.has_target
    assert list(corpus.sample_table["target"]) == [-1, -1]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    data=st.data(),
)
def test_batches_equal_concatenation(tmp_path_factory, sizes, data):
    tmp = tmp_path_factory.mktemp("c")
    arrays = {f"f{i}.npy": np.random.default_rng(i).normal(size=(n, 3)).astype(np.float32)
              for i, n in enumerate(sizes)}
    corpus = read_corpus(make(tmp, [f"{k},g{i % 2}" for i, k in enumerate(arrays)], arrays))
    full = np.concatenate(list(arrays.values()))
    lo = data.draw(st.integers(0, len(full)))
    hi = data.draw(st.integers(lo, len(full)))
    bs = data.draw(st.integers(1, 7))
    got = list(corpus.batches(lo, hi, bs))
    assert [s for s, _ in got] == list(range(lo, hi, bs))
    joined = np.concatenate([x for _, x in got]) if got else full[lo:lo]
    np.testing.assert_array_equal(joined, full[lo:hi])


def test_reading_a_slice_does_not_load_the_file(tmp_path):
    big = np.zeros((2000, 100, 100), np.float32)  # 80 MB
    make(tmp_path, ["big.npy,g"], {"big.npy": big})
    del big
    corpus = read_corpus(tmp_path)
    tracemalloc.start()
    x = corpus.read(10, 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert x.shape == (10, 100, 100)
    assert peak < 2_000_000  # ~0.4 MB slice, never the 80 MB file


@pytest.mark.parametrize(
    "rows, arrays, match",
    [
        (["missing.npy,g"], {}, r"line 1: batch file 'missing.npy' not found"),
        (["file,group,target", "a.npy,g,1"], {"a.npy": np.zeros((1, 2))}, "header row"),
        (["a.npy"], {"a.npy": np.zeros((1, 2))}, r"line 1: expected 'file,group'"),
        (["a.npy,g,1,extra"], {"a.npy": np.zeros((1, 2))}, "expected 'file,group'"),
        (["a.npy,,1"], {"a.npy": np.zeros((1, 2))}, "expected 'file,group'"),
        (["a.npy,g,cat"], {"a.npy": np.zeros((1, 2))}, r"target 'cat' is not an integer"),
        (["a.npy,g,-2"], {"a.npy": np.zeros((1, 2))}, "negative"),
        (["a.npy,g,1", "b.npy,h"], {"a.npy": np.zeros((1, 2)), "b.npy": np.zeros((1, 2))},
         r"line 2: this row has no target, but line 1 has target"),
        (["a.npy,g", "b.npy,h"], {"a.npy": np.zeros((1, 2)), "b.npy": np.zeros((1, 3))},
         r"shape \(3,\), but samples in a.npy \(line 1\) have shape \(2,\)"),
        (["a.npy,g", "b.npy,h"],
         {"a.npy": np.zeros((1, 2), np.float32), "b.npy": np.zeros((1, 2), np.float64)},
         "dtype float64, but a.npy"),
        (["a.npy,g"], {"a.npy": np.zeros((0, 2))}, "is empty"),
        (["a.npy,g"], {"a.npy": np.array(["x", "y"])}, "expected numbers"),
        ([], {}, "lists no batch files"),
    ],
)
def test_bad_corpus_raises_one_specific_error(tmp_path, rows, arrays, match):
    csv = make(tmp_path, rows, arrays)
    with pytest.raises(CorpusError, match=match):
        read_corpus(csv)


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    (tmp_path / "corpus.csv").write_text("junk.npy,g\n")
    with pytest.raises(CorpusError, match="not a readable .npy array"):
        read_corpus(tmp_path / "corpus.csv")
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus(tmp_path / "nope.csv")
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CorpusError, match="not a readable CSV"):
        read_corpus(tmp_path / "bad.csv")


def test_input_shape_check(tmp_path):
    make(tmp_path, ["a.npy,g"], {"a.npy": np.zeros((2, 28, 28), np.float32)})
    corpus = read_corpus(tmp_path)
    corpus.check_input_shape((28, 28))
    corpus.check_input_shape((None, 28))
    with pytest.raises(CorpusError, match=r"shape \(28, 28\), but the model expects .*\(28, 28, 1\)"):
        corpus.check_input_shape((28, 28, 1), "the model")


def test_mnist_example_script_writes_a_valid_corpus(tmp_path):
    from ..conftest import mnist_example

    images = (np.arange(7 * 4 * 4) % 256).astype(np.uint8).reshape(7, 4, 4)
    labels = np.array([3, 1, 3, 3, 0, 1, 3], np.uint8)
    header_i = b"\0\0\x08\x03" + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    header_l = b"\0\0\x08\x01" + (7).to_bytes(4, "big")
    (tmp_path / "img.idx").write_bytes(header_i + images.tobytes())
    (tmp_path / "lab.idx").write_bytes(header_l + labels.tobytes())
    mnist_example.main([str(tmp_path / "img.idx"), str(tmp_path / "lab.idx"), str(tmp_path / "out"),
                        "--batch", "2"])
    corpus = read_corpus(tmp_path / "out")
    assert corpus.sample_shape == (4, 4, 1) and corpus.n_samples == 7
    assert corpus.groups == ["0", "1", "3"]
    assert [f.n for f in corpus.files] == [1, 2, 2, 2]  # digit 3 has 4 samples: files of 2
    x = corpus.read(0, 7)
    order = np.concatenate([np.flatnonzero(labels == d) for d in (0, 1, 3)])
    np.testing.assert_allclose(x[..., 0], images[order] / 255.0, rtol=1e-6)
    assert list(corpus.sample_table["target"]) == [0, 1, 1, 3, 3, 3, 3]


def test_write_corpus_round_trips(tmp_path):
    from inntrospect.extraction.corpus import write_corpus

    rng = np.random.default_rng(3)
    x = rng.random((23, 2, 3), dtype=np.float32)
    groups = rng.choice(["b b", "a/1", "c"], 23)
    targets = rng.integers(0, 3, 23)
    corpus = read_corpus(write_corpus(x, groups, tmp_path, targets=targets, per_file=2))
    table = corpus.sample_table
    order = sorted(range(23), key=lambda i: (groups[i], targets[i]))  # stable: keeps sample order
    np.testing.assert_array_equal(corpus.read(0, 23), x[order])
    assert [str(g) for g in table["group"]] == [groups[i] for i in order]
    np.testing.assert_array_equal(table["target"], targets[order])
    assert max(f.n for f in corpus.files) == 2
    no_t = read_corpus(write_corpus(x, groups, tmp_path / "nt"))
    assert not no_t.has_target and no_t.n_samples == 23
