"""Full Fashion-MNIST, kernel to predictions, on one machine: 60,000 training and 10,000
test images, a 3-layer fully connected ReLU network, NNGP and NTK (``t = inf``),
one-hot targets; the training kernels are factorised on disk (``store=``) within
``--memory-limit``. Prints the accuracy, the wall time of each stage, the relative
residuals, the peak resident memory and the disk used, and writes them as JSON.

    python benchmarks/bench_fashion.py [--folder /usr/share/datasets/fashion-mnist]
        [--store runs/fashion-mnist] [--memory-limit 20GiB] [--n-train 60000]

Run again with the same store, it resumes (killed or not) and recomputes nothing that
was finished. ``make bench-fashion`` installs Debian's ``dataset-fashion-mnist`` first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from widenets.architectures import mlp
from widenets.datasets import DEBIAN_FASHION_MNIST, load_idx, one_hot_targets, unit_mean_square
from widenets.predict import gp_inference
from widenets.predict.common import relative_diag_reg

#: The scikit-learn benchmark's best classical result on Fashion-MNIST (an RBF SVC).
SVC_ACCURACY = 0.897


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=DEBIAN_FASHION_MNIST)
    parser.add_argument("--store", default="runs/fashion-mnist")
    parser.add_argument("--memory-limit", default="20GiB")
    parser.add_argument("--n-train", type=int, default=60_000)
    parser.add_argument("--n-test", type=int, default=10_000)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--relative-reg", type=float, default=1e-2,
                        help="diag_reg as a fraction of the mean kernel diagonal of the "
                             "first 100 training inputs (as widenets predict)")
    parser.add_argument("--output", default="benchmarks/results/fashion.json")
    args = parser.parse_args()
    started = time.perf_counter()
    x_train, labels_train, x_test, labels_test = load_idx(args.folder)
    x = torch.from_numpy(unit_mean_square(x_train[:args.n_train]))
    xs = torch.from_numpy(unit_mean_square(x_test[:args.n_test]))
    y = torch.from_numpy(one_hot_targets(labels_train[:args.n_train]))
    truth = labels_test[:args.n_test]
    net = mlp(args.depth, "relu", 512, W_std=2 ** 0.5, b_std=0.05, outputs=10)
    loaded = time.perf_counter() - started
    report: dict = {
        "date": str(datetime.date.today()), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "n_train": len(x), "n_test": len(xs), "architecture": repr(net),
        "memory_limit": args.memory_limit, "load_seconds": loaded, "kernels": {},
    }
    for get in ("nngp", "ntk"):
        reg = relative_diag_reg(net, x, get, args.relative_reg)
        start = time.perf_counter()
        posterior = gp_inference(net, x, y, diag_reg=reg, store=Path(args.store),
                                 memory_limit=args.memory_limit, progress=True)
        mean, _ = posterior(xs, get=get, compute_cov=False)
        seconds = time.perf_counter() - start
        accuracy = float(np.mean(mean.argmax(dim=1).numpy() == truth))
        report["kernels"][get] = {
            "accuracy": accuracy, "seconds": seconds, "diag_reg": reg,
            "relative_residual": posterior.relative_residuals[get],
            "stages": dict(posterior.stage_seconds),
        }
        print(f"{get}: accuracy {accuracy:.4f} (RBF SVC: {SVC_ACCURACY}), {seconds:.0f} s, "
              f"relative residual {posterior.relative_residuals[get]:.1e}", flush=True)
    report["total_seconds"] = time.perf_counter() - started
    report["peak_resident_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["disk_bytes"] = disk_bytes(Path(args.store))
    print(f"total {report['total_seconds'] / 60:.1f} min, peak resident memory "
          f"{report['peak_resident_bytes'] / 2**30:.1f} GiB, disk "
          f"{report['disk_bytes'] / 1e9:.1f} GB")
    for result in report["kernels"].values():
        for stage, value in result["stages"].items():
            print(f"  {stage:<22} {value:8.0f} s")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
