r"""scikit-learn estimators backed by infinitely wide networks.

:class:`KernelRegressor` and :class:`KernelClassifier` predict with the infinitely wide
fully connected network ``depth x [Linear, activation] + Linear`` (or any widenets
``architecture``) trained by gradient flow on ``L = 1/2 sum (f - y)^2`` for a time
``t`` (``None``: to convergence), through
:func:`widenets.predict.gradient_descent_mse_ensemble`. Predictions are the mean over
random initialisations, and ``return_std`` / ``predict_proba`` use the standard
deviation over initialisations. With ``kernel="nngp"`` and ``t=None`` (and
``diag_reg=0``) these are the exact Gaussian-process posterior mean and standard
deviation of the network's NNGP (:func:`widenets.predict.gp_inference`).

scikit-learn is an optional dependency (the ``demo`` extra); it is imported here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy.special import log_ndtr, logsumexp

from .optional import require

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted
except ModuleNotFoundError:
    require("sklearn", "demo", "widenets.sklearn")  # names the extra if sklearn is missing
    raise

try:
    from sklearn.utils.validation import validate_data
except ImportError:  # scikit-learn < 1.6

    def validate_data(estimator: BaseEstimator, *args: Any, **kwargs: Any) -> Any:
        return estimator._validate_data(*args, **kwargs)


from .architectures import ACTIVATIONS, mlp
from .layers.base import Layer
from .predict import gradient_descent_mse_ensemble, marginal_log_likelihood

__all__ = ["ACTIVATIONS", "KernelClassifier", "KernelRegressor", "largest_gaussian_probabilities"]


KERNELS = ("nngp", "ntk")

#: Test points per block when predicting: bounds the (block, block) covariance.
_BLOCK = 512
#: Gauss--Hermite nodes for predict_proba. The integrand is a product of normal CDFs
#: shifted along the node axis, smooth on the unit scale: 64 nodes give ~1e-12.
_QUADRATURE_NODES = 64
#: Training samples whose prior variance sets the resolution of standard deviations.
_RESOLUTION_SAMPLE = 100
#: Iterations of L-BFGS for ``fit_hyperparameters=True``, and how far (in natural log)
#: each hyperparameter may move from its starting value.
_EVIDENCE_STEPS = 50
_EVIDENCE_RANGE = 10.0
#: Numbers held at once by predict_proba's quadrature (times 8 bytes).
_BLOCK_ENTRIES = 2_000_000


class _WideNetwork(BaseEstimator):
    """Shared parameters, validation, fitting and prediction of the two estimators."""

    def __init__(
        self,
        depth: int = 2,
        activation: str | Layer = "relu",
        W_std: float = 1.5,
        b_std: float = 0.05,
        kernel: str = "ntk",
        t: float | None = None,
        learning_rate: float = 1.0,
        diag_reg: float = 0.0,
        architecture: Layer | None = None,
        fit_hyperparameters: bool = False,
    ) -> None:
        self.fit_hyperparameters = fit_hyperparameters
        self.depth = depth
        self.activation = activation
        self.W_std = W_std
        self.b_std = b_std
        self.kernel = kernel
        self.t = t
        self.learning_rate = learning_rate
        self.diag_reg = diag_reg
        self.architecture = architecture

    # ------------------------------------------------------------------ parameters
    def _check_params(self) -> dict[str, Any]:
        """Validate the parameters; a bad one raises ``ValueError`` naming it."""
        depth = self.depth
        if isinstance(depth, bool) or not isinstance(depth, Integral) or depth < 0:
            raise ValueError(f"depth must be an integer >= 0, got {depth!r}")
        activation = self.activation
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {sorted(ACTIVATIONS)} or a widenets layer, "
                    f"got {activation!r}"
                )
        elif not isinstance(activation, Layer):
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)} or a widenets layer, got "
                f"{activation!r}"
            )
        w_std = _check_real(self.W_std, "W_std", strictly_positive=True)
        b_std = _check_real(self.b_std, "b_std")
        if not isinstance(self.kernel, str) or self.kernel not in KERNELS:
            raise ValueError(f"kernel must be 'nngp' or 'ntk', got {self.kernel!r}")
        t = None
        if self.t is not None:
            if isinstance(self.t, bool) or not isinstance(self.t, Real) or math.isnan(self.t) \
                    or self.t < 0:
                raise ValueError(f"t must be None (infinity) or a number >= 0, got {self.t!r}")
            t = None if math.isinf(self.t) else float(self.t)
        learning_rate = _check_real(self.learning_rate, "learning_rate", strictly_positive=True)
        diag_reg = _check_real(self.diag_reg, "diag_reg")
        if self.architecture is not None and not isinstance(self.architecture, Layer):
            raise ValueError(
                f"architecture must be None or a widenets layer, got {self.architecture!r}"
            )
        if not isinstance(self.fit_hyperparameters, (bool, np.bool_)):
            raise ValueError(
                f"fit_hyperparameters must be True or False, got {self.fit_hyperparameters!r}")
        if self.fit_hyperparameters and self.architecture is not None:
            raise ValueError(
                "fit_hyperparameters fits W_std, b_std and diag_reg of the network built from "
                "depth and activation: it needs architecture=None"
            )
        return {"depth": int(depth), "w_std": w_std, "b_std": b_std, "kernel": self.kernel,
                "t": t, "learning_rate": learning_rate, "diag_reg": diag_reg}

    def _network(self, params: dict[str, Any]) -> Layer:
        if self.architecture is not None:
            return self.architecture
        return mlp(params["depth"], self.activation, 1, params["w_std"], params["b_std"])

    # ------------------------------------------------------------------ fitting
    def _fit_targets(self, X: np.ndarray, targets: np.ndarray, params: dict[str, Any]) -> None:
        """Fit on validated ``X`` and 2-D float ``targets`` with checked ``params``."""
        if self.fit_hyperparameters:
            params = {**params, **self._maximise_evidence(X, targets, params)}
        self.W_std_, self.b_std_, self.diag_reg_ = (
            params["w_std"], params["b_std"], params["diag_reg"])
        self.network_ = self._network(params)
        self.X_fit_ = np.array(X, dtype=np.float64, order="C")
        self.y_fit_ = np.array(targets, dtype=np.float64, order="C")
        # What predictions use: set_params after fit does not change them.
        self._fitted = {name: params[name] for name in ("kernel", "t", "learning_rate",
                                                        "diag_reg")}
        self._predictor: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
        # The training kernel and its eigendecomposition are computed here, once.
        self._get_predictor()(torch.tensor(self.X_fit_[:1]), t=params["t"],
                              get=params["kernel"], compute_cov=False)

    def _maximise_evidence(
        self, X: np.ndarray, targets: np.ndarray, params: dict[str, Any]
    ) -> dict[str, float]:
        """``W_std``, ``b_std`` and ``diag_reg`` that maximise the NNGP marginal likelihood
        of the targets (:func:`widenets.predict.marginal_log_likelihood`), by L-BFGS on
        their logarithms (positive by construction), from the given values (``diag_reg``
        from at least ``1e-4`` times the mean prior variance, so that it can move)."""
        x = torch.tensor(X, dtype=torch.float64)
        y = torch.tensor(targets, dtype=torch.float64)
        start = self._network(params).kernel(x[:_RESOLUTION_SAMPLE], None, get="nngp")
        prior = max(float(start.diagonal().mean()), 1e-300)
        noise0 = max(params["diag_reg"], 1e-4 * prior)
        start_logs = torch.tensor([math.log(params["w_std"]), math.log(max(params["b_std"], 1e-3)),
                                   math.log(noise0)], dtype=torch.float64)
        free = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        optimiser = torch.optim.LBFGS([free], max_iter=_EVIDENCE_STEPS,
                                      line_search_fn="strong_wolfe")

        def values(free: torch.Tensor) -> torch.Tensor:
            # each log moves at most _EVIDENCE_RANGE from its start (smoothly), and the
            # noise keeps a floor: the search cannot run off to 0 or infinity
            values = (start_logs + _EVIDENCE_RANGE * torch.tanh(free / _EVIDENCE_RANGE)).exp()
            return values + torch.tensor([0.0, 0.0, 1e-10 * prior], dtype=torch.float64)

        def negative_evidence() -> torch.Tensor:
            optimiser.zero_grad()
            w_std, b_std, noise = values(free)
            net = mlp(params["depth"], self.activation, 1, w_std, b_std)
            loss = -marginal_log_likelihood(net, x, y, get="nngp", diag_reg=noise) / y.numel()
            loss.backward()
            return loss

        try:
            optimiser.step(negative_evidence)
        except ValueError as error:  # a kernel that cannot be factorised on the way
            warnings.warn(f"fit_hyperparameters stopped early ({error}); the starting "
                          "values are used", ConvergenceWarning, stacklevel=3)
            free = torch.zeros(3, dtype=torch.float64)
        w_std, b_std, noise = (float(v) for v in values(free.detach()))
        if not all(math.isfinite(v) for v in (w_std, b_std, noise)):
            w_std, b_std, noise = (float(v) for v in values(torch.zeros(3, dtype=torch.float64)))
        return {"w_std": w_std, "b_std": b_std, "diag_reg": noise}

    def _get_predictor(self) -> Any:
        if getattr(self, "_predictor", None) is None:
            self._predictor = gradient_descent_mse_ensemble(
                self.network_, torch.tensor(self.X_fit_), torch.tensor(self.y_fit_),
                learning_rate=self._fitted["learning_rate"], diag_reg=self._fitted["diag_reg"],
            )
        return self._predictor

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)
        state.pop("_predictor", None)  # a closure; rebuilt on demand after unpickling
        return state

    def _posterior(self, X: np.ndarray, return_std: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Mean ``(n, outputs)`` and, if asked, standard deviation ``(n,)`` at ``X``."""
        predictor = self._get_predictor()
        means, stds = [], []
        for start in range(0, X.shape[0], _BLOCK):
            block = torch.tensor(X[start:start + _BLOCK], dtype=torch.float64)
            mean, cov = predictor(block, t=self._fitted["t"], get=self._fitted["kernel"],
                                  compute_cov=return_std)
            means.append(mean.numpy())
            if return_std:
                stds.append(np.sqrt(np.clip(torch.diagonal(cov).numpy(), 0.0, None)))
        mean = np.concatenate(means, axis=0)
        return mean, np.concatenate(stds) if return_std else None


