"""Finite networks trained by gradient descent against the infinitely wide network.

Finite twins of one architecture (NTK parameterization) are trained by full-batch
gradient descent, ``theta <- theta - lr grad L`` with ``L = 1/2 sum (f - y)^2``, at
several widths. The library's time ``t`` counts such steps: gradient flow at rate ``lr``
for a time ``t`` is ``t`` steps of size ``lr`` (exactly so for ``discrete=True``, and
up to the discretisation error of steps of ``0.25 / lambda_max`` for the flow).

Left: the test loss of the finite networks (mean and std over networks) against the
expected test loss of the NTK ensemble (``wn.predict.gradient_descent_mse_ensemble``:
``|mean - y|^2 + var``, averaged over test points). Right: each network against the
infinitely wide network started from the same initial outputs
(``wn.predict.gradient_descent_mse`` with the infinite NTK, ``discrete=True``), whose
average over initialisations is the ensemble: the distance shrinks as the width grows.

Run:  python examples/training_vs_ntk.py [--out DIR] [--quick] [--seed N]
Writes DIR/training_vs_ntk.png (default DIR: example-output).
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


def architecture(width: int) -> wn.Sequential:
    return wn.Sequential(wn.Linear(width, W_std=1.5, b_std=0.05), wn.ReLU(),
                         wn.Linear(1, W_std=1.0, b_std=0.05))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    widths, n_nets, steps = ([16, 128, 1024], 6, 150) if args.quick else \
        ([16, 64, 256, 1024, 4096], 16, 400)

    rng = np.random.default_rng(args.seed)
    x = torch.from_numpy(rng.normal(size=(120, 4)))  # 20 training, 100 test inputs
    y = 2 * torch.sin(x.sum(1) / 2)
    x_train, y_train, x_test, y_test = x[:20], y[:20], x[20:], y[20:]
    net = architecture(1)  # the width does not enter the infinite-width kernels
    ntk_train = net.kernel(x_train, get="ntk")
    ntk_test_train = net.kernel(x_test, x_train, get="ntk")
    lr = 0.25 / float(torch.linalg.eigvalsh(ntk_train)[-1])
    times = torch.arange(steps + 1, dtype=torch.float64)  # t = number of steps

    ensemble = wn.predict.gradient_descent_mse_ensemble(net, x_train, y_train, lr)
    mean, cov = ensemble(x_test, t=times, get="ntk")
    infinite_loss = ((mean - y_test) ** 2).mean(1) + cov.diagonal(dim1=1, dim2=2).mean(1)
    linear = wn.predict.gradient_descent_mse(ntk_train, y_train, lr, discrete=True)

    generator = torch.Generator().manual_seed(args.seed)
    losses, distances = {}, {}
    for width in widths:
        losses[width], distances[width] = [], []
        for _ in range(n_nets):
            model = architecture(width).build((4,), generator, dtype=torch.float64)
            outputs = []  # f(x) after 0, 1, ..., steps steps
            for step in range(steps + 1):
                f = model(x)[:, 0]
                outputs.append(f.detach())
                if step == steps:
                    break
                loss = 0.5 * ((f[:20] - y_train) ** 2).sum()
                grads = torch.autograd.grad(loss, list(model.parameters()))
                with torch.no_grad():
                    for p, g in zip(model.parameters(), grads):
                        p.sub_(lr * g)
            f_test = torch.stack(outputs)[:, 20:]
            # The infinitely wide network trained from this network's initial outputs.
            _, f_inf = linear(times, outputs[0][:20], outputs[0][20:], ntk_test_train)
            losses[width].append(((f_test - y_test) ** 2).mean(1))
            distances[width].append((f_test - f_inf).norm(dim=1) / f_inf.norm(dim=1))
        losses[width] = torch.stack(losses[width]).numpy()
        distances[width] = torch.stack(distances[width]).numpy()

    fig, (ax_loss, ax_dist) = plt.subplots(1, 2, figsize=(11, 4.2))
    t = times.numpy()[1:]  # log time axes start at one step
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(widths)))
    for width, color in zip(widths, colors):
        m, s = losses[width].mean(0)[1:], losses[width].std(0)[1:]
        ax_loss.plot(t, m, color=color, label=f"width {width}")
        ax_loss.fill_between(t, m - s, m + s, color=color, alpha=0.15)
        d = distances[width][:, 1:]
        ax_dist.plot(t, d.mean(0), color=color, label=f"width {width}")
        ax_dist.fill_between(t, d.min(0), d.max(0), color=color, alpha=0.15)
    ax_loss.plot(t, infinite_loss.numpy()[1:], "k--", lw=2, label="NTK ensemble (infinite)")
    ax_loss.set(xscale="log", xlabel="t = gradient-descent steps (log scale)",
                ylabel="test MSE", title=f"Test loss: mean +- std over {n_nets} networks")
    ax_loss.set_ylim(bottom=0)
    ax_dist.set(xscale="log", yscale="log", xlabel="t = gradient-descent steps (log scale)",
                ylabel="||f_t - f_t^NTK|| / ||f_t^NTK|| (log scale)",
                title="Distance to the infinite network, same init\n(mean, min-max band)")
    ax_loss.legend(fontsize=8)
    ax_dist.legend(fontsize=8)
    fig.suptitle(f"One hidden ReLU layer, 20 training points, lr = 0.25 / lambda_max "
                 f"= {lr:.3g}")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "training_vs_ntk.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    result = {
        "figure": str(figure), "widths": widths, "learning_rate": lr, "steps": steps,
        "final_loss_infinite": float(infinite_loss[-1]),
        "final_loss_finite": [float(losses[w][:, -1].mean()) for w in widths],
        "final_distance": [float(distances[w][:, -1].mean()) for w in widths],
    }
    slope = np.polyfit(np.log(widths), np.log(result["final_distance"]), 1)[0]
    result["distance_slope"] = float(slope)
    for key, value in result.items():
        print(f"{key}: {np.round(value, 4) if not isinstance(value, str) else value}")
    return result


if __name__ == "__main__":
    main()
