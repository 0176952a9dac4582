r"""Gaussian expectations ``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[q1, c], [c, q2]])``.

These are the NNGP maps (``f = g = phi``) and the NTK derivative maps
(``f = g = phi'``) of elementwise activations: closed forms where they exist,
Gauss--Hermite quadrature for any other function. Every function takes tensors
that broadcast against each other: the variances ``q1``, ``q2``, the covariance
``c`` and the correlation ``rho = c / sqrt(q1 q2)`` (see :func:`correlation`), so
that the caller computes ``rho`` once and can set it to exactly 1 on a diagonal.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

Tensor = torch.Tensor


def correlation(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
    """``rho = c / sqrt(q1 q2)`` clipped into [-1, 1]; 0 where a variance is 0."""
    prod = q1 * q2
    positive = prod > 0
    rho = c / torch.sqrt(torch.where(positive, prod, torch.ones_like(prod)))
    return torch.where(positive, rho.clamp(-1.0, 1.0), torch.zeros_like(rho))


def snapped_correlation(q1: Tensor, q2: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """``(rho, c)`` with correlations within rounding of +-1 set to exactly +-1.

    Two identical inputs reach a layer with ``c = sqrt(q1 q2) (1 +- few eps)``, not
    exactly, because the covariance and the variances are summed in different orders.
    In a chaotic regime deep networks amplify that rounding noise exponentially, so
    such correlations (within ``16 eps`` of +-1) are snapped to +-1 and ``c`` to
    ``+-sqrt(q1 q2)``: a change within rounding, which keeps identical inputs identical.
    """
    return snap_to_unit(q1, q2, c, correlation(q1, q2, c))


def snap_tolerance(dtype: torch.dtype) -> float:
    """How close to +-1 a correlation is snapped: ``16 eps`` of ``dtype``."""
    return 16 * torch.finfo(dtype).eps


def snap_to_unit(q1: Tensor, q2: Tensor, c: Tensor, rho: Tensor) -> tuple[Tensor, Tensor]:
    """``(rho, c)`` with the correlations within :func:`snap_tolerance` of +-1 set to
    exactly +-1 and their covariances to ``+-sqrt(q1 q2)`` (see
    :func:`snapped_correlation`); unchanged tensors if there are none."""
    snap = (1.0 - rho.abs()) <= snap_tolerance(rho.dtype)
    if bool(snap.any()):
        rho = torch.where(snap, torch.sign(rho), rho)
        c = torch.where(snap, rho * torch.sqrt(q1 * q2), c)
    return rho, c


def _sin_angle(rho: Tensor) -> Tensor:
    """``sin(arccos(rho)) = sqrt((1 - rho)(1 + rho))``, accurate near |rho| = 1."""
    return torch.sqrt(((1.0 - rho) * (1.0 + rho)).clamp_min(0.0))


def arc_cosine_j(order: int, rho: Tensor) -> Tensor:
    r"""The angular part ``J_n(theta)`` of the arc-cosine kernel (Cho & Saul 2009).

    ``E[relu(u)^n relu(v)^n] = (q1 q2)^{n/2} J_n(theta) / (2 pi)`` with
    ``theta = arccos(rho)``. For ``rho >= 0`` it uses ``J_0 = pi - theta``,
    ``J_1 = sin(theta) + (pi - theta) cos(theta)`` and the recurrence
    ``J_n = (2n - 1) cos(theta) J_{n-1} + (n - 1)^2 sin(theta)^2 J_{n-2}``, which gives
    ``J_n(0) = pi (2n - 1)!!`` exactly. The recurrence cancels catastrophically as
    ``rho -> -1`` (where ``J_n`` vanishes like ``(pi - theta)^{2n+1}``), so for
    ``rho < 0`` it uses the integral of positive terms (polar coordinates)
    ``J_n = 2^n n! int_{theta - pi/2}^{pi/2} cos(a)^n cos(a - theta)^n da`` by
    Gauss--Legendre quadrature, exact to rounding for this trigonometric polynomial.
    """
    theta = torch.arccos(rho)
    j_prev = math.pi - theta
    if order == 0:
        return j_prev
    sin_t = _sin_angle(rho)
    j_curr = sin_t + j_prev * rho
    sin_sq = sin_t * sin_t
    for n in range(2, order + 1):
        j_prev, j_curr = j_curr, (2 * n - 1) * rho * j_curr + (n - 1) ** 2 * sin_sq * j_prev
    negative = rho < 0
    if bool(negative.any()):
        j_curr = j_curr.clone()
        j_curr[negative] = _arc_cosine_j_integral(order, theta[negative])
    return j_curr


def _arc_cosine_j_integral(order: int, theta: Tensor) -> Tensor:
    """``J_n(theta)`` as the positive angular integral (see :func:`arc_cosine_j`)."""
    nodes, weights = np.polynomial.legendre.leggauss(2 * order + 16)
    nodes = torch.as_tensor(nodes, dtype=theta.dtype, device=theta.device)
    weights = torch.as_tensor(weights, dtype=theta.dtype, device=theta.device)
    half = (math.pi - theta[:, None]) / 2
    angle = theta[:, None] / 2 + half * nodes
    integrand = (torch.cos(angle) * torch.cos(angle - theta[:, None])) ** order
    return (2**order * math.factorial(order)) * half[:, 0] * (integrand @ weights)


def rectified_monomial_moments(order: int, q1: Tensor, q2: Tensor, rho: Tensor) -> Tensor:
    r"""``E[max(u,0)^n max(v,0)^n] = (q1 q2)^{n/2} J_n(theta) / (2 pi)`` (Cho & Saul 2009)."""
    angular = arc_cosine_j(order, rho) / (2 * math.pi)
    if order == 0:
        return angular.expand(torch.broadcast_shapes(q1.shape, q2.shape, rho.shape))
    return (q1 * q2) ** (order / 2) * angular


def ab_relu_maps(
    a: float, b: float, q1: Tensor, q2: Tensor, rho: Tensor, with_derivative: bool = True
) -> tuple[Tensor, Tensor | None]:
    r"""Both maps of ``phi(x) = a min(x, 0) + b max(x, 0)``, sharing one ``arccos``.

    Writing ``phi = b relu(x) - a relu(-x)`` and using the arc-cosine kernel of order 1
    (Cho & Saul 2009) for each of the four terms, with ``theta = arccos(rho)``::

        E[phi(u) phi(v)]   = sqrt(q1 q2) [(a - b)^2 (sin(theta) + (pi - theta) rho) / (2 pi)
                                          + a b rho]
        E[phi'(u) phi'(v)] = (a - b)^2 (pi - theta) / (2 pi) + a b

    Covers ReLU (a=0, b=1), LeakyReLU (a=slope, b=1) and Abs (a=-1, b=1). ``rho`` has
    the broadcast shape of all arguments and is not changed; the results are fresh
    tensors (the derivative map ``None`` unless ``with_derivative``). Computed in a few
    in-place passes: ``pi - theta = arccos(-rho)`` (accurate near ``rho = -1``, where
    the maps vanish) and ``sin(theta) = sin(pi - theta)``.
    """
    angle_from_pi = torch.neg(rho).arccos_()  # pi - theta
    scale = (a - b) ** 2 / (2 * math.pi)
    moments = torch.sin(angle_from_pi).addcmul_(angle_from_pi, rho)
    if a * b == 0:
        moments.mul_(torch.sqrt(q1) * scale).mul_(torch.sqrt(q2))
    else:
        moments.mul_(scale).add_(rho, alpha=a * b).mul_(torch.sqrt(q1)).mul_(torch.sqrt(q2))
    if not with_derivative:
        return moments, None
    derivative = angle_from_pi.mul_(scale)
    if a * b != 0:
        derivative.add_(a * b)
    return moments, derivative


def sign_moments(rho: Tensor) -> Tensor:
    r"""``E[sign(u) sign(v)] = (2 / pi) arcsin(rho)`` (Grothendieck's identity)."""
    return (2 / math.pi) * torch.arcsin(rho)


def erf_maps(
    b: float, q1: Tensor, q2: Tensor, c: Tensor, with_derivative: bool = True
) -> tuple[Tensor, Tensor | None]:
    r"""Both maps of ``erf(b x)`` (Williams 1997, "Computing with infinite networks").

    With ``s = 2 b^2`` and ``d_i = 1 + s q_i``::

        E[erf(b u) erf(b v)]   = (2 / pi) arcsin(s c / sqrt(d1 d2))
        E[erf'(b u) erf'(b v)] = (2 s / pi) / sqrt(d1 d2 - s^2 c^2)

    the second because ``d/dx erf(b x) = (2 b / sqrt(pi)) exp(-b^2 x^2)`` and
    ``E[exp(-b^2 (u^2 + v^2))] = det(I + 2 b^2 Sigma)^{-1/2}``. The determinant is
    ``>= 1`` for a covariance and is clipped there against rounding. ``c`` has the
    broadcast shape of all arguments and is not changed; the results are fresh tensors
    (the derivative map ``None`` unless ``with_derivative``).
    """
    s = 2 * b * b
    d1, d2 = 1 + s * q1, 1 + s * q2
    arg = torch.mul(c, s * torch.rsqrt(d1)).mul_(torch.rsqrt(d2)).clamp_(-1.0, 1.0)
    moments = arg.arcsin_().mul_(2 / math.pi)
    if not with_derivative:
        return moments, None
    derivative = torch.addcmul(d1 * d2, c, c, value=-s * s).clamp_min_(1.0).rsqrt_()
    return moments, derivative.mul_(2 * s / math.pi)


def sin_moments(b: float, phase: float, q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
    r"""``E[sin(b u + phase) sin(b v + phase)]``.

    With ``sin x sin y = (cos(x - y) - cos(x + y)) / 2`` and
    ``E[cos(w + t)] = exp(-Var(w) / 2) cos(t)`` for Gaussian ``w``:
    ``(exp(-b^2 (q1 + q2 - 2c) / 2) - cos(2 phase) exp(-b^2 (q1 + q2 + 2c) / 2)) / 2``.
    The derivative map of ``sin`` is this with ``phase + pi/2`` (cosine), times ``b^2``.
    """
    half_b2 = 0.5 * b * b
    total = q1 + q2
    return 0.5 * (
        torch.exp(-half_b2 * (total - 2 * c))
        - math.cos(2 * phase) * torch.exp(-half_b2 * (total + 2 * c))
    )


def gelu_moments(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
    r"""``E[g(u) g(v)]`` for the exact GELU ``g(x) = x Phi(x)``.

    Obtained by integrating the derivative map (Price's theorem,
    ``d/dc E[g(u) g(v)] = E[g'(u) g'(v)]``) from ``c = 0``, where it equals
    ``E[g(u)] E[g(v)]`` with ``E[u Phi(u)] = q / sqrt(2 pi (1 + q))``. With
    ``s^2 = (1 + q1)(1 + q2)`` and ``D = s^2 - c^2``:
    ``c/4 + c arcsin(c/s) / (2 pi) + (sqrt(D) (q1 q2 - 1) / s^2 + 1 / sqrt(D)) / (2 pi)``.
    """
    s_sq = (1 + q1) * (1 + q2)
    det = (s_sq - c * c).clamp_min(1.0)
    root_det = torch.sqrt(det)
    arcsin = torch.arcsin((c / torch.sqrt(s_sq)).clamp(-1.0, 1.0))
    return c / 4 + (c * arcsin + root_det * (q1 * q2 - 1) / s_sq + 1 / root_det) / (2 * math.pi)


def gelu_derivative_moments(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
    r"""``E[g'(u) g'(v)]`` for ``g'(x) = Phi(x) + x phi(x)`` (exact GELU).

    Writing ``Phi(u) = P(z <= u)`` for an independent standard normal ``z`` and
    tilting the Gaussian by ``phi``: with ``s^2 = (1 + q1)(1 + q2)``, ``D = s^2 - c^2``,
    ``1/4 + arcsin(c/s) / (2 pi) + c (2 + q1 + q2) / (2 pi s^2 sqrt(D)) + c / (2 pi D^{3/2})``.
    """
    s_sq = (1 + q1) * (1 + q2)
    det = (s_sq - c * c).clamp_min(1.0)
    root_det = torch.sqrt(det)
    arcsin = torch.arcsin((c / torch.sqrt(s_sq)).clamp(-1.0, 1.0))
    return 0.25 + (arcsin + c * (2 + q1 + q2) / (s_sq * root_det) + c / (det * root_det)) / (
        2 * math.pi
    )


def hermite_rule(degree: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Nodes and weights of ``degree``-point Gauss--Hermite quadrature for N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    weights = weights / math.sqrt(2 * math.pi)
    return (
        torch.as_tensor(nodes, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


def quadrature_moments(
    f: Callable[[Tensor], Tensor],
    g: Callable[[Tensor], Tensor],
    q1: Tensor,
    q2: Tensor,
    rho: Tensor,
    degree: int,
    max_elements: int = 1 << 23,
) -> Tensor:
    r"""``E[f(u) g(v)]`` by ``degree x degree``-point Gauss--Hermite quadrature.

    With ``z1, z2`` independent standard normals, ``u = sqrt(q1) z1`` and
    ``v = sqrt(q2) (rho z1 + sqrt(1 - rho^2) z2)``. The rule is exact for
    polynomials of degree ``< 2 * degree`` in each variable; for smooth functions of
    moderate growth the error falls exponentially with ``degree``. All ``degree^2`` nodes are
    evaluated at once, in slices of the entries so that at most ``max_elements``
    values of ``g`` are held at a time.
    """
    shape = torch.broadcast_shapes(q1.shape, q2.shape, rho.shape)
    q1, q2, rho = (t.expand(shape) for t in (q1, q2, rho))
    nodes, weights = hermite_rule(degree, rho.dtype, rho.device)
    flat = [t.reshape(-1) for t in (torch.sqrt(q1), torch.sqrt(q2), rho, _sin_angle(rho))]
    out = torch.empty(flat[0].shape, dtype=rho.dtype, device=rho.device)
    step = max(1, max_elements // (degree * degree))
    for start in range(0, out.numel(), step):
        sd1, sd2, r, rest = (t[start : start + step, None, None] for t in flat)
        u = sd1[:, :, 0] * nodes  # (entries, i)
        v = sd2 * (r * nodes[:, None] + rest * nodes[None, :])  # (entries, i, j)
        inner = g(v) @ weights  # sum over j
        out[start : start + step] = (f(u) * inner) @ weights
    return out.reshape(shape)
