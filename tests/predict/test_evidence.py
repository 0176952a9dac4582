"""The Gaussian marginal likelihood against SciPy, its gradients against closed forms and
finite differences, and type-II maximum likelihood recovering known hyperparameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

import widenets as wn

mll = wn.predict.marginal_log_likelihood
softplus = torch.nn.functional.softplus
F64 = torch.float64

NET = wn.Sequential(wn.Linear(32, 1.5, 0.1), wn.Erf(), wn.Linear(32, 1.2, 0.1), wn.ReLU(),
                    wn.Linear(1, 1.0, 0.1))


def linear_kernel(scale, offset=0.1):
    """``scale^2 x1 x2^T / d + offset``: a kernel function of a (tensor) scale."""

    def kernel_fn(x1, x2, get):
        x2 = x1 if x2 is None else x2
        return scale**2 * (x1 @ x2.T) / x1.shape[1] + offset

    return kernel_fn


def scipy_mll(k, y, reg):
    """Sum over outputs of SciPy's Gaussian log-density, on a NumPy kernel."""
    y = y[:, None] if y.ndim == 1 else y
    cov = k + reg * np.eye(len(k))
    return sum(multivariate_normal.logpdf(y[:, j], mean=np.zeros(len(k)), cov=cov)
               for j in range(y.shape[1]))


@pytest.fixture
def data():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(15, 4))
    y = np.stack([np.sin(x.sum(1)), np.cos(x[:, 0]), x[:, 1] * x[:, 2]], axis=1)
    return x, y


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("outputs", [None, 3])
def test_matches_scipy_with_an_architecture(data, get, outputs):
    x, y = data
    y = y[:, 0] if outputs is None else y
    k = NET.kernel(x, None, get=get).numpy()  # computed once, independently
    for reg in (1e-3, torch.tensor(0.05, dtype=F64)):
        value = mll(NET, x, y, get=get, diag_reg=reg)
        assert value.dtype == F64 and value.shape == ()
        expected = scipy_mll(k, y, float(reg))
        np.testing.assert_allclose(float(value), expected, rtol=1e-8)


@pytest.mark.parametrize("outputs", [None, 3])
def test_matches_scipy_with_a_kernel_function(data, outputs):
    x, y = data
    y = y[:, 0] if outputs is None else y
    k = 1.3**2 * x @ x.T / 4 + 0.1
    # float32 inputs and targets: the kernel is the function's, the algebra float64
    value = mll(linear_kernel(1.3), torch.tensor(x), torch.tensor(y, dtype=torch.float32),
                diag_reg=0.2)
    assert value.dtype == F64
    np.testing.assert_allclose(float(value), scipy_mll(k, y.astype(np.float32), 0.2),
                               rtol=1e-8)
    # a list of lists is a target too
    np.testing.assert_allclose(float(mll(linear_kernel(1.3), x, y.tolist(), diag_reg=0.2)),
                               scipy_mll(k, y, 0.2), rtol=1e-8)


def test_gradient_in_diag_reg(data):
    x, y = data
    reg = torch.tensor(0.1, dtype=F64, requires_grad=True)
    value = mll(NET, x, y, diag_reg=reg)
    (grad,) = torch.autograd.grad(value, reg)
    # closed form: d/d sigma^2 = 1/2 sum_k (alpha_k^T alpha_k - tr A^{-1}), alpha_k = A^{-1} y_k
    a = NET.kernel(x, None, get="nngp").numpy() + 0.1 * np.eye(len(x))
    alpha = np.linalg.solve(a, y)
    expected = 0.5 * ((alpha**2).sum() - y.shape[1] * np.trace(np.linalg.inv(a)))
    np.testing.assert_allclose(float(grad), expected, rtol=1e-8)
    # central differences: truncation h^2 f''' / 6 and rounding eps |f| / h are both
    # below 1e-8 of the gradient here
    h = 1e-5
    difference = (float(mll(NET, x, y, diag_reg=0.1 + h))
                  - float(mll(NET, x, y, diag_reg=0.1 - h))) / (2 * h)
    np.testing.assert_allclose(float(grad), difference, rtol=1e-6)
    assert torch.autograd.gradcheck(lambda r: mll(NET, x, y, diag_reg=r), (reg,))


