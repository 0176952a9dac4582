"""Kernel regression on the digits with an infinitely wide convolutional network.

The NNGP and NTK of a CNN with global average pooling (CNN-GAP: Conv 3x3, ReLU, AvgPool 2,
Conv 3x3, ReLU, GlobalAvgPool, Linear) on scikit-learn's 8x8 digits
(``wn.datasets.load_digits``), their kernel-regression test accuracy on one-hot
targets, and the same for a fully connected network of the same depth for comparison.
Left: the CNN's NTK between the training images sorted by class, as correlations
``K(x, x') / sqrt(K(x, x) K(x', x'))``. Right: test accuracies.

Run:  python examples/cnn_digits.py [--out DIR] [--quick] [--seed N]
Writes DIR/cnn_digits.png (default DIR: example-output).
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

W_STD, B_STD = 1.5, 0.05


def kernel_regression_accuracy(k_train, k_test_train, y_train, labels_test) -> float:
    """Test accuracy of the mean ``K(x, X) (K(X, X) + reg I)^-1 y``: the NNGP posterior
    mean for the NNGP, the trained ensemble's mean at ``t = inf`` for the NTK."""
    reg = 1e-4 * k_train.diagonal().mean()  # a small ridge relative to the kernel's scale
    alpha = torch.linalg.solve(k_train + reg * torch.eye(len(k_train), dtype=k_train.dtype),
                               y_train)
    return float(((k_test_train @ alpha).argmax(1).numpy() == labels_test).mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="example-output", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_train, n_test = (80, 80) if args.quick else (300, 300)

    data = wn.datasets.load_digits(n_train=n_train, n_test=n_test, seed=args.seed)
    order = np.argsort(data.labels_train, kind="stable")  # training images sorted by class
    x_train = torch.from_numpy(data.x_train[order])
    labels_train, y_train = data.labels_train[order], torch.from_numpy(data.y_train[order])
    x_test = torch.from_numpy(data.x_test)
    images_train, images_test = x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8)

    # Widths do not enter the kernels (NTK parameterization): 1 channel is as good as any.
    cnn = wn.Sequential(
        wn.Conv2d(1, 3, padding="same", W_std=W_STD, b_std=B_STD), wn.ReLU(), wn.AvgPool2d(2),
        wn.Conv2d(1, 3, padding="same", W_std=W_STD, b_std=B_STD), wn.ReLU(),
        wn.GlobalAvgPool(), wn.Linear(10, W_std=W_STD, b_std=B_STD),
    )
    fc = wn.Sequential(wn.Linear(1, W_std=W_STD, b_std=B_STD), wn.ReLU(),
                       wn.Linear(1, W_std=W_STD, b_std=B_STD), wn.ReLU(),
                       wn.Linear(10, W_std=W_STD, b_std=B_STD))
    start = time.perf_counter()
    both = ("nngp", "ntk")
    k_cnn = cnn.kernel(images_train, None, both, progress=False)  # x2=None: symmetric
    k_cnn_test = cnn.kernel(images_test, images_train, both, progress=False)
    seconds = time.perf_counter() - start
    k_fc, k_fc_test = fc.kernel(x_train, None, both), fc.kernel(x_test, x_train, both)

    accuracy = {}
    for name, (k, k_test) in {"CNN-GAP": (k_cnn, k_cnn_test), "FC": (k_fc, k_fc_test)}.items():
        for get in both:
            accuracy[f"{name} {get.upper()}"] = kernel_regression_accuracy(
                getattr(k, get), getattr(k_test, get), y_train, data.labels_test)

    ntk = k_cnn.ntk
    correlation = ntk / torch.outer(ntk.diagonal(), ntk.diagonal()).sqrt()
    fig, (ax_k, ax_a) = plt.subplots(1, 2, figsize=(11, 4.6),
                                     gridspec_kw={"width_ratios": [1.1, 1]})
    # Shown: up to 12 training images per class (a light image); colours span the 2nd to
    # 98th percentile of the entries (all are close to one).
    shown = np.concatenate([np.flatnonzero(labels_train == c)[:12] for c in range(10)])
    corr_shown = correlation[shown][:, shown].numpy()
    low, high = np.percentile(corr_shown, [2, 98])
    image = ax_k.imshow(corr_shown, cmap="magma", interpolation="nearest", vmin=low, vmax=high)
    fig.colorbar(image, ax=ax_k, extend="both",
                 label="NTK correlation (2nd to 98th percentile)")
    labels_shown = labels_train[shown]
    starts = np.searchsorted(labels_shown, np.arange(10))
    ends = np.append(starts[1:], len(shown))
    for s in starts[1:]:
        ax_k.axhline(s - 0.5, color="white", lw=0.5)
        ax_k.axvline(s - 0.5, color="white", lw=0.5)
    ax_k.set_xticks((starts + ends - 1) / 2, [str(c) for c in range(10)])
    ax_k.set_yticks((starts + ends - 1) / 2, [str(c) for c in range(10)])
    ax_k.set(xlabel="training image (by class)", ylabel="training image (by class)",
             title="CNN-GAP NTK, training digits by class (12 per class)")
    names = list(accuracy)
    bars = ax_a.bar([n.replace(" ", "\n") for n in names], [accuracy[n] for n in names],
                    color=["C0", "C1", "C0", "C1"], hatch=["", "", "//", "//"])
    ax_a.bar_label(bars, fmt="%.3f")
    ax_a.axhline(0.1, color="k", ls="--", lw=1)
    ax_a.set(ylim=(0, 1.08), ylabel="test accuracy (dashed line: chance, 0.1)",
             title=f"Kernel regression, {n_train} train / {n_test} test digits")
    fig.suptitle(f"Infinitely wide CNN on the digits: test accuracy "
                 f"{accuracy['CNN-GAP NNGP']:.3f} (NNGP), {accuracy['CNN-GAP NTK']:.3f} (NTK)")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "cnn_digits.png"
    fig.savefig(figure, dpi=100)
    plt.close(fig)

    # Mean NTK correlation between two training images of the same class and of different ones.
    same = torch.from_numpy(labels_train[:, None] == labels_train[None, :])
    off_diagonal = ~torch.eye(n_train, dtype=torch.bool)
    result = {"figure": str(figure), "n_train": n_train, "n_test": n_test,
              "accuracy": accuracy, "cnn_kernel_seconds": seconds,
              "same_class_correlation": float(correlation[same & off_diagonal].mean()),
              "other_class_correlation": float(correlation[~same].mean())}
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main()
