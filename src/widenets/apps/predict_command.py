"""``widenets predict``: predictions of an infinitely wide network on a data set, from the
shell, with the training kernel factorised on disk when a store is given (see
:func:`widenets.predict.gp_inference`)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .arguments import (
    add_architecture_arguments,
    kernel_architecture,
    kernel_names,
    memory_size,
    nonnegative_float,
    positive_int,
)

#: Names of built-in data sets for ``--data`` (an IDX folder or .npy files otherwise).
NAMED_DATA = ("digits", "fashion-mnist")


def add_predict_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``widenets predict``."""
    parser = subparsers.add_parser(
        "predict",
        help="test predictions (NNGP posterior mean, or NTK-trained ensemble at t = inf)",
        description=(
            "Predict the test set of a data set with an infinitely wide network: the mean "
            "of the Gaussian-process posterior of each kernel, K(x, X) (K(X, X) + diag_reg "
            "I)^-1 y (for the NTK: the trained ensemble at infinite time). With --store the "
            "training kernel is factorised on disk within --memory-limit, and the same "
            "command again resumes every stage. Prints the accuracy when the test labels "
            "are known and writes the predictions as .npy files."),
    )
    parser.add_argument("--data", required=True, metavar="fashion-mnist|digits|DIR|X.npy",
                        help="'fashion-mnist' (Debian's dataset-fashion-mnist package), "
                             "'digits', a folder of MNIST-style IDX files, or a .npy file "
                             "of training inputs (then --targets and --test)")
    parser.add_argument("--targets", default=None, metavar="Y.npy",
                        help="with X.npy: training labels (N,) or targets (N, outputs)")
    parser.add_argument("--test", default=None, metavar="XTEST.npy",
                        help="with X.npy: test inputs")
    parser.add_argument("--test-labels", default=None, metavar="LABELS.npy",
                        help="with X.npy: test labels, to print the accuracy")
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N",
                        help="use the first N training examples")
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="M",
                        help="use the first M test examples")
    add_architecture_arguments(parser, depth=3, W_std=2 ** 0.5, W_std_shown="sqrt(2)")
    parser.add_argument("--get", type=kernel_names, default=("nngp", "ntk"),
                        metavar="nngp|ntk|nngp,ntk", help="which kernels (default: both)")
    parser.add_argument("--diag-reg", type=nonnegative_float, default=None, metavar="R",
                        help="added to the training kernel's diagonal (default: 0.01 times "
                             "its mean diagonal entry)")
    parser.add_argument("--store", default=None, metavar="DIR",
                        help="folder where the factorisation, solutions and test kernels "
                             "are kept (and resumed); without it, everything is in memory")
    parser.add_argument("--memory-limit", type=memory_size, default=None, metavar="SIZE",
                        help="working memory: MiB, or with a unit such as 600MiB or 20GiB "
                             "(default: half the available memory)")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="a Dask scheduler whose workers compute the tiles (needs "
                             "--store on a file system they share)")
    parser.add_argument("--predictions", default="predictions", metavar="DIR",
                        help="folder for the predictions, one NAME.npy per kernel "
                             "(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.set_defaults(handler=run_predict_command, parser=parser)
    return parser


def _load_npy(path: str | None, option: str) -> np.ndarray:
    if path is None:
        raise ValueError(f"{option} is needed with a .npy --data")
    try:
        value = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"{option}: cannot read {path!r} as a .npy array: {error}") from None
    if not isinstance(value, np.ndarray) or not np.issubdtype(value.dtype, np.number):
        raise ValueError(f"{option}: {path!r} is not a .npy array of numbers")
    return value


