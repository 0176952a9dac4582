"""The widenets demo: an infinitely wide network and its finite twins on handwritten digits.

On scikit-learn's bundled digits (1797 images of 8x8 pixels, no download) it

1. computes the NNGP and NTK kernels of one fully connected ReLU architecture (once,
   both together) and reports the test accuracy of both Gaussian-process posterior
   means, and the same for a convolutional network with global average pooling on the
   8x8 images (on a subset: its kernels hold a covariance for every pair of pixel
   positions);
2. follows the ensemble of infinitely wide networks trained by gradient flow
   (:func:`~widenets.predict.gradient_descent_mse_ensemble`): test accuracy and MSE of
   its mean at a few times and at ``t = inf``, and its expected train and test loss
   against time (:func:`~widenets.plot.expected_losses`);
3. builds finite twins of that architecture (widths 64, 256, 1024 by default, several
   independently initialised networks per width: ``seeds``), trains
   each by full-batch gradient descent on ``L = 1/2 sum (f - y)^2`` and compares its
   test outputs with the NTK prediction for the same training run: the linearized
   infinite network trained for the same number of steps, at the same learning rate,
   *from the same initial outputs* as the finite network, and with the ensemble's
   mean at the same time, whose distance to one network approaches the spread the
   ensemble predicts rather than zero; the distances are summarised per width by their
   mean and standard deviation over the seeds, and the slope of log(distance) against
   log(width) is fitted to the per-width means;
4. writes ``report.md`` and ``demo.png`` into an output folder.

Run it with ``widenets demo`` (see :mod:`widenets.cli`) or :func:`run_demo`.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..architectures import DEMO_B_STD as B_STD
from ..architectures import DEMO_READOUT_W_STD as READOUT_W_STD
from ..architectures import DEMO_W_STD as HIDDEN_W_STD
from ..architectures import demo_cnn, demo_mlp
from ..datasets import DigitsData, as_images, load_digits
from ..layers.base import Layer
from ..predict import KernelSource, gp_inference, gradient_descent_mse
from ..version import __version__
from .common import progress_bar, relative_distance, require, twin_seed

if TYPE_CHECKING:
    from matplotlib.figure import Figure

#: Widths of the finite twins trained by default.
DEFAULT_WIDTHS: tuple[int, ...] = (64, 256, 1024)
#: Independently initialised networks per width by default (the data split is fixed by
#: ``seed``). Each seed adds the twins' training, about 16 s on 2 cores: 3 seeds make the
#: demo about 60 s instead of 28 s with one.
DEFAULT_SEEDS = 3
#: The per-network quantities of :func:`train_twin` that :func:`summarize_twins`
#: averages over the seeds of each width.
TWIN_METRICS: tuple[str, ...] = (
    "accuracy", "ntk_accuracy", "distance", "distance_to_ntk_mean",
    "distance_to_ensemble_mean", "train_loss", "test_loss",
)
#: Full-batch gradient-descent steps by default.
DEFAULT_STEPS = 300
#: Training examples by default (the other 797 digits are the test set).
DEFAULT_N_TRAIN = 1000
#: Ridge added to the training kernel in the posteriors, relative to its mean diagonal.
DIAG_REG_FRACTION = 1e-4
#: Learning rate as a multiple of ``1 / lambda_max`` (gradient descent is stable below 2).
LR_FRACTION = 1.0
#: Training and test images of the convolutional network by default (subsets of the
#: split): its pooled kernels cost about 0.3 ms per pair of images on 2 cores, so these
#: take about half a minute (300 and 300: 0.977 NNGP accuracy in about 90 s).
DEFAULT_CNN_N_TRAIN, DEFAULT_CNN_N_TEST = 200, 200
#: Training times of the NTK ensemble in the report, as multiples of the twins' training
#: (``steps`` steps of size ``lr``: the time ``steps * lr``); ``t = inf`` is added.
ENSEMBLE_TIME_FACTORS: tuple[float, ...] = (0.1, 1.0, 10.0)
#: Finite times of the expected-loss curve: ``t = 0`` and this many log-spaced times
#: from one step to ``LOSS_CURVE_SPAN`` times the twins' training.
LOSS_CURVE_POINTS, LOSS_CURVE_SPAN = 25, 100.0


#: The architecture in words (``w``: the hidden width).
ARCHITECTURE_TEXT = (
    f"Linear(w, W_std={HIDDEN_W_STD}, b_std={B_STD}) -> ReLU -> "
    f"Linear(w, W_std={HIDDEN_W_STD}, b_std={B_STD}) -> ReLU -> "
    f"Linear(10, W_std={READOUT_W_STD}, b_std={B_STD})"
)


#: The convolutional architecture in words (``c``: the channels).
CNN_ARCHITECTURE_TEXT = (
    f"Conv2d(c, 3x3, same, W_std={HIDDEN_W_STD}, b_std={B_STD}) -> ReLU -> AvgPool2d(2) -> "
    f"Conv2d(c, 3x3, same, W_std={HIDDEN_W_STD}, b_std={B_STD}) -> ReLU -> GlobalAvgPool "
    f"-> Linear(10, W_std={READOUT_W_STD}, b_std={B_STD})"
)


def accuracy(outputs: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose largest output is at the true label."""
    predicted = np.asarray(torch.as_tensor(outputs).argmax(dim=1))
    return float(np.mean(predicted == labels))


class KernelCache:
    """The NNGP and NTK of one architecture on named input sets, each pair computed once.

    ``pair(a, b)`` computes both kernels between the sets ``a`` and ``b`` in one pass
    (``b=None``: ``a`` with itself) and keeps them. The cache is also a kernel
    function ``kernel_fn(x1, x2, get)`` for :mod:`widenets.predict`: inputs equal (same
    dtype, shape and values) to a named set are served from the cache, computing their
    pair on first use; other inputs are computed directly, uncached.
    """

    def __init__(self, net: Layer, inputs: dict[str, np.ndarray | torch.Tensor]) -> None:
        self.net = net
        self.inputs = {name: torch.as_tensor(x) for name, x in inputs.items()}
        self.kernels: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def pair(self, a: str, b: str | None = None) -> dict[str, torch.Tensor]:
        """``{"nngp": K(a, b), "ntk": T(a, b)}``, computed on first use."""
        b = a if b is None else b
        if (a, b) not in self.kernels and (b, a) in self.kernels:
            return {name: k.T for name, k in self.kernels[(b, a)].items()}
        if (a, b) not in self.kernels:
            # progress=False: the demo's own bars count these blocks
            both = self.net.kernel(self.inputs[a], None if a == b else self.inputs[b],
                                   get=("nngp", "ntk"), progress=False)
            if both.nngp is None or both.ntk is None:
                raise RuntimeError("the kernel computation returned no NNGP or no NTK")
            self.kernels[(a, b)] = {"nngp": both.nngp, "ntk": both.ntk}
        return self.kernels[(a, b)]

    def _name(self, x: torch.Tensor) -> str | None:
        for name, known in self.inputs.items():
            if x.dtype == known.dtype and x.shape == known.shape and torch.equal(x, known):
                return name
        return None

    def __call__(self, x1: object, x2: object | None, get: str) -> torch.Tensor:
        t1 = torch.as_tensor(x1)
        t2 = None if x2 is None else torch.as_tensor(x2)
        a = self._name(t1)
        b = a if t2 is None else self._name(t2)
        if a is None or b is None:
            return self.net.kernel(t1, t2, get=get, progress=False)
        return self.pair(a, b)[get]


