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
from typing import Any, cast

import numpy as np
import torch
from torch.autograd import forward_ad

Tensor = torch.Tensor


def records_gradients(*tensors: Tensor) -> bool:
    """Whether autograd records operations on these tensors (then the maps avoid the
    in-place updates that save memory and time otherwise)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def undifferentiated(q: Tensor) -> bool:
    """Whether no derivative of ``q`` is taken: it does not require gradients, and is
    neither a ``torch.func`` transform's tensor nor seen inside a forward-mode level."""
    return (not q.requires_grad and forward_ad._current_level < 0
            and not is_functorch_wrapped(q))


def is_functorch_wrapped(tensor: Tensor) -> bool:
    """Whether ``tensor`` is seen through a ``torch.func`` transform (``grad``, ``jvp``,
    ``vmap``): a wrapper without storage, whose values cannot decide anything."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped is not None and is_wrapped(tensor))


def inverse_sqrt(q: Tensor) -> Tensor:
    """``1 / sqrt(q)``, and 0 where the variance ``q`` is 0 (the correlation is then 0).

    The square root is taken of 1 where ``q`` is 0: otherwise its infinite derivative
    there, times the zero that ``where`` passes back, would make a NaN gradient. Without
    derivatives the same values come in two operations instead of six (the kernel rules
    call this on small tensors, where each operation's cost is its overhead)."""
    if undifferentiated(q):
        return torch.rsqrt(q).nan_to_num_(0.0, 0.0, 0.0)  # 0 for q <= 0 (and NaN)
    positive = q > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, q, 1.0)), 0.0)


def root_variance(q: Tensor) -> Tensor:
    """``sqrt(q)`` of a variance, with gradient 0 (not infinite) where ``q`` is 0.

    A position of variance exactly 0 (a masked one, or an input position that is exactly
    0 with no bias before it) then passes finite gradients. For a masked position they
    are exact (the entry is multiplied by 0). For an unmasked zero position the maps,
    written in variances and correlations, see a cone point (``sqrt(q) = |x|``) and take
    0 for the derivatives through ``sqrt(q)`` and through the correlation (see
    :func:`inverse_sqrt`): the mean of the one-sided values for the ReLU family, whose
    kernel is not differentiable there, but a missing term for activations whose kernel
    is smooth there (``Sin``, ``Cos``, ``Rbf``, ``Erf`` with a shift, ...). Without
    derivatives, the same values in two operations (see :func:`inverse_sqrt`)."""
    if undifferentiated(q):
        return torch.sqrt(q).nan_to_num_(0.0, math.inf)  # 0 for q < 0 (and NaN)
    positive = q > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, q, 1.0)), 0.0)


def geometric_mean(q1: Tensor, q2: Tensor) -> Tensor:
    """``sqrt(q1 q2)`` for variances ``q1, q2 >= 0``, as ``max sqrt(min / max)``: no overflow
    or underflow of the product, and exactly ``q`` when ``q1 = q2 = q``."""
    high, low = torch.maximum(q1, q2), torch.minimum(q1, q2)
    positive = high > 0  # (a safe divisor elsewhere: see inverse_sqrt)
    return torch.where(positive, high * torch.sqrt(low / torch.where(positive, high, 1.0)), 0.0)


def correlation(q1: Tensor, q2: Tensor, c: Tensor) -> Tensor:
    """``rho = c / sqrt(q1 q2)`` clipped into [-1, 1]; 0 where a variance is 0.

    Each variance is inverted on its own: ``q1 q2`` would overflow (or underflow) long
    before the variances themselves do.
    """
    return (c * inverse_sqrt(q1) * inverse_sqrt(q2)).clamp(-1.0, 1.0)


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
        if records_gradients(q1, q2, c):
            # the same values; the gradient of c kept as it is: at a correlation of +-1 it
            # equals that of +-sqrt(q1 q2) to first order (the correlation is extremal)
            with torch.no_grad():
                correction = torch.where(snap, rho * geometric_mean(q1, q2) - c, 0.0)
            c = c + correction
        else:
            c = torch.where(snap, rho * geometric_mean(q1, q2), c)
    return rho, c


#: ``arccos_`` uses NumPy's arccos while torch computes on at most this many threads.
NUMPY_ARCCOS_THREADS = 3


