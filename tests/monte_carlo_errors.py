"""The error measure of the Monte Carlo convergence tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def rms_relative_error(estimate: Callable[[], torch.Tensor], exact: torch.Tensor,
                       repeats: int) -> float:
    """The root-mean-square over ``repeats`` calls of ``estimate()`` (each a Monte Carlo
    estimate) of ``||estimate - exact|| / ||exact||`` (Frobenius)."""
    squared = 0.0
    for _ in range(repeats):
        squared += float((estimate() - exact).norm() / exact.norm()) ** 2
    return math.sqrt(squared / repeats)
