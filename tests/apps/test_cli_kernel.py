"""``widenets kernel``: the matrix in the store equals ``net.kernel``; the same command
resumes; ``.npy`` inputs; a mismatched store, a store another process is writing and
inputs that are not one ``.npy`` array of the right shape are refused with exit status 2
and a one-line message; Ctrl-C keeps the finished tiles (exit status 130) and the next
run computes only the rest; a damaged tile is repaired by the same command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("zarr")
pytest.importorskip("sklearn")

import widenets as wn  # noqa: E402
from tests.test_tiles import FC, patient_local_cluster  # noqa: E402
from widenets import tiles as tiles_module  # noqa: E402
from widenets.apps import cli  # noqa: E402

# 40 digits in tiles of 16: 3 x 3 tiles, 6 on and above the diagonal.
SMALL = ["--n", "40", "--tile", "16", "--no-progress"]


def run(store, *extra: str) -> int:
    return cli.main(["kernel", "--data", "digits", "--store", str(store), *SMALL, *extra])


def counting(monkeypatch, fail_on: int | None = None) -> list:
    """Count the tiles computed; raise KeyboardInterrupt on call ``fail_on``."""
    calls = []
    compute = tiles_module.compute_tile

    def counted(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == fail_on:
            raise KeyboardInterrupt
        return compute(*args, **kwargs)

    monkeypatch.setattr(tiles_module, "compute_tile", counted)
    return calls


def digits(n: int) -> np.ndarray:
    return cli.digits_inputs()[:n]


def test_digits_are_scaled_like_the_demo():
    x = cli.digits_inputs()
    assert x.shape == (1797, 64) and x.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 8.0)


def test_kernel_equals_net_kernel_and_resumes(tmp_path, capsys, monkeypatch):
    store = tmp_path / "k.zarr"
    calls = counting(monkeypatch)
    assert run(store, "--get", "nngp,ntk") == 0
    out = capsys.readouterr().out
    assert "tiles already done: 0 of 6" in out and "computed 6 of 6 tiles" in out
    assert str(store) in out and "40 x 40" in out
    assert len(calls) == 6
    net = cli.kernel_architecture("fc", 2, 1.5, 0.05, "relu")
    expected = net.kernel(torch.from_numpy(digits(40)), None, get=("nngp", "ntk"))
    loaded = wn.load_kernel(store)
    for name in ("nngp", "ntk"):
        torch.testing.assert_close(loaded[name], expected[name], rtol=1e-12, atol=1e-13)
    # The same command again: everything is in the store, nothing is computed.
    assert run(store, "--get", "nngp,ntk") == 0
    assert "tiles already done: 6 of 6" in capsys.readouterr().out
    assert len(calls) == 6
    # --tile auto on an existing store reuses the store's tiles.
    assert cli.main(["kernel", "--data", "digits", "--store", str(store), "--n", "40",
                     "--get", "nngp,ntk", "--no-progress"]) == 0
    assert "tiles already done: 6 of 6" in capsys.readouterr().out
    assert len(calls) == 6


@pytest.mark.parametrize("arch", ["cnn-gap", "cnn-flatten"])
def test_convolutional_digits(tmp_path, arch):
    store = tmp_path / "k.zarr"
    status = cli.main(["kernel", "--data", "digits", "--arch", arch, "--depth", "1",
                       "--activation", "erf", "--get", "nngp", "--store", str(store),
                       "--n", "6", "--tile", "4", "--no-progress"])
    assert status == 0
    net = cli.kernel_architecture(arch, 1, 1.5, 0.05, "erf")
    x = torch.from_numpy(digits(6).reshape(-1, 1, 8, 8))
    torch.testing.assert_close(wn.load_kernel(store), net.kernel(x, None, get="nngp"),
                               rtol=1e-12, atol=1e-13)


def test_npy_inputs_and_second_set(tmp_path):
    rng = np.random.default_rng(0)
    x1, x2 = rng.standard_normal((13, 5)), rng.standard_normal((9, 5)).astype(np.float32)
    np.save(tmp_path / "x1.npy", x1)
    np.save(tmp_path / "x2.npy", x2)
    store = tmp_path / "k.zarr"
    status = cli.main(["kernel", "--data", str(tmp_path / "x1.npy"), "--data2",
                       str(tmp_path / "x2.npy"), "--depth", "3", "--W-std", "1.2",
                       "--b-std", "0.3", "--store", str(store), "--tile", "4",
                       "--no-progress"])
    assert status == 0
    net = cli.kernel_architecture("fc", 3, 1.2, 0.3, "relu")
    expected = net.kernel(x1, x2.astype(np.float64), get="ntk")
    result = wn.load_kernel(store)
    assert result.shape == (13, 9) and result.dtype == torch.float64
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-13)


def test_mismatched_store_is_refused(tmp_path, capsys):
    store = tmp_path / "k.zarr"
    assert run(store) == 0
    capsys.readouterr()
    for extra in (["--get", "nngp"], ["--depth", "3"], ["--activation", "erf"]):
        assert run(store, *extra) == 2
        err = capsys.readouterr().err
        assert "widenets kernel: error: store" in err and "holds a different computation" in err
    assert cli.main(["kernel", "--data", "digits", "--store", str(store), "--n", "41",
                     "--tile", "16", "--no-progress"]) == 2
    assert "inputs_sha256" in capsys.readouterr().err
    # A folder that is not a kernel store is not written into.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert run(other) == 2
    assert "not a kernel store" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "x.txt"], "must be 'digits' or a .npy file"),
        (["--data", "missing.npy"], "no such file"),
        (["--data", "digits", "--data2", "five.npy"], "--data2 examples have shape"),
        (["--data", "five.npy", "--arch", "cnn-gap"], "needs inputs (N, C, H, W)"),
    ],
)
def test_bad_inputs_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "five.npy", np.ones((3, 5)))
    assert cli.main(["kernel", *argv, "--store", "k.zarr", "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--data", "digits"],  # no --store
        ["--data", "digits", "--store", "k.zarr", "--tile", "0"],
        ["--data", "digits", "--store", "k.zarr", "--get", "ntk,ntk"],
        ["--data", "digits", "--store", "k.zarr", "--arch", "rnn"],
        ["--data", "digits", "--store", "k.zarr", "--memory-limit", "-1"],
    ],
)
def test_bad_arguments_exit_2(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["kernel", *argv])
    assert info.value.code == 2


def test_ctrl_c_keeps_finished_tiles_and_resumes(tmp_path, capsys, monkeypatch):
    store = tmp_path / "k.zarr"
    calls = counting(monkeypatch, fail_on=3)
    assert run(store) == 130
    err = capsys.readouterr().err
    assert f"interrupted: 2 of 6 tiles are finished and kept in {store}" in err
    assert "run the same command again to resume" in err
    assert len(list((store / tiles_module.DONE).iterdir())) == 2
    with pytest.raises(ValueError, match="unfinished"):
        wn.load_kernel(store)

    calls = counting(monkeypatch)
    assert run(store) == 0
    out = capsys.readouterr().out
    assert "tiles already done: 2 of 6" in out and "computed 4 of 6 tiles" in out
    assert len(calls) == 4
    net = cli.kernel_architecture("fc", 2, 1.5, 0.05, "relu")
    torch.testing.assert_close(wn.load_kernel(store),
                               net.kernel(torch.from_numpy(digits(40)), None, get="ntk"),
                               rtol=1e-12, atol=1e-13)


def test_scheduler_runs_tiles_on_a_dask_cluster(tmp_path, capsys):
    pytest.importorskip("distributed")
    store = tmp_path / "k.zarr"
    with patient_local_cluster(1, processes=False) as (cluster, _):
        assert run(store, "--scheduler", cluster.scheduler_address) == 0
    assert "dask: 1 workers" in capsys.readouterr().out
    net = cli.kernel_architecture("fc", 2, 1.5, 0.05, "relu")
    torch.testing.assert_close(wn.load_kernel(store),
                               net.kernel(torch.from_numpy(digits(40)), None, get="ntk"),
                               rtol=1e-12, atol=1e-13)


def test_unreachable_scheduler_is_a_clean_error(tmp_path, capsys):
    pytest.importorskip("distributed")
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        assert run(tmp_path / "k.zarr", "--scheduler", "tcp://127.0.0.1:9") == 1
    assert "cannot connect to the Dask scheduler" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("npz", "'x.npy' is a .npz archive, not a .npy array; save one array with "
                "numpy.save"),
        ("0-D", "--arch fc needs inputs (N, features), got shape ()"),
        ("1-D", "--arch fc needs inputs (N, features), got shape (5,)"),
    ],
)
def test_inputs_that_are_not_one_array_of_the_right_shape(content, message, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("x.npy", "wb") as file:  # np.save would add .npy to a .npz name anyway
        if content == "npz":
            np.savez(file, x=np.ones((3, 5)))
        else:
            np.save(file, np.ones(()) if content == "0-D" else np.ones(5))
    assert cli.main(["kernel", "--data", "x.npy", "--store", "k.zarr", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"widenets kernel: error: --data: {message}\n"


def test_a_store_being_written_is_refused(tmp_path, capsys):
    store = tmp_path / "k.zarr"
    job = tiles_module.prepare_kernel(FC, torch.ones(3, 4, dtype=torch.float64), store=store)
    try:
        assert run(store) == 2
    finally:
        job.close()
    err = capsys.readouterr().err
    assert err.startswith(f"widenets kernel: error: store {store} is being written by "
                          "another process (pid ")
    assert err.count("\n") == 1


def test_a_damaged_tile_is_repaired_by_the_same_command(tmp_path, capsys, monkeypatch):
    store = tmp_path / "k.zarr"
    assert run(store) == 0
    (store / "ntk" / "c" / "1" / "2").unlink()  # rows 16:32, columns 32:40
    with pytest.raises(ValueError, match="rows 16:32, columns 32:40 is damaged"):
        wn.load_kernel(store)
    capsys.readouterr()
    calls = counting(monkeypatch)
    assert run(store) == 0
    out = capsys.readouterr().out
    assert "tiles already done: 6 of 6" in out and "computed 1 of 6 tiles" in out
    assert "repaired 1 damaged tile " in out
    assert calls == [tiles_module.Tile(16, 32, 32, 40)]
    net = cli.kernel_architecture("fc", 2, 1.5, 0.05, "relu")
    torch.testing.assert_close(wn.load_kernel(store),
                               net.kernel(torch.from_numpy(digits(40)), None, get="ntk"),
                               rtol=1e-12, atol=1e-13)


def test_the_command_line_starts_without_the_demo_extras():
    """``widenets --version`` and ``widenets kernel --help`` need neither matplotlib nor
    scikit-learn (a plain install has neither); building the parser imported the demo."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None
        sys.modules["sklearn"] = None
        from widenets.apps import cli
        for argv in (["--version"], ["kernel", "--help"]):
            try:
                cli.main(argv)
            except SystemExit as stop:
                assert stop.code == 0, (argv, stop.code)
        print("started")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "started" in out.stdout and "widenets 0.1.0" in out.stdout
