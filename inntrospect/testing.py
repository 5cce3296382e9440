"""Stores made from arrays, without a model: for tests and benchmarks.

:func:`store_from_arrays` writes a complete store in format version 1 from
per-layer arrays (numpy, memory-mapped or lazy dask arrays), one chunk at a
time, so stores larger than memory can be built from generated data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import store as st
from .errors import ParameterError

__all__ = ["store_from_arrays"]


def store_from_arrays(
    path,
    acts: Mapping[str, object],
    groups,
    grads: Mapping[str, object] | None = None,
    chunks: int | Mapping[str, int] = 64,
    codec: dict | None = None,
) -> Path:
    """Write a complete store holding ``acts`` (and ``grads``) per layer.

    Parameters
    ----------
    acts
        ``{layer: array (sample, *spatial, unit)}``, in layer order.
    groups
        One group label per sample.
    grads
        ``{layer: array}`` of the same shapes, for the layers that have them.
    chunks
        Chunk length along ``sample`` (one for all layers, or per layer).
    codec
        ``{"name": "zstd", "level": 1}``, or None to store raw: for every
        array; or per variable, ``{"acts": {"name": "zstd", "level": 1},
        "grads": None}``; or per layer and variable, ``{layer: {"acts": ...,
        "grads": ...}}`` (arrays left out are stored raw).
    """
    path = Path(path)
    grads = dict(grads or {})
    groups = np.asarray(groups).astype(str)
    n = len(groups)
    layers = [st.LayerSpec(k, tuple(v.shape[1:]), k in grads) for k, v in acts.items()]
    for k, v in [*acts.items(), *grads.items()]:
        if v.shape[0] != n:
            raise ParameterError(f"{k} has {v.shape[0]} samples, groups has {n}: give one group label "
                                 "per sample.")
    per = {k: chunks for k in acts} if isinstance(chunks, int) else dict(chunks)
    block = max(per.values())
    plan = st.ChunkPlan(per, block, 0.0)
    attrs = st.new_extraction(st.root_attrs(
        model={"framework": "arrays", "path": None, "sha256": None},
        corpus={"path": None, "n_samples": n, "n_files": 0}, layers=layers, plan=plan, n_samples=n,
        gradient_target=None,
        codecs={k: {var: _codec_of(codec, k, var) for var in ("acts", "grads")
                    if var == "acts" or k in grads} for k in acts}))
    table = {"group": groups, "file": np.full(n, ""), "index_in_file": np.arange(n),
             "target": np.full(n, -1)}
    st.remove_store(path)
    st.create_store(path, attrs, layers, plan, table)
    for source, var in ((acts, "acts"), (grads, "grads")):
        for name, arr in source.items():
            out = st.open_array(path, name, var, write=True)
            step = per[name]
            for lo in range(0, n, step):
                out[lo : lo + step] = np.asarray(arr[lo : lo + step], dtype=np.float32)
    st.blocks_done(path, write=True)[:] = 1
    st.finish_extraction(path)
    return path


def _codec_of(codec, layer: str, var: str) -> dict | None:
    """The codec record of one array from ``codec`` as :func:`store_from_arrays` takes it."""
    if codec is None or "name" in codec:  # one record (or none) for every array
        return None if codec is None else dict(codec)
    per_var = set(codec) <= {"acts", "grads"} and all(v is None or "name" in v for v in codec.values())
    rec = codec.get(var) if per_var else (codec.get(layer) or {}).get(var)
    return None if rec is None else dict(rec)
