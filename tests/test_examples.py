"""The scripts in ``examples/`` run (``--quick``), write a real figure, and return numbers
that say the example shows what its docstring claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, out: Path) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--out", str(out)])
    figure = out / f"{name}.png"
    assert figure.is_file() and result["figure"] == str(figure)
    assert figure.stat().st_size > 20_000
    pixels = matplotlib.image.imread(figure)
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    return result


def test_regression_1d(tmp_path: Path) -> None:
    r = run_example("regression_1d", tmp_path)
    # Noise std 0.1 on the targets: the NNGP posterior smooths, the NTK nearly interpolates.
    assert r["nngp_train_max_error"] < 0.35
    assert r["ntk_train_max_error"] < 0.1
    for kernel in ("nngp", "ntk"):
        assert r[f"{kernel}_train_max_std"] < 0.15
        assert r[f"{kernel}_far_min_std"] > 2 * r[f"{kernel}_train_max_std"]


def test_training_vs_ntk(tmp_path: Path) -> None:
    r = run_example("training_vs_ntk", tmp_path)
    distance = r["final_distance"]
    assert r["widths"] == sorted(r["widths"])
    assert all(a > b for a, b in zip(distance, distance[1:]))  # closer as the width grows
    assert distance[-1] < 0.1 and distance[-1] < distance[0] / 3
    assert -0.9 < r["distance_slope"] < -0.25  # theory: width^-1/2
    # The widest networks' mean test loss matches the NTK ensemble's expected test loss.
    assert r["final_loss_finite"][-1] == pytest.approx(r["final_loss_infinite"], rel=0.25)


def test_cnn_digits(tmp_path: Path) -> None:
    r = run_example("cnn_digits", tmp_path)
    assert r["accuracy"]["CNN-GAP NNGP"] > 0.8 and r["accuracy"]["CNN-GAP NTK"] > 0.8
    assert min(r["accuracy"].values()) > 0.5  # chance is 0.1
    assert r["same_class_correlation"] > r["other_class_correlation"]


def test_lazy_regime(tmp_path: Path) -> None:
    r = run_example("lazy_regime", tmp_path)
    assert -0.8 < r["slopes"]["weight_change"] < -0.3  # theory: -1/2 (one hidden layer)
    assert r["slopes"]["ntk_change"] < -0.3  # at least about -1/2, in practice steeper
    assert np.all(np.diff(r["weight_changes"]) < 0) and np.all(np.diff(r["ntk_changes"]) < 0)
    assert np.all(np.array(r["final_losses"]) < 0.2 * np.array(r["initial_losses"]))  # trained


def test_large_kernel_store(tmp_path: Path) -> None:
    r = run_example("large_kernel_store", tmp_path)
    n_tiles = -(-r["n"] // r["tile"])
    assert r["tiles"] == n_tiles * (n_tiles + 1) // 2  # upper triangle only
    first, second, third = r["computed"]
    assert first == r["tiles"] and 0 < second < first and third == 0
    assert r["recomputed_are_lost"] and r["calls_agree"]
    assert r["max_relative_difference_to_net_kernel"] < 1e-12
    assert not list(tmp_path.glob("*.zarr"))  # the temporary store is gone
