"""Page faults of a repeated kernel call, with and without widenets' glibc heap tuning.

Each measurement runs in a fresh process (the tuning is process-wide): one call warms up,
then the page faults (``ru_minflt``) of a second, identical call are counted. With the
tuning the freed temporaries of the first call stay in the heap and the second call
faults in (almost) nothing; with glibc's defaults (``WIDENETS_TUNE_MALLOC=0``) they go
back to the system and are faulted in again. The counts depend on the machine and its
load (threads, arenas), which is why they are measured here and not asserted in the
tests; the tests check the allocator's decisions instead (``tests/test_heap.py``).

    python benchmarks/bench_heap.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import resource, torch, widenets as wn
    net = wn.Sequential(wn.Linear(8, 1.5, 0.05), wn.ReLU(), wn.Linear(8, 1.5, 0.05),
                        wn.ReLU(), wn.Linear(1))
    x = torch.randn(1500, 20, dtype=torch.float64)
    net.kernel(x, None, get=("nngp", "ntk"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net.kernel(x, None, get=("nngp", "ntk"))
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def minor_faults_of_second_call(tune: bool) -> int:
    """Page faults of a repeated kernel call in a fresh process, with or without tuning."""
    env = dict(os.environ, WIDENETS_TUNE_MALLOC="1" if tune else "0")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("page faults of a repeated 1500 x 1500 ReLU NNGP + NTK call (fresh processes)")
    print(f"{'run':>4} {'tuned':>8} {'glibc defaults':>15}")
    for run in range(args.repeats):
        tuned, default = minor_faults_of_second_call(True), minor_faults_of_second_call(False)
        print(f"{run:>4} {tuned:>8} {default:>15}")


if __name__ == "__main__":
    main()
