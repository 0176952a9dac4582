r"""Figures of infinitely wide networks' predictions (matplotlib, imported on first use).

Conventions of :mod:`widenets.predict`: the loss is ``L = 1/2 sum (f - y)^2`` over
points and outputs; training is gradient flow at rate ``learning_rate``, so at time
``t`` the outputs have moved as after about ``t`` gradient-descent steps of size
``learning_rate``; ``t = inf`` is the end of training.

The functions draw into an ``ax`` given to them, or into a new
:class:`matplotlib.figure.Figure` (not registered with ``pyplot``, so nothing is shown
and no backend is chosen); they return the Axes: save it with
``ax.figure.savefig("figure.png")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from .inputs import as_data_tensor, check_nonnegative
from .optional import require
from .predict import KernelSource, gp_inference, gradient_descent_mse_ensemble
from .predict.common import Spectrum, TrainingKernels, check_get, spectral_filters, training_data

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Checked here, so that importing this module without matplotlib names the extra; the
# submodules that draw (matplotlib.figure, colormaps) are imported on first use.
require("matplotlib", "demo", "widenets.plot")

Tensor = torch.Tensor


@dataclass(frozen=True)
class ExpectedLosses:
    r"""Expected losses over initialisations of the trained infinite ensemble.

    ``times`` ``(T,)``; ``train`` and ``test`` ``(T,)``: ``E[1/2 sum (f - y)^2]`` on each
    set; ``train_variance`` and ``test_variance`` ``(T,)``: ``outputs * trace(cov)``, the
    part of twice the loss due to the spread of the initial functions;
    ``train_mean`` and ``test_mean``: the ensemble mean at every time, ``(T, N)`` or
    ``(T, N, outputs)`` like the targets; ``n_train``, ``n_test``: the numbers of points.
    """

    times: Tensor
    train: Tensor
    test: Tensor
    train_variance: Tensor
    test_variance: Tensor
    train_mean: Tensor
    test_mean: Tensor
    n_train: int
    n_test: int


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained").add_subplot()


def _times_tensor(times: Sequence[float | None] | Tensor | float) -> Tensor:
    """Times as a 1-D float64 tensor; ``None`` entries are ``inf``."""
    if isinstance(times, Tensor):
        values = times.detach().to("cpu", torch.float64).reshape(-1)
    elif isinstance(times, (int, float)):
        values = torch.tensor([float(times)], dtype=torch.float64)
    else:
        values = torch.tensor([math.inf if t is None else float(t) for t in times],
                              dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("times must hold at least one time")
    if bool(torch.isnan(values).any()) or bool((values < 0).any()):
        raise ValueError(f"times must be >= 0 (math.inf or None for the end), got {times!r}")
    return values


def _time_label(t: float) -> str:
    return "t = ∞" if math.isinf(t) else f"t = {t:g}"


def _targets(y: object, name: str) -> Tensor:
    """Targets as ``(N, outputs)`` float64 (a vector is one output)."""
    t = y if isinstance(y, Tensor) else torch.as_tensor(np.asarray(y, dtype=np.float64))
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N,) or (N, outputs), got {tuple(t.shape)}")
    return t.to(torch.float64)


def _as_inputs_1d(x: object, name: str) -> Tensor:
    vector = getattr(x, "ndim", None) == 1  # an array or a tensor
    t = as_data_tensor(cast("Tensor | np.ndarray", x)[:, None] if vector else x, name)
    if t.ndim != 2 or t.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1) or (N,) (one input feature), "
                         f"got {tuple(t.shape)}")
    return t


def expected_losses(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    x_test: object,
    y_test: object,
    times: Sequence[float | None] | Tensor,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    get: str = "ntk",
) -> ExpectedLosses:
    r"""Expected training and test loss, over initialisations, of the trained ensemble.

    The ensemble is that of :func:`~widenets.predict.gradient_descent_mse_ensemble`
    (same arguments): at each time the outputs on a set of ``N`` points are Gaussian
    with mean ``m`` (``N`` rows, ``O`` outputs) and covariance ``cov`` (``N x N``), the
    same for every output and independent between outputs, so::

        E[1/2 sum_{i, o} (f_io - y_io)^2] = 1/2 (||m - y||^2 + O trace(cov))

    At ``t = 0`` this is the prior: ``m = 0``, ``cov = K(x, x)`` (the NNGP), so the loss
    is ``1/2 (||y||^2 + O trace K(x, x))``. ``times`` is a sequence or 1-D tensor of
    times ``>= 0`` (``math.inf`` or ``None``: the end of training).

    Only the trace of the covariance is needed. With ``T_r = V diag(lambda) V^T`` the
    regularised training kernel (``get``), ``A = T(x, X) V``, ``g_t`` the spectral gain
    ``(1 - exp(-lr lambda t)) / lambda`` and ``P = A diag(g_t) V^T``::

        trace(cov) = trace K(x, x) + g_t^T (B o C) g_t - 2 g_t . d
        B = V^T K(X, X) V,   C = A^T A,   d_k = sum_m (K(x, X) V)_mk A_mk

    (``o``: elementwise product), so the kernels and the ``O(N^3)`` products are
    computed once and each time costs ``O(N^2)``: long time grids on thousands of points
    are cheap, where the full covariances would cost ``O(N^3)`` per time.
    """
    t = _times_tensor(times)
    name = check_get(get)
    kernels = TrainingKernels(net_or_kernels)
    xt, y_tr, is_vector = training_data(x_train, y_train)
    y_te = _targets(y_test, "y_test")
    if y_te.shape[1] != y_tr.shape[1]:
        raise ValueError(f"y_test must have {y_tr.shape[1]} outputs like y_train, "
                         f"got {y_te.shape[1]}")
    lr = check_nonnegative(learning_rate, "learning_rate")
    reg = check_nonnegative(diag_reg, "diag_reg")
    names = tuple(dict.fromkeys((name, "nngp")))
    k_train = kernels.train(xt, names)
    spectrum = Spectrum(k_train[name], reg, f"the training {name.upper()} kernel")
    vectors = spectrum.vectors
    device = vectors.device
    _, gain = spectral_filters(spectrum.values, lr, t.to(device), False)  # (T, N)
    projected_y = vectors.T @ y_tr.to(device)
    b = vectors.T @ k_train["nngp"].to(device) @ vectors
    results: dict[str, Tensor] = {}
    for split, x, y in (("train", xt, y_tr), ("test", x_test, y_te)):
        xs = as_data_tensor(x, f"x_{split}")
        if xs.shape[0] != y.shape[0]:
            raise ValueError(f"x_{split} has {xs.shape[0]} points but y_{split} has "
                             f"{y.shape[0]}")
        k_x = kernels(xs, xt.to(xs.dtype), names)
        prior_trace = torch.diagonal(kernels(xs, None, ("nngp",))["nngp"]).sum().to(device)
        a = k_x[name].to(device) @ vectors  # (M, N)
        mean = torch.einsum("mk,tk,ko->tmo", a, gain, projected_y)
        c = a.T @ a
        d = ((k_x["nngp"].to(device) @ vectors) * a).sum(dim=0)
        trace = prior_trace + ((gain @ (b * c)) * gain).sum(dim=1) - 2 * gain @ d
        variance = y.shape[1] * trace
        square = (mean - y.to(device)).pow(2).sum(dim=(1, 2))
        results[split] = (0.5 * (square + variance)).cpu()
        results[f"{split}_variance"] = variance.cpu()
        results[f"{split}_mean"] = (mean[..., 0] if is_vector else mean).cpu()
    return ExpectedLosses(times=t, n_train=int(y_tr.shape[0]), n_test=int(y_te.shape[0]),
                          **results)


def plot_expected_losses(
    losses: ExpectedLosses,
    ax: Axes | None = None,
    per_point: bool = False,
    logy: bool | None = None,
) -> Axes:
    r"""Draw :func:`expected_losses`' train and test curves against time.

    Finite times are curves; ``t = inf`` gives dashed horizontal lines. The time axis
    is logarithmic when every finite time is positive, symmetric-logarithmic (linear
    below the power of ten under the smallest positive time) when ``t = 0`` is among
    them. ``per_point`` divides each loss by its number of points. ``logy``: a logarithmic loss axis
    (``None``: when every loss is positive; a loss of zero, the training loss at
    ``t = inf`` without ``diag_reg``, cannot be drawn on it).
    """
    ax = _new_axes(ax, (6.0, 4.0))
    times = losses.times
    finite = torch.isfinite(times)
    colors = {"train": "tab:blue", "test": "tab:red"}
    for split, n in (("train", losses.n_train), ("test", losses.n_test)):
        values = (losses.train if split == "train" else losses.test) / (n if per_point else 1)
        if bool(finite.any()):
            ax.plot(times[finite].numpy(), values[finite].numpy(), "o-", markersize=3,
                    color=colors[split], label=split)
        if bool((~finite).any()):
            ax.axhline(float(values[~finite][0]), linestyle="--", linewidth=1,
                       color=colors[split], label=f"{split}, t = ∞")
    positive = times[finite & (times > 0)]
    if positive.numel() and len(torch.unique(times[finite])) > 1:
        if bool((times[finite] == 0).any()):
            # Linear up to the decade below the first positive time, so that 0 and the
            # first logarithmic tick stand apart.
            linthresh = 10.0 ** math.floor(math.log10(float(positive.min())))
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xlim(left=0.0)
        else:
            ax.set_xscale("log")
    if logy is None:
        logy = bool((losses.train > 0).all() and (losses.test > 0).all())
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training time t")
    ax.set_ylabel("E[1/2 Σ (f − y)²]" + (" per point" if per_point else ""))
    ax.set_title("Expected loss over initialisations")
    ax.legend(fontsize=8)
    return ax


def plot_loss_curves(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    x_test: object,
    y_test: object,
    times: Sequence[float | None] | Tensor,
    ax: Axes | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    get: str = "ntk",
    per_point: bool = False,
    logy: bool | None = None,
) -> Axes:
    r"""Expected train and test loss over initialisations against training time.

    ``E[1/2 sum (f - y)^2] = 1/2 (||mean - y||^2 + outputs * trace(cov))`` from
    :func:`~widenets.predict.gradient_descent_mse_ensemble` (the covariance is shared by
    all outputs); see :func:`expected_losses` for the numbers and
    :func:`plot_expected_losses` for the drawing (``per_point``: losses divided by the
    number of points; ``logy``: logarithmic loss axis, by default when every loss is
    positive). Returns the Axes.
    """
    losses = expected_losses(net_or_kernels, x_train, y_train, x_test, y_test, times,
                             learning_rate=learning_rate, diag_reg=diag_reg, get=get)
    ax = plot_expected_losses(losses, ax=ax, per_point=per_point, logy=logy)
    ax.set_title(f"Expected loss over initialisations ({get.upper()} ensemble)")
    return ax


def plot_regression_1d(
    net_or_kernels: KernelSource,
    x_train: object,
    y_train: object,
    x_test: object,
    times: Sequence[float | None] = (1.0, 10.0, 100.0, math.inf),
    ax: Axes | None = None,
    learning_rate: float = 1.0,
    diag_reg: float = 1e-4,
    get: str = "ntk",
    output: int = 0,
) -> Axes:
    r"""One-dimensional regression by the infinite network: posterior and training.

    Inputs have one feature (``(N, 1)`` or ``(N,)``). Draws the training points, the
    NNGP posterior (:func:`~widenets.predict.gp_inference`, ``K_r = K(X, X) +
    diag_reg I``)::

        mean = K(x, X) K_r^{-1} y,   cov = K(x, x) - K(x, X) K_r^{-1} K(X, x)

    and the ensemble of networks trained by gradient flow
    (:func:`~widenets.predict.gradient_descent_mse_ensemble`, kernel ``get``, NTK by
    default) at each of ``times`` (``math.inf`` or ``None``: the end of training),
    each as its mean and a band of ``mean +- 2 sigma`` with
    ``sigma = sqrt(max(diag(cov), 0))``. Multi-output targets show output ``output``.
    Returns the Axes.
    """
    xt, xs = _as_inputs_1d(x_train, "x_train"), _as_inputs_1d(x_test, "x_test")
    y = _targets(y_train, "y_train")
    if not 0 <= output < y.shape[1]:
        raise ValueError(f"output must be in [0, {y.shape[1]}), got {output}")
    t = _times_tensor(times)
    order = torch.argsort(xs[:, 0])
    xs = xs[order]
    grid = xs[:, 0].to("cpu", torch.float64).numpy()
    ax = _new_axes(ax, (7.0, 4.5))

    def draw(mean: Tensor, cov: Tensor, color: str | tuple[float, ...], label: str) -> None:
        m = mean.to("cpu", torch.float64).reshape(len(grid), -1)[:, output].numpy()
        sigma = torch.diagonal(cov).to("cpu", torch.float64).clamp_min(0).sqrt().numpy()
        ax.plot(grid, m, color=color, linewidth=1.5, label=label)
        ax.fill_between(grid, m - 2 * sigma, m + 2 * sigma, color=color, alpha=0.15,
                        linewidth=0)

    mean, cov = gp_inference(net_or_kernels, xt, y, diag_reg=diag_reg)(xs, get="nngp")
    assert cov is not None  # compute_cov=True (the default)
    draw(mean, cov, "tab:blue", "NNGP posterior ± 2σ")
    ensemble = gradient_descent_mse_ensemble(net_or_kernels, xt, y,
                                             learning_rate=learning_rate, diag_reg=diag_reg)
    means, covs = ensemble(xs, t, get=get)
    assert covs is not None  # compute_cov=True (the default)
    from matplotlib import colormaps

    cmap = colormaps["plasma"]
    for i, time in enumerate(t.tolist()):
        color = cmap(0.3 + 0.55 * i / max(1, len(t) - 1))
        draw(means[i], covs[i], color, f"{get.upper()} ensemble, {_time_label(time)}")
    ax.scatter(xt[:, 0].to("cpu", torch.float64).numpy(), y[:, output].cpu().numpy(),
               color="black", s=18, zorder=5, label="training points")
    ax.set_xlabel("x")
    ax.set_ylabel("f(x)" if y.shape[1] == 1 else f"f(x)[{output}]")
    ax.set_title("Infinite network: posterior and trained ensemble (bands: ± 2σ)")
    ax.legend(fontsize=8)
    return ax
