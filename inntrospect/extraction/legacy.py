"""Import the reference toolbox's processed-corpus folder into a store.

The reference toolbox (and anyone bringing activations from another
framework the way its README describes) writes a folder::

    <folder>/
      acts/layer000/<batch file>          one .npy per batch file: (n, *layer shape)
      acts/layer001/...                   one folder per layer, in model order; the
                                          last is the model output
      grads/layerNNN/<batch file>         optional; usually absent for the output layer
      aligned/layerNNN/<batch file>       optional; not imported (see below)
      group_name_to_files.json            {group: [batch file, ...]}
      group_name_to_index.json            {group: index}
      index_to_group_name.json            {"index": group}

:func:`import_legacy` streams it into a store of format version 1
(``storage/README.md``) that every later step accepts. Samples are ordered by
group (sorted names, as inntrospect sorts groups), then by the order of the
files in ``group_name_to_files.json``, then by row within each file. The
sample table's ``file`` is the batch file name as listed in the json,
``index_in_file`` the row within it; ``target`` and ``prediction`` are not in
the folder and are stored as -1 (the spec's "none"), so ``corpus.has_target``
is false and ``extraction.gradient_target`` is null (unknown).

``aligned/`` is not imported: inntrospect aligns on the fly from ``grads``
(``naps(aligned=True)``) or persists its own with ``inntrospect align``.

The import is a client of the public writer API
(:class:`~inntrospect.extraction.writer.StoreWriter`): batch files are
memory-mapped one at a time per array and handed to the writer, which copies
their rows into chunk-sized buffers and writes each as one chunk-aligned
region, recording each block once written. Memory stays bounded. The store is
marked complete only after the last block is recorded, so an interrupted
import leaves a store ``open_store`` refuses; importing the same folder again
resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import store as st
from ..errors import ConfigError, CorpusError, NonFiniteError, StoreError
from .writer import StoreWriter

__all__ = ["import_legacy", "read_legacy_folder", "LegacyFolder"]

FILES_JSON = "group_name_to_files.json"
INDEX_JSON = "group_name_to_index.json"
NAMES_JSON = "index_to_group_name.json"
_LAYER_DIR = re.compile(r"^layer(\d+)$")
#: rows compressed per array to choose its codec (like extraction's first batch)
_CODEC_PROBE_ROWS = 128


@dataclass(frozen=True)
class LegacyLayer(st.LayerSpec):
    """One layer folder: a layer of the store (name, shape per sample, grads?) and its folder ``layerNNN``."""

    folder: str = ""


@dataclass(frozen=True)
class LegacyFile:
    group: str
    file: str  # as listed in group_name_to_files.json
    n: int


@dataclass
class LegacyFolder:
    """A validated processed-corpus folder: layers, batch files in sample order, groups."""

    path: Path
    layers: list[LegacyLayer]
    files: list[LegacyFile]
    groups: list[str]
    dtype: str

    @property
    def n_samples(self) -> int:
        return sum(f.n for f in self.files)

    def file_path(self, var: str, layer: LegacyLayer, file: str) -> Path:
        return _on_disk(self.path / var / layer.folder, file)

    def identity(self) -> dict:
        """The ``corpus`` root attribute of the imported store."""
        layout = [[f.group, f.file, f.n] for f in self.files]
        return {
            "path": str(self.path),
            "csv_sha256": hashlib.sha256((self.path / FILES_JSON).read_bytes()).hexdigest(),
            "files_sha256": hashlib.sha256(json.dumps(
                [layout, [[lay.folder, list(lay.shape), lay.has_grads] for lay in self.layers],
                 self.dtype]).encode()).hexdigest(),
            "n_samples": self.n_samples,
            "n_files": len(self.files),
            "sample_shape": None,  # the model input is not in the folder
            "dtype": self.dtype,
            "groups": self.groups,
            "has_target": False,
            "legacy_layers": {lay.name: lay.folder for lay in self.layers},
        }


# -- reading and validating the folder ---------------------------------------
def _on_disk(folder: Path, file: str) -> Path:
    """Where ``np.save(folder / file, ...)`` put the batch (it appends ``.npy`` when missing)."""
    p = folder / file
    if p.is_file() or file.endswith(".npy"):
        return p
    return folder / (file + ".npy")


def _read_json(folder: Path, name: str, what: str):
    path = folder / name
    if not path.is_file():
        raise CorpusError(
            f"{path} not found: a reference-toolbox folder holds {what} in {name}. Point "
            "import-legacy at the folder the toolbox wrote (its processed_corpus_path), or "
            "write that file for activations from another framework."
        )
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorpusError(f"{path} is not valid JSON ({err}); it should hold {what}.") from None


def _header(path: Path, var: str, layer_folder: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, reading its header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) \
                else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (OSError, ValueError) as err:
        try:  # newer header versions: let numpy map it
            a = np.load(path, mmap_mode="r")
            shape, dtype = a.shape, a.dtype
        except Exception:
            raise CorpusError(f"{path} ({var}/{layer_folder}) is not a readable .npy file: {err}. "
                              "Re-save it with numpy.save.") from None
    if dtype.kind not in "fiub" or len(shape) < 1:
        raise CorpusError(
            f"{path} holds a {dtype} array of shape {shape}; expected a numeric batch "
            "(samples, *layer shape). Re-save it as float32 with numpy.save."
        )
    return tuple(int(s) for s in shape), dtype


def _layer_folders(folder: Path, var: str) -> dict[int, str]:
    base = folder / var
    if not base.is_dir():
        return {}
    found = {}
    for p in base.iterdir():
        m = _LAYER_DIR.match(p.name)
        if p.is_dir() and m:
            found[int(m.group(1))] = p.name
    return dict(sorted(found.items()))


def _resolve_names(folders: list[str], layer_names) -> list[str]:
    if layer_names is None:
        return list(folders)
    if isinstance(layer_names, Mapping):
        unknown = sorted(set(layer_names) - set(folders))
        if unknown:
            raise ConfigError(
                f"layer_names maps {unknown}, which are not layer folders of acts/ "
                f"(found {folders}); use keys like {folders[0]!r}."
            )
        names = [str(layer_names.get(f, f)) for f in folders]
    elif isinstance(layer_names, Sequence) and not isinstance(layer_names, str):
        if len(layer_names) != len(folders):
            raise ConfigError(
                f"layer_names lists {len(layer_names)} names, but acts/ has {len(folders)} "
                f"layer folders ({folders}); give one name per folder, in order, or a mapping "
                "{'layer000': name, ...}."
            )
        names = [str(n) for n in layer_names]
    else:
        raise ConfigError(
            f"layer_names must be a mapping {{'layer000': name}} or a list of names, got {layer_names!r}."
        )
    bad = [n for n in names if not n or "/" in n or n.startswith(".")]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if bad or dupes:
        raise ConfigError(
            f"layer names must be unique, non-empty and without '/': "
            f"{'duplicates ' + str(dupes) if dupes else 'invalid ' + str(bad)}."
        )
    return names


def read_legacy_folder(folder: str | os.PathLike, layer_names=None) -> LegacyFolder:
    """Validate a processed-corpus folder from the headers of its files; read no data.

    Raises :class:`~inntrospect.errors.CorpusError` (or ``ConfigError`` for
    ``layer_names``) naming what is wrong and how to fix it.
    """
    path = Path(folder).expanduser().resolve()
    if not path.is_dir():
        raise CorpusError(
            f"legacy folder {path} not found (or not a folder). Pass the folder the reference "
            "toolbox wrote: it holds acts/layerNNN/ and group_name_to_files.json."
        )
    g2f = _read_json(path, FILES_JSON, "{group: [batch file, ...]}")
    g2i = _read_json(path, INDEX_JSON, "{group: index}")
    i2g = _read_json(path, NAMES_JSON, '{"index": group}')
    if not isinstance(g2f, dict) or not all(
            isinstance(v, list) and all(isinstance(f, str) for f in v) for v in g2f.values()):
        raise CorpusError(f"{path / FILES_JSON} must map each group to a list of batch file names.")
    if not isinstance(g2i, dict) or not isinstance(i2g, dict):
        raise CorpusError(f"{path / INDEX_JSON} and {path / NAMES_JSON} must be JSON objects.")
    for name, groups in ((INDEX_JSON, list(g2i)), (NAMES_JSON, [str(g) for g in i2g.values()])):
        missing = [g for g in groups if g not in g2f]
        if missing:
            raise CorpusError(
                f"{path / name} names groups {missing[:5]} that {FILES_JSON} does not list; "
                f"the three json files must describe the same groups. Add their files to "
                f"{FILES_JSON} or remove them from {name}."
            )
    if any(str(g2i.get(g)) != str(i) for i, g in i2g.items()) or len(g2i) != len(i2g):
        raise CorpusError(f"{path / NAMES_JSON} is not the inverse of {path / INDEX_JSON}; "
                          "rewrite both from the same group list.")
    owner: dict[str, str] = {}
    for g, files in g2f.items():
        for f in files:
            if f in owner:
                raise CorpusError(
                    f"batch file {f!r} is listed under groups {owner[f]!r} and {g!r} in "
                    f"{path / FILES_JSON}; a store gives each sample one group, so import a "
                    "folder whose groups do not overlap (e.g. without intersectional groups)."
                )
            owner[f] = g
    groups = sorted(g for g, files in g2f.items() if files)
    if not groups:
        raise CorpusError(f"{path / FILES_JSON} lists no batch files.")
    order = [(g, f) for g in groups for f in g2f[g]]

    acts_dirs = _layer_folders(path, "acts")
    if not acts_dirs:
        raise CorpusError(
            f"{path / 'acts'} has no layer folders (layer000, layer001, ...); the reference "
            "toolbox writes one per layer of interest there."
        )
    grads_dirs = _layer_folders(path, "grads")
    extra = sorted(set(grads_dirs.values()) - set(acts_dirs.values()))
    if extra:
        raise CorpusError(f"{path / 'grads'} has layer folders {extra} without activations in "
                          f"{path / 'acts'}; remove them or add their activations.")
    folders = list(acts_dirs.values())
    names = _resolve_names(folders, layer_names)

    counts: dict[str, int] = {}
    layers, dtypes = [], set()
    for folder_name, name in zip(folders, names):
        shape = None
        has_grads = (path / "grads" / folder_name).is_dir() and any(
            (path / "grads" / folder_name).glob("*.npy"))
        ref_file = None
        for var in ("acts", "grads") if has_grads else ("acts",):
            for g, f in order:
                p = _on_disk(path / var / folder_name, f)
                if not p.is_file():
                    raise CorpusError(
                        f"batch file {f!r} of group {g!r} is listed in {FILES_JSON} but missing "
                        f"from {path / var / folder_name}; restore it, or remove it from "
                        f"{FILES_JSON} (for every layer)."
                    )
                fshape, dtype = _header(p, var, folder_name)
                dtypes.add(str(dtype))
                if shape is None:
                    shape, ref_file = fshape[1:], f"{var}/{folder_name}/{f}"
                elif fshape[1:] != shape:
                    what = f"acts and grads of {folder_name}" if var == "grads" \
                        else f"the files of layer folder acts/{folder_name}"
                    raise CorpusError(
                        f"{what} must agree in shape per sample: {ref_file} has {shape}, "
                        f"{var}/{folder_name}/{f} has {fshape[1:]}. Re-export the layer so every "
                        "batch file holds (samples, *the same layer shape)."
                    )
                n = counts.setdefault(f, fshape[0])
                if n != fshape[0]:
                    raise CorpusError(
                        f"batch file {f!r} holds {fshape[0]} samples in {var}/{folder_name} but "
                        f"{n} in acts/{folders[0]}; every layer and grads "
                        "must hold the same samples. Re-export the folder."
                    )
        if not shape:
            raise CorpusError(f"{path / 'acts' / folder_name} holds scalars per sample; expected "
                              "at least a unit axis (samples, ..., units).")
        layers.append(LegacyLayer(name, tuple(shape), has_grads, folder_name))
    files = [LegacyFile(g, f, counts[f]) for g, f in order]
    if sum(f.n for f in files) == 0:
        raise CorpusError(f"the batch files of {path} hold no samples.")
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed: " + ", ".join(sorted(dtypes))
    return LegacyFolder(path, layers, files, groups, dtype)


def read_rows(path: Path) -> np.ndarray:
    """One batch file, memory-mapped (its rows are read as they are copied)."""
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # e.g. an empty array cannot be mapped
        return np.load(path)


# -- writing -----------------------------------------------------------------
class ChunkStream:
    """One array of the folder (a layer's ``acts`` or ``grads``): the rows of the batch file being imported.

    :func:`import_legacy` pushes each batch file's rows of every array, then
    hands them all to the store's writer at once; one batch file per array is
    open (memory-mapped) at a time.
    """

    def __init__(self, layer: LegacyLayer, var: str, what: str):
        self.layer, self.var, self.what = layer, var, what
        self.rows: np.ndarray | None = None

    def push(self, rows: np.ndarray, file: str) -> None:
        self.rows = rows

    def take(self) -> np.ndarray:
        rows, self.rows = self.rows, None
        return rows


def choose_legacy_codecs(legacy: LegacyFolder, plan: st.ChunkPlan) -> dict:
    """Extraction's rule: zstd-1 for arrays whose first rows shrink at least MIN_RATIO, else raw.

    The probe is the first ``min(128, chunk)`` samples of each array: at most one chunk in memory.
    """
    import numcodecs

    codec = numcodecs.Zstd(level=st.CODEC["level"])
    sizes: dict[str, dict[str, tuple[int, int]]] = {}
    for layer in legacy.layers:
        rows_wanted = min(_CODEC_PROBE_ROWS, plan.chunks[layer.name], legacy.n_samples)
        for var in ("acts", "grads") if layer.has_grads else ("acts",):
            a = np.empty((rows_wanted, *layer.shape), np.float32)
            got = 0
            for f in legacy.files:
                if got >= rows_wanted:
                    break
                if f.n:
                    rows = read_rows(legacy.file_path(var, layer, f.file))
                    take = min(f.n, rows_wanted - got)
                    np.copyto(a[got : got + take], rows[:take], casting="unsafe")
                    got += take
                    del rows
            sizes.setdefault(layer.name, {})[var] = (a.nbytes, len(codec.encode(a)))
            del a
    return st.choose_codecs(sizes)


def import_legacy(
    folder: str | os.PathLike,
    store: str | os.PathLike,
    layer_names: Mapping[str, str] | Sequence[str] | None = None,
    *,
    chunk_mib: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Import a reference-toolbox processed-corpus folder into a new store.

    Parameters
    ----------
    folder
        The folder the reference toolbox wrote (``acts/layerNNN/``, optional
        ``grads/layerNNN/``, ``group_name_to_files.json``,
        ``group_name_to_index.json``, ``index_to_group_name.json``).
    store
        Path of the Zarr store to write.
    layer_names
        Names for the layers: ``{"layer000": "conv2d_24", ...}`` (folders left
        out keep their name) or a list, one name per layer folder in order.
        Default: the folder names ``layer000``, ``layer001``, ...
    chunk_mib
        Target chunk size in MiB (default 32), as for extraction.
    overwrite
        Replace an existing store at ``store``.
    progress
        Show a progress bar.

    Returns
    -------
    pathlib.Path
        The store's path. Samples are ordered by group (sorted names), then
        by the files' order in ``group_name_to_files.json``, then by row.

    Raises
    ------
    CorpusError
        The folder is incomplete or inconsistent (the message names the file).
    NonFiniteError
        A batch file holds NaN or infinity.
    StoreError
        The store exists and is complete, or is not a store (pass
        ``overwrite=True``); ``StoreMismatchError`` if it is an incomplete
        import of another folder (an interrupted import of this one is
        resumed); ``StoreLockedError`` if another process writes to it.

    Examples
    --------
    >>> path = import_legacy("processed_corpus", "run.zarr",
    ...                      {"layer000": "conv2d_24"})  # doctest: +SKIP
    >>> inntrospect.naps(path)["conv2d_24"].nap.compute()  # doctest: +SKIP
    """
    legacy = read_legacy_folder(folder, layer_names)
    path = st.location(store)
    n = legacy.n_samples
    if not overwrite and (what := st.occupant(path)) == "something that is not a store":
        raise StoreError(
            f"{path} already exists and holds {what}. Choose another store path, or pass "
            "overwrite=True (--overwrite) to replace it."
        )
    if chunk_mib is None and not overwrite and st.is_store(path):  # resuming: keep the store's chunking
        chunk_mib = st.store_attrs(path).get("chunk_mib")
    plan = st.plan_for(legacy.layers, chunk_mib, n)
    attrs = st.root_attrs(
        model={"framework": "legacy", "source": str(legacy.path), "path": str(legacy.path), "sha256": None},
        corpus=legacy.identity(), layers=legacy.layers, plan=plan, n_samples=n,
        gradient_target=None,  # unknown: the folder does not say
        source="import-legacy")
    table = {
        "group": np.array([f.group for f in legacy.files for _ in range(f.n)], dtype=object),
        "file": np.array([f.file for f in legacy.files for _ in range(f.n)], dtype=object),
        "index_in_file": np.concatenate([np.arange(f.n) for f in legacy.files]),
        "target": np.full(n, -1, np.int64),
    }

    def refuse_complete(stored: dict) -> None:  # an interrupted import of the same folder is resumed
        if stored["extraction"].get("state") == "complete":
            raise StoreError(
                f"{path} already exists and holds a store. Choose another store path, or pass "
                "overwrite=True (--overwrite) to replace it."
            )

    with StoreWriter.open(path, attrs, legacy.layers, plan, table, overwrite=overwrite,
                          codecs=lambda: choose_legacy_codecs(legacy, plan), check=refuse_complete,
                          progress=progress, desc="import-legacy") as writer:
        _write_data(legacy, writer)
    return path


def _write_data(legacy: LegacyFolder, writer: StoreWriter) -> None:
    """Every batch file's rows, from the writer's next sample on, to the writer, file by file."""
    streams = [ChunkStream(layer, var, f"{legacy.path / var / layer.folder}")
               for layer in legacy.layers for var in (("acts", "grads") if layer.has_grads else ("acts",))]
    end = 0
    for f in legacy.files:
        start, end = end, end + f.n
        skip = max(0, writer.next_sample - start)
        if skip >= f.n:  # no rows, or recorded by an import this one resumes
            continue
        for stream in streams:
            stream.push(read_rows(legacy.file_path(stream.var, stream.layer, f.file)), f.file)
        rows = {(stream.layer.name, stream.var): stream.take()[skip:] for stream in streams}
        try:
            writer.write({name: a for (name, var), a in rows.items() if var == "acts"},
                         {name: a for (name, var), a in rows.items() if var == "grads"}, start=start + skip)
        except NonFiniteError as err:
            bad = [s for s in streams if (s.layer.name, s.var) == (getattr(err, "layer", None), getattr(err, "var", None))]
            if not bad:
                raise
            raise NonFiniteError(
                f"{bad[0].what}/{f.file} row {err.sample - start} contains NaN or infinity (after conversion "
                "to float32). Fix or drop that batch file and import again with overwrite=True "
                "(--overwrite)."
            ) from None
        finally:
            del rows  # one batch file per array at a time
