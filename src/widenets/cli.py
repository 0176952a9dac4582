"""The ``widenets`` command line.

Subcommands (one function each, registered in :data:`COMMANDS`):

* ``widenets demo``: infinite vs finite networks on scikit-learn's digits (see
  :mod:`widenets.demo`); writes ``report.md`` and ``demo.png`` into ``--out``.
* ``widenets lazy``: the lazy regime measured on the digits: finite networks of several
  widths trained beside their linearizations (see
  :func:`widenets.experiments.lazy_training`); writes ``losses.png``, ``scaling.png``
  and ``report.md`` into ``--out`` and prints the fitted slopes against width.

To add a subcommand, write ``add_<name>_parser(subparsers)`` that creates its parser and
sets ``handler`` (a function of the parsed arguments returning an exit status) with
``set_defaults``, and append it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import math
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


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def width_list(text: str) -> list[int]:
    """An argparse type: one width or several separated by commas (``64,256,1024``)."""
    parts = [part for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected widths such as 64,256,1024, got {text!r}")
    return [positive_int(part.strip()) for part in parts]


def add_training_arguments(
    parser: argparse.ArgumentParser, out: str, steps: int, widths: Sequence[int], what: str
) -> None:
    """``--out``, ``--seed``, ``--steps`` and ``--widths`` of commands that train finite
    networks of several widths (``what``: how ``--widths`` is described)."""
    parser.add_argument("--out", default=out, metavar="DIR",
                        help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed of the data split and the networks (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=steps,
                        help="gradient-descent steps (default: %(default)s)")
    parser.add_argument(
        "--widths", type=width_list, nargs="+", default=None, metavar="W",
        help=f"{what}, e.g. '--widths 64 256 1024' or '--widths 64,256,1024' "
             f"(default: {','.join(map(str, widths))})",
    )


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
    add_training_arguments(parser, "widenets-demo", DEFAULT_STEPS, DEFAULT_WIDTHS,
                           "widths of the finite networks")
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


# --------------------------------------------------------------------------- lazy
def add_lazy_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``widenets lazy``."""
    from .experiments import (
        DEFAULT_HIDDEN_LAYERS,
        DEFAULT_N_TRAIN,
        DEFAULT_NTK_POINTS,
        DEFAULT_STEPS,
        DEFAULT_WIDTHS,
    )

    parser = subparsers.add_parser(
        "lazy",
        help="the lazy regime measured: networks of growing width vs their linearization",
        description=(
            "Train fully connected ReLU networks of several widths on scikit-learn's digits "
            "by full-batch gradient descent, each beside its linearization, and measure "
            "how the relative change of the weights and of the empirical NTK, and the "
            "distance to the linearization, fall with the width. Writes losses.png, "
            "scaling.png and report.md into the output folder and prints the fitted "
            "log-log slopes."
        ),
    )
    add_training_arguments(parser, "widenets-lazy", DEFAULT_STEPS, DEFAULT_WIDTHS,
                           "hidden widths")
    parser.add_argument("--n-train", type=positive_int, default=DEFAULT_N_TRAIN,
                        help="training images (default: %(default)s)")
    parser.add_argument("--learning-rate", type=positive_float, default=None, metavar="LR",
                        help="gradient-descent step size (default: 1 / the largest "
                             "eigenvalue of the infinite network's training NTK)")
    parser.add_argument("--hidden-layers", type=positive_int, default=DEFAULT_HIDDEN_LAYERS,
                        help="hidden ReLU layers; with 2 or more the hidden-to-hidden "
                             "weights make the NTK and the linearization far costlier "
                             "(e.g. 2 layers with --ntk-points 20: a few minutes) "
                             "(default: %(default)s)")
    parser.add_argument("--ntk-points", type=positive_int, default=DEFAULT_NTK_POINTS,
                        help="training images on which the empirical NTK is evaluated, "
                             "the first of the training set; its cost grows as the square "
                             "(default: %(default)s)")
    parser.add_argument("--record-every", type=positive_int, default=None, metavar="K",
                        help="steps between recorded weight and NTK changes "
                             "(default: steps / 10)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run_lazy_command, parser=parser)
    return parser


def run_lazy_command(args: argparse.Namespace) -> int:
    """Run ``widenets lazy`` with parsed arguments; print the output paths and slopes."""
    from .demo import N_DIGITS
    from .experiments import DEFAULT_WIDTHS, run_lazy, summary

    widths = DEFAULT_WIDTHS if args.widths is None else [w for ws in args.widths for w in ws]
    if not 10 <= args.n_train < N_DIGITS:
        args.parser.error(f"--n-train must be between 10 and {N_DIGITS - 1}, got {args.n_train}")
    if len(set(widths)) != len(widths):
        args.parser.error(f"--widths must be distinct, got {','.join(map(str, widths))}")
    try:
        result = run_lazy(
            out_dir=args.out,
            widths=widths,
            steps=args.steps,
            n_train=args.n_train,
            seed=args.seed,
            learning_rate=args.learning_rate,
            hidden_layers=args.hidden_layers,
            ntk_points=args.ntk_points,
            record_every=args.record_every,
            progress=not args.no_progress,
        )
    except (ImportError, RuntimeError) as error:
        print(f"widenets lazy: {error}", file=sys.stderr)
        return 1
    print(f"report:  {result.report}")
    for name, path in result.figures.items():
        print(f"{name + ':':<8} {path}")
    for line in summary(result):
        print(line)
    return 0


#: Functions registering one subcommand each.
COMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_demo_parser,
    add_lazy_parser,
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
