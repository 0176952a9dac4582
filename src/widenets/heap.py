"""Keep the kernel rules' freed temporaries in the process heap (glibc only).

A tile of a kernel computation allocates a few temporaries of about 2 MiB per layer and
frees them a moment later. With glibc's default settings the freed memory at the top
of the heap goes back to the system (trimming) and the next tile's temporaries fault
their pages in again: measured on the fully connected benchmark, about 90 000 page
faults per call, a third of its time. :func:`keep_freed_temporaries` sets, once per
process, the state glibc's own dynamic rule reaches after a 32 MiB block has been
freed: blocks below 32 MiB come from the heap (``M_MMAP_THRESHOLD``) and up to 64 MiB
of free memory stays there (``M_TRIM_THRESHOLD``), with ``mallopt`` (glibc manual,
"Malloc Tunable Parameters"). The only cost is that up to 64 MiB of freed memory stays
mapped by the process.

Nothing is changed on other C libraries, or when the environment variable
``WIDENETS_TUNE_MALLOC`` is ``0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20

_done = False


def keep_freed_temporaries() -> None:
    """Raise glibc's mmap and trim thresholds once per process (see the module docstring)."""
    global _done
    if _done:
        return
    _done = True
    if not sys.platform.startswith("linux") or os.environ.get("WIDENETS_TUNE_MALLOC") == "0":
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError unless glibc)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass
