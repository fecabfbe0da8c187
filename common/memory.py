"""Give freed heap memory back to the operating system after a large request.

glibc keeps freed memory in per-thread arenas for reuse; after a large request
decoded in a worker thread, that memory stays taken (a 58 MB request once held
6.5 GB for 25 minutes). ``malloc_trim(0)`` returns the free pages of every
arena. On a C library without it (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

TRIM_AFTER_BYTES = 8 << 20  # requests at least this large give their memory back after


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        logger.debug("no malloc_trim in this C library: freed memory stays with the process")
        return None
    return trim


def release_free_memory() -> None:
    """Return free heap pages to the OS (blocking: call it off the event loop)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
