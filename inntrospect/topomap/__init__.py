"""Topographic activation maps (``REFERENCE.md`` §6–9): layouts, circle distribution, images, quality.

Pure numpy/numba kernels live in their own modules; the store-level wrappers
come on top of them.
"""
