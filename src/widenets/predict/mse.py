r"""Gradient-flow training on the MSE loss, in closed form: the ensemble of infinitely
wide networks (Lee et al. 2019) and a finite network's linearized trajectory.

Training follows the loss ``L = 1/2 sum (f - y)^2`` by gradient flow with rate
``learning_rate``, so the outputs on the training set obey
``du/dt = -learning_rate T (u - y)`` (Lee et al. 2019, "Wide neural networks of any depth
evolve as linear models under gradient descent"). Eigendecompositions are computed once
per training set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import cast

import torch

from ..inputs import as_data_tensor, check_nonnegative
from .common import (
    KernelSource,
    Predictor,
    Spectrum,
    TrainingKernels,
    as_initial,
    as_targets,
    as_times,
    check_get,
    per_example,
    point_covariance,
    point_targets,
    restore_shape,
    spectral_filters,
    test_inputs,
    training_targets,
)
from .stored import stored_training

Tensor = torch.Tensor


def gradient_descent_mse_ensemble(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    *,
    mask_train: object | None = None,
    adjacency_train: object | None = None,
    store: str | os.PathLike | None = None,
    memory_limit: int | str | None = None,
    progress: bool | None = None,
    client: object | None = None,
) -> Predictor:
    r"""Mean and covariance, over initialisations, of the infinitely wide network trained
    by gradient flow on ``L = 1/2 sum (f - y)^2`` for a time ``t``.

    Lee et al. 2019, "Wide neural networks of any depth evolve as linear models under
    gradient descent", eqs. (14)-(16). With ``T`` the NTK, ``K`` the NNGP,
    ``T_r = T(X, X) + diag_reg I`` and ``M = I - exp(-lr T_r t)``::

        mean = T(x, X) T_r^{-1} M y
        P    = T(x, X) T_r^{-1} M
        cov  = K(x, x) + P K(X, X) P^T - P K(X, x) - K(x, X) P^T

    ``get="nngp"`` is the same with the NNGP in place of the NTK (only the read-out
    layer trained: Bayesian-like inference whose ``t = inf`` limit is the NNGP posterior
    mean). ``T_r^{-1} M`` is ``V diag((1 - exp(-lr lambda t)) / lambda) V^T`` from the
    eigendecomposition of ``T_r``, computed once per training set and ``get``; zero
    eigenvalues (duplicate points with ``diag_reg=0``) contribute ``lr t`` at finite
    ``t`` and nothing at ``t = inf``, so the answer stays finite.

    Returns ``fn(x_test, t=None, get="ntk", compute_cov=True) -> (mean, cov)``: ``t`` a
    number, a 1-D tensor of times (a leading time axis is added) or ``None`` for
    ``t = inf``; ``mean`` has the shape of ``y`` with ``len(x_test)`` rows; ``cov`` is
    ``(len(x_test), len(x_test))`` (``None`` unless ``compute_cov``).

    Sequences, graphs and positional outputs: ``mask_train``, ``adjacency_train`` and
    ``fn``'s ``mask_test``, ``adjacency_test``, and the shapes of targets and
    predictions, as for :func:`~widenets.predict.gp_inference`.

    Training sets larger than memory: ``store``, ``memory_limit``, ``progress`` and
    ``client`` as for
    :func:`~widenets.predict.gp_inference`; from a store, ``fn`` predicts the mean at
    ``t = inf`` (``t=None``, ``compute_cov=False``), ``T(x, X) T_r^{-1} y``, by the same
    exact blocked factorisation.
    """
    kernels = TrainingKernels(net_or_kernels, (mask_train, adjacency_train))
    xt, y_train_rows = training_targets(x_train, y_train)
    lr = check_nonnegative(learning_rate, "learning_rate")
    reg = check_nonnegative(diag_reg, "diag_reg")
    stored, stored_tail = stored_training(
        net_or_kernels, xt, y_train_rows, reg, store, memory_limit,
        (mask_train, adjacency_train), progress, client)
    spectra: dict[str, tuple[Spectrum, Tensor, tuple[int, ...]]] = {}
    residuals: dict[str, float] = {}

    def spectrum(get: str) -> tuple[Spectrum, Tensor, tuple[int, ...]]:
        if get not in spectra:
            k = kernels.train(xt, (get,))[get]
            yt, tail = point_targets(y_train_rows, kernels.positions)
            decomposition = Spectrum(k, reg, f"the training {get.upper()} kernel")
            spectra[get] = (decomposition, decomposition.vectors.T @ yt.to(k.device), tail)
        return spectra[get]

    def predict(
        x_test: object, t: float | Tensor | None = None, get: str = "ntk",
        compute_cov: bool = True, *, mask_test: object | None = None,
        adjacency_test: object | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        name = check_get(get)
        xs = test_inputs(x_test, xt)
        if stored is not None:
            if t is not None or compute_cov:
                raise ValueError(
                    "from a store, predictions are the mean at t = inf: pass t=None and "
                    "compute_cov=False")
            rows = torch.from_numpy(stored.test_mean(xs, name, (mask_test, adjacency_test)))
            residuals[name] = stored.residuals[name]
            return per_example(rows, stored_tail).to(xs.dtype), None
        times, scalar_time = as_times(t)
        decomposition, projected_y, tail = spectrum(name)
        names = ("nngp", "ntk") if compute_cov and name == "ntk" else (name,)
        side = (mask_test, adjacency_test)
        k_tx = kernels(xs, xt.to(xs.dtype), names, side)
        device = decomposition.vectors.device
        _, gain = spectral_filters(decomposition.values, lr, times.to(device), False)
        # T(x, X) V: (M, N); P(t) = T(x, X) V diag(gain_t) V^T.
        test_modes = k_tx[name].to(device) @ decomposition.vectors
        mean = torch.einsum("mk,tk,ko->tmo", test_modes, gain, projected_y)
        cov = None
        if compute_cov:
            p = torch.einsum("mk,tk,nk->tmn", test_modes, gain, decomposition.vectors)
            k_train = kernels.train(xt, ("nngp",))["nngp"].to(device)
            cross = p @ k_tx["nngp"].to(device).T  # P K(X, x)
            k_tt = kernels(xs, None, ("nngp",), side)["nngp"].to(device)
            cov = k_tt + p @ k_train @ p.transpose(1, 2) - cross - cross.transpose(1, 2)
            cov = point_covariance(0.5 * (cov + cov.transpose(1, 2)),
                                   kernels.positions).to(xs.dtype)
        mean = per_example(mean, tail).to(xs.dtype)
        if scalar_time:
            return mean[0], None if cov is None else cov[0]
        return mean, cov

    predictor = cast(Predictor, predict)
    predictor.relative_residuals = residuals
    predictor.stage_seconds = {} if stored is None else stored.stage_seconds
    return predictor


def gradient_descent_mse(
    k_train_train: object,
    y_train: object,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    discrete: bool = False,
) -> Callable[..., tuple[Tensor, Tensor | None]]:
    r"""Outputs of a linearized network trained on MSE from its own initial outputs.

    With ``T_r = T + diag_reg I`` (``T = k_train_train``, e.g. an NTK) and
    ``r_0 = f_train_0 - y``::

        f_train(t) = y + exp(-lr T_r t) r_0
        f_test(t)  = f_test_0 - k_test_train T_r^{-1} (I - exp(-lr T_r t)) r_0

    Returns ``fn(t, fx_train_0=0.0, fx_test_0=None, k_test_train=None)`` returning
    ``(fx_train_t, fx_test_t)``; ``t`` is a number, a 1-D tensor of times (a leading
    time axis is added) or ``None`` for ``t = inf``. With ``discrete=True``, ``t``
    counts gradient-descent steps of size ``learning_rate`` and
    ``exp(-lr T_r t)`` becomes ``(I - lr T_r)^t``. The eigendecomposition of ``T_r`` is
    computed once. Zero eigenvalues keep their component (no training happens along
    them); at ``t = inf`` that component of the test prediction is dropped (the
    minimum-norm solution).
    """
    k = as_data_tensor(k_train_train, "k_train_train").to(torch.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"k_train_train must be square (N, N), got {tuple(k.shape)}")
    y, is_vector = as_targets(y_train, k.shape[0])
    y = y.to(torch.float64).to(k.device)
    lr = check_nonnegative(learning_rate, "learning_rate")
    reg = check_nonnegative(diag_reg, "diag_reg")
    spectrum = Spectrum(k, reg, "k_train_train")
    eigenvalues, eigenvectors = spectrum.values, spectrum.vectors

    def predict(
        t: float | Tensor | None,
        fx_train_0: object = 0.0,
        fx_test_0: object | None = None,
        k_test_train: object | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        times, scalar_time = as_times(t)
        f0 = as_initial(fx_train_0, (y.shape[0], y.shape[1]), "fx_train_0").to(k.device)
        residual = eigenvectors.T @ (f0 - y)
        decay, gain = spectral_filters(eigenvalues, lr, times.to(k.device), discrete)
        fx_train = y + torch.einsum("nk,tk,ko->tno", eigenvectors, decay, residual)
        fx_test = None
        if k_test_train is not None:
            kx = as_data_tensor(k_test_train, "k_test_train").to(torch.float64).to(k.device)
            if kx.ndim != 2 or kx.shape[1] != k.shape[0]:
                raise ValueError(
                    f"k_test_train must be (M, {k.shape[0]}), got {tuple(kx.shape)}"
                )
            shape = (kx.shape[0], y.shape[1])
            ft0 = torch.zeros(shape, dtype=k.dtype, device=k.device) if fx_test_0 is None \
                else as_initial(fx_test_0, shape, "fx_test_0").to(k.device)
            projected = kx @ eigenvectors
            fx_test = ft0 - torch.einsum("mk,tk,ko->tmo", projected, gain, residual)
        if scalar_time:
            fx_train = fx_train[0]
            fx_test = None if fx_test is None else fx_test[0]
        fx_train = restore_shape(fx_train, is_vector)
        return fx_train, None if fx_test is None else restore_shape(fx_test, is_vector)

    return predict
