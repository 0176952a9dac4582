"""Convolutional kernels: exact identities, the finite twins' conventions, tiles and errors.

The values themselves are checked elsewhere: against Neural Tangents and a direct
reference implementation (``test_conv_direct.py``) and against Monte Carlo estimates
from wide twins (``test_conv_monte_carlo.py``). Here:

* a stack of linear layers (convolution, pooling, flatten) has an empirical NTK that
  does not depend on the sampled weights, so the twin's NTK equals the exact kernel
  to rounding: this pins the twin's padding, stride and scale conventions to the
  kernel rule's, for every padding mode and both parameterizations;
* translation: with circular padding and global average pooling, shifting the
  images cyclically leaves the kernel unchanged;
* a ``Conv3d`` / ``Conv2d`` with a unit extent along an extra axis equals the
  lower-dimensional convolution;
* symmetry, positive semi-definiteness, homogeneity, deep networks and zero images;
* tiles: any N, bounded memory per block;
* bad input gets a ``ValueError`` that names what to change.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import widenets as wn
import widenets.engine as engine
from widenets.kernel import Kernel

DTYPE = torch.float64


def images(n: int, *shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, dtype=DTYPE, generator=generator)


X1 = images(4, 2, 5, 6, seed=1)
X2 = images(3, 2, 5, 6, seed=2)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


# ------------------------------------------------- the twin's conventions, exactly
LINEAR_STACKS = {
    "same-3": lambda p: [wn.Conv2d(3, 3, padding="same", W_std=1.3, b_std=0.2,
                                   parameterization=p), wn.Flatten()],
    "same-even-stride2": lambda p: [wn.Conv2d(3, (2, 4), stride=2, padding="same",
                                              W_std=0.8, b_std=0.5, parameterization=p),
                                    wn.Flatten()],
    "valid-stride2": lambda p: [wn.Conv2d(3, 3, stride=(2, 1), padding="valid", W_std=1.1,
                                          parameterization=p), wn.Flatten()],
    "circular-gap": lambda p: [wn.Conv2d(3, 4, padding="circular", W_std=1.2, b_std=0.3,
                                         parameterization=p), wn.GlobalAvgPool()],
    "pool-same": lambda p: [wn.Conv2d(3, 3, padding="same", W_std=1.4, b_std=0.1,
                                      parameterization=p),
                            wn.AvgPool2d(2, padding="same"), wn.Flatten()],
    "pool-valid-stride1": lambda p: [wn.Conv2d(3, 2, padding="valid", W_std=0.9,
                                               parameterization=p),
                                     wn.AvgPool2d(3, stride=1), wn.Flatten()],
}


@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
@pytest.mark.parametrize("parameterization", ["ntk", "standard"])
@pytest.mark.parametrize("stack", sorted(LINEAR_STACKS))
def test_linear_stack_twin_ntk_is_exact(stack, parameterization, second):
    """One weighted layer and no activation: the twin's Jacobian does not depend on its
    weights, so its NTK is the exact one, but only if the twin pads, strides, pools and
    scales exactly as the kernel rule assumes."""
    net = wn.Sequential(*LINEAR_STACKS[stack](parameterization))
    x2 = None if second == "x2=None" else X2
    model = net.build(tuple(X1.shape[1:]), generator=torch.Generator().manual_seed(0),
                      dtype=DTYPE)
    exact = net.kernel(X1, x2, get="ntk")
    empirical = wn.empirical_ntk(model, X1, x2)
    assert empirical.shape == exact.shape == (4, 4 if x2 is None else 3)
    torch.testing.assert_close(empirical, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", ["same", "valid", "circular"])
def test_twin_output_shapes_follow_padding(padding):
    net = wn.Sequential(wn.Conv2d(5, (3, 2), stride=2, padding=padding), wn.Flatten())
    model = net.build((2, 5, 6), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    out = model(X1)
    expected = {"same": (3, 3), "circular": (3, 3), "valid": (2, 3)}[padding]
    assert out.shape == (4, 5 * expected[0] * expected[1])


# ---------------------------------------------------------------------- translation
def cyclic_gap_net() -> wn.Sequential:
    return wn.Sequential(
        wn.Conv2d(8, 3, padding="circular", W_std=1.5, b_std=0.05), wn.ReLU(),
        wn.Conv2d(8, (2, 3), padding="circular", W_std=1.5, b_std=0.05), wn.Erf(),
        wn.GlobalAvgPool(), wn.Linear(1, W_std=1.5, b_std=0.05),
    )


@pytest.mark.parametrize("shift1,shift2", [((1, 2), (1, 2)), ((2, 0), (0, 5)), ((4, 3), (0, 0))])
def test_circular_gap_kernel_is_translation_invariant(shift1, shift2):
    """Each image's feature maps shift with it; the global mean does not see the shift."""
    net = cyclic_gap_net()
    k = net.kernel(X1, X2, get=("nngp", "ntk"))
    shifted = net.kernel(torch.roll(X1, shift1, dims=(2, 3)), torch.roll(X2, shift2, dims=(2, 3)),
                         get=("nngp", "ntk"))
    torch.testing.assert_close(shifted.nngp, k.nngp, rtol=1e-12, atol=0)
    torch.testing.assert_close(shifted.ntk, k.ntk, rtol=1e-12, atol=0)
    # Zero padding breaks the symmetry: the same shift changes the kernel.
    zero_padded = wn.Sequential(wn.Conv2d(8, 3, padding="same"), wn.ReLU(),
                                wn.GlobalAvgPool(), wn.Linear(1))
    moved = zero_padded.kernel(torch.roll(X1, (1, 2), dims=(2, 3)), X2, get="nngp")
    assert relative_error(moved, zero_padded.kernel(X1, X2, get="nngp")) > 1e-3


