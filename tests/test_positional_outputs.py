"""Networks whose output keeps positions (sequence-to-sequence, per-pixel, per-node):
kernels ``(N1, N2, *positions of x1, *positions of x2)``."""

from __future__ import annotations

import pytest
import torch

import widenets as wn
from widenets.architectures import with_hidden_width


def seq2seq() -> wn.Sequential:
    return wn.Sequential(wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU(),
                         wn.Conv1d(8, 1, W_std=1.3, b_std=0.2), wn.Erf(),
                         wn.Conv1d(1, 1, W_std=1.1, b_std=0.1))


def normal(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_shapes_symmetry_and_blocks():
    x1, x2 = normal(4, 2, 6, seed=1), normal(3, 2, 6, seed=2)
    net = seq2seq()
    k12 = net.kernel(x1, x2, get=("nngp", "ntk"))
    k11 = net.kernel(x1, None, get=("nngp", "ntk"))
    joint = net.kernel(torch.cat([x1, x2]), None, get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        assert k12[name].shape == (4, 3, 6, 6) and k11[name].shape == (4, 4, 6, 6)
        assert torch.equal(k11[name], k11[name].permute(1, 0, 3, 2))
        torch.testing.assert_close(joint[name][:4, 4:], k12[name], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(joint[name][:4, :4], k11[name], rtol=1e-12, atol=1e-15)
        # the kernel of all (example, position) points is positive semi-definite
        points = k11[name].permute(0, 2, 1, 3).reshape(24, 24)
        assert float(torch.linalg.eigvalsh(points).min()) > -1e-10 * float(points.max())


def test_equal_positions_give_the_flatten_read_out():
    """``Flatten`` + ``Linear(W, b)`` after the positional net: ``W^2 mean_p K[p, p] + b^2``."""
    x = normal(3, 2, 5, seed=3)
    body = wn.Sequential(wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU())
    positional = body.kernel(x, None, get="nngp")
    flat = wn.Sequential(body, wn.Flatten(), wn.Linear(1, W_std=1.2, b_std=0.3)).kernel(
        x, None, get="nngp")
    diagonal = torch.diagonal(positional, dim1=2, dim2=3).mean(dim=2)
    torch.testing.assert_close(flat, 1.44 * diagonal + 0.09, rtol=1e-12, atol=0)


def test_images_list_the_pixels_of_x1_then_of_x2():
    x = normal(2, 2, 3, 4, seed=4)
    net = wn.Sequential(wn.Conv2d(8, 3, padding="same", W_std=1.4), wn.Erf(), wn.Conv2d(1, 1))
    k = net.kernel(x, None, get="nngp")
    assert k.shape == (2, 2, 3, 4, 3, 4)
    # the same pixel of the same image is a variance: the largest entry of its row
    variances = torch.stack([k[i, i, h, w, h, w] for i in range(2) for h in range(3)
                             for w in range(4)])
    assert bool((variances > 0).all())
    assert torch.equal(k, k.permute(1, 0, 4, 5, 2, 3))


def test_tiles_equal_one_block(monkeypatch):
    from widenets import engine

    x = normal(7, 2, 5, seed=5)
    net = seq2seq()
    whole = net.kernel(x, None, get="ntk")
    monkeypatch.setattr(engine, "SPATIAL_TILE_ENTRIES", 4 * 25)  # 2 x 2 tiles
    torch.testing.assert_close(net.kernel(x, None, get="ntk"), whole, rtol=1e-13, atol=0)


def test_monte_carlo_of_the_twin_converges():
    """Wide twins: the per-position output products averaged over output channels."""
    x = normal(3, 2, 4, seed=6)
    net = seq2seq()
    exact = net.kernel(x, None, get="nngp")
    scale = torch.einsum("iipp->ip", exact).sqrt()
    errors = []
    for width in (8, 32, 128):
        wide = with_hidden_width(net, width)
        outputs = wn.Sequential(*wide.layers[:-1], wn.Conv1d(256, 1, W_std=1.1, b_std=0.1))
        generator = torch.Generator().manual_seed(width)
        total = torch.zeros_like(exact)
        for _ in range(8):
            twin = outputs.build((2, 4), generator, dtype=torch.float64)
            with torch.no_grad():
                f = twin(x)
            total += torch.einsum("icp,jcq->ijpq", f, f) / f.shape[1]
        estimate = total / 8
        relative = (estimate - exact) / torch.einsum("ip,jq->ijpq", scale, scale)
        errors.append(float(relative.abs().max()))
    assert errors[2] < errors[0] / 2 and errors[2] < 0.15, errors


def test_positional_outputs_need_every_pair_of_positions():
    with pytest.raises(ValueError, match="spatial='auto' or 'full'"):
        seq2seq().kernel(normal(2, 2, 4, seed=7), None, spatial="diagonal")
