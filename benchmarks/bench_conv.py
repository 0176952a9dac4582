"""Time the analytic kernels of convolutional networks on 8x8 images, per pair of images.

Workloads (the shapes of the speed workloads): three ``Conv2d(64, 3, padding="same", W_std=1.5,
b_std=0.05)`` + ReLU layers on 3-channel 8x8 images, then ``Flatten`` (400 images) or
``GlobalAvgPool`` (64 images), and a ``Linear(1)`` read-out; NNGP + NTK, ``x2=None``,
float64. A symmetric call computes ``N (N + 1) / 2`` pairs.

Each network is timed on the layout that ``spatial="auto"`` chooses and, in the same
run and alternating with it, on the full spatial covariance (``spatial="full"``): for
the Flatten network the automatic choice is the diagonal (``P = 64`` numbers per pair
instead of ``P^2 = 4096``), for the pooled one both are the full covariance.
Prints the best of ``--repeats`` after a warm-up.

    python benchmarks/bench_conv.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import widenets as wn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import inputs, widenets_net  # noqa: E402

WORKLOADS = ("cnn-flatten", "cnn-gap")


def seconds(net: wn.Layer, x: torch.Tensor, spatial: str) -> float:
    start = time.perf_counter()
    net.kernel(x, None, get=("nngp", "ntk"), spatial=spatial)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print(f"{'workload':<22} {'auto (s)':>9} {'us/pair':>8} {'full (s)':>9} {'auto/full':>10}")
    for name in WORKLOADS:
        net, x = widenets_net(name), torch.from_numpy(inputs(name))
        n = x.shape[0]
        seconds(net, x[:8], "auto")  # warm-up
        auto, full = [], []
        for _ in range(args.repeats):
            auto.append(seconds(net, x, "auto"))
            full.append(seconds(net, x, "full"))
        pairs = n * (n + 1) / 2
        print(f"{name:<22} {min(auto):>9.3f} {1e6 * min(auto) / pairs:>8.1f} "
              f"{min(full):>9.3f} {min(auto) / min(full):>10.3f}")


if __name__ == "__main__":
    main()
