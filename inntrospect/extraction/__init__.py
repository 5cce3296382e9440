"""Extraction: corpus, models, the block writer, local and cluster drivers, legacy import."""
