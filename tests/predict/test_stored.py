"""Predictions from a store (training kernels larger than memory): the blocked
factorisation on disk forced by a tiny memory_limit equals the in-memory answer; a run
killed by SIGKILL during the factorisation or the solve resumes with the identical answer
and without redoing finished tiles; stores of other computations are refused; bad
memory limits and targets are named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import widenets as wn
from widenets.predict import gp_inference, gradient_descent_mse_ensemble
from widenets.predict.blocked import (
    BlockedFactor,
    memory_bytes,
    step_memory,
    tile_side,
)
from widenets.store import TileStore

pytestmark = pytest.mark.usefixtures("one_thread")

N, M, D = 150, 20, 6
#: Tiles of 32 for 150 training points: 5 x 5 blocks, 15 tiles on and below the diagonal.
MEMORY = step_memory(N, 32)
TILES = 15


def data(seed: int = 0, outputs: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    y = torch.randn(N, outputs, dtype=torch.float64, generator=g)
    xs = torch.randn(M, D, dtype=torch.float64, generator=g)
    return x, y, xs


def net() -> wn.Layer:
    return wn.Sequential(wn.Linear(64, 1.5, 0.1), wn.ReLU(), wn.Linear(64, 1.5, 0.1),
                         wn.Erf(), wn.Linear(1))


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def test_the_tile_side_fits_the_memory_limit():
    assert tile_side(N, MEMORY) == 32
    assert step_memory(N, tile_side(N, 10**6)) <= 10**6
    assert tile_side(60_000, memory_bytes("20GiB")) == 4096


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_the_out_of_core_solve_equals_the_in_memory_one(tmp_path, get):
    x, y, xs = data()
    exact = gp_inference(net(), x, y, diag_reg=1e-4)
    mean, cov = exact(xs, get=get)
    stored = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path / "s",
                          memory_limit=MEMORY)
    got_mean, got_cov = stored(xs, get=get)
    assert relative(got_mean, mean) < 1e-8 and relative(got_cov, cov) < 1e-8
    assert stored.relative_residuals[get] <= 1e-10
    assert exact.relative_residuals[get] <= 1e-10
    factor = TileStore.open_finished(tmp_path / "s" / f"factor-{get}")
    assert factor.identity["tile"] == [32, 32] and len(factor.finished()) == TILES
    # a vector of targets, and the ensemble at t = inf: the same solve
    ensemble = gradient_descent_mse_ensemble(net(), x, y[:, 0], diag_reg=1e-4,
                                             store=tmp_path / "e", memory_limit="60KiB")
    expected = gradient_descent_mse_ensemble(net(), x, y[:, 0], diag_reg=1e-4)(
        xs, None, get=get, compute_cov=False)[0]
    got = ensemble(xs, None, get=get, compute_cov=False)[0]
    assert got.shape == (M,) and relative(got, expected) < 1e-8


def test_a_second_call_reads_everything_from_the_store(tmp_path, monkeypatch):
    x, y, xs = data()
    first = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path, memory_limit=MEMORY)(
        xs, get="ntk", compute_cov=False)[0]
    computed = []
    original = wn.Layer.kernel
    monkeypatch.setattr(wn.Layer, "kernel", lambda *a, **k: computed.append(1) or original(
        *a, **k))
    again = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path, memory_limit=MEMORY)
    assert torch.equal(again(xs, get="ntk", compute_cov=False)[0], first)
    assert not computed
    assert again.relative_residuals["ntk"] <= 1e-10


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)  # as the test (one_thread): the same bits
    sys.path.insert(0, {root!r})
    from tests.predict.test_stored import data, net, MEMORY
    from widenets.predict import gp_inference
    from widenets.predict.blocked import BlockedFactor
    from widenets.store import TileStore

    stage, count = sys.argv[1], int(sys.argv[2])
    if stage == "factor":
        original = TileStore.write
        written = []

        def write(self, tile, values):
            if len(written) == count:
                os.kill(os.getpid(), signal.SIGKILL)
            written.append(tile)
            original(self, tile, values)

        TileStore.write = write
    else:
        def solve(self, rhs):
            os.kill(os.getpid(), signal.SIGKILL)

        BlockedFactor.solve = solve
    x, y, xs = data()
    gp_inference(net(), x, y, diag_reg=1e-4, store=sys.argv[3], memory_limit=MEMORY)(
        xs, get="nngp", compute_cov=False)
""")


