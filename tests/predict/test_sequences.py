"""Predictions with masks, graphs and outputs that keep their positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import widenets as wn


def normal(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def lengths_mask(lengths, size: int) -> torch.Tensor:
    return torch.arange(size).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


POOLED = wn.Sequential(wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU(),
                       wn.SelfAttention(b_std=0.1), wn.Erf(), wn.GlobalAvgPool(),
                       wn.Linear(1, 1.2, 0.1))
SEQ2SEQ = wn.Sequential(wn.Conv1d(8, 3, padding="same", W_std=1.5, b_std=0.1), wn.ReLU(),
                        wn.Conv1d(1, 1, W_std=1.2, b_std=0.1))


def test_masked_predictions_are_the_kernel_formulas_and_ignore_padding():
    x_train, x_test = normal(6, 2, 5, seed=1), normal(3, 2, 5, seed=2)
    m_train, m_test = lengths_mask([5, 3, 2, 4, 5, 1], 5), lengths_mask([2, 5, 4], 5)
    y = normal(6, 2, seed=3)
    posterior = wn.predict.gp_inference(POOLED, x_train, y, diag_reg=1e-3, mask_train=m_train)
    mean, cov = posterior(x_test, get="nngp", mask_test=m_test)
    k = POOLED.kernel(x_train, None, get="nngp", mask1=m_train)
    k_tx = POOLED.kernel(x_test, x_train, get="nngp", mask1=m_test, mask2=m_train)
    k_tt = POOLED.kernel(x_test, None, get="nngp", mask1=m_test)
    a = k + 1e-3 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(mean, k_tx @ torch.linalg.solve(a, y), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cov, k_tt - k_tx @ torch.linalg.solve(a, k_tx.T),
                               rtol=1e-8, atol=1e-10)
    # padding both sets to a longer length changes nothing
    grow = lambda x: torch.cat([x, 50 * normal(x.shape[0], 2, 3, seed=4)], dim=2)  # noqa: E731
    longer = wn.predict.gp_inference(POOLED, grow(x_train), y, diag_reg=1e-3,
                                     mask_train=lengths_mask([5, 3, 2, 4, 5, 1], 8))
    mean_longer, _ = longer(grow(x_test), get="nngp", mask_test=lengths_mask([2, 5, 4], 8))
    torch.testing.assert_close(mean_longer, mean, rtol=1e-10, atol=1e-12)
    ensemble = wn.predict.gradient_descent_mse_ensemble(POOLED, x_train, y, diag_reg=1e-3,
                                                        mask_train=m_train)
    mean_ntk, _ = ensemble(x_test, get="ntk", mask_test=m_test)
    k_ntk = POOLED.kernel(x_train, None, get="ntk", mask1=m_train)
    k_ntk_tx = POOLED.kernel(x_test, x_train, get="ntk", mask1=m_test, mask2=m_train)
    expected = k_ntk_tx @ torch.linalg.solve(k_ntk + 1e-3 * torch.eye(6, dtype=torch.float64), y)
    torch.testing.assert_close(mean_ntk, expected, rtol=1e-8, atol=1e-10)


def test_graph_predictions():
    nodes_train, nodes_test = normal(5, 2, 4, seed=5), normal(2, 2, 4, seed=6)
    graphs_train = (normal(5, 4, 4, seed=7) > 0).double()
    graphs_test = (normal(2, 4, 4, seed=8) > 0).double()
    gnn = wn.Sequential(wn.Conv1d(8, 1, W_std=1.5, b_std=0.1), wn.ReLU(), wn.Aggregate(),
                        wn.GlobalAvgPool(), wn.Linear(1))
    y = normal(5, seed=9)
    posterior = wn.predict.gp_inference(gnn, nodes_train, y, diag_reg=1e-4,
                                        adjacency_train=graphs_train)
    mean, _ = posterior(nodes_test, get="ntk", compute_cov=False, adjacency_test=graphs_test)
    k = gnn.kernel(nodes_train, None, get="ntk", adjacency1=graphs_train)
    k_tx = gnn.kernel(nodes_test, nodes_train, get="ntk", adjacency1=graphs_test,
                      adjacency2=graphs_train)
    expected = k_tx @ torch.linalg.solve(k + 1e-4 * torch.eye(5, dtype=torch.float64), y)
    assert mean.shape == (2,)
    torch.testing.assert_close(mean, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("outputs", [None, 2])
def test_positional_outputs_predict_every_position(outputs):
    x_train, x_test = normal(4, 2, 5, seed=10), normal(3, 2, 5, seed=11)
    y = normal(4, 5, seed=12) if outputs is None else normal(4, 5, outputs, seed=12)
    posterior = wn.predict.gp_inference(SEQ2SEQ, x_train, y, diag_reg=1e-3)
    mean, cov = posterior(x_test, get="ntk")
    assert mean.shape == ((3, 5) if outputs is None else (3, 5, outputs))
    assert cov.shape == (3, 5, 3, 5)
    points = lambda k: k.permute(0, 2, 1, 3).reshape(k.shape[0] * 5, k.shape[1] * 5)  # noqa: E731
    k = points(SEQ2SEQ.kernel(x_train, None, get="ntk"))
    k_tx = points(SEQ2SEQ.kernel(x_test, x_train, get="ntk"))
    k_tt = points(SEQ2SEQ.kernel(x_test, None, get="ntk"))
    a = k + 1e-3 * torch.eye(20, dtype=torch.float64)
    rows = y.reshape(20, -1)
    torch.testing.assert_close(mean.reshape(15, -1), k_tx @ torch.linalg.solve(a, rows),
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(cov.reshape(15, 15), k_tt - k_tx @ torch.linalg.solve(a, k_tx.T),
                               rtol=1e-8, atol=1e-10)
    ensemble = wn.predict.gradient_descent_mse_ensemble(SEQ2SEQ, x_train, y, diag_reg=1e-3)
    mean_inf, cov_inf = ensemble(x_test, t=None, get="ntk")
    torch.testing.assert_close(mean_inf, mean, rtol=1e-8, atol=1e-10)
    assert cov_inf.shape == (3, 5, 3, 5)


def test_marginal_likelihood_of_positional_targets():
    x, y = normal(4, 2, 5, seed=13), normal(4, 5, seed=14)
    mll = wn.predict.marginal_log_likelihood(SEQ2SEQ, x, y, get="nngp", diag_reg=0.1)
    k = SEQ2SEQ.kernel(x, None, get="nngp").permute(0, 2, 1, 3).reshape(20, 20).numpy()
    a = k + 0.1 * np.eye(20)
    v = y.reshape(20).numpy()
    expected = (-0.5 * v @ np.linalg.solve(a, v) - 0.5 * np.linalg.slogdet(a)[1]
                - 10 * np.log(2 * np.pi))
    assert abs(float(mll) - expected) < 1e-9 * abs(expected)


def test_errors():
    x = normal(4, 2, 5, seed=15)
    with pytest.raises(ValueError, match=r"\(N, \*positions\) = \(4, 5\)"):
        wn.predict.gp_inference(SEQ2SEQ, x, normal(4, 3, seed=16))(x)
    with pytest.raises(ValueError, match="need an architecture"):
        wn.predict.gp_inference(lambda a, b, get: a.flatten(1) @ a.flatten(1).T, x,
                                normal(4, seed=17), mask_train=lengths_mask([5, 5, 5, 5], 5))
    with pytest.raises(ValueError, match="mask1 must have shape"):
        wn.predict.gp_inference(POOLED, x, normal(4, seed=18),
                                mask_train=lengths_mask([5, 5], 5))(x)
