"""wn.experiments.lazy_training and ``widenets lazy``: the lazy regime, measured."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import widenets as wn
from widenets.apps import cli
from widenets.experiments import (
    LazyTrainingResult,
    lazy_training,
    log_log_slope,
    weighted_layers,
    with_hidden_width,
)

DTYPE = torch.float64
WIDTHS = [64, 256, 1024, 4096]
STEPS = 60
SEEDS = (0, 1)


def _task(n: int = 30, d: int = 8, outputs: int = 1, seed: int = 100):
    """Inputs of norm sqrt(d) and random targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=DTYPE, generator=g)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    return x, torch.randn(n, outputs, dtype=DTYPE, generator=g)


def _mlp(hidden_layers: int, outputs: int = 1, width: int = 3) -> wn.Sequential:
    layers = []
    for _ in range(hidden_layers):
        layers += [wn.Linear(width, 1.5, 0.05), wn.ReLU()]
    return wn.Sequential(*layers, wn.Linear(outputs, 1.0, 0.05))


def _learning_rate(net: wn.Layer, x: torch.Tensor) -> float:
    return 1.0 / float(torch.linalg.eigvalsh(net.kernel(x, get="ntk"))[-1])


def _pooled_slope(results: list[LazyTrainingResult], values) -> float:
    """One log-log slope fitted to the values of several seeds together."""
    widths = [w for r in results for w in r.widths]
    ys = [v for r in results for v in values(r)]
    slope, _ = np.polyfit(np.log(widths), np.log(ys), 1)
    return float(slope)


@pytest.fixture(scope="module")
def one_hidden() -> list[LazyTrainingResult]:
    """One hidden ReLU layer, widths 64 to 4096, two seeds (data and networks)."""
    runs = []
    for seed in SEEDS:
        x, y = _task(seed=100 + seed)
        net = _mlp(1)
        runs.append(lazy_training(net, x, y, WIDTHS, STEPS, _learning_rate(net, x),
                                  seed=seed, record_every=20))
    return runs


def test_records_have_the_documented_shape(one_hidden):
    result = one_hidden[0]
    assert result.widths == WIDTHS and result.steps == STEPS and result.ntk_points == 30
    for record, width in zip(result.records, WIDTHS):
        assert record.width == width
        assert record.recorded_steps == [0, 20, 40, 60]
        assert len(record.losses) == len(record.linear_losses) == STEPS + 1
        for values in (record.weight_changes, record.ntk_changes,
                       record.linearization_distances):
            assert len(values) == 4 and values[0] == 0.0
            assert all(math.isfinite(v) and v >= 0 for v in values)
        # The network and its linearization start from the same function.
        assert record.losses[0] == pytest.approx(record.linear_losses[0], rel=1e-12)
        # Both are trained: the loss falls.
        assert record.losses[-1] < 0.5 * record.losses[0]
        assert record.linear_losses[-1] < 0.5 * record.linear_losses[0]
        assert record.recorded_losses == [record.losses[t] for t in (0, 20, 40, 60)]
        # (d + 1) * w first-layer weights and biases, w + 1 read-out weights and bias.
        assert record.n_params == 9 * width + width + 1
    assert set(result.slopes) == {"weight_change", "ntk_change", "linearization_distance",
                                  "ntk_init_distance"}
    assert result.slopes["ntk_change"] == pytest.approx(
        log_log_slope(WIDTHS, result.final("ntk_changes")))
    assert result.to_dict()["records"][0]["width"] == 64


def test_weight_and_ntk_changes_fall_with_width(one_hidden):
    for result in one_hidden:
        for name in ("weight_changes", "ntk_changes"):
            finals = result.final(name)
            assert all(a > b for a, b in zip(finals, finals[1:])), (name, finals)
    # One hidden layer: ||w_t - w_0|| stays O(1) and ||w_0|| ~ sqrt(10 w), so the
    # relative weight change falls like w^-1/2 (measured -0.47 to -0.52 with seeds 0 to 3).
    weight_slope = _pooled_slope(one_hidden, lambda r: r.final("weight_changes"))
    assert -0.65 < weight_slope < -0.35
    # The NTK change falls at least like the w^-1/2 bound of Lee et al. (2019); with
    # ReLU it is steeper (measured -0.78 to -0.90 with seeds 0 to 3), towards the w^-1 of smooth
    # activations (Dyer & Gur-Ari 2020).
    ntk_slope = _pooled_slope(one_hidden, lambda r: r.final("ntk_changes"))
    assert -1.2 < ntk_slope < -0.5


