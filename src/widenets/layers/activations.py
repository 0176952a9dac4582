"""Elementwise activations: each knows its forward, its NNGP map and its NTK derivative map.

For a Gaussian pre-activation with kernel ``K`` and NTK ``T``, an activation ``phi``
maps (Lee et al. 2018; Jacot et al. 2018)::

    K'(x, x') = E[phi(u) phi(v)]
    T'(x, x') = T(x, x') * E[phi'(u) phi'(v)]

with ``(u, v) ~ N(0, [[K(x, x), K(x, x')], [K(x, x'), K(x', x')]])``. The expectations
live in :mod:`widenets.gaussian`, one formula per function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .. import gaussian
from ..inputs import check_hyperparameter, check_positive_int
from ..kernel import Kernel, batch_diagonal
from ..paths import fast_paths_enabled
from ..requirements import Needs
from .base import KernelState, Layer, Shape, single_kernel

Tensor = torch.Tensor


class Activation(Layer):
    """Base class of elementwise activations.

    Subclasses define :meth:`apply` (the finite forward), :meth:`nngp_map`
    (``E[phi(u) phi(v)]``) and :meth:`derivative_map` (``E[phi'(u) phi'(v)]``), each
    taking the variances ``q1``, ``q2``, the covariance ``c`` and the correlation
    ``rho`` (exactly 1 on the diagonal of a symmetric kernel).
    """

    def apply(self, x: Tensor) -> Tensor:
        """The finite forward: ``phi(x)`` elementwise."""
        raise NotImplementedError

    def nngp_map(self, q1: Tensor, q2: Tensor, c: Tensor, rho: Tensor) -> Tensor:
        """``E[phi(u) phi(v)]`` for centred Gaussian ``(u, v)`` with variances ``q1``,
        ``q2``, covariance ``c`` and correlation ``rho``."""
        raise NotImplementedError

    def derivative_map(self, q1: Tensor, q2: Tensor, c: Tensor, rho: Tensor) -> Tensor:
        """``E[phi'(u) phi'(v)]`` for the same ``(u, v)`` (the NTK's factor)."""
        raise NotImplementedError

    def pair_maps(
        self, q1: Tensor, q2: Tensor, c: Tensor, rho: Tensor, ntk: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The NNGP map of every pair of entries and the NTK ``ntk * E[phi'(u) phi'(v)]``.

        Returns fresh tensors of the full shape (the first is written into afterwards).
        This default calls the two maps; activations whose maps share intermediate
        results override it to compute both in fewer passes.
        """
        nngp = self.nngp_map(q1, q2, c, rho).clone()
        return nngp, None if ntk is None else ntk * self.derivative_map(q1, q2, c, rho)

    def mean_map(self, q: Tensor) -> Tensor:
        """``E[phi(u)]`` for ``u ~ N(0, q)``, per variance ``q``: the mean of a unit, which
        a sum with an independent branch needs. By quadrature of :meth:`apply` unless an
        activation writes it out."""
        return gaussian.quadrature_mean(self.apply, q)

    #: Whether :meth:`pair_maps` may run while autograd records, as long as this
    #: activation's own hyperparameters are constants (its in-place updates then touch
    #: nothing that the backward pass needs): the recorded path then uses it.
    pair_maps_record_safely = False

    def records_pair_maps(self) -> bool:
        """Whether the recorded path may compute both maps in one :meth:`pair_maps`."""
        return self.pair_maps_record_safely and not gaussian.records_gradients(
            *self.hyperparameters().values())

    needs = Needs(gaussian_input=True)
    gaussian_input_advice = (
        "a Gaussian input: put a Linear layer before it (an activation cannot act on the "
        "raw input, on another activation, or on a product or concatenation of branches; "
        "combine two activations into one Elementwise)"
    )

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if fast_paths_enabled() and k.layout.paired:
            nngp, ntk, var1, var2 = self._paired_maps(k)
        else:
            nngp, ntk, var1, var2 = self._maps(k)
        positions = k.layout.positions
        return k.replace(
            nngp=nngp, ntk=ntk, var1=var1, var2=var2, is_gaussian=False,
            mean1=self.mean_map(positions(k.var1)),
            mean2=None if k.var2 is None else self.mean_map(positions(k.var2)))

    def takes_pair_list(self) -> bool:
        return self.own_rule(Activation)

    def _paired_maps(
        self, k: Kernel
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """The maps of a kernel with the full spatial covariance, on the fast path:
        ``(nngp, ntk, var1, var2)``.

        Of a symmetric kernel, the self-covariances are its batch diagonal
        (``nngp[i, i] = var1[i]``): their map is read from the map of ``nngp``, whose
        correlations there are exactly those of ``var1`` (exactly 1 at equal positions).
        Otherwise both self-covariances are mapped together, in one batch.
        """
        layout = k.layout
        q1, q2 = k.pair_variances()
        inverse1 = gaussian.inverse_sqrt(layout.positions(k.var1))
        if k.var2 is None:
            def equal_positions(rho: Tensor, value: Tensor | float) -> None:
                k.fill_self_positions(rho, float(value))  # (numbers only, here)

            rho, c = fast_correlation(k.nngp, q1, q2, equal_positions, 1.0,
                                      k.pair_broadcast(inverse1, inverse1))
            nngp, ntk = self.pair_maps(q1, q2, c, rho, k.ntk)
            var1 = k.self_entries(nngp)
            return nngp, ntk, var1 if k.pairs is not None else var1.clone(), None
        inverse2 = gaussian.inverse_sqrt(layout.positions(k.var2))
        both = torch.cat((k.var1, k.var2))
        inverse_both = torch.cat((inverse1, inverse2))
        s1, s2 = k.self_variances(both)
        self_rho, self_c = fast_correlation(
            both, s1, s2, written_into(layout.positions), 1.0,
            (layout.as_first(inverse_both), layout.as_second(inverse_both)))
        mapped = self.pair_maps(s1, s2, self_c, self_rho, None)[0]
        rho, c = fast_correlation(k.nngp, q1, q2, None, 1.0, k.pair_broadcast(inverse1, inverse2))
        nngp, ntk = self.pair_maps(q1, q2, c, rho, k.ntk)
        count = k.var1.shape[0]
        return nngp, ntk, mapped[:count], mapped[count:]

    def _maps(self, k: Kernel) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """The maps of any kernel, self-covariances on their own: ``(nngp, ntk, var1,
        var2)``."""
        var1, self_rho = self._self_map(k, k.var1)
        var2 = None if k.var2 is None else self._self_map(k, k.var2)[0]
        q1, q2 = k.pair_variances()
        if fast_paths_enabled():
            known = written_into(batch_diagonal) if k.symmetric else None
            rho, c = fast_correlation(k.nngp, q1, q2, known, self_rho)
            nngp, ntk = self.pair_maps(q1, q2, c, rho, k.ntk)
        else:  # the straightforward path
            rho, c = gaussian.snapped_correlation(q1, q2, k.nngp)
            if k.symmetric:  # a copy: autograd keeps the correlations that c came from
                rho = rho.clone()
                batch_diagonal(rho).copy_(self_rho)
            if gaussian.records_gradients(q1, q2, c, rho) and self.records_pair_maps():
                # both maps in one pass (safe for autograd here): half the graph
                nngp, ntk = self.pair_maps(q1, q2, c, rho, k.ntk)
            else:
                nngp = self.nngp_map(q1, q2, c, rho).clone()
                ntk = None if k.ntk is None else k.ntk * self.derivative_map(q1, q2, c, rho)
        if k.symmetric:
            batch_diagonal(nngp).copy_(var1)
        return nngp, ntk, var1, var2

    def _self_map(self, k: Kernel, var: Tensor) -> tuple[Tensor, Tensor]:
        """The NNGP map of a self-covariance ``var``, and its correlations (exactly 1 at
        equal positions)."""
        if not k.layout.paired:  # every entry is a variance
            rho = torch.ones_like(var)
            return self.nngp_map(var, var, var, rho).clone(), rho
        q1, q2 = k.self_variances(var)
        rho, c = gaussian.snapped_correlation(q1, q2, var)
        rho = rho.clone()  # as above
        k.layout.positions(rho).fill_(1.0)
        return self.nngp_map(q1, q2, c, rho).clone(), rho

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return ActivationModule(self), input_shape


#: Writes a value (a number, or a tensor of the entries' shape) into the known entries
#: of a correlation tensor.
KnownWriter = Callable[[Tensor, "Tensor | float"], object]


def written_into(view: Callable[[Tensor], Tensor]) -> KnownWriter:
    """The writer of known correlations into the view ``view(rho)``."""
    def write(rho: Tensor, value: Tensor | float) -> None:
        target = view(rho)
        if isinstance(value, float):
            target.fill_(value)
        else:
            target.copy_(value)

    return write


def fast_correlation(
    moments: Tensor,
    q1: Tensor,
    q2: Tensor,
    known: KnownWriter | None,
    known_rho: Tensor | float,
    inverse_std: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``gaussian.snapped_correlation(q1, q2, moments)`` in fewer passes (the fast path).

    The inverse standard deviations are taken of the variances ``q1``, ``q2`` (per
    example and position, broadcast against ``moments``; ``inverse_std`` when the caller
    has them already), so the correlation costs two multiplications and a clip; the
    snapping to +-1, which needs a pass of its own for a mask, runs only when the
    extreme correlations say some entry is that close. The
    entries that ``known(rho, value)`` writes (the batch diagonal of a symmetric kernel,
    or the equal positions of a self-covariance) are left out of that test and set to
    ``known_rho`` (exactly 1 at equal positions).
    """
    if inverse_std is None:
        inverse_std = gaussian.inverse_sqrt(q1), gaussian.inverse_sqrt(q2)
    rho = torch.mul(moments, inverse_std[0]).mul_(inverse_std[1])
    if known is not None:
        known(rho, 0.0)
    c = moments
    if rho.numel():
        tolerance = gaussian.snap_tolerance(rho.dtype)
        low, high = torch.stack(torch.aminmax(rho)).tolist()  # (one synchronisation)
        if high > 1.0 or low < -1.0:  # (rounding; a pass only when needed)
            rho.clamp_(-1.0, 1.0)
        if 1.0 - high <= tolerance or 1.0 + low <= tolerance:
            rho, c = gaussian.snap_to_unit(q1, q2, c, rho)
    if known is not None:
        known(rho, known_rho)
    return rho, c


class ActivationModule(nn.Module):
    """The finite twin of an activation: applies its forward elementwise."""

    def __init__(self, activation: Activation) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.activation.apply(x)

    def extra_repr(self) -> str:
        return repr(self.activation)


class Identity(Activation):
    """``phi(x) = x``: leaves the kernel state unchanged (any input)."""

    needs = Needs(input="any")

    def apply(self, x: Tensor) -> Tensor:
        return x

    def kernel_rule(self, k: KernelState) -> KernelState:
        return k

    def takes_pair_list(self) -> bool:
        return self.own_rule(Identity)


class ABReLU(Activation):
    """``phi(x) = a min(x, 0) + b max(x, 0)``; maps in :func:`gaussian.ab_relu_maps`."""

    def __init__(self, a: float | Tensor, b: float | Tensor) -> None:
        self.a = check_hyperparameter(a, "a")
        self.b = check_hyperparameter(b, "b")

    def apply(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, self.b * x, self.a * x)

    def mean_map(self, q: Tensor) -> Tensor:
        """``E[phi(u)] = (b - a) sqrt(q / (2 pi))`` (half-normal mean)."""
        return (self.b - self.a) * gaussian.root_variance(q) / math.sqrt(2 * math.pi)

    def nngp_map(self, q1, q2, c, rho):
        return gaussian.ab_relu_maps(self.a, self.b, q1, q2, rho, with_derivative=False)[0]

    def derivative_map(self, q1, q2, c, rho):
        return gaussian.ab_relu_maps(self.a, self.b, q1, q2, rho)[1]

    def pair_maps(self, q1, q2, c, rho, ntk):
        nngp, derivative = gaussian.ab_relu_maps(self.a, self.b, q1, q2, rho, ntk is not None)
        if ntk is None:
            return nngp, None
        if gaussian.records_gradients(derivative):  # ABReLUMaps keeps it for its backward
            return nngp, derivative * ntk
        return nngp, derivative.mul_(ntk)

    pair_maps_record_safely = True  # through gaussian.ABReLUMaps (constant slopes)


class ReLU(ABReLU):
    """``phi(x) = max(x, 0)``: the arc-cosine kernel of order 1 (Cho & Saul 2009)."""

    def __init__(self) -> None:
        super().__init__(0.0, 1.0)

    def apply(self, x: Tensor) -> Tensor:
        return torch.relu(x)


class LeakyReLU(ABReLU):
    """``phi(x) = x`` for ``x > 0`` and ``negative_slope * x`` otherwise."""

    def __init__(self, negative_slope: float | Tensor = 0.01) -> None:
        super().__init__(negative_slope, 1.0)
        self.negative_slope = self.a


class Abs(ABReLU):
    """``phi(x) = |x|``."""

    def __init__(self) -> None:
        super().__init__(-1.0, 1.0)

    def apply(self, x: Tensor) -> Tensor:
        return torch.abs(x)


class RectifiedMonomial(Activation):
    """``phi(x) = max(x, 0)^degree``: the arc-cosine kernel of that order (Cho & Saul 2009).

    Degree 0 is the Heaviside step (derivative 0 almost everywhere), 1 is ReLU.
    The NTK derivative map is ``degree^2`` times the NNGP map of ``degree - 1``.
    """

    def __init__(self, degree: int) -> None:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)):
            raise TypeError(f"degree must be an integer >= 0, got {degree!r}")
        if degree < 0:
            raise ValueError(f"degree must be an integer >= 0, got {degree}")
        self.degree = int(degree)

    def apply(self, x: Tensor) -> Tensor:
        if self.degree == 0:
            return (x > 0).to(x.dtype)
        return torch.relu(x) ** self.degree

    def mean_map(self, q: Tensor) -> Tensor:
        """``E[max(u, 0)^n] = q^(n/2) 2^(n/2 - 1) Gamma((n + 1) / 2) / sqrt(pi)`` (half of
        the absolute moment of a normal), and 0 where ``q`` is 0."""
        n = self.degree
        scale = 2 ** (n / 2 - 1) * math.gamma((n + 1) / 2) / math.sqrt(math.pi)
        if n == 0:
            return scale * (q > 0).to(q.dtype)
        return scale * gaussian.root_variance(q) ** n

    def nngp_map(self, q1, q2, c, rho):
        return gaussian.rectified_monomial_moments(self.degree, q1, q2, rho)

    def derivative_map(self, q1, q2, c, rho):
        if self.degree == 0:
            return torch.zeros_like(rho)
        moments = gaussian.rectified_monomial_moments(self.degree - 1, q1, q2, rho)
        return self.degree**2 * moments


