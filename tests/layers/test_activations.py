"""Activation maps against independent numerical integrals, identities and torch forwards.

The references for ``E[phi(u) phi(v)]`` and ``E[phi'(u) phi'(v)]`` are computed here with
SciPy's adaptive quadrature (``scipy.integrate.quad``), independently of the closed forms
and of the Gauss--Hermite rule of :mod:`widenets.gaussian`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate

import widenets as wn

DTYPE = torch.float64
Scalar = Callable[[float], float]

pytestmark = pytest.mark.filterwarnings("error::scipy.integrate.IntegrationWarning")

# --------------------------------------------------------------------------------------
# Independent reference: E[f(u) g(v)] by adaptive quadrature in SciPy
# --------------------------------------------------------------------------------------

LIMIT = 12.0  # integrate standard normals over [-12, 12] (mass outside ~ 4e-33)
# epsabs far below the smallest non-negligible value, so that epsrel governs the accuracy.
QUAD_OPTIONS = {"epsabs": 1e-14, "epsrel": 1e-11, "limit": 200}
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_pdf(z: float) -> float:
    return INV_SQRT_2PI * math.exp(-0.5 * z * z)


def normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def quad_split(fn: Scalar, kink: float) -> float:
    """``int_{-LIMIT}^{LIMIT} fn`` split at ``kink`` (where ``fn`` may be non-smooth)."""
    k = min(max(kink, -LIMIT), LIMIT)
    left, _ = integrate.quad(fn, -LIMIT, k, **QUAD_OPTIONS)
    right, _ = integrate.quad(fn, k, LIMIT, **QUAD_OPTIONS)
    return left + right


def gaussian_expectation(f: Scalar, g: Scalar, q1: float, q2: float, rho: float) -> float:
    """``E[f(u) g(v)]`` for ``(u, v) ~ N(0, [[q1, c], [c, q2]])``, ``c = rho sqrt(q1 q2)``.

    At ``|rho| = 1`` the law is degenerate (``v = rho sqrt(q2 / q1) u``): a 1-D
    integral. Otherwise ``u = sqrt(q1) z1``, ``v = sqrt(q2) (rho z1 + sqrt(1 - rho^2) z2)``
    and the integral over ``z2`` is split where ``v = 0`` (the kink of relu-like ``g``),
    the one over ``z1`` where ``u = 0``.
    """
    s1, s2 = math.sqrt(q1), math.sqrt(q2)
    if abs(rho) == 1.0:
        return quad_split(lambda z: f(s1 * z) * g(rho * s2 * z) * normal_pdf(z), 0.0)
    r = math.sqrt((1.0 - rho) * (1.0 + rho))

    def outer(z1: float) -> float:
        fu = f(s1 * z1)
        if fu == 0.0:
            return 0.0
        m = rho * z1
        inner = quad_split(lambda z2: g(s2 * (m + r * z2)) * normal_pdf(z2), -m / r)
        return fu * inner * normal_pdf(z1)

    return quad_split(outer, 0.0)


# --------------------------------------------------------------------------------------
# Scalar activations and their derivatives, written by hand
# --------------------------------------------------------------------------------------


def ab_relu(a: float, b: float) -> tuple[Scalar, Scalar]:
    return (lambda x: a * x if x < 0 else b * x), (lambda x: a if x < 0 else b)


def sign(x: float) -> float:
    return math.copysign(1.0, x) if x != 0 else 0.0


def erf_fn(a: float, b: float, c: float) -> tuple[Scalar, Scalar]:
    scale = a * 2.0 * b / math.sqrt(math.pi)
    return (lambda x: a * math.erf(b * x) + c), (lambda x: scale * math.exp(-b * b * x * x))


def monomial(n: int) -> tuple[Scalar, Scalar | None]:
    phi = lambda x: x**n if x > 0 else 0.0  # noqa: E731  (x**0 == 1: the step)
    if n == 0:
        return phi, None
    return phi, (lambda x: n * x ** (n - 1) if x > 0 else 0.0)


def gelu() -> tuple[Scalar, Scalar]:
    return (lambda x: x * normal_cdf(x)), (lambda x: normal_cdf(x) + x * normal_pdf(x))


def sin_fn(a: float, b: float, c: float) -> tuple[Scalar, Scalar]:
    return (lambda x: a * math.sin(b * x + c)), (lambda x: a * b * math.cos(b * x + c))


def cos_fn(a: float, b: float, c: float) -> tuple[Scalar, Scalar]:
    return (lambda x: a * math.cos(b * x + c)), (lambda x: -a * b * math.sin(b * x + c))


def rbf_fn(gamma: float) -> tuple[Scalar, Scalar]:
    return sin_fn(math.sqrt(2.0), math.sqrt(2.0 * gamma), math.pi / 4)


# name -> (activation, phi, phi' or None where phi' = 0 almost everywhere)
CLOSED_FORMS: dict[str, tuple[wn.Layer, Scalar, Scalar | None]] = {
    "relu": (wn.ReLU(), *ab_relu(0.0, 1.0)),
    "leaky_relu": (wn.LeakyReLU(0.2), *ab_relu(0.2, 1.0)),
    "ab_relu": (wn.ABReLU(-0.5, 1.5), *ab_relu(-0.5, 1.5)),
    "abs": (wn.Abs(), abs, sign),
    "erf": (wn.Erf(1.0, 1.0, 0.0), *erf_fn(1.0, 1.0, 0.0)),
    "erf_scaled": (wn.Erf(0.7, 2.0, 0.3), *erf_fn(0.7, 2.0, 0.3)),
    "sign": (wn.Sign(), sign, None),
    "step": (wn.Step(), lambda x: 1.0 if x > 0 else 0.0, None),
    **{f"monomial{n}": (wn.RectifiedMonomial(n), *monomial(n)) for n in range(6)},
    "gelu": (wn.GELU(), *gelu()),
    "sin": (wn.Sin(1.3, 0.8, 0.4), *sin_fn(1.3, 0.8, 0.4)),
    "cos": (wn.Cos(0.9, 1.2, -0.3), *cos_fn(0.9, 1.2, -0.3)),
    "rbf": (wn.Rbf(0.6), *rbf_fn(0.6)),
}

VARIANCES = [(1.0, 1.0), (0.3, 2.5), (4.0, 0.7)]
CORRELATIONS = [-1.0, -0.95, -0.5, 0.0, 0.3, 0.8, 0.99, 1.0]


def grid_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q1, q2, c, rho`` (float64, 1-D) over all variance pairs and correlations."""
    points = [(q1, q2, rho) for q1, q2 in VARIANCES for rho in CORRELATIONS]
    q1, q2, rho = (torch.tensor(col, dtype=DTYPE) for col in zip(*points, strict=True))
    return q1, q2, rho * torch.sqrt(q1 * q2), rho


