"""Numerical accuracy of the closed-form kernels at every input scale, against mpmath.

The reference (``tests/mp_reference.py``) runs the textbook formulas at 50 digits on the
exact values of the inputs. Errors are measured entrywise against the natural scale of
each entry, ``|K_ij - K*_ij| / sqrt(K*_ii K*_jj)`` (the relative error on the diagonal),
for the NNGP and the NTK, on both computation paths, with ``x2=None`` and ``x2`` given,
on inputs with a duplicated row and a zero row.

Promised (README, "Numerical guarantees"): float64 within 1e-10 for input scales from
1e-6 to 1e8, float32 within 1e-5 for input scales from 1e-6 to 1e4. Two documented
exceptions at the smallest scale, where the bias dominates the first layer and the
inputs differ from one another only in the last digits of the kernel: ``Sign`` and
``Step``, whose maps have unbounded slope at correlation 1 (``arcsin``), amplify that
rounding (measured 3e-9 in float64), and in float32 the differences fall below the
format's resolution altogether.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

import widenets as wn
from tests import mp_reference as ref
from widenets.paths import straightforward

#: name -> (widenets activation, reference maps).
ACTIVATIONS = {
    "relu": (wn.ReLU, ref.ab_relu(0.0, 1.0)),
    "leaky_relu": (lambda: wn.LeakyReLU(0.1), ref.ab_relu(0.1, 1.0)),
    "abs": (wn.Abs, ref.ab_relu(-1.0, 1.0)),
    "erf": (wn.Erf, ref.erf()),
    "erf_scaled": (lambda: wn.Erf(0.5, 2.0, 0.1), ref.erf(0.5, 2.0, 0.1)),
    "gelu": (wn.GELU, ref.gelu()),
    "sin": (lambda: wn.Sin(1.0, 0.7, 0.3), ref.sin(1.0, 0.7, 0.3)),
    "cos": (wn.Cos, ref.sin(1.0, 1.0, math.pi / 2)),
    "rbf": (lambda: wn.Rbf(0.5), ref.rbf(0.5)),
    "sign": (wn.Sign, ref.sign()),
    "step": (wn.Step, ref.rectified_monomial(0)),
    "monomial2": (lambda: wn.RectifiedMonomial(2), ref.rectified_monomial(2)),
}
NOT_LIPSCHITZ = ("sign", "step")
SCALES = (1e-6, 1.0, 1e2, 1e4, 1e6, 1e8)
LAYERS = ((1.5, 0.05), (1.2, 0.1), (1.3, 0.1))  # (W_std, b_std) of the three Linear layers


def network(name: str) -> wn.Sequential:
    make = ACTIVATIONS[name][0]
    (w1, b1), (w2, b2), (w3, b3) = LAYERS
    return wn.Sequential(wn.Linear(8, w1, b1), make(), wn.Linear(8, w2, b2), make(),
                         wn.Linear(1, w3, b3))


def reference_spec(name: str) -> list:
    maps = ACTIVATIONS[name][1]
    (w1, b1), (w2, b2), (w3, b3) = LAYERS
    return [("dense", w1, b1), ("act", maps), ("dense", w2, b2), ("act", maps),
            ("dense", w3, b3)]


def inputs(scale: float) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((5, 3)) * scale
    x[3] = x[1]  # a duplicate
    x[4] = 0.0  # a zero row
    return x


_references: dict = {}


def reference(name: str, scale: float) -> tuple[np.ndarray, np.ndarray]:
    if (name, scale) not in _references:
        _references[name, scale] = ref.mlp_kernels(reference_spec(name), inputs(scale))
    return _references[name, scale]


def normalized_error(computed: torch.Tensor, exact: np.ndarray) -> float:
    """``max |K - K*| / sqrt(K*_ii K*_jj)``."""
    root = np.sqrt(np.abs(np.diag(exact)))
    scale = np.outer(root, root)
    error = np.abs(computed.double().numpy() - exact)
    return float(np.max(error / np.where(scale > 0, scale, 1.0)))


def errors(name: str, scale: float, dtype: torch.dtype) -> dict[str, float]:
    """Largest normalized error of the NNGP and NTK over both paths and both call forms."""
    nngp, ntk = reference(name, scale)
    x = torch.tensor(inputs(scale), dtype=dtype)
    net = network(name)
    found = {"nngp": 0.0, "ntk": 0.0}
    for fast in (True, False):
        for second in (None, x):
            if fast:
                k = net.kernel(x, second, get=("nngp", "ntk"))
            else:
                with straightforward():
                    k = net.kernel(x, second, get=("nngp", "ntk"))
            assert k.nngp.dtype == dtype
            found["nngp"] = max(found["nngp"], normalized_error(k.nngp, nngp))
            found["ntk"] = max(found["ntk"], normalized_error(k.ntk, ntk))
    return found


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_float64_against_mpmath(name, scale):
    tolerance = 1e-7 if (name in NOT_LIPSCHITZ and scale < 1e-3) else 1e-10
    found = errors(name, scale, torch.float64)
    assert found["nngp"] < tolerance and found["ntk"] < tolerance, found


@pytest.mark.parametrize("scale", (1e-6, 1.0, 1e2, 1e4))
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_float32_against_mpmath(name, scale):
    if name in NOT_LIPSCHITZ and scale < 1e-3:
        return  # below float32's resolution (module docstring); float64 is tested above
    found = errors(name, scale, torch.float32)
    assert found["nngp"] < 1e-5 and found["ntk"] < 1e-5, found


def test_erf_on_raw_pixels_in_float32():
    """Raw 0-255 pixel values, Linear(1.5, 0.05) -> Erf -> Linear(1.2, 0.1): the NTK
    diagonal was off by 1.3e-3 (cancellation in the derivative map's determinant)."""
    pixels = np.random.default_rng(3).integers(0, 256, size=(6, 64)).astype(np.float64)
    net = wn.Sequential(wn.Linear(16, 1.5, 0.05), wn.Erf(), wn.Linear(1, 1.2, 0.1))
    exact_nngp, exact_ntk = ref.mlp_kernels(
        [("dense", 1.5, 0.05), ("act", ref.erf()), ("dense", 1.2, 0.1)], pixels)
    k = net.kernel(torch.tensor(pixels, dtype=torch.float32), get=("nngp", "ntk"))
    assert normalized_error(k.nngp, exact_nngp) < 1e-5
    assert normalized_error(k.ntk, exact_ntk) < 1e-5
    diagonal = k.ntk.diagonal().double().numpy()
    np.testing.assert_allclose(diagonal, np.diag(exact_ntk), rtol=1e-5)


@pytest.mark.parametrize("name", ["erf", "gelu", "sin", "rbf", "relu"])
def test_no_false_overflow_in_float32_with_duplicates(name):
    """At input scale 1e10 in float32 the variances (~1e20) are fine but their product
    overflows: the snapping of a duplicated row used ``sqrt(q1 q2)`` and raised a false
    "overflow"; the straightforward path's correlations became 0."""
    x = torch.tensor(inputs(1e10), dtype=torch.float32)
    net = network(name)
    fast = net.kernel(x, None, get=("nngp", "ntk"))
    with straightforward():
        plain = net.kernel(x, x, get=("nngp", "ntk"))
    for kernel in ("nngp", "ntk"):
        assert torch.isfinite(fast[kernel]).all()
        assert torch.equal(fast[kernel][1], fast[kernel][3])  # the duplicate stays identical
        scale = fast[kernel].diagonal().abs().sqrt()
        difference = (fast[kernel] - plain[kernel]).abs() / torch.outer(scale, scale)
        assert float(difference.max()) < 1e-5


def test_gelu_regressor_fits_its_training_points_at_scale_1e8():
    """With the cancelling determinant the GELU NTK diagonal was 1e16 times too large,
    and a kernel regressor missed its own training points."""
    from widenets.sklearn import KernelRegressor

    x = np.random.default_rng(4).standard_normal((12, 3)) * 1e8
    y = np.sin(np.arange(12.0))
    model = KernelRegressor(activation="gelu").fit(x, y)
    np.testing.assert_allclose(model.predict(x), y, atol=1e-6)


def test_elementwise_activations_pickle():
    """Dask and multiprocessing pickle architectures: Elementwise and the tanh GELU held a
    local function (the autograd derivative)."""
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for activation in (wn.Elementwise(torch.tanh), wn.GELU(approximate=True)):
        net = wn.Sequential(wn.Linear(4), activation, wn.Linear(1))
        copy = pickle.loads(pickle.dumps(net))
        assert torch.equal(copy.kernel(x), net.kernel(x))


@pytest.mark.parametrize("activation", [wn.Sign, wn.Step])
def test_sign_and_step_of_an_exactly_zero_input(activation):
    """A zero input without a bias reaches the activation as exactly 0, and
    ``sign(0) = step(0) = 0`` in the finite network: its kernel entries are the read-out's
    bias alone. The correlation convention (1 on the diagonal, 0 off it) gave 1 (Sign) or
    1/2 (Step) on the diagonal and 1/4 (Step) off it, and ``x2=None`` disagreed with
    ``x2=x1``."""
    x = torch.tensor([[0.0, 0.0], [0.3, -1.2], [1.0, 0.5]], dtype=torch.float64)
    net = wn.Sequential(wn.Linear(8, 1.5), activation(), wn.Linear(1, 1.0, 0.1))
    assert torch.equal(activation().apply(torch.zeros(3)), torch.zeros(3))
    for second in (None, x):
        for fast in (True, False):
            if fast:
                k = net.kernel(x, second, get="nngp")
            else:
                with straightforward():
                    k = net.kernel(x, second, get="nngp")
            assert float(k[0, 0]) == pytest.approx(0.01, rel=1e-14)
            torch.testing.assert_close(k[0, 1:], torch.full((2,), 0.01, dtype=torch.float64),
                                       rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 8], ids=["numpy", "torch"])
def test_in_place_arccos_is_within_an_ulp_of_torchs(dtype, threads):
    """gaussian.arccos_ (NumPy's arccos on few threads, torch's otherwise) against
    torch.arccos, uniform and near +-1; a tensor that records gradients keeps torch's."""
    from widenets.gaussian import arccos_

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(-1, 1, 4000), -1 + 10.0 ** rng.uniform(-15, -1, 500),
                             1 - 10.0 ** rng.uniform(-15, -1, 500), [-1.0, 0.0, 1.0]])
    x = torch.from_numpy(values).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = arccos_(x.clone())
    finally:
        torch.set_num_threads(previous)
    expected = torch.arccos(x)
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool(((got - expected).abs() <= 2 * ulp).all())
    recorded = x.clone().requires_grad_(True) * 1.0
    assert torch.equal(arccos_(recorded), torch.arccos(x))
    wrapped = torch.func.grad(lambda v: arccos_(v * 0.5).sum())(x[:8].double())
    assert torch.allclose(wrapped, -0.5 / torch.sqrt(1 - (0.5 * x[:8].double()) ** 2))
