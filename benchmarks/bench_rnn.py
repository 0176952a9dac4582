"""The cost of recurrent kernels as sequences grow: tied against untied weights.

For ``N`` sequences of ``C`` channels and each length ``T`` of ``--lengths``, the NNGP and
NTK (float64, ``x2=None``) of ``RNN(Erf) -> GlobalAvgPool -> Linear``: the tied network
(every pair of steps of two sequences, ``T^2`` per pair) and the untied one (equal steps
only, ``T`` per pair), alternating, best of ``--repeats``. Prints both times, their
ratio, and the tied time per pair of sequences and pair of steps (flat when the cost
grows like ``T^2``).

    python benchmarks/bench_rnn.py [--n 32] [--channels 8] [--lengths 8,16,32,64]
"""

from __future__ import annotations

import argparse

import torch
from serve import timed

import widenets as wn


def network(tied: bool) -> wn.Sequential:
    return wn.Sequential(wn.RNN(wn.Erf(), W_std=1.2, U_std=1.0, b_std=0.1, tied=tied),
                         wn.GlobalAvgPool(), wn.Linear(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--lengths", default="8,16,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N = {args.n}, "
          f"C = {args.channels}, NNGP + NTK, float64, x2=None")
    print(f"{'T':>4} {'tied (s)':>9} {'untied (s)':>10} {'ratio':>6} "
          f"{'tied ns / (pair x step pair)':>28}")
    for length in (int(v) for v in args.lengths.split(",")):
        x = torch.randn(args.n, args.channels, length, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
        tied, untied = network(True), network(False)
        calls = {name: (lambda net=net, x=x: net.kernel(x, None, get=("nngp", "ntk")))
                 for name, net in (("tied", tied), ("untied", untied))}
        for call in calls.values():
            call()
        best = {name: min(timed(call) for _ in range(args.repeats))
                for name, call in calls.items()}
        per_pair = best["tied"] / (args.n * args.n * length * length) * 1e9
        print(f"{length:>4} {best['tied']:>9.3f} {best['untied']:>10.3f} "
              f"{best['tied'] / best['untied']:>6.1f} {per_pair:>28.1f}", flush=True)


if __name__ == "__main__":
    main()
