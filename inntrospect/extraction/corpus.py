"""Read and validate a corpus: ``corpus.csv`` plus ``.npy`` batch files.

``corpus.csv`` has no header and one row per batch file: ``file,group[,target]``
(``REFERENCE.md`` §1). Sample order is row order, then order inside each file.
Everything is checked before any work starts; each problem raises one
:class:`~inntrospect.errors.CorpusError` naming the row, the file and the fix.
Batch files are only opened memory-mapped: validating a corpus reads headers
(and, for integer inputs, the first samples of the first file, to warn about them).

Also refused, unless allowed: a batch file listed twice (its samples would be
extracted and counted twice; ``allow_duplicates``), and a path leaving the
corpus folder (``../x.npy``, an absolute path; ``allow_outside``): on a cluster
every worker reads the batch files by these paths.

A corpus may be a list of csv files, read in order as one corpus (e.g. a month
of data each): each csv's rows are relative to its own folder and checked as
a single csv's are; a batch file listed twice is refused across them, and the
target column must be in all of them or none. The sample table's ``file``
names a batch file of the first csv as written there, and one of a later csv
by its path relative to the first csv's folder (POSIX, e.g.
``../feb/batch_0.npy``; an absolute path as written): so every ``file`` names
one batch file, found from the folder of the first csv (the store's
``corpus.path``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import CorpusError

__all__ = ["Corpus", "read_corpus", "write_corpus"]


@dataclass(frozen=True)
class BatchFile:
    """One row of ``corpus.csv``: a batch file and its samples' labels."""

    row: int  # 1-based line number in its csv
    file: str  # as written in the (first) csv; in a later csv's row, relative to the first csv's folder
    path: Path
    group: str
    target: int | None
    n: int
    csv: Path | None = None  # the csv listing it


