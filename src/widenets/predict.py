r"""Predictions of infinitely wide networks: GP posterior and gradient-descent training.

Conventions: targets ``y`` are ``(N,)`` or ``(N, outputs)`` and share one kernel;
``diag_reg`` is added, as given, to the training kernel's diagonal. Training follows
the loss ``L = 1/2 sum (f - y)^2`` by gradient flow with rate ``learning_rate``, so the
outputs on the training set obey ``du/dt = -learning_rate T (u - y)`` (Lee et al. 2019,
"Wide neural networks of any depth evolve as linear models under gradient descent").
Linear algebra is done in float64 and factorisations are computed once per training
set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .inputs import as_data_tensor, check_nonnegative, parse_get
from .layers.base import Layer

Tensor = torch.Tensor


def _as_targets(y: object, n: int) -> tuple[Tensor, bool]:
    """Targets ``(N,)`` or ``(N, outputs)`` (a tensor, an array or a list) as ``(N, outputs)``,
    and whether they were a vector."""
    if isinstance(y, torch.Tensor):
        t = y
    elif isinstance(y, (str, bytes)) or not isinstance(y, (np.ndarray, np.generic, Sequence)):
        raise TypeError(f"y_train must be a tensor or an array ({n},) or ({n}, outputs), got "
                        f"{type(y).__name__}")
    else:
        t = np.asarray(y)
    is_vector = t.ndim == 1
    t = as_data_tensor(t[:, None] if is_vector else t, "y_train")
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(
            f"y_train must have shape ({n},) or ({n}, outputs), got {tuple(t.shape)}"
        )
    return t, is_vector


def _restore(values: Tensor, like_vector: bool) -> Tensor:
    return values[..., 0] if like_vector else values


def _cholesky(matrix: Tensor, what: str) -> Tensor:
    """The Cholesky factor of ``matrix``, refused when it is singular to working precision.

    A duplicated training point makes the kernel singular, but rounding can leave it a
    pivot of a few ulps instead of a failed factorisation, and solves with such a factor
    amplify rounding without bound: pivots below ``n eps max(diag)`` count as failure.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    tiny = matrix.shape[0] * torch.finfo(matrix.dtype).eps * matrix.diagonal().abs().max()
    if int(info) != 0 or bool((factor.diagonal() ** 2 <= tiny).any()):
        raise ValueError(
            f"the {what} is not positive definite (duplicate training points, or a "
            "kernel of low rank); pass diag_reg > 0, e.g. diag_reg=1e-6 * mean diagonal"
        )
    return factor


#: What predictions accept as their kernels: an architecture, or a function
#: ``kernel_fn(x1, x2, get) -> (N1, N2)`` tensor (``x2=None``: ``x1``).
KernelSource = Layer | Callable[..., Tensor]