class KernelRegressor(RegressorMixin, _WideNetwork):
    r"""Regression with an infinitely wide network trained by gradient flow on MSE.

    The prediction is the mean over initialisations of the infinitely wide network
    ``depth x [Linear(W_std, b_std), activation] + Linear(W_std, b_std)`` (NTK
    parameterization) trained on ``L = 1/2 sum (f - y)^2`` for a time ``t`` at rate
    ``learning_rate``, with ``diag_reg`` added to the training kernel's diagonal (a
    ridge penalty): with ``T`` the chosen kernel and ``T_r = T(X, X) + diag_reg I``,
    ``mean(x) = T(x, X) T_r^{-1} (I - exp(-learning_rate T_r t)) y``
    (:func:`widenets.predict.gradient_descent_mse_ensemble`). ``kernel="ntk"`` trains
    every layer, ``kernel="nngp"`` the read-out only; ``kernel="nngp", t=None,
    diag_reg=0`` is the exact NNGP posterior (Bayesian inference of the network).

    Parameters
    ----------
    depth : int, default=2
        Number of hidden layers (``0``: a linear model).
    activation : str or widenets layer, default="relu"
        One of ``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"abs"``, ``"erf"``,
        ``"gelu"``, ``"identity"`` (see :data:`widenets.architectures.ACTIVATIONS`), or a
        widenets activation
        such as ``widenets.Sin()`` or ``widenets.Elementwise(torch.tanh)``.
    W_std, b_std : float, default=1.5, 0.05
        Weight and bias standard deviations of every ``Linear`` layer (``W_std > 0``,
        ``b_std >= 0``).
    kernel : {"ntk", "nngp"}, default="ntk"
        Which kernel drives training.
    t : float or None, default=None
        Training time (``None``: infinity, i.e. trained to convergence).
    learning_rate : float, default=1.0
        Gradient-flow rate (only ``learning_rate * t`` matters).
    diag_reg : float, default=0.0
        Added to the training kernel's diagonal (absolute, in the kernel's units). ``0``
        interpolates the training data at ``t=None``; a singular training kernel
        (duplicated samples) then gives the minimum-norm (pseudo-inverse) solution.
    architecture : widenets layer or None, default=None
        Any widenets architecture ending in one output per target; overrides
        ``depth``, ``activation``, ``W_std`` and ``b_std``.
    fit_hyperparameters : bool, default=False
        Choose ``W_std``, ``b_std`` and ``diag_reg`` by maximising the NNGP marginal
        likelihood of the training targets (Gaussian evidence, all outputs sharing the
        kernel), starting from the given values; the fitted values are ``W_std_``,
        ``b_std_`` and ``diag_reg_``. Needs ``architecture=None``.

    Attributes
    ----------
    network_ : widenets layer
        The architecture used.
    W_std_, b_std_, diag_reg_ : float
        The values used: the parameters, or the fitted ones (``fit_hyperparameters``).
    X_fit_, y_fit_ : ndarray
        Training inputs and targets (``y_fit_`` is 2-D).
    n_features_in_ : int
        Number of input features.
    """

    def fit(self, X: Any, y: Any) -> KernelRegressor:
        """Fit on ``X`` ``(n_samples, n_features)`` and ``y`` ``(n_samples,)`` or
        ``(n_samples, n_targets)``."""
        params = self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        y = np.asarray(y, dtype=np.float64)
        self._vector_target = y.ndim == 1
        self._fit_targets(X, y[:, None] if y.ndim == 1 else y, params)
        return self

    def predict(
        self, X: Any, return_std: bool = False
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Mean prediction at ``X``, of the shape of ``y`` with ``len(X)`` rows.

        With ``return_std=True`` also the standard deviation over initialisations (the
        posterior standard deviation for ``kernel="nngp", t=None, diag_reg=0``), from
        the covariance diagonal clipped at 0; it is shared by all targets and has the
        shape of the mean.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        mean, std = self._posterior(X, return_std)
        if self._vector_target:
            mean = mean[:, 0]
        if not return_std:
            return mean
        assert std is not None  # computed when return_std
        return mean, std if self._vector_target else np.repeat(std[:, None], mean.shape[1], 1)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _more_tags(self) -> dict[str, Any]:  # scikit-learn < 1.6
        return {"multioutput": True}


class KernelClassifier(ClassifierMixin, _WideNetwork):
    r"""Classification by regression of an infinitely wide network on coded labels.

    Each class ``k`` of ``K`` is one output, trained (as :class:`KernelRegressor`, same
    parameters) on the centred one-hot coding ``1[y = k] - 1/K``. Because all outputs
    share one kernel, the predictions are linear in the targets and the centring
    shifts every output of a sample by the same amount: :meth:`predict` and
    :meth:`predict_proba` are those of plain one-hot targets, and the mean outputs
    (:meth:`decision_function`) sum to zero over classes.

    :meth:`predict` is the class of the largest mean output. :meth:`predict_proba`
    treats the outputs at a sample as independent Gaussians ``N(mu_k, sigma^2)`` (the
    distribution over initialisations; the NNGP posterior for ``kernel="nngp",
    t=None``) and gives ``P(output k is the largest)``, computed by Gauss--Hermite
    quadrature: ``E_z[prod_{j != k} Phi((mu_k - mu_j) / sigma + z)]``, ``z ~ N(0, 1)``.
    Where ``sigma = 0`` it is the one-hot of the largest mean, ties split equally; but
    ``sigma`` is first raised to the float64 resolution of the covariance,
    ``sqrt(eps * prior variance)`` (about ``1.5e-8`` times the prior standard deviation),
    so that outputs tied up to rounding, where no variance is left (a duplicated sample
    with conflicting labels and ``diag_reg=0``), split rather than follow rounding
    errors. Means that differ by much more than that still give one-hot rows.

    Parameters are those of :class:`KernelRegressor`.

    Attributes
    ----------
    classes_ : ndarray
        The class labels, sorted.
    network_ : widenets layer
        The architecture used.
    W_std_, b_std_, diag_reg_ : float
        The values used: the parameters, or the fitted ones (``fit_hyperparameters``).
    X_fit_, y_fit_ : ndarray
        Training inputs and coded targets ``(n_samples, n_classes)``.
    n_features_in_ : int
        Number of input features.
    """

    def fit(self, X: Any, y: Any) -> KernelClassifier:
        """Fit on ``X`` ``(n_samples, n_features)`` and labels ``y`` ``(n_samples,)``."""
        params = self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, encoded = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(
                f"KernelClassifier needs samples of at least 2 classes; got 1 class "
                f"({self.classes_[0]!r})"
            )
        targets = np.full((len(encoded), k), -1.0 / k)
        targets[np.arange(len(encoded)), encoded.ravel()] += 1.0
        self._fit_targets(X, targets, params)
        # The covariance is a difference of numbers of the size of the prior variance:
        # float64 resolves standard deviations down to about sqrt(eps * prior variance).
        sample = torch.tensor(self.X_fit_[:_RESOLUTION_SAMPLE])
        prior_variance = float(self.network_.kernel(sample, None, get="nngp").diagonal().mean())
        self._std_resolution = math.sqrt(np.finfo(np.float64).eps * max(prior_variance, 0.0))
        return self

    def _mean(self, X: Any, return_std: bool) -> tuple[np.ndarray, np.ndarray | None]:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return self._posterior(X, return_std)

    def decision_function(self, X: Any) -> np.ndarray:
        """Mean outputs ``(n_samples, n_classes)``; for two classes, ``(n_samples,)``:
        the second output minus the first (positive for ``classes_[1]``).

        The sign (two classes) and the argmax agree with :meth:`predict`; the ranking
        of samples may differ from that of :meth:`predict_proba`, which also weighs
        each sample's standard deviation.
        """
        mean, _ = self._mean(X, False)
        return mean[:, 1] - mean[:, 0] if mean.shape[1] == 2 else mean

    def predict(self, X: Any) -> np.ndarray:
        """The class of the largest mean output at each sample."""
        mean, _ = self._mean(X, False)
        return self.classes_[np.argmax(mean, axis=1)]

    def predict_proba(self, X: Any) -> np.ndarray:
        """``P(class k)``: the probability that output ``k`` is the largest, with the
        outputs independent ``N(mu_k, sigma^2)``; ``(n_samples, n_classes)``, rows
        summing to 1, largest where :meth:`predict` says."""
        mean, std = self._mean(X, True)
        assert std is not None  # computed when return_std
        return largest_gaussian_probabilities(mean, np.maximum(std, self._std_resolution))


def largest_gaussian_probabilities(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    r"""``P(k = argmax_j u_j)`` for independent ``u_j ~ N(mean[i, j], std[i]^2)``.

    ``mean`` is ``(n, K)``, ``std`` is ``(n,)`` (one standard deviation per row).
    Computed as ``E_z[prod_{j != k} Phi((mean_k - mean_j) / std + z)]`` by
    Gauss--Hermite quadrature in log space, then normalised so that rows sum to 1
    (the probability is increasing in ``mean_k``, so the argmax is preserved). Rows
    with ``std == 0`` give the one-hot of the largest mean, ties split equally.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    n, k = mean.shape
    proba = np.empty((n, k))
    nodes, weights = hermegauss(_QUADRATURE_NODES)
    weights = weights / weights.sum()
    log_weights = np.log(weights)
    certain = std <= 0
    if certain.any():
        top = mean[certain] == mean[certain].max(axis=1, keepdims=True)
        proba[certain] = top / top.sum(axis=1, keepdims=True)
    rows = np.flatnonzero(~certain)
    # Blocks of rows and classes k, each holding at most about _BLOCK_ENTRIES numbers.
    class_block = max(1, min(k, _BLOCK_ENTRIES // (k * len(nodes))))
    row_block = max(1, _BLOCK_ENTRIES // (class_block * k * len(nodes)))
    for start in range(0, len(rows), row_block):
        idx = rows[start:start + row_block]
        block_mean, block_std = mean[idx], std[idx, None, None]
        for first in range(0, k, class_block):
            classes = slice(first, first + class_block)
            with np.errstate(over="ignore", invalid="ignore"):
                gap = (block_mean[:, classes, None] - block_mean[:, None, :]) / block_std
            # log Phi(gap_kj + z), summed over j, at every node z (the j = k term is
            # log Phi(z) and is taken out again).
            log_terms = log_ndtr(gap[..., None] + nodes).sum(axis=2) - log_ndtr(nodes)
            proba[idx, classes] = np.exp(logsumexp(log_terms + log_weights, axis=-1))
    proba[rows] /= proba[rows].sum(axis=1, keepdims=True)
    return proba


def _check_real(value: object, name: str, strictly_positive: bool = False) -> float:
    bound = "> 0" if strictly_positive else ">= 0"
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or value < 0 or (strictly_positive and value == 0):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
