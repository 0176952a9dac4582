"""Pieces that the demo and the lazy-training experiment share."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


def require(modules: Iterable[str], what: str, extra: str = "demo") -> None:
    """``ImportError`` naming the missing ``modules`` and the extra that installs them."""
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"{what} needs {' and '.join(missing)}: pip install 'widenets[{extra}]'"
        )


def progress_bar(iterable: Iterable | None = None, *, enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; redrawn less often when stderr is not a terminal (logs, CI)."""
    interactive = bool(getattr(sys.stderr, "isatty", lambda: False)())
    return tqdm(
        iterable,
        disable=not enabled,
        mininterval=0.2 if interactive else 5.0,
        dynamic_ncols=interactive,
        leave=True,
        **kwargs,
    )


def twin_seed(seed: int, width: int) -> int:
    """A distinct, reproducible seed for the twin of ``width`` under ``seed``."""
    return int(np.random.SeedSequence([seed, width]).generate_state(1)[0])


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` over all entries (Frobenius norms), in float64."""
    a, b = a.detach().to(torch.float64), b.detach().to(torch.float64)
    return float(torch.linalg.norm((a - b).flatten()) / torch.linalg.norm(b.flatten()))
