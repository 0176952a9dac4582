"""Branches, merges, residual blocks and LayerNorm: exact rules and their refusals."""

from __future__ import annotations

import pytest
import torch

import widenets as wn
from tests.conftest import random_inputs

X1, X2 = random_inputs(5, 6, seed=11), random_inputs(4, 6, seed=12)
HIDDEN = wn.Sequential(wn.Linear(16, 1.3, 0.2), wn.ReLU())


def kernels(net, x2=X2):
    return net.kernel(X1, x2, get=("nngp", "ntk"))


def assert_kernels_equal(a, b, rtol=1e-13):
    torch.testing.assert_close(a.nngp, b.nngp, rtol=rtol, atol=1e-15)
    torch.testing.assert_close(a.ntk, b.ntk, rtol=rtol, atol=1e-15)


def test_fan_in_sum_of_two_linears_is_one_linear():
    branches = wn.Parallel(wn.Linear(16, 1.2, 0.3), wn.Linear(16, 0.5, 0.4))
    summed = wn.Sequential(HIDDEN, wn.FanOut(2), branches, wn.FanInSum())
    single = wn.Sequential(HIDDEN, wn.Linear(16, (1.2**2 + 0.5**2) ** 0.5, 0.5))
    assert_kernels_equal(kernels(summed), kernels(single))


def test_fan_in_concat_is_width_weighted_mean():
    a, b = wn.Linear(48, 1.2, 0.3), wn.Linear(16, 0.5, 0.4)
    concat = wn.Sequential(HIDDEN, wn.FanOut(2), wn.Parallel(a, b), wn.FanInConcat())
    ka, kb = kernels(wn.Sequential(HIDDEN, a)), kernels(wn.Sequential(HIDDEN, b))
    k = kernels(concat)
    torch.testing.assert_close(k.nngp, (3 * ka.nngp + kb.nngp) / 4, rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk, (3 * ka.ntk + kb.ntk) / 4, rtol=1e-13, atol=0)
    # A Linear may follow the concatenation; an activation may not.
    kernels(wn.Sequential(concat, wn.Linear(1)))
    with pytest.raises(ValueError, match="Gaussian input"):
        kernels(wn.Sequential(concat, wn.ReLU()))


def test_fan_in_prod_product_rule():
    a, b = wn.Linear(16, 1.2, 0.3), wn.Linear(16, 0.5, 0.4)
    prod = wn.Sequential(HIDDEN, wn.FanOut(2), wn.Parallel(a, b), wn.FanInProd())
    ka, kb = kernels(wn.Sequential(HIDDEN, a)), kernels(wn.Sequential(HIDDEN, b))
    k = kernels(prod)
    torch.testing.assert_close(k.nngp, ka.nngp * kb.nngp, rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk, ka.ntk * kb.nngp + ka.nngp * kb.ntk, rtol=1e-13, atol=0)


def test_residual_adds_block_kernel():
    block = wn.Sequential(wn.ReLU(), wn.Linear(16, 0.8, 0.1))
    first = wn.Linear(16, 1.1, 0.2)
    residual = wn.Sequential(first, wn.Residual(block))
    k_in, k_block = kernels(first), kernels(wn.Sequential(first, block))
    k = kernels(residual)
    torch.testing.assert_close(k.nngp, k_in.nngp + k_block.nngp, rtol=1e-13, atol=0)
    torch.testing.assert_close(k.ntk, k_in.ntk + k_block.ntk, rtol=1e-13, atol=0)
    # On the raw input, x + W x is exact for a following Linear, but it is not centred,
    # so an activation may not act on it directly.
    on_input = wn.Sequential(wn.Residual(wn.Linear(6, 1.0)), wn.Linear(1, 1.0))
    x_dot = X1 @ X2.T / 6
    torch.testing.assert_close(kernels(on_input).nngp, 2 * x_dot, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="Gaussian input"):
        kernels(wn.Sequential(wn.Residual(wn.Linear(6, 1.0)), wn.ReLU()))


