"""CPU against CUDA on larger workloads, in one process on one machine.

Each workload's NNGP and NTK (``x2=None``) are computed on the CPU (all its threads) and on
the current CUDA device, in float64 and float32; the table gives both times (the CUDA one
synchronised, best of two after a warm-up call), their ratio, and the largest difference
of the CUDA kernels from the CPU ones relative to the largest entry. Without a CUDA GPU
the script exits with status 2 and says so.

    python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial

import torch

import widenets as wn


def dense(depth: int, activation: Callable[[], wn.Layer]) -> wn.Layer:
    layers: list[wn.Layer] = []
    for _ in range(depth):
        layers += [wn.Linear(512, W_std=1.5, b_std=0.05), activation()]
    return wn.Sequential(*layers, wn.Linear(1))


def pooled_cnn(depth: int) -> wn.Layer:
    layers: list[wn.Layer] = []
    for _ in range(depth):
        layers += [wn.Conv2d(64, 3, padding="same", W_std=1.5, b_std=0.05), wn.ReLU()]
    return wn.Sequential(*layers, wn.GlobalAvgPool(), wn.Linear(1))


#: name: (architecture, input shape)
WORKLOADS: dict[str, tuple[wn.Layer, tuple[int, ...]]] = {
    "fc-relu-3 10000x784": (dense(3, wn.ReLU), (10000, 784)),
    "fc-erf-10 8000x784": (dense(10, wn.Erf), (8000, 784)),
    "cnn-gap 64x3x12x12": (pooled_cnn(3), (64, 3, 12, 12)),
}


def seconds(call: Callable[[], object], synchronize: bool) -> float:
    if synchronize:
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if synchronize:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    print(f"widenets {wn.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {torch.cuda.get_device_name()}")
    print(f"{'workload':22s} {'dtype':8s} {'cpu (s)':>8s} {'cuda (s)':>9s} {'ratio':>7s} "
          f"{'max rel diff':>12s}")
    for name, (net, shape) in WORKLOADS.items():
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        for dtype in (torch.float64, torch.float32):
            on_cpu, on_gpu = x.to(dtype), x.to(dtype=dtype, device="cuda")

            def kernels(inputs: torch.Tensor, net: wn.Layer = net) -> wn.Kernels:
                return net.kernel(inputs, get=("nngp", "ntk"), progress=False)

            cpu_seconds = seconds(partial(kernels, on_cpu), synchronize=False)
            kernels(on_gpu)  # warm-up: CUDA context, libraries
            gpu_seconds = min(seconds(partial(kernels, on_gpu), synchronize=True)
                              for _ in range(2))
            reference, got = kernels(on_cpu), kernels(on_gpu)
            error = max(float((reference[k] - got[k].cpu()).abs().max()
                              / reference[k].abs().max()) for k in ("nngp", "ntk"))
            print(f"{name:22s} {str(dtype)[6:]:8s} {cpu_seconds:8.3f} {gpu_seconds:9.3f} "
                  f"{cpu_seconds / gpu_seconds:7.1f} {error:12.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
