"""The pieces every prediction shares: targets, times, initial outputs, the training
kernels, the one positive-definiteness check, the spectrum of a training kernel and its
filters.

Conventions (all of :mod:`widenets.predict`): targets ``y`` are ``(N,)`` or
``(N, outputs)`` and share one kernel; ``diag_reg`` is added, as given, to the training
kernel's diagonal; linear algebra is in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch

from ..inputs import as_data_tensor, parse_get
from ..layers.base import Layer

Tensor = torch.Tensor


def as_targets(
    y: object, n: int, name: str = "y_train", inputs: str = "x_train"
) -> tuple[Tensor, bool]:
    """Targets ``(N,)`` or ``(N, outputs)`` (a tensor, an array or a list) as ``(N, outputs)``,
    and whether they were a vector; errors name the argument ``name`` and its ``inputs``."""
    t: Tensor | np.ndarray
    if isinstance(y, torch.Tensor):
        t = y
    elif isinstance(y, (str, bytes)) or not isinstance(y, (np.ndarray, np.generic, Sequence)):
        raise TypeError(f"{name} must be a tensor or an array ({n},) or ({n}, outputs), got "
                        f"{type(y).__name__}")
    else:
        t = np.asarray(y)
    shape = tuple(t.shape)
    is_vector = t.ndim == 1
    t = as_data_tensor(t[:, None] if is_vector else t, name)
    if t.ndim != 2 or t.shape[0] != n:
        raise ValueError(
            f"{name} must have shape ({n},) or ({n}, outputs) for the {n} inputs {inputs}, "
            f"got {shape}"
        )
    return t, is_vector


#: Training inputs whose kernel diagonal sets a relative ``diag_reg``.
DIAGONAL_SAMPLE = 100


def relative_diag_reg(net: Layer, x_train: Tensor, get: str, fraction: float) -> float:
    """``diag_reg`` as ``fraction`` of the mean diagonal of the ``get`` kernel over the
    first :data:`DIAGONAL_SAMPLE` training inputs (their kernel with themselves): the
    regularisation of ``widenets predict`` and of the Fashion-MNIST benchmark."""
    sample = x_train[:DIAGONAL_SAMPLE]
    return fraction * float(net.kernel(sample, get=get).diagonal().mean())


def restore_shape(values: Tensor, like_vector: bool) -> Tensor:
    return values[..., 0] if like_vector else values


def cholesky(matrix: Tensor, what: str) -> Tensor:
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


class Predictor(Protocol):
    """What :func:`~widenets.predict.gp_inference` and
    :func:`~widenets.predict.gradient_descent_mse_ensemble` return: ``fn(x_test, ...) ->
    (mean, cov)``, with the relative residual of each solve by kernel name (once
    computed) and, from a store, the wall-clock seconds of each stage."""

    relative_residuals: dict[str, float]
    stage_seconds: dict[str, float]

    def __call__(self, x_test: object, *args: Any, **kwargs: Any
                 ) -> tuple[Tensor, Tensor | None]: ...


#: What predictions accept as their kernels: an architecture, or a function
#: ``kernel_fn(x1, x2, get) -> (N1, N2)`` tensor (``x2=None``: ``x1``).
KernelSource = Layer | Callable[..., Tensor]


class TrainingKernels:
    """Kernels from an architecture or a kernel function, in float64; the training
    kernels are computed once and kept.

    ``side_train``: the training inputs' ``(mask, adjacency)`` (an architecture only).
    Kernels of networks whose outputs keep their positions, ``(n1, n2, *P, *P)``, become
    kernels of (example, position) points, ``(n1 prod(P), n2 prod(P))`` with the
    positions of each example consecutive; :attr:`positions` is then ``P`` (else
    ``None``, also before the first kernel)."""

    def __init__(self, net_or_kernels: object,
                 side_train: tuple[object, object] = (None, None)) -> None:
        self.net: Layer | None
        self.kernel_fn: Callable[..., object] | None
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
        self.side_train = side_train
        self.positions: tuple[int, ...] | None = None
        if self.net is None and any(value is not None for value in side_train):
            raise ValueError("masks and adjacencies need an architecture, not a kernel function")

    def __call__(self, x1: Tensor, x2: Tensor | None, names: tuple[str, ...],
                 side1: tuple[object, object] | None = None) -> dict[str, Tensor]:
        """The kernels between ``x1``, whose ``(mask, adjacency)`` is ``side1``, and
        ``x2``: the training inputs (with ``side_train``), or ``None`` for ``x1``."""
        n1, n2 = x1.shape[0], x1.shape[0] if x2 is None else x2.shape[0]
        mask1, adjacency1 = (None, None) if side1 is None else side1
        if self.net is not None:
            if x2 is None:
                kernels = self.net.kernel(x1, None, get=names, mask1=mask1,
                                          adjacency1=adjacency1)
            else:
                kernels = self.net.kernel(x1, x2, get=names, mask1=mask1,
                                          mask2=self.side_train[0], adjacency1=adjacency1,
                                          adjacency2=self.side_train[1])
            values = {name: self._as_points(cast(Tensor, kernels[name]))  # all asked for
                      for name in names}
        else:
            if side1 is not None and any(value is not None for value in side1):
                raise ValueError(
                    "masks and adjacencies need an architecture, not a kernel function")
            kernel_fn = self.kernel_fn
            assert kernel_fn is not None  # set by __init__ when net is not
            values = {name: torch.as_tensor(kernel_fn(x1, x2, name)) for name in names}
        points = math.prod(self.positions) if self.positions else 1
        for name, value in values.items():
            if tuple(value.shape) != (n1 * points, n2 * points):
                raise ValueError(
                    f"the {name} kernel function must return a ({n1}, {n2}) tensor, got "
                    f"{tuple(value.shape)}"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"the {name} kernel has NaN or inf values")
        return {name: value.to(torch.float64) for name, value in values.items()}

    def _as_points(self, kernel: Tensor) -> Tensor:
        """A kernel of positional outputs as a kernel of (example, position) points."""
        if kernel.ndim == 2:
            return kernel
        count = (kernel.ndim - 2) // 2
        positions = tuple(kernel.shape[2:2 + count])
        if self.positions is not None and positions != self.positions:
            raise ValueError(f"the network's outputs have positions {positions} here and "
                             f"{self.positions} for the training inputs")
        self.positions = positions
        n1, n2, p = kernel.shape[0], kernel.shape[1], math.prod(positions)
        flat = kernel.reshape(n1, n2, p, p).permute(0, 2, 1, 3)
        return flat.reshape(n1 * p, n2 * p)

    def train(self, x_train: Tensor, names: tuple[str, ...]) -> dict[str, Tensor]:
        """``K(X, X)`` for each name, symmetrised, computed once. An architecture's NTK
        comes with its NNGP at no extra cost, so both are kept (an ensemble's
        covariance needs the NNGP beside the NTK)."""
        missing = tuple(name for name in names if name not in self.training)
        if self.net is not None and "ntk" in missing and "nngp" not in self.training:
            missing = tuple(dict.fromkeys((*missing, "nngp")))
        if missing:
            for name, value in self(x_train, None, missing, self.side_train).items():
                self.training[name] = 0.5 * (value + value.T)
        return {name: self.training[name] for name in names}


def training_targets(x_train: object, y_train: object, name: str = "y_train",
                     inputs: str = "x_train") -> tuple[Tensor, Tensor]:
    """``x_train`` as a tensor and ``y_train`` as a float64 tensor with one row per input.

    Targets are ``(N,)`` or ``(N, outputs)``; for a network whose outputs keep their
    positions ``P``, ``(N, *P)`` or ``(N, *P, outputs)`` (checked by
    :func:`point_targets` once the kernels tell ``P``)."""
    xt = as_data_tensor(x_train, inputs)
    if isinstance(y_train, torch.Tensor):
        y = y_train
    elif isinstance(y_train, (np.ndarray, np.generic, Sequence)) and not isinstance(
            y_train, (str, bytes)):
        y = torch.as_tensor(np.asarray(y_train))
    else:
        raise TypeError(f"{name} must be a tensor or an array with {xt.shape[0]} rows, got "
                        f"{type(y_train).__name__}")
    if y.ndim > 2:
        t = as_data_tensor(y.double() if not y.is_floating_point() else y, name,
                           layout_warning=False)
    else:
        t = as_targets(y, xt.shape[0], name, inputs)[0]
        t = t[:, 0] if y.ndim == 1 else t
    if t.shape[0] != xt.shape[0]:
        raise ValueError(f"{name} must have one row per input of {inputs} ({xt.shape[0]}), "
                         f"got shape {tuple(t.shape)}")
    return xt, t.to(torch.float64)


def point_targets(
    y: Tensor, positions: tuple[int, ...] | None, name: str = "y_train"
) -> tuple[Tensor, tuple[int, ...]]:
    """Targets of :func:`training_targets` as ``(points, outputs)`` rows for kernels of
    (example, position) points, and the per-example shape that predictions take back
    (:func:`per_example`)."""
    tail = tuple(y.shape[1:])
    if not positions:
        if len(tail) > 1:
            raise ValueError(f"{name} must be (N,) or (N, outputs), got {tuple(y.shape)}")
        return (y[:, None] if not tail else y), tail
    if tail != positions and tail[:-1] != positions:
        raise ValueError(
            f"the network's outputs keep their positions {positions}: {name} must be "
            f"(N, *positions) = {(y.shape[0], *positions)} or (N, *positions, outputs), "
            f"got {tuple(y.shape)}"
        )
    outputs = 1 if tail == positions else tail[-1]
    return y.reshape(-1, outputs), tail


def per_example(values: Tensor, tail: tuple[int, ...]) -> Tensor:
    """Predictions ``(..., points, outputs)`` as ``(..., M, *tail)``."""
    return values.reshape(*values.shape[:-2], -1, *tail)


def point_covariance(cov: Tensor, positions: tuple[int, ...] | None) -> Tensor:
    """A covariance ``(..., M P, M P)`` of (example, position) points as ``(..., M, *P, M,
    *P)`` (unchanged without positions)."""
    if not positions:
        return cov
    lead, m = cov.shape[:-2], cov.shape[-1] // math.prod(positions)
    return cov.reshape(*lead, m, *positions, m, *positions)


def check_get(get: object) -> str:
    names = parse_get(get)
    if len(names) != 1:
        raise ValueError(f"get must be 'nngp' or 'ntk' here, got {get!r}")
    return names[0]


def training_data(x_train: object, y_train: object) -> tuple[Tensor, Tensor, bool]:
    xt = as_data_tensor(x_train, "x_train")
    yt, is_vector = as_targets(y_train, xt.shape[0])
    return xt, yt.to(torch.float64), is_vector


def test_inputs(x_test: object, x_train: Tensor) -> Tensor:
    """``x_test`` as a tensor whose examples have the shape of the training examples."""
    xs = as_data_tensor(x_test, "x_test")
    if xs.shape[1:] != x_train.shape[1:]:
        raise ValueError(
            f"x_test examples must have the shape of x_train's, {tuple(x_train.shape[1:])}, "
            f"got {tuple(xs.shape[1:])}"
        )
    return xs


def check_positive_semidefinite(eigenvalues: Tensor, what: str) -> float:
    """Refuse a symmetric matrix with a clearly negative eigenvalue; return the rounding
    tolerance ``N eps max|lambda|`` below which eigenvalues count as zero.

    "Clearly negative": below ``-10 max(N eps, 1e-12) max|lambda|`` (rounding of a PSD
    kernel, or of its eigendecomposition, stays far above that).
    """
    scale = float(eigenvalues.abs().max()) if eigenvalues.numel() else 0.0
    tolerance = scale * eigenvalues.shape[0] * torch.finfo(eigenvalues.dtype).eps
    if eigenvalues.numel() and float(eigenvalues.min()) < -10 * max(tolerance, 1e-12 * scale):
        raise ValueError(
            f"{what} is not positive semi-definite (smallest eigenvalue "
            f"{float(eigenvalues.min()):.3g}); pass diag_reg > 0"
        )
    return tolerance


class Spectrum:
    """Eigendecomposition of a regularised training kernel ``T + diag_reg I``, once.

    Eigenvalues below ``N eps`` times the largest are treated as zero: gradient flow
    does not move along them, and at ``t = inf`` their component is dropped (the
    minimum-norm solution). A clearly negative eigenvalue raises a ``ValueError``.
    """

    def __init__(self, k: Tensor, diag_reg: float, what: str) -> None:
        k = 0.5 * (k + k.T) + diag_reg * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)
        eigenvalues, self.vectors = torch.linalg.eigh(k)
        tolerance = check_positive_semidefinite(eigenvalues, what)
        self.values = torch.where(eigenvalues > tolerance, eigenvalues,
                                  torch.zeros_like(eigenvalues))


def spectral_filters(
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


def as_times(t: object) -> tuple[Tensor, bool]:
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


def as_initial(value: object, shape: tuple[int, int], name: str) -> Tensor:
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