# --------------------------------------------------------- dimensions and layouts
def test_conv3d_and_conv2d_with_unit_axis_match_lower_dimension():
    x2d, y2d = X1, X2
    net2d = wn.Sequential(wn.Conv2d(4, 3, stride=(1, 2), padding="same", W_std=1.2, b_std=0.1),
                          wn.ReLU(), wn.AvgPool2d(2, padding="same"), wn.GlobalAvgPool(),
                          wn.Linear(1))
    net3d = wn.Sequential(wn.Conv3d(4, (1, 3, 3), stride=(1, 1, 2), padding="same", W_std=1.2,
                                    b_std=0.1),
                          wn.ReLU(), wn.AvgPool3d((1, 2, 2), padding="same"), wn.GlobalAvgPool(),
                          wn.Linear(1))
    k2 = net2d.kernel(x2d, y2d, get=("nngp", "ntk"))
    k3 = net3d.kernel(x2d[:, :, None], y2d[:, :, None], get=("nngp", "ntk"))
    torch.testing.assert_close(k3.nngp, k2.nngp, rtol=1e-13, atol=0)
    torch.testing.assert_close(k3.ntk, k2.ntk, rtol=1e-13, atol=0)

    x1d, y1d = X1[:, :, 0], X2[:, :, 0]
    net1d = wn.Sequential(wn.Conv1d(4, 3, padding="circular"), wn.ReLU(), wn.Flatten(),
                          wn.Linear(1))
    net2d = wn.Sequential(wn.Conv2d(4, (1, 3), padding="circular"), wn.ReLU(), wn.Flatten(),
                          wn.Linear(1))
    torch.testing.assert_close(net2d.kernel(x1d[:, :, None], y1d[:, :, None]),
                               net1d.kernel(x1d, y1d), rtol=1e-13, atol=0)


def test_auto_layout_is_diagonal_without_pooling_and_full_with_it(monkeypatch):
    seen = []
    original = Kernel.from_inputs.__func__

    def spy(cls, x1, x2, with_ntk, paired=False, **side_inputs):
        seen.append(paired)
        return original(cls, x1, x2, with_ntk, paired, **side_inputs)

    monkeypatch.setattr(Kernel, "from_inputs", classmethod(spy))
    flatten = wn.Sequential(wn.Conv2d(4, 3), wn.ReLU(), wn.Flatten(), wn.Linear(1))
    pooled = wn.Sequential(wn.Conv2d(4, 3), wn.Residual(wn.Sequential(
        wn.ReLU(), wn.Conv2d(4, 3, padding="same"), wn.AvgPool2d(1))), wn.Flatten(), wn.Linear(1))
    flatten.kernel(X1)
    assert seen == [False]
    pooled.kernel(X1)
    flatten.kernel(X1, spatial="full")
    assert seen == [False, True, True]


# ---------------------------------------------------------------------- identities
def relu_cnn(b_std: float | None = 0.05) -> wn.Sequential:
    return wn.Sequential(
        wn.Conv2d(8, 3, padding="same", W_std=1.5, b_std=b_std), wn.ReLU(),
        wn.Conv2d(8, 3, stride=2, padding="valid", W_std=1.5, b_std=b_std), wn.ReLU(),
        wn.AvgPool2d(2, stride=1), wn.Flatten(), wn.Linear(1, W_std=1.5, b_std=b_std),
    )


