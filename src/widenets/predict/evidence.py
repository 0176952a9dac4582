r"""The Gaussian marginal likelihood (the evidence) of a network's kernel."""

from __future__ import annotations

import math

import torch

from ..inputs import check_nonnegative
from .common import (
    KernelSource,
    TrainingKernels,
    check_get,
    cholesky,
    point_targets,
    training_targets,
)

Tensor = torch.Tensor


def _regularisation(diag_reg: object) -> tuple[Tensor | float, float]:
    """``diag_reg`` checked to be a finite number >= 0 (a tensor on its value, keeping it
    and its graph), and its value."""
    if not isinstance(diag_reg, torch.Tensor):
        value = check_nonnegative(diag_reg, "diag_reg")
        return value, value
    if diag_reg.dtype == torch.bool or diag_reg.is_complex() or diag_reg.ndim != 0:
        raise TypeError(
            f"diag_reg must be a number or a 0-d real tensor >= 0, got {diag_reg!r}"
        )
    return diag_reg, check_nonnegative(float(diag_reg.detach()), "diag_reg")


def marginal_log_likelihood(
    net_or_kernel_fn: KernelSource,
    x: object,
    y: object,
    get: str = "nngp",
    diag_reg: float | Tensor = 0.0,
    *,
    mask: object | None = None,
    adjacency: object | None = None,
) -> Tensor:
    r"""The log marginal likelihood (the evidence) of targets ``y`` under the Gaussian
    process of a network's kernel.

    ``net_or_kernel_fn``: an architecture (its ``kernel``), or any function
    ``kernel_fn(x1, x2, get) -> (N1, N2)`` tensor (``x2=None`` meaning ``x1``), as for
    :func:`gp_inference`. ``get`` picks the kernel ``K = K(x, x)`` (``"nngp"``: the
    prior of the Bayesian network; ``"ntk"``: the NTK used as a GP covariance).

    ``y`` is ``(N,)`` or ``(N, outputs)``; the outputs are independent and share the
    kernel, so with ``A = K + diag_reg I`` (``diag_reg``: the variance of the
    observation noise) the result is the sum over outputs ``k`` of
    ``log N(y_k | 0, A)`` (Rasmussen & Williams 2006, *Gaussian Processes for Machine
    Learning*, eq. 2.30)::

        sum_k  -1/2 y_k^T A^{-1} y_k  -  1/2 log det A  -  N/2 log(2 pi)

    ``diag_reg`` is a number or a 0-d tensor, >= 0; a tensor that requires grad is
    checked on its value. The result is a 0-d float64 tensor, computed in float64 from
    a Cholesky factor of ``A``, and differentiable with respect to everything that
    requires grad: ``diag_reg``, ``y``, ``x`` and whatever the kernel depends on (a
    kernel function's parameters, or an architecture's, where its kernel is
    differentiable in them). An ``A`` that is not positive definite (duplicate inputs,
    or a kernel of low rank, with too small a ``diag_reg``) raises a ``ValueError``
    suggesting a larger ``diag_reg``; the result is never NaN.

    ``mask`` and ``adjacency``: those of ``x`` (as ``mask1``, ``adjacency1`` of
    ``net.kernel``). A network whose outputs keep their positions ``P`` takes ``y`` as
    ``(N, *P)`` or ``(N, *P, outputs)``: every (example, position) is a point.

    Maximising it fits the kernel's hyperparameters and the noise (type-II maximum
    likelihood), with positivity through ``softplus`` (or ``exp``) of unconstrained
    parameters::

        raw_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
        raw_noise = torch.zeros((), dtype=torch.float64, requires_grad=True)
        softplus = torch.nn.functional.softplus

        def kernel_fn(x1, x2, get):
            x2 = x1 if x2 is None else x2
            return softplus(raw_scale) * (x1 @ x2.T) / x1.shape[1]

        optimizer = torch.optim.Adam([raw_scale, raw_noise], lr=0.05)
        for _ in range(300):
            optimizer.zero_grad()
            loss = -wn.predict.marginal_log_likelihood(
                kernel_fn, x, y, diag_reg=softplus(raw_noise))
            loss.backward()
            optimizer.step()
    """
    kernels = TrainingKernels(net_or_kernel_fn, (mask, adjacency))
    name = check_get(get)
    xt, y_rows = training_targets(x, y, "y", "x")
    reg, reg_value = _regularisation(diag_reg)
    k = kernels(xt, None, (name,), (mask, adjacency))[name]
    yt = point_targets(y_rows, kernels.positions, "y")[0]
    yt = yt.to(device=k.device, dtype=torch.float64)
    eye = torch.eye(k.shape[0], dtype=torch.float64, device=k.device)
    if isinstance(reg, torch.Tensor):
        reg = reg.to(device=k.device, dtype=torch.float64)
    a = 0.5 * (k + k.T) + reg * eye
    try:
        chol = cholesky(a, f"{name.upper()} kernel K(x, x)")
    except ValueError:
        if reg_value == 0:
            raise  # the message suggests diag_reg > 0
        raise ValueError(
            f"the {name.upper()} kernel plus diag_reg I is not positive definite with "
            f"diag_reg={reg_value:.3g} (duplicate inputs, a kernel of low rank, or one "
            "that is not positive semi-definite); pass a larger diag_reg"
        ) from None
    n, outputs = yt.shape
    whitened = torch.linalg.solve_triangular(chol, yt, upper=False)  # L^{-1} y
    log_det = 2.0 * torch.log(chol.diagonal()).sum()
    mll = (-0.5 * (whitened**2).sum() - 0.5 * outputs * log_det
           - 0.5 * n * outputs * math.log(2 * math.pi))
    if not bool(torch.isfinite(mll)):
        raise ValueError(
            f"the marginal log-likelihood is not finite ({float(mll.detach())}): the kernel or the "
            "targets overflow float64"
        )
    return mll