class Step(RectifiedMonomial):
    """Heaviside step ``phi(x) = 1 if x > 0 else 0`` (arc-cosine kernel of order 0)."""

    def __init__(self) -> None:
        super().__init__(0)


class Sign(Activation):
    """``phi(x) = sign(x)``: ``E[sign(u) sign(v)] = (2/pi) arcsin(rho)``; derivative 0."""

    def apply(self, x: Tensor) -> Tensor:
        return torch.sign(x)

    def nngp_map(self, q1, q2, c, rho):
        return gaussian.sign_moments(q1, q2, rho)

    def derivative_map(self, q1, q2, c, rho):
        return torch.zeros_like(rho)


class Erf(Activation):
    """``phi(x) = a erf(b x) + c`` (Williams 1997); maps in :func:`gaussian.erf_maps`."""

    def __init__(
        self, a: float | Tensor = 1.0, b: float | Tensor = 1.0, c: float | Tensor = 0.0
    ) -> None:
        self.a = check_hyperparameter(a, "a")
        self.b = check_hyperparameter(b, "b")
        self.c = check_hyperparameter(c, "c")

    def apply(self, x: Tensor) -> Tensor:
        return self.a * torch.erf(self.b * x) + self.c

    def mean_map(self, q: Tensor) -> Tensor:
        """``E[phi(u)] = c`` (``erf`` is odd)."""
        return torch.zeros_like(q) + self.c

    def nngp_map(self, q1, q2, c, rho):
        return self.pair_maps(q1, q2, c, rho, None)[0]

    def derivative_map(self, q1, q2, c, rho):
        return self.a**2 * gaussian.erf_maps(self.b, q1, q2, c, rho)[1]

    def pair_maps(self, q1, q2, c, rho, ntk):
        nngp, derivative = gaussian.erf_maps(self.b, q1, q2, c, rho, ntk is not None)
        # E[erf(b u)] = 0 (odd), so the shift only adds c^2.
        if self.a**2 != 1.0:
            nngp.mul_(self.a**2)
        if self.c != 0.0:
            nngp.add_(self.c**2)
        if ntk is None:
            return nngp, None
        if gaussian.records_gradients(derivative):  # ErfMaps keeps it for its backward
            derivative = derivative * ntk
        else:
            derivative.mul_(ntk)
        return nngp, derivative if self.a**2 == 1.0 else derivative.mul_(self.a**2)

    # erf_maps records out of place (or through ErfMaps, whose derivative map is then
    # multiplied out of place); the other updates above touch only fresh results
    pair_maps_record_safely = True


