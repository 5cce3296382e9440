"""Where a model comes from, and its identity, without importing TensorFlow or PyTorch.

A model is a Keras 3 ``.keras``/``.h5`` file, a legacy TensorFlow SavedModel
folder, a ``keras.applications`` model named with optional local weights, or a
PyTorch model: a ``torch.nn.Module`` object given in Python, or a factory
(``"package.module:make_model"`` or ``"path/to/file.py:make_model"``) with an
optional local ``state_dict`` file. The identity (a content hash) lets a store
refuse to resume with another model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError, ModelError

__all__ = ["ModelSource", "model_source", "torch_source", "hash_path", "TORCH_INSTALL", "check_layer_names"]

#: what to install for PyTorch models
TORCH_INSTALL = "pip install 'inntrospect[torch]'"
#: suffixes of the state_dict files a torch factory's weights are read from
TORCH_WEIGHTS = (".pt", ".pth")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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
    """A model by path (file or SavedModel folder), by ``keras.applications`` name, or a torch model.

    A torch model is a ``factory`` (``"package.module:function"`` or
    ``"/absolute/file.py:function"``, called without arguments) with optional
    ``weights`` (a ``state_dict`` file), or a ``module`` object, which works in
    this process only (it is not sent to a cluster's workers). ``config`` is the
    config file the source was read from: mistakes in it are then
    :class:`~inntrospect.errors.ConfigError` naming that file.
    """

    path: Path | None = None
    name: str | None = None
    weights: Path | None = None
    factory: str | None = None
    module: object | None = field(default=None, repr=False)
    config: Path | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        if self.factory is not None or self.module is not None:
            return "torch"
        if self.name is not None:
            return "keras.applications"
        assert self.path is not None
        return "savedmodel" if self.path.is_dir() else "keras"

    @property
    def factory_file(self) -> Path | None:
        """The file a factory ``file.py:function`` is defined in (None for ``package.module:function``)."""
        if self.factory is None:
            return None
        target = self.factory.rsplit(":", 1)[0]
        return Path(target) if target.endswith(".py") else None

    def describe(self) -> str:
        if self.module is not None:
            return f"the torch module {type(self.module).__qualname__} (in memory)"
        if self.factory is not None:
            return f"the torch model of {self.factory} (weights: {self.weights or 'as the factory makes them'})"
        if self.name is not None:
            return f"keras.applications.{self.name} (weights: {self.weights or 'random'})"
        return str(self.path)

    def error(self, message: str) -> ModelError | ConfigError:
        """The error for a mistake in how the model is given: a ConfigError naming the config file
        the source came from, else a ModelError."""
        return _source_error(self.config, message)

    def identity(self) -> dict:
        """Path/name and a content hash; no TensorFlow or PyTorch needed.

        A torch factory's hash covers the weights file and, for ``file.py:function``,
        the file's contents (not its path); without a weights file (and for a
        module object) ``sha256`` is None here and the model hashes its ``state_dict``.
        """
        if self.module is not None:
            cls = type(self.module)
            return {"name": f"{cls.__module__}.{cls.__qualname__}", "sha256": None}
        if self.factory is not None:
            fn = self.factory.rsplit(":", 1)[1]
            code = self.factory_file
            ident = {"name": self.factory, "factory": self.factory,
                     "weights": None if self.weights is None else str(self.weights),
                     "factory_sha256": hash_path(code) if code is not None else None, "sha256": None}
            if self.weights is not None:
                h = hashlib.sha256(b"torch\0")
                h.update((code.name + ":" + fn if code is not None else self.factory).encode() + b"\0")
                h.update((ident["factory_sha256"] or "").encode() + b"\0" + hash_path(self.weights).encode())
                ident["sha256"] = h.hexdigest()
            return ident
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


def _source_error(config: Path | None, message: str) -> ModelError | ConfigError:
    if config is not None:
        return ConfigError(f"{config}: [model] {message}")
    return ModelError(message)


def is_torch_module(model) -> bool:
    """Whether ``model`` is a ``torch.nn.Module`` (without importing torch: only if it is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _looks_like_factory(text: str) -> bool:
    """Whether ``text`` is meant as a torch factory (``module:function`` or ``file.py[:function]``)."""
    if text.endswith(".py") or ".py:" in text:
        return True
    target = text.rsplit(":", 1)[0] if ":" in text else ""
    return bool(target) and _DOTTED.fullmatch(target) is not None


def torch_source(
    factory: str,
    weights: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
) -> ModelSource:
    """A torch model built by ``factory`` and loaded with the ``state_dict`` file ``weights``.

    ``factory`` is ``"package.module:function"`` (importable here and on the
    workers) or ``"path/to/file.py:function"`` (relative to ``base``, default
    the current folder); the function takes no arguments and returns a
    ``torch.nn.Module``. ``weights`` (a ``.pt``/``.pth`` file of
    ``torch.save(model.state_dict(), path)``) is resolved against ``base`` too.
    Checked here without importing torch: the spelling, the files, that torch is
    installed. ``config``: the config file read (mistakes become ConfigErrors).
    """
    cfg = None if config is None else Path(config)

    def err(message: str):
        return _source_error(cfg, message)

    root = Path.cwd() if base is None else Path(base)
    text = str(factory).strip()
    target, _, fn = text.rpartition(":")
    if not target or _IDENTIFIER.fullmatch(fn) is None:
        raise err(f"{factory!r} is not a torch model factory: expected 'package.module:function' or "
                  "'path/to/file.py:function', the function taking no arguments and returning the "
                  "torch.nn.Module (e.g. 'mynet.py:make_model').")
    if target.endswith(".py") or "/" in target or os.sep in target:
        file = (root / Path(target).expanduser()).resolve()
        if not file.is_file():
            raise err(f"the factory file {file} (of {factory!r}) does not exist. Give the "
                      "path of the .py file defining the function"
                      + (", relative to the config's folder." if cfg is not None else "."))
        if file.suffix != ".py":
            raise err(f"the factory file {file} is not a .py file; expected 'file.py:function'.")
        spec = f"{file}:{fn}"
    elif _DOTTED.fullmatch(target):
        spec = f"{target}:{fn}"
    else:
        raise err(f"{factory!r}: {target!r} is neither a module name ('package.module') nor "
                  "a .py file; expected 'package.module:function' or 'path/to/file.py:function'.")
    w = None
    if weights is not None:
        w = (root / Path(weights).expanduser()).resolve()
        if not w.is_file():
            raise err(f"the weights file {w} does not exist. Give the state_dict file saved with "
                      "torch.save(model.state_dict(), 'model.pt'), or leave weights out to use the "
                      "model as the factory makes it.")
        if w.suffix not in TORCH_WEIGHTS:
            raise err(f"the weights file {w} is not a .pt or .pth file; save the model's state_dict "
                      "with torch.save(model.state_dict(), 'model.pt').")
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        raise err(f"{factory!r} is a PyTorch model factory, and PyTorch is not installed: "
                  f"{TORCH_INSTALL}")
    return ModelSource(factory=spec, weights=w, config=cfg)


def model_source(
    model, weights: str | os.PathLike | None = None
) -> ModelSource:
    """Resolve ``model`` to a :class:`ModelSource`.

    ``model`` is a ``torch.nn.Module`` object, a :class:`ModelSource`, or a
    string: an existing path is a Keras model file or SavedModel folder;
    ``"package.module:function"`` or ``"file.py:function"`` is a torch factory
    (with ``weights`` its ``state_dict`` file, see :func:`torch_source`);
    anything else must be a ``keras.applications`` name such as ``"VGG16"``.
    """
    if isinstance(model, ModelSource):
        return model
    if is_torch_module(model):
        if weights is not None:
            raise ModelError("weights= is not taken with a torch module object: load them into it "
                             "(module.load_state_dict(torch.load(path))) or give a factory "
                             "'file.py:function' with weights=.")
        return ModelSource(module=model)
    if not isinstance(model, str | os.PathLike):
        raise ModelError(f"model must be a model path, a keras.applications name, a torch factory "
                         f"'file.py:function' or a torch.nn.Module; got a {type(model).__name__}.")
    if isinstance(model, str) and not Path(model).expanduser().exists() and _looks_like_factory(model):
        return torch_source(model, weights)
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
        if p.is_file() and p.suffix == ".py":
            raise ModelError(
                f"{p} is a Python file, not a model: give a torch model as '{p}:function', the "
                "function of that file that builds the module, with weights= its state_dict file."
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


def check_layer_names(wanted, names: list[str], model: str, what: str = "") -> list[str]:
    """``wanted`` as a list, after checking each is one of the model's layer ``names``.

    Raises
    ------
    LayerNotFoundError
        Naming the unknown layers and listing the model's (``what`` says how they are named).
    """
    from ...errors import LayerNotFoundError

    wanted = list(wanted or [])
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise LayerNotFoundError(f"no layer named {', '.join(map(repr, unknown))} in {model}. Its layers"
                                 f"{what} are: {', '.join(names)}.")
    return wanted