# Relative tolerance, and the absolute one used only where the reference is ~0.
REL_TOL, ZERO_TOL = 1e-8, 1e-10


def agrees(value: float, reference: float) -> bool:
    if abs(reference) < ZERO_TOL:
        return abs(value - reference) <= ZERO_TOL
    return abs(value - reference) <= REL_TOL * abs(reference)


def mismatches(got: torch.Tensor, expected: list[float], label: str) -> list[str]:
    """One line per grid point where ``got`` does not agree with ``expected``."""
    q1, q2, _, rho = (t.tolist() for t in grid_tensors())
    out = []
    for i, (value, ref) in enumerate(zip(got.tolist(), expected, strict=True)):
        if not agrees(value, ref):
            error = abs(value - ref) / abs(ref) if ref else abs(value)
            out.append(
                f"{label} at q1={q1[i]}, q2={q2[i]}, rho={rho[i]}: "
                f"got {value!r}, reference {ref!r} (error {error:.2e})"
            )
    return out


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_closed_form_maps_match_scipy_quadrature(name):
    activation, phi, phi_prime = CLOSED_FORMS[name]
    q1, q2, c, rho = grid_tensors()
    nngp = activation.nngp_map(q1, q2, c, rho)
    derivative = activation.derivative_map(q1, q2, c, rho)
    assert nngp.dtype == DTYPE and derivative.dtype == DTYPE
    assert nngp.shape == derivative.shape == rho.shape

    points = list(zip(q1.tolist(), q2.tolist(), rho.tolist(), strict=True))
    ref_nngp = [gaussian_expectation(phi, phi, *p) for p in points]
    if phi_prime is None:
        ref_derivative = [0.0] * len(points)
    else:
        ref_derivative = [gaussian_expectation(phi_prime, phi_prime, *p) for p in points]

    errors = mismatches(nngp, ref_nngp, "nngp_map")
    errors += mismatches(derivative, ref_derivative, "derivative_map")
    assert not errors, "\n".join(errors)


