r"""Training dynamics of linearized (infinitely wide) networks in function space, any loss.

A network linearized around its initial parameters, which is exactly how an infinitely
wide network trains (Lee et al. 2019, "Wide neural networks of any depth evolve as linear
models under gradient descent", arXiv:1902.06720: the gradient-flow equations for a
general loss, and their extension to momentum), has outputs
``f(x) = f_0(x) + J(x) (theta - theta_0)``. Training it on a loss ``L(u, y)`` of the
training outputs ``u = f(X)`` (summed over training points and outputs) moves the
outputs along the tangent kernel ``T = J(X) J(X)^T``.

Conventions: targets ``y`` are ``(N,)`` or ``(N, O)``; one ``(N, N)`` kernel is shared by
all outputs; ``diag_reg`` is added, as given, to the kernel's diagonal,
``T = k_train_train + diag_reg I``; ``k_test_train`` is ``(M, N)``.

Gradient flow, ``d theta / dt = -lr grad_theta L`` (:func:`gradient_descent`)::

    du/dt      = -lr T              dL/du(u, y)
    df_test/dt = -lr k_test_train   dL/du(u, y)

``t`` counts steps: ``t`` steps of gradient descent with learning rate ``lr`` tend to the
flow at time ``t`` as ``lr -> 0``, as in :func:`widenets.predict.gradient_descent_mse`
(which is the closed form for ``L = 1/2 sum (u - y)^2``).

Heavy-ball momentum (:func:`gradient_descent_momentum`): the discrete updates
``v <- m v - lr grad_theta L``, ``theta <- theta + v`` (from ``v = 0``) become, in
function space (``w = J v``), ``u_{k+1} - u_k = w_{k+1}`` and
``w_{k+1} = m w_k - lr T dL/du(u_k)``, i.e.::

    u_{k+1} - 2 u_k + u_{k-1} = -(1 - m) (u_k - u_{k-1}) - lr T dL/du(u_k).

With ``dt = sqrt(lr)`` and ``tau = k dt``, dividing by ``dt^2 = lr`` shows that, as
``lr -> 0`` with the friction ``gamma = (1 - m) / sqrt(lr)`` held fixed, the iterates follow
``d^2u/dtau^2 = -gamma du/dtau - T dL/du`` (the time unit of Neural Tangents' ODE), with
an error of order ``sqrt(lr)``. Here time is reported in steps, ``t = tau / sqrt(lr) = k``
(as for gradient descent), in which the same ODE reads::

    d^2u/dt^2      = -(1 - m) du/dt      - lr T            dL/du(u, y)
    d^2f_test/dt^2 = -(1 - m) df_test/dt - lr k_test_train dL/du(u, y)

from rest (``du/dt = df_test/dt = 0`` at ``t = 0``, i.e. ``v = 0``). With ``m`` fixed
instead as ``lr -> 0`` the motion is overdamped and tends to gradient flow with the rate
``lr / (1 - m)``, which this ODE also reproduces.

Both ODEs are integrated with :func:`scipy.integrate.solve_ivp` in float64, the test
outputs jointly with the training ones; the gradient ``dL/du`` of a user loss is taken
with :func:`torch.func.grad`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..empirical import FORWARD_MODE_LOCK
from ..inputs import as_data_tensor, check_finite_number, check_nonnegative
from .common import (
    as_initial,
    as_targets,
    as_times,
    check_positive_semidefinite,
    restore_shape,
)

Tensor = torch.Tensor
LossFn = Callable[[Tensor, Tensor], Tensor]
PredictFn = Callable[..., tuple[Tensor, Tensor | None]]

LOSS_NAMES = ("mse", "cross_entropy")
_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
_IMPLICIT = ("Radau", "BDF", "LSODA")


class _Loss:
    """``dL/du`` and its Jacobian ``d^2L/du^2`` as NumPy functions of ``(N, O)`` outputs."""

    def __init__(self, loss_fn: str | LossFn, y: Tensor, is_vector: bool) -> None:
        self.y = y
        self.y_np = y.numpy()
        self.kind = loss_fn if isinstance(loss_fn, str) else "callable"
        self.checked = False
        if not isinstance(loss_fn, str):  # self.kind == "callable"
            def scalar(u: Tensor) -> Tensor:
                if is_vector:
                    return loss_fn(u[:, 0], y[:, 0])
                return loss_fn(u, y)

            self._grad = torch.func.grad(scalar)
            self._hess = torch.func.jacfwd(self._grad)

    def gradient(self, u: np.ndarray) -> np.ndarray:
        if self.kind == "mse":
            return u - self.y_np
        if self.kind == "cross_entropy":
            p = _softmax(u)
            return p * self.y_np.sum(axis=1, keepdims=True) - self.y_np
        return self._grad(torch.from_numpy(u)).numpy()

    def hessian(self, u: np.ndarray) -> np.ndarray:
        n, o = u.shape
        if self.kind == "mse":
            return np.eye(n * o)
        if self.kind == "cross_entropy":
            p = _softmax(u)
            blocks = np.einsum("no,op->nop", p, np.eye(o)) - p[:, :, None] * p[:, None, :]
            blocks = blocks * self.y_np.sum(axis=1)[:, None, None]
            hess = np.zeros((n, o, n, o))
            hess[np.arange(n), :, np.arange(n), :] = blocks
            return hess.reshape(n * o, n * o)
        with FORWARD_MODE_LOCK:  # jacfwd is forward mode, whose state torch keeps global
            hessian = self._hess(torch.from_numpy(u))
        return hessian.reshape(n * o, n * o).numpy()

    def check(self, u: np.ndarray) -> None:
        """Evaluate the gradient once at ``u`` and explain what is wrong with it."""
        if self.kind == "callable" and not self.checked:
            try:
                g = self._grad(torch.from_numpy(u))
            except (RuntimeError, TypeError, ValueError) as err:
                raise TypeError(
                    "loss_fn(fx, y) must be a differentiable torch function returning a "
                    f"scalar tensor (its gradient is taken with torch.func.grad): {err}"
                ) from err
            if tuple(g.shape) != u.shape:
                raise ValueError(
                    f"the gradient of loss_fn has shape {tuple(g.shape)}, expected {u.shape}"
                )
            self.checked = True
        if not np.isfinite(self.gradient(u)).all():
            raise ValueError("the gradient of loss_fn at fx_train_0 contains NaN or inf values")


def _softmax(u: np.ndarray) -> np.ndarray:
    e = np.exp(u - u.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _as_loss(loss_fn: object, y: Tensor, is_vector: bool) -> _Loss:
    if isinstance(loss_fn, str):
        if loss_fn not in LOSS_NAMES:
            raise ValueError(f"loss_fn must be a callable or one of {LOSS_NAMES}, got {loss_fn!r}")
        if loss_fn == "cross_entropy":
            if is_vector or y.shape[1] < 2:
                raise ValueError(
                    "loss_fn='cross_entropy' needs y_train of shape (N, classes) with at "
                    f"least 2 classes (one-hot or probabilities), got {tuple(y.shape)}"
                )
            if bool((y < 0).any()) or not torch.allclose(
                y.sum(1), torch.ones_like(y[:, 0]), atol=1e-6
            ):
                raise ValueError(
                    "loss_fn='cross_entropy' needs y_train rows of class probabilities "
                    "(non-negative, summing to 1), e.g. one-hot labels"
                )
    elif not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a callable loss_fn(fx, y) or one of {LOSS_NAMES}, got "
            f"{type(loss_fn).__name__}"
        )
    return _Loss(loss_fn, y, is_vector)


def _check_tolerance(value: object, name: str) -> float:
    value = check_nonnegative(value, name)
    if value == 0:
        raise ValueError(f"{name} must be > 0")
    return value


class _Setup:
    """Validated arguments shared by both dynamics."""

    def __init__(
        self, loss_fn: object, k_train_train: object, y_train: object, learning_rate: object,
        diag_reg: object, rtol: object, atol: object, method: object,
    ) -> None:
        k = as_data_tensor(k_train_train, "k_train_train")
        if k.ndim != 2 or k.shape[0] != k.shape[1]:
            raise ValueError(f"k_train_train must be square (N, N), got {tuple(k.shape)}")
        self.device = k.device
        k = k.detach().to("cpu", torch.float64)
        y, self.is_vector = as_targets(y_train, k.shape[0])
        self.y = y.detach().to("cpu", torch.float64)
        self.lr = check_nonnegative(learning_rate, "learning_rate")
        reg = check_nonnegative(diag_reg, "diag_reg")
        if not isinstance(method, str) or method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.method = method
        self.rtol = _check_tolerance(rtol, "rtol")
        self.atol = _check_tolerance(atol, "atol")
        k = 0.5 * (k + k.T) + reg * torch.eye(k.shape[0], dtype=k.dtype)
        check_positive_semidefinite(torch.linalg.eigvalsh(k), "k_train_train")
        self.k = k.numpy()
        self.loss = _as_loss(loss_fn, self.y, self.is_vector)

    def times(self, t: object) -> tuple[np.ndarray, bool]:
        if t is None:
            raise ValueError(
                "t=None (t = infinity) is not defined for a general loss: the outputs need "
                "not converge (with cross-entropy they grow without bound); pass a large "
                "finite t instead, or use predict.gradient_descent_mse for the MSE limit"
            )
        times, scalar = as_times(t)
        if bool(torch.isinf(times).any()):
            raise ValueError(f"t must be finite for a general loss (pass a large t), got {t!r}")
        return times.numpy(), scalar

    def initial(
        self, fx_train_0: object, fx_test_0: object | None, k_test_train: object | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(u_0, f_test_0, A)`` with ``A = [T; k_test_train]`` stacked, ``(N + M, N)``."""
        n, o = self.y.shape
        u0 = as_initial(fx_train_0, (n, o), "fx_train_0").detach().cpu().numpy()
        if k_test_train is None:
            if fx_test_0 is not None:
                raise ValueError("fx_test_0 was given without k_test_train")
            return u0, np.zeros((0, o)), self.k
        kx = as_data_tensor(k_test_train, "k_test_train").detach().to("cpu", torch.float64)
        if kx.ndim != 2 or kx.shape[1] != n:
            raise ValueError(f"k_test_train must be (M, {n}), got {tuple(kx.shape)}")
        shape = (kx.shape[0], o)
        ft0 = np.zeros(shape) if fx_test_0 is None else \
            as_initial(fx_test_0, shape, "fx_test_0").detach().cpu().numpy()
        return u0, ft0, np.concatenate([self.k, kx.numpy()])

    def solve(
        self, rhs: Callable[[float, np.ndarray], np.ndarray],
        jac: Callable[[float, np.ndarray], np.ndarray], z0: np.ndarray, times: np.ndarray,
    ) -> np.ndarray:
        """The state at ``times`` (any order, repeats allowed), ``(len(times), len(z0))``."""
        unique, inverse = np.unique(times, return_inverse=True)
        out = np.empty((len(unique), len(z0)))
        positive = unique > 0
        out[~positive] = z0
        if positive.any():
            options = {"jac": jac} if self.method in _IMPLICIT else {}
            with np.errstate(all="ignore"):
                sol = solve_ivp(
                    rhs, (0.0, float(unique[-1])), z0, method=self.method,
                    t_eval=unique[positive], rtol=self.rtol, atol=self.atol, **options
                )
            if not sol.success or sol.y.shape[1] != int(positive.sum()) \
                    or not np.isfinite(sol.y).all():
                raise FloatingPointError(
                    "the training ODE could not be integrated to t = "
                    f"{float(unique[-1]):g} ({sol.message}); the outputs diverge or became "
                    "non-finite: check loss_fn, or lower learning_rate or t"
                )
            out[positive] = sol.y.T
        return out[inverse.reshape(-1)]

    def outputs(
        self, states: np.ndarray, scalar: bool, n_test: int | None
    ) -> tuple[Tensor, Tensor | None]:
        """Split ``[u, f_test]`` states into the two outputs, in the user's shapes."""
        n, o = self.y.shape
        values = torch.from_numpy(states[:, : (n + (n_test or 0)) * o].copy())
        values = values.reshape(len(states), -1, o).to(self.device)
        if scalar:
            values = values[0]
        fx_train = restore_shape(values[..., :n, :], self.is_vector)
        if n_test is None:
            return fx_train, None
        return fx_train, restore_shape(values[..., n:, :], self.is_vector)


