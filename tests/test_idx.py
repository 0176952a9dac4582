"""wn.datasets.load_idx: MNIST-style IDX files written here (gzip or not, flat or in
torchvision's layout) read back exactly; missing and malformed files named."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import widenets as wn
from widenets.idx import read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    codes = {np.dtype("uint8"): 0x08, np.dtype("int16"): 0x0B, np.dtype("float64"): 0x0E}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(folder: Path, name: str, array: np.ndarray, compressed: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    data = idx_bytes(array)
    if compressed:
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)


def data_set(rng: np.random.Generator, n_train: int = 7, n_test: int = 3):
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n_test).astype(np.uint8))


def write_data_set(folder: Path, arrays, compressed: bool) -> None:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for name, array in zip(names, arrays):
        write(folder, name, array, compressed)


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("layout", ["flat", "raw", "torchvision"])
def test_reads_back_what_was_written(tmp_path, compressed, layout):
    arrays = data_set(np.random.default_rng(0))
    where = {"flat": tmp_path, "raw": tmp_path / "raw",
             "torchvision": tmp_path / "FashionMNIST" / "raw"}[layout]
    write_data_set(where, arrays, compressed)
    x_train, y_train, x_test, y_test = wn.datasets.load_idx(tmp_path)
    assert x_train.shape == (7, 28, 28) and x_test.shape == (3, 28, 28)
    assert x_train.dtype == np.uint8 and y_train.dtype == np.int64
    for got, expected in zip((x_train, y_train, x_test, y_test), arrays):
        np.testing.assert_array_equal(got, expected)


def test_other_types_and_byte_order(tmp_path):
    values = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
    write(tmp_path, "a", values, compressed=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), values)
    doubles = np.linspace(-1, 1, 5)
    write(tmp_path, "b", doubles, compressed=True)
    np.testing.assert_array_equal(read_idx(tmp_path / "b.gz"), doubles)


def test_a_missing_file_is_named(tmp_path):
    write_data_set(tmp_path, data_set(np.random.default_rng(1)), compressed=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte \(or with .gz\) "
                       "not found in " + str(tmp_path)):
        wn.datasets.load_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wn.datasets.load_idx(tmp_path / "nowhere")


def test_malformed_files_are_named(tmp_path):
    arrays = data_set(np.random.default_rng(2))
    write_data_set(tmp_path, arrays, compressed=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte holds .* bytes"):
        wn.datasets.load_idx(tmp_path)
    images.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="is not an IDX file"):
        wn.datasets.load_idx(tmp_path)
    write(tmp_path, "train-images-idx3-ubyte", arrays[0], compressed=False)
    write(tmp_path, "train-labels-idx1-ubyte", arrays[1][:-1], compressed=False)
    with pytest.raises(ValueError, match=r"N labels, got \(7, 28, 28\) and \(6,\)"):
        wn.datasets.load_idx(tmp_path)


def test_unit_mean_square():
    images = np.random.default_rng(3).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    images[2] = 0
    x = wn.datasets.unit_mean_square(images)
    assert x.shape == (4, 784) and x.dtype == np.float64
    np.testing.assert_allclose(np.mean(x * x, axis=1), [1, 1, 0, 1], rtol=1e-14)