def test_reference_integrator_is_accurate():
    """Sanity check of the reference itself on moments known in closed form."""
    identity = lambda x: x  # noqa: E731
    square = lambda x: x * x  # noqa: E731
    for q1, q2 in VARIANCES:
        for rho in CORRELATIONS:
            c = rho * math.sqrt(q1 * q2)
            # E[u v] = c and E[u^2 v^2] = q1 q2 + 2 c^2 (Isserlis).
            assert math.isclose(
                gaussian_expectation(identity, identity, q1, q2, rho), c, abs_tol=1e-12
            )
            assert math.isclose(
                gaussian_expectation(square, square, q1, q2, rho),
                q1 * q2 + 2 * c * c,
                rel_tol=1e-10,
            )


# --------------------------------------------------------------------------------------
# Grothendieck's identity
# --------------------------------------------------------------------------------------


def test_sign_map_is_grothendieck_identity():
    rho = torch.tensor([i / 20 for i in range(-20, 21)], dtype=DTYPE)  # exact -1, 0, 1
    q1 = torch.full_like(rho, 0.7)
    q2 = torch.full_like(rho, 2.3)
    got = wn.Sign().nngp_map(q1, q2, rho * torch.sqrt(q1 * q2), rho)
    expected = 2.0 / np.pi * np.arcsin(rho.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14, atol=1e-15)
    assert got[0].item() == -1.0 and got[-1].item() == 1.0 and got[20].item() == 0.0


def cosine_matrix(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    n1 = np.linalg.norm(x1, axis=1)
    n2 = np.linalg.norm(x2, axis=1)
    return np.clip((x1 @ x2.T) / np.outer(n1, n2), -1.0, 1.0)


def test_sign_network_is_grothendieck_identity():
    net = wn.Sequential(wn.Linear(3, 1.0), wn.Sign())
    x1 = random_inputs(7, 4, seed=11)
    x2 = random_inputs(5, 4, seed=12)
    a, b = x1.numpy(), x2.numpy()

    cross = net.kernel(x1, x2, get="nngp")
    expected = 2.0 / np.pi * np.arcsin(cosine_matrix(a, b))
    np.testing.assert_allclose(cross.numpy(), expected, rtol=1e-12, atol=1e-13)

    symmetric = net.kernel(x1, get="nngp")
    expected = 2.0 / np.pi * np.arcsin(cosine_matrix(a, a))
    np.testing.assert_allclose(symmetric.numpy(), expected, rtol=1e-12, atol=1e-13)
    assert torch.equal(torch.diagonal(symmetric), torch.ones(7, dtype=DTYPE))

    # The derivative of sign is 0 almost everywhere: the NTK after Sign vanishes.
    ntk = net.kernel(x1, x2, get="ntk")
    assert torch.equal(ntk, torch.zeros_like(ntk))


# --------------------------------------------------------------------------------------
# Rectified monomials on the diagonal
# --------------------------------------------------------------------------------------


def double_factorial(n: int) -> int:
    """``n!!`` with ``(-1)!! = 0!! = 1``."""
    return math.prod(range(n, 0, -2))


@pytest.mark.parametrize("n", range(9))
def test_rectified_monomial_diagonal(n):
    q_values = [1e-3, 0.3, 1.0, 1.7, 2.7, 10.0]
    q = torch.tensor(q_values, dtype=DTYPE)
    one = torch.ones_like(q)
    activation = wn.RectifiedMonomial(n)

    # E[relu(u)^(2n)] = q^n (2n - 1)!! / 2 for u ~ N(0, q).
    nngp = activation.nngp_map(q, q, q, one)
    for got, qi in zip(nngp.tolist(), q_values, strict=True):
        expected = qi**n * double_factorial(2 * n - 1) / 2
        assert math.isclose(got, expected, rel_tol=1e-14), (qi, got, expected)

    # E[(n relu(u)^(n-1))^2] = n^2 q^(n-1) (2n - 3)!! / 2.
    derivative = activation.derivative_map(q, q, q, one)
    for got, qi in zip(derivative.tolist(), q_values, strict=True):
        expected = 0.0 if n == 0 else n * n * qi ** (n - 1) * double_factorial(2 * n - 3) / 2
        assert math.isclose(got, expected, rel_tol=1e-14), (qi, got, expected)

    # Zero variance: finite (rho = 1 on a diagonal, rho = 0 from gaussian.correlation).
    zero = torch.zeros(2, dtype=DTYPE)
    rho = torch.tensor([1.0, 0.0], dtype=DTYPE)
    for values in (
        activation.nngp_map(zero, zero, zero, rho),
        activation.derivative_map(zero, zero, zero, rho),
    ):
        assert torch.isfinite(values).all()
    if n >= 1:
        assert torch.equal(activation.nngp_map(zero, zero, zero, rho), zero)


def test_rectified_monomial_maps_nonnegative_near_anticorrelation():
    """``E[relu(u)^n relu(v)^n] >= 0`` (and its derivative map), also as ``rho -> -1``."""
    rho = torch.linspace(-1.0, -0.9, 2001, dtype=DTYPE)
    q = torch.full_like(rho, 2.0)
    negative = {}
    for n in range(9):
        activation = wn.RectifiedMonomial(n)
        for label in ("nngp_map", "derivative_map"):
            values = getattr(activation, label)(q, q, rho * q, rho)
            if (values < 0).any():
                worst = values.argmin()
                negative[f"n={n} {label}"] = (rho[worst].item(), values[worst].item())
    assert not negative, f"negative moments (rho, value): {negative}"


# --------------------------------------------------------------------------------------
# Elementwise (Gauss--Hermite) against the closed forms, through a network
# --------------------------------------------------------------------------------------


def random_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def two_layer_net(activation: wn.Layer) -> wn.Sequential:
    return wn.Sequential(
        wn.Linear(8, 1.5, 0.1), activation, wn.Linear(8, 1.2, 0.1), activation, wn.Linear(1)
    )


def exact_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * 0.5 * (1 + torch.erf(x / math.sqrt(2)))


ELEMENTWISE_PAIRS = {
    "erf": (lambda: wn.Elementwise(torch.erf), wn.Erf),
    "sin": (lambda: wn.Elementwise(torch.sin), wn.Sin),
    "gelu": (lambda: wn.Elementwise(exact_gelu), wn.GELU),
}


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs() / expected.abs()).max().item()


