"""widenets against Neural Tangents on the same machine, workload by workload.

Starts two workers (``serve.py``): widenets in this environment and Neural Tangents
0.6.5 in the peer's (``--peer-python``, made by ``make bench-peer``). For each workload
both make their first call (JAX compiles then), then they alternate single calls,
``--repeats`` each and more for fast workloads (until each side has run ``--seconds``),
so that drift on a noisy machine hits both alike; the steady time is the best of these
(on this 2-core machine the best of 5 calls of 0.04 s still moves by 20 % between runs).
Prints both times, the ratio widenets / peer, both first calls, and the largest
difference between the two libraries' kernels relative to the largest entry.
``--check`` exits with status 1 unless every ratio is at most 0.5.

    python benchmarks/bench_peer.py --peer-python .venv-peer/bin/python [--repeats 5]
        [--seconds 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_speed import Worker, our_worker, relative_errors  # noqa: E402
from workloads import WORKLOADS, describe  # noqa: E402

PEER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_nt.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", required=True,
                        help="the Python of the environment with neural-tangents")
    parser.add_argument("--repeats", type=int, default=5, help="calls per side, at least")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="...and at least this long in calls per side")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 unless widenets / peer <= 0.5 everywhere")
    args = parser.parse_args()
    # TensorFlow, which Neural Tangents imports, logs at start-up unless told not to.
    ours = our_worker()
    peer = Worker([args.peer_python, PEER_SCRIPT], env={"TF_CPP_MIN_LOG_LEVEL": "3"})
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs; float64, x2=None, NNGP + NTK; steady = best of at "
          f"least {args.repeats} alternating calls and {args.seconds:g} s per side")
    print(f"{'workload':<12} {'widenets (s)':>12} {'peer (s)':>9} {'ratio':>6} "
          f"{'first: widenets':>15} {'peer':>6} {'difference':>10}")
    ratios = []
    for name in args.workloads.split(","):
        first_ours = ours.ask("first", name)["seconds"]
        first_peer = peer.ask("first", name)["seconds"]
        times_ours, times_peer = [], []
        while len(times_ours) < args.repeats or min(sum(times_ours),
                                                     sum(times_peer)) < args.seconds:
            times_ours.append(ours.ask("time", name)["seconds"])
            times_peer.append(peer.ask("time", name)["seconds"])
        with tempfile.TemporaryDirectory() as directory:
            for sub, worker in (("a", ours), ("b", peer)):
                os.mkdir(os.path.join(directory, sub))
                worker.ask("save", name, os.path.join(directory, sub))
            difference = max(relative_errors(directory, name, "b").values())
        ratio = min(times_ours) / min(times_peer)
        ratios.append(ratio)
        print(f"{name:<12} {min(times_ours):>12.3f} {min(times_peer):>9.3f} {ratio:>6.2f} "
              f"{first_ours:>15.2f} {first_peer:>6.2f} {difference:>10.1e}", flush=True)
    ours.close()
    peer.close()
    print()
    for name in args.workloads.split(","):
        print(f"{name:<12} {describe(name)}")
    if args.check and max(ratios) > 0.5:
        sys.exit(f"widenets / peer is {max(ratios):.2f} > 0.5 on some workload")


if __name__ == "__main__":
    main()