def test_dependent_branches_are_refused():
    with pytest.raises(ValueError, match="FanInSum: branches 0 and 1"):
        kernels(wn.Sequential(wn.Linear(16), wn.Residual(wn.ReLU())))
    with pytest.raises(ValueError, match="FanInSum"):
        kernels(wn.Sequential(wn.Linear(16), wn.FanOut(2), wn.FanInSum()))
    with pytest.raises(ValueError, match="FanInProd"):
        kernels(wn.Sequential(wn.Linear(16), wn.FanOut(2), wn.FanInProd()))
    with pytest.raises(ValueError, match="equal width"):
        kernels(wn.Sequential(wn.Linear(16), wn.Residual(wn.Linear(8))))


def test_layer_norm_normalises_and_matches_formula():
    net = wn.Sequential(wn.Linear(16, 1.3, 0.2), wn.LayerNorm(eps=0.0))
    k = net.kernel(X1, None, get=("nngp", "ntk"))
    torch.testing.assert_close(k.nngp.diagonal(), torch.ones(5, dtype=torch.float64))
    before = wn.Linear(16, 1.3, 0.2).kernel(X1, X2, get=("nngp", "ntk"))
    v1 = wn.Linear(16, 1.3, 0.2).kernel(X1, None, get="nngp").diagonal()
    v2 = wn.Linear(16, 1.3, 0.2).kernel(X2, None, get="nngp").diagonal()
    scale = (v1[:, None] * v2[None, :]).rsqrt()
    after = net.kernel(X1, X2, get=("nngp", "ntk"))
    torch.testing.assert_close(after.nngp, before.nngp * scale, rtol=1e-13, atol=0)
    torch.testing.assert_close(after.ntk, before.ntk * scale, rtol=1e-13, atol=0)


def test_layer_norm_zero_input_stays_finite():
    net = wn.Sequential(wn.Linear(8, 1.0), wn.LayerNorm(), wn.ReLU(), wn.Linear(1))
    x = torch.cat([X1, torch.zeros(1, 6, dtype=torch.float64)])
    k = net.kernel(x, None, get="ntk")
    assert torch.isfinite(k).all() and k[-1].abs().max() == 0
    model = net.build((6,), torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.isfinite(model(x)).all()


def test_built_twins_have_declared_shapes():
    net = wn.Sequential(
        wn.Linear(12, 1.0, 0.1),
        wn.Residual(wn.Sequential(wn.ReLU(), wn.Linear(12, 1.0))),
        wn.FanOut(3),
        wn.Parallel(wn.Linear(5), wn.Linear(7), wn.Identity()),
        wn.FanInConcat(),
        wn.Linear(10, 1.0),
        wn.LayerNorm(),
        wn.Linear(3),
    )
    model = net.build((6,), torch.Generator().manual_seed(0), dtype=torch.float64)
    assert model(X1).shape == (5, 3)
    # The concatenation has 5 + 7 + 12 features.
    assert model[-3].weight.shape == (10, 24)
    kernels(net)


def test_monte_carlo_of_merges():
    """Sum, product and concatenation twins converge to their kernels (width 1024)."""
    x = X1[:3]
    net = wn.Sequential(
        wn.Linear(1024, 1.2, 0.1), wn.ReLU(),
        wn.FanOut(2),
        wn.Parallel(wn.Linear(1024, 1.0, 0.2), wn.Linear(1024, 0.8)),
        wn.FanInProd(),
        wn.FanOut(2),
        wn.Parallel(wn.Linear(1024, 1.0), wn.Linear(512, 1.1, 0.1)),
        wn.FanInConcat(),
        wn.Linear(1, 1.0),
    )
    exact = net.kernel(x, None, get="ntk")
    mc = wn.monte_carlo_kernel(net, x, None, get="ntk", n_samples=8,
                               generator=torch.Generator().manual_seed(3))
    assert float((mc - exact).norm() / exact.norm()) < 0.08
