"""scikit-learn estimators: API compliance, agreement with widenets.predict, use in
pipelines and grid searches, parameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm
from sklearn.datasets import load_digits, make_blobs
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import widenets as wn
from widenets import sklearn as wsk


def relu_net(depth: int = 2, w_std: float = 1.5, b_std: float = 0.05) -> wn.Layer:
    layers = []
    for _ in range(depth):
        layers += [wn.Linear(1, w_std, b_std), wn.ReLU()]
    return wn.Sequential(*layers, wn.Linear(1, w_std, b_std))


@pytest.fixture
def regression_data():
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(30, 3)), rng.normal(size=(11, 3))
    y = np.stack([np.sin(x_train.sum(1)), np.cos(x_train[:, 0])], axis=1)
    return x_train, x_test, y


@parametrize_with_checks([
    wsk.KernelRegressor(),
    wsk.KernelClassifier(),
    wsk.KernelRegressor(kernel="nngp", activation="erf", t=3.0, diag_reg=1e-3),
    wsk.KernelClassifier(kernel="nngp", depth=1, activation="gelu", t=10.0),
    wsk.KernelRegressor(fit_hyperparameters=True),
])
def test_sklearn_compatible(estimator, check):
    check(estimator)


def test_nngp_at_infinity_is_the_gp_posterior(regression_data):
    x_train, x_test, y = regression_data
    model = wsk.KernelRegressor(kernel="nngp", diag_reg=0.0).fit(x_train, y[:, 0])
    mean, std = model.predict(x_test, return_std=True)
    expected_mean, cov = wn.predict.gp_inference(relu_net(), x_train, y[:, 0])(x_test,
                                                                                get="nngp")
    assert mean.shape == std.shape == (11,) and mean.dtype == np.float64
    np.testing.assert_allclose(mean, expected_mean.numpy(), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(std, np.sqrt(np.diag(cov.numpy())), rtol=1e-6, atol=1e-8)
    assert std.min() > 1e-3  # test points are away from the data: real uncertainty
    np.testing.assert_allclose(model.predict(x_test), mean)
    # Predictions use the parameters of the fit, not later set_params.
    np.testing.assert_array_equal(model.set_params(kernel="ntk").predict(x_test), mean)


def test_nngp_with_ridge_is_the_ridge_trained_ensemble(regression_data):
    # diag_reg > 0: the mean is still the GP posterior mean with noise variance
    # diag_reg, but the spread is that of networks trained with the ridge penalty,
    # smaller than the noisy GP posterior's.
    x_train, x_test, y = regression_data
    mean, std = wsk.KernelRegressor(kernel="nngp", diag_reg=0.5).fit(x_train, y).predict(
        x_test, return_std=True)
    gp_mean, gp_cov = wn.predict.gp_inference(relu_net(), x_train, y, diag_reg=0.5)(x_test)
    np.testing.assert_allclose(mean, gp_mean.numpy(), rtol=1e-7, atol=1e-9)
    gp_std = np.sqrt(np.diag(gp_cov.numpy()))
    assert (std[:, 0] < gp_std).all() and (std[:, 0] > 0.3 * gp_std).all()


@pytest.mark.parametrize("get", ["ntk", "nngp"])
def test_finite_time_is_the_ensemble(regression_data, get):
    x_train, x_test, y = regression_data
    params = dict(depth=3, W_std=1.3, b_std=0.2, kernel=get, t=2.5, learning_rate=0.5,
                  diag_reg=1e-3)
    model = wsk.KernelRegressor(activation="erf", **params).fit(x_train, y)
    mean, std = model.predict(x_test, return_std=True)
    net = wn.Sequential(*[wn.Linear(1, 1.3, 0.2), wn.Erf()] * 3, wn.Linear(1, 1.3, 0.2))
    expected_mean, cov = wn.predict.gradient_descent_mse_ensemble(
        net, x_train, y, learning_rate=0.5, diag_reg=1e-3)(x_test, t=2.5, get=get)
    assert mean.shape == std.shape == (11, 2)
    np.testing.assert_allclose(mean, expected_mean.numpy(), rtol=1e-7, atol=1e-9)
    expected_std = np.sqrt(np.clip(np.diag(cov.numpy()), 0, None))
    np.testing.assert_allclose(std, np.stack([expected_std] * 2, axis=1), rtol=1e-6, atol=1e-8)
    # Not yet converged: the training targets are not reached.
    assert np.abs(model.predict(x_train) - y).max() > 1e-2
    # An explicit architecture overrides depth/activation/W_std/b_std.
    params.pop("depth")
    other = wsk.KernelRegressor(architecture=net, depth=0, activation="relu", **params)
    np.testing.assert_allclose(other.fit(x_train, y).predict(x_test), mean, rtol=1e-12)


def test_duplicated_samples_do_not_give_nan():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 2))
    x = np.concatenate([x, x[:3]])  # three points twice, with conflicting targets
    y = np.concatenate([np.ones(8), -np.ones(3)])
    x_test = np.concatenate([x[:3], rng.normal(size=(4, 2))])
    for get in ("ntk", "nngp"):
        mean, std = wsk.KernelRegressor(kernel=get).fit(x, y).predict(x_test, return_std=True)
        assert np.isfinite(mean).all() and np.isfinite(std).all()
        # The minimum-norm interpolant averages the duplicated targets.
        np.testing.assert_allclose(mean[:3], 0.0, atol=1e-6)
    proba = wsk.KernelClassifier().fit(x, y > 0).predict_proba(x_test)
    assert np.isfinite(proba).all()
    np.testing.assert_allclose(proba[:3], 0.5, atol=1e-6)  # a tie of the two classes


def test_classifier_on_digits():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_train, y_train, x_test, y_test = x[:400], y[:400], x[1000:1300], y[1000:1300]
    model = wsk.KernelClassifier(diag_reg=0.0).fit(x_train, y_train)
    np.testing.assert_array_equal(model.classes_, np.arange(10))
    assert model.score(x_test, y_test) > 0.9
    proba = model.predict_proba(x_test)
    assert proba.shape == (300, 10)
    assert proba.min() >= 0.0
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(model.classes_[proba.argmax(axis=1)], model.predict(x_test))
    np.testing.assert_array_equal(model.decision_function(x_test).argmax(axis=1),
                                  proba.argmax(axis=1))
    # Uncertain away from the data, certain on it: diag_reg=0 interpolates the one-hot
    # coding with no variance left.
    assert proba.max(axis=1).min() < 0.99
    train_proba = model.predict_proba(x_train[:50])
    np.testing.assert_allclose(train_proba, np.eye(10)[y_train[:50]], atol=1e-6)
    # Targets: one-hot minus 1/K, so outputs sum to zero over classes.
    np.testing.assert_allclose(model.decision_function(x_test).sum(axis=1), 0.0, atol=1e-9)


def test_binary_classifier_with_labels():
    x, y = make_blobs(n_samples=80, centers=[(-2, 0), (2, 0)], random_state=3)
    labels = np.where(y == 1, "yes", "no")
    model = wsk.KernelClassifier(kernel="nngp", diag_reg=1e-2).fit(x[:60], labels[:60])
    assert list(model.classes_) == ["no", "yes"]
    assert model.score(x[60:], labels[60:]) == 1.0
    decision = model.decision_function(x[60:])
    assert decision.shape == (20,)
    np.testing.assert_array_equal(model.classes_[(decision > 0).astype(int)],
                                  model.predict(x[60:]))
    # Two classes: P(yes) = Phi((mu_yes - mu_no) / (sqrt(2) sigma)).
    proba = model.predict_proba(x[60:])
    mean, std = model._posterior(x[60:], return_std=True)
    expected = norm.cdf((mean[:, 1] - mean[:, 0]) / (np.sqrt(2) * std))
    np.testing.assert_allclose(proba[:, 1], expected, rtol=1e-9, atol=1e-12)


def test_largest_gaussian_probabilities_by_quadrature():
    rng = np.random.default_rng(2)
    mean, std = rng.normal(size=(6, 4)), rng.uniform(0.1, 2.0, size=6)
    proba = wsk.largest_gaussian_probabilities(mean, std)
    for i in range(6):
        for k in range(4):
            others = np.delete(mean[i], k)

            def integrand(z, i=i, k=k, others=others):
                return norm.pdf(z) * np.prod(norm.cdf((mean[i, k] - others) / std[i] + z))

            np.testing.assert_allclose(proba[i, k], quad(integrand, -np.inf, np.inf)[0],
                                       atol=1e-9)
    np.testing.assert_array_equal(proba.argmax(axis=1), mean.argmax(axis=1))
    # No spread: one-hot of the largest mean, ties split equally.
    certain = wsk.largest_gaussian_probabilities(np.array([[1.0, 3.0, 3.0], [0.0, -1.0, 2.0]]),
                                                 np.zeros(2))
    np.testing.assert_array_equal(certain, [[0.0, 0.5, 0.5], [0.0, 0.0, 1.0]])


def test_grid_search_in_a_pipeline():
    rng = np.random.default_rng(4)
    x = rng.uniform(-2, 2, size=(90, 2)) * np.array([1.0, 100.0])  # badly scaled
    y = np.sin(2 * x[:, 0]) + 0.3 * rng.normal(size=90)
    pipe = make_pipeline(StandardScaler(), wsk.KernelRegressor())
    grid = {"kernelregressor__b_std": [0.05, 1.0], "kernelregressor__diag_reg": [0.0, 1.0]}
    search = GridSearchCV(pipe, grid, cv=3).fit(x, y)
    # With b_std=0.05 a ReLU network is nearly positively homogeneous (f(cx) ~ c f(x)),
    # a poor prior for sin: the biased one wins by far.
    assert search.best_params_["kernelregressor__b_std"] == 1.0
    assert search.best_params_["kernelregressor__diag_reg"] in (0.0, 1.0)
    scores = search.cv_results_["mean_test_score"]
    assert np.isfinite(scores).all() and search.best_score_ > 0.3
    unbiased = np.array(search.cv_results_["param_kernelregressor__b_std"]) == 0.05
    assert search.best_score_ > scores[unbiased].max() + 0.2
    assert search.predict(x[:5]).shape == (5,)

    xc, yc = make_blobs(n_samples=90, centers=3, cluster_std=2.0, random_state=0)
    pipe = make_pipeline(StandardScaler(), wsk.KernelClassifier())
    grid = {"kernelclassifier__kernel": ["nngp", "ntk"], "kernelclassifier__t": [0.1, None]}
    search = GridSearchCV(pipe, grid, cv=3, scoring="neg_log_loss").fit(xc, yc)
    assert search.best_params_["kernelclassifier__kernel"] in ("nngp", "ntk")
    assert search.best_score_ > -1.0
    assert search.predict_proba(xc[:4]).shape == (4, 3)


@pytest.mark.parametrize("name, value", [
    ("depth", -1), ("depth", 1.5), ("activation", "tanh"), ("activation", torch.tanh),
    ("W_std", 0.0), ("b_std", -0.1), ("b_std", float("nan")), ("kernel", "rbf"), ("t", -1.0),
    ("t", "inf"), ("learning_rate", 0), ("diag_reg", -1e-3), ("diag_reg", float("inf")),
    ("architecture", "relu"),
])
@pytest.mark.parametrize("estimator", [wsk.KernelRegressor, wsk.KernelClassifier])
def test_bad_parameters_raise_in_fit(estimator, name, value):
    model = estimator(**{name: value})  # __init__ only stores
    assert model.get_params()[name] is value
    x, y = np.eye(4), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match=name):
        model.fit(x, y)


def test_activation_names_and_instances(regression_data):
    x_train, x_test, y = regression_data
    for name in wsk.ACTIVATIONS:
        mean = wsk.KernelRegressor(activation=name).fit(x_train, y).predict(x_test)
        assert np.isfinite(mean).all()
    by_name = wsk.KernelRegressor(activation="gelu").fit(x_train, y).predict(x_test)
    by_layer = wsk.KernelRegressor(activation=wn.GELU()).fit(x_train, y).predict(x_test)
    np.testing.assert_allclose(by_name, by_layer, rtol=1e-12)


def test_reachable_as_an_attribute_of_widenets():
    assert wn.sklearn.KernelRegressor is wsk.KernelRegressor
    assert wn.sklearn.KernelClassifier is wsk.KernelClassifier


def test_fit_hyperparameters_maximises_the_evidence():
    """``fit_hyperparameters=True``: W_std, b_std and diag_reg by the NNGP marginal
    likelihood. The evidence at the fitted values beats the starting values, the fitted
    noise lands near the true noise variance (0.01: with 150 samples its standard error is
    about sqrt(2 / 150) = 12%, so a factor of 2 either way is a wide margin), and the
    predictions improve."""
    rng = np.random.default_rng(0)
    direction = np.array([1.0, -0.5, 0.3])
    X = rng.normal(size=(150, 3))
    y = np.sin(X @ direction) + 0.1 * rng.normal(size=150)
    X_test = rng.normal(size=(300, 3))
    y_test = np.sin(X_test @ direction)
    start = wsk.KernelRegressor(kernel="nngp", diag_reg=1e-3).fit(X, y)
    fitted = wsk.KernelRegressor(kernel="nngp", diag_reg=1e-3, fit_hyperparameters=True).fit(X, y)
    assert (start.W_std_, start.b_std_, start.diag_reg_) == (1.5, 0.05, 1e-3)

    def evidence(model):
        return float(wn.predict.marginal_log_likelihood(
            model.network_, torch.tensor(X), torch.tensor(y), diag_reg=model.diag_reg_))

    assert evidence(fitted) > evidence(start)
    assert 0.005 < fitted.diag_reg_ < 0.02
    assert fitted.score(X_test, y_test) > start.score(X_test, y_test)
    assert fitted.get_params()["fit_hyperparameters"] is True


def test_fit_hyperparameters_refuses_an_architecture_and_non_booleans():
    X, y = np.zeros((4, 2)), np.zeros(4)
    net = wn.Sequential(wn.Linear(4), wn.ReLU(), wn.Linear(1))
    with pytest.raises(ValueError, match="needs architecture=None"):
        wsk.KernelRegressor(architecture=net, fit_hyperparameters=True).fit(X, y)
    with pytest.raises(ValueError, match="fit_hyperparameters must be True or False"):
        wsk.KernelRegressor(fit_hyperparameters="yes").fit(X, y)