def test_symmetric_call_equals_explicit_second_input_and_is_psd():
    net = relu_cnn()
    x = torch.cat([X1, X2])
    both = net.kernel(x, None, get=("nngp", "ntk"))
    explicit = net.kernel(x, x.clone(), get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        matrix = both[name]
        torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=0)
        torch.testing.assert_close(explicit[name], matrix, rtol=1e-12, atol=1e-14)
        assert float(torch.linalg.eigvalsh(matrix).min()) > -1e-12 * float(matrix.abs().max())
        torch.testing.assert_close(net.kernel(X1, X2, get=name), matrix[:4, 4:], rtol=1e-12,
                                   atol=0)


def test_relu_cnn_without_bias_is_positively_homogeneous():
    """No biases: every layer is positively homogeneous, ``K(a x, b x') = a b K(x, x')``."""
    net = relu_cnn(b_std=None)
    k = net.kernel(X1, X2, get=("nngp", "ntk"))
    scaled = net.kernel(2.5 * X1, 0.4 * X2, get=("nngp", "ntk"))
    torch.testing.assert_close(scaled.nngp, k.nngp, rtol=1e-12, atol=0)
    torch.testing.assert_close(scaled.ntk, k.ntk, rtol=1e-12, atol=0)


def test_deep_cnn_zero_and_identical_images_stay_finite():
    layers = []
    for _ in range(20):
        layers += [wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.05), wn.Erf()]
    net = wn.Sequential(*layers, wn.AvgPool2d(2), wn.GlobalAvgPool(), wn.Linear(1))
    x = torch.cat([X1[:2], torch.zeros_like(X1[:1]), X1[:1]])
    k = net.kernel(x, get=("nngp", "ntk"))
    for matrix in (k.nngp, k.ntk):
        assert bool(torch.isfinite(matrix).all())
        torch.testing.assert_close(matrix[3], matrix[0], rtol=1e-12, atol=0)
    relu_net = wn.Sequential(wn.Conv2d(4, 3, padding="same"), wn.ReLU(), wn.GlobalAvgPool(),
                             wn.Linear(1))
    zeros = relu_net.kernel(torch.zeros(2, 2, 5, 6, dtype=DTYPE), get=("nngp", "ntk"))
    assert torch.equal(zeros.nngp, torch.zeros(2, 2, dtype=DTYPE))
    assert torch.equal(zeros.ntk, torch.zeros(2, 2, dtype=DTYPE))


def test_dtype_and_numpy_input():
    net = relu_cnn()
    k64 = net.kernel(X1.numpy(), X2.numpy())
    assert k64.dtype == DTYPE
    k32 = net.kernel(X1.float(), X2.float())
    assert k32.dtype == torch.float32
    np.testing.assert_allclose(k32.numpy(), k64.numpy(), rtol=1e-4)


