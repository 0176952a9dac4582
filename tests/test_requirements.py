"""Declared layer needs, checked and combined by the engine, and weight identities."""

from __future__ import annotations

import pytest
import torch

import widenets as wn
from widenets.engine import kernel_block
from widenets.kernel import Kernel
from widenets.requirements import Needs, WeightIdentity, network_needs

X = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_the_network_needs_the_full_covariance_iff_some_layer_declares_it():
    pooled = wn.Sequential(wn.Conv2d(2, 3), wn.ReLU(), wn.Residual(wn.Sequential(
        wn.ReLU(), wn.Conv2d(2, 1))), wn.AvgPool2d(2), wn.Flatten(), wn.Linear(1))
    flat = wn.Sequential(wn.Conv2d(2, 3), wn.ReLU(), wn.Flatten(), wn.Linear(1))
    assert network_needs(pooled.walk()).full_covariance
    assert not network_needs(flat.walk()).full_covariance
    assert wn.GlobalAvgPool().needs.full_covariance and not wn.Flatten().needs.full_covariance


def test_declarations_of_a_new_layer_are_checked_by_the_engine():
    class Square(wn.Layer):
        """x -> x^2 elementwise would need a Gaussian input; declared, not hand-checked."""

        needs = Needs(gaussian_input=True)
        gaussian_input_advice = "a Gaussian input (Square is tested here)"

        def kernel_rule(self, k):
            return k

    with pytest.raises(ValueError, match=r"Square needs a Gaussian input \(Square is tested"):
        wn.Sequential(Square(), wn.Linear(1)).kernel(X)
    wn.Sequential(wn.Linear(2), Square(), wn.Linear(1)).kernel(X)  # a Gaussian input: fine
    with pytest.raises(ValueError, match="Square got 2 parallel branches"):
        wn.Sequential(wn.Linear(2), wn.FanOut(2), Square()).kernel(X)


def test_needs_are_validated():
    with pytest.raises(ValueError, match="input must be one of"):
        Needs(input="many")
    with pytest.raises(ValueError, match="independent_branches must be one of"):
        Needs(independent_branches="all")


def test_branch_independence_derives_from_weight_identities():
    """Two branches through the same weights (one identity used twice) are dependent: a
    FanInSum of them is refused; the default, a fresh identity per application, is not."""
    shared = WeightIdentity()

    class TiedLinear(wn.Linear):
        def kernel_rule(self, k):
            return self.affine_rule(k, fan_in=k.width, weights=shared)

    tied = wn.Sequential(wn.Linear(4), wn.ReLU(), wn.FanOut(2),
                         wn.Parallel(TiedLinear(4), TiedLinear(4)), wn.FanInSum(),
                         wn.Linear(1))
    with pytest.raises(ValueError, match="FanInSum: branches 0 and 1"):
        tied.kernel(X)
    untied = wn.Sequential(wn.Linear(4), wn.ReLU(), wn.FanOut(2),
                           wn.Parallel(wn.Linear(4), wn.Linear(4)), wn.FanInSum(),
                           wn.Linear(1))
    untied.kernel(X)
    initial = Kernel.from_inputs(X, None, with_ntk=True)
    state = wn.Linear(4).transform(initial)
    assert len(state.sources) == 1 and isinstance(next(iter(state.sources)), WeightIdentity)
    again = wn.Linear(4).transform(initial)
    assert not state.sources & again.sources


def test_the_engine_refuses_an_unclosed_network():
    with pytest.raises(ValueError, match="ends with 2 parallel branches"):
        kernel_block(wn.FanOut(2), X, None, ("nngp",), paired=False)