@pytest.mark.parametrize("name", sorted(ELEMENTWISE_PAIRS))
def test_elementwise_quadrature_matches_closed_form(name):
    """The documented accuracy of ``Elementwise`` (degree 64): 1e-8 relative."""
    numerical, closed = ELEMENTWISE_PAIRS[name]
    x1, x2 = random_inputs(6, 4, seed=21), random_inputs(5, 4, seed=22)
    got = two_layer_net(numerical()).kernel(x1, x2, get=("nngp", "ntk"))
    expected = two_layer_net(closed()).kernel(x1, x2, get=("nngp", "ntk"))
    errors = {}
    for kind in ("nngp", "ntk"):
        a, b = getattr(got, kind), getattr(expected, kind)
        assert a.dtype == DTYPE and a.shape == b.shape == (6, 5)
        errors[kind] = max_relative_error(a, b)
    assert max(errors.values()) <= 1e-8, f"{name}: max relative errors {errors}"


EXPLICIT_DERIVATIVES = {
    "erf": (torch.erf, lambda x: 2 / math.sqrt(math.pi) * torch.exp(-x * x)),
    "sin": (torch.sin, torch.cos),
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
}


@pytest.mark.parametrize("name", sorted(EXPLICIT_DERIVATIVES))
def test_elementwise_explicit_derivative_matches_autograd(name):
    fn, fn_prime = EXPLICIT_DERIVATIVES[name]
    explicit, autograd = wn.Elementwise(fn, fn_prime), wn.Elementwise(fn)
    q1, q2, c, rho = grid_tensors()
    torch.testing.assert_close(
        explicit.nngp_map(q1, q2, c, rho), autograd.nngp_map(q1, q2, c, rho), rtol=0, atol=0
    )
    torch.testing.assert_close(
        explicit.derivative_map(q1, q2, c, rho),
        autograd.derivative_map(q1, q2, c, rho),
        rtol=1e-12,
        atol=0,
    )
    # The same through a network (one hidden layer keeps it cheap).
    x1, x2 = random_inputs(6, 4, seed=31), random_inputs(5, 4, seed=32)
    ntk_explicit, ntk_autograd = (
        wn.Sequential(wn.Linear(8, 1.5, 0.1), act, wn.Linear(1)).kernel(x1, x2, get="ntk")
        for act in (explicit, autograd)
    )
    torch.testing.assert_close(ntk_explicit, ntk_autograd, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------
# Finite forward
# --------------------------------------------------------------------------------------


def forward_input() -> torch.Tensor:
    x = 2.5 * random_inputs(1, 200, seed=41).reshape(-1)
    return torch.cat([x, torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-300, -1e-300], dtype=DTYPE)])


def step_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.heaviside(x, torch.zeros((), dtype=x.dtype))