def posterior_mean(
    net_or_kernels: KernelSource,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    get: str,
) -> dict[str, Any]:
    """The GP posterior mean of the kernel ``get`` on ``x_test``.

    ``net_or_kernels``: an architecture or a kernel function (e.g. a
    :class:`KernelCache`). The ridge ``diag_reg`` is ``DIAG_REG_FRACTION`` times the
    kernel's diagonal at the first training input (for the fully connected network
    every input has the same diagonal; for the CNN it varies a little with the image).
    Returns ``mean``, ``diag_reg`` and ``diag``.
    """
    first = torch.as_tensor(x_train[:1])
    if isinstance(net_or_kernels, Layer):
        k_first = net_or_kernels.kernel(first, None, get=get, progress=False)
    else:
        k_first = net_or_kernels(first, None, get)
    diag = float(torch.as_tensor(k_first)[0, 0])
    reg = DIAG_REG_FRACTION * diag
    posterior = gp_inference(net_or_kernels, x_train, y_train, diag_reg=reg)
    mean, _ = posterior(x_test, get=get, compute_cov=False)
    return {"mean": mean, "diag_reg": reg, "diag": diag}


def convolutional_predictions(
    data: DigitsData, n_train: int, n_test: int, progress: bool = True
) -> dict[str, Any]:
    """NNGP and NTK posterior accuracies of the infinitely wide CNN-GAP.

    Uses the first ``n_train`` training and ``n_test`` test images of ``data``; both
    kernels of each pair of sets are computed together, once (:class:`KernelCache`).
    Returns ``nngp_accuracy``, ``ntk_accuracy``, ``n_train``, ``n_test`` and
    ``seconds``.
    """
    x_train, x_test = as_images(data.x_train[:n_train]), as_images(data.x_test[:n_test])
    kernels = KernelCache(demo_cnn(), {"train": x_train, "test": x_test})
    results: dict[str, Any] = {"n_train": len(x_train), "n_test": len(x_test)}
    start = time.perf_counter()
    bar = progress_bar((("train", "train"), ("test", "train")), enabled=progress,
                        desc="convolutional network", unit="kernel block")
    for a, b in bar:
        kernels.pair(a, b)
    for name in ("nngp", "ntk"):
        mean = posterior_mean(kernels, x_train, data.y_train[:n_train], x_test, name)["mean"]
        results[f"{name}_accuracy"] = accuracy(mean, data.labels_test[:n_test])
    results["seconds"] = time.perf_counter() - start
    return results


def ensemble_times(steps: int, learning_rate: float) -> tuple[list[float], list[float]]:
    """The times of the NTK ensemble: the report's, and all those computed.

    Gradient flow at rate 1 for a time ``t`` matches about ``t / learning_rate`` steps
    of size ``learning_rate``; the twins train for ``t = steps * learning_rate``. The
    report's times are ``ENSEMBLE_TIME_FACTORS`` times that and ``inf``; the loss curve
    adds ``t = 0`` and ``LOSS_CURVE_POINTS`` log-spaced times from one step to
    ``LOSS_CURVE_SPAN`` times the twins' training.
    """
    twin_time = steps * learning_rate
    table = [f * twin_time for f in ENSEMBLE_TIME_FACTORS] + [math.inf]
    curve = np.geomspace(learning_rate, LOSS_CURVE_SPAN * twin_time, LOSS_CURVE_POINTS)
    return table, sorted({0.0, twin_time, *table, *(float(t) for t in curve)})


def infinite_predictions(
    data: DigitsData, steps: int, progress: bool = True
) -> dict[str, Any]:
    """Posteriors and trained ensemble of the infinite network, and what the twins need.

    The NNGP and NTK between the training and test sets are computed once
    (:class:`KernelCache`) and serve every prediction. Returns a dict with the NNGP
    and NTK posterior means on the test set and their accuracies, ``kernels`` (the
    cache), the training NTK and test-train NTK, the learning rate
    ``LR_FRACTION / lambda_max(NTK_train)``, ``gd``: the function of
    :func:`~widenets.predict.gradient_descent_mse` for that rate (``discrete=True``),
    the accuracy of its mean prediction (from zero initial outputs) after ``steps``
    steps, ``losses``: :func:`~widenets.plot.expected_losses` of the NTK ensemble
    (gradient flow at rate 1, same ``diag_reg`` as the NTK posterior) at the times of
    :func:`ensemble_times`, ``ensemble``: one row per report time (``t``, ``steps``,
    ``accuracy`` and ``mse`` of the ensemble mean on the test set, expected
    ``test_loss`` and ``train_loss`` per point, and ``spread``: the expected relative
    distance ``sqrt(E||f - mean||^2) / ||mean||`` of one trained network from the
    mean), ``ensemble_at_twins``: that row at the twins' time ``steps * lr``,
    ``ensemble_mean_at_steps``: the test mean there, and the seconds spent per phase.
    """
    net = demo_mlp()
    timings: dict[str, float] = {}
    phases = ["kernels", "NNGP posterior", "NTK posterior", "NTK spectrum", "NTK ensemble"]
    bar = progress_bar(total=len(phases), enabled=progress, desc="infinite network",
                        unit="phase")
    results: dict[str, Any] = {}
    with bar:
        bar.set_postfix_str("NNGP and NTK kernels")
        start = time.perf_counter()
        kernels = KernelCache(net, {"train": data.x_train, "test": data.x_test})
        for a, b in (("train", "train"), ("test", "train"), ("test", "test")):
            kernels.pair(a, b)
        timings["NNGP and NTK kernels (train, test-train, test)"] = time.perf_counter() - start
        bar.update(1)

        for name in ("nngp", "ntk"):
            bar.set_postfix_str(f"{name.upper()} posterior")
            start = time.perf_counter()
            posterior = posterior_mean(kernels, data.x_train, data.y_train, data.x_test, name)
            results[f"{name}_mean"] = posterior["mean"]
            results[f"{name}_accuracy"] = accuracy(posterior["mean"], data.labels_test)
            results[f"{name}_diag_reg"] = posterior["diag_reg"]
            results[f"{name}_diag"] = posterior["diag"]
            timings[f"{name.upper()} posterior"] = time.perf_counter() - start
            bar.update(1)

        bar.set_postfix_str("NTK spectrum")
        start = time.perf_counter()
        ntk_train = kernels.pair("train")["ntk"]
        ntk_test_train = kernels.pair("test", "train")["ntk"]
        eigenvalues = torch.linalg.eigvalsh(ntk_train)
        lam_max = float(eigenvalues[-1])
        learning_rate = LR_FRACTION / lam_max
        gd = gradient_descent_mse(ntk_train, data.y_train, learning_rate, discrete=True)
        _, mean_at_steps = gd(steps, fx_train_0=0.0, k_test_train=ntk_test_train)
        if mean_at_steps is None:
            raise RuntimeError("gradient_descent_mse returned no test prediction")
        timings["NTK spectrum and dynamics"] = time.perf_counter() - start
        bar.update(1)

        bar.set_postfix_str("NTK ensemble over time")
        start = time.perf_counter()
        table_times, times = ensemble_times(steps, learning_rate)
        from ..plot import expected_losses  # matplotlib: only when the demo runs

        losses = expected_losses(kernels, data.x_train, data.y_train, data.x_test,
                                 data.y_test, times, learning_rate=1.0,
                                 diag_reg=results["ntk_diag_reg"], get="ntk")
        y_test = torch.as_tensor(data.y_test)

        def row(t: float) -> dict[str, float]:
            i = times.index(t)
            mean = losses.test_mean[i]
            return {
                "t": t,
                "steps": t / learning_rate,
                "accuracy": accuracy(mean, data.labels_test),
                "mse": float((mean - y_test).pow(2).mean()),
                "test_loss": float(losses.test[i]) / losses.n_test,
                "train_loss": float(losses.train[i]) / losses.n_train,
                "spread": float(losses.test_variance[i].sqrt() / torch.linalg.norm(mean)),
            }

        rows = [row(t) for t in table_times]
        twin_time = steps * learning_rate
        at_twins = row(twin_time)
        timings["NTK ensemble over time (means, covariances)"] = time.perf_counter() - start
        bar.update(1)

    results.update(
        kernels=kernels,
        ntk_train=ntk_train,
        ntk_test_train=ntk_test_train,
        lambda_max=lam_max,
        lambda_min=float(eigenvalues[0]),
        learning_rate=learning_rate,
        gd=gd,
        ntk_gd_mean=mean_at_steps,
        ntk_gd_mean_accuracy=accuracy(mean_at_steps, data.labels_test),
        losses=losses,
        ensemble=rows,
        ensemble_at_twins=at_twins,
        ensemble_mean_at_steps=losses.test_mean[times.index(twin_time)],
        timings=timings,
    )
    return results


