"""The ``widenets`` command line.

Subcommands (one function each, registered in :data:`COMMANDS`):

* ``widenets demo``: infinite vs finite networks on scikit-learn's digits (see
  :mod:`widenets.demo`); writes ``report.md`` and ``demo.png`` into ``--out``.

To add a subcommand, write ``add_<name>_parser(subparsers)`` that creates its parser and
sets ``handler`` (a function of the parsed arguments returning an exit status) with
``set_defaults``, and append it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from . import __version__


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


def width_list(text: str) -> list[int]:
    """An argparse type: one width or several separated by commas (``64,256,1024``)."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected widths such as 64,256,1024, got {text!r}")
    return [positive_int(part.strip()) for part in parts]


# --------------------------------------------------------------------------- demo
def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``widenets demo``."""
    from .demo import (
        DEFAULT_CNN_N_TEST,
        DEFAULT_CNN_N_TRAIN,
        DEFAULT_N_TRAIN,
        DEFAULT_STEPS,
        DEFAULT_WIDTHS,
    )

    parser = subparsers.add_parser(
        "demo",
        help="infinite vs finite ReLU networks on scikit-learn's digits",
        description=(
            "Compute the NNGP and NTK posteriors of a fully connected ReLU network and of a "
            "convolutional network (CNN-GAP) on scikit-learn's digits, train finite twins "
            "of several widths by full-batch gradient descent, and compare them with the "
            "NTK prediction. Writes "
            "report.md and demo.png into the output folder."
        ),
    )
    parser.add_argument("--out", default="widenets-demo", metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of the data split and the networks (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help="gradient-descent steps (default: %(default)s)")
    parser.add_argument(
        "--widths", type=width_list, nargs="+", default=None, metavar="W",
        help="widths of the finite networks, e.g. '--widths 64 256 1024' or "
             f"'--widths 64,256,1024' (default: {','.join(map(str, DEFAULT_WIDTHS))})",
    )
    parser.add_argument("--n-train", type=positive_int, default=DEFAULT_N_TRAIN,
                        help="training images; the rest are the test set "
                             "(default: %(default)s)")
    parser.add_argument("--cnn-n-train", type=positive_int, default=DEFAULT_CNN_N_TRAIN,
                        help="training images for the convolutional network, the first of "
                             "the split (default: %(default)s)")
    parser.add_argument("--cnn-n-test", type=positive_int, default=DEFAULT_CNN_N_TEST,
                        help="test images for the convolutional network "
                             "(default: %(default)s)")
    parser.add_argument("--float64", action="store_true",
                        help="train the finite networks in float64 (default: float32)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run_demo_command, parser=parser)
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``widenets demo`` with parsed arguments; print the report path and a summary."""
    import torch

    from .demo import DEFAULT_WIDTHS, N_DIGITS, run_demo, summary

    widths = DEFAULT_WIDTHS if args.widths is None else [w for ws in args.widths for w in ws]
    if not 10 <= args.n_train < N_DIGITS:
        args.parser.error(f"--n-train must be between 10 and {N_DIGITS - 1}, got {args.n_train}")
    try:
        results = run_demo(
            out_dir=args.out,
            widths=widths,
            steps=args.steps,
            seed=args.seed,
            progress=not args.no_progress,
            n_train=args.n_train,
            cnn_n_train=args.cnn_n_train,
            cnn_n_test=args.cnn_n_test,
            dtype=torch.float64 if args.float64 else torch.float32,
        )
    except ImportError as error:
        print(f"widenets demo: {error}", file=sys.stderr)
        return 1
    print(f"report: {results['report']}")
    print(f"plot:   {results['plot']}")
    for line in summary(results):
        print(line)
    return 0


#: Functions registering one subcommand each.
COMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_demo_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``widenets`` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="widenets",
        description="widenets: infinitely wide neural networks in PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``widenets`` console script; returns the exit status.

    Bad arguments make argparse print a message and raise ``SystemExit(2)``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
