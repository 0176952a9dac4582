"""Every Python block of the README runs as written (each in a fresh namespace, in an
empty folder, as ``__main__``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.code_blocks import python_blocks

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = python_blocks(README)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(BLOCKS[index], f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "__main__"})  # the README's own code, as a user runs it