def killed_run(store: Path, stage: str, count: int = 0) -> None:
    root = str(Path(__file__).resolve().parents[2])
    script = KILLED_RUN.format(root=root)
    result = subprocess.run([sys.executable, "-c", script, stage, str(count), str(store)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr


@pytest.mark.parametrize("stage,count", [("factor", 7), ("solve", 0)])
def test_a_killed_run_resumes_with_the_identical_answer(tmp_path, monkeypatch, stage, count):
    x, y, xs = data()
    reference = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path / "whole",
                             memory_limit=MEMORY)(xs, get="nngp", compute_cov=False)[0]
    killed_run(tmp_path / "killed", stage, count)
    done = tmp_path / "killed" / "factor-nngp" / "done"
    assert len(list(done.iterdir())) == (count if stage == "factor" else TILES)
    written = []
    original = TileStore.write

    def counting(self, tile, values):
        written.append(tile.key)
        original(self, tile, values)

    monkeypatch.setattr(TileStore, "write", counting)
    resumed = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path / "killed",
                           memory_limit=MEMORY)(xs, get="nngp", compute_cov=False)[0]
    assert torch.equal(resumed, reference)
    factor_tiles = TILES - count if stage == "factor" else 0
    assert len(written) == factor_tiles + 5  # and the test kernel's 5 tiles (rows 20)


def test_a_store_of_another_computation_is_refused(tmp_path):
    x, y, xs = data()
    gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path, memory_limit=MEMORY)(
        xs, get="nngp", compute_cov=False)
    other_x = x.clone()
    other_x[0, 0] += 1.0
    with pytest.raises(ValueError, match="holds a different computation: its inputs_sha256"):
        gp_inference(net(), other_x, y, diag_reg=1e-4, store=tmp_path, memory_limit=MEMORY)(
            xs, get="nngp", compute_cov=False)
    with pytest.raises(ValueError, match="holds a different computation: its diag_reg"):
        gp_inference(net(), x, y, diag_reg=1e-3, store=tmp_path, memory_limit=MEMORY)(
            xs, get="nngp", compute_cov=False)
    with pytest.raises(ValueError, match="holds a different computation: its architecture"):
        gp_inference(wn.Sequential(wn.Linear(8, 1.2), wn.ReLU(), wn.Linear(1)), x, y,
                     diag_reg=1e-4, store=tmp_path, memory_limit=MEMORY)(
            xs, get="nngp", compute_cov=False)
    # other targets reuse the factor: only their solution is new
    new_y = torch.randn(N, 2, dtype=torch.float64)
    mean = gp_inference(net(), x, new_y, diag_reg=1e-4, store=tmp_path, memory_limit=MEMORY)(
        xs, get="nngp", compute_cov=False)[0]
    exact = gp_inference(net(), x, new_y, diag_reg=1e-4)(xs, get="nngp", compute_cov=False)[0]
    assert relative(mean, exact) < 1e-8


def test_memory_limits_too_small_say_the_minimum(tmp_path):
    x, y, xs = data()
    minimum = step_memory(N, 16)
    with pytest.raises(ValueError, match=f"too small .* the minimum is {minimum} bytes"):
        gp_inference(net(), x, y, store=tmp_path, memory_limit=minimum - 1)(xs)
    with pytest.raises(ValueError, match="needs about .* bytes .* pass store="):
        gp_inference(net(), x, y, memory_limit="100KiB")


@pytest.mark.parametrize("value,expected", [
    (1234, 1234), ("600MiB", 600 * 2**20), ("20GiB", 20 * 2**30), ("1.5GB", 1_500_000_000),
    ("64 kib", 65536), ("512", 512), ("2B", 2)])
def test_memory_sizes(value, expected):
    assert memory_bytes(value) == expected


@pytest.mark.parametrize("value,error", [
    ("20 parsecs", ValueError), ("", ValueError), (0, ValueError), ("-5MiB", ValueError),
    (1.5, TypeError), (True, TypeError), (None, TypeError)])
def test_bad_memory_sizes_are_named(value, error):
    with pytest.raises(error, match="memory_limit"):
        memory_bytes(value)


def test_bad_targets_and_sources_are_named(tmp_path):
    x, y, _ = data()
    with pytest.raises(ValueError, match=r"y_train must have shape \(150,\)"):
        gp_inference(net(), x, y[:-1], store=tmp_path, memory_limit=MEMORY)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="is not a folder; it is left untouched"):
        gp_inference(net(), x, y, store=tmp_path / "file", memory_limit=MEMORY)
    assert (tmp_path / "file").read_text() == "mine"
    with pytest.raises(TypeError, match="store= needs an architecture"):
        gp_inference(lambda a, b, get: a @ (a if b is None else b).T, x, y, store=tmp_path)
    ensemble = gradient_descent_mse_ensemble(net(), x, y, diag_reg=1e-4, store=tmp_path,
                                             memory_limit=MEMORY)
    with pytest.raises(ValueError, match="t=None and compute_cov=False"):
        ensemble(x[:3], 1.0, compute_cov=False)


