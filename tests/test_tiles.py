"""Kernel matrices in tiles: awkward tile sizes equal the direct computation; a store
resumes after SIGKILL recomputing only unfinished tiles; a mismatched store is refused;
a Dask LocalCluster with 2 worker processes gives the identical matrix; ``get`` gives a
tensor or ``Kernels`` as in ``net.kernel``; integer-like tile sizes are accepted.

Nothing here depends on timing: a child process to be killed blocks until it is, and
Dask clusters get generous timeouts and are awaited.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import widenets as wn
from widenets import tiles as tiles_module

FC = wn.Sequential(wn.Linear(8, 1.5, 0.05), wn.ReLU(), wn.Linear(8, 1.5, 0.05), wn.Erf(),
                   wn.Linear(1, 1.5, 0.05))
CNN = wn.Sequential(wn.Conv2d(4, 3, padding="same", W_std=1.5, b_std=0.05), wn.ReLU(),
                    wn.GlobalAvgPool(), wn.Linear(1, 1.5, 0.05))


def data(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tile", [1, 7, (5, 11), 100, "auto"])
@pytest.mark.parametrize("second", ["x2=None", "x2=given"])
def test_awkward_tiles_equal_the_direct_kernel(tile, second):
    x1 = data(23, (5,), seed=0)
    x2 = None if second == "x2=None" else data(17, (5,), seed=1)
    if x2 is None and isinstance(tile, tuple):
        with pytest.raises(ValueError, match="tiles must be square"):
            wn.kernel_matrix(FC, x1, x2, tile=tile, progress=False)
        return
    expected = FC.kernel(x1, x2, get=("nngp", "ntk"))
    both = wn.kernel_matrix(FC, x1, x2, get=("nngp", "ntk"), tile=tile, progress=False)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(both[name], expected[name], rtol=1e-12, atol=1e-13)
    ntk = wn.kernel_matrix(FC, x1, x2, tile=tile, progress=False)
    torch.testing.assert_close(ntk, expected.ntk, rtol=1e-12, atol=1e-13)
    if x2 is None:
        assert torch.equal(ntk, ntk.T)


def test_convolutional_tiles_and_numpy_input():
    x = data(9, (2, 5, 5), seed=2).numpy()
    expected = CNN.kernel(x, None, get="ntk")
    result = wn.kernel_matrix(CNN, x, tile=4, progress=False)
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-13)


def test_symmetric_call_computes_only_the_upper_triangle(monkeypatch):
    calls = []
    original = tiles_module.compute_tile
    monkeypatch.setattr(tiles_module, "compute_tile",
                        lambda *a: calls.append(a[3]) or original(*a))
    wn.kernel_matrix(FC, data(10, (5,), seed=3), tile=4, progress=False)
    # Row blocks [0, 4), [4, 8), [8, 10): 3 + 2 + 1 tiles.
    assert len(calls) == 6 and all(t.c0 >= t.r0 for t in calls)


def test_auto_tile_follows_memory_and_pair_cost():
    shape = (3, 8, 8)
    dense = tiles_module.auto_tile(FC, 5000, 5000, (10,), 1, 8, memory_limit=1 << 30)
    pooled = tiles_module.auto_tile(CNN, 5000, 5000, shape, 1, 8, memory_limit=1 << 30)
    assert tiles_module.pair_cost(CNN, shape) == 64 * 64
    assert tiles_module.pair_cost(FC, (10,)) == 1
    assert pooled < dense and pooled * pooled * 64 * 64 * 8 * tiles_module.WORKING_COPIES <= (
        (1 << 30) - 5000 * 5000 * 8)
    with pytest.raises(ValueError, match="memory_limit"):
        tiles_module.auto_tile(FC, 5000, 5000, (10,), 1, 8, memory_limit=100 << 20)


def test_store_resumes_and_load_kernel(tmp_path, monkeypatch):
    x = data(20, (5,), seed=4)
    path = tmp_path / "k.zarr"
    first = wn.kernel_matrix(FC, x, get=("nngp", "ntk"), tile=6, store=path, progress=False)
    calls = []
    original = tiles_module.compute_tile
    monkeypatch.setattr(tiles_module, "compute_tile",
                        lambda *a: calls.append(a[3]) or original(*a))
    again = wn.kernel_matrix(FC, x, get=("nngp", "ntk"), tile=6, store=path, progress=False)
    assert calls == []  # everything came from the store
    loaded = wn.load_kernel(path)
    for name in ("nngp", "ntk"):
        assert torch.equal(again[name], first[name])
        assert torch.equal(loaded[name], first[name])


def test_mismatched_store_is_refused(tmp_path):
    x = data(12, (5,), seed=5)
    path = tmp_path / "k.zarr"
    wn.kernel_matrix(FC, x, get="ntk", tile=5, store=path, progress=False)
    other_net = wn.Sequential(wn.Linear(8, 1.4, 0.05), wn.ReLU(), wn.Linear(1, 1.5, 0.05))
    cases = {
        "inputs_sha256": dict(net=FC, x1=x + 1e-9, get="ntk"),
        "architecture": dict(net=other_net, x1=x, get="ntk"),
        "get": dict(net=FC, x1=x, get="nngp"),
        "tile": dict(net=FC, x1=x, get="ntk", tile=4),
    }
    for field, kwargs in cases.items():
        kwargs.setdefault("tile", 5)
        with pytest.raises(ValueError, match=f"its {field} is"):
            wn.kernel_matrix(store=path, progress=False, **kwargs)
    with pytest.raises(ValueError, match="not a kernel store"):
        wn.load_kernel(tmp_path / "nothing.zarr")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a folder that is not a kernel store"):
        wn.kernel_matrix(FC, x, store=other, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_unfinished_store_is_not_loaded(tmp_path, monkeypatch):
    x = data(12, (5,), seed=6)
    path = tmp_path / "k.zarr"
    original = tiles_module.compute_tile
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(tiles_module, "compute_tile", failing)
    with pytest.raises(KeyboardInterrupt):
        wn.kernel_matrix(FC, x, tile=4, store=path, progress=False)
    assert len(os.listdir(path / "done")) == 2
    with pytest.raises(ValueError, match="unfinished"):
        wn.load_kernel(path)


CHILD = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    import torch
    import widenets as wn
    from widenets import tiles

    store, tiles_before_blocking, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    seed = int(sys.argv[4])
    original = tiles.compute_tile
    calls = []

    def blocking(*args):
        calls.append(1)
        if len(calls) > tiles_before_blocking:
            Path(ready).write_text("ready")
            threading.Event().wait()  # holds the store (and its lock) until killed
        return original(*args)

    tiles.compute_tile = blocking
    net = wn.Sequential(wn.Linear(8, 1.5, 0.05), wn.ReLU(), wn.Linear(8, 1.5, 0.05),
                        wn.Erf(), wn.Linear(1, 1.5, 0.05))
    x = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    wn.kernel_matrix(net, x, get=("nngp", "ntk"), tile=4, store=store, progress=False)
""")
#: How long a test waits for a child process to reach its blocking point before failing
#: (a guard against a hang, not a timing assumption: the child normally needs seconds).
CHILD_PATIENCE_S = 600


