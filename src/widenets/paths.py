"""The switch between the fast paths of the kernel rules and the straightforward ones.

The analytic kernels have fast paths: activation maps fused into a few in-place passes
that share their intermediate results (one ``arccos`` for both the NNGP and the NTK
map), correlations snapped only when some entry is near +-1, convolution and pooling
windows summed over slices instead of padded copies. Each has a straightforward
counterpart, written for clarity, which the tests compare it with (to 1e-10 relative
in float64). The fast paths are on by default; :func:`straightforward` turns them off
within a ``with`` block of the current thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state = threading.local()


def fast_paths_enabled() -> bool:
    """Whether the kernel rules take their fast paths (the default)."""
    return getattr(_state, "fast", True)


@contextmanager
def straightforward() -> Iterator[None]:
    """Compute kernels by the straightforward paths within this block (for tests)."""
    previous = fast_paths_enabled()
    _state.fast = False
    try:
        yield
    finally:
        _state.fast = previous
