"""Time widenets' analytic kernels on the named workloads (``workloads.py``).

Each workload runs in a fresh process (a worker, see ``serve.py``), which reports:
the import time of widenets; the first call (nothing computed before it in that
process); the steady state (best of ``--repeats`` further calls); the peak resident
memory of the process and its increase over the memory just before the first call.
``--float32`` also times each workload on float32 inputs and prints the largest
deviation from float64 relative to the largest entry, per kernel.

``--device cuda`` (or ``cuda:N``) puts each workload's inputs on that CUDA device, so the
kernels are computed there; the default is the CPU. The device's name is printed, every
timed call is synchronised (``torch.cuda.synchronize()`` before the clock starts and
after the call), and two more columns give the peak GPU memory allocated during the calls
(``torch.cuda.max_memory_allocated``) and its increase over the memory allocated just
before the first call (the inputs), besides the resident memory of the process. Without
a CUDA GPU, ``--device cuda`` exits with status 2 and says so.

    python benchmarks/bench_speed.py [--repeats 3] [--workloads fc-relu-3,cnn-gap] [--float32]
        [--device cpu | cuda | cuda:N]
    python benchmarks/bench_speed.py --serve [--device D]   # a worker (used by bench_peer.py)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_start = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402

import widenets  # noqa: E402,F401

IMPORT_SECONDS = time.perf_counter() - _start

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve import serve  # noqa: E402
from workloads import WORKLOADS, describe, inputs, widenets_net  # noqa: E402


def prepare(name: str, dtype: str, device: str = "cpu"):
    """A call computing workload ``name`` with widenets, inputs in ``dtype`` on ``device``.

    The call returns the kernels as tensors on ``device`` (the worker copies them to the
    host only to save them, outside the timings)."""
    x = torch.from_numpy(inputs(name)).to(dtype=getattr(torch, dtype), device=device)
    net = widenets_net(name)

    def call() -> dict[str, torch.Tensor]:
        kernels = net.kernel(x, None, get=("nngp", "ntk"))
        return {"nngp": kernels.nngp, "ntk": kernels.ntk}

    return call


class CudaDevice:
    """A CUDA device for ``serve.py``: synchronisation and allocated memory."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.name = f"{self.device} ({torch.cuda.get_device_name(self.device)})"

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated_mib(self) -> float:
        return torch.cuda.memory_allocated(self.device) / 2**20

    def peak_mib(self) -> float:
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def check_device(device: str) -> str:
    """``device`` if the kernels can be benchmarked there (the CPU or an available CUDA
    device), else exit with status 2 and a one-line message on standard error."""

    def refuse(message: str) -> None:
        print(f"bench_speed.py: {message}", file=sys.stderr)
        sys.exit(2)

    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        refuse(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        refuse(f"--device {device} needs a CUDA GPU, and torch.cuda.is_available() is False")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        refuse(f"no CUDA device {device} (this machine has {torch.cuda.device_count()})")
    return device


class Worker:
    """A benchmark worker process answering ``serve.py``'s commands."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        import subprocess

        # Its standard error is kept aside (a peer's start-up chatter) and shown if it fails.
        self.errors = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self.errors, text=True,
                                        env=None if env is None else {**os.environ, **env})
        self.import_seconds = self._read()["ready"]

    def _read(self) -> dict:
        import json

        line = self.process.stdout.readline()
        if not line:
            self.errors.seek(0)
            raise RuntimeError(f"benchmark worker {self.process.args} ended unexpectedly:\n"
                               + self.errors.read()[-4000:])
        return json.loads(line)

    def ask(self, *words: str) -> dict:
        self.process.stdin.write(" ".join(words) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.process.wait()


def our_worker(device: str = "cpu") -> Worker:
    """A widenets worker process computing on ``device``."""
    return Worker([sys.executable, os.path.abspath(__file__), "--serve", "--device", device])


def relative_errors(directory: str, name: str, reference: str) -> dict[str, float]:
    """``max |K - K_ref| / max |K_ref|`` per kernel, from files saved by two workers."""
    errors = {}
    for kernel in ("nngp", "ntk"):
        value = np.load(os.path.join(directory, "a", f"{name}.{kernel}.npy"))
        ref = np.load(os.path.join(directory, reference, f"{name}.{kernel}.npy"))
        errors[kernel] = float(np.abs(value - ref).max() / np.abs(ref).max())
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--float32", action="store_true")
    parser.add_argument("--device", default="cpu",
                        help="where the kernels are computed: cpu (default), cuda or cuda:N")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = check_device(args.device)
    on_cuda = torch.device(device).type == "cuda"
    if args.serve:
        serve(lambda name, dtype: prepare(name, dtype, device), IMPORT_SECONDS,
              CudaDevice(device) if on_cuda else None)
        return
    print(f"widenets {widenets.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float64, x2=None, NNGP + NTK")
    header = (f"{'workload':<12} {'steady (s)':>10} {'first (s)':>9} {'first-steady':>12} "
              f"{'import (s)':>10} {'peak (MiB)':>10} {'increase':>9}")
    if on_cuda:  # allocated by torch on the GPU, besides the resident memory above
        header += f" {'GPU peak (MiB)':>14} {'GPU increase':>12}"
    if args.float32:
        header += f" {'float32 (s)':>11} {'f32 err nngp':>12} {'f32 err ntk':>11}"
    print(f"device: {CudaDevice(device).name if on_cuda else 'cpu'}")
    print(header)
    for name in args.workloads.split(","):
        worker = our_worker(device)
        first = worker.ask("first", name)
        steady = min(worker.ask("time", name)["seconds"] for _ in range(args.repeats))
        memory = worker.ask("memory")
        peak = memory["peak_mib"]
        line = (f"{name:<12} {steady:>10.3f} {first['seconds']:>9.3f} "
                f"{first['seconds'] - steady:>12.3f} {worker.import_seconds:>10.2f} "
                f"{peak:>10.0f} {peak - first['baseline_mib']:>9.0f}")
        if on_cuda:
            gpu_peak = memory["device_peak_mib"]
            line += f" {gpu_peak:>14.0f} {gpu_peak - first['device_baseline_mib']:>12.0f}"
        if args.float32:
            worker.ask("first", name, "float32")
            single = min(worker.ask("time", name, "float32")["seconds"]
                         for _ in range(args.repeats))
            with tempfile.TemporaryDirectory() as directory:
                for sub, dtype in (("a", "float32"), ("b", "float64")):
                    os.mkdir(os.path.join(directory, sub))
                    worker.ask("save", name, os.path.join(directory, sub), dtype)
                errors = relative_errors(directory, name, "b")
            line += f" {single:>11.3f} {errors['nngp']:>12.1e} {errors['ntk']:>11.1e}"
        worker.close()
        print(line, flush=True)
    print()
    for name in args.workloads.split(","):
        print(f"{name:<12} {describe(name)}")


if __name__ == "__main__":
    main()