def start_blocked_writer(path: Path, tiles_before_blocking: int, workdir: Path,
                         seed: int = 7) -> subprocess.Popen:
    """A child process running ``kernel_matrix(FC, data(30, (5,), seed), get=("nngp",
    "ntk"), tile=4, store=path)`` that finishes ``tiles_before_blocking`` tiles and then
    blocks, holding the store, until it is killed. Returns once it blocks."""
    ready, log = workdir / f"ready-{seed}", workdir / f"child-{seed}.err"
    with open(log, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path),
                                  str(tiles_before_blocking), str(ready), str(seed)],
                                 stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + CHILD_PATIENCE_S
    while not ready.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"the child did not block: {log.read_text()}")
        time.sleep(0.05)
    return child


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def test_sigkill_then_resume_recomputes_only_unfinished_tiles(tmp_path, monkeypatch):
    path = tmp_path / "k.zarr"
    kill(start_blocked_writer(path, 5, tmp_path))
    done = path / "done"
    finished = {p.name for p in done.iterdir() if not p.name.startswith(".")}
    n_tiles = len(tiles_module.plan_tiles(30, 30, 4, 4, True))  # 8 row blocks: 36 tiles
    assert len(finished) == 5 < n_tiles

    calls = []
    original = tiles_module.compute_tile
    monkeypatch.setattr(tiles_module, "compute_tile",
                        lambda *a: calls.append(a[3].key) or original(*a))
    x = data(30, (5,), seed=7)
    resumed = wn.kernel_matrix(FC, x, get=("nngp", "ntk"), tile=4, store=path, progress=False)
    assert sorted(calls) == sorted(
        t.key for t in tiles_module.plan_tiles(30, 30, 4, 4, True) if t.key not in finished)
    expected = wn.kernel_matrix(FC, x, get=("nngp", "ntk"), tile=4, progress=False)
    for name in ("nngp", "ntk"):
        assert torch.equal(resumed[name], expected[name])
        assert torch.equal(wn.load_kernel(path)[name], expected[name])


