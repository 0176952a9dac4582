"""GP posterior and gradient-descent dynamics against direct NumPy/SciPy formulas."""

from __future__ import annotations

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
