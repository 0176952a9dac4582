"""Data sets, with one preprocessing convention per data set.

MNIST and Fashion-MNIST: :func:`load_idx` reads the four IDX files of either from a
folder (nothing is downloaded); :func:`unit_mean_square` is the inputs' convention.

Digits: scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels, no
download). One convention serves every use (the demo, the lazy-training experiment,
``widenets kernel --data digits``): pixels divided by 16 (to [0, 1]); each pixel centred
by its mean over the *training* images; each image then scaled to norm ``sqrt(64) = 8``,
so that every input has the same input kernel ``x . x / d = 1`` and the kernels do not
depend on the quantity of ink. Without a split, all images are the training images.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .idx import IDX_FILES, find_idx_files, read_idx

#: Number of digits in scikit-learn's bundled data set.
N_DIGITS = 1797
#: Pixels per digit image (8 x 8).
DIGIT_PIXELS = 64


@dataclass(frozen=True)
class DigitsData:
    """The digits task: inputs ``(N, 64)`` in float64, targets and labels.

    ``y_train`` is the one-hot encoding of ``labels_train`` minus 0.1 (10 outputs).
    """

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    labels_train: np.ndarray
    labels_test: np.ndarray

    @property
    def y_test(self) -> np.ndarray:
        """Test targets, encoded like ``y_train``."""
        return one_hot_targets(self.labels_test)


def one_hot_targets(labels: np.ndarray, classes: int = 10) -> np.ndarray:
    """Labels ``0 .. classes - 1`` as regression targets: one-hot minus 0.1 (zero mean
    over 10 classes)."""
    return np.eye(classes)[labels] - 0.1


def _bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise ImportError("the digits data set comes with scikit-learn: "
                          "pip install 'widenets[demo]'") from None
    images, labels = sklearn_digits(return_X_y=True)
    return images.astype(np.float64) / 16.0, labels


def preprocess_digits(images: np.ndarray, train: np.ndarray | slice) -> np.ndarray:
    """The convention of this module: centre each pixel by its mean over
    ``images[train]``, then scale every image to norm ``sqrt(pixels)``."""
    x = images - images[train].mean(axis=0)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * (math.sqrt(x.shape[1]) / np.maximum(norms, 1e-12))


def load_digits(
    n_train: int | None = None, n_test: int | None = None, seed: int = 0
) -> DigitsData:
    """The digits, preprocessed as the module docstring says.

    ``n_train=None``: all 1797 images are the training set, in scikit-learn's order, and
    the test set is empty. Otherwise a seeded random permutation gives ``n_train``
    training images (at least 10, leaving at least one) and ``n_test`` test images
    (``None``: all the others). Needs scikit-learn.
    """
    if n_train is None and n_test is not None:
        raise ValueError(f"n_test needs n_train (without a split every digit is a training "
                         f"example), got n_test={n_test!r}")
    if n_train is not None:
        if not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 10:
            raise ValueError(f"n_train must be an integer >= 10, got {n_train!r}")
        if n_train >= N_DIGITS:
            raise ValueError(
                f"n_train must be below {N_DIGITS} to leave a test set, got {n_train}"
            )
        available = N_DIGITS - n_train
        if n_test is None:
            n_test = available
        if (not isinstance(n_test, int) or isinstance(n_test, bool)
                or not 1 <= n_test <= available):
            raise ValueError(
                f"n_test must be an integer in [1, {available}] (or None), got {n_test!r}"
            )
    images, labels = _bundled_digits()
    if n_train is None:
        train, test = np.arange(len(images)), np.arange(0)
    else:
        assert n_test is not None  # set above whenever n_train is
        order = np.random.default_rng(seed).permutation(len(images))
        train, test = order[:n_train], order[n_train:n_train + n_test]
    x = preprocess_digits(images, train)
    y = one_hot_targets(labels)
    return DigitsData(x[train], x[test], y[train], labels[train], labels[test])


def as_images(x: np.ndarray) -> np.ndarray:
    """Digits ``(N, 64)`` as images ``(N, 1, 8, 8)``."""
    return x.reshape(-1, 1, 8, 8)


#: Where Debian's ``dataset-fashion-mnist`` package installs the data set.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def load_idx(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray]:
    """MNIST or Fashion-MNIST from its four IDX files in ``folder`` (gzip-compressed or
    not; also in ``folder/raw`` or ``folder/*/raw``, as torchvision downloads them):
    ``(x_train, y_train, x_test, y_test)``, images ``(N, 28, 28)`` of ``uint8`` pixels
    and labels ``(N,)`` as ``int64``. ``FileNotFoundError`` names a missing file;
    ``ValueError`` a file that is not an IDX file, or images and labels that do not
    match."""
    files = find_idx_files(folder)
    arrays = {role: read_idx(path) for role, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split} images"], arrays[f"{split} labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{files[f'{split} images']} and {files[f'{split} labels']} must hold images "
                f"(N, rows, columns) and N labels, got {images.shape} and {labels.shape}")
    return (arrays["train images"], arrays["train labels"].astype(np.int64),
            arrays["test images"], arrays["test labels"].astype(np.int64))


def unit_mean_square(images: np.ndarray) -> np.ndarray:
    """Images ``(N, ...)`` flattened to ``(N, pixels)`` in float64, each scaled to a mean
    square of 1 (so every input has the input kernel ``x . x / d = 1``); an all-zero image
    stays zero."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    root_mean_square = np.sqrt(np.mean(x * x, axis=1, keepdims=True))
    return x / np.where(root_mean_square > 0, root_mean_square, 1.0)


__all__ = ["IDX_FILES", "DEBIAN_FASHION_MNIST", "DigitsData", "as_images", "load_digits",
           "load_idx", "one_hot_targets", "preprocess_digits", "unit_mean_square"]