def train_twin(
    width: int,
    data: DigitsData,
    infinite: dict[str, Any],
    steps: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    replicate: int = 0,
) -> dict[str, Any]:
    """Train the finite twin of ``width`` and compare it with its NTK prediction.

    The twin is built by :meth:`~widenets.Layer.build` (NTK parameterization) and
    trained by plain full-batch gradient descent, ``theta <- theta - lr grad L`` with
    ``L = 1/2 sum (f(X_train) - Y)^2``, for ``steps`` steps at the learning rate in
    ``infinite`` (from :func:`infinite_predictions`). Its NTK prediction is the
    linearized infinite network after the same steps, started from this twin's own
    initial outputs ``f0(X_train)``, ``f0(X_test)``.

    Returns the width, test accuracy of the twin and of its NTK prediction, the relative
    test distance ``||f_net - f_ntk|| / ||f_ntk||``, the relative distance to the NTK
    mean prediction (started from zero outputs, which ignores ``f0``), the relative
    distance to the NTK ensemble's mean at the matching time ``steps * lr`` (gradient
    flow), the final training loss, the test loss ``1/2 sum (f - y)^2`` per test point,
    the seconds spent, ``replicate`` and ``net_seed`` (see :func:`network_seed`).

    ``replicate`` numbers the independently initialised networks of one width under
    one ``seed`` (0, 1, 2, ...); replicate 0 is the network of earlier versions.
    """
    start = time.perf_counter()
    net_seed = network_seed(seed, width, replicate)
    generator = torch.Generator().manual_seed(net_seed)
    model = demo_mlp(width).build((data.x_train.shape[1],), generator, dtype=dtype)
    x_train = torch.as_tensor(data.x_train, dtype=dtype)
    x_test = torch.as_tensor(data.x_test, dtype=dtype)
    y_train = torch.as_tensor(data.y_train, dtype=dtype)
    with torch.no_grad():
        f0_train, f0_test = model(x_train), model(x_test)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = infinite["learning_rate"]

    loss_value = float("nan")
    bar = progress_bar(range(steps), enabled=progress,
                        desc=f"width {width:>5} seed {replicate}", unit="step")
    for step in bar:
        loss = 0.5 * (model(x_train) - y_train).pow(2).sum()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(lr * g)
        if step % 20 == 0 or step == steps - 1:
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                bar.close()
                raise RuntimeError(
                    f"gradient descent diverged for width {width} at step {step} "
                    f"(learning rate {lr:.3g}); use fewer steps or a larger width"
                )
            bar.set_postfix(loss=f"{loss_value:.3g}", refresh=False)
    bar.close()

    with torch.no_grad():
        f_train, f_test = model(x_train), model(x_test)
    final_loss = 0.5 * float((f_train - y_train).to(torch.float64).pow(2).sum())
    _, f_ntk = infinite["gd"](
        steps,
        fx_train_0=f0_train.to(torch.float64),
        fx_test_0=f0_test.to(torch.float64),
        k_test_train=infinite["ntk_test_train"],
    )
    return {
        "width": width,
        "replicate": replicate,
        "net_seed": net_seed,
        "accuracy": accuracy(f_test, data.labels_test),
        "ntk_accuracy": accuracy(f_ntk, data.labels_test),
        "distance": relative_distance(f_test, f_ntk),
        "distance_to_ntk_mean": relative_distance(f_test, infinite["ntk_gd_mean"]),
        "distance_to_ensemble_mean": relative_distance(
            f_test, infinite["ensemble_mean_at_steps"]),
        "train_loss": final_loss,
        "test_loss": 0.5 * float((f_test.to(torch.float64) - torch.as_tensor(data.y_test))
                                 .pow(2).sum(dim=1).mean()),
        "seconds": time.perf_counter() - start,
    }


def network_seed(seed: int, width: int, replicate: int = 0) -> int:
    """The seed of the parameters of network ``replicate`` of ``width`` under ``seed``.

    Replicate 0 keeps :func:`~widenets.apps.common.twin_seed` (the single network of
    earlier versions); the others draw from ``SeedSequence([seed, width, replicate])``.
    """
    if replicate == 0:
        return twin_seed(seed, width)
    return int(np.random.SeedSequence([seed, width, replicate]).generate_state(1)[0])


