"""Model back-ends. Only :mod:`inntrospect.extraction.models.keras` imports TensorFlow."""

from .source import ModelSource, model_source

__all__ = ["ModelSource", "model_source"]
