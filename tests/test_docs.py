"""The documentation: every ``python`` code block of every page under ``docs/`` runs as
written, and the site builds with Sphinx without a single warning (``make docs``).

A page's blocks run in order in one namespace (a page is read top to bottom, so a block
may use what an earlier block of the same page defined), in an empty folder, as
``__main__``. Blocks fenced as anything but ``python`` (``sh``, ``text``, or a
``{code-block}`` directive, used for other libraries' code) are shown, not run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.code_blocks import python_blocks

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_docs_have_code_to_run():
    assert len(PAGES_WITH_CODE) >= 8


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(DOCS)))
def test_docs_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for index, block in enumerate(python_blocks(page)):
        name = f"{page.relative_to(DOCS)} python block {index + 1}"
        exec(compile(block, name, "exec"), namespace)  # the page's own code, as a user runs it


def test_docs_build_without_warnings(tmp_path):
    """``sphinx-build -W -n``: a warning (a broken reference, a malformed docstring) fails."""
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-n", "-q",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    assert (out / "index.html").is_file()
    assert (out / "api" / "layers.html").is_file()
    shutil.rmtree(out)