class Sin(Activation):
    """``phi(x) = a sin(b x + c)``; maps in :func:`gaussian.sin_moments`."""

    def __init__(
        self, a: float | Tensor = 1.0, b: float | Tensor = 1.0, c: float | Tensor = 0.0
    ) -> None:
        self.a = check_hyperparameter(a, "a")
        self.b = check_hyperparameter(b, "b")
        self.c = check_hyperparameter(c, "c")

    @property
    def _phase(self) -> float | Tensor:
        return self.c

    def apply(self, x: Tensor) -> Tensor:
        return self.a * torch.sin(self.b * x + self._phase)

    def mean_map(self, q: Tensor) -> Tensor:
        """``E[a sin(b u + c)] = a sin(c) exp(-b^2 q / 2)`` (Cos and Rbf: their phase)."""
        phase = self._phase
        sine = torch.sin(phase) if isinstance(phase, Tensor) else math.sin(phase)
        return self.a * sine * torch.exp(-0.5 * self.b**2 * q)

    def nngp_map(self, q1, q2, c, rho):
        return self.a**2 * gaussian.sin_moments(self.b, self._phase, q1, q2, rho)

    def derivative_map(self, q1, q2, c, rho):
        # phi'(x) = a b cos(b x + phase) = a b sin(b x + phase + pi/2)
        moments = gaussian.sin_moments(self.b, self._phase + math.pi / 2, q1, q2, rho)
        return (self.a * self.b) ** 2 * moments


