r"""Predictions of infinitely wide networks: GP posterior and gradient-descent training.

Conventions: targets ``y`` are ``(N,)`` or ``(N, outputs)`` and share one kernel;
``diag_reg`` is added, as given, to the training kernel's diagonal. Training follows
the loss ``L = 1/2 sum (f - y)^2`` (or any loss, :func:`gradient_descent`) by gradient
flow with rate ``learning_rate``, so the outputs on the training set obey
``du/dt = -learning_rate T (u - y)`` (Lee et al. 2019, "Wide neural networks of any depth
evolve as linear models under gradient descent"). Linear algebra is done in float64 and
factorisations are computed once per training set.

Modules: ``posterior`` (the GP posterior), ``mse`` (MSE training in closed
form), ``ode`` (any loss, momentum: ODEs in function space), ``evidence`` (the
marginal likelihood, to fit hyperparameters), ``common`` (the
pieces they share), and for training sets larger than memory ``stored`` (the stages kept
in a store) and ``blocked`` (the blocked Cholesky factorisation on disk).
"""

from .common import KernelSource, Predictor
from .evidence import marginal_log_likelihood
from .mse import gradient_descent_mse, gradient_descent_mse_ensemble
from .ode import LOSS_NAMES, gradient_descent, gradient_descent_momentum
from .posterior import gp_inference

__all__ = [
    "KernelSource", "LOSS_NAMES", "Predictor", "gp_inference", "gradient_descent",
    "gradient_descent_momentum", "gradient_descent_mse", "gradient_descent_mse_ensemble",
    "marginal_log_likelihood",
]
