"""Handing freed tensor memory back to the system when training on a CPU (glibc's malloc).

glibc serves a large allocation with its own ``mmap``, returned to the system on ``free``,
only while it is above the *mmap threshold*; and each such free raises the threshold to the
freed size (up to 32 MiB). After the first training step nearly every activation and gradient
of a small model is below the raised threshold, so they come from the heap, whose freed holes
are reused only by allocations that fit them and are seldom returned. The resident size then
grows well past what is live: on SmolLM2-135M, LoRA, 4 x 512 tokens, 3.1 GB resident where
2.4 GB suffice. A fixed threshold keeps every allocation of 1 MiB or more on its own mapping.

The price is a page fault for every page of every such allocation, as each comes fresh from the
kernel: one epoch of 120 chats (``bench/sft_vs_trl.py``'s run) took 3.5x the page faults and
15% more time (25% with ``--packing``, whose rows are all full), and peaked at 3.8 GB resident
instead of 4.7 GB (a 4 MiB threshold: 4.6 GB). Training sets it unless ``--no-release-memory``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

#: ``mallopt`` parameter number of the mmap threshold (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
#: allocations of this many bytes or more get their own mapping (an activation of 512 tokens x 576 is 1.2 MB in bf16)
MMAP_THRESHOLD_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def return_large_blocks_to_the_system() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES`; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
