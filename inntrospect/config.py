"""TOML configuration: sections, keys, and paths relative to the config file.

::

    [model]   path = "model.keras" | name = "VGG16", weights = "vgg16.h5", layers = ["conv2d"]
              | torch = "package.module:make_model" | "net.py:make_model", weights = "model.pt"
    [corpus]  path = "corpus/corpus.csv" | ["jan/corpus.csv", "feb/corpus.csv"] (read in order as one),
              allow_duplicates = false, allow_outside = false
    [store]   path = "run.zarr" | "s3://bucket/run.zarr", chunk_mib = 32 (above 0, at most 4096),
              storage_options = {endpoint_url = "http://…", key = "…", secret = "…"} (fsspec's)
    [extract] gradient_target = "predicted" | "target", batch_size = 128, verify_corpus = false
    [naps]    aligned = false, std = false
    [exemplars] k = 16 (top and bottom samples per unit and group; 0: none)
    [contrast] groups = ["cat", "dog"] (default: all), weight_by_group_size = false,
               significance = true (Welch's t, p, q, effect per unit; makes [naps] std true)
    [topomap] method = "umap", metric = "euclidean", distribute_in_circle = true, seed = 0,
              resolution = 100, from = "contrast" | "naps", compare = ["umap", "pca", …],
              fade_q = 0.05 (absent: off; units not significant at q < fade_q drawn as 0)
    [projection] samples_per_group = 100, sampling = "random" | "first", seed = 0
    [plot]    mode = "row" | "individual", format = "png" | "pdf" | "svg", output = "figures"
    [cluster] address = "tcp://host:8786" (default: an in-process cluster), n_workers,
              threads_per_worker, memory_limit = "4GiB", dashboard_address = ":8787"

Unknown sections and keys are errors (a typo should not be ignored silently), and so are
numbers that are not finite (``inf``, ``nan``) or out of range.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["Config", "load_config", "SCHEMA"]

#: section -> key -> accepted types
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "model": {"path": (str,), "name": (str,), "torch": (str,), "weights": (str,), "layers": (list,)},
    "corpus": {"path": (str, list), "allow_duplicates": (bool,), "allow_outside": (bool,)},
    "store": {"path": (str,), "chunk_mib": (int, float), "storage_options": (dict,)},
    "extract": {"gradient_target": (str,), "batch_size": (int,), "verify_corpus": (bool,)},
    "naps": {"aligned": (bool,), "std": (bool,)},
    "exemplars": {"k": (int,)},
    "contrast": {"groups": (list,), "weight_by_group_size": (bool,), "significance": (bool,)},
    "topomap": {"method": (str,), "metric": (str,), "distribute_in_circle": (bool,), "seed": (int,),
                "resolution": (int,), "from": (str,), "compare": (list,), "fade_q": (int, float)},
    "projection": {"samples_per_group": (int,), "sampling": (str,), "seed": (int,)},
    "plot": {"mode": (str,), "format": (str,), "output": (str,)},
    "cluster": {"address": (str,), "n_workers": (int,), "threads_per_worker": (int,),
                "memory_limit": (str, int), "dashboard_address": (str,)},
}
#: allowed values of the keys that name a choice
CHOICES = {
    ("topomap", "method"): ("umap", "tsne", "pca", "som", "graph", "random"),
    ("topomap", "metric"): ("euclidean", "cosine"),
    ("topomap", "from"): ("contrast", "naps"),
    ("projection", "sampling"): ("random", "first"),
    ("plot", "mode"): ("row", "individual"),
    ("plot", "format"): ("png", "pdf", "svg"),
}
#: smallest value of the numeric keys that have one (numpy takes seeds >= 0; a cluster of
#: no workers would wait for ever)
MINIMUM = {("exemplars", "k"): 0, ("topomap", "seed"): 0, ("projection", "seed"): 0, ("extract", "batch_size"): 1,
           ("topomap", "resolution"): 2, ("projection", "samples_per_group"): 1,
           ("cluster", "n_workers"): 1, ("cluster", "threads_per_worker"): 1}
#: numeric keys that must lie strictly above their first and at most at their second bound
#: (a chunk is read and written whole by every step: beyond 4 GiB is no chunk size)
BOUNDS = {("store", "chunk_mib"): (0, 4096), ("topomap", "fade_q"): (0, 1)}
#: keys whose value is a boolean (everywhere else a bool is refused: ``true`` is no number)
BOOLS = {("naps", "aligned"), ("naps", "std"), ("contrast", "weight_by_group_size"),
         ("contrast", "significance"),
         ("topomap", "distribute_in_circle"), ("corpus", "allow_duplicates"), ("corpus", "allow_outside"),
         ("extract", "verify_corpus")}
#: keys holding paths, resolved against the config file's folder
PATHS = {("model", "path"), ("model", "weights"), ("corpus", "path"), ("store", "path"),
         ("plot", "output")}


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


@dataclass(frozen=True)
class Config:
    """A validated configuration; :meth:`get` returns values with paths resolved."""

    path: Path
    data: dict[str, dict[str, Any]]

    def get(self, section: str, key: str, default: Any = None) -> Any:
        return self.data.get(section, {}).get(key, default)

    def require(self, section: str, key: str) -> Any:
        value = self.get(section, key)
        if value is None:
            raise ConfigError(f"{self.path}: [{section}] needs '{key}'.")
        return value

    def extract_kwargs(self, verify_corpus: bool = False) -> dict[str, Any]:
        """Arguments of :func:`inntrospect.extract` from ``[model] [corpus] [store] [extract]``.

        ``verify_corpus=True`` (``--verify-corpus``) hashes the batch files whatever the config says.
        """
        given = [k for k in ("path", "name", "torch") if self.get("model", k) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"{self.path}: [model] needs exactly one of 'path' (a model file or SavedModel "
                "folder), 'name' (a keras.applications model such as 'VGG16') or 'torch' (a PyTorch "
                "model factory 'package.module:make_model' or 'net.py:make_model', with weights = "
                f"'model.pt'); got {' and '.join(map(repr, given)) or 'none'}."
            )
        model, weights = self.get("model", given[0]), self.get("model", "weights")
        if given[0] == "torch":  # checked now (no torch import); the file path is relative to here
            from .extraction.models.source import torch_source

            model, weights = torch_source(model, weights, base=self.path.parent, config=self.path), None
        kwargs = {
            "model": model,
            "weights": weights,
            "layers": self.get("model", "layers", []),
            "corpus": self.require("corpus", "path"),
            "store": self.store_path(),
            "chunk_mib": self.get("store", "chunk_mib"),
            "gradient_target": self.get("extract", "gradient_target", "predicted"),
            "batch_size": self.get("extract", "batch_size", 128),
            "verify_corpus": bool(verify_corpus or self.get("extract", "verify_corpus", False)),
            "allow_duplicates": self.get("corpus", "allow_duplicates", False),
            "allow_outside": self.get("corpus", "allow_outside", False),
        }
        if not all(isinstance(x, str) for x in kwargs["layers"]):
            raise ConfigError(f"{self.path}: [model] layers must be a list of layer names.")
        return kwargs


    def naps_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`inntrospect.naps` from ``[naps]``."""
        # the contrast step's significance is computed from the NAP pass's moments: it needs std
        std = self.get("naps", "std", False) or self.contrast_kwargs()["significance"]
        return {"aligned": self.get("naps", "aligned", False), "std": std}

    def exemplars_k(self) -> int:
        """``k`` of :func:`inntrospect.exemplars` from ``[exemplars]`` (default 16; 0: the step is off)."""
        return self.get("exemplars", "k", 16)

    def contrast_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`inntrospect.contrastive_naps` from ``[contrast]``."""
        groups = self.get("contrast", "groups")
        if groups is not None and not all(isinstance(g, str | int) for g in groups):
            raise ConfigError(f"{self.path}: [contrast] groups must be a list of group names.")
        return {
            "groups": None if groups is None else [str(g) for g in groups],
            "weight_by_group_size": self.get("contrast", "weight_by_group_size", False),
            "significance": self.get("contrast", "significance", True),
        }

    def layout_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`inntrospect.topomap_layout` from ``[topomap]``."""
        return {
            "method": self.get("topomap", "method", "umap"),
            "metric": self.get("topomap", "metric", "euclidean"),
            "seed": self.get("topomap", "seed", 0),
            "distribute_in_circle": self.get("topomap", "distribute_in_circle", True),
            "source": self.get("topomap", "from", "contrast"),
        }

    def compare_methods(self) -> list[str]:
        """Layout methods that ``compare-layouts`` runs (``[topomap] compare``, default all)."""
        methods = self.get("topomap", "compare", list(CHOICES[("topomap", "method")]))
        bad = [m for m in methods if m not in CHOICES[("topomap", "method")]]
        if bad or not methods:
            raise ConfigError(f"{self.path}: [topomap] compare must list layout methods out of "
                              f"{', '.join(CHOICES[('topomap', 'method')])}; got {methods!r}.")
        return list(methods)

    def resolution(self) -> int:
        res = self.get("topomap", "resolution", 100)
        if res < 2:
            raise ConfigError(f"{self.path}: [topomap] resolution must be at least 2 pixels; got {res}.")
        return res

    def fade_q(self) -> float | None:
        """``[topomap] fade_q``: the q at which topomaps fade units (None: absent, no fading)."""
        q = self.get("topomap", "fade_q")
        if q is not None and not 0 < q < 1:
            raise ConfigError(f"{self.path}: [topomap] fade_q must be a q-value above 0 and below 1 "
                              f"(e.g. 0.05); got {q!r}. Leave it out for no fading.")
        return None if q is None else float(q)

    def projection_kwargs(self) -> dict[str, Any]:
        """Arguments of :func:`inntrospect.instance_projection` from ``[projection]``."""
        n = self.get("projection", "samples_per_group", 100)
        if n < 1:
            raise ConfigError(f"{self.path}: [projection] samples_per_group must be at least 1; got {n}.")
        return {"samples_per_group": n, "sampling": self.get("projection", "sampling", "random"),
                "seed": self.get("projection", "seed", 0), "pca_components": 50, "method": "umap"}

    def plot_output(self) -> Path:
        """Folder for plots, the report and the layout comparison (default: ``figures`` beside the config)."""
        out = self.get("plot", "output")
        return Path(out) if out is not None else self.path.parent / "figures"

    def store_path(self):
        """The store's :class:`~inntrospect.store.backends.Location`: a folder or an fsspec URL, with
        ``[store] storage_options``."""
        from .store.backends import location

        return location(self.require("store", "path"), self.get("store", "storage_options"))