def test_an_ill_conditioned_kernel_is_refused(tmp_path):
    x, y, xs = data()
    x = torch.cat([x, x[:5]])  # duplicates: singular without diag_reg
    y = torch.cat([y, y[:5] + 1.0])
    with pytest.raises(ValueError, match="not positive definite .* diag_reg"):
        gp_inference(net(), x, y, store=tmp_path, memory_limit=MEMORY)(xs, compute_cov=False)


def test_blocked_factor_matches_torch_cholesky(tmp_path):
    """The factor's tiles are those of torch.linalg.cholesky (each tile once)."""
    x, y, _ = data()
    gp_inference(net(), x, y, diag_reg=1e-3, store=tmp_path, memory_limit=MEMORY)(
        x[:2], get="ntk", compute_cov=False)
    store = TileStore.open_finished(tmp_path / "factor-ntk")
    factor = BlockedFactor(store, "ntk", N, 32)
    k = net().kernel(x, get="ntk") + 1e-3 * torch.eye(N, dtype=torch.float64)
    expected = torch.linalg.cholesky(0.5 * (k + k.T)).numpy()
    got = np.zeros((N, N))
    for i in range(5):
        for j in range(i + 1):
            tile = factor.tile(i, j)
            got[tile.rows, tile.cols] = factor.read(i, j)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert os.path.isdir(tmp_path / "factor-ntk" / "done")


def test_a_local_cluster_gives_the_single_process_answer(tmp_path):
    """Every stage's tiles on two worker processes (the factor's block columns in
    parallel, the residual, the test kernel): the same numbers to rounding (the workers'
    BLAS may sum in another order)."""
    from tests.test_tiles import patient_local_cluster

    x, y, xs = data()
    expected = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path / "here",
                            memory_limit=MEMORY)
    with patient_local_cluster(2, processes=True) as (_, client):
        distributed = gp_inference(net(), x, y, diag_reg=1e-4, store=tmp_path / "there",
                                   memory_limit=MEMORY, client=client)
        for get in ("nngp", "ntk"):
            got = distributed(xs, get=get, compute_cov=False)[0]
            want = expected(xs, get=get, compute_cov=False)[0]
            assert relative(got, want) < 1e-12
            assert distributed.relative_residuals[get] <= 1e-10
    for get in ("nngp", "ntk"):
        assert len(list((tmp_path / "there" / f"factor-{get}" / "done").iterdir())) == TILES
    with pytest.raises(ValueError, match="pass store= too"):
        gp_inference(net(), x, y, client=object())


def test_masked_sequences_from_a_store_equal_the_in_memory_answer(tmp_path):
    """Masks of the training and test inputs reach every stage (and the store's
    identity: other masks are another computation)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, 6, dtype=torch.float64, generator=g)
    y = torch.randn(40, 2, dtype=torch.float64, generator=g)
    xs = torch.randn(9, 3, 6, dtype=torch.float64, generator=g)
    lengths = torch.randint(1, 7, (40,), generator=g)
    mask = torch.arange(6)[None, :] < lengths[:, None]
    mask_test = torch.arange(6)[None, :] < torch.randint(1, 7, (9,), generator=g)[:, None]
    seq = wn.Sequential(wn.Conv1d(16, 3, padding="same", W_std=1.4, b_std=0.1), wn.ReLU(),
                        wn.GlobalAvgPool(), wn.Linear(1))
    expected = gp_inference(seq, x, y, diag_reg=1e-3, mask_train=mask)(
        xs, get="ntk", mask_test=mask_test)
    stored = gp_inference(seq, x, y, diag_reg=1e-3, mask_train=mask, store=tmp_path,
                          memory_limit=step_memory(40, 16))
    got = stored(xs, get="ntk", mask_test=mask_test)
    assert relative(got[0], expected[0]) < 1e-8 and relative(got[1], expected[1]) < 1e-8
    other = mask.clone()
    other[int(torch.nonzero(lengths < 6)[0])] = True  # one sequence longer
    with pytest.raises(ValueError, match="its side_inputs_sha256"):
        gp_inference(seq, x, y, diag_reg=1e-3, mask_train=other, store=tmp_path,
                     memory_limit=step_memory(40, 16))(xs, get="ntk", mask_test=mask_test)
