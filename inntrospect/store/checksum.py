"""The crc32c checksum that Zarr's ``crc32c`` codec stores after each encoded chunk.

:func:`crc32c_extend` calls the C library google_crc32c wraps without the GIL,
so several threads checksum at once; :func:`crc32c` is google_crc32c's own
(which holds the GIL), the fallback.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["crc32c", "crc32c_extend", "checksum"]


def checksum(data: np.ndarray, crc: int = 0) -> int:
    """The crc32c of the bytes of ``data`` (a contiguous uint8 array), ``crc`` extended over them if
    given (a checksum computed piece by piece), without the GIL when it can."""
    extend = crc32c_extend()
    return int(extend(crc, data.ctypes.data, data.nbytes)) if extend else int(crc32c(crc, data))


def crc32c(crc: int, data: np.ndarray) -> int:
    """``crc`` extended over the bytes of ``data`` (a contiguous uint8 array), through google_crc32c."""
    import google_crc32c

    return google_crc32c.extend(crc, data)


@functools.cache
def crc32c_extend():
    """``crc32c_extend(crc, address, nbytes)`` of the crc32c library google_crc32c wraps, called
    through ctypes, or None (then google_crc32c's own, slower here).

    google_crc32c holds the GIL while it checksums anything but large ``bytes``,
    so dask's threads would checksum one at a time; a ctypes call releases the
    GIL, and both cores checksum at once (the NAP pass reads on every thread).
    """
    import ctypes

    try:
        from google_crc32c import _crc32c

        fn = ctypes.CDLL(_crc32c.__file__).crc32c_extend  # found among the module's libraries
        fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        probe = np.frombuffer(b"123456789", np.uint8)
        if fn(0, probe.ctypes.data, 9) != 0xE3069283:  # the crc32c check value (RFC 3720)
            return None
    except (ImportError, OSError, AttributeError):
        return None
    return fn
