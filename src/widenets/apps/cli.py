"""The ``widenets`` command line.

Subcommands (one function each, registered in :data:`COMMANDS`):

* ``widenets demo``: infinite vs finite networks on scikit-learn's digits (see
  :mod:`widenets.demo`); writes ``report.md`` and ``demo.png`` into ``--out``.
* ``widenets lazy``: the lazy regime measured on the digits: finite networks of several
  widths trained beside their linearizations (see
  :func:`widenets.experiments.lazy_training`); writes ``losses.png``, ``scaling.png``
  and ``report.md`` into ``--out`` and prints the fitted slopes against width.
* ``widenets kernel``: a large NNGP / NTK matrix computed in tiles into a resumable Zarr
  store (see :func:`widenets.kernel_matrix`), optionally on a Dask cluster
  (``--scheduler``); Ctrl-C keeps the finished tiles and the same command resumes.
* ``widenets predict``: test predictions on a data set (Fashion-MNIST, MNIST-style IDX
  files, .npy files, digits), the training kernel factorised on disk with ``--store``
  (:mod:`widenets.apps.predict_command`).

To add a subcommand, write ``add_<name>_parser(subparsers)`` that creates its parser and
sets ``handler`` (a function of the parsed arguments returning an exit status) with
``set_defaults``, and append it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..version import __version__
from .arguments import (
    add_architecture_arguments,
    kernel_architecture,
    kernel_names,
    memory_size,
    nonnegative_int,
    positive_float,
    positive_int,
)
from .predict_command import add_predict_parser


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


def training_widths(args: argparse.Namespace, default: Sequence[int]) -> list[int]:
    """The widths of ``--widths`` (or ``default``), after checking ``--n-train`` against
    the digits data set (a usage error otherwise)."""
    from ..datasets import N_DIGITS

    if not 10 <= args.n_train < N_DIGITS:
        args.parser.error(f"--n-train must be between 10 and {N_DIGITS - 1}, got {args.n_train}")
    return list(default) if args.widths is None else [w for ws in args.widths for w in ws]


# --------------------------------------------------------------------------- demo
def add_demo_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``widenets demo``."""
    from .demo import (
        DEFAULT_CNN_N_TEST,
        DEFAULT_CNN_N_TRAIN,
        DEFAULT_N_TRAIN,
        DEFAULT_SEEDS,
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
    parser.add_argument("--seeds", type=positive_int, default=DEFAULT_SEEDS,
                        help="independently initialised networks per width, for the error "
                             "bars (default: %(default)s)")
    parser.add_argument("--float64", action="store_true",
                        help="train the finite networks in float64 (default: float32)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run_demo_command, parser=parser)
    return parser


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``widenets demo`` with parsed arguments; print the report path and a summary."""
    import torch

    from .demo import DEFAULT_WIDTHS, run_demo, summary

    widths = training_widths(args, DEFAULT_WIDTHS)
    try:
        results = run_demo(
            out_dir=args.out,
            widths=widths,
            steps=args.steps,
            seed=args.seed,
            seeds=args.seeds,
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
    from .lazy import (
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
    from .lazy import DEFAULT_WIDTHS, run_lazy, summary

    widths = training_widths(args, DEFAULT_WIDTHS)
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


# --------------------------------------------------------------------------- kernel
def tile_side(text: str) -> int | str:
    """An argparse type: ``auto`` or a positive integer."""
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def add_kernel_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``widenets kernel``."""
    parser = subparsers.add_parser(
        "kernel",
        help="a large NNGP / NTK matrix in tiles, kept in a resumable Zarr store",
        description=(
            "Compute the NNGP and/or NTK matrix of an infinitely wide network on the digits "
            "or on inputs from a .npy file, in tiles (see widenets.kernel_matrix), and keep "
            "every finished tile in a Zarr store. Interrupted (Ctrl-C, or even killed), the "
            "same command again resumes; read the result with widenets.load_kernel(STORE)."
        ),
    )
    parser.add_argument("--data", required=True, metavar="digits|PATH.npy",
                        help="'digits' (scikit-learn's 1797 8x8 images, scaled as in the "
                             "demo: (N, 64) for fc, (N, 1, 8, 8) for the CNNs) or a .npy "
                             "file of inputs (N, features) for fc, (N, C, H, W) for the CNNs")
    parser.add_argument("--data2", default=None, metavar="digits|PATH.npy",
                        help="second inputs, for K(data, data2) (default: data itself, "
                             "computing only the tiles on and above the diagonal)")
    add_architecture_arguments(parser, depth=2, W_std=1.5)
    parser.add_argument("--get", type=kernel_names, default=("ntk",), metavar="nngp|ntk|nngp,ntk",
                        help="which kernels (default: ntk)")
    parser.add_argument("--store", required=True, metavar="OUT.zarr",
                        help="Zarr folder where finished tiles are kept; the same command "
                             "again resumes")
    parser.add_argument("--tile", type=tile_side, default="auto", metavar="N|auto",
                        help="tile side in examples; 'auto' chooses it from the memory "
                             "limit, or reuses the store's when resuming (default: auto)")
    parser.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE",
                        help="memory for the result plus one tile's working set, for "
                             "--tile auto: MiB, or with a unit such as 600MiB or 2GiB "
                             "(default: half the available memory)")
    parser.add_argument("--n", type=positive_int, default=None, metavar="N",
                        help="use only the first N examples of --data and of --data2")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="address of a Dask scheduler (e.g. tcp://host:8786): tiles "
                             "are computed on its workers; this process writes the store")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=run_kernel_command, parser=parser)
    return parser


