"""The analytic kernels against Neural Tangents 0.6.5 (tests/data/nt_reference_public.npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import widenets as wn

# Architectures of the fully connected reference cases (see tests/data/README.md).
FC_CASES = {
    "fc_relu3": lambda: wn.Sequential(
        wn.Linear(64, 1.5, 0.05), wn.ReLU(),
        wn.Linear(64, 1.5, 0.05), wn.ReLU(),
        wn.Linear(1, 1.5, 0.05),
    ),
    "fc_erf2": lambda: wn.Sequential(wn.Linear(64, 2.0, 0.5), wn.Erf(), wn.Linear(1, 1.0, 0.1)),
}


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.numpy() - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("case", sorted(FC_CASES))
def test_fully_connected_matches_neural_tangents(case, reference):
    net = FC_CASES[case]()
    x1, x2 = reference[f"{case}/x1"], reference[f"{case}/x2"]
    k12 = net.kernel(x1, x2, get=("nngp", "ntk"))
    k11 = net.kernel(x1, None, get=("nngp", "ntk"))
    assert k12.nngp.dtype == torch.float64
    assert relative_error(k12.nngp, reference[f"{case}/nngp12"]) < 1e-10
    assert relative_error(k12.ntk, reference[f"{case}/ntk12"]) < 1e-10
    assert relative_error(k11.nngp, reference[f"{case}/nngp11"]) < 1e-10
    assert relative_error(k11.ntk, reference[f"{case}/ntk11"]) < 1e-10


@pytest.mark.parametrize("case", sorted(FC_CASES))
def test_single_get_equals_tuple_get(case, reference):
    net = FC_CASES[case]()
    x1, x2 = reference[f"{case}/x1"], reference[f"{case}/x2"]
    both = net.kernel(x1, x2, get=("ntk", "nngp"))
    torch.testing.assert_close(net.kernel(x1, x2, get="ntk"), both.ntk, rtol=0, atol=0)
    torch.testing.assert_close(net.kernel(x1, x2, get="nngp"), both.nngp, rtol=0, atol=0)
    assert both["ntk"] is both.ntk


def test_tensor_input_keeps_dtype(reference):
    net = FC_CASES["fc_relu3"]()
    x = torch.as_tensor(reference["fc_relu3/x1"], dtype=torch.float32)
    k = net.kernel(x, get="ntk")
    assert k.dtype == torch.float32 and k.device == x.device
    np.testing.assert_allclose(k.numpy(), reference["fc_relu3/ntk11"], rtol=1e-5)