class Cos(Sin):
    """``phi(x) = a cos(b x + c) = a sin(b x + c + pi/2)``."""

    @property
    def _phase(self) -> float | Tensor:
        return self.c + math.pi / 2


class Rbf(Sin):
    """``phi(x) = sqrt(2) sin(sqrt(2 gamma) x + pi/4)``.

    Its NNGP map is the RBF kernel ``exp(-gamma E[(u - v)^2])`` of the pre-activations
    (``sin_moments`` with ``cos(2 phase) = cos(pi/2) = 0``; the distance from
    :func:`gaussian.squared_distance`).
    """

    def __init__(self, gamma: float | Tensor = 1.0) -> None:
        self.gamma = check_hyperparameter(gamma, "gamma", nonnegative=True)
        super().__init__(math.sqrt(2.0), (2.0 * self.gamma) ** 0.5, math.pi / 4)

    # The Sin maps with cos(2 phase) = cos(pi/2) = 0 and cos(2 phase + pi) = 0 exactly
    # (in floating point the cosine would leave an absolute error of about 6e-17).
    def nngp_map(self, q1, q2, c, rho):
        return torch.exp(-self.gamma * gaussian.squared_distance(q1, q2, rho))

    def derivative_map(self, q1, q2, c, rho):
        return 2 * self.gamma * self.nngp_map(q1, q2, c, rho)