def digits_inputs() -> np.ndarray:
    """All 1797 digits in scikit-learn's order, preprocessed as everywhere in widenets
    (:func:`widenets.datasets.load_digits`): ``(1797, 64)``."""
    from ..datasets import load_digits

    try:
        return load_digits().x_train
    except ImportError:
        raise ImportError("--data digits needs scikit-learn: pip install 'widenets[demo]'"
                          ) from None


def kernel_inputs(source: str, arch: str, n: int | None, option: str) -> np.ndarray:
    """The inputs named by ``--data`` / ``--data2``, float64, first ``n`` examples.
    Raises ``ValueError`` with a message for the user."""
    if source == "digits":
        x = digits_inputs()
        if arch != "fc":
            x = x.reshape(-1, 1, 8, 8)
    else:
        path = Path(source)
        if path.suffix != ".npy":
            raise ValueError(f"{option} must be 'digits' or a .npy file, got {source!r}")
        if not path.is_file():
            raise ValueError(f"{option}: no such file {source!r}")
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"{option}: cannot read {source!r} as a .npy array: {error}"
                             ) from None
        if not isinstance(x, np.ndarray):  # np.load opens a .npz archive whatever its name
            x.close()
            raise ValueError(f"{option}: {source!r} is a .npz archive, not a .npy array; "
                             "save one array with numpy.save")
        if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
            raise ValueError(f"{option}: {source!r} holds {x.dtype}, not real numbers")
    wanted = 2 if arch == "fc" else 4
    if x.ndim != wanted:
        shape = "(N, features)" if arch == "fc" else "(N, C, H, W)"
        raise ValueError(f"{option}: --arch {arch} needs inputs {shape}, got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{option}: no examples in {source!r}")
    # Converted only now: np.ascontiguousarray makes a 0-D array 1-D, hiding its shape.
    x = np.ascontiguousarray(x, dtype=np.float64)
    return x if n is None else x[:n]


