"""Helpers the benchmark scripts share (they import it as a sibling module)."""

from __future__ import annotations

import os
from pathlib import Path


def evict(path: Path) -> None:
    """Flush the files under ``path`` to disk and drop them (only them) from the page cache."""
    for dirpath, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
