"""Monte Carlo estimates from finite convolutional twins converge to the exact kernels.

The convolutional counterpart of ``tests/test_monte_carlo.py``, with the same method:
each case samples finite twins (``net.build``) with ``NARROW`` and ``WIDE`` channels
from seeded generators and compares their averaged empirical kernels
(``wn.monte_carlo_kernel``) with the exact kernel (``net.kernel``). At each width the
error is the root-mean-square, over several independent estimates of
``SAMPLES_PER_ESTIMATE`` twins each, of the relative Frobenius error
``||MC - exact|| / ||exact||`` (see that module for why a single estimate is not enough).
The error scales like ``1 / sqrt(channels)``, so 16 times more channels should make it
about 4 times smaller; the tests ask for at least 2. NTK cases use one output; NNGP cases
use a read-out as wide as the hidden layers (the empirical NNGP of one output is a
product of two Gaussians, whose noise does not shrink with the channels).

Inputs are tiny so that the widest twins stay cheap: 4 and 3 images of 2 channels, 5 x 5
pixels (7 x 7 for the strided network), or 1-D signals of length 8. The module takes
about 40 s on one thread of a 2-core machine, almost all of it in the NTK Jacobians of
the 512-channel twins.

The Erf NNGP is checked with ``x2=None``: its cross-kernel between independent random
images is small (Frobenius norm 0.49 against 2.4 for ``x2=None``), so the same absolute
noise gives a relative error of 0.25 to 0.36 at 512 channels (1.0 to 1.2 at 32, still
about 4 times smaller), which says nothing more about the package.

The last tests check the twin itself: output shapes, reproducible sampling, and the scale
of a single convolution's parameters against a formula written here from patches.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import widenets as wn
from tests.test_monte_carlo import check_build_is_reproducible, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPE = torch.float64
N1, N2, C_IN = 4, 3, 2
NARROW, WIDE = 32, 512
SEED = 20241
SAMPLES_PER_ESTIMATE = 2
# Narrow twins are cheap, so they get more estimates (a more precise RMS).
N_ESTIMATES = {NARROW: 16, WIDE: 8}
W_STD, B_STD = 1.5, 0.05

# Bounds on the RMS relative error of a SAMPLES_PER_ESTIMATE-twin estimate with WIDE
# channels. Measured with SEED at 512 channels (32 in brackets): NTK 0.029 (0.135)
# relu_flatten, 0.042 (0.178) relu_gap, 0.034 (0.216) strided_pool, 0.064 (0.257)
# erf_circular, 0.060 (0.202) conv1d, 0.031 (0.111) residual, 0.017 (0.065) layernorm;
# NNGP 0.067 (0.264) relu_gap, 0.068 (0.293) erf_circular, 0.043 (0.223) residual.
# Over 8 seeds per case (SEED and 11 to 17) the largest were 0.070 (NTK, erf_circular)
# and 0.073 (NNGP, erf_circular), and the smallest improvement from 32 to 512 channels
# was 2.6 times (median 4.2). Each bound is about twice the largest error measured
# with SEED for that kernel.
NTK_ERROR_BOUND_WIDE = 0.13  # about 4.2 / sqrt(WIDE * SAMPLES_PER_ESTIMATE)
NNGP_ERROR_BOUND_WIDE = 0.14  # about 3.2 / sqrt(WIDE)
ERROR_BOUND_WIDE = {"ntk": NTK_ERROR_BOUND_WIDE, "nngp": NNGP_ERROR_BOUND_WIDE}
# 16 times more channels: the error should be about sqrt(16) = 4 times smaller. Ask for 2.
MIN_IMPROVEMENT = 2.0


def _inputs(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=DTYPE, generator=generator)


SHAPES = {"image": (C_IN, 5, 5), "image7": (C_IN, 7, 7), "signal": (C_IN, 8)}
INPUTS = {
    name: (_inputs(N1, shape, seed=21 + 2 * i), _inputs(N2, shape, seed=22 + 2 * i))
    for i, (name, shape) in enumerate(SHAPES.items())
}


# ------------------------------------------------------------------ architectures
def _conv(c: int, ndim: int = 2, **kwargs) -> wn.Layer:
    options = {"padding": "same", "W_std": W_STD, "b_std": B_STD} | kwargs
    return {1: wn.Conv1d, 2: wn.Conv2d}[ndim](c, 3, **options)


def _readout(n_out: int) -> wn.Linear:
    return wn.Linear(n_out, W_std=W_STD, b_std=B_STD)


def relu_flatten(c: int, n_out: int) -> wn.Sequential:
    """Two 'same' 3 x 3 convolutions with ReLU, Flatten, read-out."""
    return wn.Sequential(
        _conv(c), wn.ReLU(), _conv(c), wn.ReLU(), wn.Flatten(), _readout(n_out)
    )


def relu_gap(c: int, n_out: int) -> wn.Sequential:
    """Two 'same' 3 x 3 convolutions with ReLU, global average pooling, read-out."""
    return wn.Sequential(
        _conv(c), wn.ReLU(), _conv(c), wn.ReLU(), wn.GlobalAvgPool(), _readout(n_out)
    )


def strided_pool(c: int, n_out: int) -> wn.Sequential:
    """7 x 7: 'valid' stride-2 convolution (3 x 3), 'same' convolution, 2 x 2 pooling."""
    return wn.Sequential(
        _conv(c, stride=2, padding="valid"), wn.ReLU(), _conv(c), wn.ReLU(),
        wn.AvgPool2d(2, stride=1), wn.Flatten(), _readout(n_out),
    )


def erf_circular(c: int, n_out: int) -> wn.Sequential:
    """Two circular convolutions with Erf, Flatten, read-out."""
    return wn.Sequential(
        _conv(c, padding="circular"), wn.Erf(), _conv(c, padding="circular"), wn.Erf(),
        wn.Flatten(), _readout(n_out),
    )


def conv1d(c: int, n_out: int) -> wn.Sequential:
    """1-D: 'same' then stride-1 'valid' convolution with ReLU, global pooling, read-out."""
    return wn.Sequential(
        _conv(c, ndim=1), wn.ReLU(), _conv(c, ndim=1, padding="valid"), wn.ReLU(),
        wn.GlobalAvgPool(), _readout(n_out),
    )


def residual(c: int, n_out: int) -> wn.Sequential:
    """Convolution, residual block (ReLU, convolution), ReLU, global pooling, read-out."""
    block = wn.Sequential(wn.ReLU(), _conv(c, W_std=1.0, b_std=0.1))
    return wn.Sequential(
        _conv(c), wn.Residual(block), wn.ReLU(), wn.GlobalAvgPool(), _readout(n_out)
    )


def layernorm(c: int, n_out: int) -> wn.Sequential:
    """Convolutions each followed by LayerNorm over channels, then ReLU; global pooling."""
    return wn.Sequential(
        _conv(c), wn.LayerNorm(), wn.ReLU(), _conv(c), wn.LayerNorm(), wn.ReLU(),
        wn.GlobalAvgPool(), _readout(n_out),
    )


# name: (architecture, input shape)
ARCHITECTURES = {
    "relu_flatten": (relu_flatten, "image"),
    "relu_gap": (relu_gap, "image"),
    "strided_pool": (strided_pool, "image7"),
    "erf_circular": (erf_circular, "image"),
    "conv1d": (conv1d, "signal"),
    "residual": (residual, "image"),
    "layernorm": (layernorm, "image"),
}

# (architecture, kernel, second input)
CONVERGENCE_CASES = [
    ("relu_flatten", "ntk", "x2=None"),
    ("relu_gap", "ntk", "x2=given"),
    ("relu_gap", "nngp", "x2=given"),
    ("strided_pool", "ntk", "x2=given"),
    ("erf_circular", "ntk", "x2=given"),
    ("erf_circular", "nngp", "x2=None"),
    ("conv1d", "ntk", "x2=given"),
    ("residual", "ntk", "x2=None"),
    ("residual", "nngp", "x2=given"),
    ("layernorm", "ntk", "x2=given"),
]


def _network(name: str, channels: int, kind: str) -> wn.Sequential:
    factory, _ = ARCHITECTURES[name]
    return factory(channels, n_out=channels if kind == "nngp" else 1)


def _pair(name: str, second: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    x1, x2 = INPUTS[ARCHITECTURES[name][1]]
    return x1, (None if second == "x2=None" else x2)


@functools.cache
def exact_kernel(name: str, kind: str, second: str) -> torch.Tensor:
    """The exact kernel (NTK parameterization: it does not depend on the channels)."""
    return _network(name, NARROW, kind).kernel(*_pair(name, second), get=kind)


@functools.cache
def monte_carlo_error(
    name: str, channels: int, kind: str, second: str, seed: int = SEED
) -> float:
    """RMS relative error of independent SAMPLES_PER_ESTIMATE-twin Monte Carlo estimates."""
    net = _network(name, channels, kind)
    x1, x2 = _pair(name, second)
    exact = exact_kernel(name, kind, second)
    generator = torch.Generator().manual_seed(seed)
    squared = 0.0
    n_estimates = N_ESTIMATES[channels]
    for _ in range(n_estimates):
        estimate = wn.monte_carlo_kernel(
            net, x1, x2, get=kind, n_samples=SAMPLES_PER_ESTIMATE, generator=generator
        )
        assert estimate.shape == exact.shape == (N1, N1 if x2 is None else N2)
        assert estimate.dtype == DTYPE
        squared += relative_error(estimate, exact) ** 2
    return math.sqrt(squared / n_estimates)


def _case_id(case: tuple[str, str, str]) -> str:
    return "-".join(case)


@pytest.mark.parametrize("case", CONVERGENCE_CASES, ids=_case_id)
def test_conv_monte_carlo_converges_to_exact_kernel(case):
    name, kind, second = case
    narrow = monte_carlo_error(name, NARROW, kind, second)
    wide = monte_carlo_error(name, WIDE, kind, second)
    report = (
        f"{_case_id(case)}: error {narrow:.4f} at {NARROW} channels, "
        f"{wide:.4f} at {WIDE} channels"
    )
    assert wide < ERROR_BOUND_WIDE[kind], report
    assert wide <= narrow / MIN_IMPROVEMENT, report


# ------------------------------------------------------------------ the twin itself
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("n_out", [1, 3])
def test_twin_output_shape(name, n_out):
    factory, shape = ARCHITECTURES[name]
    net = factory(8, n_out=n_out)
    model = net.build(SHAPES[shape], generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    assert isinstance(model, torch.nn.Module)
    x1, x2 = INPUTS[shape]
    out = model(x1)
    assert out.shape == (N1, n_out)
    assert out.dtype == DTYPE
    assert model(x2).shape == (N2, n_out)
    assert all(p.dtype == DTYPE for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_build_is_reproducible_with_a_generator(name):
    factory, shape = ARCHITECTURES[name]
    check_build_is_reproducible(factory(8, n_out=2), SHAPES[shape], INPUTS[shape][0])


def _patches(x: torch.Tensor, stride: int, padding: str) -> torch.Tensor:
    """3 x 3 patches ``(N, C * 9, positions)`` of 5 x 5 images, padded as the layer says.

    For 5 x 5 images and 3 x 3 filters, 'same' pads one pixel on each side for strides 1
    and 2 (outputs 5 x 5 and 3 x 3); 'circular' wraps that pixel around.
    """
    assert x.shape[2:] == (5, 5)
    if padding == "same":
        x = F.pad(x, (1, 1, 1, 1))
    elif padding == "circular":
        x = F.pad(x, (1, 1, 1, 1), mode="circular")
    return F.unfold(x, 3, stride=stride)


def single_conv_kernel(x1, x2, stride, padding, pool, W_std, b_std):
    """Kernel of one 3 x 3 convolution then GlobalAvgPool or Flatten, from patches.

    In the NTK parameterization a channel is ``W_std / sqrt(C * 9) w . patch_p + b_std b``
    at output position ``p``. With global pooling both kernels are
    ``W_std^2 / (C * 9) mean_p patch_p(x) . mean_q patch_q(x') + b_std^2``; flattened, the
    average over outputs is ``W_std^2 / (C * 9) mean_p patch_p(x) . patch_p(x') + b_std^2``.
    """
    p1, p2 = _patches(x1, stride, padding), _patches(x2, stride, padding)
    fan_in = p1.shape[1]
    if pool == "gap":
        dots = p1.mean(2) @ p2.mean(2).T
    else:
        dots = torch.einsum("ncp,mcp->nm", p1, p2) / p1.shape[2]
    return W_std**2 * dots / fan_in + (b_std or 0.0) ** 2


SINGLE_CONV_CASES = [
    ("same", 1), ("valid", 1), ("circular", 1), ("valid", 2), ("same", 2),
]
POOLS = {"gap": wn.GlobalAvgPool, "flatten": wn.Flatten}


def _single_conv(channels, padding, stride, pool, W_std, b_std) -> wn.Sequential:
    conv = wn.Conv2d(channels, 3, stride=stride, padding=padding, W_std=W_std, b_std=b_std)
    return wn.Sequential(conv, POOLS[pool]())


@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("padding,stride", SINGLE_CONV_CASES)
def test_single_conv_outputs_have_declared_variance(padding, stride, pool):
    """The forward pass of one wide convolution has the exact single-layer NNGP.

    The empirical NNGP averages over 4096 independent channels (and the positions when
    flattened), so its relative error is a few times 1 / sqrt(4096): 0.012 to 0.038
    measured over 3 seeds and all these cases, far below the 0.1 asserted here; a wrong
    weight or bias scale (e.g. a fan-in without the filter size) would be off by a factor
    of order one. The exact kernel must also match the formula written from patches.
    """
    W_std, b_std = 1.3, 0.8
    x1, x2 = INPUTS["image"]
    net = _single_conv(4096, padding, stride, pool, W_std, b_std)
    model = net.build(SHAPES["image"], generator=torch.Generator().manual_seed(4), dtype=DTYPE)
    expected = single_conv_kernel(x1, x2, stride, padding, pool, W_std, b_std)
    exact = net.kernel(x1, x2, get="nngp")
    torch.testing.assert_close(exact, expected, rtol=1e-12, atol=1e-12)
    empirical = wn.empirical_nngp(model, x1, x2)
    assert relative_error(empirical, exact) < 0.1


@pytest.mark.parametrize("b_std", [0.8, None])
@pytest.mark.parametrize("pool", sorted(POOLS))
@pytest.mark.parametrize("padding,stride", SINGLE_CONV_CASES)
def test_single_conv_empirical_ntk_is_exact(padding, stride, pool, b_std):
    """One convolution on raw inputs: the Jacobian does not depend on the weights.

    So the empirical NTK of any twin equals the exact NTK (and the patch formula).
    """
    W_std = 1.3
    x1, x2 = INPUTS["image"]
    net = _single_conv(3, padding, stride, pool, W_std, b_std)
    model = net.build(SHAPES["image"], generator=torch.Generator().manual_seed(3), dtype=DTYPE)
    expected = single_conv_kernel(x1, x2, stride, padding, pool, W_std, b_std)
    exact = net.kernel(x1, x2, get="ntk")
    torch.testing.assert_close(exact, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wn.empirical_ntk(model, x1, x2), exact, rtol=1e-12, atol=1e-12)