def arccos_(values: Tensor) -> Tensor:
    """``values.arccos_()``, by NumPy on the CPU while torch has at most
    :data:`NUMPY_ARCCOS_THREADS` threads. NumPy's vectorised arccos (SVML on AVX-512) is
    3.2 times faster per thread than torch's on float64, and both are within 1 ulp of the
    exact value (measured against mpmath at 120 bits, uniform and near +-1): on one
    thread it beats torch's on three. Tensors of ``torch.func`` transforms keep torch's."""
    if (values.device.type == "cpu" and values.is_contiguous() and not values.requires_grad
            and values.dtype in (torch.float32, torch.float64)
            and torch.get_num_threads() <= NUMPY_ARCCOS_THREADS):
        try:
            array = values.numpy()
        except RuntimeError:  # a torch.func wrapper (grad, jvp, vmap) has no storage
            return values.arccos_()
        np.arccos(array, out=array)
        return values
    return values.arccos_()


def _sin_angle(rho: Tensor) -> Tensor:
    """``sin(arccos(rho)) = sqrt((1 - rho)(1 + rho))``, accurate near |rho| = 1 (and
    cheaper than ``torch.sin`` of the angle); in place on its own temporaries."""
    return torch.rsub(rho, 1.0).mul_(torch.add(rho, 1.0)).clamp_min_(0.0).sqrt_()


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
    legendre_nodes, legendre_weights = np.polynomial.legendre.leggauss(2 * order + 16)
    nodes = torch.as_tensor(legendre_nodes, dtype=theta.dtype, device=theta.device)
    weights = torch.as_tensor(legendre_weights, dtype=theta.dtype, device=theta.device)
    half = (math.pi - theta[:, None]) / 2
    angle = theta[:, None] / 2 + half * nodes
    integrand = (torch.cos(angle) * torch.cos(angle - theta[:, None])) ** order
    return (2**order * math.factorial(order)) * half[:, 0] * (integrand @ weights)


def rectified_monomial_moments(order: int, q1: Tensor, q2: Tensor, rho: Tensor) -> Tensor:
    r"""``E[max(u,0)^n max(v,0)^n] = (q1 q2)^{n/2} J_n(theta) / (2 pi)`` (Cho & Saul 2009).

    Order 0 is the step ``1[x > 0]``, discontinuous at 0: where a variance is 0 that input
    is exactly 0 and the moment is 0 (not the limit 1/2 or 1/4 of small variances).
    """
    angular = arc_cosine_j(order, rho) / (2 * math.pi)
    if order == 0:
        return angular * _both_nonzero(q1, q2)
    return _half_power(q1, order) * _half_power(q2, order) * angular


