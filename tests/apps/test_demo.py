"""The demo and the command line, on a small subset of the digits (a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from widenets.apps import cli  # noqa: E402
from widenets.apps.demo import run_demo  # noqa: E402
from widenets.architectures import demo_cnn as cnn_architecture  # noqa: E402
from widenets.architectures import demo_mlp as architecture  # noqa: E402
from widenets.datasets import load_digits as load_data  # noqa: E402

SMALL = {"widths": (32, 512), "steps": 30, "n_train": 200, "n_test": 200, "seed": 0,
         "cnn_n_train": 100, "cnn_n_test": 100}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, progress=False, **SMALL)


def test_load_data_is_normalised_and_seeded():
    data = load_data(n_train=200, n_test=100, seed=3)
    assert data.x_train.shape == (200, 64) and data.x_test.shape == (100, 64)
    assert data.y_train.shape == (200, 10)
    np.testing.assert_allclose(np.linalg.norm(data.x_train, axis=1), 8.0)
    np.testing.assert_allclose(data.y_train.max(axis=1), 0.9)
    np.testing.assert_allclose(data.y_train.sum(axis=1), 0.0, atol=1e-12)
    again = load_data(n_train=200, n_test=100, seed=3)
    np.testing.assert_array_equal(data.x_test, again.x_test)
    assert not np.array_equal(load_data(n_train=200, n_test=100, seed=4).x_test, data.x_test)


@pytest.mark.parametrize("kwargs", [{"n_train": 5}, {"n_train": 1797}, {"n_test": 0},
                                    {"n_train": 1000, "n_test": 800}])
def test_load_data_rejects_bad_sizes(kwargs):
    with pytest.raises(ValueError):
        load_data(**kwargs)


def test_architecture_builds_twin_of_given_width():
    import torch

    model = architecture(16).build((64,), torch.Generator().manual_seed(0))
    out = model(torch.zeros(3, 64, dtype=torch.get_default_dtype()))
    assert out.shape == (3, 10)
    cnn = cnn_architecture(8).build((1, 8, 8), torch.Generator().manual_seed(0))
    assert cnn(torch.zeros(3, 1, 8, 8, dtype=torch.get_default_dtype())).shape == (3, 10)


def test_kernel_cache_computes_each_pair_once():
    import torch

    from widenets.apps.demo import KernelCache
    from widenets.predict import gp_inference

    data = load_data(n_train=20, n_test=10)
    net = architecture()
    calls = []

    class Counting:
        def kernel(self, x1, x2=None, get="ntk"):
            calls.append((len(x1), None if x2 is None else len(x2), get))
            return net.kernel(x1, x2, get=get)

    cache = KernelCache(Counting(), {"train": data.x_train, "test": data.x_test})
    for get in ("ntk", "nngp"):
        mean, _ = gp_inference(cache, data.x_train, data.y_train, diag_reg=1e-6)(
            data.x_test, get=get, compute_cov=False)
        expected, _ = gp_inference(net, data.x_train, data.y_train, diag_reg=1e-6)(
            data.x_test, get=get, compute_cov=False)
        torch.testing.assert_close(mean, expected, rtol=1e-12, atol=1e-12)
    # Both kernels of a pair in one pass, once.
    assert calls == [(20, None, ("nngp", "ntk")), (10, 20, ("nngp", "ntk"))]
    # The reverse pair is the transpose; unknown inputs are computed, not cached.
    torch.testing.assert_close(cache(data.x_train, data.x_test, "nngp"),
                               cache.pair("test", "train")["nngp"].T)
    assert len(calls) == 2
    cache(data.x_train[:3], None, "ntk")
    assert calls[-1] == (3, None, "ntk") and len(cache.kernels) == 2


def test_run_demo_writes_outputs(small_run):
    out, results = small_run
    report = out / "report.md"
    plot = out / "demo.png"
    assert results["report"] == str(report) and results["plot"] == str(plot)
    assert report.is_file() and plot.is_file()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text(encoding="utf-8")
    assert "| width |" in text and "NNGP posterior" in text
    assert "Infinite convolutional network (CNN-GAP), 100 training and 100 test" in text
    for width in SMALL["widths"]:
        assert f"| {width} |" in text
    assert "## Infinite network trained for a time t (NTK ensemble)" in text
    assert "| t | steps at lr | test accuracy of the mean |" in text
    assert "30 (the twins)" in text and "| inf | inf |" in text
    assert "distance to ensemble mean" in text


def test_run_demo_ensemble_over_time(small_run):
    _, results = small_run
    lr, steps = results["learning_rate"], SMALL["steps"]
    rows = results["ensemble"]
    # Times: 0.1, 1 and 10 times the twins' training (t = steps * lr), then t = inf.
    np.testing.assert_allclose([r["t"] for r in rows[:-1]], [0.1 * steps * lr, steps * lr,
                                                             10 * steps * lr])
    np.testing.assert_allclose([r["steps"] for r in rows[:-1]], [3, 30, 300])
    assert math.isinf(rows[-1]["t"])
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["mse"] > 0 for r in rows)
    # Trained to the end, the ensemble mean is the NTK posterior mean (same diag_reg).
    assert rows[-1]["accuracy"] == results["ntk_accuracy"]
    # The mean fits better with time; the expected losses fall.
    assert all(a["mse"] > b["mse"] for a, b in zip(rows, rows[1:]))
    assert all(a["train_loss"] > b["train_loss"] for a, b in zip(rows, rows[1:]))
    assert rows[0]["accuracy"] < rows[-1]["accuracy"]
    # Gradient flow for t = steps * lr and the discrete steps give nearly the same mean.
    at_twins = results["ensemble_at_twins"]
    assert at_twins == rows[1]
    assert abs(at_twins["accuracy"] - results["ntk_gd_mean_accuracy"]) <= 0.01
    losses = results["losses"]
    assert float(losses.times[0]) == 0.0 and math.isinf(float(losses.times[-1]))
    assert bool((losses.train[1:] < losses.train[:-1]).all())
    # t = 0 is the prior: mean 0, so the loss is 1/2 (||y||^2 + 10 trace K) per set.
    prior = 0.5 * (0.81 + 9 * 0.01 + 10 * results["nngp_diag"])
    assert float(losses.test[0]) / losses.n_test == pytest.approx(prior, rel=1e-9)
    assert float(losses.train[0]) / losses.n_train == pytest.approx(prior, rel=1e-9)


def test_twins_approach_the_ensemble_distribution(small_run):
    _, results = small_run
    small, large = results["twins"]
    spread = results["ensemble_at_twins"]["spread"]
    # A trained network keeps part of its random f0: its distance to the ensemble mean
    # does not vanish, it approaches the spread the ensemble predicts (1.0856 here;
    # width 32: 0.876, width 512: 1.085 measured with seed 0).
    assert large["distance_to_ensemble_mean"] == pytest.approx(spread, rel=0.1)
    assert abs(large["distance_to_ensemble_mean"] - spread) < abs(
        small["distance_to_ensemble_mean"] - spread)
    # Flow and discrete steps: nearly the same f0-free mean.
    for twin in results["twins"]:
        assert twin["distance_to_ensemble_mean"] == pytest.approx(
            twin["distance_to_ntk_mean"], rel=0.02)
        assert twin["test_loss"] > 0


def test_run_demo_numbers(small_run):
    _, results = small_run
    accuracies = [results["nngp_accuracy"], results["ntk_accuracy"],
                  results["ntk_gd_mean_accuracy"]]
    for twin in results["twins"]:
        accuracies += [twin["accuracy"], twin["ntk_accuracy"]]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    assert results["nngp_accuracy"] > 0.85
    assert results["ntk_accuracy"] > 0.85
    cnn = results["cnn"]
    assert (cnn["n_train"], cnn["n_test"]) == (100, 100)
    # 100 training digits: a CNN-GAP posterior classifies most test digits (0.92 and
    # 0.90 measured with seed 0; chance is 0.1).
    assert cnn["nngp_accuracy"] > 0.8 and cnn["ntk_accuracy"] > 0.8
    assert [t["width"] for t in results["twins"]] == list(SMALL["widths"])
    assert results["settings"]["n_train"] == 200 and results["settings"]["n_test"] == 200
    small, large = results["twins"]
    assert all(math.isfinite(t["distance"]) and t["distance"] > 0 for t in results["twins"])
    # The finite network approaches its NTK prediction as the width grows ...
    assert large["distance"] < small["distance"]
    assert large["distance"] < 0.5 * small["distance"]
    # ... while the distance to the f0-free NTK mean does not shrink.
    assert large["distance_to_ntk_mean"] > large["distance"]
    assert results["slope"] < 0
    assert small["local_slope"] is None and large["local_slope"] == pytest.approx(results["slope"])
    assert 0 < results["learning_rate"] * results["lambda_max"] <= 1.0 + 1e-9


def test_run_demo_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        run_demo(tmp_path, widths=(0,), progress=False)
    with pytest.raises(ValueError):
        run_demo(tmp_path, widths=(), progress=False)
    with pytest.raises(ValueError):
        run_demo(tmp_path, steps=0, progress=False)
    with pytest.raises(ValueError, match="cnn_n_test must be a positive integer"):
        run_demo(tmp_path, cnn_n_test=0, progress=False)


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "cli-out"
    status = cli.main(["demo", "--out", str(out), "--widths", "8,16", "--steps", "3",
                       "--n-train", "100", "--seed", "1", "--no-progress",
                       "--cnn-n-train", "20", "--cnn-n-test", "10"])
    assert status == 0
    assert (out / "report.md").is_file() and (out / "demo.png").is_file()
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed
    assert "NNGP posterior accuracy" in printed and "width    16" in printed
    assert "infinite CNN-GAP (20 train / 10 test images)" in printed
    assert "NTK ensemble mean accuracy over training time: t = " in printed
    assert "(3 steps)" in printed and "t = inf" in printed
    assert "to ensemble mean" in printed


def test_cli_widths_forms_are_equivalent():
    parser = cli.build_parser()
    spaced = parser.parse_args(["demo", "--widths", "64", "256"])
    commas = parser.parse_args(["demo", "--widths", "64,256"])
    assert [w for ws in spaced.widths for w in ws] == [w for ws in commas.widths for w in ws]


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["demo", "--steps", "0"],
        ["demo", "--steps", "many"],
        ["demo", "--widths", "0"],
        ["demo", "--widths", "64,x"],
        ["demo", "--seed", "-1"],
        ["demo", "--n-train", "5"],
        ["demo", "--unknown"],
    ],
)
def test_cli_bad_arguments_exit(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--out", str(tmp_path)] if argv[:1] == ["demo"] else argv)
    assert info.value.code == 2
    assert not (tmp_path / "report.md").exists()


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert "widenets" in capsys.readouterr().out
