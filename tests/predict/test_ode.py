"""Function-space training dynamics for any loss, against closed forms and finite models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import widenets as wn
from widenets.predict import ode as dynamics

NET = wn.Sequential(wn.Linear(32, 1.5, 0.1), wn.Erf(), wn.Linear(32, 1.2, 0.1), wn.ReLU(),
                    wn.Linear(1, 1.0, 0.1))


@pytest.fixture
def kernels():
    rng = np.random.default_rng(5)
    x_train, x_test = rng.normal(size=(12, 4)), rng.normal(size=(7, 4))
    k = NET.kernel(x_train, None, get="ntk").numpy()
    k_tx = NET.kernel(x_test, x_train, get="ntk").numpy()
    y = np.stack([np.sin(x_train.sum(1)), np.cos(x_train[:, 0])], axis=1)
    return k, k_tx, y


def softmax(u):
    e = np.exp(u - u.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def linear_model(seed, n=6, n_test=3, p=10, classes=3):
    """Features of a finite linear model ``f = Phi W`` (``T = Phi Phi^T``) and one-hot targets."""
    rng = np.random.default_rng(seed)
    phi, phi_test = rng.normal(size=(n, p)) / np.sqrt(p), rng.normal(size=(n_test, p)) / np.sqrt(p)
    y = np.eye(classes)[rng.integers(0, classes, n)]
    w0 = rng.normal(size=(p, classes))
    return phi, phi_test, y, w0


def mse_loss(f, y):
    return 0.5 * ((f - y) ** 2).sum()


def cross_entropy_loss(f, y):
    return -(y * torch.log_softmax(f, dim=-1)).sum()


@pytest.mark.parametrize("loss", ["mse", mse_loss])
def test_mse_matches_closed_form(kernels, loss):
    k, k_tx, y = kernels
    rng = np.random.default_rng(0)
    f0, ft0 = rng.normal(size=y.shape), rng.normal(size=(7, 2))
    lr, reg = 0.7, 1e-3
    exact = wn.predict.gradient_descent_mse(k, y, learning_rate=lr, diag_reg=reg)
    ode = dynamics.gradient_descent(loss, k, y, learning_rate=lr, diag_reg=reg)
    times = np.array([3.0, 0.0, 0.5, 20.0, 0.5])  # unsorted, with a repeat
    train, test = ode(torch.tensor(times), f0, ft0, k_tx)
    assert train.shape == (5, 12, 2) and test.shape == (5, 7, 2)
    assert train.dtype == torch.float64
    for i, t in enumerate(times):
        expected_train, expected_test = exact(float(t), f0, ft0, k_tx)
        np.testing.assert_allclose(train[i].numpy(), expected_train.numpy(), rtol=1e-7,
                                   atol=1e-9)
        np.testing.assert_allclose(test[i].numpy(), expected_test.numpy(), rtol=1e-7, atol=1e-9)
    # t = 0 returns the initial outputs exactly; a scalar time has no time axis.
    train0, test0 = ode(0.0, f0, ft0, k_tx)
    np.testing.assert_array_equal(train0.numpy(), f0)
    np.testing.assert_array_equal(test0.numpy(), ft0)
    train_1, none = ode(1.5, f0)
    assert none is None and train_1.shape == (12, 2)
    np.testing.assert_allclose(train_1.numpy(), exact(1.5, f0)[0].numpy(), rtol=1e-7, atol=1e-9)


def test_mse_vector_targets(kernels):
    k, k_tx, y = kernels
    exact = wn.predict.gradient_descent_mse(k, y[:, 0], learning_rate=0.3)
    ode = dynamics.gradient_descent(mse_loss, k, y[:, 0], learning_rate=0.3)
    train, test = ode(np.array([2.0, 1.0]), 0.1, None, k_tx)
    expected_train, expected_test = exact(torch.tensor([2.0, 1.0]), 0.1, None, k_tx)
    assert train.shape == (2, 12) and test.shape == (2, 7)
    np.testing.assert_allclose(train.numpy(), expected_train.numpy(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(test.numpy(), expected_test.numpy(), rtol=1e-7, atol=1e-9)


def rk4_cross_entropy(t_end, steps, t_matrix, k_test_train, y, lr, f0, ft0):
    """Fixed-step RK4 of ``du/dt = -lr T g``, ``df/dt = -lr K g``, ``g = softmax(u) - y``."""
    a = np.concatenate([t_matrix, k_test_train])
    n = len(y)

    def rhs(z):
        return -lr * a @ (softmax(z[:n]) - y)

    z, h = np.concatenate([f0, ft0]), t_end / steps
    for _ in range(steps):
        k1 = rhs(z)
        k2 = rhs(z + 0.5 * h * k1)
        k3 = rhs(z + 0.5 * h * k2)
        k4 = rhs(z + h * k3)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z[:n], z[n:]


@pytest.mark.parametrize("loss", ["cross_entropy", cross_entropy_loss])
def test_cross_entropy_matches_fine_rk4(kernels, loss):
    k, k_tx, _ = kernels
    rng = np.random.default_rng(3)
    y = np.eye(4)[rng.integers(0, 4, 12)]
    f0, ft0 = rng.normal(size=(12, 4)), rng.normal(size=(7, 4))
    lr, reg = 0.8, 1e-2
    ode = dynamics.gradient_descent(loss, k, y, learning_rate=lr, diag_reg=reg)
    train, test = ode(torch.tensor([4.0, 1.0]), f0, ft0, k_tx)
    for i, t in enumerate([4.0, 1.0]):
        ref_train, ref_test = rk4_cross_entropy(t, 4000, k + reg * np.eye(12), k_tx, y, lr,
                                                f0, ft0)
        np.testing.assert_allclose(train[i].numpy(), ref_train, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(test[i].numpy(), ref_test, rtol=1e-8, atol=1e-8)
    # Training moved the outputs (the comparison is not trivial) towards the labels.
    assert np.abs(train[0].numpy() - f0).max() > 0.5
    assert (softmax(train[0].numpy()) * y).sum() > (softmax(f0) * y).sum()


def test_cross_entropy_matches_finite_linear_model():
    """GD on ``f = [Phi, sqrt(reg) I] w`` with cross-entropy: T = Phi Phi^T + reg I."""
    phi, phi_test, y, w0 = linear_model(seed=7)
    reg = 0.05
    features = np.concatenate([phi, np.sqrt(reg) * np.eye(6)], axis=1)
    features_test = np.concatenate([phi_test, np.zeros((3, 6))], axis=1)
    w0 = np.concatenate([w0, np.zeros((6, 3))])
    f0, ft0 = features @ w0, features_test @ w0
    ode = dynamics.gradient_descent("cross_entropy", phi @ phi.T, y, learning_rate=1.0,
                                    diag_reg=reg)
    errors = []
    for lr in [0.02, 0.002]:
        steps = round(6.0 / lr)
        w = w0.copy()
        for _ in range(steps):
            w -= lr * features.T @ (softmax(features @ w) - y)
        train, test = ode(6.0, f0, ft0, phi_test @ phi.T)
        errors.append(max(np.abs(train.numpy() - features @ w).max(),
                          np.abs(test.numpy() - features_test @ w).max()))
    # Gradient descent is first order in its step: the error shrinks like lr.
    assert errors[1] < errors[0] / 5 and errors[1] < 5e-4


def heavy_ball(features, features_test, w0, y, lr, momentum, steps, gradient):
    w, v = w0.copy(), np.zeros_like(w0)
    for _ in range(steps):
        v = momentum * v - lr * features.T @ gradient(features @ w, y)
        w = w + v
    return features @ w, features_test @ w


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_momentum_matches_heavy_ball(loss):
    """Steps k of heavy ball with friction (1 - m) / sqrt(lr) = 1 approach the ODE at t = k."""
    phi, phi_test, y, w0 = linear_model(seed=11)
    gradient = (lambda f, y: f - y) if loss == "mse" else (lambda f, y: softmax(f) - y)
    f0, ft0 = phi @ w0, phi_test @ w0
    tau, friction = 4.0, 1.0  # time in units of sqrt(lr)
    errors = []
    for lr in [1e-2, 1e-4]:
        momentum, steps = 1.0 - friction * np.sqrt(lr), round(tau / np.sqrt(lr))
        ode = dynamics.gradient_descent_momentum(loss, phi @ phi.T, y, learning_rate=lr,
                                                 momentum=momentum)
        train, test = ode(float(steps), f0, ft0, phi_test @ phi.T)
        ref_train, ref_test = heavy_ball(phi, phi_test, w0, y, lr, momentum, steps, gradient)
        assert np.abs(ref_train - f0).max() > 0.3  # the outputs moved
        errors.append(max(np.abs(train.numpy() - ref_train).max(),
                          np.abs(test.numpy() - ref_test).max()))
    # The error is of order sqrt(lr): 10 times smaller for a 100 times smaller lr.
    assert errors[1] < errors[0] / 5 and errors[1] < 5e-3


def test_momentum_with_fixed_momentum_and_time_axis():
    """m = 0.9 fixed, lr small: heavy ball still follows the ODE; any order of times."""
    phi, phi_test, y, w0 = linear_model(seed=2)
    f0, ft0 = phi @ w0, phi_test @ w0
    lr, momentum = 1e-3, 0.9
    ode = dynamics.gradient_descent_momentum("cross_entropy", phi @ phi.T, y, learning_rate=lr,
                                             momentum=momentum)
    times = [3000, 0, 1000]
    train, test = ode(np.array(times, dtype=float), f0, ft0, phi_test @ phi.T)
    np.testing.assert_array_equal(train[1].numpy(), f0)
    np.testing.assert_array_equal(test[1].numpy(), ft0)
    for i, steps in enumerate(times):
        ref_train, ref_test = heavy_ball(phi, phi_test, w0, y, lr, momentum, steps,
                                         lambda f, y: softmax(f) - y)
        np.testing.assert_allclose(train[i].numpy(), ref_train, atol=2e-3)
        np.testing.assert_allclose(test[i].numpy(), ref_test, atol=2e-3)
    assert np.abs(train[0].numpy() - f0).max() > 0.3


def test_momentum_mse_reaches_the_gradient_descent_interpolant(kernels):
    k, k_tx, y = kernels
    rng = np.random.default_rng(4)
    f0, ft0 = rng.normal(size=y.shape), rng.normal(size=(7, 2))
    reg = 0.05
    limit_train, limit_test = wn.predict.gradient_descent_mse(k, y, diag_reg=reg)(
        None, f0, ft0, k_tx)
    ode = dynamics.gradient_descent_momentum("mse", k, y, learning_rate=0.5, momentum=0.8,
                                             diag_reg=reg)
    train, test = ode(3000.0, f0, ft0, k_tx)
    np.testing.assert_allclose(train.numpy(), limit_train.numpy(), atol=1e-7)
    np.testing.assert_allclose(test.numpy(), limit_test.numpy(), atol=1e-7)
    # Halfway there it still differs from plain gradient flow at the same time.
    early, _ = ode(5.0, f0, ft0, k_tx)
    plain, _ = dynamics.gradient_descent("mse", k, y, learning_rate=0.5, diag_reg=reg)(5.0, f0)
    assert np.abs(early.numpy() - plain.numpy()).max() > 1e-2


def test_errors(kernels):
    k, k_tx, y = kernels
    ode = dynamics.gradient_descent("mse", k, y)
    with pytest.raises(ValueError, match="large"):
        ode(None)
    with pytest.raises(ValueError, match="finite"):
        ode(torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match="t must be"):
        ode(-1.0)
    with pytest.raises(ValueError, match="k_test_train"):
        ode(1.0, 0.0, None, k_tx[:, :5])
    with pytest.raises(ValueError, match="fx_test_0"):
        ode(1.0, 0.0, np.zeros((7, 2)))
    with pytest.raises(ValueError, match="fx_train_0"):
        ode(1.0, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="square"):
        dynamics.gradient_descent("mse", np.ones((3, 4)), np.ones(3))
    with pytest.raises(ValueError, match="square"):
        dynamics.gradient_descent("mse", np.ones((2, 3, 3)), np.ones(3))
    with pytest.raises(ValueError, match="k_train_train"):
        dynamics.gradient_descent("mse", np.full((3, 3), np.nan), np.ones(3))
    with pytest.raises(ValueError, match="y_train"):
        dynamics.gradient_descent("mse", np.eye(3), np.ones(4))
    with pytest.raises(ValueError, match="loss_fn"):
        dynamics.gradient_descent("hinge", np.eye(3), np.ones(3))
    with pytest.raises(TypeError, match="loss_fn"):
        dynamics.gradient_descent(3, np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="cross_entropy"):
        dynamics.gradient_descent("cross_entropy", np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="learning_rate"):
        dynamics.gradient_descent("mse", np.eye(3), np.ones(3), learning_rate=-0.1)
    with pytest.raises(ValueError, match="diag_reg"):
        dynamics.gradient_descent("mse", np.eye(3), np.ones(3), diag_reg=-1.0)
    with pytest.raises(ValueError, match="positive semi-definite"):
        dynamics.gradient_descent("mse", -np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match="method"):
        dynamics.gradient_descent("mse", np.eye(3), np.ones(3), method="Euler")
    with pytest.raises(ValueError, match="momentum"):
        dynamics.gradient_descent_momentum("mse", np.eye(3), np.ones(3), momentum=1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        dynamics.gradient_descent_momentum("mse", np.eye(3), np.ones(3), learning_rate=-1.0)
    with pytest.raises(ValueError, match="large"):
        dynamics.gradient_descent_momentum("mse", np.eye(3), np.ones(3))(None)


def test_bad_loss_and_divergence():
    y = np.ones(3)
    not_scalar = dynamics.gradient_descent(lambda f, y: (f - y) ** 2, np.eye(3), y)
    with pytest.raises(TypeError, match="scalar"):
        not_scalar(1.0)
    log_loss = dynamics.gradient_descent(lambda f, y: -torch.log(f).sum(), np.eye(3), y)
    with pytest.raises(ValueError, match="NaN or inf"):
        log_loss(1.0, 0.0)
    # du/dt = 4 u^3 from u = 1 blows up at t = 1/8: an error, never NaN or inf.
    exploding = dynamics.gradient_descent(lambda f, y: -(f**4).sum(), np.eye(3), y)
    with pytest.raises(FloatingPointError, match="diverge"):
        exploding(1.0, 1.0)
    exploding_momentum = dynamics.gradient_descent_momentum(lambda f, y: -(f**4).sum(),
                                                            np.eye(3), y, momentum=0.5)
    with pytest.raises(FloatingPointError, match="diverge"):
        exploding_momentum(10.0, 1.0)
    # Before the blow-up the solution is finite and exact: u(t) = (1 - 8 t)^(-1/2).
    u, _ = exploding(0.1, 1.0)
    np.testing.assert_allclose(u.numpy(), np.full(3, 1 / np.sqrt(0.2)), rtol=1e-7)


@pytest.mark.parametrize(("method", "loss"), [("RK45", "cross_entropy"),
                                             ("Radau", "cross_entropy"),
                                             ("BDF", cross_entropy_loss)])
def test_other_methods_with_exact_jacobian(kernels, method, loss):
    """Implicit methods get the exact Jacobian (a Hessian from torch.func for a callable)."""
    k, k_tx, _ = kernels
    rng = np.random.default_rng(8)
    y = np.eye(3)[rng.integers(0, 3, 12)]
    f0 = rng.normal(size=(12, 3))
    default = dynamics.gradient_descent("cross_entropy", k, y, learning_rate=0.5)(
        2.0, f0, None, k_tx)
    other = dynamics.gradient_descent(loss, k, y, learning_rate=0.5, method=method)(
        2.0, f0, None, k_tx)
    for a, b in zip(default, other):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    momentum = [dynamics.gradient_descent_momentum(lo, k, y, 0.5, 0.7, method=m)(
                    6.0, f0, None, k_tx) for lo, m in (("cross_entropy", "DOP853"), (loss, method))]
    for a, b in zip(*momentum):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy", cross_entropy_loss])
def test_loss_gradient_and_hessian_match_finite_differences(loss):
    """The Jacobian handed to the implicit methods is the derivative of the gradient."""
    rng = np.random.default_rng(9)
    y = torch.tensor(np.eye(3)[rng.integers(0, 3, 5)])
    derivatives = dynamics._Loss(loss, y, False)
    u = rng.normal(size=(5, 3))
    value = cross_entropy_loss if loss != "mse" else mse_loss
    eps = 1e-6
    gradient = derivatives.gradient(u)
    hessian = derivatives.hessian(u)
    for i in range(15):
        step = np.zeros(15)
        step[i] = eps
        up, down = u + step.reshape(5, 3), u - step.reshape(5, 3)
        numeric = (float(value(torch.tensor(up), y)) - float(value(torch.tensor(down), y))) / (
            2 * eps)
        assert gradient.reshape(-1)[i] == pytest.approx(numeric, abs=1e-7)
        column = (derivatives.gradient(up) - derivatives.gradient(down)).reshape(-1) / (2 * eps)
        np.testing.assert_allclose(hessian[:, i], column, atol=1e-7)


def test_exposed_in_predict():
    import widenets as wn
    from widenets.predict import ode as dynamics

    assert wn.predict.gradient_descent is dynamics.gradient_descent
    assert wn.predict.gradient_descent_momentum is dynamics.gradient_descent_momentum
