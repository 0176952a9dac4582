"""The argparse types and the architectures that the ``widenets`` subcommands share."""

from __future__ import annotations

import argparse
import math

#: Architectures of ``widenets kernel`` and ``widenets predict``.
KERNEL_ARCHITECTURES = ("fc", "cnn-gap", "cnn-flatten")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def kernel_names(text: str) -> tuple[str, ...]:
    """An argparse type: ``nngp``, ``ntk`` or both separated by a comma."""
    names = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    if not names or any(n not in ("nngp", "ntk") for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected nngp, ntk or nngp,ntk, got {text!r}")
    return names


def kernel_architecture(arch: str, depth: int, W_std: float, b_std: float, activation: str):
    """The architecture of ``widenets kernel``: ``depth`` x [Linear or 3x3 Conv2d,
    activation], then (CNNs) GlobalAvgPool or Flatten, then a linear read-out
    (:func:`widenets.architectures.mlp` and :func:`~widenets.architectures.cnn`)."""
    from ..architectures import cnn, mlp

    if arch == "fc":
        return mlp(depth, activation, 1, W_std, b_std)
    return cnn(depth, activation, 1, arch.removeprefix("cnn-"), W_std, b_std)


def memory_size(text: str) -> int:
    """An argparse type: bytes of memory, as MiB for a plain number (``600``) or with a
    unit (``600MiB``, ``20GiB``, ``1.5GB``)."""
    from ..predict.blocked import memory_bytes

    try:
        mebibytes = float(text)
    except ValueError:
        try:
            return memory_bytes(text.strip(), "--memory-limit")
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    if not math.isfinite(mebibytes) or mebibytes <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return max(1, int(mebibytes * 2**20))