def run_kernel_command(args: argparse.Namespace) -> int:
    """Run ``widenets kernel``: compute the kernel matrix into the store, resuming."""
    import time

    import torch

    from .. import tiles

    def usage_error(message: str) -> int:
        print(f"widenets kernel: error: {message}", file=sys.stderr)
        return 2

    try:
        x1 = kernel_inputs(args.data, args.arch, args.n, "--data")
        x2 = (None if args.data2 is None
              else kernel_inputs(args.data2, args.arch, args.n, "--data2"))
    except ImportError as error:
        print(f"widenets kernel: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        return usage_error(str(error))
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        return usage_error(f"--data2 examples have shape {x2.shape[1:]}, --data examples "
                           f"{x1.shape[1:]}")
    try:
        import zarr  # noqa: F401
    except ImportError:
        print("widenets kernel: the store needs zarr: pip install 'widenets[store]'",
              file=sys.stderr)
        return 1
    net = kernel_architecture(args.arch, args.depth, args.W_std, args.b_std, args.activation)
    memory_limit = args.memory_limit
    store = Path(args.store)
    # One kernel by name gives a store that load_kernel reads as a tensor, as net.kernel.
    get = args.get[0] if len(args.get) == 1 else args.get
    try:
        # Opens (or creates) and locks the store: a store of another computation, a folder
        # that is not a store, a store being written by another process and an unfinished
        # read-only store are refused before anything is computed.
        job = tiles.prepare_kernel(net, torch.from_numpy(x1),
                                   None if x2 is None else torch.from_numpy(x2),
                                   get=get, tile=args.tile, store=store,
                                   memory_limit=memory_limit)
    except ValueError as error:
        return usage_error(str(error))
    except OSError as error:  # e.g. a folder of the store path that cannot be read
        print(f"widenets kernel: {error}", file=sys.stderr)
        return 1
    plan = job.plan
    done = len(job.finished())
    what = " and ".join(name.upper() for name in job.names)
    n1, n2 = job.shape
    print(f"{what} of {args.arch} (depth {args.depth}, {args.activation}) on "
          f"{n1} x {n2} examples of shape {tuple(x1.shape[1:])}: {len(plan)} "
          f"tile{'s' if len(plan) != 1 else ''} of {job.rows} x {job.cols}")
    print(f"store: {store}")
    print(f"tiles already done: {done} of {len(plan)}")
    client = None
    start = time.perf_counter()
    try:
        if args.scheduler is not None:
            try:
                from distributed import Client
            except ImportError:
                print("widenets kernel: --scheduler needs dask.distributed: "
                      "pip install 'widenets[dask]'", file=sys.stderr)
                return 1
            try:
                client = Client(args.scheduler)
            except (OSError, ValueError) as error:
                print(f"widenets kernel: cannot connect to the Dask scheduler at "
                      f"{args.scheduler}: {error}", file=sys.stderr)
                return 1
            print(f"dask: {len(client.scheduler_info().get('workers', {}))} workers at "
                  f"{args.scheduler}")
        tiles.compute_kernel(job, progress=not args.no_progress, client=client)
    except KeyboardInterrupt:
        kept = len(job.finished())
        print(f"\ninterrupted: {kept} of {len(plan)} tiles are finished and kept in {store}; "
              "run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:  # e.g. the store changed under us, a full disk
        print(f"widenets kernel: {error}", file=sys.stderr)
        return 1
    finally:
        job.close()
        if client is not None:
            client.close()
    seconds = time.perf_counter() - start
    computed = len(plan) - done + len(job.repaired)
    print(f"computed {computed} of {len(plan)} tiles in {seconds:.2f} s")
    if job.repaired:
        print(f"repaired {len(job.repaired)} damaged tile{'s' if len(job.repaired) != 1 else ''}"
              " (their numbers no longer matched their checksums)")
    print(f"{what} {n1} x {n2} {job.dtype} in {store} "
          f"(read it with widenets.load_kernel({str(store)!r}))")
    return 0


#: Functions registering one subcommand each.
COMMANDS: list[Callable[[argparse._SubParsersAction], argparse.ArgumentParser]] = [
    add_demo_parser,
    add_lazy_parser,
    add_kernel_parser,
    add_predict_parser,
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
