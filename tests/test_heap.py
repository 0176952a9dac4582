"""The glibc heap tuning (widenets.heap): the allocator's decisions, not page-fault counts.

Page faults depend on the machine's load (threads, arenas) and are measured by
``benchmarks/bench_heap.py``. What the tuning promises holds on any machine: after it, a
block of a few MiB is served from the heap rather than mapped on its own, and once freed
it stays in the heap for the next one. glibc reports both in ``mallinfo2()``:
``hblkhd`` (bytes in separately mapped blocks) and ``fordblks`` (free bytes kept in the
heap). Each case runs in a fresh process because the tuning is process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

BLOCK = 8 << 20  # below the tuned 32 MiB mmap threshold, far above glibc's 128 KiB default

SCRIPT = textwrap.dedent(f"""
    import ctypes, ctypes.util, json
    from widenets.heap import keep_freed_temporaries

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    keep_freed_temporaries()
    before = libc.mallinfo2()
    block = libc.malloc({BLOCK})
    ctypes.memset(block, 1, {BLOCK})
    allocated = libc.mallinfo2()
    libc.free(block)
    freed = libc.mallinfo2()
    print(json.dumps({{"mapped": allocated.hblkhd - before.hblkhd,
                      "kept_free": freed.fordblks}}))
""")


def allocator_decisions(tune: bool) -> dict[str, int]:
    env = dict(os.environ, WIDENETS_TUNE_MALLOC="1" if tune else "0")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_tuned_heap_serves_and_keeps_temporaries():
    decisions = allocator_decisions(tune=True)
    assert decisions["mapped"] == 0  # served from the heap
    assert decisions["kept_free"] >= BLOCK  # and kept there after free (not trimmed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_glibc_defaults_map_the_same_block_on_its_own():
    """The control: without the tuning the same block is mapped separately (and so
    returned to the system when freed), which is what the tuning avoids."""
    decisions = allocator_decisions(tune=False)
    assert decisions["mapped"] >= BLOCK
