"""glibc's allocator, tuned for training steps that free and reallocate the same large tensors every step.

By default glibc hands tensors above a moving threshold (at most 32 MB) to fresh `mmap`s and gives freed memory at
the top of its heap back to the kernel (above 128 KB, raised as large blocks are freed). A training step allocates
its activations and gradients anew after the last step freed them, so whenever the heap was trimmed or a tensor
was mapped afresh, every page of it faults in again: on the climate U-Net, 10,000 page faults per forward pass and
a forward 15 % slower in some runs and not in others, depending on what else the process had allocated (Lightning's
own objects are enough). `keep_freed_memory(mb)` fixes both thresholds at `mb`: freed memory up to that size stays
in the heap for the next step, and only larger tensors are mapped (and returned) each time. It is called once per
process when a run starts (`sciml.run.run`), from the top-level config key `malloc_keep_mb` (null: glibc's
defaults); DataLoader workers inherit it. Other C libraries (musl, macOS) are left alone.

Memory: freed memory is kept for reuse rather than returned to the system, until the process ends; what a process
holds stays near its own peak (the streamed climate run under a 1.25 GiB cap: 0.83-0.87 GiB against 0.80-0.84 GiB
with glibc's defaults, docs/performance.md).
"""
from __future__ import annotations

import ctypes
import logging
import platform

from sciml.errors import SciMLError

log = logging.getLogger(__name__)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def keep_freed_memory(mb) -> bool:
    """Set glibc's trim and mmap thresholds to `mb` megabytes (None: leave glibc's defaults); True when set."""
    if mb is None:
        log.info("malloc: glibc's defaults (malloc_keep_mb=null)")
        return False
    if isinstance(mb, bool) or not isinstance(mb, int) or mb <= 0:
        raise SciMLError(f"malloc_keep_mb: '{mb}' is not a positive number of megabytes or null")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    size = mb * 2**20
    done = bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, size))
    log.info("malloc: freed memory up to %d MB kept for reuse%s", mb, "" if done else " (refused by glibc)")
    return done