# name -> (activation, torch reference, exact?)
FORWARDS = {
    "relu": (wn.ReLU(), torch.relu, True),
    "leaky_relu": (wn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2), True),
    "ab_relu": (
        wn.ABReLU(-0.5, 1.5),
        lambda x: -0.5 * torch.clamp(x, max=0) + 1.5 * torch.clamp(x, min=0),
        True,
    ),
    "abs": (wn.Abs(), torch.abs, True),
    "erf": (wn.Erf(), torch.erf, True),
    "erf_scaled": (wn.Erf(0.7, 2.0, 0.3), lambda x: 0.7 * torch.erf(2.0 * x) + 0.3, False),
    "sign": (wn.Sign(), torch.sign, True),
    "step": (wn.Step(), step_reference, True),
    "monomial0": (wn.RectifiedMonomial(0), step_reference, True),
    "monomial1": (wn.RectifiedMonomial(1), torch.relu, True),
    "monomial3": (wn.RectifiedMonomial(3), lambda x: torch.relu(x) ** 3, True),
    "gelu": (wn.GELU(), F.gelu, True),
    "gelu_tanh": (wn.GELU(approximate=True), lambda x: F.gelu(x, approximate="tanh"), True),
    "sin": (wn.Sin(1.3, 0.8, 0.4), lambda x: 1.3 * torch.sin(0.8 * x + 0.4), False),
    "cos": (wn.Cos(0.9, 1.2, -0.3), lambda x: 0.9 * torch.cos(1.2 * x - 0.3), False),
    "rbf": (
        wn.Rbf(0.6),
        lambda x: math.sqrt(2) * torch.sin(math.sqrt(1.2) * x + math.pi / 4),
        False,
    ),
    "identity": (wn.Identity(), lambda x: x, True),
    "elementwise_tanh": (wn.Elementwise(torch.tanh), torch.tanh, True),
}


@pytest.mark.parametrize("name", sorted(FORWARDS))
def test_apply_matches_torch_reference(name):
    activation, reference, exact = FORWARDS[name]
    x = forward_input()
    got = activation.apply(x)
    expected = reference(x)
    assert got.dtype == DTYPE and got.shape == x.shape
    tol = 0.0 if exact else 1e-14
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert not torch.isnan(got).any()


def test_apply_preserves_zero_conventions():
    x = torch.tensor([-0.0, 0.0], dtype=DTYPE)
    for activation in (wn.ReLU(), wn.Step(), wn.Sign(), wn.RectifiedMonomial(0)):
        assert torch.equal(activation.apply(x), torch.zeros(2, dtype=DTYPE)), activation


# --------------------------------------------------------------------------------------
# Cos as a shifted Sin; the Rbf map is the RBF kernel
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("a, b, c", [(1.0, 1.0, 0.0), (0.9, 1.2, -0.3), (2.0, 0.5, 1.1)])
def test_cos_is_shifted_sin(a, b, c):
    q1, q2, cov, rho = grid_tensors()
    cos, sin = wn.Cos(a, b, c), wn.Sin(a, b, c + math.pi / 2)
    torch.testing.assert_close(
        cos.nngp_map(q1, q2, cov, rho), sin.nngp_map(q1, q2, cov, rho), rtol=1e-14, atol=1e-15
    )
    torch.testing.assert_close(
        cos.derivative_map(q1, q2, cov, rho),
        sin.derivative_map(q1, q2, cov, rho),
        rtol=1e-14,
        atol=1e-15,
    )
    x = forward_input()
    torch.testing.assert_close(cos.apply(x), sin.apply(x), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("gamma", [0.1, 0.6, 2.0])
def test_rbf_map_is_rbf_kernel(gamma):
    q1, q2, c, rho = grid_tensors()
    # Add far-apart points (u - v has a large variance): the kernel value is tiny there.
    q1 = torch.cat([q1, torch.tensor([9.0, 25.0], dtype=DTYPE)])
    q2 = torch.cat([q2, torch.tensor([9.0, 25.0], dtype=DTYPE)])
    c = torch.cat([c, torch.tensor([-9.0, -25.0], dtype=DTYPE)])
    rho = torch.cat([rho, torch.tensor([-1.0, -1.0], dtype=DTYPE)])
    rbf = wn.Rbf(gamma)
    expected = torch.exp(-gamma * (q1 + q2 - 2 * c))
    torch.testing.assert_close(rbf.nngp_map(q1, q2, c, rho), expected, rtol=1e-14, atol=0)
    # phi' = sqrt(2) sqrt(2 gamma) cos(...): E[phi'(u) phi'(v)] = 2 gamma exp(-gamma E(u - v)^2)
    torch.testing.assert_close(
        rbf.derivative_map(q1, q2, c, rho), 2 * gamma * expected, rtol=1e-14, atol=0
    )
