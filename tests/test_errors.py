"""Bad input gets a ValueError or TypeError that names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import widenets as wn
from tests.conftest import random_inputs


@pytest.fixture
def net():
    return wn.Sequential(wn.Linear(8, 1.5, 0.1), wn.ReLU(), wn.Linear(1))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(net, bad):
    x = np.ones((3, 4))
    x[1, 2] = bad
    with pytest.raises(ValueError, match="x1 contains NaN or inf"):
        net.kernel(x)
    with pytest.raises(ValueError, match="x2 contains NaN or inf"):
        net.kernel(np.ones((2, 4)), x)


def test_feature_mismatch(net):
    with pytest.raises(ValueError, match="same per-example shape"):
        net.kernel(np.ones((3, 4)), np.ones((3, 5)))


@pytest.mark.parametrize("shape", [(4,), (), (2, 1, 1, 1, 1, 1)])
def test_wrong_ndim(net, shape):
    with pytest.raises(ValueError, match="x1 must"):
        net.kernel(np.ones(shape))


def test_images_into_a_fully_connected_network(net):
    with pytest.raises(ValueError, match=r"Linear needs \(N, features\).*Flatten"):
        net.kernel(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"Linear needs \(N, features\).*Flatten"):
        net.build((3, 4))


@pytest.mark.parametrize("shape", [(0, 4), (3, 0)])
def test_empty_input(net, shape):
    with pytest.raises(ValueError, match="empty"):
        net.kernel(np.ones(shape))


@pytest.mark.parametrize("get", ["nngp2", ("ntk", "bad"), ()])
def test_unknown_get(net, get):
    with pytest.raises((ValueError, TypeError), match="get must"):
        net.kernel(np.ones((2, 3)), get=get)


def test_wrong_types(net):
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor or a NumPy array"):
        net.kernel("not data")
    with pytest.raises(TypeError, match="floating dtype"):
        net.kernel(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="real"):
        net.kernel(np.ones((2, 3), dtype=complex))
    with pytest.raises(ValueError, match="dtype and device"):
        net.kernel(torch.ones(2, 3), torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: wn.Linear(8, W_std=-1.0), "W_std"),
        (lambda: wn.Linear(8, b_std=-0.1), "b_std"),
        (lambda: wn.Linear(8, W_std=float("nan")), "W_std"),
        (lambda: wn.Linear(0), "width"),
        (lambda: wn.Linear(8, parameterization="mup"), "parameterization"),
        (lambda: wn.RectifiedMonomial(-1), "degree"),
        (lambda: wn.FanOut(0), "n"),
        (lambda: wn.LayerNorm(eps=-1.0), "eps"),
        (lambda: wn.Rbf(gamma=-1.0), "gamma"),
    ],
)
def test_bad_layer_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: wn.RectifiedMonomial(1.5), "degree"),
        (lambda: wn.RectifiedMonomial("2"), "degree"),
        (lambda: wn.Linear(8.0), "width"),
        (lambda: wn.Linear(8, W_std="1"), "W_std"),
        (lambda: wn.Elementwise("tanh"), "fn"),
        (lambda: wn.Sequential(wn.ReLU(), torch.nn.ReLU()), "Sequential"),
        (lambda: wn.GELU(approximate="tanh"), "approximate"),
    ],
)
def test_bad_layer_arguments_raise_type_error(make, match):
    with pytest.raises(TypeError, match=match):
        make()


def test_build_arguments(net):
    with pytest.raises(ValueError, match="input_shape"):
        net.build((0,))
    with pytest.raises(ValueError, match="input_shape"):
        net.build("4")
    with pytest.raises(TypeError, match="generator"):
        net.build((4,), generator=0)


def test_unsupported_architectures():
    x = random_inputs(3, 4)
    with pytest.raises(ValueError, match="ReLU needs a Gaussian input"):
        wn.Sequential(wn.ReLU(), wn.Linear(1)).kernel(x)
    with pytest.raises(ValueError, match="Erf needs a Gaussian input"):
        wn.Sequential(wn.Linear(4), wn.ReLU(), wn.Erf(), wn.Linear(1)).kernel(x)
    with pytest.raises(ValueError, match="LayerNorm needs"):
        wn.Sequential(wn.Linear(4), wn.ReLU(), wn.LayerNorm()).kernel(x)
    with pytest.raises(ValueError, match="parallel branches"):
        wn.Sequential(wn.Linear(4), wn.FanOut(2)).kernel(x)
    with pytest.raises(ValueError, match="FanOut"):
        wn.Sequential(wn.Linear(4), wn.FanInSum()).kernel(x)
    with pytest.raises(ValueError, match="Parallel has 2 layers but got 3"):
        wn.Sequential(wn.FanOut(3), wn.Parallel(wn.Linear(4), wn.Linear(4))).kernel(x)
    with pytest.raises(ValueError, match="Linear needs"):
        wn.Sequential(wn.Linear(4)).kernel(torch.ones(2, 3, 4, 4))


# ------------------------------------------------ found by an adversarial user's session


def test_huge_scale_parameters_are_refused_not_overflowed():
    """``b_std=1e160`` squared overflows a Python float (a bare OverflowError before)."""
    for make in (lambda: wn.Linear(3, b_std=1e160), lambda: wn.Linear(3, W_std=1e160),
                 lambda: wn.Conv2d(3, 3, W_std=1e200), lambda: wn.Erf(a=1e160),
                 lambda: wn.Sin(b=-1e160), lambda: wn.Rbf(1e200)):
        with pytest.raises(ValueError, match="at most 1e\\+150 in magnitude"):
            make()


def test_overflowing_inputs_are_blamed_on_the_inputs(net):
    x = np.ones((3, 4))
    x[1] = 1e200
    with pytest.raises(ValueError, match=r"inputs' second moments overflow.*\|x\| = 1e\+200"):
        net.kernel(x)


def test_nan_from_an_elementwise_function_is_not_called_an_overflow():
    net = wn.Sequential(wn.Linear(4), wn.Elementwise(torch.log), wn.Linear(1))
    with pytest.raises(ValueError, match="Elementwise's fn returned NaN or inf"):
        net.kernel(np.ones((2, 3)))


@pytest.mark.parametrize("fn, error, match", [
    (lambda t: t.sum(-1), ValueError, "must act elementwise"),
    (lambda t: t > 0, TypeError, "must return a floating tensor"),
    (lambda t: 1.0, TypeError, "must return a tensor"),
])
def test_elementwise_functions_that_are_not_elementwise(fn, error, match):
    net = wn.Sequential(wn.Linear(4), wn.Elementwise(fn), wn.Linear(1))
    with pytest.raises(error, match=match):
        net.kernel(np.ones((2, 3)))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(net, half):
    x = random_inputs(5, 4).to(half)
    k = net.kernel(x, get=("nngp", "ntk"))
    expected = net.kernel(x.float(), get=("nngp", "ntk"))
    assert k.ntk.dtype == torch.float32
    assert torch.equal(k.ntk, expected.ntk) and torch.equal(k.nngp, expected.nngp)
    assert net.kernel(x, random_inputs(2, 4).float()).dtype == torch.float32


def test_eight_bit_floats_and_half_compute_dtypes_are_refused(net):
    x = random_inputs(3, 4)
    with pytest.raises(TypeError, match="x1 has dtype torch.float8_e4m3fn; widenets computes"):
        net.kernel(x.to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="x2 has dtype torch.float8_e5m2"):
        net.kernel(x.float(), x.to(torch.float8_e5m2))
    with pytest.raises(TypeError, match="torch.float32, torch.float64 or None"):
        net.kernel(x, dtype=torch.float16)
