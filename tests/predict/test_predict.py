"""GP posterior and gradient-descent dynamics against direct NumPy/SciPy formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import expm

import widenets as wn

NET = wn.Sequential(wn.Linear(32, 1.5, 0.1), wn.Erf(), wn.Linear(32, 1.2, 0.1), wn.ReLU(),
                    wn.Linear(1, 1.0, 0.1))


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    x_train, x_test = rng.normal(size=(12, 4)), rng.normal(size=(7, 4))
    y = np.stack([np.sin(x_train.sum(1)), np.cos(x_train[:, 0])], axis=1)
    return x_train, x_test, y


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_gp_inference_matches_formula(data, get):
    x_train, x_test, y = data
    reg = 1e-3
    k_xx = NET.kernel(x_train, None, get=get).numpy() + reg * np.eye(12)
    k_tx = NET.kernel(x_test, x_train, get=get).numpy()
    k_tt = NET.kernel(x_test, None, get=get).numpy()
    mean, cov = wn.predict.gp_inference(NET, x_train, y, diag_reg=reg)(x_test, get=get)
    np.testing.assert_allclose(mean.numpy(), k_tx @ np.linalg.solve(k_xx, y), rtol=1e-9)
    expected_cov = k_tt - k_tx @ np.linalg.inv(k_xx) @ k_tx.T
    np.testing.assert_allclose(cov.numpy(), expected_cov, rtol=1e-7, atol=1e-10)
    assert mean.dtype == torch.float64 and mean.shape == (7, 2)
    # One output as a vector gives a vector.
    mean_1d, none = wn.predict.gp_inference(NET, x_train, y[:, 0], diag_reg=reg)(
        x_test, get=get, compute_cov=False)
    assert none is None
    np.testing.assert_allclose(mean_1d.numpy(), mean[:, 0].numpy(), rtol=1e-12)


def test_gp_inference_interpolates_training_points(data):
    x_train, _, y = data
    mean, cov = wn.predict.gp_inference(NET, x_train, y)(x_train, get="nngp")
    np.testing.assert_allclose(mean.numpy(), y, atol=1e-6)
    assert float(cov.abs().max()) < 1e-6


def test_duplicate_training_point_needs_diag_reg(data):
    x_train, x_test, y = data
    x_dup = np.concatenate([x_train, x_train[:1]])
    y_dup = np.concatenate([y, y[:1]])
    with pytest.raises(ValueError, match="diag_reg"):
        wn.predict.gp_inference(NET, x_dup, y_dup)(x_test, get="ntk")
    mean, cov = wn.predict.gp_inference(NET, x_dup, y_dup, diag_reg=1e-6)(x_test, get="ntk")
    assert torch.isfinite(mean).all() and torch.isfinite(cov).all()


def test_gradient_descent_mse_matches_expm(data):
    x_train, x_test, y = data
    k = NET.kernel(x_train, None, get="ntk").numpy()
    k_tx = NET.kernel(x_test, x_train, get="ntk").numpy()
    rng = np.random.default_rng(0)
    f0_train, f0_test = rng.normal(size=y.shape), rng.normal(size=(7, 2))
    lr, reg = 0.7, 1e-4
    k_reg = k + reg * np.eye(12)
    predict = wn.predict.gradient_descent_mse(k, y, learning_rate=lr, diag_reg=reg)
    for t in [0.0, 0.3, 5.0]:
        decay = expm(-lr * k_reg * t)
        ftrain, ftest = predict(t, f0_train, f0_test, k_tx)
        np.testing.assert_allclose(ftrain.numpy(), y + decay @ (f0_train - y), rtol=1e-8,
                                   atol=1e-10)
        expected = f0_test - k_tx @ np.linalg.solve(k_reg, (np.eye(12) - decay) @ (f0_train - y))
        np.testing.assert_allclose(ftest.numpy(), expected, rtol=1e-8, atol=1e-10)
    ftrain, ftest = predict(None, f0_train, f0_test, k_tx)
    np.testing.assert_allclose(ftrain.numpy(), y, atol=1e-8)
    expected = f0_test - k_tx @ np.linalg.solve(k_reg, f0_train - y)
    np.testing.assert_allclose(ftest.numpy(), expected, rtol=1e-7, atol=1e-9)
    # A 1-D tensor of times adds a leading axis.
    many, _ = predict(torch.tensor([0.0, 0.3], dtype=torch.float64), f0_train)
    np.testing.assert_allclose(many[1].numpy(), predict(0.3, f0_train)[0].numpy(), rtol=1e-12)


def test_discrete_steps_match_gradient_descent_on_a_linear_model():
    """Full-batch GD on a linear model f = J w is exactly kernel GD with T = J J^T."""
    rng = np.random.default_rng(1)
    jac_train, jac_test = rng.normal(size=(6, 9)), rng.normal(size=(3, 9))
    y = rng.normal(size=6)
    w = np.zeros(9)
    lr, steps = 0.05, 40
    for _ in range(steps):
        w -= lr * jac_train.T @ (jac_train @ w - y)  # gradient of 1/2 |J w - y|^2
    predict = wn.predict.gradient_descent_mse(jac_train @ jac_train.T, y, learning_rate=lr,
                                              discrete=True)
    ftrain, ftest = predict(steps, 0.0, None, jac_test @ jac_train.T)
    np.testing.assert_allclose(ftrain.numpy(), jac_train @ w, rtol=1e-10)
    np.testing.assert_allclose(ftest.numpy(), jac_test @ w, rtol=1e-10)


def test_discrete_steps_at_unit_rate():
    """lr * lambda = 1: one step reaches the target; zero steps leave the start unchanged."""
    predict = wn.predict.gradient_descent_mse(np.eye(2), np.ones(2), learning_rate=1.0,
                                              discrete=True)
    np.testing.assert_array_equal(predict(0, 0.5)[0].numpy(), [0.5, 0.5])
    np.testing.assert_array_equal(predict(1, 0.5)[0].numpy(), [1.0, 1.0])
    np.testing.assert_array_equal(predict(None, 0.5)[0].numpy(), [1.0, 1.0])


def test_gradient_descent_mse_bad_input():
    with pytest.raises(ValueError, match="square"):
        wn.predict.gradient_descent_mse(np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="y_train"):
        wn.predict.gradient_descent_mse(np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match="positive semi-definite"):
        wn.predict.gradient_descent_mse(-np.eye(3), np.ones(3))
    predict = wn.predict.gradient_descent_mse(np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="t must be"):
        predict(-1.0)
    with pytest.raises(TypeError, match="net"):
        wn.predict.gp_inference("net", np.ones((3, 2)), np.ones(3))


def _ensemble_reference(t_ntk, t_xx_ntk, k_nngp, k_x_nngp, k_xx_nngp, y, lr, reg, t):
    """The ensemble formulas of Lee et al. 2019 with SciPy ``expm`` and explicit inverses."""
    n = t_ntk.shape[0]
    t_reg = t_ntk + reg * np.eye(n)
    m = np.eye(n) if t is None else np.eye(n) - expm(-lr * t_reg * t)
    p = t_xx_ntk @ np.linalg.inv(t_reg) @ m
    mean = p @ y
    cov = k_xx_nngp + p @ k_nngp @ p.T - p @ k_x_nngp.T - k_x_nngp @ p.T
    return mean, cov


@pytest.mark.parametrize("get", ["ntk", "nngp"])
def test_gradient_descent_mse_ensemble_matches_formulas(data, get):
    x_train, x_test, y = data
    lr, reg = 0.3, 1e-3
    kernels = {name: (NET.kernel(x_train, None, get=name).numpy(),
                      NET.kernel(x_test, x_train, get=name).numpy())
               for name in ("nngp", "ntk")}
    k_tt = NET.kernel(x_test, None, get="nngp").numpy()
    train, cross = kernels[get]
    predict = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y, learning_rate=lr,
                                                       diag_reg=reg)
    for t in [0.0, 0.7, 20.0, None]:
        mean, cov = predict(x_test, t=t, get=get)
        expected_mean, expected_cov = _ensemble_reference(
            train, cross, kernels["nngp"][0], kernels["nngp"][1], k_tt, y, lr, reg, t)
        np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(cov.numpy(), expected_cov, rtol=1e-7, atol=1e-9)
        if t == 0.0:  # the prior: mean 0, covariance K(x, x)
            np.testing.assert_allclose(mean.numpy(), 0.0, atol=1e-14)
            np.testing.assert_allclose(cov.numpy(), k_tt, rtol=1e-12)
    # A vector of times adds a leading axis; one output as a vector gives vectors.
    times = torch.tensor([0.7, 0.0, 20.0], dtype=torch.float64)
    means, covs = predict(x_test, t=times, get=get)
    assert means.shape == (3, 7, 2) and covs.shape == (3, 7, 7)
    torch.testing.assert_close(means[0], predict(x_test, t=0.7, get=get)[0])
    single = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y[:, 0], learning_rate=lr,
                                                      diag_reg=reg)
    mean_1d, none = single(x_test, t=0.7, get=get, compute_cov=False)
    assert none is None and mean_1d.shape == (7,)
    torch.testing.assert_close(mean_1d, means[0][:, 0])


def test_ensemble_at_infinity_with_nngp_is_the_posterior(data):
    """Training only the read-out for infinite time gives the NNGP posterior (exactly
    without regularisation; with diag_reg the covariances differ by O(diag_reg))."""
    x_train, x_test, y = data
    ensemble = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y)
    posterior = wn.predict.gp_inference(NET, x_train, y)
    for a, b in zip(ensemble(x_test, get="nngp"), posterior(x_test, get="nngp")):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_kernel_function_instead_of_an_architecture(data):
    """``net_or_kernels`` may be any ``kernel_fn(x1, x2, get)``; each training kernel is
    computed once."""
    x_train, x_test, y = data
    calls = []

    def kernel_fn(x1, x2, get):
        calls.append((x1.shape[0], None if x2 is None else x2.shape[0], get))
        return NET.kernel(x1, x2, get=get)

    for make in (wn.predict.gp_inference, wn.predict.gradient_descent_mse_ensemble):
        calls.clear()
        by_function = make(kernel_fn, x_train, y, diag_reg=1e-3)
        by_net = make(NET, x_train, y, diag_reg=1e-3)
        for _ in range(2):
            for a, b in zip(by_function(x_test, get="ntk"), by_net(x_test, get="ntk")):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert calls.count((12, None, "ntk")) == 1
    with pytest.raises(ValueError, match=r"must return a \(12, 12\) tensor"):
        wn.predict.gp_inference(lambda a, b, get: torch.zeros(3, 3), x_train, y)(x_test)
    with pytest.raises(TypeError, match="net_or_kernels"):
        wn.predict.gradient_descent_mse_ensemble(3.0, x_train, y)


def test_duplicated_training_point_gives_finite_ensemble(data):
    """diag_reg=0 with a repeated point: the training kernel is singular; the ensemble
    stays finite at every time (zero modes are not trained) and still fits the data."""
    x_train, x_test, y = data
    x_dup, y_dup = np.concatenate([x_train, x_train[:1]]), np.concatenate([y, y[:1]])
    predict = wn.predict.gradient_descent_mse_ensemble(NET, x_dup, y_dup)
    for t in [0.0, 3.0, 1e6, None]:
        mean, cov = predict(x_test, t=t)
        assert torch.isfinite(mean).all() and torch.isfinite(cov).all()
    reference = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y)
    torch.testing.assert_close(predict(x_test)[0], reference(x_test)[0], rtol=1e-6, atol=1e-6)
    fit, _ = predict(x_dup, compute_cov=False)
    np.testing.assert_allclose(fit.numpy(), y_dup, atol=1e-6)


def _train_wide_twins(width: int, n_twins: int, x_train, y_train, x_test, lr, steps, seed):
    """Outputs on ``x_test`` of ``n_twins`` finite twins of ``Linear(width)-Erf-Linear(1)``
    trained by full-batch gradient descent, all at once (parameters stacked on a leading
    axis; the forward is the twin's, checked against ``net.build`` below)."""
    net = wn.Sequential(wn.Linear(width, 1.5, 0.1), wn.Erf(), wn.Linear(1, 1.0, 0.1))
    generator = torch.Generator().manual_seed(seed)
    twin = net.build((x_train.shape[1],), generator, dtype=torch.float64)
    d = x_train.shape[1]

    def forward(p, x):  # NTK parameterization: standard normal parameters, scaled here
        hidden = torch.erf(1.5 / math.sqrt(d) * torch.einsum("snd,md->smn", p["w1"], x)
                           + 0.1 * p["b1"][:, None, :])
        return (1.0 / math.sqrt(width) * torch.einsum("smn,sn->sm", hidden, p["w2"])
                + 0.1 * p["b2"][:, None])

    one = {"w1": twin[0].weight[None], "b1": twin[0].bias[None], "w2": twin[2].weight,
           "b2": twin[2].bias}
    with torch.no_grad():
        torch.testing.assert_close(forward(one, x_test)[0], twin(x_test)[:, 0])
    shapes = {"w1": (width, d), "b1": (width,), "w2": (width,), "b2": ()}
    params = {name: torch.randn(n_twins, *shape, dtype=torch.float64, generator=generator)
              for name, shape in shapes.items()}
    for _ in range(steps):
        leaves = {name: value.requires_grad_(True) for name, value in params.items()}
        loss = 0.5 * ((forward(leaves, x_train) - y_train) ** 2).sum()  # sum over twins
        grads = torch.autograd.grad(loss, list(leaves.values()))
        params = {name: (value - lr * g).detach()
                  for (name, value), g in zip(leaves.items(), grads)}
    with torch.no_grad():
        return net, forward(params, x_test)


def test_trained_finite_twins_match_the_ensemble():
    """Many finite twins trained by ``steps`` small gradient-descent steps of size ``lr``
    (gradient flow ``d theta/dt = -lr grad L`` for a time ``t = steps``):
    their mean output and output covariance match the ensemble prediction. The error,
    in units of the Monte Carlo standard error, is within noise (< 4.5) at width 256 and
    larger at width 8, where the finite-width bias shows."""
    rng = np.random.default_rng(0)
    x_train = torch.tensor(rng.normal(size=(5, 2)))
    y_train = torch.sin(x_train.sum(1))
    x_test = torch.tensor(rng.normal(size=(3, 2)))
    n_twins, steps = 2000, 200
    errors = {}
    for width in (8, 256):
        net = wn.Sequential(wn.Linear(width, 1.5, 0.1), wn.Erf(), wn.Linear(1, 1.0, 0.1))
        lr = 0.05 / float(torch.linalg.eigvalsh(net.kernel(x_train, get="ntk")).max())
        net, outputs = _train_wide_twins(width, n_twins, x_train, y_train, x_test, lr, steps,
                                         seed=1)
        mean, cov = wn.predict.gradient_descent_mse_ensemble(net, x_train, y_train,
                                                             learning_rate=lr)(
            x_test, t=float(steps))
        sample_mean, sample_cov = outputs.mean(0), torch.cov(outputs.T)
        variance = torch.diag(sample_cov)
        mean_error = (sample_mean - mean).abs() / torch.sqrt(variance / n_twins)
        cov_se = torch.sqrt((variance[:, None] * variance[None, :] + sample_cov**2) / n_twins)
        errors[width] = float(torch.cat([mean_error, ((sample_cov - cov).abs() / cov_se)
                                         .flatten()]).max())
    assert errors[256] < 4.5
    assert errors[8] > errors[256]


def test_ensemble_computes_the_training_kernels_once(data, monkeypatch):
    """An architecture's NTK comes with its NNGP: the covariance needs no second call."""
    x_train, x_test, y = data
    calls = []
    original = type(NET).kernel

    def spy(self, x1, x2=None, get="ntk", **kwargs):
        calls.append((x1.shape[0], x2 is None))
        return original(self, x1, x2, get, **kwargs)

    monkeypatch.setattr(type(NET), "kernel", spy)
    predict = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y)
    for t in (1.0, None):
        predict(x_test, t=t, get="ntk")
    assert calls.count((12, True)) == 1


