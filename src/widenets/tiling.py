"""The one tile planner: how a kernel matrix ``N1 x N2`` is split into tiles of
``rows x cols`` examples (the last ones smaller), used by ``net.kernel`` (tiles sized to
stay in cache) and by :func:`widenets.kernel_matrix` (tiles sized from a memory budget,
kept in a store). With a symmetric matrix (``x2=None``) only the tiles on and above the
diagonal are planned; the others are their transposes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tile:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of the kernel matrix."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def key(self) -> str:
        return f"{self.r0}-{self.c0}"

    @property
    def is_diagonal(self) -> bool:
        return self.r0 == self.c0

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r1)

    @property
    def cols(self) -> slice:
        return slice(self.c0, self.c1)


def balanced_side(count: int, most: int) -> int:
    """The tile side for ``count`` examples with tiles of at most ``most``: as many tiles
    as ``most`` needs, all of (nearly) the same size. For 64 examples and at most 45, two
    tiles of 32 rather than 45 and 19: a symmetric matrix then computes 3 tiles of 32 x 32
    pairs (3072) instead of 45 x 45 + 45 x 19 + 19 x 19 (3241), and no tile is small
    enough for per-operation overhead to dominate."""
    if count <= 0:
        return max(1, most)
    tiles = -(-count // max(1, most))
    return -(-count // tiles)


def plan_tiles(n1: int, n2: int, rows: int, cols: int, symmetric: bool) -> list[Tile]:
    """The tiles to compute, row by row (only on and above the diagonal if symmetric)."""
    return [
        Tile(r0, min(r0 + rows, n1), c0, min(c0 + cols, n2))
        for r0 in range(0, n1, rows)
        for c0 in range(0, n2, cols)
        if not symmetric or c0 >= r0
    ]
