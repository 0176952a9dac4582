"""The demo and the command line, on a small subset of the digits (a few seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from widenets.apps import cli  # noqa: E402
from widenets.apps.demo import (  # noqa: E402
    TWIN_METRICS,
    make_figure,
    network_seed,
    per_seed_slopes,
    run_demo,
    summarize_twins,
)
from widenets.architectures import demo_cnn as cnn_architecture  # noqa: E402
from widenets.architectures import demo_mlp as architecture  # noqa: E402
from widenets.datasets import load_digits as load_data  # noqa: E402

SMALL = {"widths": (32, 512), "steps": 30, "n_train": 200, "n_test": 200, "seed": 0,
         "cnn_n_train": 100, "cnn_n_test": 100, "seeds": 3}


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
        def kernel(self, x1, x2=None, get="ntk", progress=None):
            calls.append((len(x1), None if x2 is None else len(x2), get))
            return net.kernel(x1, x2, get=get, progress=progress)

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
    for seeds in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="seeds must be a positive integer"):
            run_demo(tmp_path, seeds=seeds, progress=False)


def test_cli_demo(tmp_path, capsys):
    out = tmp_path / "cli-out"
    status = cli.main(["demo", "--out", str(out), "--widths", "8,16", "--steps", "3",
                       "--n-train", "100", "--seed", "1", "--no-progress", "--seeds", "2",
                       "--cnn-n-train", "20", "--cnn-n-test", "10"])
    assert status == 0
    assert (out / "report.md").is_file() and (out / "demo.png").is_file()
    captured = capsys.readouterr()
    assert captured.err == ""  # --no-progress: no bar at all, the kernels' own included
    printed = captured.out
    assert "over 2 seeds per width" in printed
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


# --------------------------------------------------------------- several seeds per width
def test_results_hold_one_distance_per_width_and_seed(small_run):
    _, results = small_run
    runs, twins = results["runs"], results["twins"]
    n_seeds = SMALL["seeds"]
    assert results["settings"]["seeds"] == n_seeds
    assert [(r["width"], r["replicate"]) for r in runs] == [
        (w, k) for w in SMALL["widths"] for k in range(n_seeds)]
    # Every network has its own initialisation ...
    assert len({r["net_seed"] for r in runs}) == len(runs)
    assert len({round(r["distance"], 12) for r in runs}) == len(runs)
    assert all(math.isfinite(r["distance"]) and r["distance"] > 0 for r in runs)
    # ... and each width's summary holds exactly its own networks' values.
    assert [t["width"] for t in twins] == list(SMALL["widths"])
    for twin in twins:
        own = [r for r in runs if r["width"] == twin["width"]]
        assert twin["seeds"] == n_seeds and twin["replicates"] == list(range(n_seeds))
        for key in TWIN_METRICS:
            assert twin["per_seed"][key] == [r[key] for r in own]


def test_error_bars_are_computed_from_the_stored_values(small_run):
    _, results = small_run
    for twin in results["twins"]:
        for key in TWIN_METRICS:
            values = np.array([r[key] for r in results["runs"] if r["width"] == twin["width"]])
            assert twin[key] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-15)
            assert twin[f"{key}_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12,
                                                       abs=1e-15)
            assert twin[f"{key}_sem"] == pytest.approx(
                np.std(values, ddof=1) / math.sqrt(len(values)), rel=1e-12, abs=1e-15)
        # The networks of one width do differ: a spread of zero would hide a bug.
        assert twin["distance_std"] > 0


def test_slope_is_fitted_to_the_means_and_per_seed(small_run):
    _, results = small_run
    twins = results["twins"]
    widths = [t["width"] for t in twins]
    means = [np.mean(t["per_seed"]["distance"]) for t in twins]
    expected = np.polyfit(np.log(widths), np.log(means), 1)[0]
    assert results["slope"] == pytest.approx(expected, rel=1e-10)
    slopes = results["slope_per_seed"]
    assert len(slopes) == SMALL["seeds"]
    for k, slope in enumerate(slopes):
        distances = [r["distance"] for r in results["runs"] if r["replicate"] == k]
        assert slope == pytest.approx(np.polyfit(np.log(widths), np.log(distances), 1)[0])
    assert results["slope_std"] == pytest.approx(np.std(slopes, ddof=1))
    assert all(s < 0 for s in slopes)


def test_report_and_summary_show_the_spread(small_run):
    from widenets.apps.demo import summary

    out, results = small_run
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "### Every network" in text
    assert "one sample standard deviation over the seeds" in text
    for run in results["runs"]:
        assert f"| {run['width']} | {run['replicate']} | {run['net_seed']} |" in text
        assert f"{run['distance']:.4f}" in text
    for twin in results["twins"]:
        assert f"{twin['distance']:.4f} ± {twin['distance_std']:.4f}" in text
    assert "per-width means" in text
    assert ", ".join(f"{s:.3f}" for s in results["slope_per_seed"]) in text
    lines = summary(results)
    assert any("± " in line and "width    32" in line for line in lines)
    assert any("per seed" in line for line in lines)


def test_network_seed_keeps_replicate_zero():
    from widenets.apps.common import twin_seed

    assert network_seed(0, 64) == network_seed(0, 64, 0) == twin_seed(0, 64)
    seeds = {network_seed(s, w, k) for s in (0, 1) for w in (64, 256) for k in range(4)}
    assert len(seeds) == 16


def test_summarize_twins_one_seed_and_ragged_replicates():
    runs = [
        {"width": 8, "replicate": 0, "net_seed": 1, "seconds": 1.0,
         **{key: 1.0 for key in TWIN_METRICS}, "distance": 0.8},
        {"width": 32, "replicate": 0, "net_seed": 2, "seconds": 2.0,
         **{key: 1.0 for key in TWIN_METRICS}, "distance": 0.4},
        {"width": 32, "replicate": 1, "net_seed": 3, "seconds": 2.0,
         **{key: 1.0 for key in TWIN_METRICS}, "distance": 0.2},
    ]
    small, large = summarize_twins(runs)
    assert small["seeds"] == 1 and small["distance"] == 0.8 and small["distance_std"] == 0.0
    assert large["seeds"] == 2 and large["distance"] == pytest.approx(0.3)
    assert large["distance_std"] == pytest.approx(np.std([0.4, 0.2], ddof=1))
    assert large["seconds"] == 4.0
    assert small["local_slope"] is None
    assert large["local_slope"] == pytest.approx(math.log(0.3 / 0.8) / math.log(4))
    # Replicate 1 lacks width 8: only replicate 0 gives a slope (log2(0.4 / 0.8) / 2).
    assert per_seed_slopes(runs) == [pytest.approx(-0.5)]


def _legend_handle_visible(handle) -> bool:
    from matplotlib.collections import Collection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if not handle.get_visible():
        return False
    if isinstance(handle, Line2D):
        line = handle.get_linestyle() not in ("None", "none", "", " ") and (
            handle.get_linewidth() > 0)
        marker = handle.get_marker() not in (None, "None", "none", "", " ") and (
            handle.get_markersize() > 0)
        return line or marker
    if isinstance(handle, Collection):
        sizes = handle.get_sizes() if hasattr(handle, "get_sizes") else []
        return bool((len(sizes) and max(sizes) > 0) or max(handle.get_linewidths()) > 0)
    if isinstance(handle, Patch):
        return handle.get_facecolor()[3] > 0 or handle.get_linewidth() > 0
    return False


@pytest.fixture(scope="module")
def small_figure(small_run):
    _, results = small_run
    fig = make_figure(results)
    fig.canvas.draw()  # lay out, as saving does
    return fig


def test_plot_legends_show_every_entry(small_figure):
    from matplotlib.lines import Line2D

    axes = small_figure.axes
    assert len(axes) == 3
    for ax in axes:
        legend = ax.get_legend()
        assert legend is not None
        handles, texts = legend.legend_handles, legend.get_texts()
        assert len(handles) == len(texts) > 0
        for handle, text in zip(handles, texts):
            assert _legend_handle_visible(handle), text.get_text()
        # The artist behind every legend entry is drawn inside the axes: an entry for a
        # line outside the view (the training loss at t = inf) would show nothing.
        labels = {text.get_text() for text in texts}
        box = ax.get_window_extent()
        for line in ax.get_lines():
            if line.get_label() in labels and isinstance(line, Line2D):
                xy = line.get_transform().transform(
                    np.column_stack([line.get_xdata(), line.get_ydata()]).astype(float))
                inside = ((xy[:, 0] >= box.x0 - 1) & (xy[:, 0] <= box.x1 + 1)
                          & (xy[:, 1] >= box.y0 - 1) & (xy[:, 1] <= box.y1 + 1))
                assert inside.any(), line.get_label()


def test_plot_bars_start_at_zero_and_axes_are_labelled(small_figure, small_run):
    _, results = small_run
    acc_ax, dist_ax, losses_ax = small_figure.axes
    assert acc_ax.get_ylim()[0] == 0.0
    assert acc_ax.patches and all(rect.get_y() == 0.0 for rect in acc_ax.patches)
    for ax in small_figure.axes:
        assert ax.get_xlabel() and ax.get_ylabel()
        for scale, label in ((ax.get_xscale(), ax.get_xlabel()),
                             (ax.get_yscale(), ax.get_ylabel())):
            if scale in ("log", "symlog"):
                assert "log scale" in label, label
    assert dist_ax.get_xscale() == dist_ax.get_yscale() == "log"
    # Every error bar, and the legend, says how it was computed.
    n_seeds = SMALL["seeds"]
    assert f"± 1 sd, {n_seeds} seeds" in " ".join(
        t.get_text() for ax in small_figure.axes for t in ax.get_legend().get_texts())


def test_plot_error_bars_are_one_standard_deviation(small_figure, small_run):
    _, results = small_run
    twins = results["twins"]
    _, dist_ax, _ = small_figure.axes
    # The first error-bar container of the distance panel is the distance to the NTK
    # prediction: one vertical bar per width from mean - sd to mean + sd.
    container = next(c for c in dist_ax.containers if c.has_yerr)
    (bars,) = container.lines[2]
    segments = bars.get_segments()
    assert len(segments) == len(twins)
    for segment, twin in zip(segments, twins):
        (x0, y0), (x1, y1) = segment
        assert x0 == x1 == twin["width"]
        assert sorted((y0, y1)) == pytest.approx(
            [twin["distance"] - twin["distance_std"], twin["distance"] + twin["distance_std"]])
