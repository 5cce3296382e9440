"""All layers as one array: the store's ``layer`` dimension view.

The store keeps one node per layer, because layers differ in shape. To select
or cluster across the whole network, :func:`stack` flattens each layer's
spatial and unit dims into one ``neuron`` dim and concatenates the layers
along it, lazily. ``neuron`` is indexed by ``layer``, the spatial position
(``z``, ``y``, ``x``, ``t`` as the layers have them; -1 where a layer has no
such axis) and ``unit``, so ``stacked.sel(layer="conv2d_24")`` or
``stacked.sel(unit=3)`` work as on any xarray MultiIndex.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import ParameterError

__all__ = ["stack"]

#: preferred variable of a node, when a node (Dataset) is given
_VARS = ("nap", "aligned", "acts")


def _pick(node, var: str | None):
    import xarray as xr

    if isinstance(node, xr.DataTree):
        node = node.to_dataset()
    if isinstance(node, xr.DataArray):
        return node
    if var is not None:
        return node[var]
    for name in _VARS:
        if name in node.data_vars:
            return node[name]
    raise ParameterError(f"expected a variable {' or '.join(map(repr, _VARS))} to stack; the node "
                         f"holds {list(node.data_vars)}. Pass var= naming one of them.")


def stack(nodes, var: str | None = None):
    """One lazy DataArray ``(leading dim, neuron)`` of every layer in ``nodes``.

    Parameters
    ----------
    nodes
        ``{layer: DataArray or Dataset}`` (what :func:`inntrospect.naps`,
        :func:`inntrospect.contrastive_naps` or :func:`inntrospect.align`
        return), or a DataTree whose children are layers (``tree["layers"]``,
        ``tree["naps"]``).
    var
        The variable to take from each Dataset (default: ``nap``, then
        ``aligned``, then ``acts``).

    All layers must share their first dim (``sample`` or ``group``) and its
    labels. Nothing is computed.

    Examples
    --------
    >>> net = inntrospect.stack(inntrospect.naps("run.zarr"))     # doctest: +SKIP
    >>> net.sel(layer="conv2d_24", y=6, x=6)                      # doctest: +SKIP
    """
    import pandas as pd
    import xarray as xr

    if isinstance(nodes, xr.DataTree):
        nodes = {name: child for name, child in nodes.children.items()}
    if not isinstance(nodes, Mapping) or not nodes:
        what = type(nodes).__name__ if not isinstance(nodes, Mapping) else "an empty mapping"
        raise ParameterError(f"stack() needs a non-empty {{layer: array}} mapping or a tree of "
                             f"layers; got {what}. Pass e.g. inntrospect.naps(store) or "
                             f"tree['layers'].")
    arrays = {name: _pick(node, var) for name, node in nodes.items()}
    first = next(iter(arrays.values()))
    lead = first.dims[0]
    positional = []
    for arr in arrays.values():
        positional += [d for d in arr.dims[1:-1] if d not in positional]
    levels = {"layer": [], **{d: [] for d in positional}, "unit": []}
    parts = []
    for name, arr in arrays.items():
        if arr.dims[0] != lead or arr.shape[0] != first.shape[0]:
            raise ParameterError(
                f"expected every layer to share the first layer's leading dim {lead} of "
                f"{first.shape[0]}; layer {name!r} has {arr.dims[0]} of {arr.shape[0]}. Stack "
                f"results of one step and one store (all NAPs, or all activations)."
            )
        feature = arr.shape[1:]
        n = int(np.prod(feature, dtype=np.int64))
        index = np.indices(feature).reshape(len(feature), n) if feature else np.zeros((0, 1), int)
        levels["layer"].append(np.full(n, name, dtype=object))
        for d in positional:
            where = arr.dims[1:].index(d) if d in arr.dims[1:-1] else None
            levels[d].append(index[where] if where is not None else np.full(n, -1))
        levels["unit"].append(index[-1] if feature else np.zeros(1, int))
        parts.append(arr.data.reshape(arr.shape[0], n))
    data = _concat(parts)
    mi = pd.MultiIndex.from_arrays([np.concatenate(v) for v in levels.values()], names=list(levels))
    coords = xr.Coordinates.from_pandas_multiindex(mi, "neuron")
    coords = coords.assign({k: v for k, v in first.coords.items() if v.dims == (lead,)})
    return xr.DataArray(data, dims=(lead, "neuron"), coords=coords, name=first.name)


def _concat(parts):
    if any(hasattr(p, "dask") for p in parts):
        import dask.array as da

        return da.concatenate([da.asarray(p) for p in parts], axis=1)
    return np.concatenate(parts, axis=1)
