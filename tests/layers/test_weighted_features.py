"""A first ``Linear`` that weighs its input features: a vector ``W_std`` (automatic
relevance determination) or a general weight covariance ``W_cov`` (Williams 1997)."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch.autograd import gradcheck

import widenets as wn
from widenets.specs import from_spec
from widenets.testing import check_network


def normal(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def covariance(d: int, seed: int) -> torch.Tensor:
    a = normal(d, d, seed=seed)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def williams_erf_nngp(x1, x2, sigma, b_std):
    """Williams (1997), written out on its own: the NNGP of ``erf(w . x~)`` with
    ``w ~ N(0, S)`` on augmented inputs ``x~ = (1, x)``, ``S = diag(b_std^2, sigma / d)``:
    ``(2 / pi) arcsin(2 x~ S x~' / sqrt((1 + 2 x~ S x~)(1 + 2 x~' S x~')))``."""
    d = x1.shape[1]
    augment = lambda x: torch.cat([torch.ones(len(x), 1, dtype=x.dtype), x], 1)  # noqa: E731
    a1, a2 = augment(x1), augment(x2)
    s = torch.zeros(d + 1, d + 1, dtype=torch.float64)
    s[0, 0], s[1:, 1:] = b_std**2, sigma / d
    cross = 2 * a1 @ s @ a2.T
    self1 = 1 + 2 * torch.einsum("ij,jk,ik->i", a1, s, a1)
    self2 = 1 + 2 * torch.einsum("ij,jk,ik->i", a2, s, a2)
    return (2 / math.pi) * torch.arcsin(cross / torch.sqrt(self1[:, None] * self2[None, :]))


def test_williams_general_covariance():
    x1, x2 = normal(7, 4, seed=1), normal(5, 4, seed=2)
    sigma = covariance(4, seed=3)
    net = wn.Sequential(wn.Linear(512, W_cov=sigma, b_std=0.3), wn.Erf())
    # the NNGP of the erf features, read out by Linear(1, W_std=1): the same covariance
    readout = wn.Sequential(wn.Linear(512, W_cov=sigma, b_std=0.3), wn.Erf(), wn.Linear(1))
    expected = williams_erf_nngp(x1, x2, sigma, 0.3)
    torch.testing.assert_close(readout.kernel(x1, x2, get="nngp"), expected, rtol=1e-12,
                               atol=1e-14)
    assert net.spec()["args"]["layers"][0]["args"]["W_cov"] == sigma.tolist()


def test_vector_scales_are_a_diagonal_covariance_and_constants_the_plain_layer():
    x1, x2 = normal(6, 3, seed=4), normal(4, 3, seed=5)
    scales = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)

    def net(first):
        return wn.Sequential(first, wn.ReLU(), wn.Linear(1, W_std=1.2))

    ard = net(wn.Linear(8, W_std=scales, b_std=0.2)).kernel(x1, x2, get=("nngp", "ntk"))
    cov = net(wn.Linear(8, W_cov=torch.diag(scales**2), b_std=0.2)).kernel(
        x1, x2, get=("nngp", "ntk"))
    constant = net(wn.Linear(8, W_std=[1.3, 1.3, 1.3], b_std=0.2)).kernel(
        x1, x2, get=("nngp", "ntk"))
    plain = net(wn.Linear(8, W_std=1.3, b_std=0.2)).kernel(x1, x2, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(ard[name], cov[name], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(constant[name], plain[name], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["vector", "matrix"])
def test_the_twin_has_exactly_the_kernel_s_ntk_and_its_covariance(kind):
    """One weighted layer: the twin's empirical NTK equals the NTK exactly (it does not
    depend on the weights); its units' pre-activations have the NNGP as covariance, within
    sampling error that shrinks with the width."""
    x = normal(5, 3, seed=6)
    metric = (torch.tensor([0.4, 1.0, 2.5], dtype=torch.float64) if kind == "vector"
              else covariance(3, seed=7))
    layer = (wn.Linear(1, W_std=metric, b_std=0.5) if kind == "vector"
             else wn.Linear(1, W_cov=metric, b_std=0.5))
    net = wn.Sequential(layer)
    model = net.build(input_shape=(3,), generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    exact = net.kernel(x, None, get=("nngp", "ntk"))
    torch.testing.assert_close(wn.empirical_ntk(model, x), exact.ntk, rtol=1e-12, atol=1e-14)
    errors = []
    for width in (200, 20000):
        wide = (wn.Linear(width, W_std=metric, b_std=0.5) if kind == "vector"
                else wn.Linear(width, W_cov=metric, b_std=0.5))
        twin = wn.Sequential(wide).build(input_shape=(3,), dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            h = twin(x)
        errors.append(float((h @ h.T / width - exact.nngp).abs().max() / exact.nngp.abs().max()))
    assert errors[1] < 0.05 and errors[1] < errors[0] / 2, errors


def test_gradients_reach_the_scales_and_the_covariance():
    x1, x2 = normal(4, 3, seed=8), normal(3, 3, seed=9)
    scales = torch.tensor([0.7, 1.2, 0.9], dtype=torch.float64, requires_grad=True)
    root = normal(3, 3, seed=10).requires_grad_(True)

    def with_scales(s):
        return wn.Sequential(wn.Linear(8, W_std=s, b_std=0.1), wn.Erf(),
                             wn.Linear(1)).kernel(x1, x2, get="ntk")

    def with_covariance(a):
        return wn.Sequential(wn.Linear(8, W_cov=a @ a.T, b_std=0.1), wn.GELU(),
                             wn.Linear(1)).kernel(x1, x2, get="nngp")

    assert gradcheck(with_scales, (scales,))
    assert gradcheck(with_covariance, (root,))


def test_contract_spec_and_pickle():
    x1, x2 = normal(5, 3, seed=11), normal(4, 3, seed=12)
    for first in (wn.Linear(8, W_std=[0.5, 1.0, 2.0], b_std=0.1),
                  wn.Linear(8, W_cov=covariance(3, seed=13), b_std=0.1)):
        net = wn.Sequential(first, wn.ReLU(), wn.Linear(1))
        check_network(net, x1, x2, checks=["kernels", "consistency", "fast_paths", "float32",
                                           "spec", "pickle"], layers=[first])
        rebuilt = from_spec(net.spec())
        assert rebuilt == net
        torch.testing.assert_close(rebuilt.kernel(x1, x2), net.kernel(x1, x2), rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(net)).kernel(x1, x2),
                                   net.kernel(x1, x2), rtol=0, atol=0)


def test_plain_layers_keep_their_spec():
    assert wn.Linear(4, W_std=1.5).spec()["args"] == {
        "width": 4, "W_std": 1.5, "b_std": None, "parameterization": "ntk"}


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: wn.Linear(4, W_std=[1.0, 2.0], W_cov=torch.eye(2)), ValueError, "not both"),
        (lambda: wn.Linear(4, W_std=2.0, W_cov=torch.eye(2)), ValueError, "not both"),
        (lambda: wn.Linear(4, W_cov=torch.tensor([[1.0, 0.5], [0.0, 1.0]])), ValueError,
         "symmetric"),
        (lambda: wn.Linear(4, W_cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]])), ValueError,
         "positive semi-definite"),
        (lambda: wn.Linear(4, W_cov=torch.ones(2, 3)), ValueError, r"square \(d, d\)"),
        (lambda: wn.Linear(4, W_std=[1.0, -1.0]), ValueError, "finite numbers >= 0"),
        (lambda: wn.Linear(4, W_std=torch.ones(2, 2)), TypeError, "0-d floating tensor"),
        (lambda: wn.Conv2d(4, 3, W_std=torch.ones(3)), TypeError, "0-d floating tensor"),
        (lambda: wn.Linear(4, W_std=[1.0, 2.0], parameterization="standard"), ValueError,
         "parameterization='ntk'"),
    ],
)
def test_bad_weighted_features_are_refused(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_weighted_features_need_the_raw_inputs_and_their_size():
    x = normal(4, 3, seed=14)
    late = wn.Sequential(wn.Linear(8), wn.ReLU(), wn.Linear(1, W_std=[1.0] * 8))
    with pytest.raises(ValueError, match="must read the inputs"):
        late.kernel(x)
    wrong = wn.Sequential(wn.Linear(8, W_std=[1.0, 2.0]), wn.ReLU(), wn.Linear(1))
    with pytest.raises(ValueError, match="2 features, the inputs have 3"):
        wrong.kernel(x)
    with pytest.raises(ValueError, match="2 features, the inputs have 3"):
        wrong.build(input_shape=(3,))
