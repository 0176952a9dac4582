"""The IDX files of MNIST and Fashion-MNIST: reading one file, and finding the four files
of a data set in a folder (:func:`widenets.datasets.load_idx`).

An IDX file (LeCun et al., the MNIST page) is a magic number ``0 0 T D`` (``T`` the type
of the numbers, ``D`` the number of dimensions), ``D`` big-endian 32-bit sizes, then the
numbers, big-endian, in C order. Files may be gzip-compressed (``.gz``), as distributed.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

#: IDX type codes and the NumPy dtypes (big-endian) they stand for.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

#: The four files of a data set, by role: the names MNIST and Fashion-MNIST are
#: distributed under (also with a dot before ``idx``, as some copies are named).
IDX_FILES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in one IDX file (gzip-compressed or not), in native byte order.
    ``ValueError`` naming the file if it is not a whole IDX file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            data = stream.read()
    except (OSError, EOFError) as error:  # (gzip's errors are OSErrors)
        raise ValueError(f"{path} cannot be read as an IDX file: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (its magic number is "
                         f"{data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is cut short: its header needs {header} bytes")
    shape = tuple(int(s) for s in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes; an IDX array of shape {shape} "
                         f"and type {dtype.str} takes {expected}")
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def find_idx_files(folder: str | os.PathLike) -> dict[str, Path]:
    """The four files of the data set in ``folder``, by role (:data:`IDX_FILES`): in the
    folder itself, in ``folder/raw`` or in ``folder/*/raw`` (the layout torchvision
    downloads, e.g. ``FashionMNIST/raw``), gzip-compressed or not.
    ``FileNotFoundError`` naming the missing files and where they were looked for."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {root} does not exist (or is not a folder)")
    candidates = [root, root / "raw"] + sorted(
        child / "raw" for child in root.iterdir() if child.is_dir() and child.name != "raw")
    best: dict[str, Path] = {}
    for candidate in (c for c in candidates if c.is_dir()):
        found = {role: path for role, stem in IDX_FILES.items()
                 if (path := _file(candidate, stem)) is not None}
        if len(found) == len(IDX_FILES):
            return found
        if len(found) > len(best):
            best = found
    missing = [stem for role, stem in IDX_FILES.items() if role not in best]
    searched = ", ".join(str(c) for c in candidates if c.is_dir())
    raise FileNotFoundError(
        f"{', '.join(missing)} (or with .gz) not found in {searched}; an IDX data set is "
        f"the four files {', '.join(IDX_FILES.values())}")


def _file(folder: Path, stem: str) -> Path | None:
    dotted = stem.replace("-idx", ".idx")
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None
