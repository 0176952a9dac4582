"""``widenets predict``: predictions of an IDX data set written here, from a store with a
small memory limit, equal to the library's; resumed by the same command; .npy data and
the digits; errors for missing or mismatched data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_idx import data_set, write_data_set
from widenets.apps.arguments import kernel_architecture
from widenets.apps.cli import main
from widenets.datasets import one_hot_targets, unit_mean_square
from widenets.predict import gp_inference

pytestmark = pytest.mark.usefixtures("one_thread")


def idx_folder(tmp_path):
    arrays = data_set(np.random.default_rng(0), n_train=60, n_test=12)
    write_data_set(tmp_path / "data", arrays, compressed=True)
    return tmp_path / "data", arrays


def test_predictions_from_a_store_equal_the_librarys_and_resume(tmp_path, capsys):
    folder, (images, labels, test_images, test_labels) = idx_folder(tmp_path)
    arguments = ["predict", "--data", str(folder), "--store", str(tmp_path / "store"),
                 "--memory-limit", "40KiB", "--depth", "2", "--diag-reg", "0.05",
                 "--predictions", str(tmp_path / "out"), "--no-progress"]
    assert main(arguments) == 0
    printed = capsys.readouterr().out
    assert "60 training and 12 test examples" in printed
    net = kernel_architecture("fc", 2, 2 ** 0.5, 0.05, "relu")
    x, xs = torch.from_numpy(unit_mean_square(images)), torch.from_numpy(
        unit_mean_square(test_images))
    posterior = gp_inference(net, x, torch.from_numpy(one_hot_targets(labels)),
                             diag_reg=0.05)
    for get in ("nngp", "ntk"):
        got = np.load(tmp_path / "out" / f"{get}.npy")
        expected = posterior(xs, get=get, compute_cov=False)[0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * abs(expected).max())
        accuracy = np.mean(expected.argmax(axis=1) == test_labels)
        assert f"{get}: diag_reg 0.05" in printed and f"test accuracy {accuracy:.4f}" in printed
    first = {get: np.load(tmp_path / "out" / f"{get}.npy") for get in ("nngp", "ntk")}
    assert main(arguments) == 0  # resumed: everything read back from the store
    for get in ("nngp", "ntk"):
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{get}.npy"), first[get])


def test_npy_data_and_the_digits(tmp_path, capsys):
    rng = np.random.default_rng(1)
    x, xs = rng.standard_normal((30, 5)), rng.standard_normal((7, 5))
    targets = rng.standard_normal((30, 2))
    for name, value in (("x", x), ("y", targets), ("xs", xs)):
        np.save(tmp_path / f"{name}.npy", value)
    assert main(["predict", "--data", str(tmp_path / "x.npy"), "--targets",
                 str(tmp_path / "y.npy"), "--test", str(tmp_path / "xs.npy"), "--get", "ntk",
                 "--diag-reg", "0.1", "--predictions", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    net = kernel_architecture("fc", 3, 2 ** 0.5, 0.05, "relu")
    expected = gp_inference(net, torch.from_numpy(x), torch.from_numpy(targets),
                            diag_reg=0.1)(torch.from_numpy(xs), get="ntk",
                                          compute_cov=False)[0].numpy()
    np.testing.assert_allclose(np.load(tmp_path / "out" / "ntk.npy"), expected, rtol=1e-12)
    assert "test accuracy" not in capsys.readouterr().out
    assert main(["predict", "--data", "digits", "--n-train", "300", "--n-test", "50",
                 "--get", "nngp", "--predictions", str(tmp_path / "digits"),
                 "--no-progress"]) == 0
    assert np.load(tmp_path / "digits" / "nngp.npy").shape == (50, 10)
    assert "test accuracy" in capsys.readouterr().out


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["predict", "--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((4, 3)))
    assert main(["predict", "--data", str(tmp_path / "x.npy")]) == 2
    assert "--targets is needed" in capsys.readouterr().err
    np.save(tmp_path / "y.npy", np.zeros(3))
    assert main(["predict", "--data", str(tmp_path / "x.npy"), "--targets",
                 str(tmp_path / "y.npy"), "--test", str(tmp_path / "x.npy")]) == 2
    assert "--targets has 3 rows for 4 inputs" in capsys.readouterr().err
    folder, _ = idx_folder(tmp_path)
    assert main(["predict", "--data", str(folder), "--store", str(tmp_path / "s"),
                 "--memory-limit", "1KiB", "--no-progress"]) == 1
    assert "the minimum is" in capsys.readouterr().err


def test_relative_diag_reg_is_a_fraction_of_the_mean_diagonal_of_the_first_inputs():
    from widenets.predict.common import DIAGONAL_SAMPLE, relative_diag_reg

    net = kernel_architecture("fc", 2, 1.5, 0.1, "relu")
    x = torch.randn(DIAGONAL_SAMPLE + 30, 5, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    x[DIAGONAL_SAMPLE:] *= 10  # inputs past the sample do not count
    for get in ("nngp", "ntk"):
        diagonal = torch.stack([net.kernel(x[i:i + 1], get=get)[0, 0]
                                for i in range(DIAGONAL_SAMPLE)])
        assert relative_diag_reg(net, x, get, 0.01) == pytest.approx(
            0.01 * float(diagonal.mean()), rel=1e-12)