def test_gradcheck_in_targets_and_inputs(data):
    x, y = data
    y_t = torch.tensor(y, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mll(NET, x, t, diag_reg=0.1), (y_t,))
    # the inputs x, through a kernel function and through an architecture's kernel
    x_t = torch.tensor(x, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda xs: mll(linear_kernel(1.3), xs, y, diag_reg=0.1), (x_t,))
    assert torch.autograd.gradcheck(lambda xs: mll(NET, xs, y, diag_reg=0.1), (x_t,))


def test_gradcheck_in_a_kernel_parameter(data):
    x, y = data
    s = torch.tensor(1.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mll(linear_kernel(t), x, y, diag_reg=0.1), (s,))
    # the derivative in s matches the closed form 1/2 sum_k tr((alpha_k alpha_k^T - A^{-1}) dA)
    (grad,) = torch.autograd.grad(mll(linear_kernel(s), x, y, diag_reg=0.1), s)
    a = 1.3**2 * x @ x.T / 4 + 0.1 + 0.1 * np.eye(len(x))
    d_a = 2 * 1.3 * x @ x.T / 4
    alpha = np.linalg.solve(a, y)
    expected = 0.5 * (np.einsum("ik,jk,ij->", alpha, alpha, d_a)
                      - y.shape[1] * np.trace(np.linalg.solve(a, d_a)))
    np.testing.assert_allclose(float(grad), expected, rtol=1e-8)


def fisher_standard_errors(derivatives, a, outputs):
    """Asymptotic standard errors of the maximum-likelihood estimates: the inverse of the
    Fisher information ``outputs / 2 tr(A^{-1} dA_i A^{-1} dA_j)`` (R&W 2006, sec. 5.4)."""
    a_inv_d = [torch.linalg.solve(a, d) for d in derivatives]
    info = torch.tensor([[0.5 * outputs * float(torch.trace(p @ q)) for q in a_inv_d]
                         for p in a_inv_d], dtype=F64)
    return torch.linalg.inv(info).diagonal().sqrt()