def fit_slope(widths: Sequence[int], distances: Sequence[float]) -> float | None:
    """Least-squares slope of ``log(distance)`` against ``log(width)`` (``None`` if < 2)."""
    if len(set(widths)) < 2:
        return None
    slope, _ = np.polyfit(np.log(widths), np.log(distances), 1)
    return float(slope)


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for a single value)."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def summarize_twins(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per width (in order of first appearance) from :func:`train_twin`'s runs.

    For each quantity ``q`` of ``TWIN_METRICS``: ``q`` is the mean over the width's
    seeds, ``q_std`` the sample standard deviation (``ddof=1``; 0.0 for one seed) and
    ``q_sem`` the standard error ``q_std / sqrt(seeds)``; ``per_seed[q]`` holds the
    values themselves, in the order of ``replicates``. Also ``width``, ``seeds``
    (the number of networks), ``replicates``, ``net_seeds``, ``seconds`` (summed) and
    ``local_slope``: the slope of log(mean distance) from the previous width (``None``
    for the first).
    """
    by_width: dict[int, list[dict[str, Any]]] = {}
    for run in runs:
        by_width.setdefault(int(run["width"]), []).append(run)
    twins: list[dict[str, Any]] = []
    for width, group in by_width.items():
        twin: dict[str, Any] = {
            "width": width,
            "seeds": len(group),
            "replicates": [int(r.get("replicate", i)) for i, r in enumerate(group)],
            "net_seeds": [r.get("net_seed") for r in group],
            "seconds": float(sum(r["seconds"] for r in group)),
            "per_seed": {},
        }
        for key in TWIN_METRICS:
            values = [float(r[key]) for r in group]
            mean, std = mean_and_std(values)
            twin["per_seed"][key] = values
            twin[key], twin[f"{key}_std"] = mean, std
            twin[f"{key}_sem"] = std / math.sqrt(len(values))
        previous = twins[-1] if twins else None
        twin["local_slope"] = (
            None if previous is None
            else fit_slope([previous["width"], width], [previous["distance"], twin["distance"]])
        )
        twins.append(twin)
    return twins


def per_seed_slopes(runs: Sequence[dict[str, Any]]) -> list[float]:
    """The slope fitted to each replicate's networks alone (one per width), as a
    demo with one network per width would report it; replicates that lack a width
    are left out, and there are none with fewer than two widths."""
    widths = sorted({int(r["width"]) for r in runs})
    if len(widths) < 2:
        return []
    by_replicate: dict[int, dict[int, float]] = {}
    for run in runs:
        by_replicate.setdefault(int(run.get("replicate", 0)), {})[int(run["width"])] = float(
            run["distance"])
    slopes = []
    for _, distances in sorted(by_replicate.items()):
        if sorted(distances) == widths:
            slope = fit_slope(widths, [distances[w] for w in widths])
            if slope is not None:
                slopes.append(slope)
    return slopes


def _pm(mean: float, std: float, digits: int = 4) -> str:
    """``mean ± std`` with ``digits`` decimals."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _slope_text(results: dict[str, Any]) -> str:
    """The report's paragraph on the fitted slope and its spread over the seeds."""
    slope = results["slope"]
    if slope is None:
        return "Only one width: no slope fitted."
    n_widths = len(results["twins"])
    text = (
        "Fitted slope of log(distance) against log(width), least squares through the "
        f"{n_widths} per-width means of the distance: **{slope:.2f}** (theory: -0.5, "
        "i.e. distance ~ 1/sqrt(width))."
    )
    slopes = results.get("slope_per_seed") or []
    if len(slopes) > 1:
        mean, std = mean_and_std(slopes)
        text += (
            " Fitted to each seed's networks alone (one network per width, as a demo "
            f"with a single seed reports it): {', '.join(f'{s:.3f}' for s in slopes)}; "
            f"mean {mean:.3f} ± {std:.3f} (one standard deviation over the "
            f"{len(slopes)} seeds; range {min(slopes):.3f} to {max(slopes):.3f})."
        )
    return text


