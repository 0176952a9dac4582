"""Time ``wn.empirical_ntk`` against the approach of PyTorch's NTK tutorial.

The baseline is the method of the "Neural Tangent Kernels" tutorial in the PyTorch
documentation (torch.func): per-example Jacobians of all parameters by
``vmap(jacrev(f))`` over the whole input set, flattened and contracted with one
``einsum`` per parameter into the block kernel ``(N1, N2, O, O)``. It is written here
from that description.

Workloads (float64, ``outputs="full"``, ``x2`` given):

* ``mlp``: 100 -> 512 -> ReLU -> 512 -> ReLU -> 10, N1 = N2 = 64;
* ``resnet``: a small ResNet-style CNN on 3x16x16 images: a 3x3 stem with 16 channels,
  two residual blocks (conv-ReLU-conv + skip, ReLU), global average pooling and a
  linear read-out to 10 classes; N1 = N2 = 32.

Each implementation is timed alternating with the baseline (best of ``--repeats`` after
a warm-up) and reported as a ratio. ``auto`` must stay within 1.1x of the baseline;
``--check`` exits with status 1 when it does not.

    python benchmarks/bench_empirical.py [--repeats 3] [--check]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import widenets as wn

DTYPE = torch.float64


def tutorial_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The tutorial's Jacobian contraction: ``(N1, N2, O, O)``."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(single), (None, 0))(params, x1)
    jac2 = vmap(jacrev(single), (None, 0))(params, x2)
    return sum(torch.einsum("Naf,Mbf->NMab", jac1[name].flatten(2), jac2[name].flatten(2))
               for name in params)


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Block(16), Block(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(100, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


#: name: (model, per-example input shape, N1 = N2)
WORKLOADS = {
    "mlp 64x100": (mlp, (100,), 64),
    "resnet 32x3x16x16": (resnet, (3, 16, 16), 32),
}
IMPLEMENTATIONS = ("auto", "structured", "jacobian", "ntk_vector")


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def compare(model, x1, x2, implementation: str, repeats: int) -> tuple[float, float, float]:
    """Best seconds of ``implementation`` and of the tutorial, alternating, and their
    largest relative difference."""
    def ours():
        return wn.empirical_ntk(model, x1, x2, outputs="full", implementation=implementation)

    ours()  # warm-up at the full size (first calls pay for torch's one-off set-up)
    ours_times, tutorial_times = [], []
    for _ in range(repeats):
        seconds, reference = timed(lambda: tutorial_ntk(model, x1, x2))
        tutorial_times.append(seconds)
        seconds, value = timed(ours)
        ours_times.append(seconds)
    difference = float((value - reference).abs().max() / reference.abs().max())
    return min(ours_times), min(tutorial_times), difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if auto is over 1.1x the tutorial's time")
    parser.add_argument("--skip", nargs="*", default=[], choices=IMPLEMENTATIONS,
                        help="implementations not to time")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, "
          "outputs='full'")
    print(f"{'workload':<20} {'implementation':<12} {'seconds':>8} {'tutorial':>9} "
          f"{'ratio':>6} {'max rel diff':>13}")
    worst = 0.0
    for name, (make, shape, n) in WORKLOADS.items():
        torch.manual_seed(0)
        model = make().to(DTYPE)
        generator = torch.Generator().manual_seed(1)
        x1 = torch.randn(n, *shape, dtype=DTYPE, generator=generator)
        x2 = torch.randn(n, *shape, dtype=DTYPE, generator=generator)
        tutorial_ntk(model, x1[:4], x2[:4])  # warm-up
        for implementation in IMPLEMENTATIONS:
            if implementation in args.skip:
                continue
            ours, tutorial, difference = compare(model, x1, x2, implementation, args.repeats)
            ratio = ours / tutorial
            if implementation == "auto":
                worst = max(worst, ratio)
            print(f"{name:<20} {implementation:<12} {ours:8.3f} {tutorial:9.3f} {ratio:6.2f} "
                  f"{difference:13.1e}", flush=True)
    print(f"worst auto / tutorial: {worst:.2f} (must be <= 1.10)")
    return 1 if args.check and worst > 1.10 else 0


if __name__ == "__main__":
    sys.exit(main())
