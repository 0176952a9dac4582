"""Identities the kernels must satisfy: symmetry, PSD, homogeneity, stability."""

from __future__ import annotations

import math

import pytest
import torch

import widenets as wn
from tests.conftest import random_inputs

ACTIVATIONS = {
    "relu": wn.ReLU, "leaky": lambda: wn.LeakyReLU(0.1), "abrelu": lambda: wn.ABReLU(-0.3, 1.2),
    "abs": wn.Abs, "erf": lambda: wn.Erf(1.2, 0.8, 0.1), "sign": wn.Sign, "step": wn.Step,
    "monomial3": lambda: wn.RectifiedMonomial(3), "gelu": wn.GELU, "sin": lambda: wn.Sin(1, 1, 0.2),
    "cos": wn.Cos, "rbf": lambda: wn.Rbf(0.5), "identity": wn.Identity,
    "elementwise_tanh": lambda: wn.Elementwise(torch.tanh, degree=24),
}


def mlp(activation, depth=3, b_std=0.1):
    layers = []
    for _ in range(depth):
        layers += [wn.Linear(32, 1.4, b_std), activation()]
    return wn.Sequential(*layers, wn.Linear(1, 1.0, b_std))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_symmetric_psd_and_consistent(name):
    net = mlp(ACTIVATIONS[name])
    x = random_inputs(12, 5, seed=1)
    k = net.kernel(x, None, get=("nngp", "ntk"))
    for matrix in (k.nngp, k.ntk):
        assert torch.isfinite(matrix).all()
        torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=0)
        eigenvalues = torch.linalg.eigvalsh(matrix)
        assert eigenvalues.min() > -1e-10 * eigenvalues.max()
    # x2 given explicitly equals the symmetric computation (blocks of a joint kernel).
    k12 = net.kernel(x[:7], x[7:], get=("nngp", "ntk"))
    torch.testing.assert_close(k12.nngp, k.nngp[:7, 7:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(k12.ntk, k.ntk[:7, 7:], rtol=1e-9, atol=1e-12)
    # K(x2, x1) = K(x1, x2)^T
    k21 = net.kernel(x[7:], x[:7], get="ntk")
    torch.testing.assert_close(k21, k12.ntk.T, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("a", [0.5, 2.0, 7.3])
def test_relu_homogeneity_without_bias(a):
    net = wn.Sequential(wn.Linear(8, 1.3), wn.ReLU(), wn.Linear(8, 0.9), wn.ReLU(), wn.Linear(1))
    x1, x2 = random_inputs(4, 6, seed=2), random_inputs(3, 6, seed=3)
    for get in ("nngp", "ntk"):
        torch.testing.assert_close(
            net.kernel(a * x1, x2, get=get), a * net.kernel(x1, x2, get=get), rtol=1e-12, atol=0
        )


def test_one_layer_relu_closed_form():
    """K = W^2 |x||y| (sin t + (pi - t) cos t) / (2 pi d) for Linear-ReLU-Linear, no bias."""
    x1, x2 = random_inputs(4, 3, seed=4), random_inputs(5, 3, seed=5)
    net = wn.Sequential(wn.Linear(4, 1.0), wn.ReLU(), wn.Linear(1, 1.0))
    n1, n2 = x1.norm(dim=1)[:, None], x2.norm(dim=1)[None, :]
    cos = (x1 @ x2.T) / (n1 * n2)
    theta = torch.arccos(cos)
    expected = n1 * n2 / 3 * (torch.sin(theta) + (math.pi - theta) * cos) / (2 * math.pi)
    torch.testing.assert_close(net.kernel(x1, x2, get="nngp"), expected, rtol=1e-13, atol=0)
    # NTK = K_relu + (x.x'/d) * E[step step] = expected + x.x'/d (pi - theta) / (2 pi)
    ntk = expected + (x1 @ x2.T) / 3 * (math.pi - theta) / (2 * math.pi)
    torch.testing.assert_close(net.kernel(x1, x2, get="ntk"), ntk, rtol=1e-13, atol=0)


def test_overflow_is_an_error_not_inf():
    """max(x, 0)^3 multiplies the variance's exponent by 3 a layer: float64 overflows."""
    deep = mlp(lambda: wn.RectifiedMonomial(3), depth=50, b_std=0.05)
    with pytest.raises(ValueError, match="overflows"):
        deep.kernel(random_inputs(3, 5, seed=6), get="ntk")


BOUNDED_AT_DEPTH = sorted(set(ACTIVATIONS) - {"monomial3"})


@pytest.mark.parametrize("name", BOUNDED_AT_DEPTH)
def test_identical_inputs_zero_vectors_and_depth_50(name):
    x = random_inputs(4, 5, seed=6)
    x = torch.cat([x, x[:1], torch.zeros(1, 5, dtype=torch.float64)])
    deep = mlp(ACTIVATIONS[name], depth=50, b_std=0.05)
    k = deep.kernel(x, None, get=("nngp", "ntk"))
    k12 = deep.kernel(x, x, get=("nngp", "ntk"))
    for matrix in (k.nngp, k.ntk, k12.nngp, k12.ntk):
        assert torch.isfinite(matrix).all()
    # Identical inputs give identical rows, in the symmetric and the general call.
    torch.testing.assert_close(k.nngp[0], k.nngp[4], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k12.ntk[0], k12.ntk[4], rtol=1e-12, atol=1e-12)


def test_diagonal_equals_variances():
    net = mlp(wn.Step, depth=4)
    x = random_inputs(6, 4, seed=7)
    k = net.kernel(x, None, get="nngp")
    single = torch.stack([net.kernel(x[i : i + 1], None, get="nngp")[0, 0] for i in range(6)])
    torch.testing.assert_close(k.diagonal(), single, rtol=0, atol=0)
    # A step network's units have E[step(u)^2] = 1/2 exactly on the diagonal.
    last = wn.Sequential(wn.Linear(4, 1.0), wn.Step())
    torch.testing.assert_close(
        last.kernel(x, None, get="nngp").diagonal(), torch.full((6,), 0.5, dtype=torch.float64),
        rtol=0, atol=0,
    )


def test_standard_parameterization_ntk_rule():
    """Standard parameterization: T' = fan_in K_in + 1 + W^2 T_in (Sohl-Dickstein et al.)."""
    x1, x2 = random_inputs(3, 4, seed=8), random_inputs(2, 4, seed=9)
    std = wn.Sequential(
        wn.Linear(16, 1.5, 0.2, "standard"), wn.ReLU(), wn.Linear(1, 1.1, 0.3, "standard")
    )
    ntk_param = wn.Sequential(wn.Linear(16, 1.5, 0.2), wn.ReLU(), wn.Linear(1, 1.1, 0.3))
    torch.testing.assert_close(
        std.kernel(x1, x2, get="nngp"), ntk_param.kernel(x1, x2, get="nngp"), rtol=1e-14, atol=0
    )
    first = wn.Sequential(wn.Linear(16, 1.5, 0.2), wn.ReLU())
    k_hidden = first.kernel(x1, x2, get=("nngp", "ntk"))
    step_moment = wn.Sequential(wn.Linear(16, 1.5, 0.2), wn.Step()).kernel(x1, x2, get="nngp")
    t_first = x1 @ x2.T + 1.0  # fan_in * (x.x'/d) + bias
    expected = 16 * k_hidden.nngp + 1.0 + 1.1**2 * t_first * step_moment
    torch.testing.assert_close(std.kernel(x1, x2, get="ntk"), expected, rtol=1e-12, atol=0)
