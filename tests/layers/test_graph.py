"""Graph aggregation (``Aggregate``): Neural Tangents' values, edge lists, the finite twin
and its Monte Carlo limit, masks, gradients and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

import widenets as wn


def graph_net() -> wn.Sequential:
    """The reference case ``graph_aggregate`` (tests/data/README.md)."""
    return wn.Sequential(
        wn.Conv1d(64, 1, W_std=1.5, b_std=0.1), wn.ReLU(), wn.Aggregate(),
        wn.Conv1d(64, 1, W_std=1.2, b_std=0.2), wn.ReLU(), wn.GlobalAvgPool(),
        wn.Linear(1, 1.0, 0.1))


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.numpy() - expected).max() / np.abs(expected).max())


def random_graphs(n: int, nodes: int, seed: int) -> torch.Tensor:
    """Directed 0/1 graphs with weights, float64 ``(n, nodes, nodes)``."""
    g = torch.Generator().manual_seed(seed)
    edges = (torch.rand(n, nodes, nodes, generator=g) < 0.4).double()
    return edges * (0.5 + torch.rand(n, nodes, nodes, generator=g, dtype=torch.float64))


def test_matches_neural_tangents(attention_reference):
    r, case = attention_reference, "graph_aggregate"
    x1, x2, a1, a2 = (r[f"{case}/{key}"] for key in ("x1", "x2", "pattern1", "pattern2"))
    net = graph_net()
    k12 = net.kernel(x1, x2, get=("nngp", "ntk"), adjacency1=a1, adjacency2=a2)
    k11 = net.kernel(x1, None, get=("nngp", "ntk"), adjacency1=a1)
    for name in ("nngp", "ntk"):
        assert relative_error(k12[name], r[f"{case}/{name}12"]) < 1e-8
        assert relative_error(k11[name], r[f"{case}/{name}11"]) < 1e-8


def test_directed_graphs_follow_the_stated_orientation():
    """One layer on raw node features: ``K'(x, y) = A_x^T K(x, y) A_y`` written out."""
    x1 = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x2 = torch.randn(3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a1, a2 = random_graphs(2, 4, seed=3), random_graphs(3, 4, seed=4)
    net = wn.Sequential(wn.Aggregate(), wn.GlobalAvgPool())
    k = net.kernel(x1, x2, get="nngp", adjacency1=a1, adjacency2=a2)
    for i in range(2):
        for j in range(3):
            pos = x1[i].T @ x2[j] / 3  # (nodes, nodes) input covariance
            expected = (a1[i].T @ pos @ a2[j]).mean()
            torch.testing.assert_close(k[i, j], expected, rtol=1e-13, atol=0)


def test_edge_lists_equal_dense_adjacencies():
    x = torch.randn(3, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    # example 0: edges 0->1, 1->2 twice; example 1: 4->0 and padding; example 2: none
    edges = torch.tensor([[[0, 1], [1, 2], [1, 2]],
                          [[4, 0], [-1, -1], [-1, 3]],
                          [[-1, -1], [-1, -1], [-1, -1]]])
    dense = torch.zeros(3, 5, 5, dtype=torch.float64)
    dense[0, 0, 1], dense[0, 1, 2], dense[1, 4, 0] = 1.0, 2.0, 1.0
    net = graph_net()
    from_edges = net.kernel(x, None, get=("nngp", "ntk"), adjacency1=edges)
    from_dense = net.kernel(x, None, get=("nngp", "ntk"), adjacency1=dense)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(from_edges[name], from_dense[name], rtol=0, atol=0)


def test_finite_twin_aggregates_the_same_way():
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    a = random_graphs(2, 4, seed=7)
    twin = wn.Sequential(wn.Aggregate()).build((3, 4), dtype=torch.float64)
    expected = torch.einsum("nci,nij->ncj", x, a)
    torch.testing.assert_close(twin(x, adjacency=a), expected, rtol=1e-14, atol=0)


def monte_carlo(net, x, a, width: int, samples: int, seed: int):
    """NNGP (wide read-out) and NTK (one output) of twins with hidden width ``width``,
    averaged over ``samples`` draws; each twin sees the whole batch in one call."""
    from widenets.architectures import with_hidden_width

    generator = torch.Generator().manual_seed(seed)
    wide = with_hidden_width(net, width)
    nngp = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64)
    ntk = torch.zeros_like(nngp)
    for _ in range(samples):
        twin = wide.build(tuple(x.shape[1:]), generator, dtype=torch.float64)
        params = {name: p.detach() for name, p in twin.named_parameters()}

        def outputs(p, twin=twin):
            return functional_call(twin, p, (x,), {"adjacency": a})[:, 0]

        with torch.no_grad():
            f = twin(x, adjacency=a)
        nngp += f[:, :1] @ f[:, :1].T
        jac = jacrev(outputs)(params)
        flat = torch.cat([j.reshape(x.shape[0], -1) for j in jac.values()], dim=1)
        ntk += flat @ flat.T
    return nngp / samples, ntk / samples


def test_monte_carlo_of_the_twins_converges():
    x = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    a = random_graphs(3, 4, seed=9)
    net = wn.Sequential(wn.Conv1d(8, 1, W_std=1.5, b_std=0.1), wn.ReLU(), wn.Aggregate(),
                        wn.Conv1d(8, 1, W_std=1.2, b_std=0.2), wn.Erf(), wn.GlobalAvgPool(),
                        wn.Linear(1, 1.0, 0.1))
    exact = net.kernel(x, None, get=("nngp", "ntk"), adjacency1=a)
    scale = exact.ntk.diagonal().sqrt()
    errors = []
    for width in (8, 32, 128):
        _, ntk = monte_carlo(net, x, a, width, samples=16, seed=width)
        errors.append(float(((ntk - exact.ntk) / torch.outer(scale, scale)).abs().max()))
    # about 1/sqrt(width): 2x per step predicted
    assert errors[2] < errors[1] < errors[0] and errors[2] < errors[0] / 2.5, errors
    assert errors[2] < 0.1, errors


def test_masked_nodes_are_ignored_as_if_absent():
    x = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    a = random_graphs(2, 4, seed=11)
    grown = torch.cat([x, 3 * torch.ones(2, 3, 2, dtype=torch.float64)], dim=2)
    big = torch.ones(2, 6, 6, dtype=torch.float64)  # padded nodes connected to everything
    big[:, :4, :4] = a
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :4] = True
    net = graph_net()
    plain = net.kernel(x, None, get=("nngp", "ntk"), adjacency1=a)
    padded = net.kernel(grown, None, get=("nngp", "ntk"), adjacency1=big, mask1=mask)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(padded[name], plain[name], rtol=1e-12, atol=0)