class GELU(Activation):
    """Gaussian error linear unit ``phi(x) = x Phi(x)`` (``approximate=False``).

    The exact GELU has closed-form maps (:func:`gaussian.gelu_maps`). With
    ``approximate=True`` the tanh approximation of PyTorch is used in the forward and
    its maps are computed by Gauss--Hermite quadrature (see :class:`Elementwise`).
    """

    def __init__(self, approximate: bool = False) -> None:
        if not isinstance(approximate, bool):
            raise TypeError(f"approximate must be True or False, got {approximate!r}")
        self.approximate = approximate
        self._numerical = Elementwise(self.apply) if approximate else None

    def apply(self, x: Tensor) -> Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh" if self.approximate else "none")

    def mean_map(self, q: Tensor) -> Tensor:
        """``E[u Phi(u)] = q / sqrt(2 pi (1 + q))`` (Stein's lemma); the tanh approximation
        by quadrature."""
        if self.approximate:
            return super().mean_map(q)
        return q / torch.sqrt(2 * math.pi * (1 + q))

    def nngp_map(self, q1, q2, c, rho):
        if self._numerical is not None:
            return self._numerical.nngp_map(q1, q2, c, rho)
        return gaussian.gelu_maps(q1, q2, c, rho, with_derivative=False)[0]

    def derivative_map(self, q1, q2, c, rho):
        if self._numerical is not None:
            return self._numerical.derivative_map(q1, q2, c, rho)
        return gaussian.gelu_maps(q1, q2, c, rho)[1]

    def pair_maps(self, q1, q2, c, rho, ntk):
        if self._numerical is not None:
            return super().pair_maps(q1, q2, c, rho, ntk)
        nngp, derivative = gaussian.gelu_maps(q1, q2, c, rho, ntk is not None)
        return nngp, None if ntk is None else derivative.mul_(ntk)


