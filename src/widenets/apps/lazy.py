"""Experiments on finite networks and their infinite-width limit.

:func:`lazy_training` measures the *lazy regime* (Jacot et al. 2018; Lee et al. 2019;
Chizat, Oyallon and Bach 2019, "On lazy training in differentiable programming"): as the
hidden width ``n`` of a network in NTK parameterization grows, gradient descent moves
its parameters and its neural tangent kernel less and less, and the network stays close
to its linearization around the initial parameters. For each width it trains the finite
twin of an architecture and its linearization side by side and records how far the
weights, the empirical NTK and the function move.

What the theory says, and what was measured (float64, full-batch gradient descent at
``learning_rate = 1 / lambda_max`` of the infinite NTK). "Digits" is ``widenets lazy``
with its defaults (200 digits, 10 outputs, one hidden ReLU layer of width 64, 256, 1024,
100 steps, NTKs on 50 inputs), seeds 0, 1, 2; "two hidden layers" the same with
``--hidden-layers 2 --ntk-points 20``, seed 0; "random data" the settings of
``tests/test_experiments.py`` (one hidden layer: 30 inputs in 8 dimensions, one output,
widths 64 to 4096, 60 steps, seeds 0 to 3; two hidden layers: 20 inputs, widths 64 to
1024, 40 steps, seeds 0 to 2). The numbers are fitted slopes of ``log(value)`` against
``log(width)``.

- Relative weight change ``||w_t - w_0|| / ||w_0||``. The numerator stays ``O(1)``: each
  of the many parameters moves by ``O(n^-1/2)`` or less. The denominator is
  ``sqrt(number of parameters)``: with one hidden layer there are ``O(n)`` parameters
  and the slope is -1/2 (digits: -0.51, -0.50, -0.48; random data: -0.47 to -0.52).
  Hidden-to-hidden layers have ``O(n^2)`` weights, ``||w_0|| ~ n`` and the slope tends
  to -1; it is flatter at moderate widths, where the ``O(n)`` input-layer parameters
  still count (two hidden layers on digits, 64 inputs: -0.85; random data, 8 inputs:
  -0.90 to -1.03).
- Relative NTK change ``||T_t - T_0||_F / ||T_0||_F``. Lee et al. (2019) bound it by
  ``O(n^-1/2)``; that bound is not tight. For smooth activations the change is
  ``O(1/n)`` (Dyer and Gur-Ari 2020, "Asymptotics of wide networks from Feynman
  diagrams"): ``Erf`` on random data gives -0.93 to -1.02. With ``ReLU`` it lies in
  between, because the units whose pre-activation crosses the kink change the kernel
  by more: digits -0.82, -0.75, -0.79; two hidden layers -0.78; random data -0.78 to
  -0.90 (two hidden layers: -0.73 to -0.80). So it falls at least like ``n^-1/2``, and
  faster than that in practice.
- Distance to the linearization ``||f_t(X) - f_lin,t(X)|| / ||f_lin,t(X)||``: at most
  ``O(n^-1/2)`` (Lee et al. 2019). ReLU: digits -0.59, -0.60, -0.58; two hidden layers
  -0.57; random data -0.41 to -0.53. ``Erf`` on random data: -0.63 to -0.96, towards
  ``n^-1`` like its NTK change.
- Distance of the initial empirical NTK to the infinite one: ``O(n^-1/2)``, the Monte
  Carlo fluctuation of a sum over ``n`` units. Digits -0.60, -0.56, -0.42; two hidden
  layers -0.44; random data -0.44 to -0.53 (noisy with one network per width).
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..architectures import DEMO_B_STD as B_STD
from ..architectures import DEMO_READOUT_W_STD as READOUT_W_STD
from ..architectures import DEMO_W_STD as HIDDEN_W_STD
from ..architectures import demo_mlp, weighted_layers, with_hidden_width
from ..datasets import load_digits
from ..empirical import empirical_ntk
from ..inputs import as_data_tensor, check_finite_number, check_positive_int
from ..layers import Layer
from ..linearize import linearize
from .common import progress_bar, relative_distance, twin_seed

#: ``net`` for :func:`lazy_training`: an architecture, or a function of the hidden width.
NetSpec = Union[Layer, Callable[[int], Layer]]

#: Hidden widths of ``widenets lazy`` by default.
DEFAULT_WIDTHS: tuple[int, ...] = (64, 256, 1024)
#: Gradient-descent steps of ``widenets lazy`` by default.
DEFAULT_STEPS = 100
#: Training digits of ``widenets lazy`` by default.
DEFAULT_N_TRAIN = 200
#: Hidden layers of the ``widenets lazy`` network by default.
DEFAULT_HIDDEN_LAYERS = 1
#: Training inputs on which ``widenets lazy`` evaluates the empirical NTK by default.
DEFAULT_NTK_POINTS = 50


# ------------------------------------------------------------------ architectures
def lazy_architecture(
    width: int = 1, hidden_layers: int = DEFAULT_HIDDEN_LAYERS, outputs: int = 10
) -> Layer:
    """The fully connected ReLU network of ``widenets lazy``: the demo's
    (:func:`widenets.architectures.demo_mlp`) with ``hidden_layers`` hidden layers.

    ``hidden_layers`` times ``Linear(width, W_std=1.5, b_std=0.05) -> ReLU``, then the
    read-out ``Linear(outputs, W_std=0.5, b_std=0.05)`` (NTK parameterization).
    """
    hidden_layers = check_positive_int(hidden_layers, "hidden_layers")
    return demo_mlp(width, hidden_layers, outputs)


# ------------------------------------------------------------------ results
@dataclass
class WidthRecord:
    """What :func:`lazy_training` measured for one width.

    ``losses`` and ``linear_losses`` hold the training loss ``1/2 sum (f - y)^2`` of the
    network and of its linearization after every step ``0, 1, ..., steps``; the other
    lists hold one value per entry of ``recorded_steps``.
    """

    width: int
    n_params: int
    recorded_steps: list[int]
    losses: list[float]
    linear_losses: list[float]
    weight_changes: list[float]
    ntk_changes: list[float]
    linearization_distances: list[float]
    ntk_init_distance: float
    seconds: float

    @property
    def recorded_losses(self) -> list[float]:
        """The network's loss at the ``recorded_steps``."""
        return [self.losses[t] for t in self.recorded_steps]


