"""Dilated convolutions (``dilation=``): kernel rule, finite twin, specs and errors.

The filter taps of a convolution with dilation ``d`` are ``d`` positions apart, so the
filter spans ``d (kernel_size - 1) + 1`` positions (the effective window, which sets the
padding amounts and the output size), as ``torch.nn.Conv2d(dilation=d)``. Here:

* the kernels of a one-convolution network equal a reference written out below with
  explicit loops (zero or wrap-around padding by hand, no ``widenets.spatial``), for every
  padding mode, strides 1 and 2, both layouts, ``x2`` given and not, 1-D and 2-D;
* dilation 1 is the plain convolution, bitwise, and so are its spec, hash and repr;
* the fast paths equal the straightforward ones, and gradients through the recorded
  window means pass ``gradcheck``;
* the finite twin is ``torch.nn.Conv2d(dilation=...)`` and converges to the kernel
  (the contract kit);
* bad arguments and inputs smaller than the effective window get a ``ValueError``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import widenets as wn
from widenets.paths import straightforward
from widenets.specs import from_spec
from widenets.testing import check_layer

DTYPE = torch.float64

def images(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- the reference
def axis_taps(size: int, k: int, s: int, d: int, mode: str) -> list[list[int | None]]:
    """``taps[i][o]``: the input position read by output ``i`` at tap ``o`` (None: a
    padded zero), written out from the definition."""
    span = d * (k - 1) + 1
    if mode == "valid":
        out, before = (size - span) // s + 1, 0
    else:
        out = -(-size // s)
        before = max((out - 1) * s + span - size, 0) // 2
    taps = []
    for i in range(out):
        row: list[int | None] = []
        for o in range(k):
            p = s * i + d * o - before
            if mode == "circular":
                row.append(p % size)
            else:
                row.append(p if 0 <= p < size else None)
        taps.append(row)
    return taps


def patches(x: torch.Tensor, k, s, d, mode) -> torch.Tensor:
    """``(N, P, T, C)``: for each image, flat output position and flat tap, the channels
    of the input pixel that tap reads (zeros for padding)."""
    axes = [axis_taps(n, *args, mode) for n, *args in zip(x.shape[2:], k, s, d)]
    outs = [range(len(a)) for a in axes]
    taps = [range(kk) for kk in k]
    result = torch.zeros(x.shape[0], math.prod(map(len, outs)), math.prod(k), x.shape[1],
                         dtype=x.dtype)
    for p, position in enumerate(itertools.product(*outs)):
        for t, tap in enumerate(itertools.product(*taps)):
            pixel = [axis[i][o] for axis, i, o in zip(axes, position, tap)]
            if all(q is not None for q in pixel):
                result[:, p, t] = x[(slice(None), slice(None), *pixel)]
    return result


def reference(x1, x2, k, s, d, mode, readout, W, b, Wr, br) -> tuple[torch.Tensor, ...]:
    """NNGP and NTK of ``Conv(W, b) -> readout -> Linear(1, Wr, br)`` (NTK
    parameterization): ``K1[p, q] = W^2 mean_t sum_c P[p, t, c] P'[q, t, c] / C + b^2``,
    ``T1 = K1``; ``Flatten`` reads ``mean_p K1[p, p]``, ``GlobalAvgPool`` ``mean_pq K1``."""
    x2 = x1 if x2 is None else x2
    p1, p2 = patches(x1, k, s, d, mode), patches(x2, k, s, d, mode)
    taps, channels = p1.shape[2], p1.shape[3]
    K1 = W**2 * torch.einsum("nptc,mqtc->nmpq", p1, p2) / (taps * channels) + b**2
    if readout == "gap":
        read = K1.mean(dim=(2, 3))
    else:
        read = torch.diagonal(K1, dim1=2, dim2=3).mean(dim=2)
    nngp = Wr**2 * read + br**2
    return nngp, Wr**2 * read + nngp


READOUTS = {"flatten": (lambda: wn.Flatten(), "auto"),
            "flatten-full": (lambda: wn.Flatten(), "full"),
            "gap": (lambda: wn.GlobalAvgPool(), "auto")}


def one_conv(conv: wn.Layer, readout: str) -> tuple[wn.Layer, str]:
    make, spatial = READOUTS[readout]
    return wn.Sequential(conv, make(), wn.Linear(1, W_std=0.9, b_std=0.2)), spatial


@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
@pytest.mark.parametrize("readout", sorted(READOUTS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mode", ["valid", "same", "circular"])
def test_conv1d_dilated_kernel_equals_reference(mode, stride, readout, second):
    x1, x2 = images(4, 2, 9, seed=1), images(3, 2, 9, seed=2)
    x2 = None if second == "x2=None" else x2
    conv = wn.Conv1d(3, 3, stride=stride, padding=mode, W_std=1.3, b_std=0.1, dilation=2)
    net, spatial = one_conv(conv, readout)
    got = net.kernel(x1, x2, get=("nngp", "ntk"), spatial=spatial)
    nngp, ntk = reference(x1, x2, (3,), (stride,), (2,), mode, readout.split("-")[0],
                          1.3, 0.1, 0.9, 0.2)
    torch.testing.assert_close(got.nngp, nngp, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.ntk, ntk, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["valid", "same", "circular"])
@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("geometry", [((3, 2), (1, 2), (2, 3)),   # per-axis dilations
                                      ((2, 3), (2, 1), (3, 1)),   # even window, dilated
                                      ((3, 3), (1, 1), (4, 4))])  # wider than the input
def test_conv2d_dilated_kernel_equals_reference(geometry, readout, mode):
    k, s, d = geometry
    size = (7, 8) if mode != "valid" or d != (4, 4) else (9, 9)
    x1, x2 = images(3, 2, *size, seed=3), images(2, 2, *size, seed=4)
    conv = wn.Conv2d(3, k, stride=s, padding=mode, W_std=1.2, b_std=0.3, dilation=d)
    net, spatial = one_conv(conv, readout)
    for second in (None, x2):
        got = net.kernel(x1, second, get=("nngp", "ntk"), spatial=spatial)
        nngp, ntk = reference(x1, second, k, s, d, mode, readout, 1.2, 0.3, 0.9, 0.2)
        torch.testing.assert_close(got.nngp, nngp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.ntk, ntk, rtol=1e-12, atol=1e-14)


def test_reference_is_sensitive_to_dilation():
    """The reference distinguishes dilations (so the tests above can fail)."""
    x = images(3, 2, 9, seed=1)
    with_2 = reference(x, None, (3,), (1,), (2,), "same", "flatten", 1.3, 0.1, 0.9, 0.2)[0]
    with_1 = reference(x, None, (3,), (1,), (1,), "same", "flatten", 1.3, 0.1, 0.9, 0.2)[0]
    assert (with_2 - with_1).abs().max() > 1e-3


def test_dilation_equals_stride_on_subsampled_input():
    """``valid`` with dilation ``d`` and stride ``d`` reads positions ``d (i + o)``: the
    plain convolution of the input subsampled by ``d``."""
    x1, x2 = images(3, 2, 11, seed=5), images(2, 2, 11, seed=6)
    dilated = wn.Sequential(wn.Conv1d(4, 3, stride=3, dilation=3, W_std=1.4, b_std=0.1),
                            wn.ReLU(), wn.GlobalAvgPool(), wn.Linear(1))
    plain = wn.Sequential(wn.Conv1d(4, 3, W_std=1.4, b_std=0.1), wn.ReLU(),
                          wn.GlobalAvgPool(), wn.Linear(1))
    for second in (None, x2):
        sub = None if second is None else second[..., ::3]
        got = dilated.kernel(x1, second, get=("nngp", "ntk"))
        expected = plain.kernel(x1[..., ::3], sub, get=("nngp", "ntk"))
        torch.testing.assert_close(got.nngp, expected.nngp, rtol=1e-13, atol=0)
        torch.testing.assert_close(got.ntk, expected.ntk, rtol=1e-13, atol=0)


# ----------------------------------------------------------- dilation 1 is the plain one
def networks(**conv) -> dict[str, wn.Layer]:
    return {
        "flatten": wn.Sequential(
            wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.1, **conv), wn.ReLU(),
            wn.Conv2d(4, 2, stride=2, padding="circular", W_std=1.3, **conv), wn.Erf(),
            wn.Flatten(), wn.Linear(1)),
        "gap": wn.Sequential(
            wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.1, **conv), wn.ReLU(),
            wn.AvgPool2d(2), wn.Conv2d(4, 2, padding="valid", W_std=1.2, **conv), wn.ReLU(),
            wn.GlobalAvgPool(), wn.Linear(1)),
    }


@pytest.mark.parametrize("name", ["flatten", "gap"])
def test_dilation_one_is_bitwise_the_plain_convolution(name):
    x1, x2 = images(3, 2, 6, 7, seed=7), images(2, 2, 6, 7, seed=8)
    plain = networks()[name]
    for given in (1, (1, 1)):
        net = networks(dilation=given)[name]
        assert net == plain and hash(net) == hash(plain) and repr(net) == repr(plain)
        assert net.spec() == plain.spec() and "dilation" not in repr(net)
        for second in (None, x2):
            got = net.kernel(x1, second, get=("nngp", "ntk"))
            expected = plain.kernel(x1, second, get=("nngp", "ntk"))
            assert torch.equal(got.nngp, expected.nngp) and torch.equal(got.ntk, expected.ntk)


# ------------------------------------------------------------- fast paths, gradients
def dilated_networks() -> dict[str, wn.Layer]:
    return {
        "flatten": wn.Sequential(
            wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.1, dilation=2), wn.ReLU(),
            wn.Conv2d(4, (2, 3), stride=(2, 1), padding="circular", W_std=1.3,
                      dilation=(3, 2)), wn.Erf(), wn.Flatten(), wn.Linear(1)),
        "gap": wn.Sequential(
            wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.1, dilation=(1, 2)), wn.ReLU(),
            wn.AvgPool2d(2, stride=1), wn.Conv2d(4, 2, padding="valid", W_std=1.2,
                                                 dilation=2), wn.ReLU(),
            wn.GlobalAvgPool(), wn.Linear(1)),
        "1d-strided": wn.Sequential(
            wn.Conv1d(4, 3, stride=2, padding="same", W_std=1.4, b_std=0.2, dilation=3),
            wn.Erf(), wn.Conv1d(4, 2, padding="circular", dilation=4), wn.ReLU(),
            wn.Flatten(), wn.Linear(1)),
    }


@pytest.mark.parametrize("name", ["flatten", "gap", "1d-strided"])
def test_fast_paths_equal_straightforward_ones(name):
    net = dilated_networks()[name]
    shape = (2, 9) if name.startswith("1d") else (2, 7, 8)
    x1, x2 = images(3, *shape, seed=9), images(2, *shape, seed=10)
    spatials = ["auto"] if name == "gap" else ["auto", "full"]
    for second, spatial in itertools.product((None, x2), spatials):
        fast = net.kernel(x1, second, get=("nngp", "ntk"), spatial=spatial)
        with straightforward():
            plain = net.kernel(x1, second, get=("nngp", "ntk"), spatial=spatial)
        for a, b in ((fast.nngp, plain.nngp), (fast.ntk, plain.ntk)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max()))


@pytest.mark.parametrize("readout", ["flatten", "gap"])
@pytest.mark.parametrize("mode", ["same", "circular", "valid"])
def test_gradients_through_dilated_convolutions(mode, readout):
    x1 = images(2, 1, 7, seed=11).requires_grad_(True)
    x2 = images(2, 1, 7, seed=12)
    final = wn.Flatten() if readout == "flatten" else wn.GlobalAvgPool()

    def kernel(x: torch.Tensor, W_std: torch.Tensor) -> torch.Tensor:
        net = wn.Sequential(
            wn.Conv1d(3, 3, padding=mode, W_std=W_std, b_std=0.1, dilation=2), wn.Erf(),
            wn.Conv1d(3, 2, stride=2, padding="same", W_std=1.2, dilation=(3,)), final,
            wn.Linear(1))
        return net.kernel(x, x2, get="ntk")

    W_std = torch.tensor(1.3, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(kernel, (x1, W_std))
    # and the recorded window means give the straightforward path's gradients
    grads = torch.autograd.grad(kernel(x1, W_std).sum(), (x1, W_std))
    with straightforward():
        expected = torch.autograd.grad(kernel(x1, W_std).sum(), (x1, W_std))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ the finite twin
@pytest.mark.parametrize("mode,k,d,stride", [("same", 3, 2, 1), ("same", (3, 5), (3, 1), 1),
                                             ("same", 2, 2, 1),  # effective 3: odd
                                             ("valid", 3, 2, 1), ("valid", (2, 3), (3, 2), 2)])
def test_twin_is_torch_conv2d_with_dilation(mode, k, d, stride):
    layer = wn.Conv2d(5, k, stride=stride, padding=mode, W_std=1.3, b_std=0.2, dilation=d)
    twin = layer.build((3, 9, 10), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    conv = torch.nn.Conv2d(3, 5, k, stride=stride, padding=mode, dilation=d, dtype=DTYPE)
    finite = next(m for m in twin.modules() if hasattr(m, "weight_scale"))
    with torch.no_grad():
        conv.weight.copy_(finite.weight_scale * finite.weight)
        conv.bias.copy_(finite.scaled_bias())
    x = images(2, 3, 9, 10, seed=13)
    expected = conv(x)
    assert twin(x).shape == expected.shape
    torch.testing.assert_close(twin(x), expected, rtol=1e-12, atol=1e-12)


LINEAR_STACKS = {
    "2d-same": (lambda: wn.Conv2d(3, (3, 2), stride=(2, 1), padding="same", W_std=1.3,
                                  b_std=0.2, dilation=(2, 3)), (2, 7, 8)),
    # few output positions and many features: the structured NTK factors this layer
    "1d-valid": (lambda: wn.Conv1d(32, 3, stride=2, W_std=1.3, b_std=0.2, dilation=3),
                 (8, 9)),
    "1d-circular": (lambda: wn.Conv1d(32, 3, stride=3, padding="circular", W_std=1.3,
                                      dilation=2), (8, 5)),
}


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
@pytest.mark.parametrize("stack", sorted(LINEAR_STACKS))
def test_twin_ntk_of_a_linear_stack_is_exact(stack, implementation):
    """No activation: the twin's empirical NTK is the exact one only if it pads, dilates
    and strides as the kernel rule does (and, structured, if the per-layer contraction
    reads the twin's dilated patches)."""
    make, shape = LINEAR_STACKS[stack]
    net = wn.Sequential(make(), wn.Flatten())
    x1, x2 = images(3, *shape, seed=14), images(2, *shape, seed=15)
    model = net.build(shape, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    for second in (None, x2):
        exact = net.kernel(x1, second, get="ntk")
        empirical = wn.empirical_ntk(model, x1, second, implementation=implementation)
        torch.testing.assert_close(empirical, exact, rtol=1e-12, atol=1e-12)


def test_contract_dilated_conv2d_same():
    check_layer(wn.Conv2d(4, 3, dilation=2, padding="same", W_std=1.3, b_std=0.1), (1, 7, 7))


def test_contract_dilated_conv1d_strided_circular():
    check_layer(wn.Conv1d(4, 3, stride=2, padding="circular", W_std=1.3, b_std=0.1,
                          dilation=2), (1, 9))


# ------------------------------------------------------------------- errors, specs
@pytest.mark.parametrize("dilation", [0, -1, 2.0, 1.5, (2,), (1, 2, 3), True, "2"])
def test_bad_dilation(dilation):
    with pytest.raises(ValueError, match="dilation must be a positive integer or a tuple of 2"):
        wn.Conv2d(4, 3, dilation=dilation)


def test_valid_input_smaller_than_the_effective_window():
    x = images(2, 2, 6, 9)
    net = wn.Sequential(wn.Conv2d(4, 3, dilation=(3, 4)), wn.Flatten(), wn.Linear(1))
    message = r"size 6 along spatial axis 0, smaller than the effective window \(7 = "
    with pytest.raises(ValueError, match=message):
        net.kernel(x)
    with pytest.raises(ValueError, match=message):
        net.build((2, 6, 9))
    # 7 = 3 (3 - 1) + 1 fits along H = 7, and 9 = 4 (3 - 1) + 1 along W = 9
    assert net.kernel(images(2, 2, 7, 9)).shape == (2, 2)
    with pytest.raises(ValueError, match="effective window"):
        wn.Sequential(wn.Conv2d(4, 3, dilation=(3, 4)), wn.Flatten(),
                      wn.Linear(1)).kernel(images(2, 2, 7, 8))


def test_spec_round_trip_and_repr():
    for layer in (wn.Conv1d(4, 3, dilation=2), wn.Conv2d(4, 3, padding="same", dilation=(2, 1)),
                  wn.Conv3d(2, (1, 2, 3), stride=2, padding="circular", dilation=(1, 2, 3)),
                  wn.Conv2d(4, 3), wn.Conv2d(4, 3, dilation=1)):
        spec = layer.spec()
        assert from_spec(spec) == layer and from_spec(spec).dilation == layer.dilation
    dilated = wn.Conv2d(4, 3, padding="same", dilation=(2, 1))
    assert dilated.dilation == (2, 1) and wn.Conv1d(4, 3, dilation=2).dilation == (2,)
    assert "dilation=(2, 1)" in repr(dilated)
    assert dilated.spec()["args"]["dilation"] == [2, 1]
    assert dilated != wn.Conv2d(4, 3, padding="same")
    assert wn.Conv2d(4, 3, dilation=2) == wn.Conv2d(4, 3, dilation=(2, 2))
    # a spec written before dilation existed (no "dilation" argument) loads as dilation 1
    old = {"layer": "Conv2d", "args": {"channels": 4, "kernel_size": [3, 3], "stride": [1, 1],
                                       "padding": "same", "W_std": 1.5, "b_std": 0.1,
                                       "parameterization": "ntk"}}
    loaded = from_spec(old)
    assert loaded.dilation == (1, 1)
    assert loaded == wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.1)
    assert loaded.spec() == old
