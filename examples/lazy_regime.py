"""The lazy regime: wider networks move their weights and their NTK less.

``wn.experiments.lazy_training`` trains finite twins of one architecture (NTK
parameterization, one hidden ReLU layer) at several hidden widths by full-batch gradient
descent on ``L = 1/2 sum (f - y)^2``, each beside its linearization, and records the
relative weight change ``||w_t - w_0|| / ||w_0||``, the relative change of the empirical
NTK ``||T_t - T_0||_F / ||T_0||_F`` and the distance to the linearization. Theory: the
weight change falls like ``width^-1/2`` with one hidden layer; the NTK change at least
as fast (Lee et al. 2019; in practice about ``width^-0.8`` with ReLU). The figure shows
the values after training against the width on log-log axes, with fitted slopes.

Run:  python examples/lazy_regime.py [--out DIR] [--quick] [--seed N]
Writes DIR/lazy_regime.png (default DIR: example-output).
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

QUANTITIES = {  # attribute of the records -> (key of result.slopes, label)
    "weight_changes": ("weight_change", "weight change ||w_t - w_0|| / ||w_0||"),
    "ntk_changes": ("ntk_change", "NTK change ||T_t - T_0|| / ||T_0||"),
    "linearization_distances": ("linearization_distance",
                                "distance to the linearization"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    widths, steps = ([64, 256, 1024], 30) if args.quick else \
        ([64, 128, 256, 512, 1024, 2048, 4096], 100)

    rng = np.random.default_rng(args.seed)
    x = torch.from_numpy(rng.normal(size=(30, 8)))
    y = torch.sin(x[:, :2].sum(1, keepdim=True))  # (30, 1): one output
    # The hidden width written here (1) is replaced by each of `widths`.
    net = wn.Sequential(wn.Linear(1, W_std=1.5, b_std=0.05), wn.ReLU(),
                        wn.Linear(1, W_std=1.0, b_std=0.05))
    lr = 1.0 / float(torch.linalg.eigvalsh(net.kernel(x, get="ntk"))[-1])  # 1 / lambda_max
    result = wn.experiments.lazy_training(net, x, y, widths=widths, steps=steps,
                                          learning_rate=lr, seed=args.seed)

    fig, (ax_loss, ax) = plt.subplots(1, 2, figsize=(11, 4.4),
                                      gridspec_kw={"width_ratios": [1, 1.3]})
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(widths)))
    for record, color in zip(result.records, colors):
        ax_loss.plot(record.losses, color=color, label=f"width {record.width}")
    ax_loss.set(yscale="log", xlabel="gradient-descent step",
                ylabel="training loss 1/2 sum (f - y)^2 (log scale)",
                title=f"Training, lr = 1 / lambda_max = {lr:.3g}")
    ax_loss.legend(fontsize=8)

    w = np.asarray(widths, dtype=float)
    for (attribute, (key, label)), marker in zip(QUANTITIES.items(), "osd"):
        values = np.asarray(result.final(attribute))
        slope = result.slopes[key]
        fit = np.exp(np.polyval(np.polyfit(np.log(w), np.log(values), 1), np.log(w)))
        line, = ax.plot(w, values, marker, label=f"{label}: slope {slope:.2f}")
        ax.plot(w, fit, "-", color=line.get_color(), lw=1)
    guide = result.final("weight_changes")[0] * (w / w[0]) ** -0.5
    ax.plot(w, guide, "k:", lw=1, label="width^-1/2 (guide)")
    ax.set(xscale="log", yscale="log", xlabel="hidden width (log scale)",
           ylabel=f"after {steps} steps (log scale)",
           title="Relative changes during training, fitted log-log slopes")
    ax.set_xticks(widths, [str(v) for v in widths], minor=False)
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=8, loc="lower left")
    fig.suptitle("Lazy training: one hidden ReLU layer, NTK parameterization, "
                 f"{len(x)} random inputs")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "lazy_regime.png"
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    summary = {"figure": str(figure), "widths": widths, "steps": steps, "learning_rate": lr,
               "slopes": dict(result.slopes),
               "initial_losses": [record.losses[0] for record in result.records],
               "final_losses": result.final("losses"),
               "weight_changes": result.final("weight_changes"),
               "ntk_changes": result.final("ntk_changes")}
    for key, value in summary.items():
        print(f"{key}: {value}")
    return summary


if __name__ == "__main__":
    main()