@dataclass
class LazyTrainingResult:
    """The result of :func:`lazy_training`.

    ``records``: one :class:`WidthRecord` per width, in the order given. ``slopes``: least
    squares slopes of ``log(value)`` against ``log(width)`` of the final
    ``weight_change``, ``ntk_change``, ``linearization_distance`` and of
    ``ntk_init_distance`` (``None`` with fewer than two widths). ``figures``: paths of the
    PNG figures and ``report``: of ``report.md`` when ``out_dir`` was given.
    """

    widths: list[int]
    steps: int
    learning_rate: float
    records: list[WidthRecord]
    slopes: dict[str, float | None]
    ntk_points: int
    figures: dict[str, str] = field(default_factory=dict)
    report: str | None = None

    def final(self, name: str) -> list[float]:
        """The last recorded ``name`` (``"weight_changes"``, ``"ntk_changes"``,
        ``"linearization_distances"``, ``"losses"``, ...) of each width."""
        return [getattr(r, name)[-1] for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (lists, floats), e.g. for ``json.dump``."""
        return asdict(self)


# ------------------------------------------------------------------ checks
def _check_widths(widths: object) -> list[int]:
    if isinstance(widths, (int, np.integer)) and not isinstance(widths, bool):
        widths = [widths]
    if not isinstance(widths, (Sequence, np.ndarray)) or isinstance(widths, (str, bytes)):
        raise TypeError(f"widths must be a sequence of positive integers, got {widths!r}")
    if len(widths) == 0:
        raise ValueError("widths must hold at least one width")
    checked = [check_positive_int(w, "each of widths") for w in widths]
    if len(set(checked)) != len(checked):
        raise ValueError(f"widths must be distinct, got {checked}")
    return checked


def _check_targets(y: object, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``y`` as an ``(N, outputs)`` tensor of ``dtype`` (``(N,)``: one output)."""
    if isinstance(y, (np.ndarray, Sequence)) and not isinstance(y, (str, bytes)):
        y = np.asarray(y)
    if isinstance(y, (np.ndarray, torch.Tensor)) and y.ndim == 1:
        y = y[:, None]
    t = as_data_tensor(y, "y")
    if t.ndim != 2:
        raise ValueError(f"y must have shape (N,) or (N, outputs), got {tuple(t.shape)}")
    if t.shape[0] != n:
        raise ValueError(
            f"x and y must hold the same number of examples, got {n} and {t.shape[0]}"
        )
    return t.to(dtype)


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _twin_description(net: NetSpec, width: int) -> Layer:
    """The architecture of the twin of ``width``: a copy of ``net`` with that hidden width,
    or ``net(width)`` for a callable."""
    if isinstance(net, Layer):
        return with_hidden_width(net, width)
    layer = net(width)
    if not isinstance(layer, Layer):
        raise TypeError(
            f"net({width}) must return a widenets Layer, got {type(layer).__name__}"
        )
    return layer


def _check_readout(description: Layer, outputs: int, width: int) -> None:
    layers = weighted_layers(description)
    if not layers:
        raise ValueError("net has no weighted layer (Linear or convolution)")
    if len(layers) < 2:
        raise ValueError(
            "net has a single weighted layer (its read-out) and no hidden layer whose "
            "width could vary"
        )
    if layers[-1].width != outputs:
        raise ValueError(
            f"the read-out layer (the last weighted layer, {layers[-1]!r}) has width "
            f"{layers[-1].width} but y has {outputs} outputs (width {width})"
        )


def log_log_slope(widths: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(value)`` against ``log(width)``.

    ``None`` with fewer than two distinct widths, or if a value is not finite and > 0.
    """
    if len(set(widths)) < 2:
        return None
    array = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        return None
    slope, _ = np.polyfit(np.log(np.asarray(widths, dtype=float)), np.log(array), 1)
    return float(slope)


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).to(torch.float64)


# ------------------------------------------------------------------ training
def _train_width(
    description: Layer,
    width: int,
    x: torch.Tensor,
    y: torch.Tensor,
    x_ntk: torch.Tensor,
    k_inf: torch.Tensor,
    steps: int,
    learning_rate: float,
    recorded: list[int],
    seed: int,
    dtype: torch.dtype,
    progress: bool,
) -> WidthRecord:
    """Train the twin of ``width`` and its linearization; see :func:`lazy_training`."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(twin_seed(seed, width))
    model = description.build(tuple(x.shape[1:]), generator, dtype=dtype)
    lin = linearize(model)
    params = [p for p in model.parameters() if p.requires_grad]
    lin_params = list(lin.parameters())
    w0 = _flat(params)
    w0_norm = float(torch.linalg.norm(w0))

    ntk0 = empirical_ntk(model, x_ntk, outputs="full")
    outputs = ntk0.shape[-1]
    ntk0_mean = torch.diagonal(ntk0, dim1=2, dim2=3).mean(dim=2)
    record = WidthRecord(
        width=width, n_params=int(w0.numel()), recorded_steps=list(recorded), losses=[],
        linear_losses=[], weight_changes=[], ntk_changes=[], linearization_distances=[],
        ntk_init_distance=relative_distance(ntk0_mean, k_inf), seconds=0.0,
    )
    if outputs != y.shape[1]:
        raise ValueError(f"the twin of width {width} has {outputs} outputs but y has "
                         f"{y.shape[1]}")
    to_record = set(recorded)

    bar = progress_bar(range(steps + 1), enabled=progress, desc=f"width {width:>5}",
                        unit="step")
    with bar:
        for t in bar:
            # (N,) outputs of a one-output model as (N, 1), like y.
            f, f_lin = model(x).reshape(y.shape), lin(x).reshape(y.shape)
            loss = 0.5 * (f - y).pow(2).sum()
            lin_loss = 0.5 * (f_lin - y).pow(2).sum()
            values = float(loss.detach()), float(lin_loss.detach())
            for value, what in zip(values, ("network", "linearized network")):
                if not math.isfinite(value):
                    raise RuntimeError(
                        f"gradient descent diverged for width {width}: the {what}'s loss "
                        f"is {value} at step {t} with learning rate {learning_rate:.4g}; "
                        "use a smaller learning rate (below 2 / lambda_max of the NTK) or "
                        "larger widths"
                    )
            record.losses.append(values[0])
            record.linear_losses.append(values[1])
            if t in to_record:
                wt = _flat(params)
                record.weight_changes.append(float(torch.linalg.norm(wt - w0)) / w0_norm)
                ntk = ntk0 if t == 0 else empirical_ntk(model, x_ntk, outputs="full")
                record.ntk_changes.append(relative_distance(ntk, ntk0) if t else 0.0)
                record.linearization_distances.append(relative_distance(f, f_lin))
            if t == steps:
                break
            grads = torch.autograd.grad(loss, params)
            lin_grads = torch.autograd.grad(lin_loss, lin_params)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    p.sub_(learning_rate * g)
                for p, g in zip(lin_params, lin_grads, strict=True):
                    p.sub_(learning_rate * g)
            if t % 10 == 0:
                bar.set_postfix(loss=f"{record.losses[-1]:.3g}", refresh=False)
    record.seconds = time.perf_counter() - start
    return record


def lazy_training(
    net: NetSpec,
    x: object,
    y: object,
    widths: Sequence[int],
    steps: int,
    learning_rate: float,
    *,
    seed: int = 0,
    record_every: int | None = None,
    ntk_points: int | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
    out_dir: str | Path | None = None,
) -> LazyTrainingResult:
    r"""Train finite twins of ``net`` of several widths and measure how lazily they train.

    For each hidden width ``n`` in ``widths``, the twin ``model`` of ``net`` with hidden
    width ``n`` (see :func:`~widenets.architectures.with_hidden_width`) is built with
    parameters drawn from a
    ``torch.Generator`` seeded by ``np.random.SeedSequence([seed, n])``, and its
    linearization ``model_lin = wn.linearize(model)``,
    ``f_lin(x; w) = f(x; w_0) + J(x; w_0)(w - w_0)``, is made at initialization. Both
    are trained by full-batch gradient descent for ``steps`` steps on

        L(w) = 1/2 sum_{i, o} (f_o(x_i; w) - y_{i, o})^2,     w <- w - learning_rate dL/dw.

    At the recorded steps ``t = 0, record_every, 2 record_every, ..., steps`` (``steps``
    always included) it records, with ``w`` all trainable parameters concatenated:

    - relative weight change ``||w_t - w_0|| / ||w_0||`` (Euclidean norms);
    - relative NTK change ``||T_t - T_0||_F / ||T_0||_F``, where ``T_t`` is the full
      empirical NTK ``empirical_ntk(model, X, outputs="full")`` ``(N, N, O, O)`` at
      ``w_t`` on the training inputs ``X``;
    - distance to the linearization ``||f(X; w_t) - f_lin(X; w_lin,t)|| /
      ||f_lin(X; w_lin,t)||`` over all training inputs and outputs (0 at ``t = 0``,
      where the two coincide); relative to the linearized outputs, which approach the
      targets as training proceeds, so it reads as a relative error of the predictions.

    The loss of both is recorded after every step. Per width it also records the
    distance of the initial empirical NTK, averaged over the outputs, to the infinite
    NTK of the same description, ``||mean_o T_0[:, :, o, o] - Theta||_F / ||Theta||_F``
    with ``Theta = description.kernel(X, get="ntk")``.

    In NTK parameterization the distance to the linearization and the distance of the
    initial NTK to its limit fall like ``n^-1/2`` (or faster); the relative weight change
    like ``n^-1/2`` with one hidden layer, and steeper (towards ``n^-1``) with
    hidden-to-hidden layers, whose ``n^2`` weights make ``||w_0|| ~ n``; the relative NTK
    change at least like ``n^-1/2`` (the bound of Lee et al. 2019), in practice faster:
    ``n^-1`` for smooth activations, about ``n^-0.8`` with ReLU. See the measured numbers
    in ``widenets.experiments``.

    Args:
        net: the architecture (a :class:`~widenets.Layer`): the twins replace the width
            of every weighted layer but the last (the read-out, whose width must equal
            the number of outputs of ``y``) by ``n``; ``net`` is not changed. Or a
            function ``width -> Layer`` giving the architecture of each width.
        x: training inputs ``(N, features)`` or images ``(N, C, ...)``: a tensor or a
            NumPy array; cast to ``dtype``.
        y: targets ``(N,)`` (one output) or ``(N, outputs)``.
        widths: distinct positive hidden widths.
        steps: gradient-descent steps (a positive integer).
        learning_rate: a positive finite step size; gradient descent on this loss is
            stable below ``2 / lambda_max`` of the NTK on ``x`` (e.g.
            ``1 / lambda_max`` of ``net.kernel(x, get="ntk")``).
        seed: a non-negative integer; the twin of width ``n`` uses ``(seed, n)``.
        record_every: steps between recorded diagnostics (default ``max(1, steps // 10)``).
        ntk_points: evaluate the empirical NTKs on the first ``ntk_points`` training
            inputs only (default ``None``: all ``N``). The full NTK costs about
            ``(N O)^2 P`` operations for ``P`` parameters and is by far the most
            expensive part; the relative change on a subset scales the same way.
        dtype: ``torch.float64`` (default) or ``torch.float32`` for the twins and data.
        progress: show a tqdm progress bar per width (on stderr).
        out_dir: if given, a folder (created if needed) for the figures ``losses.png``
            (training loss against step, per width, linearized networks dashed),
            ``scaling.png`` (final relative weight and NTK changes, and the distances to
            the linearization and to the infinite NTK, against width on log-log axes with
            slope -1/2 guides) and ``report.md``. Needs matplotlib.

    Returns:
        A :class:`LazyTrainingResult`: per width a :class:`WidthRecord`, and the fitted
        log-log slopes against width of the final ``weight_change``, ``ntk_change``,
        ``linearization_distance`` and of ``ntk_init_distance``.

    Raises:
        TypeError, ValueError: for bad arguments (naming the argument), a read-out whose
            width differs from the number of outputs of ``y``, or a ``net`` without a
            hidden weighted layer.
        RuntimeError: if the loss of a twin or of its linearization becomes non-finite
            (gradient descent diverged), naming the width and learning rate.
    """
    if not isinstance(net, Layer) and not callable(net):
        raise TypeError(
            f"net must be a widenets Layer or a function width -> Layer, got "
            f"{type(net).__name__}"
        )
    widths = _check_widths(widths)
    steps = check_positive_int(steps, "steps")
    learning_rate = check_finite_number(learning_rate, "learning_rate")
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    record_every = max(1, steps // 10) if record_every is None else check_positive_int(
        record_every, "record_every")
    dtype = _check_dtype(dtype)
    xt = as_data_tensor(x, "x").to(dtype)
    yt = _check_targets(y, xt.shape[0], dtype)
    n_ntk = xt.shape[0] if ntk_points is None else min(
        check_positive_int(ntk_points, "ntk_points"), xt.shape[0])
    x_ntk = xt[:n_ntk]
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be True or False, got {progress!r}")
    descriptions = {}
    for width in widths:
        descriptions[width] = _twin_description(net, width)
        _check_readout(descriptions[width], yt.shape[1], width)
    recorded = sorted({*range(0, steps, record_every), steps})

    # The infinite NTK ignores the hidden widths in NTK parameterization: compute it once.
    same_limit = isinstance(net, Layer) and all(
        layer.parameterization == "ntk" for layer in weighted_layers(net)
    )
    k_inf = descriptions[widths[0]].kernel(x_ntk, get="ntk") if same_limit else None
    records = []
    for width in widths:
        description = descriptions[width]
        limit = description.kernel(x_ntk, get="ntk") if k_inf is None else k_inf
        records.append(_train_width(description, width, xt, yt, x_ntk, limit, steps,
                                    learning_rate, recorded, int(seed), dtype, progress))
    result = LazyTrainingResult(
        widths=widths, steps=steps, learning_rate=learning_rate, records=records,
        slopes={}, ntk_points=n_ntk,
    )
    result.slopes = {
        "weight_change": log_log_slope(widths, result.final("weight_changes")),
        "ntk_change": log_log_slope(widths, result.final("ntk_changes")),
        "linearization_distance": log_log_slope(
            widths, result.final("linearization_distances")),
        "ntk_init_distance": log_log_slope(widths, [r.ntk_init_distance for r in records]),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.figures = {
            "losses": str(plot_losses(out / "losses.png", result)),
            "scaling": str(plot_scaling(out / "scaling.png", result)),
        }
        result.report = str(write_report(out / "report.md", result))
    return result


# ------------------------------------------------------------------ figures, report
def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_losses(path: str | Path, result: LazyTrainingResult) -> Path:
    """Training loss against step for each width (solid) and for its linearization
    (dashed, same colour), log scale; saved as a PNG at ``path``."""
    from matplotlib import colormaps

    path = Path(path)
    fig = _figure((6.4, 4.4))
    ax = fig.subplots()
    records = sorted(result.records, key=lambda r: r.width)
    cmap = colormaps["viridis"]
    for i, r in enumerate(records):
        color = cmap(0.85 * i / max(1, len(records) - 1))
        steps = np.arange(len(r.losses))
        ax.plot(steps, r.losses, "-", color=color, label=f"width {r.width}")
        ax.plot(steps, r.linear_losses, "--", color=color, alpha=0.8)
    ax.plot([], [], "--", color="gray", label="linearized (dashed)")
    ax.set_yscale("log")
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("training loss 1/2 sum (f - y)^2")
    ax.set_title(f"Network vs its linearization, lr = {result.learning_rate:.3g}",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _slope_text(slope: float | None) -> str:
    return "" if slope is None else f", slope {slope:.2f}"


def plot_scaling(path: str | Path, result: LazyTrainingResult) -> Path:
    """Final relative weight change and NTK change (left), distance to the linearization
    and of the initial NTK to the infinite one (right) against width, log-log axes, with
    slope -1/2 guides (and a slope -1 guide from the NTK change); saved as a PNG at
    ``path``."""
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    path = Path(path)
    fig = _figure((11, 4.2))
    left, right = fig.subplots(1, 2)
    order = np.argsort(result.widths)
    widths = np.asarray(result.widths, dtype=float)[order]

    def series(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=float)[order]

    panels = [
        (left, [("weight_changes", "weight_change", "o-", "tab:blue",
                 "||w_t - w_0|| / ||w_0||"),
                ("ntk_changes", "ntk_change", "s-", "tab:orange",
                 "||T_t - T_0|| / ||T_0||")],
         f"Relative changes after {result.steps} steps"),
        (right, [("linearization_distances", "linearization_distance", "o-", "tab:red",
                  "||f_t - f_lin,t|| / ||f_lin,t||"),
                 ("ntk_init_distance", "ntk_init_distance", "s-", "tab:green",
                  "initial NTK vs infinite")],
         "Distance to the linearization and to the limit"),
    ]
    for ax, entries, title in panels:
        for i, (attr, key, style, color, label) in enumerate(entries):
            if attr == "ntk_init_distance":
                values = series([r.ntk_init_distance for r in result.records])
            else:
                values = series(result.final(attr))
            ax.loglog(widths, values, style, color=color,
                      label=label + _slope_text(result.slopes[key]))
            guide = values[0] * np.sqrt(widths[0] / widths)
            ax.loglog(widths, guide, ":", color="black",
                      label="slope -1/2" if i == 0 else None)
            if key == "ntk_change":
                ax.loglog(widths, values[0] * widths[0] / widths, "-.", color="gray",
                          label="slope -1")
        ax.set_xticks(widths, [str(int(w)) for w in widths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("hidden width")
        ax.set_ylabel("relative change / distance")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def write_report(path: str | Path, result: LazyTrainingResult,
                 settings: dict[str, Any] | None = None) -> Path:
    """Write a short Markdown report of ``result`` (and ``settings``, if given)."""
    path = Path(path)
    lines = ["# Lazy training: finite networks against their linearization", ""]
    if settings:
        lines += [f"- {key}: {value}" for key, value in settings.items()] + [""]
    lines += [
        f"{result.steps} full-batch gradient-descent steps at learning rate "
        f"{result.learning_rate:.4g} on `L = 1/2 sum (f - y)^2`; NTKs on "
        f"{result.ntk_points} training inputs.",
        "",
        "| width | parameters | final loss | linearized loss | weight change | "
        "NTK change | distance to linearization | initial NTK vs limit | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.records:
        lines.append(
            f"| {r.width} | {r.n_params} | {r.losses[-1]:.4g} | {r.linear_losses[-1]:.4g} | "
            f"{r.weight_changes[-1]:.4g} | {r.ntk_changes[-1]:.4g} | "
            f"{r.linearization_distances[-1]:.4g} | {r.ntk_init_distance:.4g} | "
            f"{r.seconds:.1f} |"
        )
    lines += ["", "Fitted slopes of log(value) against log(width):", ""]
    for key, slope in result.slopes.items():
        lines.append(f"- {key}: " + ("n/a" if slope is None else f"{slope:.3f}"))
    lines += [
        "",
        "Definitions: weight change `||w_t - w_0|| / ||w_0||` over all trainable "
        "parameters; NTK change `||T_t - T_0||_F / ||T_0||_F` of the full empirical NTK "
        "`(N, N, O, O)`; distance to linearization `||f_t(X) - f_lin,t(X)|| / "
        "||f_lin,t(X)||` on the training inputs; initial NTK vs limit "
        "`||mean_o T_0[:, :, o, o] - Theta||_F / ||Theta||_F`. Theory (NTK "
        "parameterization): NTK change, distance to linearization and initial NTK "
        "distance ~ width^-1/2; weight change ~ width^-1/2 with one hidden layer, "
        "steeper (towards width^-1) with hidden-to-hidden layers.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------ digits
def run_lazy(
    out_dir: str | Path = "widenets-lazy",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    steps: int = DEFAULT_STEPS,
    n_train: int = DEFAULT_N_TRAIN,
    seed: int = 0,
    learning_rate: float | None = None,
    hidden_layers: int = DEFAULT_HIDDEN_LAYERS,
    ntk_points: int | None = DEFAULT_NTK_POINTS,
    record_every: int | None = None,
    progress: bool = True,
) -> LazyTrainingResult:
    """:func:`lazy_training` on scikit-learn's digits (``widenets lazy``).

    The first ``n_train`` digits of the demo's seeded split (:func:`widenets.datasets.load_digits`:
    inputs ``(N, 64)`` of norm 8, targets one-hot minus 0.1, 10 outputs) train the network
    :func:`lazy_architecture` with ``hidden_layers`` hidden ReLU layers of each width, in
    float64. ``learning_rate=None`` uses ``1 / lambda_max`` of the infinite NTK on the
    training inputs (as the demo). Writes ``losses.png``, ``scaling.png`` and
    ``report.md`` into ``out_dir``.
    """
    hidden_layers = check_positive_int(hidden_layers, "hidden_layers")
    data = load_digits(n_train, n_test=1, seed=seed)
    net = lazy_architecture(1, hidden_layers, outputs=data.y_train.shape[1])
    chosen = "given"
    if learning_rate is None:
        lam_max = float(torch.linalg.eigvalsh(net.kernel(data.x_train, get="ntk"))[-1])
        learning_rate, chosen = 1.0 / lam_max, f"1 / lambda_max, lambda_max = {lam_max:.4g}"
    start = time.perf_counter()
    result = lazy_training(
        net, data.x_train, data.y_train, widths, steps, learning_rate, seed=seed,
        record_every=record_every, ntk_points=ntk_points, progress=progress,
        out_dir=out_dir,
    )
    settings = {
        "data": f"scikit-learn digits, {len(data.x_train)} training images (seed {seed}), "
                "targets one-hot minus 0.1",
        "architecture": f"{hidden_layers} x [Linear(w, W_std={HIDDEN_W_STD}, "
                        f"b_std={B_STD}) -> ReLU] -> Linear(10, W_std={READOUT_W_STD}, "
                        f"b_std={B_STD}), NTK parameterization, float64",
        "widths": ", ".join(map(str, result.widths)),
        "learning rate": f"{learning_rate:.4g} ({chosen})",
        "time": f"{time.perf_counter() - start:.1f} s, torch {torch.__version__}, "
                f"Python {platform.python_version()}, {torch.get_num_threads()} threads",
    }
    result.report = str(write_report(Path(out_dir) / "report.md", result, settings))
    return result


def summary(result: LazyTrainingResult) -> list[str]:
    """A few lines on ``result`` (printed by ``widenets lazy``)."""
    lines = [f"{result.steps} steps at learning rate {result.learning_rate:.4g}"]
    for r in result.records:
        lines.append(
            f"width {r.width:>5}: loss {r.losses[-1]:.4g} (linearized "
            f"{r.linear_losses[-1]:.4g}), weight change {r.weight_changes[-1]:.4g}, "
            f"NTK change {r.ntk_changes[-1]:.4g}, distance to linearization "
            f"{r.linearization_distances[-1]:.4g}"
        )
    names = {"weight_change": "weight change", "ntk_change": "NTK change",
             "linearization_distance": "distance to linearization",
             "ntk_init_distance": "initial NTK vs infinite"}
    for key, name in names.items():
        slope = result.slopes[key]
        if slope is not None:
            lines.append(f"{name} ~ width^{slope:.2f}")
    return lines


__all__ = [
    "DEFAULT_HIDDEN_LAYERS", "DEFAULT_NTK_POINTS", "DEFAULT_N_TRAIN", "DEFAULT_STEPS",
    "DEFAULT_WIDTHS", "LazyTrainingResult", "NetSpec", "WidthRecord", "lazy_architecture",
    "lazy_training", "log_log_slope", "plot_losses", "plot_scaling", "relative_distance",
    "run_lazy", "summary", "twin_seed", "weighted_layers", "with_hidden_width",
    "write_report",
]