def test_network_approaches_its_linearization(one_hidden):
    for result in one_hidden:
        distances = result.final("linearization_distances")
        assert distances[-1] < 0.5 * distances[0]
        assert all(d > 0 for d in distances)
    # Measured -0.41 to -0.53 with seeds 0 to 3.
    slope = _pooled_slope(one_hidden, lambda r: r.final("linearization_distances"))
    assert -0.8 < slope < -0.25


def test_initial_ntk_approaches_the_infinite_one(one_hidden):
    distance = {w: np.mean([r.records[i].ntk_init_distance for r in one_hidden])
                for i, w in enumerate(WIDTHS)}
    assert distance[1024] < 0.5 * distance[64]
    assert distance[4096] < distance[1024]
    slope = _pooled_slope(one_hidden, lambda r: [q.ntk_init_distance for q in r.records])
    assert -0.75 < slope < -0.3


def test_two_hidden_layers_weight_change_is_steeper():
    # Hidden-to-hidden weights: ||w_0|| ~ w, so the relative weight change falls faster
    # than w^-1/2 (measured -0.90 to -1.03 with seeds 0 to 2).
    x, y = _task(n=20)
    net = _mlp(2)
    result = lazy_training(net, x, y, [64, 256, 1024], 40, _learning_rate(net, x),
                           record_every=40)
    assert result.records[0].recorded_steps == [0, 40]
    assert result.slopes["weight_change"] < -0.75
    finals = result.final("ntk_changes")
    assert finals[0] > finals[1] > finals[2]


def test_with_hidden_width_leaves_net_untouched():
    inner = wn.Sequential(wn.ReLU(), wn.Linear(7, 1.5))
    net = wn.Sequential(
        wn.Linear(7, 1.5, 0.05),
        wn.Residual(inner),
        wn.ReLU(),
        wn.Linear(2),
    )
    before = repr(net)
    wide = with_hidden_width(net, 128)
    assert repr(net) == before
    assert [layer.width for layer in weighted_layers(net)] == [7, 7, 2]
    assert [layer.width for layer in weighted_layers(wide)] == [128, 128, 2]
    assert wide is not net and wide.layers[1].block.layers[1] is not inner.layers[1]
    # The copy is consistent: Residual's block is the one inside its composition.
    model = wide.build((3,), torch.Generator().manual_seed(0), dtype=DTYPE)
    assert model(torch.zeros(4, 3, dtype=DTYPE)).shape == (4, 2)
    x = torch.randn(6, 3, dtype=DTYPE)
    torch.testing.assert_close(wide.kernel(x), net.kernel(x))


def test_with_hidden_width_convolutions():
    cnn = wn.Sequential(wn.Conv2d(4, 3, padding="same"), wn.ReLU(), wn.Conv2d(4, 3),
                        wn.ReLU(), wn.Flatten(), wn.Linear(3))
    wide = with_hidden_width(cnn, 16)
    assert [layer.width for layer in weighted_layers(wide)] == [16, 16, 3]
    model = wide.build((2, 6, 6), torch.Generator().manual_seed(0), dtype=DTYPE)
    assert model(torch.zeros(2, 2, 6, 6, dtype=DTYPE)).shape == (2, 3)


def test_with_hidden_width_errors():
    with pytest.raises(TypeError, match="widenets Layer"):
        with_hidden_width("not a layer", 8)
    with pytest.raises(ValueError, match="width"):
        with_hidden_width(_mlp(1), 0)
    with pytest.raises(TypeError, match="width"):
        with_hidden_width(_mlp(1), 2.5)
    with pytest.raises(ValueError, match="no weighted layer"):
        with_hidden_width(wn.Sequential(wn.ReLU()), 8)
    shared = wn.Linear(3)
    with pytest.raises(ValueError, match="read-out"):
        with_hidden_width(wn.Sequential(shared, wn.ReLU(), shared), 8)


def test_readout_width_mismatch():
    x, y = _task(n=10, outputs=2)
    with pytest.raises(ValueError, match="read-out.*width 1 but y has 2 outputs"):
        lazy_training(_mlp(1, outputs=1), x, y, [8], 2, 0.1)


