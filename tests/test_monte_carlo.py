"""Monte Carlo estimates from the finite twins converge to the exact NNGP and NTK.

Each convergence case samples finite twins (``net.build``) at widths 128 and 2048 from
seeded generators and compares their averaged empirical kernels with the exact kernel
from ``net.kernel``. The error scales like ``1 / sqrt(width)``, so going from 128 to 2048
(16 times wider) should make it about 4 times smaller; the tests ask for at least 2.

Error measure. Each network's Monte Carlo error is mostly one or two random directions
(for example the overall scale of the readout weights), so the size of one estimate's
error can easily be half or double its typical value, and a ratio of two such errors
would depend on the seed. So at each width we draw several independent estimates of
``SAMPLES_PER_ESTIMATE`` twins each and use the root-mean-square of their relative
Frobenius errors ``||MC - exact|| / ||exact||``: an estimate of the typical error of a
``SAMPLES_PER_ESTIMATE``-twin Monte Carlo estimate that varies much less with the seed.
Narrow twins are cheap, so width 128 gets more estimates (a more precise value) than
width 2048; both estimate the same quantity.

Readouts. The empirical NNGP of a network with one output is a product of two Gaussian
outputs, so its noise is of order one at every width. The NNGP cases therefore use a
readout as wide as the hidden layers, and ``monte_carlo_kernel`` averages over those
outputs. The empirical NTK already averages over the hidden units, so the NTK cases use
a single output (the Jacobian of a 2048-wide readout would be too large).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import widenets as wn

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
N1, N2, D = 5, 4, 6
NARROW, WIDE = 128, 2048
SEED = 20240
SAMPLES_PER_ESTIMATE = 2
N_ESTIMATES = {NARROW: 16, WIDE: 4}

# Bounds on the root-mean-square relative error of a SAMPLES_PER_ESTIMATE-twin estimate at
# width WIDE. The NTK error (one output) has a standard deviation of order
# 1 / sqrt(width * n_samples); the NNGP error (readout as wide as the network) is the
# finite-width error of order 1 / sqrt(width). Measured at width 2048 with SEED (width 128
# in brackets): NTK 0.038 (0.160) ReLU, 0.036 (0.141) Erf, 0.037 (0.157) residual,
# 0.051 (0.185) ReLU standard parameterization, 0.024 (0.114) LayerNorm; NNGP 0.067
# (0.267) ReLU, 0.054 (0.202) Erf, 0.075 (0.271) residual. Over 8 to 12 seeds per case
# the largest were 0.065 (NTK) and 0.086 (NNGP), and the smallest improvement from 128 to
# 2048 was 2.6 times. Each bound is twice the largest error measured with SEED for that
# kernel.
NTK_ERROR_BOUND_WIDE = 0.10  # about 6.4 / sqrt(WIDE * SAMPLES_PER_ESTIMATE)
NNGP_ERROR_BOUND_WIDE = 0.15  # about 6.8 / sqrt(WIDE)
ERROR_BOUND_WIDE = {"ntk": NTK_ERROR_BOUND_WIDE, "nngp": NNGP_ERROR_BOUND_WIDE}
# 16 times wider: the error should be about sqrt(16) = 4 times smaller. Ask for at least 2.
MIN_IMPROVEMENT = 2.0


def _inputs(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, dtype=DTYPE, generator=generator)


X1 = _inputs(N1, seed=11)
X2 = _inputs(N2, seed=12)
SECOND = {"x2=None": None, "x2=given": X2}


def _linear(width: int, parameterization: str, W_std: float = 1.5, b_std: float = 0.05):
    return wn.Linear(width, W_std=W_std, b_std=b_std, parameterization=parameterization)


def two_hidden_mlp(
    activation, width: int, n_out: int = 1, parameterization: str = "ntk"
) -> wn.Sequential:
    """Linear, activation, Linear, activation, Linear (read-out of ``n_out`` outputs)."""
    p = parameterization
    return wn.Sequential(
        _linear(width, p), activation(), _linear(width, p), activation(), _linear(n_out, p)
    )


relu_mlp = functools.partial(two_hidden_mlp, wn.ReLU)
erf_mlp = functools.partial(two_hidden_mlp, wn.Erf)
gelu_mlp = functools.partial(two_hidden_mlp, wn.GELU)


def residual_net(width: int, n_out: int = 1, parameterization: str = "ntk") -> wn.Sequential:
    p = parameterization
    block = wn.Sequential(wn.ReLU(), _linear(width, p, W_std=1.0, b_std=0.1))
    return wn.Sequential(_linear(width, p), wn.Residual(block), wn.ReLU(), _linear(n_out, p))


def layernorm_mlp(width: int, n_out: int = 1, parameterization: str = "ntk") -> wn.Sequential:
    p = parameterization
    return wn.Sequential(
        _linear(width, p), wn.LayerNorm(), wn.ReLU(),
        _linear(width, p), wn.LayerNorm(), wn.ReLU(),
        _linear(n_out, p),
    )


ARCHITECTURES = {
    "relu": relu_mlp, "erf": erf_mlp, "residual": residual_net, "gelu": gelu_mlp,
    "layernorm": layernorm_mlp,
}

# (architecture, kernel, parameterization, second input). The ReLU, Erf and residual
# networks are each checked with x2=None and with x2 given, one kernel each.
CONVERGENCE_CASES = [
    ("relu", "ntk", "ntk", "x2=None"),
    ("relu", "nngp", "ntk", "x2=given"),
    ("erf", "ntk", "ntk", "x2=given"),
    ("erf", "nngp", "ntk", "x2=None"),
    ("residual", "ntk", "ntk", "x2=None"),
    ("residual", "nngp", "ntk", "x2=given"),
    ("relu", "ntk", "standard", "x2=given"),
    ("layernorm", "ntk", "ntk", "x2=given"),
]


def _architecture(name: str, width: int, kind: str, parameterization: str) -> wn.Sequential:
    n_out = width if kind == "nngp" else 1
    return ARCHITECTURES[name](width, n_out=n_out, parameterization=parameterization)


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return (torch.linalg.norm(estimate - exact) / torch.linalg.norm(exact)).item()


@functools.cache
def exact_kernel(name: str, width: int, kind: str, parameterization: str, second: str):
    """The exact kernel (it depends on the width only in the standard parameterization)."""
    net = _architecture(name, width, kind, parameterization)
    return net.kernel(X1, SECOND[second], get=kind)


@functools.cache
def monte_carlo_error(
    name: str, width: int, kind: str, parameterization: str, second: str, seed: int = SEED
) -> float:
    """RMS relative error of independent SAMPLES_PER_ESTIMATE-twin Monte Carlo estimates."""
    net = _architecture(name, width, kind, parameterization)
    exact = exact_kernel(name, width, kind, parameterization, second)
    generator = torch.Generator().manual_seed(seed)
    squared = 0.0
    for _ in range(N_ESTIMATES[width]):
        estimate = wn.monte_carlo_kernel(
            net, X1, SECOND[second], get=kind, n_samples=SAMPLES_PER_ESTIMATE, generator=generator
        )
        assert estimate.shape == exact.shape
        assert estimate.dtype == DTYPE
        squared += relative_error(estimate, exact) ** 2
    return math.sqrt(squared / N_ESTIMATES[width])


def _case_id(case: tuple[str, str, str, str]) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", CONVERGENCE_CASES, ids=_case_id)
def test_monte_carlo_converges_to_exact_kernel(case):
    name, kind, parameterization, second = case
    narrow = monte_carlo_error(name, NARROW, kind, parameterization, second)
    wide = monte_carlo_error(name, WIDE, kind, parameterization, second)
    report = f"{_case_id(case)}: error {narrow:.4f} at width {NARROW}, {wide:.4f} at width {WIDE}"
    assert wide < ERROR_BOUND_WIDE[kind], report
    assert wide <= narrow / MIN_IMPROVEMENT, report


# ------------------------------------------------------- the twin's parameterization
@pytest.mark.parametrize("second", sorted(SECOND))
@pytest.mark.parametrize("n_out", [1, 3])
@pytest.mark.parametrize("W_std,b_std", [(1.5, 0.05), (0.7, 2.0), (1.3, None)])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_single_linear_empirical_ntk_is_exact(parameterization, W_std, b_std, n_out, second):
    """One Linear layer on raw inputs: the Jacobian does not depend on the weights.

    NTK parameterization: ``f = (W_std / sqrt(d)) W x + b_std b``, so the empirical NTK
    is ``W_std^2 x.x' / d + b_std^2``; standard parameterization: ``f = W x + b``, so it
    is ``x.x' + 1`` (``x.x'`` without a bias), whatever the sampled weights.
    """
    x2 = SECOND[second]
    layer = wn.Linear(n_out, W_std=W_std, b_std=b_std, parameterization=parameterization)
    model = layer.build((D,), generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    empirical = wn.empirical_ntk(model, X1, x2)
    exact = layer.kernel(X1, x2, get="ntk")
    dots = X1 @ (X1 if x2 is None else x2).T
    if parameterization == "ntk":
        expected = W_std**2 * dots / D + (b_std or 0.0) ** 2
    else:
        expected = dots + (1.0 if b_std else 0.0)
    assert empirical.shape == exact.shape == (N1, N1 if x2 is None else N2)
    torch.testing.assert_close(exact, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(empirical, exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
def test_single_linear_outputs_have_declared_variance(parameterization):
    """The forward pass of the twin has the NNGP ``W_std^2 x.x' / d + b_std^2``.

    Averaged over 4096 independent outputs, the relative error is a few times
    1 / sqrt(4096) (about 0.04 measured), far below the 0.1 asserted here; a wrong
    weight or bias scale would be off by a factor of order one.
    """
    W_std, b_std, n_out = 1.3, 0.8, 4096
    layer = wn.Linear(n_out, W_std=W_std, b_std=b_std, parameterization=parameterization)
    model = layer.build((D,), generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    empirical = wn.empirical_nngp(model, X1, X2)
    exact = layer.kernel(X1, X2, get="nngp")
    torch.testing.assert_close(exact, W_std**2 * X1 @ X2.T / D + b_std**2, rtol=0, atol=1e-12)
    assert relative_error(empirical, exact) < 0.1


def test_standard_parameterization_ntk_grows_with_declared_width():
    """The standard-parameterization NTK is about proportional to the declared width.

    So the convergence tests compare with the exact kernel of the same width. In the NTK
    parameterization the exact kernels do not depend on the width.
    """
    narrow = relu_mlp(NARROW, parameterization="standard").kernel(X1, get="ntk")
    wide = relu_mlp(WIDE, parameterization="standard").kernel(X1, get="ntk")
    assert relative_error(wide / WIDE, narrow / NARROW) < 0.05
    ntk_narrow = relu_mlp(NARROW).kernel(X1, get="ntk")
    torch.testing.assert_close(relu_mlp(WIDE).kernel(X1, get="ntk"), ntk_narrow)


# --------------------------------------------------------- seeds and Monte Carlo API
def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_build_is_reproducible(net: wn.Layer, input_shape: tuple[int, ...], x: torch.Tensor):
    """Same seed, same twin; another seed, another twin; one generator used twice, two
    different twins (Monte Carlo relies on it)."""

    def build(seed: int) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(seed)
        return net.build(input_shape, generator=generator, dtype=DTYPE)

    first, again, other = build(7), build(7), build(8)
    params, again_params, other_params = map(_parameters, (first, again, other))
    assert params, "the twin has no parameters"
    assert all(p.dtype == DTYPE for p in params.values())
    assert again_params.keys() == params.keys() == other_params.keys()
    for key, value in params.items():
        assert torch.equal(value, again_params[key]), key
        assert not torch.equal(value, other_params[key]), key
    assert torch.equal(first(x), again(x))
    assert not torch.equal(first(x), other(x))

    generator = torch.Generator().manual_seed(7)
    one = _parameters(net.build(input_shape, generator=generator, dtype=DTYPE))
    two = _parameters(net.build(input_shape, generator=generator, dtype=DTYPE))
    assert all(torch.equal(one[k], params[k]) for k in params)
    assert not any(torch.equal(one[k], two[k]) for k in params)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_build_is_reproducible_with_a_generator(name):
    check_build_is_reproducible(ARCHITECTURES[name](16, n_out=2), (D,), X1)


@pytest.mark.parametrize("second", sorted(SECOND))
def test_monte_carlo_is_the_mean_of_the_sampled_twins(second):
    x2 = SECOND[second]
    net = relu_mlp(24, n_out=3)
    n_samples = 3
    generator = torch.Generator().manual_seed(5)
    twins = [net.build((D,), generator=generator, dtype=DTYPE) for _ in range(n_samples)]
    for kind, empirical in (("ntk", wn.empirical_ntk), ("nngp", wn.empirical_nngp)):
        expected = sum(empirical(twin, X1, x2) for twin in twins) / n_samples
        estimate = wn.monte_carlo_kernel(
            net, X1, x2, get=kind, n_samples=n_samples, generator=torch.Generator().manual_seed(5)
        )
        assert estimate.dtype == DTYPE
        torch.testing.assert_close(estimate, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("second", sorted(SECOND))
@pytest.mark.parametrize("get", [("nngp", "ntk"), ("ntk", "nngp")])
def test_monte_carlo_tuple_get_matches_separate_calls(get, second):
    x2 = SECOND[second]
    net = residual_net(32, n_out=2)

    def estimate(kinds):
        generator = torch.Generator().manual_seed(9)
        return wn.monte_carlo_kernel(net, X1, x2, get=kinds, n_samples=4, generator=generator)

    both = estimate(get)
    assert isinstance(both, wn.Kernels)
    shape = (N1, N1 if x2 is None else N2)
    for kind in ("nngp", "ntk"):
        assert both[kind].shape == shape
        torch.testing.assert_close(both[kind], estimate(kind), rtol=1e-13, atol=0)
    # Same seed, same estimate; another seed, another estimate.
    torch.testing.assert_close(estimate(get).ntk, both.ntk, rtol=0, atol=0)
    other = wn.monte_carlo_kernel(
        net, X1, x2, get="ntk", n_samples=4, generator=torch.Generator().manual_seed(10)
    )
    assert not torch.allclose(other, both.ntk)


@pytest.mark.parametrize("kind", ["nngp", "ntk"])
def test_monte_carlo_with_x2_is_a_block_of_the_joint_estimate(kind):
    """The same twins give ``K(x1, x2)`` as the off-diagonal block of ``K([x1; x2])``."""
    net = erf_mlp(24, n_out=2)

    def estimate(x1, x2=None):
        generator = torch.Generator().manual_seed(6)
        return wn.monte_carlo_kernel(net, x1, x2, get=kind, n_samples=3, generator=generator)

    joint = estimate(torch.cat([X1, X2]))
    assert joint.shape == (N1 + N2, N1 + N2)
    torch.testing.assert_close(joint, joint.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(estimate(X1, X2), joint[:N1, N1:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(estimate(X1), joint[:N1, :N1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("get", ["ntk", "nngp", ("nngp", "ntk")])
def test_monte_carlo_refuses_an_overflowing_kernel(get):
    """Inputs of order 1e200: every twin's kernel overflows float64. A clear error, never
    an average of infinities."""
    net = wn.Linear(2)
    with pytest.raises(ValueError, match=r"overflows torch.float64.*rescale the inputs"):
        wn.monte_carlo_kernel(net, X1 * 1e200, get=get, n_samples=2,
                              generator=torch.Generator().manual_seed(3))