def _half_power(q: Tensor, order: int) -> Tensor:
    """``q^(order / 2)`` of a variance, differentiable at 0 as :func:`root_variance`."""
    whole = q ** (order // 2) if order > 1 else torch.ones_like(q)
    return whole * root_variance(q) if order % 2 else whole


def _both_nonzero(q1: Tensor, q2: Tensor) -> Tensor:
    """1 where both variances are positive, else 0 (an input of variance 0 is exactly 0)."""
    return ((q1 > 0) & (q2 > 0)).to(q1.dtype)


def ab_relu_maps(
    a: float | Tensor,
    b: float | Tensor,
    q1: Tensor,
    q2: Tensor,
    rho: Tensor,
    with_derivative: bool = True,
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
    the maps vanish) and ``sin(theta) = sqrt((1 - rho)(1 + rho))``.

    While autograd records (and ``a``, ``b`` are constants) the maps go through
    :class:`ABReLUMaps`, whose backward pass is written out.
    """
    if records_gradients(q1, q2, rho) and not records_gradients(
            *[v for v in (a, b) if isinstance(v, Tensor)]):
        moments, derivative = ABReLUMaps.apply(q1, q2, rho, float(a), float(b))
        return moments, derivative if with_derivative else None
    angle_from_pi = arccos_(torch.neg(rho))  # pi - theta
    scale = (a - b) ** 2 / (2 * math.pi)
    sin_angle = _sin_angle(rho)  # (its backward needs it, while hyperparameters record)
    moments = (torch.addcmul(sin_angle, angle_from_pi, rho) if sin_angle.requires_grad
               else sin_angle.addcmul_(angle_from_pi, rho))
    if a * b == 0:
        moments.mul_(root_variance(q1) * scale).mul_(root_variance(q2))
    else:
        product = a * b
        if isinstance(product, Tensor):  # (alpha= takes only a number)
            moments = (moments * scale + product * rho) * root_variance(q1) * root_variance(q2)
        else:
            moments.mul_(scale).add_(rho, alpha=product).mul_(root_variance(q1)).mul_(
                root_variance(q2))
    if not with_derivative:
        return moments, None
    derivative = angle_from_pi.mul_(scale)
    if a * b != 0:
        derivative.add_(a * b)
    return moments, derivative


class ABReLUMaps(torch.autograd.Function):
    r"""The maps of :func:`ab_relu_maps` with their derivatives written out: autograd keeps
    the inputs and the NNGP map instead of every intermediate result, and the outputs may
    be updated in place.

    With ``F(rho) = (a - b)^2 (sin(theta) + (pi - theta) rho) / (2 pi) + a b rho`` the NNGP
    map is ``M = sqrt(q1 q2) F`` and the derivative map ``D = F'(rho)``, so::

        dM/drho = sqrt(q1 q2) D          (Price's theorem)
        dM/dq1  = M / (2 q1)             (rho held fixed)
        dD/drho = (a - b)^2 / (2 pi sin(theta))

    The last is infinite at ``rho = +-1`` (identical inputs), where the map has a kink in
    the angle between the inputs: there it is 0 (the mean of the two one-sided
    derivatives); ``dM/dq1`` is 0 where ``q1 = 0``.
    """

    @staticmethod
    def forward(q1: Tensor, q2: Tensor, rho: Tensor, a: float, b: float) -> tuple[Tensor, Tensor]:
        """The NNGP and derivative maps, computed by the fast in-place code."""
        with torch.no_grad():
            moments, derivative = ab_relu_maps(a, b, q1, q2, rho)
        return moments, cast(Tensor, derivative)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        """Keep the inputs and both maps for the backward pass (callers update the NNGP
        map in place, so it is copied; they leave the derivative map alone while
        recording)."""
        q1, q2, rho, a, b = inputs
        ctx.save_for_backward(q1, q2, rho, output[0].clone(), output[1])
        ctx.ab = (a, b)

    @staticmethod
    def backward(ctx: Any, grad_moments: Tensor,
                 grad_derivative: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients of the inputs, from the formulas above."""
        q1, q2, rho, moments, derivative = ctx.saved_tensors
        a, b = ctx.ab
        scale = (a - b) ** 2 / (2 * math.pi)
        scaled = grad_moments * moments  # dM/dq_i = M / (2 q_i), q_i constant where summed
        grad_q1 = scaled.sum_to_size(q1.shape)
        grad_q1 = torch.where(q1 > 0, grad_q1 / (2 * q1), 0.0)
        grad_q2 = scaled.sum_to_size(q2.shape)
        grad_q2 = torch.where(q2 > 0, grad_q2 / (2 * q2), 0.0)
        # scale / sin(theta), and 0 where sin(theta) = 0 (rsqrt gives inf there, or nan
        # for a product rounded below 0)
        kink = torch.nan_to_num(torch.rsqrt((1.0 - rho) * (1.0 + rho)), 0.0, 0.0, 0.0) * scale
        grad_rho = (grad_moments * torch.sqrt(q1) * torch.sqrt(q2)).mul_(derivative)
        grad_rho.addcmul_(grad_derivative, kink)
        return grad_q1, grad_q2, grad_rho.sum_to_size(rho.shape), None, None


def sign_moments(q1: Tensor, q2: Tensor, rho: Tensor) -> Tensor:
    r"""``E[sign(u) sign(v)] = (2 / pi) arcsin(rho)`` (Grothendieck's identity), and 0 where
    a variance is 0 (``sign(0) = 0``: that input is exactly 0)."""
    return (2 / math.pi) * torch.arcsin(rho) * _both_nonzero(q1, q2)


def _scaled_determinant(
    s: float | Tensor, q1: Tensor, q2: Tensor, rho: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``det(I + s Sigma) = (1 + s q1)(1 + s q2) - s^2 c^2`` without cancellation or
    overflow, for the covariance ``Sigma = [[q1, c], [c, q2]]`` with ``c = rho sqrt(q1 q2)``.

    Multiplied out, the determinant is ``1 + s q1 + s q2 + s^2 q1 q2 (1 - rho^2)``: a sum
    of non-negative terms, exact on a diagonal (``rho = 1``), where the textbook form
    subtracts two nearly equal numbers of size ``(s q)^2`` (for ``s q = 1e16`` in float64
    nothing of the true ``1 + 2 s q`` survives). Each variance is scaled by
    ``m_i = max(1, s q_i)`` so that no product overflows: returns ``(det / (m1 m2), r1,
    r2)`` with ``r_i = m_i^{-1/2}``, so ``sqrt(det) = sqrt(scaled) / (r1 r2)``.
    """
    sq1, sq2 = s * q1, s * q2
    m1, m2 = sq1.clamp_min(1.0), sq2.clamp_min(1.0)
    u1, u2 = sq1 / m1, sq2 / m2  # s q_i / m_i, in [0, 1]
    v1, v2 = 1.0 / m1, 1.0 / m2  # 1 / m_i, in (0, 1]
    one = torch.ones((), dtype=rho.dtype, device=rho.device)
    scaled = torch.addcmul(one, rho, rho, value=-1.0)
    if records_gradients(scaled, u1, u2, v1, v2):  # the same sum, without in-place updates
        scaled = scaled * u1 * u2 + v1 * (v2 + u2) + u1 * v2
    else:
        scaled.mul_(u1).mul_(u2).addcmul_(v1, v2 + u2).addcmul_(u1, v2)
    return scaled, torch.rsqrt(m1), torch.rsqrt(m2)


def erf_maps(
    b: float | Tensor,
    q1: Tensor,
    q2: Tensor,
    c: Tensor,
    rho: Tensor,
    with_derivative: bool = True,
) -> tuple[Tensor, Tensor | None]:
    r"""Both maps of ``erf(b x)`` (Williams 1997, "Computing with infinite networks").

    With ``s = 2 b^2``, ``d_i = 1 + s q_i`` and ``D = d1 d2 - s^2 c^2 = det(I + s Sigma)``::

        E[erf(b u) erf(b v)]   = (2 / pi) arcsin(s c / sqrt(d1 d2)) = (2 / pi) atan2(s c, sqrt(D))
        E[erf'(b u) erf'(b v)] = (2 s / pi) / sqrt(D)

    the second because ``d/dx erf(b x) = (2 b / sqrt(pi)) exp(-b^2 x^2)`` and
    ``E[exp(-b^2 (u^2 + v^2))] = D^{-1/2}``. ``D`` comes from
    ``_scaled_determinant`` (no cancellation, no overflow), and ``atan2`` keeps the
    NNGP accurate where the arcsine's argument rounds to 1 (large inputs). ``c`` and
    ``rho`` have the broadcast shape of all arguments and are not changed; the results
    are fresh tensors (the derivative map ``None`` unless ``with_derivative``).
    """
    if records_gradients(q1, q2, c) and not (isinstance(b, Tensor) and b.requires_grad):
        moments, derivative = ErfMaps.apply(q1, q2, c, rho.detach(), float(b))
        return moments, derivative if with_derivative else None
    s = 2 * b * b
    scaled, r1, r2 = _scaled_determinant(s, q1, q2, rho)
    if records_gradients(scaled, c):  # the same maps, without in-place updates
        root = scaled.sqrt()
        moments = torch.atan2(c * (s * r1) * r2, root) * (2 / math.pi)
        derivative = (2 * s / math.pi) * r1 * r2 / root if with_derivative else None
        return moments, derivative
    root = scaled.sqrt_()  # sqrt(D) r1 r2
    moments = torch.mul(c, s * r1).mul_(r2).atan2_(root).mul_(2 / math.pi)
    if not with_derivative:
        return moments, None
    derivative = root.reciprocal_().mul_((2 * s / math.pi) * r1).mul_(r2)
    return moments, derivative


class ErfMaps(torch.autograd.Function):
    r"""The maps of :func:`erf_maps` with their derivatives written out, as functions of
    ``(q1, q2, c)`` (``rho`` only serves the accuracy of ``D``). With ``s = 2 b^2``,
    ``d_i = 1 + s q_i``, ``R = D^{-1/2}``, ``M`` the NNGP map and ``E = (2 s / pi) R`` the
    derivative map::

        dM/dc  = E                        (Price's theorem)
        dM/dq1 = -(s^2 / pi) c R / d1
        dE/dc  = E s^2 c R^2
        dE/dq1 = -(s / 2) E d2 R^2

    each written so that no intermediate overflows (``R`` is small where ``d_i`` and ``c``
    are large).
    """

    @staticmethod
    def forward(q1: Tensor, q2: Tensor, c: Tensor, rho: Tensor, b: float) -> tuple[Tensor, Tensor]:
        """The NNGP and derivative maps, computed by the fast in-place code."""
        with torch.no_grad():
            moments, derivative = erf_maps(b, q1, q2, c, rho)
        return moments, cast(Tensor, derivative)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        """Keep the inputs and the derivative map ``E`` (from which ``R`` follows) for the
        backward pass."""
        q1, q2, c, _, b = inputs
        ctx.save_for_backward(q1, q2, c, output[1])
        ctx.b = b

    @staticmethod
    def backward(ctx: Any, grad_moments: Tensor,
                 grad_derivative: Tensor) -> tuple[Tensor | None, ...]:
        """The gradients of the inputs, from the formulas above."""
        q1, q2, c, derivative = ctx.saved_tensors
        s = 2 * ctx.b * ctx.b
        # R = D^{-1/2}; with s = 0 every term below carries a factor s or E = 0
        r = derivative * (math.pi / (2 * s)) if s > 0 else torch.zeros_like(derivative)
        c_r2 = c * r * r
        grad_c = grad_moments * derivative + grad_derivative * derivative * (s * s) * c_r2
        common_d = grad_derivative * derivative * r * r * (-s / 2)  # times d_other
        common_m = grad_moments * (-(s * s) / math.pi) * c * r  # divided by d_self
        grad_q1 = common_m / (1 + s * q1) + common_d * (1 + s * q2)
        grad_q2 = common_m / (1 + s * q2) + common_d * (1 + s * q1)
        return (grad_q1.sum_to_size(q1.shape), grad_q2.sum_to_size(q2.shape),
                grad_c.sum_to_size(c.shape), None, None)


def squared_distance(q1: Tensor, q2: Tensor, rho: Tensor, sign: float = -1.0) -> Tensor:
    r"""``E[(u - v)^2] = q1 + q2 - 2c`` (``sign=-1``) or ``E[(u + v)^2] = q1 + q2 + 2c``
    (``sign=+1``), as ``(sqrt(q1) - sqrt(q2))^2 + 2 sqrt(q1 q2) (1 + sign rho)``.

    A sum of non-negative terms: the textbook form cancels for nearly equal inputs (for
    ``q = 1e16`` its rounding alone is of order 1, where the true distance may be 0).
    """
    root1, root2 = root_variance(q1), root_variance(q2)
    return (root1 - root2) ** 2 + 2 * root1 * root2 * (1.0 + sign * rho)


def sin_moments(
    b: float | Tensor, phase: float | Tensor, q1: Tensor, q2: Tensor, rho: Tensor
) -> Tensor:
    r"""``E[sin(b u + phase) sin(b v + phase)]``.

    With ``sin x sin y = (cos(x - y) - cos(x + y)) / 2`` and
    ``E[cos(w + t)] = exp(-Var(w) / 2) cos(t)`` for Gaussian ``w``:
    ``(exp(-b^2 E[(u - v)^2] / 2) - cos(2 phase) exp(-b^2 E[(u + v)^2] / 2)) / 2``, the
    second moments from :func:`squared_distance`. The derivative map of ``sin`` is this
    with ``phase + pi/2`` (cosine), times ``b^2``.
    """
    half_b2 = 0.5 * b * b
    cos_2phase = torch.cos(2 * phase) if isinstance(phase, Tensor) else math.cos(2 * phase)
    return 0.5 * (
        torch.exp(-half_b2 * squared_distance(q1, q2, rho))
        - cos_2phase * torch.exp(-half_b2 * squared_distance(q1, q2, rho, 1.0))
    )


def gelu_maps(
    q1: Tensor, q2: Tensor, c: Tensor, rho: Tensor, with_derivative: bool = True
) -> tuple[Tensor, Tensor | None]:
    r"""Both maps of the exact GELU ``g(x) = x Phi(x)``, ``g'(x) = Phi(x) + x phi(x)``.

    The NNGP map is obtained by integrating the derivative map (Price's theorem,
    ``d/dc E[g(u) g(v)] = E[g'(u) g'(v)]``) from ``c = 0``, where it equals
    ``E[g(u)] E[g(v)]`` with ``E[u Phi(u)] = q / sqrt(2 pi (1 + q))``; the derivative map
    by writing ``Phi(u) = P(z <= u)`` for an independent standard normal ``z`` and
    tilting the Gaussian by ``phi``. With ``s^2 = (1 + q1)(1 + q2)`` and
    ``D = s^2 - c^2`` (the textbook forms)::

        E[g g]   = c/4 + (c arcsin(c/s) + sqrt(D) (q1 q2 - 1) / s^2 + 1 / sqrt(D)) / (2 pi)
        E[g' g'] = 1/4 + (arcsin(c/s) + c (2 + q1 + q2) / (s^2 sqrt(D)) + c / D^{3/2}) / (2 pi)

    Computed without cancellation: ``arcsin(c/s) = atan2(c, sqrt(D))``, ``D`` from
    ``_scaled_determinant`` (``s = 1``), ``(2 + q1 + q2) / s^2 = p1 + p2`` and
    ``sqrt(D) (q1 q2 - 1) / s^2 + 1 / sqrt(D) = sqrt(D) t1 t2 + c^2 p1 p2 / sqrt(D)``
    with ``p_i = 1 / (1 + q_i)``, ``t_i = q_i / (1 + q_i)`` (the textbook form subtracts
    two terms near 1 for small variances). ``c`` and ``rho`` have the broadcast shape of
    all arguments; the results are fresh tensors.
    """
    scaled, r1, r2 = _scaled_determinant(1.0, q1, q2, rho)
    root = scaled.sqrt() / r1 / r2  # sqrt(D)
    angle = torch.atan2(c, root)
    p1, p2 = 1.0 / (1.0 + q1), 1.0 / (1.0 + q2)
    c_over_root = c / root
    moments = (c * angle + root * (q1 * p1) * (q2 * p2) + c * c_over_root * p1 * p2) / (
        2 * math.pi
    ) + c / 4
    if not with_derivative:
        return moments, None
    derivative = 0.25 + (
        angle + c_over_root * (p1 + p2) + c_over_root / root / root
    ) / (2 * math.pi)
    return moments, derivative


def hermite_rule(degree: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Nodes and weights of ``degree``-point Gauss--Hermite quadrature for N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(degree)
    weights = weights / math.sqrt(2 * math.pi)
    return (
        torch.as_tensor(nodes, dtype=dtype, device=device),
        torch.as_tensor(weights, dtype=dtype, device=device),
    )


def quadrature_mean(f: Callable[[Tensor], Tensor], q: Tensor, degree: int = 128) -> Tensor:
    """``E[f(u)]`` for ``u ~ N(0, q)`` by ``degree``-point Gauss--Hermite quadrature (exact
    for polynomials of degree below ``2 degree``; the mean of an activation whose kernel
    maps have closed forms is written out by that activation instead)."""
    nodes, weights = hermite_rule(degree, q.dtype, q.device)
    values = f(root_variance(q).unsqueeze(-1) * nodes)
    return values @ weights


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
    flat = [t.reshape(-1) for t in (root_variance(q1), root_variance(q2), rho, _sin_angle(rho))]
    out = torch.empty(flat[0].shape, dtype=rho.dtype, device=rho.device)
    step = max(1, max_elements // (degree * degree))
    for start in range(0, out.numel(), step):
        sd1, sd2, r, rest = (t[start : start + step, None, None] for t in flat)
        u = sd1[:, :, 0] * nodes  # (entries, i)
        v = sd2 * (r * nodes[:, None] + rest * nodes[None, :])  # (entries, i, j)
        inner = g(v) @ weights  # sum over j
        out[start : start + step] = (f(u) * inner) @ weights
    return out.reshape(shape)