def load_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray | None]:
    """``(x_train, y_train, x_test, test_labels)``: inputs float64 in the layout of
    ``--arch``, targets ``(N, outputs)`` (labels one-hot, minus 0.1), test labels or
    ``None``. ``ValueError`` with a message for the user."""
    from ..datasets import (
        DEBIAN_FASHION_MNIST,
        load_digits,
        load_idx,
        one_hot_targets,
        unit_mean_square,
    )

    labels_test: np.ndarray | None
    if args.data == "digits":
        digits = load_digits(n_train=args.n_train or 1000)
        x, labels, xs, labels_test = (digits.x_train, digits.labels_train, digits.x_test,
                                      digits.labels_test)
        side = 8
    elif args.data.endswith(".npy"):
        x = _load_npy(args.data, "--data")
        targets = _load_npy(args.targets, "--targets")
        xs = _load_npy(args.test, "--test")
        labels_test = None if args.test_labels is None else _load_npy(args.test_labels,
                                                                      "--test-labels")
        if len(targets) != len(x):
            raise ValueError(f"--targets has {len(targets)} rows for {len(x)} inputs")
        labels = targets
        side = 0
    else:
        folder = DEBIAN_FASHION_MNIST if args.data == "fashion-mnist" else args.data
        try:
            images, labels, test_images, labels_test = load_idx(folder)
        except FileNotFoundError as error:
            hint = (" (install Debian's dataset-fashion-mnist package)"
                    if args.data == "fashion-mnist" else "")
            raise ValueError(f"--data: {error}{hint}") from None
        x, xs = unit_mean_square(images), unit_mean_square(test_images)
        side = images.shape[1]
    if args.n_train is not None and args.data != "digits":
        x, labels = x[:args.n_train], labels[:args.n_train]
    if args.n_test is not None:
        xs = xs[:args.n_test]
        labels_test = None if labels_test is None else labels_test[:args.n_test]
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
        y = one_hot_targets(labels, max(10, int(labels.max()) + 1))
    else:
        y = np.asarray(labels, dtype=np.float64)
    if args.arch != "fc":
        if not side:
            if x.ndim != 4:
                raise ValueError(f"--arch {args.arch} needs inputs (N, C, H, W), got "
                                 f"{x.shape}")
        else:
            x, xs = x.reshape(-1, 1, side, side), xs.reshape(-1, 1, side, side)
    return (np.ascontiguousarray(x, dtype=np.float64), y,
            np.ascontiguousarray(xs, dtype=np.float64), labels_test)


def run_predict_command(args: argparse.Namespace) -> int:
    """Run ``widenets predict``."""
    import torch

    from ..predict import gp_inference
    from ..predict.common import relative_diag_reg

    def error(message: str, status: int = 2) -> int:
        print(f"widenets predict: error: {message}", file=sys.stderr)
        return status

    try:
        x, y, xs, labels_test = load_data(args)
    except ValueError as problem:
        return error(str(problem))
    except ImportError as problem:
        return error(str(problem), 1)
    net = kernel_architecture(args.arch, args.depth, args.W_std, args.b_std, args.activation)
    x_train, y_train, x_test = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xs)
    client = None
    if args.scheduler is not None:
        try:
            from distributed import Client
        except ImportError:
            return error("--scheduler needs dask.distributed: pip install 'widenets[dask]'", 1)
        try:
            client = Client(args.scheduler)
        except (OSError, ValueError) as problem:
            return error(f"cannot connect to the Dask scheduler at {args.scheduler}: "
                         f"{problem}", 1)
    out = Path(args.predictions)
    print(f"{len(x)} training and {len(xs)} test examples of shape {x.shape[1:]}; "
          f"{args.arch}, depth {args.depth}, {args.activation}")
    try:
        for get in args.get:
            reg = (relative_diag_reg(net, x_train, get, 1e-2) if args.diag_reg is None
                   else args.diag_reg)
            start = time.perf_counter()
            posterior = gp_inference(
                net, x_train, y_train, diag_reg=reg,
                store=args.store,
                memory_limit=args.memory_limit, progress=not args.no_progress,
                client=client)
            mean, _ = posterior(x_test, get=get, compute_cov=False)
            seconds = time.perf_counter() - start
            out.mkdir(parents=True, exist_ok=True)
            np.save(out / f"{get}.npy", mean.numpy())
            line = (f"{get}: diag_reg {reg:.3g}, relative residual "
                    f"{posterior.relative_residuals[get]:.1e}, {seconds:.1f} s, predictions "
                    f"in {out / f'{get}.npy'}")
            if labels_test is not None:
                accuracy = float(np.mean(mean.argmax(dim=1).numpy() == labels_test))
                line += f"; test accuracy {accuracy:.4f}"
            print(line, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: what is finished is kept in the store; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    except (ValueError, TypeError) as problem:
        return error(str(problem), 1)
    finally:
        if client is not None:
            client.close()
    return 0