class _Kernels:
    """Kernels from an architecture or a kernel function, in float64; the training
    kernels are computed once and kept."""

    def __init__(self, net_or_kernels: object) -> None:
        if isinstance(net_or_kernels, Layer):
            self.net, self.kernel_fn = net_or_kernels, None
        elif callable(net_or_kernels):
            self.net, self.kernel_fn = None, net_or_kernels
        else:
            raise TypeError(
                "net_or_kernels must be a widenets layer or a function "
                f"kernel_fn(x1, x2, get) -> (N1, N2) tensor, got {type(net_or_kernels).__name__}"
            )
        self.training: dict[str, Tensor] = {}

    def __call__(self, x1: Tensor, x2: Tensor | None, names: tuple[str, ...]) -> dict[str, Tensor]:
        n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
        if self.net is not None:
            kernels = self.net.kernel(x1, x2, get=names)
            values = {name: kernels[name] for name in names}
        else:
            values = {name: torch.as_tensor(self.kernel_fn(x1, x2, name)) for name in names}
        for name, value in values.items():
            if tuple(value.shape) != (n1, n2):
                raise ValueError(
                    f"the {name} kernel function must return a ({n1}, {n2}) tensor, got "
                    f"{tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"the {name} kernel has NaN or inf values")
        return {name: value.to(torch.float64) for name, value in values.items()}

    def train(self, x_train: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
        """``K(X, X)`` for each name, symmetrised, computed once. An architecture's NTK
        comes with its NNGP at no extra cost, so both are kept (an ensemble's
        covariance needs the NNGP beside the NTK)."""
        missing = tuple(name for name in names if name not in self.training)
        if self.net is not None and "ntk" in missing and "nngp" not in self.training:
            missing = tuple(dict.fromkeys((*missing, "nngp")))
        if missing:
            for name, value in self(x_train, None, missing).items():
                self.training[name] = 0.5 * (value + value.T)
        return {name: self.training[name] for name in names}


def _check_get(get: object) -> str:
    names = parse_get(get)
    if len(names) != 1:
        raise ValueError(f"get must be 'nngp' or 'ntk' here, got {get!r}")
    return names[0]


def _training_data(x_train: object, y_train: object) -> tuple[Tensor, Tensor, bool]:
    xt = as_data_tensor(x_train, "x_train")
    yt, is_vector = _as_targets(y_train, xt.shape[0])
    return xt, yt.to(torch.float64), is_vector


def _test_inputs(x_test: object, x_train: Tensor) -> Tensor:
    """``x_test`` as a tensor whose examples have the shape of the training examples."""
    xs = as_data_tensor(x_test, "x_test")
    if xs.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"x_test examples must have the shape of x_train's, {tuple(x_train.shape[1:])}, "
            f"got {tuple(xs.shape[1:])}"
        )
    return xs


def gp_inference(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    diag_reg: float = 0.0,
) -> Callable[..., tuple[Tensor, Tensor | None]]:
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
    """
    kernels = _Kernels(net_or_kernels)
    xt, yt, is_vector = _training_data(x_train, y_train)
    reg = check_nonnegative(diag_reg, "diag_reg")
    factors: dict[str, tuple[Tensor, Tensor]] = {}

    def factor(get: str) -> tuple[Tensor, Tensor]:
        if get not in factors:
            k = kernels.train(xt, (get,))[get]
            k = k + reg * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
            chol = _cholesky(k, f"training {get.upper()} kernel")
            factors[get] = (chol, torch.cholesky_solve(yt.to(k.device), chol))
        return factors[get]

    def predict(
        x_test: object, get: str = "nngp", compute_cov: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        name = _check_get(get)
        xs = _test_inputs(x_test, xt)
        chol, alpha = factor(name)
        k_tx = kernels(xs, xt.to(xs.dtype), (name,))[name]
        mean = _restore(k_tx @ alpha, is_vector).to(xs.dtype)
        if not compute_cov:
            return mean, None
        v = torch.linalg.solve_triangular(chol, k_tx.T, upper=False)
        k_tt = kernels(xs, None, (name,))[name]
        cov = k_tt - v.T @ v
        return mean, (0.5 * (cov + cov.T)).to(xs.dtype)

    return predict


class _Spectrum:
    """Eigendecomposition of a regularised training kernel ``T + diag_reg I``, once.

    Eigenvalues below ``N eps`` times the largest are treated as zero: gradient flow
    does not move along them, and at ``t = inf`` their component is dropped (the
    minimum-norm solution). A clearly negative eigenvalue raises a ``ValueError``.
    """

    def __init__(self, k: Tensor, diag_reg: float, what: str) -> None:
        k = 0.5 * (k + k.T) + diag_reg * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        eigenvalues, self.vectors = torch.linalg.eigh(k)
        scale = float(eigenvalues.abs().max())
        tolerance = scale * k.shape[0] * torch.finfo(k.dtype).eps
        if float(eigenvalues.min()) < -max(tolerance, 1e-12 * scale) * 10:
            raise ValueError(
                f"{what} is not positive semi-definite (smallest eigenvalue "
                f"{float(eigenvalues.min()):.3g}); pass diag_reg > 0"
            )
        self.values = torch.where(eigenvalues > tolerance, eigenvalues,
                                  torch.zeros_like(eigenvalues))


def gradient_descent_mse_ensemble(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
) -> Callable[..., tuple[Tensor, Tensor | None]]:
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
    """
    kernels = _Kernels(net_or_kernels)
    xt, yt, is_vector = _training_data(x_train, y_train)
    lr = check_nonnegative(learning_rate, "learning_rate")
    reg = check_nonnegative(diag_reg, "diag_reg")
    spectra: dict[str, tuple[_Spectrum, Tensor]] = {}

    def spectrum(get: str) -> tuple[_Spectrum, Tensor]:
        if get not in spectra:
            k = kernels.train(xt, (get,))[get]
            decomposition = _Spectrum(k, reg, f"the training {get.upper()} kernel")
            spectra[get] = (decomposition, decomposition.vectors.T @ yt.to(k.device))
        return spectra[get]

    def predict(
        x_test: object, t: float | Tensor | None = None, get: str = "ntk",
        compute_cov: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        name = _check_get(get)
        xs = _test_inputs(x_test, xt)
        times, scalar_time = _as_times(t)
        decomposition, projected_y = spectrum(name)
        names = ("nngp", "ntk") if compute_cov and name == "ntk" else (name,)
        k_tx = kernels(xs, xt.to(xs.dtype), names)
        device = decomposition.vectors.device
        _, gain = _spectral_filters(decomposition.values, lr, times.to(device), False)
        # T(x, X) V: (M, N); P(t) = T(x, X) V diag(gain_t) V^T.
        test_modes = k_tx[name].to(device) @ decomposition.vectors
        mean = torch.einsum("mk,tk,ko->tmo", test_modes, gain, projected_y)
        cov = None
        if compute_cov:
            p = torch.einsum("mk,tk,nk->tmn", test_modes, gain, decomposition.vectors)
            k_train = kernels.train(xt, ("nngp",))["nngp"].to(device)
            cross = p @ k_tx["nngp"].to(device).T  # P K(X, x)
            k_tt = kernels(xs, None, ("nngp",))["nngp"].to(device)
            cov = k_tt + p @ k_train @ p.transpose(1, 2) - cross - cross.transpose(1, 2)
            cov = (0.5 * (cov + cov.transpose(1, 2))).to(xs.dtype)
        mean = _restore(mean, is_vector).to(xs.dtype)
        if scalar_time:
            return mean[0], None if cov is None else cov[0]
        return mean, cov

    return predict


def _spectral_filters(
    eigenvalues: Tensor, learning_rate: float, t: Tensor, discrete: bool
) -> tuple[Tensor, Tensor]:
    r"""``decay(lambda) = exp(-lr lambda t)`` and ``gain(lambda) = (1 - decay) / lambda``.

    ``discrete`` gives gradient descent of ``t`` steps instead of gradient flow for a
    time ``t``: ``decay = (1 - lr lambda)^t``. ``gain`` tends to ``lr t`` as
    ``lambda -> 0``; ``t = inf`` gives ``decay = 0`` and ``gain = 1 / lambda``.
    Shapes: ``(len(t), len(eigenvalues))``.
    """
    lam = eigenvalues[None, :]
    times = t[:, None]
    rate = learning_rate * lam
    positive = lam > 0
    sign = torch.ones_like(rate * times)
    if discrete:
        finite = times[torch.isfinite(times)]
        if bool((finite != torch.round(finite)).any()):
            raise ValueError(f"with discrete=True, t counts steps and must be integers, got {t}")
        if bool(torch.isinf(times).any()) and bool((rate[positive] >= 2).any()):
            raise ValueError(
                "gradient descent does not converge: learning_rate * largest eigenvalue >= 2"
            )
        log_base = torch.where(rate < 1, torch.log1p(-rate), torch.log(torch.abs(rate - 1)))
        exponent = torch.where(torch.isinf(times), -torch.inf, times * log_base)
        # (1 - lr lambda)^0 = 1 even where lr lambda = 1 (0 * log 0 would be NaN).
        exponent = torch.where(times == 0, 0.0, exponent)
        odd = torch.remainder(torch.where(torch.isinf(times), 0.0, times), 2) == 1
        sign = torch.where((rate > 1) & odd, -1.0, 1.0)
    else:
        exponent = torch.where(torch.isinf(times), -torch.inf, -rate * times)
    exponent = torch.where(positive, exponent, torch.zeros_like(exponent))
    sign = torch.where(positive, sign, torch.ones_like(sign))
    decay = sign * torch.exp(exponent)
    one_minus_decay = torch.where(sign > 0, -torch.expm1(exponent), 1.0 - decay)
    safe_lam = torch.where(positive, lam, torch.ones_like(lam))
    # No training along a zero eigenvalue: gain lr t at finite t; at t = inf the
    # component is dropped (the minimum-norm solution) instead of inf * 0.
    flat = torch.where(torch.isinf(times), 0.0, learning_rate * times)
    gain = torch.where(positive, one_minus_decay / safe_lam, flat)
    return decay, gain


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
    y, is_vector = _as_targets(y_train, k.shape[0])
    y = y.to(torch.float64).to(k.device)
    lr = check_nonnegative(learning_rate, "learning_rate")
    reg = check_nonnegative(diag_reg, "diag_reg")
    spectrum = _Spectrum(k, reg, "k_train_train")
    eigenvalues, eigenvectors = spectrum.values, spectrum.vectors

    def predict(
        t: float | Tensor | None,
        fx_train_0: object = 0.0,
        fx_test_0: object | None = None,
        k_test_train: object | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        times, scalar_time = _as_times(t)
        f0 = _as_initial(fx_train_0, y.shape, "fx_train_0").to(k.device)
        residual = eigenvectors.T @ (f0 - y)
        decay, gain = _spectral_filters(eigenvalues, lr, times.to(k.device), discrete)
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
                else _as_initial(fx_test_0, shape, "fx_test_0").to(k.device)
            projected = kx @ eigenvectors
            fx_test = ft0 - torch.einsum("mk,tk,ko->tmo", projected, gain, residual)
        if scalar_time:
            fx_train = fx_train[0]
            fx_test = None if fx_test is None else fx_test[0]
        fx_train = _restore(fx_train, is_vector)
        return fx_train, None if fx_test is None else _restore(fx_test, is_vector)

    return predict


def _as_times(t: float | Tensor | None) -> tuple[Tensor, bool]:
    """Times as a 1-D float64 tensor, and whether ``t`` was a single number (a Python or
    NumPy number, or a 0-D array or tensor); ``None`` is ``t = inf``."""
    if t is None:
        return torch.tensor([math.inf], dtype=torch.float64), True
    message = f"t must be a number, a 1-D tensor of times or None, got {t!r}"
    if isinstance(t, (bool, np.bool_, str, bytes)):
        raise TypeError(message)
    try:
        values = t.detach().cpu() if isinstance(t, Tensor) else np.asarray(t)
        if values.dtype in (torch.bool, np.bool_) or values.dtype == object:
            raise TypeError(message)
        times = torch.as_tensor(values).to(torch.float64)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(message) from error
    if times.ndim > 1:
        raise ValueError(message)
    scalar = times.ndim == 0
    times = times.reshape(-1)
    if bool(torch.isnan(times).any()) or bool((times < 0).any()):
        raise ValueError(f"t must be >= 0, got {t!r}")
    return times, scalar


def _as_initial(value: object, shape: tuple[int, int], name: str) -> Tensor:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.full(shape, float(value), dtype=torch.float64)
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim == 1:
        t = t[:, None]
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape} (or its first axis), got "
                         f"{tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    return t


# Any loss and momentum: function-space ODEs integrated with SciPy (widenets.dynamics,
# which uses the helpers above; imported last to avoid a circular import).
from .dynamics import gradient_descent, gradient_descent_momentum  # noqa: E402

__all__ = [
    "KernelSource", "gp_inference", "gradient_descent", "gradient_descent_momentum",
    "gradient_descent_mse", "gradient_descent_mse_ensemble",
]
