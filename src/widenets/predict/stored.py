"""Predictions whose training kernel does not fit in memory: the ``store=`` and
``memory_limit=`` of :func:`~widenets.predict.gp_inference` and
:func:`~widenets.predict.gradient_descent_mse_ensemble` (``t = inf``).

A store is a folder with one sub-store per stage, each resumable on its own:

* ``factor-nngp/``, ``factor-ntk/``: the Cholesky factor of ``K(X, X) + diag_reg I``
  (:mod:`widenets.predict.blocked`), tile by tile, with the solutions
  ``alpha = K_r^{-1} y`` beside it (``alpha-<targets>.npy`` and a JSON record with its
  checksum and relative residual);
* ``test-nngp-<inputs>/``, ``test-ntk-<inputs>/``: the test kernel ``K(x, X)`` of each
  set of test inputs, tile by tile (a ``TileStore`` (of ``widenets.store``)).

Every sub-store records what it was computed from (the architecture, the training
inputs and masks, ``diag_reg``, the tile sizes): a store of another training set is
refused, never mixed. Disk: the factor takes ``8 N^2 / 2`` bytes per kernel (14.4 GB for
60,000 examples), a test kernel ``8 M N`` bytes.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..engine import checked_side_inputs, progress_bar
from ..layers.base import Layer
from ..optional import require
from ..store import TileStore, stored_tile_sizes
from ..tiles import (
    architecture_identity,
    compute_tile,
    inputs_digest,
    side_inputs_digest,
    tile_results,
)
from ..tiling import Tile
from ..version import __version__
from .blocked import (
    REFINE_ABOVE,
    REFINEMENT_STEPS,
    BlockedFactor,
    digest,
    load_vector,
    memory_bytes,
    relative_residual,
    save_vector,
    step_memory,
    tile_side,
)
from .common import point_targets

Tensor = torch.Tensor

#: The largest relative residual accepted; a larger one is an error (the training kernel
#: is too ill-conditioned for float64: raise diag_reg).
MAX_RESIDUAL = 1e-6


class StoredTraining:
    """The training side of predictions from a store: factors and solutions, computed
    once per kernel and resumed from the store."""

    def __init__(self, net: object, x_train: Tensor, y_rows: Tensor, diag_reg: float,
                 store: str | os.PathLike, memory: int, side_train: tuple[object, object],
                 progress: bool | None, client: object | None = None) -> None:
        require("zarr", "store", "predictions from a store (store=...)")
        if not isinstance(net, Layer):
            raise TypeError("store= needs an architecture (a kernel function cannot be "
                            "identified across runs), got a function")
        if x_train.dtype != torch.float64:
            x_train = x_train.to(torch.float64)
        self.net, self.x, self.y = net, x_train, y_rows.to(torch.float64).cpu().numpy()
        self.reg, self.memory, self.progress, self.client = diag_reg, memory, progress, client
        self.root = Path(store)
        mask, adjacency = side_train
        self.side = checked_side_inputs(x_train, None, (mask, None), (adjacency, None))
        self.n = x_train.shape[0]
        self.residuals: dict[str, float] = {}
        self.sides: dict[str, int] = {}  # the factors' tile sides
        #: Wall-clock seconds of each stage run by this object, e.g. ``"factor nngp"``.
        self.stage_seconds: dict[str, float] = {}
        self._alphas: dict[str, np.ndarray] = {}
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"store {self.root} exists and is not a folder; it is left "
                             "untouched: use a new path")
        self.root.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- identity
    def _identity(self, name: str, rows: int, cols: int, kind: str) -> dict:
        identity = {
            "kind": kind, "architecture": architecture_identity(self.net),
            "architecture_repr": repr(self.net), "get": [name],
            "inputs_sha256": inputs_digest(self.x, None), "diag_reg": self.reg,
            "dtype": "float64", "shape": [self.n, self.n], "tile": [rows, cols],
            "symmetric": False, "version": __version__,
        }
        if any(value is not None for value in self.side):
            identity["side_inputs_sha256"] = side_inputs_digest(self.side, True)
        return identity

    def _training_tiles(self, name: str) -> TrainingTiles:
        return TrainingTiles(self.net, self.x, self.side, self.reg, name)

    # ----------------------------------------------------------------- solutions
    def alpha(self, name: str) -> np.ndarray:
        """``(K(X, X) + diag_reg I)^{-1} y`` for the kernel ``name``, from the store or
        computed (and stored); its relative residual is in :attr:`residuals`."""
        if name in self._alphas:
            return self._alphas[name]
        factor, identity = self._factor(name)
        self.sides[name] = factor.side
        path = factor.store.path
        try:
            tiles = self._training_tiles(name)
            stem = f"alpha-{digest(self.y)[:16]}"
            solution_identity = {**identity, "targets_sha256": digest(self.y)}
            found = load_vector(path, stem, solution_identity)
            if found is not None:
                alpha, info = found
                residual = float(info["relative_residual"])
            else:
                with self._stage(f"factor {name}"):
                    factor.factorise(tiles, self.progress, self.client)
                    factor.store.mark_complete()
                alpha, residual = self._solve(factor, tiles, name)
                save_vector(path, stem, alpha, solution_identity,
                            {"relative_residual": residual})
        finally:
            factor.close()
        self._alphas[name], self.residuals[name] = alpha, residual
        return alpha

    def _factor(self, name: str) -> tuple[BlockedFactor, dict]:
        """The factor store of kernel ``name`` (created, resumed or complete), locked."""
        path = self.root / f"factor-{name}"
        stored = stored_tile_sizes(path)
        side = stored[0] if stored is not None else tile_side(self.n, self.memory)
        if step_memory(self.n, side) > self.memory:
            raise ValueError(
                f"store {path} was factorised in tiles of {side}, whose steps need "
                f"{step_memory(self.n, side)} bytes, more than memory_limit "
                f"({self.memory}); resume it with a larger memory_limit, or use a new store")
        identity = self._identity(name, side, side, "cholesky factor of K + diag_reg I")
        store = TileStore(path, identity, self.n, self.n, side, side, (name,),
                          np.dtype(np.float64), compressed=False)
        return BlockedFactor(store, name, self.n, side), identity

    def _solve(self, factor: BlockedFactor, tiles, name: str) -> tuple[np.ndarray, float]:
        with self._stage(f"solve {name}"), progress_bar(
                2, self.progress, f"solving with the {name.upper()} factor", "pass") as bar:
            alpha = factor.solve(self.y)
            bar.update(2)
        with self._stage(f"residual {name}"):
            residual, r = relative_residual(tiles, self.n, factor.side, alpha, self.y,
                                            self.progress, name.upper(), self.client)
        for _ in range(REFINEMENT_STEPS):
            if residual <= REFINE_ABOVE:
                break
            with self._stage(f"refinement {name}"):
                alpha = alpha + factor.solve(r)
                residual, r = relative_residual(tiles, self.n, factor.side, alpha, self.y,
                                                self.progress, name.upper(), self.client)
        if residual > MAX_RESIDUAL:
            raise ValueError(
                f"the {name.upper()} solve reached a relative residual of {residual:.1e} "
                f"only (more than {MAX_RESIDUAL:g}): the training kernel is too "
                "ill-conditioned for float64; raise diag_reg")
        return alpha, residual

    # ----------------------------------------------------------------- test kernels
    def test_mean(self, x_test: Tensor, name: str, side_test: tuple[object, object]
                  ) -> np.ndarray:
        """``K(x_test, X) alpha``, from the test kernel's tiles (stored, resumable)."""
        alpha = self.alpha(name)
        x = x_test.to(torch.float64)
        m = x.shape[0]
        mask, adjacency = side_test
        side = checked_side_inputs(x, self.x, (mask, self.side[0]),
                                   (adjacency, self.side[2]))
        path = self._test_path(name, x)
        stored = stored_tile_sizes(path)
        if stored is not None:
            rows, cols = stored
        else:
            cols = self.sides[name]  # (alpha's columns in the factor's blocks)
            rows = max(1, min(m, self.memory // (4 * 8 * cols)))
        identity = {**self._identity(name, rows, cols, "test kernel K(x, X)"),
                    "shape": [m, self.n], "test_inputs_sha256": inputs_digest(x, None)}
        if any(value is not None for value in side):
            identity["side_inputs_sha256"] = side_inputs_digest(side, False)
        tiles = [Tile(r0, min(r0 + rows, m), c0, min(c0 + cols, self.n))
                 for r0 in range(0, m, rows) for c0 in range(0, self.n, cols)]
        store = TileStore(path, identity, m, self.n, rows, cols, (name,),
                          np.dtype(np.float64), compressed=False)
        try:
            finished = store.finished()
            todo = [t for t in tiles if t.key not in finished]
            if todo:
                store.prepare_writes([])
            mean = np.zeros((m, alpha.shape[1]))
            with self._stage(f"test kernel {name}"), progress_bar(len(tiles), self.progress,
                              f"test {name.upper()} kernel", "tile") as bar:
                for tile in tiles:
                    if tile.key in finished:
                        value = store.read(tile, (name,))[name]
                        mean[tile.rows] += value @ alpha[tile.cols]
                        bar.update(1)
                for tile, values in tile_results(self.net, x, self.x, todo, (name,),
                                                 self.client, side):
                    store.write(tile, values)
                    mean[tile.rows] += values[name] @ alpha[tile.cols]
                    bar.update(1)
            store.mark_complete()
        finally:
            store.close()
        return mean

    @contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        """Add the wall-clock time of the block to :attr:`stage_seconds`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = (self.stage_seconds.get(stage, 0.0)
                                         + time.perf_counter() - start)

    def _test_path(self, name: str, x: Tensor) -> Path:
        return self.root / f"test-{name}-{inputs_digest(x, None)[:16]}"

    def test_covariance(self, x_test: Tensor, name: str,
                        side_test: tuple[object, object]) -> Tensor:
        """``K(x, x) - K(x, X) K_r^{-1} K(X, x)`` from the stored factor and the test
        kernel that :meth:`test_mean` stored; it holds ``K(x, X)`` and ``L^{-1} K(X, x)``
        in memory (``ValueError`` if they do not fit in the memory limit)."""
        x = x_test.to(torch.float64)
        m = x.shape[0]
        need = 8 * (2 * self.n * m + 2 * m * m)
        if need > self.memory:
            raise ValueError(
                f"compute_cov=True from a store holds {need} bytes for {m} test points and "
                f"{self.n} training points, more than memory_limit ({self.memory}); use "
                "compute_cov=False, or fewer test points per call")
        tests = TileStore.open_finished(self._test_path(name, x))
        rows, cols = tests.identity["tile"]
        k_test_train = np.empty((m, self.n))
        for r0 in range(0, m, rows):
            for c0 in range(0, self.n, cols):
                tile = Tile(r0, min(r0 + rows, m), c0, min(c0 + cols, self.n))
                k_test_train[tile.rows, tile.cols] = tests.read(tile, (name,))[name]
        factor, _ = self._factor(name)
        try:
            projected = factor.forward(k_test_train.T)  # L^{-1} K(X, x)
        finally:
            factor.close()
        mask, adjacency = side_test
        k_tt = self.net.kernel(x, None, get=name, mask1=mask, adjacency1=adjacency)
        cov = k_tt.to(torch.float64) - torch.from_numpy(projected.T @ projected)
        return 0.5 * (cov + cov.T)


class TrainingTiles:
    """The tiles ``K(X, X)[r0:r1, c0:c1] + diag_reg I`` (on the diagonal) of one kernel
    of an architecture, float64: a picklable function (Dask tasks compute them)."""

    def __init__(self, net: Layer, x: Tensor, side: tuple, reg: float, name: str) -> None:
        self.net, self.x, self.side, self.reg, self.name = net, x, side, reg, name

    def __call__(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        value = compute_tile(self.net, self.x, None, Tile(r0, r1, c0, c1), (self.name,),
                             self.side)[self.name]
        value = np.array(value, dtype=np.float64, copy=True)
        if r0 == c0 and self.reg:
            value[np.diag_indices_from(value)] += self.reg
        return value


def in_memory_bytes(n: int) -> int:
    """Bytes of the in-memory solve of ``n`` training points (the kernel, its factor and a
    temporary, float64)."""
    return 3 * 8 * n * n


def needs_store_message(n: int, memory: int) -> str:
    return (f"the training kernel of {n} examples needs about {in_memory_bytes(n)} bytes "
            f"({math.ceil(in_memory_bytes(n) / 2**20)} MiB) in memory, more than "
            f"memory_limit ({memory} bytes); pass store= (a folder) to factorise it on disk")


def default_memory() -> int:
    """Half the memory available now: the default ``memory_limit`` of a store."""
    from ..tiles import MEMORY_FRACTION, available_memory

    return int(MEMORY_FRACTION * available_memory())


def stored_training(
    net_or_kernels: object, x_train: Tensor, y_rows: Tensor, diag_reg: float,
    store: str | os.PathLike | None, memory_limit: int | str | None,
    side_train: tuple[object, object], progress: bool | None, client: object | None,
) -> tuple[StoredTraining | None, tuple[int, ...]]:
    """The predictors' ``store``, ``memory_limit`` and ``client``: the stored training
    side and the per-example shape of the targets (``None`` and ``()`` without a
    store, after checking that the in-memory solve fits in ``memory_limit``)."""
    memory = None if memory_limit is None else memory_bytes(memory_limit)
    if store is None:
        if client is not None:
            raise ValueError("client= computes the stages of a store: pass store= too")
        if memory is not None and in_memory_bytes(x_train.shape[0]) > memory:
            raise ValueError(needs_store_message(x_train.shape[0], memory))
        return None, ()
    targets, tail = point_targets(y_rows, None)
    return StoredTraining(net_or_kernels, x_train, targets, diag_reg, store,
                          default_memory() if memory is None else memory, side_train,
                          progress, client), tail
