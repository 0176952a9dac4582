"""``widenets.gpytorch.NetworkKernel``: the network's kernel as a GPyTorch kernel, its
``W_std``/``b_std`` as positive GPyTorch parameters; exact GP predictions and marginal
likelihood equal widenets' own (``gp_inference``, ``marginal_log_likelihood``)."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

import widenets as wn
from widenets.predict import gp_inference, marginal_log_likelihood

gpytorch = pytest.importorskip("gpytorch")
wg = importlib.import_module("widenets.gpytorch")
NetworkKernel = wg.NetworkKernel


def data(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def tensor(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=True)


def dense_net() -> wn.Layer:
    """Numbers, a tensor tied over two layers, a layer without bias, a residual block."""
    w = tensor(1.3)
    return wn.Sequential(
        wn.Linear(8, W_std=w, b_std=0.3), wn.ReLU(),
        wn.Linear(8, W_std=1.1), wn.Residual(wn.Sequential(wn.Erf(), wn.Linear(8, W_std=0.9))),
        wn.Linear(1, W_std=w, b_std=tensor(0.2)))


def exact():
    """Settings under which GPyTorch computes exactly (Cholesky, no approximations)."""
    return (gpytorch.settings.fast_computations(False, False, False),
            gpytorch.settings.max_cholesky_size(10**6),
            gpytorch.settings.skip_posterior_variances(False))


# The kernel.


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_kernel_and_diagonal_equal_the_networks(get, monkeypatch):
    monkeypatch.setattr(wg, "DIAGONAL_BLOCK", 3)  # several blocks for the diagonal
    net = dense_net()
    kernel = NetworkKernel(net, get=get)
    x1, x2, x3 = data(7, 3, seed=1), data(5, 3, seed=2), data(7, 3, seed=3)
    with torch.no_grad():
        expected = net.kernel(x1, x2, get=get)
        assert torch.allclose(kernel(x1, x2).to_dense(), expected, rtol=0, atol=1e-12)
        square = net.kernel(x1, None, get=get)
        assert torch.allclose(kernel(x1).to_dense(), square, rtol=0, atol=1e-12)
        assert torch.allclose(kernel(x1, diag=True), square.diagonal(), rtol=0, atol=1e-12)
        pairs = net.kernel(x1, x3, get=get).diagonal()  # diag of K(x1, x3): not symmetric
        assert torch.allclose(kernel(x1, x3, diag=True), pairs, rtol=0, atol=1e-12)
        # batch dimensions, broadcast
        xb = torch.stack([x1, x3])
        batched = kernel(xb, x2).to_dense()
        assert batched.shape == (2, 7, 5)
        assert torch.allclose(batched[1], net.kernel(x3, x2, get=get), rtol=0, atol=1e-12)
        assert torch.allclose(kernel(xb, diag=True)[1],
                              net.kernel(x3, None, get=get).diagonal(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pooled", [True, False])
def test_images_are_given_flattened_with_input_shape(pooled):
    read = [wn.GlobalAvgPool()] if pooled else [wn.Flatten()]
    net = wn.Sequential(wn.Conv2d(4, 3, padding="same", W_std=1.2, b_std=0.1), wn.ReLU(),
                        *read, wn.Linear(1, W_std=tensor(1.4)))
    kernel = NetworkKernel(net, get="ntk", input_shape=(2, 4, 4))
    images = data(6, 2, 4, 4, seed=4)
    flat = images.reshape(6, -1)
    with torch.no_grad():
        full = net.kernel(images, None, get="ntk")
        assert torch.allclose(kernel(flat).to_dense(), full, rtol=0, atol=1e-12)
        assert torch.allclose(kernel(flat, diag=True), full.diagonal(), rtol=0, atol=1e-12)
        assert torch.allclose(kernel(flat[:2], flat[2:]).to_dense(), full[:2, 2:], rtol=0,
                              atol=1e-12)
    assert set(kernel.parameter_names) == {"0.W_std", "0.b_std", "3.W_std"}


# Hyperparameters.


def test_hyperparameters_become_positive_gpytorch_parameters():
    net = dense_net()
    kernel = NetworkKernel(net)
    raw = dict(kernel.named_parameters())
    # the tied tensor (layers 0 and 4) is one parameter, named after its first place
    assert set(raw) == {"raw_W_std_0", "raw_b_std_0", "raw_W_std_2", "raw_W_std_3_0_1_1_1",
                        "raw_b_std_4"}
    assert kernel.parameter_names["4.W_std"] == kernel.parameter_names["0.W_std"] == "raw_W_std_0"
    for name in raw:
        assert isinstance(kernel.constraint_for_parameter_name(name),
                          gpytorch.constraints.Positive)
    values = {name: v.item() for name, v in kernel.hyperparameter_values().items()}
    assert values == pytest.approx({"0.W_std": 1.3, "0.b_std": 0.3, "2.W_std": 1.1,
                                    "3.0.1.1.1.W_std": 0.9, "4.W_std": 1.3, "4.b_std": 0.2},
                                   rel=1e-14)
    # the tensors named like the network's own (those it was given as tensors)
    assert set(net.hyperparameters()) <= set(values)
    # the gradient reaches every raw parameter
    kernel(data(5, 3)).to_dense().sum().backward()
    assert all(p.grad is not None and float(p.grad) != 0 for p in raw.values())


def test_one_layer_used_twice_is_one_parameter_and_numbers_are_not_tied():
    shared = wn.Linear(4, W_std=1.5, b_std=0.5)
    net = wn.Sequential(wn.Linear(4, W_std=1.5), wn.ReLU(), shared, wn.ReLU(), shared,
                        wn.ReLU(), wn.Linear(1))
    kernel = NetworkKernel(net)
    assert sorted(n for n, _ in kernel.named_parameters()) == [
        "raw_W_std_0", "raw_W_std_2", "raw_W_std_6", "raw_b_std_2"]
    assert kernel.parameter_names["4.W_std"] == "raw_W_std_2"
    with torch.no_grad():
        kernel.raw_W_std_2.add_(0.3)
        x = data(5, 2)
        changed = kernel.network()
        assert changed.layers[2] is changed.layers[4]  # still one layer
        w = kernel.hyperparameter_values()["2.W_std"].item()
        assert w != pytest.approx(1.5) and changed.layers[4].W_std == pytest.approx(w, rel=1e-15)
        assert torch.allclose(kernel(x).to_dense(), changed.kernel(x, None, get="nngp"),
                              rtol=0, atol=1e-12)


def test_the_users_network_is_left_alone_and_the_kernel_copies():
    net = dense_net()
    before = dict(net.hyperparameters())
    first = net.layers[0]
    kernel = NetworkKernel(net)
    with torch.no_grad():
        kernel.raw_W_std_0.add_(1.0)
    kernel(data(4, 3)).to_dense().sum().backward()
    assert net.layers[0] is first and first.W_std is before["0.W_std"]
    assert first.W_std.item() == 1.3 and first.W_std.grad is None  # not used any more
    # at rest the kernel holds no autograd graph: copies and pickles work
    clone = copy.deepcopy(kernel)
    x = data(4, 3, seed=5)
    with torch.no_grad():
        assert torch.equal(clone(x).to_dense(), kernel(x).to_dense())
    fitted = kernel.network()
    assert isinstance(fitted.layers[0].W_std, float)
    assert fitted.layers[0].W_std == pytest.approx(kernel.hyperparameter_values()["0.W_std"].item(),
                                                   rel=1e-15)


# GPyTorch models.


class WideGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                         self.covar_module(x))


def regression(n: int = 25):
    x = data(n, 2, seed=6)
    y = torch.sin(2 * x[:, 0]) + 0.5 * x[:, 1] + 0.1 * data(n, seed=7)
    return x, y


def gp(net: wn.Layer, get: str, x, y, noise: float):
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = torch.tensor(noise, dtype=torch.float64)
    model = WideGP(x, y, likelihood, NetworkKernel(net, get=get)).double()
    return model, likelihood


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_exact_gp_posterior_equals_gp_inference(get):
    net = wn.Sequential(wn.Linear(16, W_std=1.4, b_std=0.4), wn.Erf(),
                        wn.Linear(1, W_std=1.2, b_std=0.1))
    x, y = regression()
    x_test = data(9, 2, seed=8)
    model, likelihood = gp(net, get, x, y, noise=0.05)
    noise = likelihood.noise.item()
    assert noise == pytest.approx(0.05, rel=1e-12)
    model.eval()
    likelihood.eval()
    a, b, c = exact()
    with torch.no_grad(), a, b, c:
        latent = model(x_test)
        predictive = likelihood(model(x_test))
        mean, cov = latent.mean, latent.covariance_matrix
        variance, predictive_variance = latent.variance, predictive.variance
    expected_mean, expected_cov = gp_inference(net, x, y, diag_reg=noise)(x_test, get=get)
    scale = float(expected_cov.diagonal().max())
    # mean = K(x*, X) (K + noise I)^{-1} y (GPyTorch's ZeroMean, widenets' zero prior mean)
    assert torch.allclose(mean, expected_mean, rtol=1e-8, atol=1e-8 * float(y.abs().max()))
    assert torch.allclose(predictive.mean, expected_mean, rtol=1e-8,
                          atol=1e-8 * float(y.abs().max()))
    # the latent f*: cov = K(x*, x*) - K(x*, X) (K + noise I)^{-1} K(X, x*)
    assert torch.allclose(cov, expected_cov, rtol=1e-8, atol=1e-8 * scale)
    assert torch.allclose(variance, expected_cov.diagonal(), rtol=1e-8, atol=1e-8 * scale)
    # the observations y* = f* + noise: the diagonal plus the noise variance
    assert torch.allclose(predictive_variance, expected_cov.diagonal() + noise, rtol=1e-8,
                          atol=1e-8 * scale)


def test_training_fits_the_hyperparameters_and_the_mll_is_widenets_over_n():
    net = wn.Sequential(wn.Linear(16, W_std=1.0, b_std=0.2), wn.Erf(),
                        wn.Linear(1, W_std=1.0, b_std=0.2))
    x, y = regression(30)
    model, likelihood = gp(net, "nngp", x, y, noise=0.3)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    kernel = model.covar_module

    def values() -> tuple[float, dict[str, float]]:
        a, b, c = exact()
        with torch.no_grad(), a, b, c:
            model.train()
            likelihood.train()
            value = float(mll(model(x), y))
        noise = likelihood.noise.item()
        expected = marginal_log_likelihood(kernel.network(), x, y, get="nngp", diag_reg=noise)
        assert value == pytest.approx(float(expected) / len(x), rel=1e-8)  # GPyTorch: / N
        return value, {k: v.item() for k, v in kernel.hyperparameter_values().items()}

    start, start_values = values()
    assert start_values == pytest.approx({"0.W_std": 1.0, "0.b_std": 0.2, "2.W_std": 1.0,
                                          "2.b_std": 0.2}, rel=1e-14)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    likelihood.train()
    for _ in range(25):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
    assert all(p.grad is not None and float(p.grad) != 0 for p in kernel.parameters())
    end, end_values = values()
    assert end > start + 0.05
    for name in start_values:  # every scale moved
        assert abs(end_values[name] - start_values[name]) > 0.01, name


# Errors and the optional dependency.


def test_bad_arguments_are_refused_clearly():
    net = wn.Sequential(wn.Linear(4), wn.ReLU(), wn.Linear(1))
    with pytest.raises(ValueError, match="get must be 'nngp' or 'ntk'"):
        NetworkKernel(net, get="rbf")
    with pytest.raises(TypeError, match="widenets architecture"):
        NetworkKernel(torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="input_shape must be"):
        NetworkKernel(net, input_shape=(2, 0))
    with pytest.raises(ValueError, match=r"0.b_std is 0.*b_std=None"):
        NetworkKernel(wn.Sequential(wn.Linear(4, b_std=torch.tensor(0.0)), wn.ReLU(),
                                    wn.Linear(1)))
    kernel = NetworkKernel(net)
    x = data(4, 3)
    with pytest.raises(NotImplementedError, match="last_dim_is_batch"):
        kernel.forward(x, x, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="as many inputs"):
        kernel(x, data(3, 3), diag=True)
    images = NetworkKernel(
        wn.Sequential(wn.Conv1d(2, 3), wn.ReLU(), wn.Flatten(), wn.Linear(1)),
        input_shape=(2, 5))
    with pytest.raises(ValueError, match=r"given flattened, with 10 features, got 3"):
        images(x).to_dense()


def test_without_gpytorch_the_import_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name.partition(".")[0] == "gpytorch":
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "widenets.gpytorch", raising=False)
    if "gpytorch" in vars(wn):
        monkeypatch.delattr(wn, "gpytorch")
    with pytest.raises(ImportError) as info:
        importlib.import_module("widenets.gpytorch")
    assert "pip install 'widenets[gpytorch]'" in str(info.value)
    assert info.value.name == "gpytorch"
    with pytest.raises(ImportError, match=r"widenets\[gpytorch\]"):
        wn.gpytorch  # noqa: B018  (the lazy submodule import is the point)
