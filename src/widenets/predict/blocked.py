r"""Exact solves with training kernels larger than memory: a blocked Cholesky factorisation
kept in a store, tile by tile, and resumed after an interruption.

For ``K_r = K(X, X) + diag_reg I`` (``N x N``, float64) and tiles of side ``b``, the
factor ``L`` (``K_r = L L^T``) is computed block column by block column, left-looking
(Golub & Van Loan, *Matrix Computations*, 4th ed., algorithm 4.2.3 in blocks)::

    L_jj = chol(K_jj - sum_{k<j} L_jk L_jk^T)
    L_ij = (K_ij - sum_{k<j} L_ik L_jk^T) L_jj^{-T}          for i > j

Each tile of ``L`` is written once, to a ``TileStore`` (of ``widenets.store``) (its numbers,
then a marker with their checksum), so a run killed at any point resumes with the tiles
that are finished and recomputes none of them. The tiles of ``K`` are computed when they
are needed (each once per factorisation) instead of being stored: a training kernel is
cheaper to compute than to read back from disk, and the disk holds the factor instead.
One step holds two row panels of ``L`` (``b x N`` each) and a few tiles: about
``8 (2 N b + 4 b^2)`` bytes, which :func:`tile_side` fits into the memory limit.

Then ``K_r alpha = y`` by a forward and a backward substitution over the stored tiles,
and the relative residual ``||y - K_r alpha|| / ||y||`` (Frobenius, float64) from the
kernel's tiles once more; if it exceeds ``REFINE_ABOVE`` (1e-9), iterative refinement
(``alpha += K_r^{-1} r``) improves it. The substitutions and the solution are kept in the
store too (``.npy`` files with a JSON record of their checksums).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engine import progress_bar
from ..store import TileStore, checksum
from ..tiles import on_workers
from ..tiling import Tile
from .common import cholesky

Tensor = torch.Tensor

#: The smallest tile side of the factorisation (below it the per-tile overhead dominates).
MIN_TILE = 16
#: The largest tile side (larger tiles gain no speed, and resume in coarser steps).
MAX_TILE = 4096
#: Residuals above this are reduced by iterative refinement (at most
#: ``REFINEMENT_STEPS`` steps).
REFINE_ABOVE = 1e-9
REFINEMENT_STEPS = 3
#: Bytes per number (the factorisation is in float64).
ITEMSIZE = 8

#: ``"600MiB"``, ``"20GiB"``, ``"1.5 GB"``: a number and a unit of bytes.
_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}

#: A function giving the tile ``K_r[r0:r1, c0:c1]`` of the regularised training kernel.
KernelTiles = Callable[[int, int, int, int], np.ndarray]


def memory_bytes(value: object, name: str = "memory_limit") -> int:
    """A memory size in bytes: a positive integer, or a string such as ``"600MiB"``,
    ``"20GiB"`` or ``"1.5GB"`` (KiB, MiB, GiB, TiB: powers of 1024; KB, MB, GB, TB:
    of 1000). ``TypeError``/``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"{name} must be a number of bytes or a string such as '20GiB', "
                        f"got {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = _MEMORY.match(value)
        if match is None:
            raise ValueError(f"{name} must be a number of bytes or a string such as '600MiB' "
                             f"or '20GiB', got {value!r}")
        count = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if count <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return count


def step_memory(n: int, side: int) -> int:
    """Bytes one step of the factorisation holds with tiles of ``side``: two row panels
    and four tiles (the kernel's, the diagonal factor's, the product, the result)."""
    side = min(side, n)
    return ITEMSIZE * (2 * n * side + 4 * side * side)


