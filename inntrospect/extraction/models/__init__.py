"""Model back-ends. Only :mod:`inntrospect.extraction.models.keras` imports TensorFlow, and only
:mod:`inntrospect.extraction.models.torch` imports PyTorch; each is imported when its model is used."""

from collections.abc import Sequence

from .source import ModelSource, model_source, torch_source

__all__ = ["ModelSource", "model_source", "torch_source", "open_model"]


def open_model(source: ModelSource, layers: Sequence[str] | None = None):
    """The loaded model of ``source`` with its layers of interest: a ``KerasModel`` or a ``TorchModel``.

    Both offer the same interface: ``source``, ``framework``, ``layers``,
    ``input_shape``, ``n_outputs``, ``fix_shapes(sample_shape)``, ``identity()``
    and ``compute(x, targets=None, pad_to=None)``.
    """
    if source.kind == "torch":
        from .torch import TorchModel

        return TorchModel(source, layers)
    from .keras import KerasModel

    return KerasModel(source, layers)
