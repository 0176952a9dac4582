"""Masks of real positions (variable-length inputs) through the layers that keep
positions: padding never changes an entry of real positions, the finite twins agree,
and bad masks are refused."""

from __future__ import annotations

import pytest
import torch

import widenets as wn
from widenets.architectures import with_hidden_width

LENGTHS = (3, 5, 1, 4)


def sequences(lengths=LENGTHS, length: int = 5, seed: int = 0):
    """Inputs ``(N, 2, length)`` whose positions past each length are garbage, and the mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), 2, length, dtype=torch.float64, generator=g)
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return x, mask


def pad(x: torch.Tensor, mask: torch.Tensor, extra: int, seed: int = 1):
    """The same batch with ``extra`` more positions of large garbage, masked out."""
    g = torch.Generator().manual_seed(seed)
    garbage = 30 * torch.randn(x.shape[0], x.shape[1], extra, dtype=x.dtype, generator=g)
    return (torch.cat([x, garbage], dim=2),
            torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1))


NETWORKS = {
    "conv-relu-gap": lambda: wn.Sequential(
        wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU(),
        wn.Conv1d(8, 1, W_std=1.3, b_std=0.2), wn.Erf(), wn.GlobalAvgPool(), wn.Linear(1)),
    "residual-layernorm": lambda: wn.Sequential(
        wn.Conv1d(8, 1, W_std=1.5, b_std=0.1),
        wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv1d(8, 2, padding="same", W_std=1.2))),
        wn.LayerNorm(), wn.GELU(), wn.GlobalAvgPool(), wn.Linear(1, 1.1, 0.1)),
    "cos-flatten": lambda: wn.Sequential(
        wn.Conv1d(8, 1, W_std=1.5, b_std=0.4), wn.Cos(), wn.Flatten(), wn.Linear(1)),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_padding_changes_no_entry(name):
    net = NETWORKS[name]()
    x, mask = sequences()
    x2, mask2 = sequences((2, 5, 4), seed=2)
    garbage_x = torch.where(mask.unsqueeze(1), x, torch.full_like(x, 9.0))
    for first, m1 in ((x, mask), (garbage_x, mask)):
        k11 = net.kernel(first, None, get=("nngp", "ntk"), mask1=m1)
        k12 = net.kernel(first, x2, get=("nngp", "ntk"), mask1=m1, mask2=mask2)
        if first is x:
            reference11, reference12 = k11, k12
        for got, expected in ((k11, reference11), (k12, reference12)):
            for kernel in ("nngp", "ntk"):
                torch.testing.assert_close(got[kernel], expected[kernel], rtol=0, atol=0)
    if name == "cos-flatten":
        return  # Flatten's features grow with the padded length (masked ones are zeros)
    longer, longer_mask = pad(x, mask, extra=3)
    k11 = net.kernel(longer, None, get=("nngp", "ntk"), mask1=longer_mask)
    for kernel in ("nngp", "ntk"):
        torch.testing.assert_close(k11[kernel], reference11[kernel], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_full_length_rows_equal_the_unmasked_kernel(name):
    net = NETWORKS[name]()
    x, mask = sequences()
    masked = net.kernel(x, None, get="ntk", mask1=mask)
    full = [i for i, n in enumerate(LENGTHS) if n == x.shape[2]]
    plain = net.kernel(x[full], None, get="ntk")
    torch.testing.assert_close(masked[full][:, full], plain, rtol=1e-12, atol=0)


def test_masked_kernel_equals_the_kernel_of_the_unpadded_sequences():
    """With one length per call, the masked kernel is that of the cut sequences."""
    net = NETWORKS["conv-relu-gap"]()
    x, mask = sequences((3, 3, 3), seed=3)
    cut = x[:, :, :3]
    masked = net.kernel(x, None, get=("nngp", "ntk"), mask1=mask)
    plain = net.kernel(cut, None, get=("nngp", "ntk"))
    for kernel in ("nngp", "ntk"):
        torch.testing.assert_close(masked[kernel], plain[kernel], rtol=1e-12, atol=0)


def test_finite_twin_with_a_mask_equals_the_twin_on_cut_sequences():
    net = NETWORKS["residual-layernorm"]()
    x, mask = sequences()
    twin = net.build((2, 5), torch.Generator().manual_seed(4), dtype=torch.float64)
    together = twin(x, mask=mask)
    for i, n in enumerate(LENGTHS):
        alone = twin(x[i:i + 1, :, :n])
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-12, atol=1e-14)


def test_integer_masks_as_hugging_face_attention_masks():
    net = NETWORKS["conv-relu-gap"]()
    x, mask = sequences()
    as_bool = net.kernel(x, None, get="nngp", mask1=mask)
    as_int = net.kernel(x, None, get="nngp", mask1=mask.long())
    torch.testing.assert_close(as_bool, as_int, rtol=0, atol=0)


def test_gradients_with_masks():
    net = NETWORKS["conv-relu-gap"]()
    x, mask = sequences()
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: net.kernel(u, None, get="ntk", mask1=mask), (x,))
    k = net.kernel(x, None, get="ntk", mask1=mask)
    k.sum().backward()
    assert torch.equal(x.grad[~mask.unsqueeze(1).expand_as(x)],
                       torch.zeros(int((~mask).sum()) * 2, dtype=torch.float64))


def test_bad_masks_are_refused():
    net = NETWORKS["conv-relu-gap"]()
    x, mask = sequences()
    with pytest.raises(ValueError, match=r"mask1 must have shape \(N, \*positions\)"):
        net.kernel(x, None, mask1=mask[:, :4])
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="mask1 marks no real position in example 2"):
        net.kernel(x, None, mask1=empty)
    with pytest.raises(TypeError, match="mask1 must be boolean"):
        net.kernel(x, None, mask1=mask.double())
    with pytest.raises(ValueError, match="only 0 and 1"):
        net.kernel(x, None, mask1=mask.long() * 2)
    with pytest.raises(ValueError, match="mask2 is for x2"):
        net.kernel(x, None, mask1=mask, mask2=mask)
    with pytest.raises(ValueError, match="mask2 must have shape"):
        net.kernel(x, x, mask1=mask, mask2=mask[:2])
    dense = wn.Sequential(wn.Linear(4), wn.ReLU(), wn.Linear(1))
    with pytest.raises(ValueError, match="have none"):
        dense.kernel(torch.ones(3, 2, dtype=torch.float64), mask1=torch.ones(3, 2, dtype=bool))
    pooled = wn.Sequential(wn.Conv1d(4, 1), wn.ReLU(), wn.AvgPool1d(2), wn.GlobalAvgPool(),
                           wn.Linear(1))
    with pytest.raises(ValueError, match="AvgPool1d changes the positions"):
        pooled.kernel(x, None, mask1=mask)
    for conv in (wn.Conv1d(4, 3, stride=2, padding="same"), wn.Conv1d(4, 3),
                 wn.Conv1d(4, 3, padding="circular")):
        with pytest.raises(ValueError, match="Conv1d with masks needs stride 1"):
            wn.Sequential(conv, wn.ReLU(), wn.GlobalAvgPool(), wn.Linear(1)).kernel(
                x, None, mask1=mask)
    twin = net.build((2, 5), dtype=torch.float64)
    with pytest.raises(ValueError, match="mask must have shape"):
        twin(x, mask=mask[:, :3])


ATTENTION = dict(n_heads=2, W_key_std=1.2, W_query_std=0.9, W_value_std=1.3, W_out_std=1.1,
                 b_std=0.1)


def test_masked_attention_matches_neural_tangents(attention_reference):
    """The reference case ``seq_masked``: sequences of different lengths, one batch."""
    r, case = attention_reference, "seq_masked"
    net = wn.Sequential(wn.Conv1d(64, 1, W_std=1.5, b_std=0.1), wn.ReLU(),
                        wn.SelfAttention(attention="softmax", **ATTENTION), wn.ReLU(),
                        wn.GlobalAvgPool(), wn.Linear(1, 1.0, 0.1))
    x1, x2, valid1, valid2 = (r[f"{case}/{key}"] for key in ("x1", "x2", "valid1", "valid2"))
    k12 = net.kernel(x1, x2, get=("nngp", "ntk"), mask1=valid1, mask2=valid2)
    k11 = net.kernel(x1, None, get=("nngp", "ntk"), mask1=valid1)
    for name in ("nngp", "ntk"):
        for got, key in ((k12, f"{name}12"), (k11, f"{name}11")):
            expected = torch.as_tensor(r[f"{case}/{key}"])
            error = float((got[name] - expected).abs().max() / expected.abs().max())
            assert error < 1e-8, (key, error)


@pytest.mark.parametrize("options", [dict(attention="softmax"),
                                     dict(attention="relu", causal=True, pos_emb="sum"),
                                     dict(attention="identity", linear_scaling=False)])
def test_attention_ignores_padding(options):
    net = wn.Sequential(wn.Conv1d(8, 1, W_std=1.5, b_std=0.1), wn.ReLU(),
                        wn.SelfAttention(**options, **ATTENTION), wn.Erf(),
                        wn.GlobalAvgPool(), wn.Linear(1))
    x, mask = sequences()
    reference = net.kernel(x, None, get=("nngp", "ntk"), mask1=mask)
    longer, longer_mask = pad(x, mask, extra=2)
    padded = net.kernel(longer, None, get=("nngp", "ntk"), mask1=longer_mask)
    for kernel in ("nngp", "ntk"):
        torch.testing.assert_close(padded[kernel], reference[kernel], rtol=1e-12, atol=0)
    if "pos_emb" in options:
        return  # the twin draws one embedding per position: no twin of another length
    together = net.build((2, 5), torch.Generator().manual_seed(5), dtype=torch.float64)(
        x, mask=mask)
    for i, n in enumerate(LENGTHS):  # the same weights, drawn for the cut length
        alone = net.build((2, n), torch.Generator().manual_seed(5), dtype=torch.float64)
        torch.testing.assert_close(together[i:i + 1], alone(x[i:i + 1, :, :n]),
                                   rtol=1e-12, atol=1e-14)


def test_monte_carlo_kernel_carries_the_masks():
    """Twins see each example's mask (also inside the per-example Jacobians of the NTK);
    the estimate converges to the masked kernel, not to the unmasked one."""
    net = wn.Sequential(wn.Conv1d(8, 1, W_std=1.5, b_std=0.1), wn.ReLU(),
                        wn.SelfAttention(**ATTENTION), wn.Erf(), wn.GlobalAvgPool(),
                        wn.Linear(1))
    x, mask = sequences()
    x2, mask2 = sequences((2, 5), seed=3)
    exact = net.kernel(x, x2, get="ntk", mask1=mask, mask2=mask2)
    unmasked = net.kernel(x, x2, get="ntk")
    scale = float(exact.abs().max())
    errors = []
    for width in (8, 32, 128):
        wide = with_hidden_width(net, width)
        estimate = wn.monte_carlo_kernel(wide, x, x2, get="ntk", n_samples=8,
                                         generator=torch.Generator().manual_seed(width),
                                         mask1=mask, mask2=mask2)
        errors.append(float((estimate - exact).abs().max()) / scale)
    assert errors[2] < errors[0] / 2 and errors[2] < 0.1, errors
    assert float((exact - unmasked).abs().max()) / scale > 5 * errors[2]


def test_kernel_matrix_with_masks_and_its_store(tmp_path):
    net = NETWORKS["conv-relu-gap"]()
    x, mask = sequences()
    x2, mask2 = sequences((2, 5, 4), seed=2)
    expected = net.kernel(x, None, get=("nngp", "ntk"), mask1=mask)
    store = tmp_path / "masked.zarr"
    for _ in range(2):  # computed, then read back from the store
        tiled = wn.kernel_matrix(net, x, None, get=("nngp", "ntk"), tile=3, store=store,
                                 progress=False, mask1=mask)
        for name in ("nngp", "ntk"):
            torch.testing.assert_close(tiled[name], expected[name], rtol=1e-12, atol=0)
    other = mask.clone()
    other[0, 3] = True
    with pytest.raises(ValueError, match="side_inputs_sha256"):
        wn.kernel_matrix(net, x, None, get=("nngp", "ntk"), tile=3, store=store,
                         progress=False, mask1=other)
    with pytest.raises(ValueError, match="side_inputs_sha256"):
        wn.kernel_matrix(net, x, None, get=("nngp", "ntk"), tile=3, store=store,
                         progress=False)
    cross = wn.kernel_matrix(net, x, x2, get="ntk", tile=2, progress=False, mask1=mask,
                             mask2=mask2)
    torch.testing.assert_close(cross, net.kernel(x, x2, get="ntk", mask1=mask, mask2=mask2),
                               rtol=1e-12, atol=0)


def test_kernel_matrix_refuses_positional_outputs():
    net = wn.Sequential(wn.Conv1d(8, 1), wn.ReLU(), wn.Conv1d(1, 1))
    x, _ = sequences()
    with pytest.raises(ValueError, match="keeps its positions"):
        wn.kernel_matrix(net, x, None, get="ntk", tile=2, progress=False)
