"""The ``python`` code blocks of a Markdown file (README, documentation pages), which the
tests run as written."""

from __future__ import annotations

import re
from pathlib import Path

#: A fence opened by exactly ```` ```python ```` at the start of a line, up to the next
#: closing fence: other fences (``sh``, ``text``, ``{code-block}`` directives) are shown,
#: not run.
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return PYTHON_BLOCK.findall(path.read_text(encoding="utf-8"))