def test_targets_as_lists_and_times_as_numpy_scalars(data):
    """``(N,)`` targets given as a plain list, and ``t`` as a NumPy scalar or a 0-D array or
    tensor, mean the same as their tensor and float forms (they were refused)."""
    x_train, x_test, y = data
    y_list = [float(v) for v in y[:, 0]]
    expected = wn.predict.gp_inference(NET, x_train, y[:, 0], diag_reg=1e-3)(x_test)[0]
    mean = wn.predict.gp_inference(NET, x_train, y_list, diag_reg=1e-3)(x_test)[0]
    assert mean.shape == (7,)
    torch.testing.assert_close(mean, expected, rtol=0, atol=0)
    ensemble = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y_list)
    reference = ensemble(x_test, t=3.0, compute_cov=False)[0]
    for t in (np.float64(3.0), np.int64(3), np.array(3.0), torch.tensor(3),
              torch.tensor(3.0, dtype=torch.float32)):
        torch.testing.assert_close(ensemble(x_test, t=t, compute_cov=False)[0], reference,
                                   rtol=0, atol=0)
    fn = wn.predict.gradient_descent_mse(np.eye(3), [1.0, 2.0, 3.0])
    assert fn(np.int64(2))[0].shape == (3,)
    for bad in (True, "3", np.array([[1.0]]), torch.tensor([True])):
        with pytest.raises((TypeError, ValueError), match="t must be"):
            ensemble(x_test, t=bad)


def test_prediction_errors_name_x_test_and_x_train(data):
    x_train, x_test, y = data
    posterior = wn.predict.gp_inference(NET, x_train, y, diag_reg=1e-3)
    ensemble = wn.predict.gradient_descent_mse_ensemble(NET, x_train, y)
    for predict in (posterior, ensemble):
        with pytest.raises(ValueError, match=r"x_test examples must have the shape of x_train"):
            predict(x_test[:, :3])
        with pytest.raises(ValueError, match="x_test contains NaN"):
            predict(np.full((2, 4), np.nan))
    with pytest.raises(TypeError, match="y_train must be a tensor or an array"):
        wn.predict.gp_inference(NET, x_train, "labels")
