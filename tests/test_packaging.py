"""The distributions: a wheel and an sdist built from a copy of the source tree.

The wheel must hold every module of ``src/widenets`` (subpackages included) and no tests,
with metadata naming the version and ``torch>=2.3``; the sdist must hold the sources,
README.md, CHANGELOG.md, the licence file if there is one, the whole test suite and the
documentation and examples it runs. The
build must print no deprecation warning. Installing the wheel into a fresh environment is
left out (it would download or unpack torch); the archives are checked instead.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.code_blocks import python_blocks

pytest.importorskip("build", reason="the 'build' package (python -m build) is not installed")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "widenets"

# What a copy of the tree leaves out when git cannot list the files.
IGNORED = (".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", "*.py[cod]",
           ".pytest_cache", ".ruff_cache", ".hypothesis", "demo-output", "*.zarr")


def version() -> str:
    namespace: dict[str, str] = {}
    exec((SRC / "version.py").read_text(), namespace)
    return namespace["__version__"]


def source_files() -> list[Path] | None:
    """The files of a clean clone with the working tree's changes (tracked and untracked,
    not ignored), relative to the root; None without git."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, check=True, timeout=30,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    files = [Path(name) for name in listed.split("\0") if name]
    return [f for f in files if (ROOT / f).is_file()] or None


def copy_tree(dest: Path) -> None:
    files = source_files()
    if files is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*IGNORED))
        return
    for f in files:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)


def setuptools_at_least(major: int) -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= major


def package_files() -> list[str]:
    """Every file of the package, relative to src/ (modules, and data such as py.typed)."""
    return sorted(
        p.relative_to(SRC.parent).as_posix()
        for p in SRC.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Build the sdist, then the wheel from the unpacked sdist (python -m build's default),
    from a copy of the source tree, so the repository gets no build folders."""
    tree = tmp_path_factory.mktemp("tree")
    out = tmp_path_factory.mktemp("dist")
    copy_tree(tree)
    cmd = [sys.executable, "-m", "build", "--outdir", str(out)]
    # Without isolation when this environment has the build backend the project requires
    # (fast, offline); otherwise build installs it into an isolated environment.
    if setuptools_at_least(77):
        cmd.append("--no-isolation")
    cmd.append(str(tree))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    wheels = sorted(out.glob("*.whl"))
    sdists = sorted(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, sorted(p.name for p in out.iterdir())
    return {"log": log, "wheel": wheels[0], "sdist": sdists[0]}


def test_build_prints_no_deprecation_warning(dists: dict[str, object]) -> None:
    log = str(dists["log"])
    lines = [line for line in log.splitlines() if "deprecat" in line.lower()]
    assert not lines, "\n".join(lines)


def test_archive_names_carry_the_version(dists: dict[str, object]) -> None:
    v = version()
    assert Path(dists["wheel"]).name == f"widenets-{v}-py3-none-any.whl"
    assert Path(dists["sdist"]).name == f"widenets-{v}.tar.gz"


def test_wheel_holds_the_whole_package_and_no_tests(dists: dict[str, object]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
    dist_info = f"widenets-{version()}.dist-info/"
    package = sorted(n for n in names if not n.startswith(dist_info))
    assert package == package_files()
    for sub in ("apps", "layers", "predict"):
        assert f"widenets/{sub}/__init__.py" in package
    assert not [n for n in names if n.startswith("tests/") or "/tests/" in n]
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]


def test_wheel_metadata(dists: dict[str, object]) -> None:
    dist_info = f"widenets-{version()}.dist-info/"
    with zipfile.ZipFile(dists["wheel"]) as whl:
        metadata = email.parser.HeaderParser().parsestr(whl.read(dist_info + "METADATA").decode())
        entry_points = whl.read(dist_info + "entry_points.txt").decode()
        licences = [n for n in whl.namelist() if n.startswith(dist_info + "licenses/")]
    assert metadata["Name"] == "widenets"
    assert metadata["Version"] == version()
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist") or []
    assert "torch>=2.3" in requires, requires
    # Optional dependencies stay optional.
    assert not [r for r in requires if r.startswith(("zarr", "dask", "scikit-learn"))
                and "extra ==" not in r]
    assert "widenets = widenets.apps.cli:main" in entry_points
    # A licence file in the repository ships in the wheel.
    for licence in sorted(ROOT.glob("LICEN[CS]E*")):
        assert dist_info + "licenses/" + licence.name in licences


def test_sdist_holds_sources_docs_and_tests(dists: dict[str, object]) -> None:
    prefix = f"widenets-{version()}/"
    with tarfile.open(dists["sdist"]) as sdist:
        names = {m.name[len(prefix):] for m in sdist.getmembers()
                 if m.isfile() and m.name.startswith(prefix)}
    expected = {f"src/{f}" for f in package_files()}
    expected |= {"README.md", "CHANGELOG.md", "pyproject.toml", "PKG-INFO"}
    expected |= {p.name for p in ROOT.glob("LICEN[CS]E*")}
    # The whole test suite with its data, and the documentation and examples it runs.
    expected |= {
        p.relative_to(ROOT).as_posix()
        for folder in ("tests", "docs", "examples")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and not {"__pycache__", "_build"} & set(p.parts)
        and p.suffix not in (".pyc", ".pyo")
    }
    missing = sorted(expected - names)
    assert not missing, missing
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]


def test_readme_quickstart_runs_from_the_wheel_in_a_fresh_environment(
    dists: dict[str, object], tmp_path: Path
) -> None:
    """The README's quickstart, as written, in a new virtual environment that holds only
    the built wheel, run from an empty folder: widenets comes from the wheel, not from
    this checkout. Its dependencies (torch, numpy, scipy, tqdm) are borrowed from this
    environment through a path file rather than downloaded (no network in the tests)."""
    import site
    import sysconfig

    quickstart = tmp_path / "quickstart.py"
    quickstart.write_text(python_blocks(ROOT / "README.md")[0]
                          + "\nimport widenets\nprint('FROM', widenets.__file__)\n")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    str(dists["wheel"])], check=True, timeout=300)
    fresh_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    borrowed = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(fresh_site) / "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)))
    run = subprocess.run([str(python), str(quickstart)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    origin = run.stdout.split("FROM", 1)[1].strip()
    assert Path(origin).resolve().is_relative_to(venv.resolve()), origin
    assert "test predictions" in run.stdout