def test_callable_net_and_numpy_inputs():
    x, y = _task(n=12)
    result = lazy_training(lambda w: _mlp(1, width=w), x.numpy(), y[:, 0].numpy(),
                           [16, 32], 3, 0.05, record_every=1, ntk_points=5)
    assert result.ntk_points == 5
    assert [r.width for r in result.records] == [16, 32]
    assert [r.n_params for r in result.records] == [10 * 16 + 1, 10 * 32 + 1]
    assert result.records[0].recorded_steps == [0, 1, 2, 3]
    # Same seed and width: the same numbers.
    again = lazy_training(_mlp(1), x, y, [16], 3, 0.05, record_every=1, ntk_points=5)
    assert again.records[0].losses == pytest.approx(result.records[0].losses, rel=1e-12)
    assert result.slopes["weight_change"] is not None
    single = lazy_training(_mlp(1), x, y, [16], 1, 0.05)
    assert all(v is None for v in single.slopes.values())


def test_divergence_names_width_and_learning_rate():
    x, y = _task(n=10)
    with pytest.raises(RuntimeError, match="width 8.*learning rate 1000"):
        lazy_training(_mlp(1), x, y, [8], 50, 1000.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"widths": []}, ValueError, "widths"),
        ({"widths": [8, 0]}, ValueError, "widths"),
        ({"widths": [8, 8]}, ValueError, "distinct"),
        ({"widths": "8"}, TypeError, "widths"),
        ({"widths": [8.0]}, TypeError, "widths"),
        ({"steps": 0}, ValueError, "steps"),
        ({"steps": 1.5}, TypeError, "steps"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
        ({"learning_rate": -1.0}, ValueError, "learning_rate"),
        ({"learning_rate": float("inf")}, ValueError, "learning_rate"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate"),
        ({"seed": -1}, ValueError, "seed"),
        ({"record_every": 0}, ValueError, "record_every"),
        ({"ntk_points": 0}, ValueError, "ntk_points"),
        ({"dtype": torch.int64}, ValueError, "dtype"),
        ({"net": "mlp"}, TypeError, "net"),
        ({"net": lambda w: "mlp"}, TypeError, "net"),
        ({"net": wn.Sequential(wn.Linear(1))}, ValueError, "no hidden"),
        ({"x": [1.0, 2.0]}, ValueError, "x"),
        ({"y": np.zeros(9)}, ValueError, "same number of examples"),
        ({"y": np.zeros((10, 1, 1))}, ValueError, "y"),
        ({"y": "targets"}, TypeError, "y"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    x, y = _task(n=10)
    arguments = {"net": _mlp(1), "x": x, "y": y, "widths": [8], "steps": 2,
                 "learning_rate": 0.1}
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        lazy_training(**arguments)


def test_figures_and_report(tmp_path):
    x, y = _task(n=10, outputs=2)
    result = lazy_training(_mlp(1, outputs=2), x, y, [16, 64], 4, 0.05, out_dir=tmp_path,
                           record_every=2)
    assert set(result.figures) == {"losses", "scaling"}
    for path in result.figures.values():
        assert path.startswith(str(tmp_path))
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert result.report == str(tmp_path / "report.md")
    assert "| 16 |" in text and "| 64 |" in text and "ntk_change" in text


def test_cli_lazy(tmp_path, capsys):
    out = tmp_path / "lazy-out"
    status = cli.main(["lazy", "--out", str(out), "--widths", "16,32", "--steps", "4",
                       "--n-train", "20", "--ntk-points", "8", "--seed", "1",
                       "--no-progress"])
    assert status == 0
    for name in ("losses.png", "scaling.png", "report.md"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert str(out / "scaling.png") in printed
    assert "width    32" in printed and "NTK change ~ width^" in printed
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "20 training images" in report and "1 / lambda_max" in report


def test_cli_lazy_learning_rate_and_divergence(tmp_path, capsys):
    status = cli.main(["lazy", "--out", str(tmp_path), "--widths", "8", "--steps", "30",
                       "--n-train", "20", "--ntk-points", "4", "--learning-rate", "50",
                       "--no-progress"])
    assert status == 1
    assert "diverged for width 8" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["lazy", "--steps", "0"],
        ["lazy", "--widths", "0"],
        ["lazy", "--widths", "16,16"],
        ["lazy", "--learning-rate", "-1"],
        ["lazy", "--learning-rate", "nan"],
        ["lazy", "--n-train", "5"],
        ["lazy", "--ntk-points", "0"],
    ],
)
def test_cli_lazy_bad_arguments_exit(argv, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--out", str(tmp_path), "--no-progress"])
    assert info.value.code == 2
    assert not (tmp_path / "report.md").exists()