def test_gradients_through_aggregation():
    x1 = torch.randn(2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12),
                     requires_grad=True)
    x2 = torch.randn(2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(13),
                     requires_grad=True)
    a1, a2 = random_graphs(2, 3, seed=14), random_graphs(2, 3, seed=15)
    net = wn.Sequential(wn.Conv1d(8, 1, W_std=1.3, b_std=0.2), wn.Erf(), wn.Aggregate(),
                        wn.GlobalAvgPool(), wn.Linear(1))
    assert torch.autograd.gradcheck(
        lambda u, v: net.kernel(u, v, get="ntk", adjacency1=a1, adjacency2=a2), (x1, x2))


def test_errors():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    net = graph_net()
    with pytest.raises(ValueError, match="adjacency1"):
        net.kernel(x, None)
    with pytest.raises(ValueError, match=r"adjacency1 must be a dense \(N, P, P\)"):
        net.kernel(x, None, adjacency1=torch.ones(2, 4, 3, dtype=torch.float64))
    bad = torch.ones(2, 4, 4, dtype=torch.float64)
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="adjacency1 holds NaN"):
        net.kernel(x, None, adjacency1=bad)
    with pytest.raises(ValueError, match="names a node >= 4"):
        net.kernel(x, None, adjacency1=torch.tensor([[[0, 4]], [[1, 2]]]))
    with pytest.raises(ValueError, match="adjacency2 is for x2"):
        net.kernel(x, None, adjacency1=torch.ones(2, 4, 4), adjacency2=torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="given together"):
        net.kernel(x, x, adjacency1=torch.ones(2, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="have none"):
        wn.Sequential(wn.Linear(4), wn.ReLU(), wn.Linear(1)).kernel(
            torch.ones(2, 3, dtype=torch.float64), adjacency1=torch.ones(2, 3, 3))
    with pytest.raises(TypeError, match="adjacency1 must be a floating"):
        net.kernel(x, None, adjacency1=torch.ones(2, 4, 4, dtype=torch.bool))
    twin = net.build((3, 4), dtype=torch.float64)
    with pytest.raises(ValueError, match="adjacency=A"):
        twin(x)


def test_monte_carlo_kernel_carries_the_graphs():
    x1 = torch.randn(3, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
    x2 = torch.randn(2, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(17))
    a1, a2 = random_graphs(3, 4, seed=18), random_graphs(2, 4, seed=19)
    net = wn.Sequential(wn.Conv1d(128, 1, W_std=1.5, b_std=0.1), wn.ReLU(), wn.Aggregate(),
                        wn.Conv1d(128, 1, W_std=1.2), wn.Erf(), wn.GlobalAvgPool(),
                        wn.Linear(1))
    exact = net.kernel(x1, x2, get="ntk", adjacency1=a1, adjacency2=a2)
    estimate = wn.monte_carlo_kernel(net, x1, x2, get="ntk", n_samples=16,
                                     generator=torch.Generator().manual_seed(20),
                                     adjacency1=a1, adjacency2=a2)
    assert float((estimate - exact).abs().max()) < 0.1 * float(exact.abs().max())
