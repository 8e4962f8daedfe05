"""Handing freed heap memory back to the operating system.

glibc keeps freed allocations in the process heap for reuse. After conversions that allocate and
free many large temporaries (dequantizing, packing, fusing weights) that memory stays in the
process's RSS although nothing uses it; `malloc_trim` returns it.
"""

from __future__ import annotations

import ctypes


def release_free_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them after big conversions, e.g. GGUF dequant)."""
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    trim(0)
