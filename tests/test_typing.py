"""The front door: widenets type-checks under mypy (``py.typed`` ships), a typed user
script passes, the overloads of ``Layer.kernel`` are precise (wrong uses are mypy errors),
and ``progress=`` of ``net.kernel`` and ``empirical_ntk`` draws a bar when asked."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

import widenets as wn

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("typed_user_script.py")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's mypy runs: the package is analysed once (~15 s)."""
    return tmp_path_factory.mktemp("mypy_cache")


def run_mypy(cache: Path, *paths: str | Path) -> tuple[int, str]:
    """mypy with the project's configuration on ``paths``: (exit status, report)."""
    stdout, stderr, status = mypy_api.run([
        "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(cache),
        "--no-error-summary", "--show-error-codes", *map(str, paths)])
    return status, stdout + stderr


def test_py_typed_ships() -> None:
    assert (ROOT / "src" / "widenets" / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'widenets = \[[^\]]*"py\.typed"', pyproject)


def test_package_type_checks(mypy_cache: Path) -> None:
    status, report = run_mypy(mypy_cache, ROOT / "src" / "widenets")
    assert status == 0, report


def test_typed_user_script_type_checks_and_runs(mypy_cache: Path) -> None:
    status, report = run_mypy(mypy_cache, SCRIPT)
    assert status == 0, report
    namespace: dict[str, object] = {"__name__": "typed_user_script"}
    exec(compile(SCRIPT.read_text(), str(SCRIPT), "exec"), namespace)
    main = namespace["main"]
    assert callable(main)
    main()


#: Each line marked ``# error`` must be a mypy error: the overloads are precise.
WRONG_USES = textwrap.dedent('''
    import torch
    import widenets as wn

    net = wn.Sequential(wn.Linear(8), wn.ReLU(), wn.Linear(1))
    x = torch.randn(4, 3)
    ok_tensor: torch.Tensor = net.kernel(x, get="nngp")
    ok_kernels: wn.Kernels = net.kernel(x, x, ("nngp", "ntk"))
    both: torch.Tensor = net.kernel(x, get=("nngp", "ntk"))  # error
    listed: torch.Tensor = net.kernel(x, None, ["ntk"])  # error
    single: wn.Kernels = net.kernel(x, get="ntk")  # error
    default: wn.Kernels = net.kernel(x)  # error
    net.kernel(x, get="ntk").nngp  # error
    net.kernel(x, progress="yes")  # error
    wn.empirical_ntk(net.build(3), x, progress=1.5)  # error
''')


def test_wrong_uses_are_mypy_errors(mypy_cache: Path, tmp_path: Path) -> None:
    snippet = tmp_path / "wrong_uses.py"
    snippet.write_text(WRONG_USES)
    _, report = run_mypy(mypy_cache, snippet)
    expected = {n for n, line in enumerate(WRONG_USES.splitlines(), 1) if "# error" in line}
    found = {int(m) for m in re.findall(r"wrong_uses\.py:(\d+): error", report)}
    assert found == expected, report


# ----------------------------------------------------------------- progress bars
def _net() -> wn.Layer:
    return wn.Sequential(wn.Linear(16), wn.ReLU(), wn.Linear(1))


def _x() -> torch.Tensor:
    return torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_kernel_progress_true_draws_a_bar(capsys: pytest.CaptureFixture[str]) -> None:
    quiet = _net().kernel(_x(), get="ntk", progress=False)
    assert capsys.readouterr().err == ""
    shown = _net().kernel(_x(), get="ntk", progress=True)
    err = capsys.readouterr().err
    assert "kernel" in err and "1/1" in err
    torch.testing.assert_close(shown, quiet, rtol=0, atol=0)


def test_kernel_progress_auto_is_quiet_for_one_tile(capsys: pytest.CaptureFixture[str]) -> None:
    _net().kernel(_x(), get=("nngp", "ntk"))
    assert capsys.readouterr().err == ""


def test_kernel_progress_rejects_non_bool() -> None:
    with pytest.raises(TypeError, match="progress"):
        _net().kernel(_x(), progress="yes")  # type: ignore[call-overload]


@pytest.mark.parametrize("implementation", ["jacobian", "ntk_vector", "structured"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_empirical_ntk_progress(
    capsys: pytest.CaptureFixture[str], implementation: str, symmetric: bool
) -> None:
    model = _net().build(3, torch.Generator().manual_seed(0))
    x = _x()
    x2 = None if symmetric else x[:4]
    quiet = wn.empirical_ntk(model, x, x2, implementation=implementation, batch_size=2,
                             progress=False)
    assert capsys.readouterr().err == ""
    shown = wn.empirical_ntk(model, x, x2, implementation=implementation, batch_size=2,
                             progress=True)
    err = capsys.readouterr().err
    # 3 blocks of rows: 6 pairs on and above the diagonal, or 3 x 2 against x2's 2 blocks
    assert "empirical NTK" in err and "6/6" in err
    torch.testing.assert_close(shown, quiet, rtol=0, atol=0)