@contextlib.contextmanager
def patient_local_cluster(n_workers: int, processes: bool) -> Iterator:
    """A Dask LocalCluster and a Client on it that wait as long as a loaded machine needs
    (connections, start-up, scatter: 10 minutes) and whose workers are awaited before
    use, so that no test depends on how fast they start."""
    import dask
    import distributed

    patience = {"distributed.comm.timeouts.connect": "600s",
                "distributed.comm.timeouts.tcp": "600s"}
    with dask.config.set(patience), \
            distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1,
                                     processes=processes, dashboard_address=":0") as cluster, \
            distributed.Client(cluster, timeout="600s") as client:
        client.wait_for_workers(n_workers, timeout=600)
        yield cluster, client


def test_local_cluster_gives_the_identical_matrix(tmp_path):
    """Bit for bit (tiles are computed on freshly aligned copies of their inputs)."""
    x1, x2 = data(21, (5,), seed=8), data(13, (5,), seed=9)
    expected = wn.kernel_matrix(FC, x1, x2, get=("nngp", "ntk"), tile=5, progress=False)
    symmetric = wn.kernel_matrix(FC, x1, get="ntk", tile=5, progress=False)
    with patient_local_cluster(2, processes=True) as (_, client):
        assert len(client.scheduler_info()["workers"]) == 2
        result = wn.kernel_matrix(FC, x1, x2, get=("nngp", "ntk"), tile=5, progress=False,
                                  client=client)
        stored = wn.kernel_matrix(FC, x1, get="ntk", tile=5, progress=False, client=client,
                                  store=tmp_path / "k.zarr")
        # The same call again at once, and again: equal data scattered under one key lost
        # its dependencies while the previous call's copy was being released.
        repeated = [wn.kernel_matrix(FC, x1, get="ntk", tile=5, progress=False,
                                     client=client) for _ in range(3)]
    for name in ("nngp", "ntk"):
        assert torch.equal(result[name], expected[name])
    assert all(torch.equal(again, symmetric) for again in repeated)
    assert torch.equal(stored, symmetric)
    assert torch.equal(wn.load_kernel(tmp_path / "k.zarr"), symmetric)


def test_bad_arguments():
    x = data(5, (3,), seed=10)
    with pytest.raises(TypeError, match="net must be a widenets layer"):
        wn.kernel_matrix("fc", x)
    with pytest.raises(TypeError, match="tile must be"):
        wn.kernel_matrix(FC, x, tile="big")
    with pytest.raises(ValueError, match="tile must be an integer >= 1"):
        wn.kernel_matrix(FC, x, tile=0)
    with pytest.raises(ValueError, match="memory_limit"):
        wn.kernel_matrix(FC, x, memory_limit=-1)
    with pytest.raises(ValueError, match="get must name"):
        wn.kernel_matrix(FC, x, get="both")


def test_store_is_plain_zarr_and_json(tmp_path):
    """No pickle anywhere: the store's metadata is JSON and its arrays are Zarr chunks."""
    path = tmp_path / "k.zarr"
    wn.kernel_matrix(FC, data(6, (3,), seed=11), tile=4, store=path, progress=False)
    for file in Path(path).rglob("*"):
        if file.is_file():
            assert not file.read_bytes().startswith(b"\\x80"), file  # pickle protocol header
    description = tiles_module.store_description(path)
    assert description["complete"] is True
    assert description["widenets"]["get"] == ["ntk"]
    assert description["widenets"]["shape"] == [6, 6]
    np.testing.assert_array_equal(description["widenets"]["tile"], [4, 4])


def test_auto_tiles_resume_from_the_store_whatever_memory_is_free(tmp_path, monkeypatch):
    x = data(40, (5,), seed=12)
    path = tmp_path / "k.zarr"
    first = wn.kernel_matrix(FC, x, store=path, progress=False,
                             memory_limit=40 * 40 * 8 + 12 * 8 * 15 * 15)  # tiles of 15
    assert tiles_module.stored_tile_sizes(path) == (15, 15)
    calls = []
    original = tiles_module.compute_tile
    monkeypatch.setattr(tiles_module, "compute_tile",
                        lambda *a: calls.append(1) or original(*a))
    again = wn.kernel_matrix(FC, x, store=path, progress=False)  # auto would now pick 40
    assert calls == [] and torch.equal(again, first)


@pytest.mark.parametrize("integer", [np.int64(4), np.int32(4), torch.tensor(4), np.array(4)],
                         ids=["np.int64", "np.int32", "0-D tensor", "0-D array"])