#: the reference toolbox's JSON config keys, and where each goes
LEGACY_KEYS = {
    "model_path": ("model", "path"),
    "model_name": ("model", "name"),
    "layer_names_of_interest": ("model", "layers"),
    "data_path": ("corpus", "path"),
    "processed_corpus_path": ("store", "path"),
    "use_aligned_naps": ("naps", "aligned"),
}


def legacy_sections(raw: dict, p: Path) -> dict[str, dict[str, Any]]:
    """Sections of a reference-toolbox JSON config (its keys as they are, see :data:`LEGACY_KEYS`).

    ``data_path`` is the folder holding ``corpus.csv`` (the same
    ``file,group[,target]`` rows); the store goes beside
    ``processed_corpus_path`` as ``<processed_corpus_path>.zarr`` and the
    figures into ``<processed_corpus_path>_figures``, so a legacy output
    folder there is left alone. Unknown keys are errors.
    """
    unknown = [k for k in raw if k not in LEGACY_KEYS]
    if unknown:
        raise ConfigError(
            f"{p}: unknown key(s) {', '.join(map(repr, unknown))} in a reference-toolbox JSON config; "
            f"known keys: {', '.join(LEGACY_KEYS)}. Use a TOML config for everything else."
        )
    sections: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        section, name = LEGACY_KEYS[key]
        if key == "data_path" and isinstance(value, str):
            value = str(Path(value) / "corpus.csv")
        if key == "processed_corpus_path" and isinstance(value, str):
            base = str(value).rstrip("/\\")
            value = base + ".zarr"
            sections.setdefault("plot", {})["output"] = base + "_figures"
        sections.setdefault(section, {})[name] = value
    return sections


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a config file: TOML, or the reference toolbox's JSON.

    Relative paths in a TOML config resolve against its folder; in a JSON
    config against the current folder, as the reference toolbox's scripts did.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise ConfigError(f"expected a TOML config file; {p.absolute()} {what}. Check the path "
                          f"(inntrospect demo writes an example config.toml).")
    base = p.parent
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"expected config file {p} to be readable UTF-8 text; reading it failed "
                          f"({err}). Check the path and its permissions, and save it as UTF-8.") from None
    if p.suffix.lower() == ".json":
        import json

        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{p} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: a JSON config is one object of keys {', '.join(LEGACY_KEYS)}.")
        raw, base = legacy_sections(raw, p), Path.cwd()
    else:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p} is not valid TOML: {err}") from err
    data: dict[str, dict[str, Any]] = {}
    for section, table in raw.items():
        if section not in SCHEMA:
            raise ConfigError(
                f"{p}: unknown section [{section}]; known sections: "
                f"{', '.join(SCHEMA)}.{_suggest(section, SCHEMA)}"
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{p}: '{section}' must be a [section] table.")
        data[section] = {}
        for key, value in table.items():
            if key not in SCHEMA[section]:
                raise ConfigError(
                    f"{p}: unknown key '{key}' in [{section}]; known keys: "
                    f"{', '.join(SCHEMA[section])}.{_suggest(key, SCHEMA[section])}"
                )
            types = SCHEMA[section][key]
            if not isinstance(value, types) or (isinstance(value, bool) and (section, key) not in BOOLS):
                want = " or ".join(t.__name__ for t in types)
                raise ConfigError(f"{p}: [{section}] {key} must be {want}, got {value!r}.")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{p}: [{section}] {key} must be a finite number; got {value!r}. "
                                  "Give a number, or leave the key out for its default.")
            bounds = BOUNDS.get((section, key))
            if bounds is not None and not bounds[0] < value <= bounds[1]:
                raise ConfigError(f"{p}: [{section}] {key} must be above {bounds[0]} and at most "
                                  f"{bounds[1]}; got {value!r}. Give a number in that range, or leave "
                                  "the key out for its default.")
            least = MINIMUM.get((section, key))
            if least is not None and value < least:
                raise ConfigError(f"{p}: [{section}] {key} must be at least {least}; got {value!r}.")
            choices = CHOICES.get((section, key))
            if choices is not None and value not in choices:
                raise ConfigError(f"{p}: [{section}] {key} must be one of "
                                  f"{', '.join(map(repr, choices))}; got {value!r}.{_suggest(value, choices)}")
            if (section, key) == ("store", "path") and value.startswith("file://"):
                value = value[len("file://"):]
            if isinstance(value, list) and (section, key) in PATHS:  # [corpus] path: a list of csv files
                if not value or not all(isinstance(v, str) and v for v in value):
                    raise ConfigError(f"{p}: [{section}] {key} must be a path or a non-empty list of paths, "
                                      f"e.g. [\"jan/corpus.csv\", \"feb/corpus.csv\"]; got {value!r}.")
                value = [str((base / Path(v).expanduser()).resolve()) for v in value]
            elif (section, key) in PATHS and not (section == "store" and "://" in value):  # URLs stay
                value = str((base / Path(value).expanduser()).resolve())
            data[section][key] = value
    return Config(p.resolve(), data)
