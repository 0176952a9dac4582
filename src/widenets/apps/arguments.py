"""The argparse types and the architectures that the ``widenets`` subcommands share."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

#: Architectures of ``widenets kernel`` and ``widenets predict``.
KERNEL_ARCHITECTURES = ("fc", "cnn-gap", "cnn-flatten")

T = TypeVar("T")


def _bounded(parse: Callable[[str], T], accept: Callable[[T], bool],
             expected: str) -> Callable[[str], T]:
    """An argparse type: ``parse(text)`` where ``accept`` takes it, otherwise the error
    "expected {expected}, got {text!r}"."""
    def convert(text: str) -> T:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


#: An argparse type: an integer >= 1.
positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
#: An argparse type: an integer >= 0.
nonnegative_int = _bounded(int, lambda v: v >= 0, "a non-negative integer")
#: An argparse type: a finite number >= 0.
nonnegative_float = _bounded(float, lambda v: math.isfinite(v) and v >= 0,
                             "a non-negative number")
#: An argparse type: a finite number > 0.
positive_float = _bounded(float, lambda v: math.isfinite(v) and v > 0, "a positive number")


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


def add_architecture_arguments(parser: argparse.ArgumentParser, depth: int, W_std: float,
                               W_std_shown: str = "%(default)s") -> None:
    """The options of :func:`kernel_architecture` (``--arch``, ``--depth``, ``--W-std``,
    ``--b-std``, ``--activation``), with this subcommand's defaults."""
    parser.add_argument("--arch", choices=KERNEL_ARCHITECTURES, default="fc",
                        help="fully connected, or 3x3 convolutions ('same' padding) ending "
                             "in global average pooling or flattening (default: %(default)s)")
    parser.add_argument("--depth", type=positive_int, default=depth,
                        help="hidden layers, each followed by the activation, before the "
                             "linear read-out (default: %(default)s)")
    parser.add_argument("--W-std", dest="W_std", type=positive_float, default=W_std,
                        help=f"weight scale of every layer (default: {W_std_shown})")
    parser.add_argument("--b-std", dest="b_std", type=nonnegative_float, default=0.05,
                        help="bias scale of every layer (default: %(default)s)")
    parser.add_argument("--activation", choices=("relu", "erf"), default="relu",
                        help="activation after each hidden layer (default: %(default)s)")


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