def fit(loss_fn, raw, steps=60):
    """Minimise ``loss_fn()`` over the unconstrained ``raw`` tensors by L-BFGS, to a
    stationary point."""
    optimizer = torch.optim.LBFGS(raw, max_iter=steps, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    optimizer.step(closure)
    gradients = torch.autograd.grad(loss_fn(), raw)
    assert max(float(g.abs()) for g in gradients) < 1e-3, gradients


def inverse_softplus(value):
    return torch.tensor(math.log(math.expm1(value)), dtype=F64, requires_grad=True)


def test_fit_recovers_scale_and_noise_of_a_kernel_function():
    """300 points, 5 outputs of N(0, s^2 X X^T / d + noise I), d = 50. The Fisher standard
    errors at the truth are 4.5% of s and 4.0% of the noise (asserted below), so a 15%
    tolerance is 3.3 and 3.75 standard errors: a correct fit misses it with a
    probability below 1e-3, and the seeds are fixed."""
    generator = torch.Generator().manual_seed(3)
    n, d, outputs, s_true, noise_true = 300, 50, 5, 1.5, 0.1
    x = torch.randn(n, d, dtype=F64, generator=generator)
    gram = x @ x.T / d
    a_true = s_true**2 * gram + noise_true * torch.eye(n, dtype=F64)
    y = torch.linalg.cholesky(a_true) @ torch.randn(n, outputs, dtype=F64,
                                                    generator=generator)

    raw_s, raw_noise = inverse_softplus(1.0), inverse_softplus(1.0)
    fit(lambda: -mll(linear_kernel(softplus(raw_s), 0.0), x, y,
                     diag_reg=softplus(raw_noise)), [raw_s, raw_noise])
    s_fit, noise_fit = float(softplus(raw_s).detach()), float(softplus(raw_noise).detach())

    se = fisher_standard_errors([2 * s_true * gram, torch.eye(n, dtype=F64)], a_true, outputs)
    assert float(se[0]) < 0.05 * s_true and float(se[1]) < 0.05 * noise_true
    assert abs(s_fit - s_true) < 0.15 * s_true, s_fit
    assert abs(noise_fit - noise_true) < 0.15 * noise_true, noise_fit
    # the maximum-likelihood estimate beats the truth
    at_fit = mll(linear_kernel(s_fit, 0.0), x, y, diag_reg=noise_fit)
    at_truth = mll(linear_kernel(s_true, 0.0), x, y, diag_reg=noise_true)
    assert float(at_fit) >= float(at_truth)


def relu_network(w_std, b_std):
    return wn.Sequential(wn.Linear(8, W_std=w_std, b_std=b_std), wn.ReLU(),
                         wn.Linear(1, W_std=w_std, b_std=b_std))


def test_fit_recovers_the_hyperparameters_of_a_relu_network():
    """Targets drawn from the NNGP of a 1-hidden-layer ReLU network (W_std = 1.4 and
    b_std = 0.5 in both layers) plus noise 0.02: 300 inputs in 3-D with log-normal
    norms (varied norms tell the bias apart from the weights), 10 outputs. The Fisher
    standard errors at the truth are 1.6% of W_std, 4.6% of b_std and 3.5% of the noise
    (asserted below to be under 2%, 5% and 4%); each fit must land within 4 of them
    (and so within 8%, 20% and 16%): a correct fit misses with a probability below
    2e-4, and the seeds are fixed."""
    generator = torch.Generator().manual_seed(7)
    n, outputs, w_true, b_true, noise_true = 300, 10, 1.4, 0.5, 0.02
    x = torch.randn(n, 3, dtype=F64, generator=generator)
    x = x * torch.exp(torch.randn(n, 1, dtype=F64, generator=generator))
    eye = torch.eye(n, dtype=F64)

    def covariance(w, b, noise):
        return relu_network(w, b).kernel(x, None, get="nngp") + noise * eye

    a_true = covariance(w_true, b_true, noise_true)
    y = torch.linalg.cholesky(a_true) @ torch.randn(n, outputs, dtype=F64,
                                                    generator=generator)
    # the derivatives of A for the Fisher information, by central differences
    h, truth = 1e-5, (w_true, b_true, noise_true)
    derivatives = []
    for i in range(3):
        up, down = list(truth), list(truth)
        up[i] += h
        down[i] -= h
        derivatives.append((covariance(*up) - covariance(*down)) / (2 * h))
    se = fisher_standard_errors(derivatives, a_true, outputs)
    assert (se / torch.tensor(truth, dtype=F64) < torch.tensor([0.02, 0.05, 0.04])).all()

    # the fit: W_std and b_std as 0-d tensors that require grad
    raw = [inverse_softplus(1.0), inverse_softplus(1.0), inverse_softplus(0.1)]
    fit(lambda: -mll(relu_network(softplus(raw[0]), softplus(raw[1])), x, y,
                     diag_reg=softplus(raw[2])), raw)
    fitted = [float(softplus(r).detach()) for r in raw]
    for value, true, error in zip(fitted, truth, se.tolist()):
        assert abs(value - true) < 4 * error, (fitted, truth, se)
    at_fit = mll(relu_network(fitted[0], fitted[1]), x, y, diag_reg=fitted[2])
    assert float(at_fit) >= float(mll(relu_network(w_true, b_true), x, y, diag_reg=noise_true))


def test_bad_input(data):
    x, y = data
    with pytest.raises(ValueError, match="diag_reg must be a finite number >= 0"):
        mll(NET, x, y, diag_reg=-0.1)
    with pytest.raises(ValueError, match="diag_reg must be a finite number >= 0"):
        mll(NET, x, y, diag_reg=torch.tensor(-0.1, dtype=F64, requires_grad=True))
    with pytest.raises(ValueError, match="diag_reg"):
        mll(NET, x, y, diag_reg=math.nan)
    with pytest.raises(TypeError, match="diag_reg"):
        mll(NET, x, y, diag_reg=torch.tensor([0.1]))
    with pytest.raises(ValueError, match=r"y must have shape \(15,\) or \(15, outputs\)"):
        mll(NET, x, y[:-1])
    with pytest.raises(ValueError, match="get"):
        mll(NET, x, y, get=("nngp", "ntk"))
    with pytest.raises(TypeError, match="net_or_kernels"):
        mll("nngp", x, y)
    # duplicated points: a singular kernel, refused with diag_reg = 0 ...
    x_dup, y_dup = np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])
    with pytest.raises(ValueError, match="pass diag_reg > 0"):
        mll(NET, x_dup, y_dup)
    # ... and finite (never NaN) with diag_reg > 0
    assert torch.isfinite(mll(NET, x_dup, y_dup, diag_reg=1e-6))
    # a kernel function that is not positive semi-definite: a larger diag_reg
    with pytest.raises(ValueError, match="pass a larger diag_reg"):
        mll(lambda x1, x2, get: -torch.ones(len(x1), len(x1 if x2 is None else x2),
                                            dtype=F64) * 10, x, y, diag_reg=1.0)
