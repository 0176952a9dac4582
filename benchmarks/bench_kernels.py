"""Time the analytic kernels of fully connected networks: tiled against one block.

Each workload is timed with the default tiling (blocks of ``TILE_ENTRIES`` pairs whose
elementwise work stays in cache) and with tiling switched off (the whole N1 x N2
matrix as one block, a pass over memory per elementwise operation), in the same run,
alternating the two so that drift on a noisy machine cancels. Prints seconds per call
(best of ``--repeats`` after a warm-up) and the ratio tiled / untiled.

    python benchmarks/bench_kernels.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from widenets import engine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import inputs, widenets_net  # noqa: E402

WORKLOADS = ("fc-relu-3", "fc-erf-10")


def best_time(net, x, repeats: int, tile_entries: int) -> float:
    engine.TILE_ENTRIES = tile_entries
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        net.kernel(x, None, get=("nngp", "ntk"))
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tiled_entries = engine.TILE_ENTRIES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float64")
    print(f"{'workload':<18} {'tiled (s)':>10} {'one block (s)':>14} {'ratio':>7}")
    for name in WORKLOADS:
        net, x = widenets_net(name), torch.from_numpy(inputs(name))
        n = x.shape[0]
        best_time(net, x, 1, tiled_entries)  # warm-up
        tiled, untiled = [], []
        for _ in range(args.repeats):
            tiled.append(best_time(net, x, 1, tiled_entries))
            untiled.append(best_time(net, x, 1, n * n))
        engine.TILE_ENTRIES = tiled_entries
        print(f"{name:<18} {min(tiled):>10.3f} {min(untiled):>14.3f} "
              f"{min(tiled) / min(untiled):>7.2f}")


if __name__ == "__main__":
    main()