class AutogradDerivative:
    """The elementwise derivative of ``fn`` by autograd (zero where ``fn`` is constant).

    A class rather than a closure so that activations holding it can be pickled (Dask
    workers, ``multiprocessing``) whenever ``fn`` itself can.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            # the kernel itself is being differentiated: keep the graph (fn's second
            # derivative enters its gradient)
            out = self.fn(x)
            if not out.requires_grad:
                return torch.zeros_like(x)
            (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True, allow_unused=True)
            return torch.zeros_like(x) if grad is None else grad
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            out = self.fn(leaf)
            if not out.requires_grad:
                return torch.zeros_like(x)
            (grad,) = torch.autograd.grad(out.sum(), leaf, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad


def checked_elementwise(fn: Callable[[Tensor], Tensor], x: Tensor, what: str) -> Tensor:
    """``fn(x)``, refused with a clear error unless it is a floating tensor of ``x``'s shape
    (the Gauss--Hermite rule evaluates ``fn`` on a grid of nodes and sums with weights)."""
    out = fn(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(
            f"{what} must act elementwise: for an input of shape {tuple(x.shape)} it returned "
            f"shape {tuple(out.shape)}"
        )
    if not out.is_floating_point():
        raise TypeError(f"{what} must return a floating tensor, got {out.dtype}")
    return out.to(x.dtype)


#: ``Elementwise(degree=None)``: its per-entry degrees are multiples of this (a few
#: quadrature calls per map rather than one per distinct variance).
DEGREE_STEP = 16
#: ``Elementwise(degree=None)``: the largest degree chosen.
MAX_DEGREE = 256


class Elementwise(Activation):
    """Any elementwise torch function, its maps by 2-D Gauss--Hermite quadrature.

    Args:
        fn: a function of a tensor, applied elementwise (``torch.tanh``, a lambda...).
        fn_prime: its derivative; by autograd when ``None``.
        degree: quadrature points per dimension (``degree^2`` evaluations per entry);
            ``None`` chooses it for each entry from its larger pre-activation variance
            ``q``: ``80 * sqrt(max(q, 1))`` rounded up to a multiple of
            ``DEGREE_STEP`` (16) and capped at 256, because a function of ``sqrt(q) z``
            varies faster as ``q`` grows. Per entry, so that an entry does not depend on
            which other inputs share its call (the batch, the tile).

    Accuracy (measured against the closed forms in ``tests/test_activations.py``):
    with ``degree=None``, entire functions of moderate growth (erf, sin, cos, GELU,
    polynomials) are within 1e-8 relative at pre-activation variances up to 10.
    A fixed ``degree=64`` is that accurate only up to variance ~3 for ``erf(x)``
    (variance 10: ~3e-4). Functions with complex singularities near the real axis
    converge more slowly, like ``exp(-2 a sqrt(2 degree))`` for a pole at distance
    ``a`` in standardised units (``tanh`` at variance 9: ~1e-4 at degree 64). Kinks
    (ReLU, abs) converge algebraically: use the closed-form layers for those.
    The rule is symmetric in its two inputs by construction (the input of larger
    variance is always integrated first), so ``K(x1, x2) = K(x2, x1)^T`` exactly.
    """

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        fn_prime: Callable[[Tensor], Tensor] | None = None,
        degree: int | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if fn_prime is not None and not callable(fn_prime):
            raise TypeError(f"fn_prime must be callable or None, got {fn_prime!r}")
        self.fn = fn
        self.fn_prime = fn_prime
        self.degree = None if degree is None else check_positive_int(degree, "degree")
        self._derivative = fn_prime if fn_prime is not None else AutogradDerivative(fn)

    def apply(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def _moments(self, fn, what, q1, q2, rho):
        high, low = torch.maximum(q1, q2), torch.minimum(q1, q2)

        def checked(x: Tensor) -> Tensor:
            return checked_elementwise(fn, x, f"Elementwise's {what}")

        if self.degree is not None:
            moments = gaussian.quadrature_moments(checked, checked, high, low, rho,
                                                  self.degree)
        else:
            moments = self._moments_by_entry_degree(checked, high, low, rho)
        if moments.numel() and not bool(torch.isfinite(moments).all()):
            raise ValueError(
                f"Elementwise's {what} returned NaN or inf at some Gauss-Hermite nodes "
                f"(pre-activation variances up to {float(high.max()):.3g}); it must be "
                "finite on the whole real line"
            )
        return moments

    @staticmethod
    def _moments_by_entry_degree(fn, high: Tensor, low: Tensor, rho: Tensor) -> Tensor:
        """Quadrature with each entry's own degree (see ``degree``), one call per degree."""
        shape = torch.broadcast_shapes(high.shape, low.shape, rho.shape)
        high, low, rho = (t.expand(shape).reshape(-1) for t in (high, low, rho))
        needed = torch.ceil(80 * torch.sqrt(high.clamp_min(1.0)) / DEGREE_STEP) * DEGREE_STEP
        degrees = needed.clamp_max(MAX_DEGREE).to(torch.int64)
        out = torch.empty_like(rho)
        for degree in torch.unique(degrees).tolist():
            chosen = degrees == degree
            out[chosen] = gaussian.quadrature_moments(fn, fn, high[chosen], low[chosen],
                                                      rho[chosen], int(degree))
        return out.reshape(shape)

    def nngp_map(self, q1, q2, c, rho):
        return self._moments(self.fn, "fn", q1, q2, rho)

    def derivative_map(self, q1, q2, c, rho):
        return self._moments(self._derivative, "fn_prime", q1, q2, rho)