def test_layer_norm_and_branches_on_images():
    """LayerNorm normalises each position over channels; FanInConcat averages channels."""
    conv = wn.Conv2d(6, 3, padding="same", W_std=1.3, b_std=0.2)
    normalised = wn.Sequential(conv, wn.LayerNorm(), wn.GlobalAvgPool(), wn.Linear(1))
    k = wn.Sequential(conv, wn.GlobalAvgPool(), wn.Linear(1)).kernel
    # LayerNorm of a Gaussian: each position's variance becomes 1; with a zero-padded
    # "same" convolution the variances differ between positions, so the kernels differ.
    assert relative_error(normalised.kernel(X1, X2), k(X1, X2)) > 1e-3
    diagonal = wn.Sequential(conv, wn.LayerNorm(), wn.Flatten(), wn.Linear(1, W_std=1.0))
    torch.testing.assert_close(torch.diagonal(diagonal.kernel(X1, get="nngp")),
                               torch.ones(4, dtype=DTYPE), rtol=1e-12, atol=0)
    concat = wn.Sequential(
        wn.FanOut(2),
        wn.Parallel(wn.Conv2d(2, 3, padding="same"), wn.Conv2d(6, 1, W_std=2.0)),
        wn.FanInConcat(), wn.Flatten(), wn.Linear(1),
    )
    a = wn.Sequential(wn.Conv2d(2, 3, padding="same"), wn.Flatten(), wn.Linear(1))
    b = wn.Sequential(wn.Conv2d(6, 1, W_std=2.0), wn.Flatten(), wn.Linear(1))
    expected = (2 * a.kernel(X1, X2, get="nngp") + 6 * b.kernel(X1, X2, get="nngp")) / 8
    torch.testing.assert_close(concat.kernel(X1, X2, get="nngp"), expected, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------- tiles
@pytest.mark.parametrize("spatial", ["diagonal", "full"])
@pytest.mark.parametrize("budget_pairs", [1, 5, 7, 1000])
def test_tiles_of_any_size_equal_one_block_and_bound_memory(monkeypatch, spatial, budget_pairs):
    """N not divisible by the tile side, N1 != N2, tiles larger than N: all equal one block,
    and no block holds more than its budget of spatial moments."""
    net = wn.Sequential(wn.Conv2d(4, 3, padding="same"), wn.ReLU(), wn.Flatten(), wn.Linear(1))
    x1, x2 = images(9, 2, 5, 6, seed=3), images(7, 2, 5, 6, seed=4)
    whole = {s: net.kernel(x1, s, get=("nngp", "ntk"), spatial=spatial) for s in (None, x2)}
    per_pair = 30 ** (2 if spatial == "full" else 1)
    budget = budget_pairs * per_pair
    monkeypatch.setattr(engine, "SPATIAL_TILE_ENTRIES", budget)
    largest = []
    original = Kernel.from_inputs.__func__

    def spy(cls, a, b, with_ntk, paired=False, **side_inputs):
        k = original(cls, a, b, with_ntk, paired, **side_inputs)
        largest.append(k.nngp.numel())
        return k

    monkeypatch.setattr(Kernel, "from_inputs", classmethod(spy))
    for second in (None, x2):
        tiled = net.kernel(x1, second, get=("nngp", "ntk"), spatial=spatial)
        torch.testing.assert_close(tiled.nngp, whole[second].nngp, rtol=1e-13, atol=0)
        torch.testing.assert_close(tiled.ntk, whole[second].ntk, rtol=1e-13, atol=0)
    assert max(largest) <= budget


# --------------------------------------------------------------------------- errors
def test_bad_conv_arguments():
    with pytest.raises(ValueError, match="kernel_size must be a positive integer or a tuple of 2"):
        wn.Conv2d(4, (3, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        wn.Conv1d(4, 0)
    with pytest.raises(ValueError, match="stride"):
        wn.Conv2d(4, 3, stride=(1, -1))
    with pytest.raises(ValueError, match="padding must be one of"):
        wn.Conv2d(4, 3, padding=1)
    with pytest.raises(ValueError, match="padding must be one of"):
        wn.AvgPool2d(2, padding="full")
    with pytest.raises(TypeError, match="width"):
        wn.Conv2d(4.5, 3)


def test_bad_image_input():
    net = relu_cnn()
    with pytest.raises(ValueError, match=r"Conv2d needs inputs \(N, C, H, W\)"):
        net.kernel(X1[:, :, 0])
    with pytest.raises(ValueError, match="same per-example shape"):
        net.kernel(X1, X2[:, :1])
    with pytest.raises(ValueError, match="smaller than the window"):
        wn.Sequential(wn.Conv2d(4, 7), wn.Flatten(), wn.Linear(1)).kernel(X1)
    with pytest.raises(ValueError, match="smaller than the window"):
        wn.Sequential(wn.Conv2d(4, 7), wn.Flatten(), wn.Linear(1)).build((2, 5, 6))
    # an output that keeps positions has a positional kernel (not an error)
    assert wn.Sequential(wn.Conv2d(4, 3), wn.ReLU()).kernel(X1).shape[2:] == (3, 4, 3, 4)
    with pytest.raises(ValueError, match="GlobalAvgPool needs spatial inputs"):
        wn.Sequential(wn.Linear(4), wn.GlobalAvgPool()).kernel(X1[:, 0, 0])
    with pytest.raises(ValueError, match="spatial='diagonal' cannot be used with pooling"):
        net.kernel(X1, spatial="diagonal")
    with pytest.raises(ValueError, match="spatial must be one of"):
        net.kernel(X1, spatial="dense")
    with pytest.raises(ValueError, match="different spatial sizes"):
        wn.Sequential(wn.FanOut(2), wn.Parallel(wn.Conv2d(4, 3), wn.Conv2d(4, 1)),
                      wn.FanInSum(), wn.Flatten(), wn.Linear(1)).kernel(X1)
    model = net.build((2, 5, 6), generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    with pytest.raises(ValueError, match=r"Conv2d expects inputs \(N, 2, ...\)"):
        model(images(2, 3, 5, 6))
