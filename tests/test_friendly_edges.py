"""The front door: a missing optional dependency names the extra that installs it, and an
input that looks channels-last gets a warning naming the layouts and the conversion."""

from __future__ import annotations

import importlib
import sys
import warnings

import numpy as np
import pytest
import torch

import widenets as wn
from widenets.optional import require

CNN2 = wn.Sequential(wn.Conv2d(2, 3, padding="same"), wn.ReLU(), wn.GlobalAvgPool(),
                     wn.Linear(1))
CNN1 = wn.Sequential(wn.Conv1d(2, 3, padding="same"), wn.ReLU(), wn.GlobalAvgPool(),
                     wn.Linear(1))
CNN3 = wn.Sequential(wn.Conv3d(2, 3, padding="same"), wn.ReLU(), wn.GlobalAvgPool(),
                     wn.Linear(1))
FC = wn.Sequential(wn.Linear(4), wn.ReLU(), wn.Linear(1))


def data(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


# Missing optional dependencies.


def hide(monkeypatch: pytest.MonkeyPatch, *packages: str) -> None:
    """Make ``packages`` and their submodules unimportable (``None`` in ``sys.modules``) and
    forget the widenets modules that import them, so that importing those again meets the
    gap; everything is restored after the test."""
    for name in list(sys.modules):
        if name.partition(".")[0] in packages:
            monkeypatch.setitem(sys.modules, name, None)
    for name in packages:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("sklearn", "plot"):
        monkeypatch.delitem(sys.modules, f"widenets.{name}", raising=False)
        if name in vars(wn):  # a lazy submodule already imported (no import triggered)
            monkeypatch.delattr(wn, name)


@pytest.mark.parametrize(
    ("module", "hidden", "package"),
    [("widenets.sklearn", "sklearn", "scikit-learn"),
     ("widenets.plot", "matplotlib", "matplotlib")],
)
def test_demo_modules_name_the_extra(monkeypatch, module, hidden, package):
    hide(monkeypatch, hidden)
    with pytest.raises(ImportError) as info:
        importlib.import_module(module)
    message = str(info.value)
    assert package in message and hidden in message
    assert "pip install 'widenets[demo]'" in message
    assert info.value.name == hidden


def test_attribute_access_names_the_extra(monkeypatch):
    hide(monkeypatch, "sklearn")
    with pytest.raises(ImportError, match=r"widenets\[demo\]"):
        wn.sklearn  # noqa: B018  (the lazy submodule import is the point)


def test_store_names_the_extra(monkeypatch, tmp_path):
    hide(monkeypatch, "zarr")
    path = tmp_path / "k.zarr"
    with pytest.raises(ImportError) as info:
        wn.kernel_matrix(FC, data(6, 3), store=path, progress=False)
    assert "zarr" in str(info.value) and "pip install 'widenets[store]'" in str(info.value)
    assert not path.exists()  # refused before the store was created


def test_client_names_the_extra(monkeypatch):
    hide(monkeypatch, "distributed")
    with pytest.raises(ImportError) as info:
        wn.kernel_matrix(FC, data(6, 3), client=object(), progress=False)
    assert "distributed" in str(info.value) and "pip install 'widenets[dask]'" in str(info.value)


def test_require_returns_the_module_and_names_a_missing_package(monkeypatch):
    assert require("numpy", "demo", "this test") is np
    monkeypatch.setitem(sys.modules, "widenets_test_outer", None)
    with pytest.raises(ModuleNotFoundError, match=r"widenets\[store\]"):
        require("widenets_test_outer.sub", "store", "this test")


def test_require_reraises_unrelated_missing_module(monkeypatch, tmp_path):
    (tmp_path / "widenets_test_broken.py").write_text("import widenets_test_absent\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "widenets_test_absent", None)
    with pytest.raises(ModuleNotFoundError) as info:
        require("widenets_test_broken", "demo", "this test")
    assert info.value.name == "widenets_test_absent"
    assert "widenets[demo]" not in str(info.value)


# Channels-last inputs.


def test_nhwc_image_warns_through_kernel():
    x = data(3, 8, 8, 2)
    with pytest.warns(UserWarning) as record:
        CNN2.kernel(x, get="nngp")
    message = str(record[0].message)
    assert "x1" in message and "(3, 8, 8, 2)" in message
    assert "(N, C, H, W)" in message and "(N, H, W, C)" in message and "C = 2" in message
    assert "x.permute(0, 3, 1, 2)" in message and "np.transpose(x, (0, 3, 1, 2))" in message
    assert record[0].filename == __file__  # points at the user's call


def test_nhwc_numpy_warns_for_x1_and_x2():
    with pytest.warns(UserWarning) as record:
        CNN2.kernel(np.zeros((2, 8, 8, 3)), np.zeros((4, 8, 8, 3)), get="nngp")
    messages = [str(entry.message) for entry in record]
    assert any("x1 has shape (2, 8, 8, 3)" in message for message in messages)
    assert any("x2 has shape (4, 8, 8, 3)" in message for message in messages)


@pytest.mark.parametrize(
    ("net", "shape", "expected", "order"),
    [(CNN1, (3, 10, 2), "(N, C, L)", "(0, 2, 1)"),
     (CNN3, (2, 5, 5, 5, 1), "(N, C, D, H, W)", "(0, 4, 1, 2, 3)")],
)
def test_channels_last_warns_in_1d_and_3d(net, shape, expected, order):
    with pytest.warns(UserWarning) as record:
        net.kernel(data(*shape), get="nngp")
    message = str(record[0].message)
    assert expected in message and f"x.permute{order}" in message


def test_channels_last_warns_in_kernel_matrix():
    with pytest.warns(UserWarning, match=r"\(N, H, W, C\)"):
        wn.kernel_matrix(CNN2, data(3, 8, 8, 2), get="nngp", progress=False)


@pytest.mark.parametrize(
    ("net", "shape"),
    [(CNN2, (3, 2, 8, 8)), (CNN2, (3, 3, 32, 3)), (CNN2, (3, 2, 4, 4)), (CNN1, (3, 2, 10)),
     (CNN3, (2, 1, 5, 5, 5)), (FC, (3, 3)), (FC, (3, 100))],
)
def test_channels_first_and_dense_inputs_do_not_warn(net, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net.kernel(data(*shape), get="nngp")


def test_datasets_resolve_lazily_and_name_the_extra(monkeypatch):
    """``wn.datasets`` works after a plain ``import widenets``; loading the digits without
    scikit-learn names the extra to install."""
    assert callable(wn.datasets.load_digits)
    hide(monkeypatch, "sklearn")
    with pytest.raises(ImportError, match=r"widenets\[demo\]"):
        wn.datasets.load_digits(n_train=10, n_test=5)
