"""The Gaussian-process posterior of an infinitely wide network."""

from __future__ import annotations

import os
from typing import cast

import torch

from ..inputs import check_nonnegative
from .common import (
    KernelSource,
    Predictor,
    TrainingKernels,
    check_get,
    cholesky,
    per_example,
    point_covariance,
    point_targets,
    test_inputs,
    training_targets,
)
from .stored import stored_training

Tensor = torch.Tensor


def gp_inference(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    diag_reg: float = 0.0,
    *,
    mask_train: object | None = None,
    adjacency_train: object | None = None,
    store: str | os.PathLike | None = None,
    memory_limit: int | str | None = None,
    progress: bool | None = None,
    client: object | None = None,
) -> Predictor:
    r"""The exact Gaussian-process posterior of an infinitely wide network.

    ``net_or_kernels``: an architecture (its ``kernel``), or any function
    ``kernel_fn(x1, x2, get) -> (N1, N2)`` tensor (``x2=None`` meaning ``x1``), e.g.
    one wrapping an empirical or Monte Carlo kernel.

    Returns ``fn(x_test, get="nngp", compute_cov=True) -> (mean, cov)`` with, for the
    chosen kernel ``K`` (NNGP: Bayesian inference of the network; NTK: the NTK used as
    a GP covariance) and ``K_r = K(X, X) + diag_reg I``::

        mean = K(x, X) K_r^{-1} y
        cov  = K(x, x) - K(x, X) K_r^{-1} K(X, x)

    ``mean`` has the shape of ``y`` with ``len(x_test)`` rows; ``cov`` is
    ``(len(x_test), len(x_test))`` (``None`` unless ``compute_cov``). The training
    kernel and its Cholesky factor are computed once per ``get``; a training kernel that
    is not positive definite raises a ``ValueError`` suggesting ``diag_reg``.

    Sequences and graphs: ``mask_train`` and ``adjacency_train`` are those of ``x_train``
    (as ``mask1``, ``adjacency1`` of ``net.kernel``), ``mask_test`` and
    ``adjacency_test`` of ``fn`` those of ``x_test``. A network whose outputs keep their
    positions ``P`` predicts every (example, position) point: ``y_train`` is then
    ``(N, *P)`` or ``(N, *P, outputs)``, ``mean`` ``(len(x_test), *P[, outputs])`` and
    ``cov`` ``(len(x_test), *P, len(x_test), *P)``.

    Training sets larger than memory: with ``store`` (a folder) the training kernel is
    factorised on disk in tiles (a blocked Cholesky factorisation in float64, exact),
    its solution and the test kernels are kept there, and every stage resumes after an
    interruption (see :mod:`widenets.predict.stored`); ``memory_limit`` (bytes, or a
    string such as ``"600MiB"``, ``"20GiB"``; default: half the available memory) bounds
    the working memory of those stages (the inputs and the Python process come on top).
    Without ``store``, ``memory_limit`` only checks that the in-memory solve fits.
    ``progress``: tqdm bars per stage (``None``: for long stages only). ``client``: a
    Dask ``distributed.Client`` whose workers compute the tiles of every stage (the
    factor's tiles of a block column in parallel; the workers read the store, so it must
    be on a file system they share), with the same results. The relative
    residual ``||y - K_r alpha|| / ||y||`` of each solve is in ``fn.relative_residuals``
    (by kernel name, once computed); a solve whose residual exceeds ``1e-6`` is refused.
    """
    kernels = TrainingKernels(net_or_kernels, (mask_train, adjacency_train))
    xt, y_train_rows = training_targets(x_train, y_train)
    reg = check_nonnegative(diag_reg, "diag_reg")
    stored, stored_tail = stored_training(
        net_or_kernels, xt, y_train_rows, reg, store, memory_limit,
        (mask_train, adjacency_train), progress, client)
    factors: dict[str, tuple[Tensor, Tensor, tuple[int, ...]]] = {}
    residuals: dict[str, float] = {}

    def factor(get: str) -> tuple[Tensor, Tensor, tuple[int, ...]]:
        if get not in factors:
            k = kernels.train(xt, (get,))[get]
            yt, tail = point_targets(y_train_rows, kernels.positions)
            k = k + reg * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
            chol = cholesky(k, f"training {get.upper()} kernel")
            alpha = torch.cholesky_solve(yt.to(k.device), chol)
            residuals[get] = relative_residual(k, alpha, yt.to(k.device))
            factors[get] = (chol, alpha, tail)
        return factors[get]

    def predict(
        x_test: object, get: str = "nngp", compute_cov: bool = True, *,
        mask_test: object | None = None, adjacency_test: object | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        name = check_get(get)
        xs = test_inputs(x_test, xt)
        side = (mask_test, adjacency_test)
        if stored is not None:
            mean_rows = torch.from_numpy(stored.test_mean(xs, name, side))
            residuals[name] = stored.residuals[name]
            stored_mean = per_example(mean_rows, stored_tail).to(xs.dtype)
            if compute_cov:
                return stored_mean, stored.test_covariance(xs, name, side).to(xs.dtype)
            return stored_mean, None
        chol, alpha, tail = factor(name)
        k_tx = kernels(xs, xt.to(xs.dtype), (name,), side)[name]
        mean = per_example(k_tx @ alpha, tail).to(xs.dtype)
        if not compute_cov:
            return mean, None
        v = torch.linalg.solve_triangular(chol, k_tx.T, upper=False)
        k_tt = kernels(xs, None, (name,), side)[name]
        cov = k_tt - v.T @ v
        return mean, point_covariance(0.5 * (cov + cov.T), kernels.positions).to(xs.dtype)

    predictor = cast(Predictor, predict)
    predictor.relative_residuals = residuals
    # wall-clock seconds of the stages run from a store ("factor nngp", "solve nngp", ...)
    predictor.stage_seconds = {} if stored is None else stored.stage_seconds
    return predictor


def relative_residual(k_reg: Tensor, alpha: Tensor, y: Tensor) -> float:
    """``||y - K_r alpha|| / ||y||`` (Frobenius) of an in-memory solve."""
    scale = float(torch.linalg.norm(y))
    return float(torch.linalg.norm(y - k_reg @ alpha)) / scale if scale > 0 else 0.0
