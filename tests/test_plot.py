"""wn.plot: the figures draw what they say, and the expected losses follow the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import widenets as wn  # noqa: E402
from widenets import plot  # noqa: E402
from widenets.predict import gp_inference, gradient_descent_mse_ensemble  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
NET = wn.Sequential(wn.Linear(16, 1.5, 0.2), wn.ReLU(), wn.Linear(16, 1.5, 0.2), wn.ReLU(),
                    wn.Linear(1, 1.0, 0.2))


@pytest.fixture
def data_1d():
    rng = np.random.default_rng(0)
    x_train = np.sort(rng.uniform(-2, 2, size=(6, 1)), axis=0)
    y_train = np.sin(2 * x_train[:, 0])
    x_test = np.linspace(2.5, -2.5, 25)  # a vector, in decreasing order
    return x_train, y_train, x_test


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    x_train, x_test = rng.normal(size=(9, 3)), rng.normal(size=(5, 3))
    y_train = np.stack([np.sin(x_train.sum(1)), np.cos(x_train[:, 0])], axis=1)
    y_test = np.stack([np.sin(x_test.sum(1)), np.cos(x_test[:, 0])], axis=1)
    return x_train, y_train, x_test, y_test


def test_plot_regression_1d_draws_posterior_and_ensemble(data_1d, tmp_path):
    x_train, y_train, x_test = data_1d
    times = (1.0, 10.0, math.inf)
    ax = plot.plot_regression_1d(NET, x_train, y_train, x_test, times=times, diag_reg=1e-4)
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["NNGP posterior ± 2σ", "NTK ensemble, t = 1", "NTK ensemble, t = 10",
                      "NTK ensemble, t = ∞"]
    # One band per line, and the training points.
    assert len(ax.collections) == len(ax.lines) + 1
    scatter = ax.collections[-1]
    assert scatter.get_label() == "training points"
    np.testing.assert_allclose(scatter.get_offsets(), np.c_[x_train[:, 0], y_train])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == [*labels, "training points"]
    # Curves are drawn on the sorted test inputs and are the predictions there.
    grid = np.sort(x_test)
    nngp_mean, _ = gp_inference(NET, x_train, y_train, diag_reg=1e-4)(grid[:, None])
    np.testing.assert_allclose(ax.lines[0].get_xdata(), grid)
    np.testing.assert_allclose(ax.lines[0].get_ydata(), nngp_mean.numpy(), rtol=1e-10)
    ntk_mean, ntk_cov = gradient_descent_mse_ensemble(NET, x_train, y_train, diag_reg=1e-4)(
        grid[:, None], t=None)
    np.testing.assert_allclose(ax.lines[-1].get_ydata(), ntk_mean.numpy(), rtol=1e-10)
    # The band is mean +- 2 sigma.
    band = ax.collections[len(times)].get_paths()[0].vertices
    sigma = np.sqrt(np.clip(np.diag(ntk_cov.numpy()), 0, None))
    top = ntk_mean.numpy() + 2 * sigma
    assert np.allclose(band[:, 1].max(), top.max()) and np.all(band[:, 1] <= top.max() + 1e-9)
    path = tmp_path / "regression.png"
    ax.figure.savefig(path, dpi=50)
    assert path.read_bytes()[:8] == PNG


def test_plot_regression_1d_into_given_axes_with_kernel_function(data_1d):
    from matplotlib.figure import Figure

    x_train, y_train, x_test = data_1d
    fig = Figure()
    left, right = fig.subplots(1, 2)

    def kernel_fn(x1, x2, get):
        return NET.kernel(x1, x2, get=get)

    y2 = np.stack([y_train, -y_train], axis=1)
    ax = plot.plot_regression_1d(kernel_fn, x_train, y2, x_test, times=(5.0,), ax=right,
                                 get="nngp", output=1, diag_reg=1e-4)
    assert ax is right and not left.lines
    assert [line.get_label() for line in ax.lines] == ["NNGP posterior ± 2σ",
                                                       "NNGP ensemble, t = 5"]
    assert ax.get_ylabel() == "f(x)[1]"
    np.testing.assert_allclose(ax.collections[-1].get_offsets()[:, 1], -y_train)
    with pytest.raises(ValueError, match="one input feature"):
        plot.plot_regression_1d(NET, np.c_[x_train, x_train], y_train, x_test)
    with pytest.raises(ValueError, match="output"):
        plot.plot_regression_1d(NET, x_train, y_train, x_test, output=1)


def test_expected_losses_match_the_ensemble_formula(data):
    x_train, y_train, x_test, y_test = data
    times = torch.tensor([0.0, 0.3, 3.0, 30.0, math.inf], dtype=torch.float64)
    reg = 1e-3
    losses = plot.expected_losses(NET, x_train, y_train, x_test, y_test, times,
                                  learning_rate=0.5, diag_reg=reg)
    ensemble = gradient_descent_mse_ensemble(NET, x_train, y_train, learning_rate=0.5,
                                             diag_reg=reg)
    for x, y, loss, variance, means in (
        (x_train, y_train, losses.train, losses.train_variance, losses.train_mean),
        (x_test, y_test, losses.test, losses.test_variance, losses.test_mean),
    ):
        mean, cov = ensemble(x, times)
        trace = np.trace(cov.numpy(), axis1=1, axis2=2)
        expected = 0.5 * (((mean.numpy() - y) ** 2).sum(axis=(1, 2)) + 2 * trace)
        # Near convergence the training loss is a small difference of large terms.
        np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(variance.numpy(), 2 * trace, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(means.numpy(), mean.numpy(), rtol=1e-12)
    assert (losses.n_train, losses.n_test) == (9, 5)
    np.testing.assert_array_equal(losses.times.numpy(), times.numpy())
    # t = 0 is the prior: mean 0 and covariance K(x, x) (the NNGP), for every output.
    for x, y, loss in ((x_train, y_train, losses.train), (x_test, y_test, losses.test)):
        prior = 0.5 * ((y ** 2).sum() + 2 * np.trace(NET.kernel(x, None, get="nngp").numpy()))
        assert float(loss[0]) == pytest.approx(prior, rel=1e-12)
    # The expected training loss falls with time.
    assert np.all(np.diff(losses.train.numpy()) < 0)


def test_expected_losses_accept_kernel_functions_and_one_output(data):
    x_train, y_train, x_test, y_test = data
    times = [0.0, 1.0, None]

    def kernel_fn(x1, x2, get):
        return NET.kernel(x1, x2, get=get)

    from_net = plot.expected_losses(NET, x_train, y_train[:, 0], x_test, y_test[:, 0], times,
                                    get="nngp", diag_reg=1e-3)
    from_fn = plot.expected_losses(kernel_fn, x_train, y_train[:, :1], x_test, y_test[:, :1],
                                   times, get="nngp", diag_reg=1e-3)
    np.testing.assert_allclose(from_net.test.numpy(), from_fn.test.numpy(), rtol=1e-12)
    np.testing.assert_allclose(from_net.train.numpy(), from_fn.train.numpy(), rtol=1e-12)
    assert from_net.test_mean.shape == (3, 5) and from_fn.test_mean.shape == (3, 5, 1)
    assert math.isinf(float(from_net.times[-1]))
    with pytest.raises(ValueError, match="outputs"):
        plot.expected_losses(NET, x_train, y_train, x_test, y_test[:, 0], times)
    with pytest.raises(ValueError, match=">= 0"):
        plot.expected_losses(NET, x_train, y_train, x_test, y_test, [1.0, -1.0])


def test_plot_loss_curves_artists(data, tmp_path):
    x_train, y_train, x_test, y_test = data
    times = [0.0, 0.1, 1.0, 10.0, 100.0, math.inf]
    ax = plot.plot_loss_curves(NET, x_train, y_train, x_test, y_test, times, diag_reg=1e-3)
    labels = [line.get_label() for line in ax.lines]
    assert labels == ["train", "train, t = ∞", "test", "test, t = ∞"]
    assert ax.get_xscale() == "symlog" and ax.get_yscale() == "log"
    assert "NTK" in ax.get_title()
    losses = plot.expected_losses(NET, x_train, y_train, x_test, y_test, times, diag_reg=1e-3)
    np.testing.assert_allclose(ax.lines[0].get_xdata(), times[:-1])
    np.testing.assert_allclose(ax.lines[2].get_ydata(), losses.test[:-1].numpy(), rtol=1e-12)
    np.testing.assert_allclose(ax.lines[3].get_ydata(), float(losses.test[-1]), rtol=1e-12)
    path = tmp_path / "losses.png"
    ax.figure.savefig(path, dpi=50)
    assert path.read_bytes()[:8] == PNG
    # Positive times only: a log axis; per point: divided by the number of points.
    per_point = plot.plot_expected_losses(losses, per_point=True, logy=False)
    assert per_point.get_yscale() == "linear" and "per point" in per_point.get_ylabel()
    np.testing.assert_allclose(per_point.lines[2].get_ydata(), losses.test[:-1].numpy() / 5)
    positive = plot.plot_loss_curves(NET, x_train, y_train, x_test, y_test, [0.5, 5.0])
    assert positive.get_xscale() == "log" and len(positive.lines) == 2