def write_report(path: str | Path, results: dict[str, Any]) -> Path:
    """Write the Markdown report of :func:`run_demo`'s ``results`` to ``path``."""
    path = Path(path)
    s = results["settings"]
    steps = s["steps"]
    n_seeds = int(s.get("seeds", 1))
    lines = [
        "# widenets demo: infinite and finite ReLU networks on digits",
        "",
        f"widenets {s['widenets_version']}, torch {s['torch_version']}, "
        f"Python {s['python_version']}, torch threads: {s['threads']}. "
        f"Total time {results['total_seconds']:.1f} s.",
        "",
        "## Infinite network",
        "",
    ]
    lines += _format_table(
        ["prediction", "test accuracy"],
        [
            ["NNGP posterior mean (Bayesian network)", f"{results['nngp_accuracy']:.4f}"],
            ["NTK posterior mean (gradient descent to convergence, f0 = 0)",
             f"{results['ntk_accuracy']:.4f}"],
            [f"NTK mean after {steps} steps (f0 = 0)",
             f"{results['ntk_gd_mean_accuracy']:.4f}"],
        ],
    )
    twin_time = steps * results["learning_rate"]
    lines += [
        "",
        "## Infinite network trained for a time t (NTK ensemble)",
        "",
        "Mean and covariance over initialisations of the infinite network trained by "
        "gradient flow on `1/2 sum (f - y)^2` (`widenets.predict."
        "gradient_descent_mse_ensemble`, NTK, same `diag_reg` as the NTK posterior, so "
        "t = inf is that posterior). At rate 1 a time t is about t / lr steps of size lr: "
        f"the twins train for t = {steps} x lr = {twin_time:.4g}. The expected losses "
        "(`widenets.plot.expected_losses`) are `1/2 (||mean - y||^2 + 10 trace(cov))` per "
        "point; the spread is the expected relative distance "
        "`sqrt(E||f - mean||^2) / ||mean||` of one trained network from the mean.",
        "",
    ]
    lines += _format_table(
        ["t", "steps at lr", "test accuracy of the mean", "test MSE of the mean",
         "expected test loss per point", "expected train loss per point",
         "spread of one network"],
        [
            ["inf" if math.isinf(row["t"]) else f"{row['t']:.4g}",
             "inf" if math.isinf(row["steps"]) else
             f"{row['steps']:.0f}" + (" (the twins)" if row["t"] == twin_time else ""),
             f"{row['accuracy']:.4f}", f"{row['mse']:.4f}", f"{row['test_loss']:.4f}",
             f"{row['train_loss']:.4f}", f"{row['spread']:.3f}"]
            for row in results["ensemble"]
        ],
    )
    lines += [
        "",
        "Test MSE: mean over test points and outputs of `(mean - y)^2`. The right panel "
        "of `demo.png` shows the expected losses against t, with the twins' test losses.",
    ]
    cnn = results["cnn"]
    lines += [
        "",
        f"## Infinite convolutional network (CNN-GAP), {cnn['n_train']} training and "
        f"{cnn['n_test']} test images",
        "",
    ]
    lines += _format_table(
        ["prediction", "test accuracy"],
        [["NNGP posterior mean", f"{cnn['nngp_accuracy']:.4f}"],
         ["NTK posterior mean", f"{cnn['ntk_accuracy']:.4f}"]],
    )
    lines += [
        "",
        f"Architecture: `{CNN_ARCHITECTURE_TEXT}` on the images as `(N, 1, 8, 8)` (same "
        "preprocessing), the first images of the same split. Its kernels carry the "
        "covariance of every pair of pixel positions of two images (pooling needs it), "
        f"so they cost far more per pair than the fully connected ones "
        f"({cnn['seconds']:.1f} s here).",
        "",
        f"## Finite twins after {steps} steps of full-batch gradient descent",
        "",
        f"{n_seeds} independently initialised network{'s' if n_seeds > 1 else ''} per "
        "width, all on the same data split. Each entry is the mean over the seeds "
        + ("± one sample standard deviation over the seeds (ddof = 1; the standard "
           f"error of the mean is that divided by sqrt({n_seeds}))"
           if n_seeds > 1 else "(one seed: no spread)")
        + "; the values of every network follow in the next table.",
        "",
    ]
    lines += _format_table(
        ["width", "networks", "test accuracy", "NTK prediction accuracy (same f0)",
         "distance to NTK prediction", "slope from previous width (means)",
         "distance to NTK mean (f0 = 0)", "distance to ensemble mean",
         "train loss", "test loss per point", "time (s, all networks)"],
        [
            [str(t["width"]), str(t["seeds"]),
             _pm(t["accuracy"], t["accuracy_std"]),
             _pm(t["ntk_accuracy"], t["ntk_accuracy_std"]),
             _pm(t["distance"], t["distance_std"]),
             "" if t.get("local_slope") is None else f"{t['local_slope']:.2f}",
             _pm(t["distance_to_ntk_mean"], t["distance_to_ntk_mean_std"]),
             _pm(t["distance_to_ensemble_mean"], t["distance_to_ensemble_mean_std"]),
             f"{t['train_loss']:.3g} ± {t['train_loss_std']:.2g}",
             _pm(t["test_loss"], t["test_loss_std"]), f"{t['seconds']:.1f}"]
            for t in results["twins"]
        ],
    )
    lines += [
        "",
        "### Every network",
        "",
        "Seed: the number of the network within its width (0, 1, ...); parameter seed: "
        "the seed of its `torch.Generator` (`widenets.apps.demo.network_seed`).",
        "",
    ]
    lines += _format_table(
        ["width", "seed", "parameter seed", "test accuracy",
         "NTK prediction accuracy (same f0)", "distance to NTK prediction",
         "distance to NTK mean (f0 = 0)", "distance to ensemble mean", "train loss",
         "test loss per point", "time (s)"],
        [
            [str(r["width"]), str(r.get("replicate", 0)), str(r.get("net_seed", "")),
             f"{r['accuracy']:.4f}", f"{r['ntk_accuracy']:.4f}", f"{r['distance']:.4f}",
             f"{r['distance_to_ntk_mean']:.4f}", f"{r['distance_to_ensemble_mean']:.4f}",
             f"{r['train_loss']:.3g}", f"{r['test_loss']:.4f}", f"{r['seconds']:.1f}"]
            for r in results.get("runs", results["twins"])
        ],
    )
    at_twins = results["ensemble_at_twins"]
    lines += [
        "",
        f"At the twins' time t = {twin_time:.4g} the ensemble expects one network at a "
        f"relative distance **{at_twins['spread']:.4f}** from its mean, and a test loss of "
        f"{at_twins['test_loss']:.4f} per point: a finite network's distance to the "
        "ensemble mean does not fall with width, it approaches that spread (its random "
        "`f0` is a draw from the prior that training removes only partly), and its test "
        "loss scatters around the expected one. 'Distance to NTK mean' uses the "
        "discrete steps (`gradient_descent_mse`), 'distance to ensemble mean' the "
        "gradient flow at the same time; they agree to a few 1e-4.",
        "",
        "Distance: `||f_net(X_test) - f_ntk(X_test)|| / ||f_ntk(X_test)||` over all test "
        "points and outputs, where `f_ntk` is the linearized infinite network (the NTK "
        "dynamics of `widenets.predict.gradient_descent_mse`, `discrete=True`) trained "
        f"for the same {steps} steps at the same learning rate from the finite network's "
        "own initial outputs `f0(X_train)`, `f0(X_test)`.",
        "",
        _slope_text(results),
        "",
        "## Settings",
        "",
        f"- Data: scikit-learn digits, {s['n_train']} training and {s['n_test']} test "
        f"images (random split, seed {s['seed']}). Pixels / 16, each feature centred by "
        "its training mean, each image scaled to norm sqrt(64) = 8. Targets: one-hot "
        "minus 0.1 (10 outputs); prediction = largest output.",
        f"- Architecture: `{s['architecture']}` in NTK parameterization; the same "
        "description gives the infinite kernels and (with the width written in the "
        "hidden layers) the finite twins.",
        f"- Posteriors: `gp_inference` with `diag_reg` = {DIAG_REG_FRACTION:g} x the kernel "
        f"diagonal (NNGP {results['nngp_diag_reg']:.3g}, NTK {results['ntk_diag_reg']:.3g}).",
        f"- Training: loss `1/2 sum (f - y)^2` over training points and outputs, "
        f"{steps} full-batch steps `theta <- theta - lr grad L`, learning rate "
        f"lr = {LR_FRACTION:g} / lambda_max = {results['learning_rate']:.4g}, where "
        f"lambda_max = {results['lambda_max']:.4g} is the largest eigenvalue of the "
        "training NTK (gradient descent is stable up to 2 / lambda_max; half of it "
        "leaves room for the fluctuations of a finite network's NTK). The smallest "
        f"eigenvalue is {results['lambda_min']:.3g}, so the slowest directions are still "
        "far from converged after these steps: that is early stopping, the same for "
        "networks and NTK.",
        f"- Finite twins: widths {', '.join(str(w) for w in s['widths'])}, {n_seeds} "
        f"network{'s' if n_seeds > 1 else ''} per width, parameters drawn "
        "from `torch.Generator` seeded by (seed, width, network), trained in "
        f"{s['dtype']}; outputs compared in float64.",
        "",
        "## Notes",
        "",
        "- Why compare with the NTK prediction from the same initial outputs: a network's "
        "initial function `f0` is a draw from the NNGP prior whose size does not shrink "
        "with width, and gradient descent removes it only along the directions it has "
        "trained. The limit theorem (Lee et al. 2019) says the *trajectory* of a wide "
        "network approaches that of its linearization from its own `f0`; the column "
        "'distance to NTK mean (f0 = 0)' shows that comparing with the f0-free mean "
        "does not shrink with width.",
        f"- The read-out layer has `W_std = {READOUT_W_STD}` (hidden layers "
        f"{HIDDEN_W_STD}): it keeps the random initial function (prior standard deviation "
        f"{math.sqrt(results['nngp_diag']):.2f} per output, about "
        f"{HIDDEN_W_STD / READOUT_W_STD:g} times less than with a read-out "
        f"W_std = {HIDDEN_W_STD}) small next to the targets, so that "
        "after a few hundred steps the trained networks classify well.",
        "- The slope is flatter than -1/2 at small widths and after long training: there "
        "the network is far from its linearization and the distance saturates (the two "
        "predictions fit the same targets, so their gap stays of order one); the -1/2 "
        "law is the large-width asymptote, reached sooner with fewer steps.",
        "- The posterior accuracies use the exact kernels; the finite columns vary with "
        f"the network's initialisation: the tables give their mean and spread over "
        f"{n_seeds} seed{'s' if n_seeds > 1 else ''} per width, and every network.",
        "- The NNGP and NTK between the training and test sets are computed once, both "
        "together, and serve the posteriors, the ensemble and the twins' predictions "
        "(`KernelCache`, a kernel function for `widenets.predict`).",
        "",
        "## Timings",
        "",
    ]
    lines += _format_table(
        ["phase", "seconds"],
        [[name, f"{sec:.2f}"] for name, sec in results["timings"].items()],
    )
    lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _spread_text(n_seeds: int) -> str:
    """How the figure's error bars are computed, for ``n_seeds`` seeds per width."""
    if n_seeds > 1:
        return f"mean ± 1 sd, {n_seeds} seeds"
    return "one seed, no error bar"


