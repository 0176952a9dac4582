"""Dataset distillation on the digits: 10 learned images that teach more than 10 real ones.

Kernel inducing points (KIP; Nguyen, Chen and Lee 2021, "Dataset meta-learning from
kernel ridge-regression"): ten support images ``xs``, one per class with fixed one-hot
targets ``ys`` (``wn.datasets.one_hot_targets``), are learned by Adam on their pixels so
that NNGP kernel ridge regression *from the support alone*,
``K(x, xs) (K(xs, xs) + reg I)^-1 ys``, fits minibatches of the training digits. The
kernel is that of an infinitely wide 3-layer ReLU network, differentiated through
``net.kernel`` with respect to ``xs``. The support starts from real training images (the
first of the baseline draws below).

Baseline: the same kernel regression from 10 real training images, one per class, for
5 random draws. The test set only measures: it never enters the loss, the initialisation
or the choice of a step (the distilled accuracy is the one after the last step).
Top: the initial real images and the learned ones (preprocessed pixels, as the network
sees them). Bottom: test accuracy over the optimisation steps against the baseline draws,
and the KIP training loss.

Run:  python examples/dataset_distillation.py [--out DIR] [--quick] [--seed N]
Writes DIR/dataset_distillation.png (default DIR: example-output).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

import widenets as wn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

W_STD, B_STD = 1.5, 0.1
REG = 1e-4  # the ridge, relative to the mean diagonal of K(xs, xs)
N_DRAWS = 5  # baseline draws of 10 real images


def make_net() -> wn.Sequential:
    return wn.Sequential(wn.Linear(512, W_std=W_STD, b_std=B_STD), wn.ReLU(),
                         wn.Linear(512, W_std=W_STD, b_std=B_STD), wn.ReLU(),
                         wn.Linear(10, W_std=W_STD, b_std=B_STD))


def krr_predict(net, xs: torch.Tensor, ys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """NNGP kernel ridge regression from the support ``(xs, ys)``, evaluated at ``x``;
    differentiable with respect to ``xs``."""
    k_ss = net.kernel(xs, None, get="nngp")
    k_xs = net.kernel(x, xs, get="nngp")
    reg = REG * k_ss.diagonal().mean().detach()
    eye = torch.eye(len(xs), dtype=xs.dtype)
    return k_xs @ torch.linalg.solve(k_ss + reg * eye, ys)


def kip_loss(net, xs, ys, x_batch, y_batch) -> torch.Tensor:
    """The KIP objective: mean squared error of the support's predictions on a batch."""
    return ((krr_predict(net, xs, ys, x_batch) - y_batch) ** 2).mean()