def test_integer_like_tile_and_memory_limit_are_accepted(integer):
    x = data(10, (5,), seed=13)
    expected = wn.kernel_matrix(FC, x, tile=4, progress=False)
    assert torch.equal(wn.kernel_matrix(FC, x, tile=integer, progress=False), expected)
    pair = wn.kernel_matrix(FC, x, x[:7], tile=(integer, np.int64(3)), progress=False)
    assert torch.equal(pair, wn.kernel_matrix(FC, x, x[:7], tile=(4, 3), progress=False))
    limit = np.int64(10 * 10 * 8 + 12 * 8 * 4 * 4)  # room for tiles of 4
    assert tiles_module.prepare_kernel(FC, x, memory_limit=limit).rows == 4
    big = wn.kernel_matrix(FC, x, memory_limit=integer * (1 << 28), progress=False)
    torch.testing.assert_close(big, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (True, TypeError, "must be an integer >= 1"),
        (np.bool_(True), TypeError, "must be an integer >= 1"),
        (torch.tensor(True), TypeError, "must be an integer >= 1"),
        (4.0, TypeError, None),
        (np.float64(4.0), TypeError, None),
        (torch.tensor(4.0), TypeError, "must be an integer >= 1"),
        (torch.tensor([4]), TypeError, "must be an integer >= 1"),
        (np.int64(0), ValueError, "must be an integer >= 1"),
        (torch.tensor(-3), ValueError, "must be an integer >= 1"),
    ],
)
def test_non_integers_and_non_positive_sizes_are_refused(value, error, message):
    x = data(6, (3,), seed=14)
    with pytest.raises(error, match=f"^tile{'' if message is None else ' ' + message}"):
        wn.kernel_matrix(FC, x, tile=value, progress=False)
    with pytest.raises(error, match=f"^tile (rows|cols) {message or 'must be an integer'}"):
        wn.kernel_matrix(FC, x, x, tile=(3, value), progress=False)
    with pytest.raises(error, match=f"^memory_limit {message or 'must be an integer'}"):
        wn.kernel_matrix(FC, x, memory_limit=value, progress=False)


def test_get_gives_a_tensor_or_kernels_as_net_kernel_does(tmp_path):
    """A string names one kernel: a tensor; a tuple or list: Kernels, even of one kernel.
    load_kernel gives what the call that created the store gave."""
    x = data(9, (4,), seed=15)
    for get in ("ntk", ("ntk",), ["nngp"], ("nngp", "ntk")):
        direct = FC.kernel(x, None, get=get)
        path = tmp_path / f"{get!r}.zarr"
        for result in (wn.kernel_matrix(FC, x, get=get, tile=4, store=path, progress=False),
                       wn.load_kernel(path)):
            assert type(result) is type(direct)
            if isinstance(get, str):
                torch.testing.assert_close(result, direct, rtol=1e-12, atol=1e-13)
            else:
                for name in ("nngp", "ntk"):
                    assert (result[name] is None) == (direct[name] is None)
                    if direct[name] is not None:
                        torch.testing.assert_close(result[name], direct[name], rtol=1e-12,
                                                   atol=1e-13)
    # A store resumed with the other form keeps the form it was created with.
    path = tmp_path / "'ntk'.zarr"
    assert isinstance(wn.kernel_matrix(FC, x, get=("ntk",), tile=4, store=path,
                                       progress=False), wn.Kernels)
    assert isinstance(wn.load_kernel(path), torch.Tensor)


def test_stores_of_earlier_versions_load_as_before(tmp_path):
    """A store without the recorded form of ``get`` (widenets before it was recorded):
    one kernel loads as a tensor, two as Kernels."""
    x = data(9, (4,), seed=16)
    for get, kind in ((("ntk",), torch.Tensor), (("nngp", "ntk"), wn.Kernels)):
        path = tmp_path / f"{len(get)}.zarr"
        wn.kernel_matrix(FC, x, get=get, tile=4, store=path, progress=False)
        metadata = json.loads((path / "zarr.json").read_text())
        del metadata["attributes"]["widenets"]["returns"]
        (path / "zarr.json").write_text(json.dumps(metadata))
        assert isinstance(wn.load_kernel(path), kind)


def test_bfloat16_inputs_are_computed_in_float32():
    """As net.kernel (its inputs are converted to float32): the store's NumPy dtype comes
    from the validated inputs' torch dtype."""
    x = data(7, (3,), seed=17)
    half = x.to(torch.bfloat16)
    result = wn.kernel_matrix(FC, half, tile=3, progress=False)
    expected = FC.kernel(half.to(torch.float32), None, get="ntk")
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(FC.kernel(half, None, get="ntk"), expected, rtol=0, atol=0)
