"""1-D regression with an infinitely wide network: NNGP and NTK posteriors.

A handful of noisy samples of ``sin(x)``. The NNGP posterior (Bayesian inference of the
infinitely wide network, ``wn.predict.gp_inference``) and the NTK ensemble (infinitely
wide networks trained by gradient flow to convergence,
``wn.predict.gradient_descent_mse_ensemble``) are drawn as a mean with a +-2 std band,
next to a few finite networks of the same architecture drawn from the prior (its finite
twin, ``net.build``).

Run:  python examples/regression_1d.py [--out DIR] [--quick] [--seed N]
Writes DIR/regression_1d.png (default DIR: example-output).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np
import torch

import widenets as wn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOISE_STD = 0.1
SCALE = 2.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_train, n_grid, n_prior = (8, 200, 3) if args.quick else (10, 400, 5)

    # Two hidden ReLU layers; a large bias keeps 1-D inputs far from parallel.
    net = wn.Sequential(
        wn.Linear(512, W_std=1.4, b_std=1.0), wn.ReLU(),
        wn.Linear(512, W_std=1.4, b_std=1.0), wn.ReLU(),
        wn.Linear(1, W_std=1.0, b_std=0.1),
    )
    rng = np.random.default_rng(args.seed)
    x_train = np.sort(rng.uniform(-3, 3, size=n_train))[:, None]
    y_train = np.sin(x_train[:, 0]) + NOISE_STD * rng.normal(size=n_train)
    x_grid = np.linspace(-5, 5, n_grid)[:, None]
    u_train, u_grid = x_train / SCALE, x_grid / SCALE  # network inputs of order one

    # Both predictions treat the noise variance as a ridge on the training kernel.
    posterior = wn.predict.gp_inference(net, u_train, y_train, diag_reg=NOISE_STD**2)
    ensemble = wn.predict.gradient_descent_mse_ensemble(net, u_train, y_train,
                                                        diag_reg=NOISE_STD**2)
    curves = {"nngp": posterior(u_grid, get="nngp"), "ntk": ensemble(u_grid, t=None, get="ntk")}
    at_train = {"nngp": posterior(u_train, get="nngp"),
                "ntk": ensemble(u_train, t=None, get="ntk")}

    # Finite twins drawn from the prior (untrained), float64.
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        priors = [net.build((1,), generator, dtype=torch.float64)(torch.from_numpy(u_grid))[:, 0]
                  for _ in range(n_prior)]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4), sharey=True)
    titles = {"nngp": "NNGP posterior", "ntk": "NTK ensemble, trained to t = inf"}
    for ax, (key, (mean, cov)), color in zip(axes, curves.items(), ("C0", "C3")):
        mean, std = mean.numpy(), cov.diagonal().clamp_min(0).sqrt().numpy()
        ax.fill_between(x_grid[:, 0], mean - 2 * std, mean + 2 * std, color=color,
                        alpha=0.25, label="mean +- 2 std")
        ax.plot(x_grid[:, 0], mean, color=color, lw=2, label="mean")
        for i, f in enumerate(priors):
            ax.plot(x_grid[:, 0], f, color="grey", lw=0.7,
                    label="finite nets, prior (width 512)" if i == 0 else None)
        ax.plot(x_grid[:, 0], np.sin(x_grid[:, 0]), "k--", lw=1, label="sin(x)")
        ax.plot(x_train[:, 0], y_train, "ko", ms=5, label="training points")
        ax.set(title=titles[key], xlabel=f"x (the network's input is x / {SCALE:g})",
               ylim=(-4, 4))
    axes[0].set_ylabel("f(x)")
    fig.suptitle(f"3-layer ReLU network, infinite width: {n_train} noisy samples of sin(x)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "regression_1d.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    far = np.abs(x_grid[:, 0]) > 4.5  # beyond the training interval [-3, 3]
    result = {"figure": str(figure)}
    for key, (mean, cov) in at_train.items():
        grid_std = curves[key][1].diagonal().clamp_min(0).sqrt().numpy()
        result[f"{key}_train_max_error"] = float(np.abs(mean.numpy() - y_train).max())
        result[f"{key}_train_max_std"] = float(cov.diagonal().clamp_min(0).sqrt().max())
        result[f"{key}_far_min_std"] = float(grid_std[far].min())
    for key, value in result.items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
