"""What a repro process sets up for itself before it works: memory that stays with the process once freed."""

from __future__ import annotations

import ctypes
import functools

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: the largest threshold glibc accepts (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit)
MMAP_THRESHOLD_BYTES = 32 * 2**20
TRIM_THRESHOLD_BYTES = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve buffers up to 32 MiB from its heap and keep freed memory for reuse instead of
    returning it to the system at once. Batched corruptions and training steps on the CPU allocate and free
    full-batch buffers of a few MiB all the time; by default each comes from fresh pages whose page faults cost
    more than the arithmetic (defocus blur on 16 images of 224 px: 1.55 ms per image, 0.69 with this). Only the
    allocator's bookkeeping changes, never a number. False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own symbols, libc's among them: no library search
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def malloc_setting(keep: bool = True) -> str:
    """For a benchmark's header: keep freed memory as every repro command does (unless ``keep`` is False), and
    say what this process's malloc does."""
    return "malloc keeping freed memory" if keep and keep_freed_memory() else "default malloc"