def gradient_descent(
    loss_fn: str | LossFn,
    k_train_train: object,
    y_train: object,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    *,
    rtol: float = 1e-9,
    atol: float = 1e-12,
    method: str = "DOP853",
) -> PredictFn:
    r"""Outputs of a linearized network trained by gradient flow on any loss.

    Integrates, with ``T = k_train_train + diag_reg I`` and ``g = dL/du(u, y)``::

        du/dt      = -learning_rate T g
        df_test/dt = -learning_rate k_test_train g

    from ``u(0) = fx_train_0`` and ``f_test(0) = fx_test_0``. ``t`` counts steps of
    gradient descent with step size ``learning_rate`` (their limit as it tends to 0).

    Args:
        loss_fn: ``loss_fn(fx, y) -> scalar tensor``, the loss summed over training
            points and outputs (``fx`` and ``y`` have the shape of ``y_train``;
            differentiated with :func:`torch.func.grad`), or ``"mse"`` for
            ``1/2 sum (fx - y)^2`` or ``"cross_entropy"`` for
            ``-sum y log softmax(fx)`` (softmax over the outputs, ``y_train`` one-hot
            or class probabilities ``(N, classes)``).
        k_train_train: ``(N, N)`` kernel on the training set (e.g. the NTK).
        y_train: targets ``(N,)`` or ``(N, outputs)``.
        learning_rate: ``lr >= 0``.
        diag_reg: added to the kernel's diagonal.
        rtol, atol: tolerances of :func:`scipy.integrate.solve_ivp`.
        method: its method; the default 8th-order ``"DOP853"`` suits tight tolerances;
            ``"Radau"``, ``"BDF"`` or ``"LSODA"`` (given the exact Jacobian) suit stiff
            problems: long times on ill-conditioned kernels.

    Returns:
        ``fn(t, fx_train_0=0.0, fx_test_0=None, k_test_train=None)`` returning
        ``(fx_train_t, fx_test_t)`` (float64, on the kernel's device): ``t`` is a number,
        or a 1-D tensor/array of times in any order, which adds a leading time axis;
        ``fx_test_t`` is ``None`` without ``k_test_train`` (``(M, N)``). ``t=None``
        (infinity) raises ``ValueError``: pass a large ``t``. ``t = 0`` returns the
        initial outputs exactly. Raises ``FloatingPointError`` if the integration fails
        or the outputs become non-finite.
    """
    setup = _Setup(loss_fn, k_train_train, y_train, learning_rate, diag_reg, rtol, atol, method)
    lr, loss = setup.lr, setup.loss
    n, o = setup.y.shape

    def predict(
        t: float | Tensor | np.ndarray,
        fx_train_0: object = 0.0,
        fx_test_0: object | None = None,
        k_test_train: object | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        times, scalar = setup.times(t)
        u0, ft0, a = setup.initial(fx_train_0, fx_test_0, k_test_train)
        loss.check(u0)

        def rhs(_: float, z: np.ndarray) -> np.ndarray:
            g = loss.gradient(z[: n * o].reshape(n, o))
            return (-lr * (a @ g)).reshape(-1)

        def jac(_: float, z: np.ndarray) -> np.ndarray:
            hess = loss.hessian(z[: n * o].reshape(n, o)).reshape(n, o * n * o)
            out = np.zeros((len(z), len(z)))
            out[:, : n * o] = (-lr * (a @ hess)).reshape(len(z), n * o)
            return out

        z0 = np.concatenate([u0.reshape(-1), ft0.reshape(-1)])
        states = setup.solve(rhs, jac, z0, times)
        return setup.outputs(states, scalar, None if k_test_train is None else len(ft0))

    return predict


def gradient_descent_momentum(
    loss_fn: str | LossFn,
    k_train_train: object,
    y_train: object,
    learning_rate: float = 1.0,
    momentum: float = 0.9,
    diag_reg: float = 0.0,
    *,
    rtol: float = 1e-9,
    atol: float = 1e-12,
    method: str = "DOP853",
) -> PredictFn:
    r"""Outputs of a linearized network trained with heavy-ball momentum, continuous time.

    The limit of the updates ``v <- momentum v - lr grad L``, ``theta <- theta + v``
    (from ``v = 0``) in function space, with ``t`` counting steps (step ``k`` is
    ``t = k``), ``T = k_train_train + diag_reg I`` and ``g = dL/du(u, y)``::

        d^2u/dt^2      = -(1 - momentum) du/dt      - lr T g
        d^2f_test/dt^2 = -(1 - momentum) df_test/dt - lr k_test_train g

    from rest (zero first derivatives at ``t = 0``). Equivalently, in the time
    ``tau = sqrt(lr) t`` of Neural Tangents' ODE,
    ``u'' = -((1 - momentum) / sqrt(lr)) u' - T g``. ``k`` heavy-ball steps approach
    its solution at ``t = k``, with an error ``O(sqrt(lr))``, as ``lr -> 0`` with the
    friction ``(1 - momentum) / sqrt(lr)`` fixed (the module docstring derives it).
    ``momentum = 0`` (plain steps) still gives this second-order ODE, which is close to
    :func:`gradient_descent` only while ``lr T`` is small.

    Arguments are those of :func:`gradient_descent`, plus ``momentum`` in ``[0, 1]``
    (``1``: no friction). Returns the same kind of ``fn(t, fx_train_0=0.0,
    fx_test_0=None, k_test_train=None) -> (fx_train_t, fx_test_t)``.
    """
    setup = _Setup(loss_fn, k_train_train, y_train, learning_rate, diag_reg, rtol, atol, method)
    m = check_finite_number(momentum, "momentum")
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    lr, loss, friction = setup.lr, setup.loss, 1.0 - m
    n, o = setup.y.shape

    def predict(
        t: float | Tensor | np.ndarray,
        fx_train_0: object = 0.0,
        fx_test_0: object | None = None,
        k_test_train: object | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        times, scalar = setup.times(t)
        u0, ft0, a = setup.initial(fx_train_0, fx_test_0, k_test_train)
        loss.check(u0)
        size = u0.size + ft0.size

        def rhs(_: float, z: np.ndarray) -> np.ndarray:
            g = loss.gradient(z[: n * o].reshape(n, o))
            velocity = z[size:]
            return np.concatenate([velocity, -friction * velocity - lr * (a @ g).reshape(-1)])

        def jac(_: float, z: np.ndarray) -> np.ndarray:
            hess = loss.hessian(z[: n * o].reshape(n, o)).reshape(n, o * n * o)
            out = np.zeros((2 * size, 2 * size))
            out[:size, size:] = np.eye(size)
            out[size:, : n * o] = (-lr * (a @ hess)).reshape(size, n * o)
            out[size:, size:] = -friction * np.eye(size)
            return out

        z0 = np.concatenate([u0.reshape(-1), ft0.reshape(-1), np.zeros(size)])
        states = setup.solve(rhs, jac, z0, times)
        return setup.outputs(states, scalar, None if k_test_train is None else len(ft0))

    return predict


__all__ = ["LOSS_NAMES", "gradient_descent", "gradient_descent_momentum"]