def tile_side(n: int, memory: int) -> int:
    """The largest tile side (at most ``MAX_TILE`` (4096), and a multiple of
    ``MIN_TILE`` (16)) whose step fits in ``memory`` bytes; ``ValueError`` saying the
    minimum when even ``MIN_TILE`` (16) does not."""
    smallest = min(MIN_TILE, n)
    if step_memory(n, smallest) > memory:
        raise ValueError(
            f"memory_limit of {memory} bytes is too small to factorise a training kernel of "
            f"{n} examples; the minimum is {step_memory(n, smallest)} bytes "
            f"({_shown(step_memory(n, smallest))})")
    # 8 (2 n b + 4 b^2) <= memory: the positive root of 4 b^2 + 2 n b - memory / 8
    root = (-2 * n + math.sqrt(4 * n * n + 16 * memory / ITEMSIZE)) / 8
    side = max(smallest, min(MAX_TILE, int(root) // MIN_TILE * MIN_TILE))
    return min(side, n)


def _shown(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


def _blocks(n: int, side: int) -> list[tuple[int, int]]:
    return [(start, min(start + side, n)) for start in range(0, n, side)]


class BlockedFactor:
    """The Cholesky factor of ``K_r`` in a tile store (created or resumed), and the solves
    with it. ``store`` is open (locked) until ``close()``."""

    def __init__(self, store: TileStore, name: str, n: int, side: int) -> None:
        self.store, self.name, self.n, self.side = store, name, n, side
        self.blocks = _blocks(n, side)

    def tile(self, i: int, j: int) -> Tile:
        (r0, r1), (c0, c1) = self.blocks[i], self.blocks[j]
        return Tile(r0, r1, c0, c1)

    def read(self, i: int, j: int) -> np.ndarray:
        return self.store.read(self.tile(i, j), (self.name,))[self.name]

    # ----------------------------------------------------------------- factorisation
    def factorise(self, kernel: KernelTiles, progress: bool | None,
                  client: object | None = None) -> None:
        """Compute the tiles not yet finished (resuming where a previous run stopped):
        here, or on the workers of a Dask ``client`` (each tile of a block column is a
        task that reads the finished tiles it needs from the store; this process writes
        them)."""
        finished = self.store.finished()
        count = len(self.blocks)
        todo = [(i, j) for j in range(count) for i in range(j, count)
                if self.tile(i, j).key not in finished]
        if not todo:
            return
        self.store.prepare_writes([])
        run = _local_tasks if client is None else _dask_tasks(client, kernel)
        path, name, blocks = str(self.store.path), self.name, self.blocks
        with progress_bar(len(todo), progress, f"factorising the {name.upper()} kernel",
                          "tile") as bar:
            for j in range(count):
                rows = [i for i, column in todo if column == j]
                if not rows:
                    continue
                if rows[0] == j:  # the diagonal tile first: the others divide by it
                    ((_, diagonal),) = run(kernel, [(path, name, blocks, j, j, None)])
                    self.store.write(self.tile(j, j), {name: diagonal})
                    bar.update(1)
                    rows = rows[1:]
                else:
                    diagonal = self.read(j, j)
                arguments = [(path, name, blocks, i, j, diagonal) for i in rows]
                for (_, _, _, i, _, _), value in run(kernel, arguments):
                    self.store.write(self.tile(i, j), {name: value})
                    bar.update(1)

    # ----------------------------------------------------------------- solves
    def forward(self, rhs: np.ndarray) -> np.ndarray:
        """``L^{-1} rhs`` (rhs ``(N, outputs)``)."""
        out = np.array(rhs, dtype=np.float64, copy=True)
        for i, (r0, r1) in enumerate(self.blocks):
            for k in range(i):
                k0, k1 = self.blocks[k]
                out[r0:r1] -= self.read(i, k) @ out[k0:k1]
            out[r0:r1] = _solve_lower(self.read(i, i), out[r0:r1])
        return out

    def backward(self, rhs: np.ndarray) -> np.ndarray:
        """``L^{-T} rhs``."""
        out = np.array(rhs, dtype=np.float64, copy=True)
        for i in reversed(range(len(self.blocks))):
            r0, r1 = self.blocks[i]
            for k in range(i + 1, len(self.blocks)):
                k0, k1 = self.blocks[k]
                out[r0:r1] -= self.read(k, i).T @ out[k0:k1]
            out[r0:r1] = _solve_lower(self.read(i, i), out[r0:r1], transpose=True)
        return out

    def solve(self, rhs: np.ndarray) -> np.ndarray:
        """``K_r^{-1} rhs``."""
        return self.backward(self.forward(rhs))

    def close(self) -> None:
        self.store.close()


#: The arguments of one tile of the factor to compute (after the kernel function), the
#: store's path, the kernel's name, the blocks, the tile's block row and column, and the
#: factor of its column's diagonal tile (``None`` for the diagonal tile itself).
FactorTask = tuple[str, str, list[tuple[int, int]], int, int, "np.ndarray | None"]


def factor_tile(kernel: KernelTiles, path: str, name: str, blocks: list[tuple[int, int]],
                i: int, j: int, diagonal: np.ndarray | None) -> np.ndarray:
    """The tile ``(i, j)`` of the factor (the module docstring's formulas), reading the
    finished tiles of block rows ``i`` and ``j`` left of column ``j`` from the store at
    ``path``. A task: the same here and on a Dask worker."""
    store = TileStore.open_for_reading(path)

    def row_panel(row: int) -> np.ndarray:
        (r0, r1) = blocks[row]
        if j == 0:
            return np.zeros((r1 - r0, 0))
        return np.concatenate([
            store.read(Tile(r0, r1, *blocks[k]), (name,))[name] for k in range(j)], axis=1)

    (r0, r1), (c0, c1) = blocks[i], blocks[j]
    block = kernel(r0, r1, c0, c1)
    panel_j = row_panel(j)
    if i == j:
        block -= panel_j @ panel_j.T
        return _cholesky_tile(block, r0, name)
    assert diagonal is not None
    block -= row_panel(i) @ panel_j.T
    return _solve_lower(diagonal, block.T).T  # B L_jj^{-T} = (L_jj^{-1} B^T)^T


def _local_tasks(kernel: KernelTiles, tasks: list[FactorTask]
                 ) -> Iterator[tuple[FactorTask, np.ndarray]]:
    """The tasks one after the other, each tile yielded (and so written) before the next
    is computed: one tile in memory at a time."""
    for task in tasks:
        yield task, factor_tile(kernel, *task)


def _dask_tasks(client: Any, kernel: KernelTiles):
    """A runner of factor tasks on ``client``'s workers (the kernel function scattered
    once), yielding ``(task, tile)`` as they finish."""
    shared = client.scatter(kernel, hash=False)

    def run(_: KernelTiles, tasks: list[FactorTask]):
        if not tasks:
            return
        # the tasks of a column share its diagonal factor: sent to the workers once
        diagonal = tasks[0][5]
        shared_diagonal = None if diagonal is None else client.scatter(diagonal, hash=False)
        yield from on_workers(client, factor_tile, [
            (task, (shared, *task[:5], shared_diagonal)) for task in tasks])

    return run


def _solve_lower(lower: np.ndarray, rhs: np.ndarray, transpose: bool = False) -> np.ndarray:
    """``lower^{-1} rhs`` (or ``lower^{-T} rhs``) for a lower-triangular ``lower``."""
    matrix = torch.from_numpy(np.ascontiguousarray(lower))
    if transpose:
        matrix = matrix.T
    return torch.linalg.solve_triangular(
        matrix, torch.from_numpy(np.ascontiguousarray(rhs)), upper=transpose).numpy()


def _cholesky_tile(block: np.ndarray, start: int, name: str) -> np.ndarray:
    """The factor of a diagonal tile's Schur complement, with the in-memory
    factorisation's refusal of a kernel that is not positive definite."""
    what = (f"training {name.upper()} kernel (at its tile of rows "
            f"{start}:{start + block.shape[0]})")
    return cholesky(torch.from_numpy(0.5 * (block + block.T)), what).numpy()


# --------------------------------------------------------------------- residuals
def relative_residual(kernel: KernelTiles, n: int, side: int, alpha: np.ndarray,
                      rhs: np.ndarray, progress: bool | None, what: str,
                      client: object | None = None) -> tuple[float, np.ndarray]:
    """``||rhs - K_r alpha|| / ||rhs||`` and the residual ``rhs - K_r alpha``, with the
    kernel's tiles computed again (each tile on or below the diagonal once), here or on
    the workers of a Dask ``client``."""
    residual = np.array(rhs, dtype=np.float64, copy=True)
    blocks = _blocks(n, side)
    tasks = [(*blocks[i], *blocks[j]) for j in range(len(blocks)) for i in range(j, len(blocks))]
    if client is None:
        results = ((task, residual_terms(kernel, *task, alpha)) for task in tasks)
    else:
        results = _dask_residuals(client, kernel, tasks, alpha)
    with progress_bar(len(tasks), progress, f"residual of the {what} solve", "tile") as bar:
        for (r0, r1, c0, c1), (rows, cols) in results:
            residual[r0:r1] -= rows
            if cols is not None:
                residual[c0:c1] -= cols
            bar.update(1)
    scale = float(np.linalg.norm(rhs))
    return (float(np.linalg.norm(residual)) / scale if scale > 0 else 0.0), residual


def residual_terms(kernel: KernelTiles, r0: int, r1: int, c0: int, c1: int,
                   alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The products of one tile of ``K_r`` (on or below the diagonal) with ``alpha``:
    ``K[r, c] alpha[c]`` and, off the diagonal, ``K[r, c]^T alpha[r]`` (a task)."""
    block = kernel(r0, r1, c0, c1)
    return block @ alpha[c0:c1], None if r0 == c0 else block.T @ alpha[r0:r1]


def _dask_residuals(client: Any, kernel: KernelTiles, tasks: list, alpha: np.ndarray):
    shared, shared_alpha = client.scatter(kernel, hash=False), client.scatter(alpha,
                                                                               hash=False)
    yield from on_workers(client, residual_terms, [
        (task, (shared, *task, shared_alpha)) for task in tasks])


# --------------------------------------------------------------------- stored vectors
def save_vector(folder: Path, stem: str, value: np.ndarray, identity: dict,
                info: dict | None = None) -> None:
    """``value`` as ``stem.npy`` with ``stem.json`` (its identity, checksum and ``info``),
    each written to a temporary file and renamed (a run killed meanwhile leaves none)."""
    temporary = folder / f".{stem}.{os.getpid()}.npy"
    np.save(temporary, value)
    os.replace(temporary, folder / f"{stem}.npy")
    record = {"identity": identity, "sha256": checksum(value), "info": info or {}}
    temporary_record = folder / f".{stem}.{os.getpid()}.json"
    temporary_record.write_text(json.dumps(record) + "\n")
    os.replace(temporary_record, folder / f"{stem}.json")


def load_vector(folder: Path, stem: str, identity: dict) -> tuple[np.ndarray, dict] | None:
    """A vector saved by :func:`save_vector` with this identity and intact, and its
    ``info``; else ``None`` (it is then computed again)."""
    try:
        record = json.loads((folder / f"{stem}.json").read_text())
        value = np.load(folder / f"{stem}.npy")
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("identity") != identity
            or record.get("sha256") != checksum(value)):
        return None
    return value, record.get("info", {})


def digest(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' shapes and numbers (float64)."""
    hasher = hashlib.sha256()
    for array in arrays:
        value = np.ascontiguousarray(array, dtype=np.float64)
        hasher.update(str(value.shape).encode())
        hasher.update(checksum(value).encode())
    return hasher.hexdigest()