def accuracy(net, xs, ys, x_test, labels_test) -> float:
    with torch.no_grad():
        predicted = krr_predict(net, xs, ys, x_test).argmax(1).numpy()
    return float((predicted == labels_test).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # training images, Adam steps, learning rate, batch of training images per step
    n_train, steps, lr, batch = (500, 150, 0.02, 100) if args.quick else (1000, 1000, 0.01, 200)
    every = 10 if args.quick else 20  # test accuracy recorded every `every` steps

    data = wn.datasets.load_digits(n_train=n_train, seed=args.seed)  # the rest: test set
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, labels_test = torch.from_numpy(data.x_test), data.labels_test
    ys = torch.from_numpy(wn.datasets.one_hot_targets(np.arange(10)))  # support targets
    net = make_net()

    # Baseline: one real training image per class, N_DRAWS random draws.
    draws = []
    for draw in range(N_DRAWS):
        rng = np.random.default_rng([args.seed, draw])
        draws.append(np.array([rng.choice(np.flatnonzero(data.labels_train == c))
                               for c in range(10)]))
    baseline = [accuracy(net, x_train[d], ys, x_test, labels_test) for d in draws]

    # KIP: Adam on the pixels of the support, from the real images of draw 0.
    x_init = x_train[draws[0]].clone()
    xs = x_init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([xs], lr=lr)
    generator = torch.Generator().manual_seed(args.seed)
    losses, curve_steps, curve = [], [0], [baseline[0]]
    start = time.perf_counter()
    for step in range(1, steps + 1):
        b = torch.randperm(n_train, generator=generator)[:batch]
        loss = kip_loss(net, xs, ys, x_train[b], y_train[b])
        optimizer.zero_grad()
        loss.backward()
        if step == 1:
            first_grad = xs.grad.detach().clone()
        optimizer.step()
        losses.append(loss.item())
        if step % every == 0 or step == steps:
            curve_steps.append(step)
            curve.append(accuracy(net, xs.detach(), ys, x_test, labels_test))
    seconds = time.perf_counter() - start
    x_learned = xs.detach()
    distilled = curve[-1]

    fig = plt.figure(figsize=(11, 6.4))
    outer = fig.add_gridspec(2, 1, height_ratios=[1.45, 2.6], hspace=0.28)
    top = outer[0].subgridspec(2, 10, hspace=0.08, wspace=0.08)
    bottom = outer[1].subgridspec(1, 2, width_ratios=[1.6, 1], wspace=0.3)
    # Pixels as the network sees them: centred by the training mean (red: more ink than the
    # mean digit, blue: less), one symmetric colour scale per row.
    for row, (images, name) in enumerate(((x_init, "initial\n(real)"), (x_learned, "learned"))):
        scale = float(images.abs().max())
        for c in range(10):
            ax = fig.add_subplot(top[row, c])
            ax.imshow(images[c].reshape(8, 8).numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"class {c}", fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    ax_acc = fig.add_subplot(bottom[0])
    ax_loss = fig.add_subplot(bottom[1])
    for i, b_acc in enumerate(baseline):
        ax_acc.axhline(b_acc, color="grey", lw=0.8, ls=":",
                       label=f"10 real images, {N_DRAWS} draws" if i == 0 else None)
    ax_acc.axhline(max(baseline), color="k", ls="--", lw=1.2,
                   label=f"best real draw: {max(baseline):.3f}")
    ax_acc.plot(curve_steps, curve, "C0-", lw=2,
                label=f"10 learned images (KIP): {distilled:.3f} at the last step")
    ax_acc.set(xlabel="Adam step", ylabel=f"test accuracy ({len(labels_test)} digits)",
               ylim=(min(min(baseline), curve[0]) - 0.05, 1.0), xlim=(0, steps),
               title="Kernel regression from 10 support images (NNGP)")
    ax_acc.legend(loc="center right", fontsize=9)
    ax_acc.grid(alpha=0.3)
    ax_loss.plot(np.arange(1, steps + 1), losses, "C1-", lw=0.8)
    ax_loss.set(xlabel="Adam step", ylabel="KIP loss (MSE on a training batch)",
                ylim=(0, 1.05 * max(losses)), xlim=(0, steps),
                title=f"KIP loss, batches of {batch}")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(f"Dataset distillation (KIP), 3-layer ReLU NNGP, {n_train} training digits: "
                 f"{distilled:.3f} vs {max(baseline):.3f} test accuracy\n"
                 "images: pixels minus the mean training digit (red: more ink, blue: less)",
                 fontsize=11)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "dataset_distillation.png"
    fig.savefig(figure, dpi=120, bbox_inches="tight")
    plt.close(fig)

    result = {"figure": str(figure), "n_train": n_train, "n_test": len(labels_test),
              "steps": steps, "learning_rate": lr, "batch": batch, "reg": REG,
              "init": "real images (baseline draw 0)",
              "baseline_accuracies": baseline, "best_baseline": max(baseline),
              "initial_accuracy": curve[0], "distilled_accuracy": distilled,
              "margin": distilled - max(baseline),
              "curve_steps": curve_steps, "test_accuracy": curve, "losses": losses,
              "first_grad_finite": bool(torch.isfinite(first_grad).all()),
              "first_grad_norm": float(first_grad.norm()), "seconds": seconds}
    for key, value in result.items():
        if key not in ("curve_steps", "test_accuracy", "losses"):
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