def make_figure(results: dict[str, Any]) -> Figure:
    """The three-panel figure of :func:`run_demo`'s ``results`` (see :func:`plot`).

    Every legend entry names something drawn in view with a visible line or marker;
    error bars are one sample standard deviation over the seeds of each width.
    """
    require(("sklearn", "matplotlib"), "the demo")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullLocator

    from ..plot import plot_expected_losses

    twins = results["twins"]
    settings = results["settings"]
    steps = settings["steps"]
    n_seeds = int(settings.get("seeds", 1))
    spread = _spread_text(n_seeds)
    widths = np.array([t["width"] for t in twins], dtype=float)

    def std_of(twin: dict[str, Any], key: str) -> float:
        return float(twin.get(f"{key}_std", 0.0))

    def per_seed(twin: dict[str, Any], key: str) -> list[float]:
        return list(twin.get("per_seed", {}).get(key, [twin[key]]))

    fig = Figure(figsize=(16, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    acc_ax, dist_ax, losses_ax = fig.subplots(1, 3, width_ratios=(1.0, 1.0, 0.95))

    # Left: accuracies; bars from zero, the twins' bars are means over their seeds.
    labels = ["NNGP\nposterior", "NTK\nposterior", f"NTK mean\n{steps} steps"]
    values = [results["nngp_accuracy"], results["ntk_accuracy"],
              results["ntk_gd_mean_accuracy"]]
    colors = ["tab:blue", "tab:orange", "tab:green"]
    for t in twins:
        labels.append(f"width\n{t['width']}")
        values.append(t["accuracy"])
        colors.append("tab:gray")
    positions = np.arange(len(values), dtype=float)
    bars = acc_ax.bar(positions, values, color=colors)
    twin_positions = positions[3:]
    acc_ax.errorbar(twin_positions, [t["accuracy"] for t in twins],
                    yerr=[std_of(t, "accuracy") for t in twins], fmt="none", ecolor="black",
                    elinewidth=1.5, capsize=5, zorder=4,
                    label=f"finite twins: bar = {spread}")
    offsets = np.linspace(-0.22, 0.22, n_seeds) if n_seeds > 1 else np.zeros(1)
    for i, t in enumerate(twins):
        seeds_acc = per_seed(t, "accuracy")
        acc_ax.scatter(twin_positions[i] + offsets[:len(seeds_acc)], seeds_acc, s=12,
                       color="white", edgecolors="black", linewidths=0.8, zorder=5,
                       label="one network (one seed)" if i == 0 else None)
    acc_ax.scatter(twin_positions, [t["ntk_accuracy"] for t in twins], marker="_", s=500,
                   linewidths=2.0, color="tab:red", zorder=3,
                   label="NTK prediction from the same f0 (mean over seeds)")
    acc_ax.set_xticks(positions, labels, fontsize=8)
    # Bars start at zero so that their heights compare honestly; the space above 1
    # holds the legend.
    acc_ax.set_ylim(0.0, 1.3)
    acc_ax.set_yticks(np.linspace(0.0, 1.0, 6))
    for rect, value in zip(bars, values, strict=True):
        acc_ax.annotate(f"{value:.3f}", (rect.get_x() + rect.get_width() / 2, 0.0),
                        xytext=(0, 3), textcoords="offset points", ha="center",
                        va="bottom", fontsize=8, color="white")
    acc_ax.set_ylabel(f"test accuracy (fraction of {settings['n_test']} test digits)")
    acc_ax.set_xlabel("infinite network (colours); finite twins by hidden width (grey)",
                      fontsize=9)
    acc_ax.set_title("Digits: infinite network vs finite twins", fontsize=10)
    acc_ax.legend(fontsize=7.5, loc="upper right")

    # Middle: distance to the NTK prediction against width, log-log.
    distances = np.array([t["distance"] for t in twins])
    for i, t in enumerate(twins):
        seeds_d = per_seed(t, "distance")
        dist_ax.scatter([t["width"]] * len(seeds_d), seeds_d, s=14, color="tab:red",
                        alpha=0.45, linewidths=0, zorder=3,
                        label="one network (one seed)" if i == 0 else None)
    dist_ax.errorbar(widths, distances, yerr=[std_of(t, "distance") for t in twins],
                     fmt="o-", color="tab:red", capsize=4, zorder=4,
                     label=f"to the NTK prediction, same f0 ({spread})")
    dist_ax.errorbar(widths, [t["distance_to_ntk_mean"] for t in twins],
                     yerr=[std_of(t, "distance_to_ntk_mean") for t in twins], fmt="s--",
                     color="tab:gray", capsize=4, label=f"to the NTK mean, f0 = 0 ({spread})")
    slope = results["slope"]
    if slope is not None:
        coefficients = np.polyfit(np.log(widths), np.log(distances), 1)
        dist_ax.plot(widths, np.exp(np.polyval(coefficients, np.log(widths))), "-",
                     color="tab:red", linewidth=1.0, alpha=0.6,
                     label=f"least-squares fit to the means, slope {slope:.2f}")
    guide = distances[0] * np.sqrt(widths[0] / widths)
    dist_ax.plot(widths, guide, ":", color="black", label="slope -1/2 (theory)")
    title = "Distance to the NTK prediction (test set)"
    slopes = results.get("slope_per_seed") or []
    if slope is not None:
        title += f"\nfitted slope {slope:.2f}"
        if len(slopes) > 1:
            mean, std = mean_and_std(slopes)
            title += f"; per-seed fits {mean:.2f} ± {std:.2f} (sd, {len(slopes)} seeds)"
    dist_ax.set_title(title, fontsize=10)
    dist_ax.set_xscale("log")
    dist_ax.set_yscale("log")
    dist_ax.set_xlabel("hidden width (units per hidden layer, log scale)")
    dist_ax.set_ylabel("relative distance ||f_net - f|| / ||f|| on the test set\n"
                       "(dimensionless, log scale)")
    for width, distance in zip(widths, distances, strict=True):
        dist_ax.annotate(f"{distance:.3f}", (width, distance), xytext=(7, 2),
                         textcoords="offset points", fontsize=8, color="tab:red")
    dist_ax.set_xticks(widths, [str(int(w)) for w in widths])
    dist_ax.set_xlim(widths.min() / 1.4, widths.max() * 1.6)
    dist_ax.xaxis.set_minor_locator(NullLocator())
    dist_ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    dist_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    dist_ax.yaxis.set_minor_locator(NullLocator())
    # Room below the points for the legend (the distances fall to the lower right).
    y_low, y_high = dist_ax.get_ylim()
    dist_ax.set_ylim(y_low / 2.5, y_high)
    dist_ax.legend(fontsize=7.5, loc="lower left")

    # Right: the ensemble's expected losses over time, with the twins' test losses.
    plot_expected_losses(results["losses"], ax=losses_ax, per_point=True)
    twin_time = steps * results["learning_rate"]
    losses_ax.axvline(twin_time, color="black", linestyle=":", linewidth=1.2,
                      label=f"{steps} steps (the twins)")
    test_losses = np.array([t["test_loss"] for t in twins])
    test_stds = np.array([std_of(t, "test_loss") for t in twins])
    losses_ax.errorbar([twin_time] * len(twins), test_losses, yerr=test_stds, fmt="x",
                       color="dimgray", capsize=3, zorder=4,
                       label=f"twins' test loss, {spread}")
    for i, t in enumerate(twins):  # labels alternately right and left of the markers
        losses_ax.annotate(str(t["width"]), (twin_time, t["test_loss"]),
                           xytext=(9 if i % 2 == 0 else -9, -3), textcoords="offset points",
                           ha="left" if i % 2 == 0 else "right", fontsize=7, color="dimgray")
    # The training loss falls towards zero: show the range of the test loss.
    test = results["losses"].test / results["losses"].n_test
    low = min(float(test.min()), float((test_losses - test_stds).min()))
    low = low if low > 0 else float(test_losses.min())
    losses_ax.set_ylim(0.5 * low, 2.0 * max(float(test.max()),
                                             float((test_losses + test_stds).max())))
    scale_text = {"symlog": "symmetric log scale, linear near 0", "log": "log scale"}.get(
        losses_ax.get_xscale(), "linear scale")
    losses_ax.set_xlabel(f"training time t = steps × lr, gradient flow\n({scale_text})")
    losses_ax.set_ylabel("E[1/2 Σ (f − y)²] per point\n"
                         f"(dimensionless, {losses_ax.get_yscale()} scale)")
    losses_ax.set_title("NTK ensemble: expected loss per point", fontsize=10)
    _legend_in_view(losses_ax, fontsize=7.5, loc="upper right")
    return fig


def _legend_in_view(ax: Any, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` without the lines drawn entirely outside the view (such as
    a horizontal line below the y range): a legend entry for them would show nothing."""
    from matplotlib.lines import Line2D

    box = ax.get_window_extent()
    handles, labels = [], []
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
        if isinstance(handle, Line2D):
            points = np.column_stack([np.asarray(handle.get_xdata(), dtype=float),
                                      np.asarray(handle.get_ydata(), dtype=float)])
            xy = handle.get_transform().transform(points)  # display coordinates
            inside = ((xy[:, 0] >= box.x0 - 0.5) & (xy[:, 0] <= box.x1 + 0.5)
                      & (xy[:, 1] >= box.y0 - 0.5) & (xy[:, 1] <= box.y1 + 0.5))
            if not inside.any():
                continue
        handles.append(handle)
        labels.append(label)
    ax.legend(handles, labels, **kwargs)


def plot(path: str | Path, results: dict[str, Any]) -> Path:
    """Save the three-panel figure of :func:`run_demo`'s ``results`` as a PNG at ``path``.

    Left: test accuracies of the infinite network and the finite twins (bars from 0;
    the twins' bars are the means over their seeds, with error bars of one standard
    deviation and a dot per network). Middle: the distance to the NTK prediction
    against width on log-log axes, mean ± one standard deviation over the seeds, each
    network as a dot, the least-squares fit to the means and a slope -1/2 guide, and the
    (non-shrinking) distance to the f0-free NTK mean. Right: the NTK ensemble's
    expected train and test loss per point against training time
    (:func:`~widenets.plot.plot_expected_losses`), with the twins' test losses at
    their training time. The figure itself is :func:`make_figure`.
    """
    path = Path(path)
    make_figure(results).savefig(path, dpi=120)
    return path


def _time_text(row: dict[str, float]) -> str:
    """``t = 1.26 (300 steps)`` or ``t = inf`` for a row of the ensemble table."""
    if math.isinf(row["t"]):
        return "t = inf"
    return f"t = {row['t']:.3g} ({row['steps']:.0f} steps)"


def summary(results: dict[str, Any]) -> list[str]:
    """A few lines summarising :func:`run_demo`'s ``results`` (printed by the CLI)."""
    s = results["settings"]
    lines = [
        f"digits: {s['n_train']} train / {s['n_test']} test images, "
        f"{s['steps']} gradient-descent steps, lr = {results['learning_rate']:.3g}",
        f"infinite network: NNGP posterior accuracy {results['nngp_accuracy']:.4f}, "
        f"NTK posterior accuracy {results['ntk_accuracy']:.4f}, "
        f"NTK mean after {s['steps']} steps {results['ntk_gd_mean_accuracy']:.4f}",
        "NTK ensemble mean accuracy over training time: "
        + ", ".join(f"{_time_text(r)} {r['accuracy']:.4f}" for r in results["ensemble"]),
        f"infinite CNN-GAP ({results['cnn']['n_train']} train / {results['cnn']['n_test']} "
        f"test images): NNGP posterior accuracy {results['cnn']['nngp_accuracy']:.4f}, "
        f"NTK posterior accuracy {results['cnn']['ntk_accuracy']:.4f}",
    ]
    n_seeds = int(s.get("seeds", 1))
    if n_seeds > 1:
        lines.append(f"finite twins: mean ± one standard deviation over {n_seeds} seeds "
                     "per width")
    for t in results["twins"]:
        lines.append(
            f"width {t['width']:>5}: accuracy {_pm(t['accuracy'], t['accuracy_std'])} "
            f"(NTK prediction {t['ntk_accuracy']:.4f}), "
            f"distance to NTK prediction {_pm(t['distance'], t['distance_std'])}, "
            f"to ensemble mean {t['distance_to_ensemble_mean']:.4f}"
        )
    if results["slope"] is not None:
        line = f"distance ~ width^{results['slope']:.2f} (fit to the per-width means"
        slopes = results.get("slope_per_seed") or []
        if len(slopes) > 1:
            mean, std = mean_and_std(slopes)
            line += f"; per seed {mean:.2f} ± {std:.2f}"
        lines.append(line + "; theory: width^-0.5)")
    at_twins = results["ensemble_at_twins"]
    lines.append(f"distance to ensemble mean -> its expected spread {at_twins['spread']:.4f} "
                 f"at {_time_text(at_twins)}")
    lines.append(f"total time {results['total_seconds']:.1f} s")
    return lines


def run_demo(
    out_dir: str | Path = "widenets-demo",
    widths: Sequence[int] = DEFAULT_WIDTHS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    progress: bool = True,
    n_train: int = DEFAULT_N_TRAIN,
    n_test: int | None = None,
    dtype: torch.dtype = torch.float32,
    cnn_n_train: int = DEFAULT_CNN_N_TRAIN,
    cnn_n_test: int = DEFAULT_CNN_N_TEST,
    seeds: int = DEFAULT_SEEDS,
) -> dict[str, Any]:
    """Run the demo and write ``report.md`` and ``demo.png`` into ``out_dir``.

    Args:
        out_dir: output folder (created if needed).
        widths: hidden widths of the finite twins (positive integers).
        steps: full-batch gradient-descent steps (positive integer).
        seed: seed of the train/test split and of the twins' parameters.
        progress: show tqdm progress bars (on stderr).
        n_train, n_test: split sizes (``n_test=None``: all remaining digits).
        dtype: dtype of the finite twins during training (float32 or float64).
        cnn_n_train, cnn_n_test: images for the convolutional network (the first ones
            of the split; at most the split's sizes).
        seeds: independently initialised networks per width (positive integer), all on
            the same split; their parameters come from :func:`network_seed`.

    Returns:
        A dict with ``nngp_accuracy``, ``ntk_accuracy``, ``ntk_gd_mean_accuracy``,
        ``ensemble`` (the NTK ensemble's mean accuracy, MSE, expected losses and spread
        at a few times, see :func:`infinite_predictions`), ``ensemble_at_twins``,
        ``losses`` (:class:`~widenets.plot.ExpectedLosses` over the time grid),
        ``learning_rate``, ``lambda_max``, ``runs`` (one dict per width and seed, see
        :func:`train_twin`), ``twins`` (one dict per width: means, standard deviations
        and per-seed values over its seeds, see :func:`summarize_twins`), ``slope`` (of
        log mean distance against log width: fitted to the per-width means),
        ``slope_per_seed`` (the slope of each seed's networks alone, see
        :func:`per_seed_slopes`), ``slope_std`` (their standard deviation, ``None``
        with fewer than two),
        ``cnn`` (see :func:`convolutional_predictions`), ``settings``, ``timings``,
        ``total_seconds`` and the paths ``report`` and ``plot``.
    """
    total_start = time.perf_counter()
    widths = tuple(widths)
    if not widths or not all(
        isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w > 0 for w in widths
    ):
        raise ValueError(f"widths must be positive integers, got {widths!r}")
    widths = tuple(dict.fromkeys(int(w) for w in widths))  # each width once, in order
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(seeds, (int, np.integer)) or isinstance(seeds, bool) or seeds < 1:
        raise ValueError(f"seeds must be a positive integer, got {seeds!r}")
    seeds = int(seeds)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    for value, name in ((cnn_n_train, "cnn_n_train"), (cnn_n_test, "cnn_n_test")):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    require(("sklearn", "matplotlib"), "the demo")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    data = load_digits(n_train, n_test, seed)
    timings = {"load data": time.perf_counter() - start}

    infinite = infinite_predictions(data, steps, progress=progress)
    timings.update(infinite["timings"])
    cnn = convolutional_predictions(data, cnn_n_train, cnn_n_test, progress=progress)
    timings["CNN-GAP posteriors"] = cnn["seconds"]

    runs: list[dict[str, Any]] = []
    for width in widths:
        for replicate in range(seeds):
            runs.append(train_twin(width, data, infinite, steps, seed=seed, dtype=dtype,
                                   progress=progress, replicate=replicate))
    twins = summarize_twins(runs)
    for twin in twins:
        timings[f"train width {twin['width']} ({twin['seeds']} networks)"] = twin["seconds"]
    slopes = per_seed_slopes(runs)

    results: dict[str, Any] = {
        "settings": {
            "widths": widths,
            "steps": steps,
            "seed": seed,
            "seeds": seeds,
            "n_train": len(data.labels_train),
            "n_test": len(data.labels_test),
            "dtype": str(dtype).replace("torch.", ""),
            "architecture": ARCHITECTURE_TEXT,
            "threads": torch.get_num_threads(),
            "widenets_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
        },
        "nngp_accuracy": infinite["nngp_accuracy"],
        "ntk_accuracy": infinite["ntk_accuracy"],
        "ntk_gd_mean_accuracy": infinite["ntk_gd_mean_accuracy"],
        "ensemble": infinite["ensemble"],
        "ensemble_at_twins": infinite["ensemble_at_twins"],
        "losses": infinite["losses"],
        "nngp_diag_reg": infinite["nngp_diag_reg"],
        "ntk_diag_reg": infinite["ntk_diag_reg"],
        "learning_rate": infinite["learning_rate"],
        "lambda_max": infinite["lambda_max"],
        "lambda_min": infinite["lambda_min"],
        "runs": runs,
        "twins": twins,
        "cnn": cnn,
        "nngp_diag": infinite["nngp_diag"],
        "slope": fit_slope([t["width"] for t in twins], [t["distance"] for t in twins]),
        "slope_per_seed": slopes,
        "slope_std": mean_and_std(slopes)[1] if len(slopes) > 1 else None,
        "timings": timings,
    }

    start = time.perf_counter()
    results["plot"] = str(plot(out / "demo.png", results))
    timings["plot"] = time.perf_counter() - start
    results["total_seconds"] = time.perf_counter() - total_start
    results["report"] = str(write_report(out / "report.md", results))
    return results
