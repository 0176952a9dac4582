"""The cost of gradients through kernels: forward and backward against the forward alone.

For each workload of ``workloads.py`` (NNGP + NTK, float64, ``x2=None``), three timings in
the same process, alternating (best of ``--repeats``): the forward with nothing requiring
grad (the fast in-place paths), the forward with the inputs requiring grad (the
straightforward paths, recorded by autograd), and that forward plus ``backward()`` of
``(nngp + ntk).sum()``. The ratio of the last to the first is the cost of a gradient in
units of a plain kernel evaluation. ``--check`` exits with status 1 if it exceeds
``--limit`` (default 4).

    python benchmarks/bench_grad.py [--repeats 3] [--workloads fc-relu-3,cnn-gap] [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS, describe, inputs, widenets_net  # noqa: E402

#: Rows of each workload's inputs used here: a gradient keeps every layer's tiles alive
#: for the backward pass, so the full workloads would measure memory, not arithmetic.
ROWS = {"fc-relu-3": 2000, "fc-erf-10": 1500, "cnn-flatten": 200, "cnn-gap": 32,
        "attn-2": 64}


def seconds(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--limit", type=float, default=4.0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64, NNGP + NTK")
    print(f"{'workload':12s} {'rows':>5s} {'forward (s)':>12s} {'recorded (s)':>13s} "
          f"{'fwd+bwd (s)':>12s} {'fwd+bwd / forward':>18s}")
    worst = 0.0
    for name in args.workloads.split(","):
        net = widenets_net(name)
        x = torch.from_numpy(inputs(name)[:ROWS[name]])

        def forward(x: torch.Tensor = x, net=net) -> None:
            net.kernel(x, None, get=("nngp", "ntk"), progress=False)

        def recorded(x: torch.Tensor = x, net=net) -> None:
            net.kernel(x.clone().requires_grad_(True), None, get=("nngp", "ntk"),
                       progress=False)

        def backward(x: torch.Tensor = x, net=net) -> None:
            k = net.kernel(x.clone().requires_grad_(True), None, get=("nngp", "ntk"),
                           progress=False)
            (k.nngp + k.ntk).sum().backward()

        best = {"forward": float("inf"), "recorded": float("inf"), "backward": float("inf")}
        for _ in range(args.repeats):
            for label, call in (("forward", forward), ("recorded", recorded),
                                ("backward", backward)):
                best[label] = min(best[label], seconds(call))
        ratio = best["backward"] / best["forward"]
        worst = max(worst, ratio)
        print(f"{name:12s} {ROWS[name]:5d} {best['forward']:12.3f} {best['recorded']:13.3f} "
              f"{best['backward']:12.3f} {ratio:18.2f}", flush=True)
    print()
    for name in args.workloads.split(","):
        print(f"{name:12s} {describe(name)}")
    if args.check and worst > args.limit:
        print(f"bench_grad: a gradient costs {worst:.2f} forwards, over {args.limit}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
