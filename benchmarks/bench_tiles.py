"""Peak memory and time of ``wn.kernel_matrix`` against one ``net.kernel`` call.

The NTK of a fully connected ReLU network (3 hidden layers, ``W_std=1.5``,
``b_std=0.05``) on ``N = 8000`` inputs of 100 features, float64, ``x2=None``: the output
is ``N^2 * 8`` bytes (488 MiB). Each measurement runs in a fresh Python process: import
widenets, create ``x``, then record the resident set just before the call (the
baseline: ``import torch`` alone holds a few hundred MiB) and its peak during the call
(Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; where that is not
possible, ``ru_maxrss``, which may include a peak from before the call). The check
uses the increase over the baseline: it must stay below ``1.6 x output + 600 MiB``.
``kernel_matrix`` and ``net.kernel`` alternate, ``--repeats`` processes each; the table
shows the best time and the largest peak. Exit status 1 if the limit is exceeded.

    python benchmarks/bench_tiles.py [--n 8000] [--features 100] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

MiB = 2**20


def status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (None off Linux)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(method: str, n: int, features: int) -> dict:
    """In this (fresh) process: the call's time and peak resident set, in MiB."""
    import gc

    import torch

    import widenets as wn
    from widenets import tiles

    net = wn.Sequential(*[layer for _ in range(3)
                          for layer in (wn.Linear(512, 1.5, 0.05), wn.ReLU())],
                        wn.Linear(1, 1.5, 0.05))
    x = torch.randn(n, features, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    gc.collect()
    baseline = status_kib("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    if method == "kernel_matrix":
        k = wn.kernel_matrix(net, x, get="ntk", progress=False)
    else:
        k = net.kernel(x, None)
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM") if reset else None
    if peak_kib is None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert k.shape == (n, n) and k.dtype == torch.float64
    side = tiles.auto_tile(net, n, n, (features,), 1, 8, None)
    return {
        "method": method, "seconds": seconds, "baseline_mib": (baseline or 0) / 1024,
        "peak_mib": peak_kib / 1024, "increase_mib": (peak_kib - (baseline or 0)) / 1024,
        "peak_source": "VmHWM (reset before the call)" if reset else "ru_maxrss",
        "auto_tile": side if method == "kernel_matrix" else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def run_child(method: str, n: int, features: int) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", method, "--n", str(n),
               "--features", str(features)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8000)
    parser.add_argument("--features", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=("kernel_matrix", "net.kernel"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.n, args.features)))
        return 0

    methods = ("kernel_matrix", "net.kernel")
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for method in methods:
            runs[method].append(run_child(method, args.n, args.features))
    output_mib = args.n**2 * 8 / MiB
    limit_mib = 1.6 * output_mib + 600
    first = runs["kernel_matrix"][0]
    print(f"NTK, 3 ReLU layers, N = {args.n}, {args.features} features, float64, x2=None; "
          f"output {output_mib:.0f} MiB; torch {first['torch']}, {first['threads']} threads; "
          f"peak from {first['peak_source']}; best of {args.repeats} processes")
    print(f"kernel_matrix tile='auto' chose {first['auto_tile']} x {first['auto_tile']} tiles")
    print(f"{'call':<26} {'time (s)':>9} {'entries/s':>10} {'baseline':>9} {'peak':>8} "
          f"{'increase':>9} {'increase / output':>18}")
    exceeded = False
    for method in methods:
        best = min(r["seconds"] for r in runs[method])
        worst = max(runs[method], key=lambda r: r["increase_mib"])
        name = ("kernel_matrix(tile='auto')" if method == "kernel_matrix"
                else "net.kernel(x, None)")
        print(f"{name:<26} {best:>9.2f} {args.n**2 / best:>10.3g} "
              f"{worst['baseline_mib']:>7.0f} M {worst['peak_mib']:>6.0f} M "
              f"{worst['increase_mib']:>7.0f} M {worst['increase_mib'] / output_mib:>18.2f}")
        if method == "kernel_matrix":
            exceeded = worst["increase_mib"] >= limit_mib
            verdict = "EXCEEDED" if exceeded else "ok"
            print(f"  limit (increase over baseline) 1.6 x output + 600 MiB = "
                  f"{limit_mib:.0f} MiB: {verdict}")
    return 1 if exceeded else 0


if __name__ == "__main__":
    sys.exit(main())
