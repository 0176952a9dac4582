"""The fast paths of the analytic kernels against the straightforward ones.

Fast: fused in-place activation maps (``pair_maps``), correlations snapped only when an
entry is near +-1 (``fast_correlation``), zero-padded windows summed over slices
(``padded_window_mean``), tiles with their transposed copies and per-tile checks.
Straightforward: ``widenets.paths.straightforward()`` (separate maps, a mask for every
snap, padded copies) and, for the tiles, the whole matrix as one block. They must agree
to 1e-10 relative in float64 on every layer type, both layouts, ``x2`` given or not,
inputs that trigger the snapping (duplicates, zeros) and deep networks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import widenets as wn
from tests.conftest import random_inputs
from tests.layers.test_identities import ACTIVATIONS, mlp
from widenets import engine
from widenets.paths import fast_paths_enabled, straightforward
from widenets.spatial import pad_axis, padded_window_mean, padding, window_mean

RTOL = 1e-10


def assert_paths_agree(net: wn.Layer, x1, x2=None, **kwargs) -> None:
    fast = net.kernel(x1, x2, get=("nngp", "ntk"), **kwargs)
    with straightforward():
        assert not fast_paths_enabled()
        plain = net.kernel(x1, x2, get=("nngp", "ntk"), **kwargs)
    assert fast_paths_enabled()
    for name in ("nngp", "ntk"):
        scale = plain[name].abs().max().clamp_min(1e-300)
        error = ((fast[name] - plain[name]).abs() / scale).max().item()
        assert error <= RTOL, f"{name}: relative difference {error:.2e}"


@pytest.mark.parametrize("second", [False, True])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_dense(name, second):
    x = random_inputs(14, 5, seed=1)
    x[3] = x[9]  # a duplicate: its correlation is snapped to 1
    x[5] = 0.0  # a zero input: zero variance before the first bias
    net = mlp(ACTIVATIONS[name])
    if second:
        assert_paths_agree(net, x[:8], x[6:])
    else:
        assert_paths_agree(net, x)


@pytest.mark.parametrize("name", ["relu", "erf", "abrelu", "gelu", "sin", "step"])
def test_every_activation_on_images_both_layouts(name):
    activation = ACTIVATIONS[name]
    images = torch.randn(5, 2, 5, 4, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(2))
    images[4] = images[1]
    pooled = wn.Sequential(wn.Conv2d(4, 3, padding="same", W_std=1.3, b_std=0.1), activation(),
                           wn.Conv2d(4, 2, padding="valid", W_std=1.2, b_std=0.2), activation(),
                           wn.GlobalAvgPool(), wn.Linear(1))
    flat = wn.Sequential(wn.Conv2d(4, 3, padding="same", W_std=1.3, b_std=0.1), activation(),
                         wn.Flatten(), wn.Linear(1))
    for net in (pooled, flat):
        assert_paths_agree(net, images)
        assert_paths_agree(net, images[:2], images[2:])
    assert_paths_agree(flat, images, spatial="full")


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_every_activation_on_masked_sequences(name):
    """The full spatial covariance with masks (masked positions have variance 0): the
    fast path maps a symmetric kernel's self-covariances as its batch diagonal, and the
    two self-covariances of ``x2`` given in one batch."""
    tokens = torch.randn(6, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tokens[5] = tokens[2]
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, 1:] = False
    net = wn.Sequential(wn.Conv1d(4, 1, W_std=1.4), ACTIVATIONS[name](),
                        wn.SelfAttention(n_heads=2, b_std=0.1), ACTIVATIONS[name](),
                        wn.GlobalAvgPool(), wn.Linear(1))
    assert_paths_agree(net, tokens, mask1=mask)
    assert_paths_agree(net, tokens[:2], tokens[2:], mask1=mask[:2], mask2=mask[2:])


@pytest.mark.parametrize("transform", ["func.jvp", "forward_ad"])
def test_forward_mode_derivatives_at_zero_variance_stay_finite(transform):
    """The variance helpers take their two-operation form only where no derivative is
    taken: under forward-mode AD a masked position (variance 0) keeps tangent 0 there."""
    from torch.autograd import forward_ad

    from widenets import gaussian

    q = torch.tensor([0.0, 2.0, 0.5], dtype=torch.float64)
    direction = torch.ones_like(q)
    expected = {"inverse": torch.tensor([0.0, -0.5 * 2.0**-1.5, -0.5 * 0.5**-1.5]),
                "root": torch.tensor([0.0, 0.5 * 2.0**-0.5, 0.5 * 0.5**-0.5])}
    for key, function in (("inverse", gaussian.inverse_sqrt), ("root", gaussian.root_variance)):
        if transform == "func.jvp":
            _, tangent = torch.func.jvp(function, (q,), (direction,))
        else:
            with forward_ad.dual_level():
                tangent = forward_ad.unpack_dual(function(forward_ad.make_dual(q, direction)))[1]
        torch.testing.assert_close(tangent, expected[key].to(q.dtype))
    tokens = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    net = wn.Sequential(wn.Conv1d(3, 1), wn.ReLU(), wn.GlobalAvgPool(), wn.Linear(1))

    def kernel(x):
        return net.kernel(x[:1], x[1:], get="ntk", mask1=mask[:1], mask2=mask[1:])

    _, tangent = torch.func.jvp(kernel, (tokens,), (torch.ones_like(tokens),))
    assert torch.isfinite(tangent).all()
    step = 1e-6  # central differences of the kernel along the same direction
    difference = (kernel(tokens + step) - kernel(tokens - step)) / (2 * step)
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-8)


def test_variance_helpers_without_derivatives_equal_the_careful_form():
    from widenets import gaussian

    q = torch.tensor([0.0, -0.0, -1.0, float("nan"), float("inf"), 1e-300, 4.0, 5e-324],
                     dtype=torch.float64)
    positive = q > 0
    careful_inverse = torch.where(positive, torch.rsqrt(torch.where(positive, q, 1.0)), 0.0)
    careful_root = torch.where(positive, torch.sqrt(torch.where(positive, q, 1.0)), 0.0)
    assert torch.equal(gaussian.inverse_sqrt(q), careful_inverse)
    assert torch.equal(gaussian.root_variance(q), careful_root)


CONV_CASES = list(itertools.product(
    [1, 2, 3], [(3, 3), (2, 4), (4, 1)], ["valid", "same", "circular"]))


@pytest.mark.parametrize("stride,kernel_size,pad", CONV_CASES)
def test_convolutions_and_pooling(stride, kernel_size, pad):
    images = torch.randn(4, 3, 7, 6, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(3))
    net = wn.Sequential(
        wn.Conv2d(4, kernel_size, stride=stride, padding=pad, W_std=1.4, b_std=0.1), wn.ReLU(),
        wn.AvgPool2d(2, padding="same" if pad == "valid" else pad),
        wn.Conv2d(4, 2, padding=pad, W_std=1.1, b_std=0.05), wn.Erf(),
        wn.GlobalAvgPool(), wn.Linear(2),
    ) if pad != "valid" or stride == 1 else wn.Sequential(
        wn.Conv2d(4, kernel_size, stride=stride, padding=pad, W_std=1.4, b_std=0.1), wn.ReLU(),
        wn.Flatten(), wn.Linear(2),
    )
    assert_paths_agree(net, images)
    assert_paths_agree(net, images[:1], images[1:])


def test_one_and_three_dimensional_convolutions_residuals_and_normalisation():
    sequences = torch.randn(5, 2, 9, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(4))
    block = wn.Sequential(wn.Conv1d(3, 3, padding="same", W_std=1.2, b_std=0.1), wn.ReLU(),
                          wn.Conv1d(3, 1, W_std=1.1))
    net = wn.Sequential(wn.Conv1d(3, 2, stride=2, padding="same", W_std=1.5, b_std=0.1),
                        wn.LayerNorm(), wn.Erf(), wn.Residual(block),
                        wn.AvgPool1d(3, stride=2), wn.GlobalAvgPool(), wn.Linear(1))
    assert_paths_agree(net, sequences)
    volumes = torch.randn(3, 2, 3, 4, 3, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(5))
    net3 = wn.Sequential(wn.Conv3d(2, 2, padding="same", W_std=1.3, b_std=0.1), wn.ReLU(),
                         wn.Conv3d(2, 3, stride=2, padding="circular", W_std=1.3), wn.GELU(),
                         wn.GlobalAvgPool(), wn.Linear(1))
    assert_paths_agree(net3, volumes)
    dense = wn.Sequential(wn.Linear(8, 1.5, 0.1), wn.FanOut(2),
                          wn.Parallel(wn.Sequential(wn.ReLU(), wn.Linear(8, 1.3)),
                                      wn.Sequential(wn.Erf(), wn.Linear(8, 1.1, 0.2))),
                          wn.FanInSum(), wn.Abs(), wn.Linear(1))
    assert_paths_agree(dense, random_inputs(9, 4, seed=6))


@pytest.mark.parametrize("activation", [wn.ReLU, wn.Erf])
def test_deep_networks_with_duplicate_inputs(activation):
    """Depth 50 amplifies rounding; the snapping keeps duplicates identical on both paths."""
    x = random_inputs(8, 6, seed=7)
    x[6] = x[2]
    net = mlp(activation, depth=50, b_std=0.05)
    assert_paths_agree(net, x)
    k = net.kernel(x, None, get="ntk")
    assert torch.equal(k[6], k[2])


@pytest.mark.parametrize("symmetric", [True, False])
def test_tiles_equal_one_block(monkeypatch, symmetric):
    """Tiles (with transposed copies of the upper ones) against the whole matrix at once."""
    x = random_inputs(45, 7, seed=8)
    net = mlp(wn.ReLU, depth=3)
    x2 = None if symmetric else x[:31]
    monkeypatch.setattr(engine, "TILE_ENTRIES", 64)  # 8 x 8 tiles, awkward last ones
    tiled = net.kernel(x, x2, get=("nngp", "ntk"))
    monkeypatch.setattr(engine, "TILE_ENTRIES", 1 << 30)
    whole = net.kernel(x, x2, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(tiled[name], whole[name], rtol=RTOL, atol=0)
        if symmetric:
            assert torch.equal(tiled[name], tiled[name].T)


LISTED_NETS = {
    "attention": lambda a: wn.Sequential(
        wn.Conv1d(8, 1, W_std=1.5, b_std=0.05), a(),
        wn.SelfAttention(n_heads=2, W_value_std=1.2, b_std=0.1, pos_emb="sum"), a(),
        wn.SelfAttention(attention="relu", causal=True), a(),
        wn.GlobalAvgPool(), wn.Linear(1, 1.5, 0.05)),
    "cnn": lambda a: wn.Sequential(
        wn.Conv2d(6, 3, padding="same", W_std=1.4, b_std=0.1), a(), wn.AvgPool2d(2),
        wn.Conv2d(6, 2, padding="valid", W_std=1.3, b_std=0.2), wn.Identity(), a(),
        wn.GlobalAvgPool(), wn.Linear(1)),
}
LISTED_NETS["transformer"] = lambda a: wn.Sequential(
    wn.Conv1d(8, 1, W_std=1.2, b_std=0.1),
    wn.Residual(wn.Sequential(wn.LayerNorm(), wn.SelfAttention(n_heads=2, b_std=0.1, channels=8))),
    wn.Residual(wn.Sequential(wn.LayerNorm(), wn.Conv1d(16, 1), a(), wn.Dropout(0.2),
                              wn.Conv1d(8, 1))),
    wn.FanOut(2), wn.Parallel(wn.Conv1d(4, 1), wn.Sequential(wn.Conv1d(4, 3, padding="same"),
                                                             a(), wn.Conv1d(4, 1))),
    wn.FanInConcat(), wn.Conv1d(8, 1), wn.LayerNorm(), wn.FanOut(2),
    wn.Parallel(wn.Conv1d(4, 1), wn.Conv1d(4, 1)), wn.FanInProd(), wn.FanOut(2),
    wn.Parallel(wn.Sequential(wn.Conv1d(4, 1), a()), wn.Sequential(wn.Conv1d(4, 1), a())),
    wn.FanInSum(), wn.Flatten(), wn.Linear(1))  # (a sum of independent means)
LISTED_INPUTS = {"attention": (7, 3, 6), "cnn": (7, 2, 6, 5), "transformer": (7, 3, 5)}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("kind", sorted(LISTED_NETS))
def test_listed_pairs_equal_the_full_tile(monkeypatch, kind, activation):
    """A symmetric tile computed on its pairs i <= j only (every layer takes listed
    pairs) against the full (N, N) arrays: equal to rounding, and exactly symmetric."""
    net = LISTED_NETS[kind](ACTIVATIONS[activation])
    x = torch.randn(*LISTED_INPUTS[kind], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(5))
    x[6] = x[2]  # a duplicate: correlations snapped to 1 off the batch diagonal too
    assert engine.lists_pairs(net, x, (None,) * 4)
    listed = net.kernel(x, get=("nngp", "ntk"))
    monkeypatch.setattr(engine, "lists_pairs", lambda *args: False)
    full = net.kernel(x, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(listed[name], full[name], rtol=RTOL, atol=0)
        assert torch.equal(listed[name], listed[name].T)


@pytest.mark.parametrize("kind", ["attention", "transformer"])
def test_listed_pairs_with_masks_equal_the_full_tile(monkeypatch, kind):
    """Variable-length sequences: the listed pairs carry the mask (padding ignored by
    attention and pooling, zero entries after every layer) as the full arrays do."""
    net = LISTED_NETS[kind](wn.ReLU)
    x = torch.randn(*LISTED_INPUTS[kind], dtype=torch.float64,
                    generator=torch.Generator().manual_seed(8))
    mask = torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, 1:] = False
    mask[5, :2] = False
    listed = net.kernel(x, get=("nngp", "ntk"), mask1=mask)
    monkeypatch.setattr(engine, "lists_pairs", lambda *args: False)
    full = net.kernel(x, get=("nngp", "ntk"), mask1=mask)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(listed[name], full[name], rtol=RTOL, atol=0)
        assert torch.equal(listed[name], listed[name].T)


@pytest.mark.parametrize("channels", [2, 9])  # fewer, and more, channels than positions
def test_listed_input_moments_are_those_of_the_full_tile(channels):
    from widenets.kernel import Kernel, PairList, batch_diagonal

    x = torch.randn(5, channels, 2, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(9))
    pairs = PairList.upper(5, x.device)
    listed = Kernel.from_inputs(x, None, with_ntk=True, paired=True, pairs=pairs)
    full = Kernel.from_inputs(x, None, with_ntk=True, paired=True)
    assert listed.pairs is pairs and listed.nngp.shape == (15, 2, 2, 3, 3)
    torch.testing.assert_close(listed.nngp, full.nngp[pairs.rows, pairs.cols], rtol=1e-14,
                               atol=0)
    assert torch.equal(listed.nngp[pairs.diagonal], listed.var1)
    assert torch.equal(listed.var1, batch_diagonal(full.nngp))
    assert torch.equal(pairs.scatter(torch.arange(15.0)), pairs.scatter(torch.arange(15.0)).T)


def test_pairs_are_listed_only_where_every_layer_takes_them():
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    attention = LISTED_NETS["attention"](wn.ReLU)
    assert engine.lists_pairs(attention, x, (None,) * 4)
    mask = torch.ones(4, 5, dtype=torch.bool)
    assert engine.lists_pairs(attention, x, (mask, mask, None, None))
    adjacency = torch.ones(4, 5, 5, dtype=torch.float64)
    assert not engine.lists_pairs(attention, x, (None, None, adjacency, adjacency))
    assert not engine.lists_pairs(attention, x[:1], (None,) * 4)
    with straightforward():
        assert not engine.lists_pairs(attention, x, (None,) * 4)
    class OwnRule(wn.Conv1d):  # a subclass with a rule of its own is not asked to
        def kernel_rule(self, k):
            return super().kernel_rule(k)

    for other in (wn.SelfAttention(attention="identity", linear_scaling=False), OwnRule(4, 1),
                  wn.Aggregate(), wn.Residual(OwnRule(4, 1))):
        net = wn.Sequential(wn.Conv1d(4, 1), other, wn.GlobalAvgPool(), wn.Linear(1))
        assert not engine.lists_pairs(net, x, (None,) * 4), other


def test_a_symmetric_matrix_of_listed_pairs_fills_one_tile_of_the_budget(monkeypatch):
    """Listed pairs: a diagonal tile of N examples holds about N^2 / 2 pairs, so N up to
    sqrt(2 x budget) is one tile (the full layout would make three)."""
    net = LISTED_NETS["attention"](wn.ReLU)
    x = torch.randn(20, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    blocks = []

    def counted(net, x1, x2, *args):
        blocks.append((x1.shape[0], x2 is None))
        return original(net, x1, x2, *args)

    original = engine.kernel_block
    monkeypatch.setattr(engine, "kernel_block", counted)
    monkeypatch.setattr(engine, "SPATIAL_TILE_ENTRIES", 200 * 16)  # 200 pairs of 4 x 4
    listed = net.kernel(x, get=("nngp", "ntk"))
    assert blocks == [(20, True)]  # 20 <= isqrt(400)
    blocks.clear()
    monkeypatch.setattr(engine, "lists_pairs", lambda *args: False)
    full = net.kernel(x, get=("nngp", "ntk"))
    assert blocks == [(10, True), (10, False), (10, True)]  # tiles of at most 14: 10 + 10
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(listed[name], full[name], rtol=RTOL, atol=0)


def test_positional_outputs_of_listed_pairs_fall_back_to_the_full_tile():
    """A sequence-to-sequence network keeps positions: its tile is computed in full."""
    net = wn.Sequential(wn.Conv1d(4, 1), wn.ReLU(), wn.Conv1d(1, 1))
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kernel = net.kernel(x, get="nngp")
    assert kernel.shape == (5, 5, 3, 3)
    with straightforward():
        torch.testing.assert_close(kernel, net.kernel(x, get="nngp"), rtol=RTOL, atol=0)


def test_an_overflow_is_reported_from_any_tile(monkeypatch):
    monkeypatch.setattr(engine, "TILE_ENTRIES", 16)
    x = random_inputs(20, 3, seed=9)
    x[17] *= 1e150  # only the last tiles overflow
    net = wn.Sequential(wn.Linear(4, 2.0), wn.RectifiedMonomial(3), wn.Linear(1))
    with pytest.raises(ValueError, match="overflows"):
        net.kernel(x, None, get="nngp")


WINDOW_CASES = list(itertools.product([5, 6, 1], [1, 2, 3, 4], [1, 2, 3], ["valid", "same"]))


@pytest.mark.parametrize("size,window,stride,mode", WINDOW_CASES)
def test_window_sums_over_slices_equal_padded_copies(size, window, stride, mode):
    if mode == "valid" and window > size:
        return
    pad = padding(size, window, stride, mode, "test", 0)
    t = torch.randn(3, size, size, 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(10))
    trailing = t[..., 0].contiguous()  # the last axes: summed on their flattened view
    for tensor, dims in ((t, (1,)), (t, (2,)), (t, (1, 2)), (trailing, (2,)),
                         (trailing, (1, 2)), (trailing, (-2, -1))):
        fast = padded_window_mean(tensor, dims, window, stride, pad)
        padded = tensor
        for dim in dims:
            padded = pad_axis(padded, dim, pad)
        plain = window_mean(padded, dims, window, stride, pad.out)
        torch.testing.assert_close(fast, plain, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("window,stride,mode", [(3, 1, "same"), (2, 2, "same"),
                                                (3, 2, "valid"), (3, 2, "circular")])
def test_window_sums_recorded_as_one_node_differentiate_as_padded_copies(window, stride, mode):
    """The recorded window mean (one autograd node, backward = its adjoint) has the
    gradient, second derivative and torch.func Jacobians of the padded-copy formula."""
    pad = padding(5, window, stride, mode, "test", 0)
    t = torch.randn(2, 5, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11),
                    requires_grad=True)
    dims = (1, 2)

    def recorded(t):
        return padded_window_mean(t, dims, window, stride, pad)

    def plain(t):
        for dim in dims:
            t = pad_axis(t, dim, pad)
        return window_mean(t, dims, window, stride, pad.out)

    assert recorded(t).grad_fn is not None
    assert torch.autograd.gradcheck(recorded, (t,))
    assert torch.autograd.gradgradcheck(recorded, (t,))
    expected = torch.autograd.functional.jacobian(plain, t)
    torch.testing.assert_close(torch.func.jacrev(recorded)(t), expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.func.jacfwd(recorded)(t), expected, rtol=1e-14, atol=0)


def test_straightforward_is_per_thread_and_restored_after_errors():
    with pytest.raises(RuntimeError):
        with straightforward():
            raise RuntimeError("inside")
    assert fast_paths_enabled()


FLOAT32_NETS = {
    "relu": (lambda: mlp(wn.ReLU, depth=3, b_std=0.05), (300, 20)),
    "erf": (lambda: mlp(wn.Erf, depth=10, b_std=0.05), (200, 10)),
    "cnn-gap": (lambda: wn.Sequential(
        wn.Conv2d(8, 3, padding="same", W_std=1.5, b_std=0.05), wn.ReLU(),
        wn.Conv2d(8, 3, padding="same", W_std=1.5, b_std=0.05), wn.ReLU(),
        wn.GlobalAvgPool(), wn.Linear(1, 1.5, 0.05)), (12, 3, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(FLOAT32_NETS))
def test_float32_option_keeps_six_digits(name):
    make, shape = FLOAT32_NETS[name]
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    net = make()
    exact = net.kernel(x.numpy(), None, get=("nngp", "ntk"))
    single = net.kernel(x.numpy(), None, get=("nngp", "ntk"), dtype=torch.float32)
    for kernel in ("nngp", "ntk"):
        assert single[kernel].dtype == torch.float32
        error = (single[kernel].double() - exact[kernel]).abs().max() / exact[kernel].abs().max()
        assert error < 1e-5, f"{kernel}: {error:.1e}"
    assert net.kernel(x, get="ntk", dtype=torch.float64).dtype == torch.float64


def test_bad_dtype():
    x = random_inputs(3, 2)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        mlp(wn.ReLU).kernel(x, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        mlp(wn.ReLU).kernel(x, dtype="float32")


def test_tile_budget_is_the_cpu_budget_off_cuda():
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert engine.tile_budget(False, x) == engine.TILE_ENTRIES
    assert engine.tile_budget(True, x) == engine.SPATIAL_TILE_ENTRIES


class FakeCudaTensor:
    """What :func:`engine.tile_budget` reads of a CUDA tensor: its device and item size."""

    device = torch.device("cuda", 0)

    @staticmethod
    def element_size() -> int:
        return 8


@pytest.mark.parametrize("spatial", [False, True])
def test_cuda_tile_budget_follows_free_memory(monkeypatch, spatial):
    """Large tiles on a GPU with room for them; fewer where free memory is short; never
    below the CPU budget."""
    cpu = engine.SPATIAL_TILE_ENTRIES if spatial else engine.TILE_ENTRIES
    wanted = engine.CUDA_SPATIAL_TILE_ENTRIES if spatial else engine.CUDA_TILE_ENTRIES
    per_entry = 8 * engine.LIVE_TILE_ARRAYS
    for free_bytes, expected in [
        (80 << 30, wanted),                        # an 80 GiB GPU, empty
        (2 * cpu * per_entry, 2 * cpu),            # room for twice the CPU budget only
        (100, cpu),                                # almost full: the CPU budget
    ]:
        monkeypatch.setattr(torch.cuda, "mem_get_info",
                            lambda device, free=free_bytes: (free, 80 << 30))
        assert engine.tile_budget(spatial, FakeCudaTensor()) == expected


DILATED_WINDOW_CASES = [(size, window, stride, dilation, mode)
                        for size, window, stride, dilation, mode in itertools.product(
                            [6, 1], [2, 3], [1, 2], [2, 3], ["valid", "same", "circular"])
                        if mode != "valid" or dilation * (window - 1) + 1 <= size]


@pytest.mark.parametrize("size,window,stride,dilation,mode", DILATED_WINDOW_CASES)
def test_dilated_window_sums_equal_padded_copies(size, window, stride, dilation, mode):
    """Taps ``dilation`` apart (a dilated convolution): the in-place sums, and the recorded
    node with its adjoint, equal the padded-copy formula."""
    pad = padding(size, window, stride, mode, "test", 0, dilation)
    t = torch.randn(2, size, size, 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(12))
    dims = (1, 2)

    def plain(t):
        for dim in dims:
            t = pad_axis(t, dim, pad)
        return window_mean(t, dims, window, stride, pad.out, dilation)

    fast = padded_window_mean(t, dims, window, stride, pad, dilation)
    torch.testing.assert_close(fast, plain(t), rtol=1e-14, atol=1e-15)
    t.requires_grad_(True)
    recorded = padded_window_mean(t, dims, window, stride, pad, dilation)
    assert recorded.grad_fn is not None
    torch.testing.assert_close(recorded, plain(t), rtol=1e-14, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda t: padded_window_mean(t, dims, window, stride, pad, dilation), (t,))
    expected = torch.autograd.functional.jacobian(plain, t)
    got = torch.autograd.functional.jacobian(
        lambda t: padded_window_mean(t, dims, window, stride, pad, dilation), t)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
