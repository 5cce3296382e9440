"""Where a model comes from, and its identity, without importing TensorFlow.

A model is a Keras 3 ``.keras``/``.h5`` file, a legacy TensorFlow SavedModel
folder, or a ``keras.applications`` model named with optional local weights.
The identity (a content hash) lets a store refuse to resume with another model.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import ModelError

__all__ = ["ModelSource", "model_source", "hash_path"]


def hash_path(path: Path) -> str:
    """sha256 of a file, or of every file in a folder (relative names and contents)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelSource:
    """A model by path (file or SavedModel folder) or by ``keras.applications`` name."""

    path: Path | None = None
    name: str | None = None
    weights: Path | None = None

    @property
    def kind(self) -> str:
        if self.name is not None:
            return "keras.applications"
        assert self.path is not None
        return "savedmodel" if self.path.is_dir() else "keras"

    def describe(self) -> str:
        if self.name is not None:
            return f"keras.applications.{self.name} (weights: {self.weights or 'random'})"
        return str(self.path)

    def identity(self) -> dict:
        """Path/name and a content hash; no TensorFlow needed."""
        if self.name is not None:
            return {
                "name": self.name,
                "weights": None if self.weights is None else str(self.weights),
                "sha256": None if self.weights is None else hash_path(self.weights),
            }
        assert self.path is not None
        return {"path": str(self.path), "sha256": hash_path(self.path)}


_HDF5 = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: Path) -> bool:
    """Whether ``path`` holds HDF5's signature (at byte 0, 512, 1024, 2048, …, as the format allows)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        offset = 0
        while offset + len(_HDF5) <= size:
            fh.seek(offset)
            if fh.read(len(_HDF5)) == _HDF5:
                return True
            offset = 512 if offset == 0 else 2 * offset
    return False


def _not_a_model_file(path: Path) -> str | None:
    """Why the file ``path`` cannot be a Keras model of its suffix (None when it may be one)."""
    import zipfile

    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix == ".keras":
        if zipfile.is_zipfile(path):
            return None
        hint = " It is an HDF5 file: rename it to .h5." if _is_hdf5(path) else ""
        return (f"a .keras file is a zip archive written by model.save('model.keras'), and this one "
                f"is not (it starts with {head!r}). Save the model again, or give the right file.{hint}")
    if _is_hdf5(path):
        return None
    hint = " It is a zip archive: a .keras file?" if zipfile.is_zipfile(path) else ""
    return (f"a {path.suffix} model is an HDF5 file written by model.save('model.h5'), and this one "
            f"is not (it starts with {head!r}). Save the model again, or give the right file.{hint}")


def model_source(
    model: str | os.PathLike | ModelSource, weights: str | os.PathLike | None = None
) -> ModelSource:
    """Resolve ``model`` (a path, or a ``keras.applications`` name) to a :class:`ModelSource`.

    A string that is an existing path is a path; otherwise it must be a
    ``keras.applications`` name such as ``"VGG16"``.
    """
    if isinstance(model, ModelSource):
        return model
    w = None
    if weights is not None:
        w = Path(weights).expanduser().resolve()
        if not w.is_file():
            raise ModelError(
                f"weights file {w} not found. Give a local weights file (inntrospect never "
                "downloads weights) or leave weights out for a randomly initialised model."
            )
    p = Path(model).expanduser()
    if p.exists():
        p = p.resolve()
        if p.is_dir() and not (p / "saved_model.pb").is_file():
            raise ModelError(
                f"{p} is a folder without saved_model.pb; expected a TensorFlow SavedModel "
                "folder, a .keras or .h5 file, or a keras.applications name such as 'VGG16'."
            )
        if p.is_file() and p.suffix not in (".keras", ".h5", ".hdf5"):
            raise ModelError(
                f"{p} is not a model file: expected a .keras or .h5 file, a SavedModel folder "
                "or a keras.applications name."
            )
        why = _not_a_model_file(p) if p.is_file() else None
        if why is not None:
            raise ModelError(f"{p} is not a Keras model: {why}.")
        if w is not None:
            raise ModelError("weights= is only for keras.applications models named by name.")
        return ModelSource(path=p)
    text = str(model)
    if "/" in text or os.sep in text or text.endswith((".keras", ".h5", ".hdf5")):
        raise ModelError(f"model file {p.resolve()} not found.")
    return ModelSource(name=text, weights=w)