@dataclass(frozen=True)
class Corpus:
    """A validated corpus. Cheap to hold: data stay in the memory-mapped files."""

    csv_path: Path
    files: tuple[BatchFile, ...]
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    has_target: bool
    offsets: np.ndarray = field(repr=False)  # start sample of each file, plus total
    #: how it was read (:func:`read_corpus`'s switches), so that it can be read again the same way
    allow_duplicates: bool = False
    allow_outside: bool = False
    #: integer inputs: ``{"dtype", "min", "max", "samples"}`` seen in the first samples; else None
    integer_inputs: dict | None = field(default=None, compare=False)
    #: every csv of the corpus, in order (``csv_path`` is the first); ``(csv_path,)`` when not given
    csv_paths: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if not self.csv_paths:
            object.__setattr__(self, "csv_paths", (self.csv_path,))

    @property
    def n_samples(self) -> int:
        return int(self.offsets[-1])

    @property
    def csv_names(self) -> str:
        """The csv file, or the csv files joined by `` + ``, for messages."""
        return " + ".join(str(p) for p in self.csv_paths)

    @property
    def request(self) -> str | list[str]:
        """How :func:`read_corpus` reads it again (on a cluster's workers): the csv's path, or the list
        of the csvs' paths (plain strings)."""
        return str(self.csv_path) if len(self.csv_paths) == 1 else [str(p) for p in self.csv_paths]

    @property
    def groups(self) -> list[str]:
        """Sorted unique group names (the group order used everywhere)."""
        return sorted({f.group for f in self.files})

    @cached_property
    def sample_table(self) -> dict[str, np.ndarray]:
        """Per-sample labels: ``group``, ``file``, ``index_in_file``, ``target``.

        ``target`` is -1 where the corpus has no target column. Computed once.
        """
        counts = [f.n for f in self.files]
        group = np.repeat(np.array([f.group for f in self.files], dtype=object), counts)
        file = np.repeat(np.array([f.file for f in self.files], dtype=object), counts)
        index = np.concatenate([np.arange(f.n, dtype=np.int64) for f in self.files])
        target = np.repeat(
            np.array([-1 if f.target is None else f.target for f in self.files], np.int64),
            counts,
        )
        return {"group": group, "file": file, "index_in_file": index, "target": target}

    def targets(self, start: int, stop: int) -> np.ndarray:
        """Targets of samples ``start:stop`` (-1 where absent)."""
        return self.sample_table["target"][start:stop]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start:stop`` as one array (only those files are touched)."""
        if not 0 <= start <= stop <= self.n_samples:
            raise IndexError(f"samples {start}:{stop} outside 0:{self.n_samples}")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        i = max(first, 0)
        while start < stop:
            f, lo = self.files[i], int(self.offsets[i])
            hi = lo + f.n
            take_stop = min(stop, hi)
            if take_stop > start:
                data = np.load(f.path, mmap_mode="r")
                parts.append(data[start - lo : take_stop - lo])
                start = take_stop
            i += 1
        if len(parts) == 1:
            return np.array(parts[0])
        return np.concatenate(parts) if parts else np.empty((0, *self.sample_shape), self.dtype)

    def batches(self, start: int, stop: int, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(first_sample, array)`` for consecutive batches of ``start:stop``."""
        for lo in range(start, stop, batch_size):
            hi = min(lo + batch_size, stop)
            yield lo, self.read(lo, hi)

    def identity(self, verify: bool = False) -> dict:
        """What makes this corpus this corpus: hashes of the csv and of the files' layout, and each
        batch file's size and modification time (``files``; with ``verify``, its sha256 too).

        ``integer_inputs`` records integer inputs (dtype and the value range seen in the
        first samples), which reach the model as float32 unchanged. A corpus of several csv
        files has ``path`` of the first, ``csvs`` (per csv: ``path``, ``csv_sha256``,
        ``n_files``, ``n_samples``) and ``csv_sha256`` of the csvs' hashes joined by newlines.
        """
        layout = [[f.file, f.n, list(self.sample_shape), str(self.dtype)] for f in self.files]
        files, hashes = [], {}
        for f in self.files:
            try:
                stat = f.path.stat()
            except OSError as err:
                raise CorpusError(f"{f.csv or self.csv_path}, line {f.row}: batch file {f.path} cannot be "
                                  f"read any more ({err}). Restore it, or fix corpus.csv.") from None
            rec = {"file": f.file, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if verify:
                if f.path not in hashes:
                    hashes[f.path] = _sha256(f.path)
                rec["sha256"] = hashes[f.path]
            files.append(rec)
        sha = [hashlib.sha256(p.read_bytes()).hexdigest() for p in self.csv_paths]
        csvs = {}
        if len(sha) > 1:
            csvs = {"csvs": [{"path": str(p), "csv_sha256": h, "n_files": sum(1 for f in self.files if f.csv == p),
                              "n_samples": sum(f.n for f in self.files if f.csv == p)}
                             for p, h in zip(self.csv_paths, sha)]}
        return {
            "path": str(self.csv_path),
            **csvs,
            "csv_sha256": sha[0] if len(sha) == 1 else hashlib.sha256("\n".join(sha).encode()).hexdigest(),
            "files_sha256": hashlib.sha256(json.dumps(layout).encode()).hexdigest(),
            "n_samples": self.n_samples,
            "n_files": len(self.files),
            "sample_shape": list(self.sample_shape),
            "dtype": str(self.dtype),
            "groups": self.groups,
            "has_target": self.has_target,
            "integer_inputs": self.integer_inputs,
            "files": files,
        }

    def check_input_shape(self, input_shape: tuple[int | None, ...], model_name: str = "the model") -> None:
        """Raise if samples do not fit a model input of shape ``input_shape`` (no batch axis)."""
        fits = len(input_shape) == len(self.sample_shape) and all(
            m is None or m == s for m, s in zip(input_shape, self.sample_shape)
        )
        if not fits:
            want = "(" + ", ".join("any" if m is None else str(m) for m in input_shape) + ")"
            raise CorpusError(
                f"samples in {self.csv_names} have shape {self.sample_shape}, but {model_name} "
                f"expects inputs of shape {want} (without the batch axis). Reshape the batch "
                f"files to (n, {want[1:]} or use the model they were made for."
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


#: how many samples of the first batch file are looked at to report the range of integer inputs
RANGE_SAMPLES = 128


def _not_npy(path: Path) -> str | None:
    """Why ``path`` is not a ``.npy`` file (None when it starts like one)."""
    with open(path, "rb") as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        return None
    if head[:2] == b"PK":
        return "it is a zip archive (an .npz file?), not a .npy file"
    return f"it is not a .npy file at all (a .npy file starts with b'\\x93NUMPY', this one with {head!r})"


def _outside(file: str) -> str | None:
    """Why the path ``file`` (as written in corpus.csv) leaves the corpus folder (None if it stays)."""
    if os.path.isabs(file):
        return "it is an absolute path"
    norm = os.path.normpath(file)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "it leads out of the corpus folder ('..')"
    return None


def _header_hint(row: list[str]) -> str:
    if [c.strip().lower() for c in row[:2]] == ["file", "group"]:
        return " It looks like a header row; corpus.csv has no header, remove that line."
    return ""


def read_corpus(path: str | os.PathLike | Sequence[str | os.PathLike], allow_duplicates: bool = False,
                allow_outside: bool = False) -> Corpus:
    """Read and validate ``corpus.csv`` and the header of every batch file it names.

    The csv is read as UTF-8, with or without a byte order mark (as spreadsheets save it).

    Parameters
    ----------
    path
        ``corpus.csv`` or the folder holding it; or a list of them, read in order as one
        corpus (the samples of the first csv's rows, then the second's, ...).
    allow_duplicates
        Accept a batch file listed on more than one row (in one group or several):
        its samples are then extracted, and counted, once per row.
    allow_outside
        Accept batch files outside the corpus folder (absolute paths, ``../``).

    Warns
    -----
    UserWarning
        Integer inputs (e.g. uint8 images 0-255): they are passed to the model
        as float32 unchanged. Recorded in :meth:`Corpus.identity` too.

    Raises
    ------
    CorpusError
        One specific error per problem, naming the csv and its line: missing csv,
        malformed row, non-integer target, rows (or csvs) mixing with and without
        target, a batch file listed twice or outside the corpus folder, missing,
        unreadable, non-.npy or empty batch file, sample shapes or dtypes that
        differ between files.

    Examples
    --------
    >>> corpus = read_corpus(["jan/corpus.csv", "feb/corpus.csv"])  # doctest: +SKIP
    >>> corpus.sample_table["file"][-1]  # doctest: +SKIP
    '../feb/batch_3.npy'
    """
    csv_paths = _csv_files(path)
    rows = _Rows(csv_paths[0].parent, allow_duplicates, allow_outside)
    for csv_path in csv_paths:
        rows.read(csv_path)
    files = rows.files
    offsets = np.concatenate([[0], np.cumsum([f.n for f in files])]).astype(np.int64)
    integers = _integer_inputs(csv_paths[0], files[0], np.dtype(rows.dtype))
    return Corpus(csv_paths[0].resolve(), tuple(files), rows.shape, np.dtype(rows.dtype), bool(rows.has_target),
                  offsets, allow_duplicates, allow_outside, integers, tuple(p.resolve() for p in csv_paths))


def _csv_files(path) -> list[Path]:
    """The csv files of ``path`` (a csv or its folder, or a list of them), each checked to exist."""
    if isinstance(path, str | os.PathLike):
        given = [path]
    elif isinstance(path, Sequence) and not isinstance(path, bytes):
        given = list(path)
        if not given:
            raise CorpusError("the corpus is an empty list of csv files; give the path of a corpus.csv "
                              "(or of its folder), or a list of them.")
        bad = [p for p in given if not isinstance(p, str | os.PathLike)]
        if bad:
            raise CorpusError(f"a corpus given as a list holds paths of corpus csv files; got {bad[0]!r} in it.")
    else:
        raise CorpusError(f"the corpus must be the path of a corpus.csv (or of its folder), or a list of them; "
                          f"got {type(path).__name__} {path!r}.")
    out: list[Path] = []
    for i, item in enumerate(given):
        csv_path = Path(item)
        if csv_path.is_dir():
            csv_path = csv_path / "corpus.csv"
        if not csv_path.is_file():
            which = f" (item {i + 1} of the corpus list)" if len(given) > 1 else ""
            raise CorpusError(
                f"corpus file {csv_path}{which} does not exist. Give the path of a corpus.csv "
                "(rows 'file,group[,target]', no header) or of the folder that holds it."
            )
        same = [j for j, p in enumerate(out, 1) if p.resolve() == csv_path.resolve()]
        if same:
            raise CorpusError(f"{csv_path} is listed twice in the corpus list (items {same[0]} and {i + 1}): its "
                              "samples would be extracted and counted twice. List each csv file once.")
        out.append(csv_path)
    return out


def _recorded_name(written: str, root: Path, first_root: Path) -> str:
    """The sample table's ``file`` of a batch file written as ``written`` in a csv in ``root``: as written
    in the first csv; else relative to the first csv's folder (POSIX), or absolute as written."""
    if root == first_root or os.path.isabs(written):
        return written
    full = os.path.normpath(os.path.join(root.resolve(), written))
    try:
        return Path(os.path.relpath(full, first_root.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative path
        return Path(full).as_posix()


class _Rows:
    """The rows of the csvs of one corpus, read one csv after the other; what is checked across them."""

    def __init__(self, first_root: Path, allow_duplicates: bool, allow_outside: bool):
        self.first_root, self.allow_duplicates, self.allow_outside = first_root, allow_duplicates, allow_outside
        self.files: list[BatchFile] = []
        self.has_target: bool | None = None
        self.target_row: BatchFile | None = None  # the first row, which set has_target
        self.ref: BatchFile | None = None
        self.shape: tuple[int, ...] = ()
        self.dtype: np.dtype | None = None
        self.seen: dict[Path, BatchFile] = {}  # resolved path -> its first row

    def _line(self, bf: BatchFile, csv: Path) -> str:
        """``line N`` of ``bf``'s row, naming its csv when it is not ``csv`` (resolved)."""
        return f"line {bf.row}" if bf.csv == csv else f"line {bf.row} of {bf.csv}"

    def read(self, csv_path: Path) -> None:
        root, resolved = csv_path.parent, csv_path.resolve()
        try:
            with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # a BOM is dropped
                rows = [(i, r) for i, r in enumerate(csv.reader(fh), start=1)]
        except (UnicodeDecodeError, csv.Error) as err:
            raise CorpusError(f"{csv_path} is not a readable CSV file: {err}") from err
        first_with: bool | None = None  # of this csv's rows
        with_target: int | None = None  # row number of its first row, to name it
        n_before = len(self.files)
        for lineno, row in rows:
            if not row or all(not c.strip() for c in row):
                continue  # blank lines are allowed
            cells = [c.strip() for c in row]
            where = f"{csv_path}, line {lineno}"
            if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
                raise CorpusError(
                    f"{where}: expected 'file,group' or 'file,group,target', got {row!r}."
                    + _header_hint(cells)
                )
            target: int | None = None
            if len(cells) == 3:
                try:
                    target = int(cells[2])
                except ValueError:
                    raise CorpusError(
                        f"{where}: target {cells[2]!r} is not an integer; the target column "
                        "holds the output index to take gradients for (for example the class id)."
                        + _header_hint(cells)
                    ) from None
                if target < 0:
                    raise CorpusError(f"{where}: target {target} is negative; use an output index >= 0.")
            has = target is not None
            if first_with is None:
                first_with, with_target = has, lineno
                first = self.target_row
                if first is not None and has != self.has_target:
                    raise CorpusError(
                        f"{where}: the rows of this csv {'have a' if has else 'have no'} target column, but "
                        f"those of {first.csv} {'have one' if self.has_target else 'have none'} "
                        f"(line {first.row}). A corpus of several csv files has the target column in all "
                        f"of them or in none: {'remove it from' if has else 'add it to'} the rows of "
                        f"{csv_path}, or {'add it to' if has else 'remove it from'} those of {first.csv}."
                    )
            elif has != first_with:
                raise CorpusError(
                    f"{where}: this row {'has' if has else 'has no'} target, but line {with_target} "
                    f"{'has' if first_with else 'has no'} target. Give a target on every row or on none."
                )
            outside = None if self.allow_outside else _outside(cells[0])
            if outside is not None:
                raise CorpusError(
                    f"{where}: batch file {cells[0]!r} is outside the corpus folder {root}: {outside}. "
                    "Batch files are read by these paths wherever the extraction runs (on a cluster, "
                    "by every worker), so keep them in the corpus folder and write their paths "
                    "relative to it; or allow it with allow_outside=True ([corpus] allow_outside = true)."
                )
            fpath = (root / cells[0]).resolve()
            seen = self.seen.get(fpath)
            if seen is not None and not self.allow_duplicates:
                line = self._line(seen, resolved)
                if seen.group == cells[1]:
                    why = (f"it is listed again ({line} lists it too, in the same group "
                           f"{seen.group!r}): its samples would be extracted and counted twice")
                else:
                    why = (f"it is listed in group {cells[1]!r}, but {line} lists it in "
                           f"group {seen.group!r}: its samples would count in both groups")
                raise CorpusError(
                    f"{where}: batch file {cells[0]!r} ({fpath}): {why}. Remove one of the rows, or "
                    "allow it with allow_duplicates=True ([corpus] allow_duplicates = true)."
                )
            if not fpath.is_file():
                raise CorpusError(
                    f"{where}: batch file {cells[0]!r} not found (looked for {fpath}). Paths in "
                    "corpus.csv are relative to its folder." + _header_hint(cells)
                )
            try:
                not_npy = _not_npy(fpath)
                if not_npy is not None:
                    raise CorpusError(
                        f"{where}: batch file {fpath} is not a readable .npy array: {not_npy}. Save each "
                        "batch with numpy.save as one array shaped (n, *input_shape)."
                    )
                data = np.load(fpath, mmap_mode="r", allow_pickle=False)
            except CorpusError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure means unreadable
                raise CorpusError(
                    f"{where}: batch file {fpath} is not a readable .npy array ({err}). Save each "
                    "batch with numpy.save as one array shaped (n, *input_shape)."
                ) from err
            if not isinstance(data, np.ndarray) or data.ndim < 1:
                raise CorpusError(f"{where}: {fpath} holds a scalar; expected an array (n, *input_shape).")
            if data.dtype.kind not in "fiub":
                raise CorpusError(
                    f"{where}: {fpath} has dtype {data.dtype}; expected numbers (float, int or bool)."
                )
            if data.shape[0] == 0:
                raise CorpusError(f"{where}: batch file {fpath} is empty (0 samples). Remove the row.")
            name = _recorded_name(cells[0], root, self.first_root)
            bf = BatchFile(lineno, name, fpath, cells[1], target, int(data.shape[0]), resolved)
            ref = self.ref
            if ref is None:
                self.ref, self.shape, self.dtype = bf, tuple(data.shape[1:]), data.dtype
            elif tuple(data.shape[1:]) != self.shape:
                raise CorpusError(
                    f"{where}: samples in {cells[0]} have shape {tuple(data.shape[1:])}, but samples "
                    f"in {ref.file} ({self._line(ref, resolved)}) have shape {self.shape}. All batch "
                    "files must hold samples of one shape."
                )
            elif data.dtype != self.dtype:
                raise CorpusError(
                    f"{where}: {cells[0]} has dtype {data.dtype}, but {ref.file} ({self._line(ref, resolved)}) "
                    f"has {self.dtype}. Save all batch files with one dtype."
                )
            del data
            if self.target_row is None:
                self.target_row, self.has_target = bf, has
            self.seen.setdefault(fpath, bf)
            self.files.append(bf)
        if len(self.files) == n_before:
            raise CorpusError(f"{csv_path} lists no batch files; add rows 'file,group[,target]'.")


def _integer_inputs(csv_path: Path, first: BatchFile, dtype: np.dtype) -> dict | None:
    """Warn (once) about integer inputs; what is recorded of them: dtype and the range of the first samples."""
    if dtype.kind not in "iu":
        return None
    k = min(first.n, RANGE_SAMPLES)
    head = np.load(first.path, mmap_mode="r")[:k]
    lo, hi = int(head.min()), int(head.max())
    warnings.warn(
        f"{csv_path}: the batch files hold integers ({dtype}; values {lo}..{hi} in the first {k} "
        f"samples of {first.file}). Most models expect floats, e.g. scaled to [0, 1]; the values are "
        "passed as float32 unchanged. If the model was trained on scaled inputs, save the batch "
        "files scaled (e.g. x.astype('float32') / 255).",
        UserWarning, stacklevel=3,
    )
    return {"dtype": str(dtype), "min": lo, "max": hi, "samples": k}


def write_corpus(
    x: np.ndarray,
    groups,
    out: str | os.PathLike,
    targets=None,
    per_file: int = 500,
) -> Path:
    """Write arrays as a corpus: ``out/corpus.csv`` plus ``.npy`` batch files.

    Parameters
    ----------
    x
        Samples ``(n, *input_shape)``.
    groups
        Group label of each sample (written as text).
    targets
        Optional integer target of each sample (the ``target`` column).
    per_file
        Most samples per batch file. Samples of one group (and target) go to
        files of their own, in sorted group order, keeping their order.

    Returns
    -------
    pathlib.Path
        The path of ``corpus.csv``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups = np.asarray([str(g) for g in groups])
    tg = None if targets is None else np.asarray(targets).astype(np.int64)
    pairs = sorted(set(zip(groups.tolist(), [-1] * len(groups) if tg is None else tg.tolist())))
    rows = []
    for i, (group, target) in enumerate(pairs):
        mask = groups == group if tg is None else (groups == group) & (tg == target)
        idx = np.flatnonzero(mask)
        stem = "".join(c if c.isalnum() else "_" for c in group)
        for k, lo in enumerate(range(0, len(idx), per_file)):
            name = f"{i:03d}_{stem}_{k}.npy"
            np.save(out / name, x[idx[lo : lo + per_file]])
            rows.append(f"{name},{group}" + ("" if tg is None else f",{target}"))
    csv_path = out / "corpus.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path
