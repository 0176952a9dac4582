"""Convolutional NNGP and NTK against a direct NumPy reference written here.

The reference below is independent of the package: every kernel is a dense array
``K[n, m, p, q]`` over all images ``n, m`` (``x1`` and ``x2`` stacked, so the
self-covariances ``K[n, n]`` that the activations need come for free) and all flattened
positions ``p, q``. Each convolution or pooling layer is an explicit table
``(output position, filter offset) -> input position`` built with plain loops, with one
extra index for "padding" that points at a zero row and column. The layer rules are then
applied literally:

* input: ``K0[p, q] = sum_c x[c, p] x'[c, q] / C`` and ``T0 = 0``;
* convolution (shared offsets ``d``): ``K' = W^2 mean_d Kpad[s p + d, s q + d] + b^2`` and
  ``T' = W^2 mean_d Tpad[s p + d, s q + d] + K'``;
* average pooling (independent offsets): ``K' = A K A^T`` with ``A[p, i] = 1 / |window|``
  for every unpadded input ``i`` of output ``p``, and the same for ``T``;
* ReLU and Erf: the closed-form Gaussian expectations, with ``T' = T E[phi' phi']``;
* GlobalAvgPool: the mean over all ``(p, q)``; Flatten: the mean over ``p`` of ``K[p, p]``;
  Linear: ``K' = W^2 K + b^2``, ``T' = W^2 T + K'``; Residual: the sum of both branches.

The reference is validated against the Neural Tangents values in
``tests/data/nt_reference_public.npz`` (cases ``cnn_flatten`` and ``cnn_gap``), then
``net.kernel`` is compared with it on small random inputs over strides, paddings, odd and
even and non-square filters, pooling, 1-D and 2-D convolutions, residual blocks and both
activations, with ``x2`` given and ``x2=None``. Finally, for networks without pooling,
the ``spatial="full"``, ``"diagonal"`` and default paths must agree.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import widenets as wn

RTOL_REFERENCE = 1e-10  # package against the reference written here
RTOL_NEURAL_TANGENTS = 1e-6  # package against the stored Neural Tangents values
RTOL_SPATIAL = 1e-12  # spatial="full" against "diagonal" and the default
RTOL_NT_DIAGONAL = 1e-8  # Neural Tangents' own rounding at identical inputs (see below)


# ------------------------------------------------------------------ index tables
def padding_amounts(length: int, k: int, s: int, padding: str) -> tuple[int, int]:
    """Output length and padding before the first pixel along one axis."""
    if padding == "valid":
        return (length - k) // s + 1, 0
    out = -(-length // s)  # ceil(length / s)
    total = max((out - 1) * s + k - length, 0)
    return out, total // 2


def axis_table(length: int, k: int, s: int, padding: str) -> list[list[int | None]]:
    """``table[o][j]``: input index under output ``o`` and offset ``j`` (None: padding)."""
    out, before = padding_amounts(length, k, s, padding)
    table = []
    for o in range(out):
        row: list[int | None] = []
        for j in range(k):
            i = s * o + j - before
            if padding == "circular":
                row.append(i % length)
            else:
                row.append(i if 0 <= i < length else None)
        table.append(row)
    return table


def window_table(
    shape: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...], padding: str
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Table ``(flat output position, flat offset) -> flat input position``.

    Padding entries point at index ``prod(shape)``: one past the last position, where the
    padded kernels hold zeros. Returns the table and the output shape.
    """
    axes = [axis_table(n, k, s, padding) for n, k, s in zip(shape, kernel, stride)]
    out_shape = tuple(len(a) for a in axes)
    n_in = math.prod(shape)
    rows = []
    for out in itertools.product(*(range(n) for n in out_shape)):
        row = []
        for offset in itertools.product(*(range(k) for k in kernel)):
            index = [axes[a][out[a]][offset[a]] for a in range(len(shape))]
            if any(i is None for i in index):
                row.append(n_in)
            else:
                row.append(int(np.ravel_multi_index(index, shape)))
        rows.append(row)
    return np.array(rows), out_shape


def pad_positions(k: np.ndarray) -> np.ndarray:
    """Append a zero position on both position axes (the "padding" index)."""
    return np.pad(k, [(0, 0), (0, 0), (0, 1), (0, 1)])


def as_tuple(value: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple) else (value,) * ndim


# ------------------------------------------------------------------ reference layers
# Each layer maps (K, T, spatial shape) to (K', T', new spatial shape), with K and T of
# shape (N, N, P, P), and builds the matching widenets layer.
@dataclass
class Conv:
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: str = "valid"
    W_std: float = 1.5
    b_std: float | None = 0.05

    def reference(self, k, t, shape):
        ndim = len(shape)
        table, out_shape = window_table(
            shape, as_tuple(self.kernel_size, ndim), as_tuple(self.stride, ndim), self.padding
        )
        kpad, tpad = pad_positions(k), pad_positions(t)
        k_sum = np.zeros(k.shape[:2] + (len(table),) * 2)
        t_sum = np.zeros_like(k_sum)
        for d in range(table.shape[1]):
            rows, cols = table[:, d][:, None], table[:, d][None, :]
            k_sum += kpad[:, :, rows, cols]
            t_sum += tpad[:, :, rows, cols]
        w2, b2 = self.W_std**2, (self.b_std or 0.0) ** 2
        k_new = w2 * k_sum / table.shape[1] + b2
        t_new = w2 * t_sum / table.shape[1] + k_new
        return k_new, t_new, out_shape

    def widenets(self, ndim):
        conv = {1: wn.Conv1d, 2: wn.Conv2d}[ndim]
        return conv(
            4, self.kernel_size, stride=self.stride, padding=self.padding,
            W_std=self.W_std, b_std=self.b_std,
        )


@dataclass
class Pool:
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] | None = None
    padding: str = "valid"

    def reference(self, k, t, shape):
        ndim = len(shape)
        kernel = as_tuple(self.kernel_size, ndim)
        stride = kernel if self.stride is None else as_tuple(self.stride, ndim)
        table, out_shape = window_table(shape, kernel, stride, self.padding)
        n_in = math.prod(shape)
        average = np.zeros((len(table), n_in + 1))
        for p, row in enumerate(table):
            for i in row:
                average[p, i] += 1.0 / table.shape[1]
        average = average[:, :n_in]  # padding counts as zero but still divides
        pool = lambda a: np.einsum("pi,nmij,qj->nmpq", average, a, average)  # noqa: E731
        return pool(k), pool(t), out_shape

    def widenets(self, ndim):
        pool = {1: wn.AvgPool1d, 2: wn.AvgPool2d}[ndim]
        return pool(self.kernel_size, stride=self.stride, padding=self.padding)


@dataclass
class GlobalPool:
    def reference(self, k, t, shape):
        mean = lambda a: a.mean(axis=(2, 3))[:, :, None, None]  # noqa: E731
        return mean(k), mean(t), ()

    def widenets(self, ndim):
        return wn.GlobalAvgPool()


@dataclass
class Flatten:
    def reference(self, k, t, shape):
        diag = lambda a: np.einsum("nmpp->nm", a)[:, :, None, None] / a.shape[2]  # noqa: E731
        return diag(k), diag(t), ()

    def widenets(self, ndim):
        return wn.Flatten()


@dataclass
class Dense:
    W_std: float = 1.5
    b_std: float | None = 0.05

    def reference(self, k, t, shape):
        assert k.shape[2:] == (1, 1), "Dense follows Flatten or GlobalPool here"
        k_new = self.W_std**2 * k + (self.b_std or 0.0) ** 2
        return k_new, self.W_std**2 * t + k_new, shape

    def widenets(self, ndim):
        return wn.Linear(3, W_std=self.W_std, b_std=self.b_std)


def relu_expectations(c, q1, q2):
    """``E[relu(u) relu(v)]`` and ``E[step(u) step(v)]``.

    The angle comes from ``arctan2`` rather than ``arccos(c / sqrt(q1 q2))``: at identical
    inputs ``q1 q2 - c^2`` is exactly zero, so theta is exactly zero, whereas ``arccos`` of a
    correlation rounded to ``1 - 1e-16`` is off by 1e-8.
    """
    sine = np.sqrt(np.maximum(q1 * q2 - c**2, 0.0))  # sqrt(q1 q2) sin(theta)
    theta = np.arctan2(sine, c)
    value = (sine + (np.pi - theta) * c) / (2 * np.pi)
    return value, (np.pi - theta) / (2 * np.pi)


def erf_expectations(c, q1, q2):
    """``E[erf(u) erf(v)]`` and ``E[erf'(u) erf'(v)]``."""
    a, b = 1 + 2 * q1, 1 + 2 * q2
    value = 2 / np.pi * np.arcsin(2 * c / np.sqrt(a * b))
    return value, 4 / np.pi / np.sqrt(a * b - 4 * c**2)


@dataclass
class Act:
    name: str  # "relu" or "erf"

    def reference(self, k, t, shape):
        var = np.einsum("nnpq->npq", k)  # K(x, x) over position pairs
        var = np.diagonal(var, axis1=1, axis2=2)  # (N, P): the variance at each position
        q1 = var[:, None, :, None]
        q2 = var[None, :, None, :]
        expectations = {"relu": relu_expectations, "erf": erf_expectations}[self.name]
        value, derivative = expectations(k, q1, q2)
        return value, t * derivative, shape

    def widenets(self, ndim):
        return {"relu": wn.ReLU, "erf": wn.Erf}[self.name]()


@dataclass
class Res:
    block: list

    def reference(self, k, t, shape):
        kb, tb, shape_b = run_reference(self.block, k, t, shape)
        assert shape_b == shape, "the residual block must keep the spatial shape"
        return k + kb, t + tb, shape

    def widenets(self, ndim):
        return wn.Residual(wn.Sequential(*(layer.widenets(ndim) for layer in self.block)))


RELU, ERF = Act("relu"), Act("erf")


def run_reference(layers, k, t, shape):
    for layer in layers:
        k, t, shape = layer.reference(k, t, shape)
    return k, t, shape


def reference_kernels(layers, x1, x2=None) -> dict[str, np.ndarray]:
    """NNGP and NTK of ``layers`` between ``x1`` and ``x2`` (``x1`` itself when None)."""
    x = x1 if x2 is None else np.concatenate([x1, x2])
    n, channels, shape = x.shape[0], x.shape[1], x.shape[2:]
    flat = x.reshape(n, channels, -1)
    k0 = np.einsum("ncp,mcq->nmpq", flat, flat) / channels
    k, t, out_shape = run_reference(layers, k0, np.zeros_like(k0), shape)
    assert out_shape == () and k.shape[2:] == (1, 1), "the network must end in a readout"
    n1 = x1.shape[0]
    cols = slice(0, n1) if x2 is None else slice(n1, None)
    return {"nngp": k[:n1, cols, 0, 0], "ntk": t[:n1, cols, 0, 0]}


def build(layers, ndim: int) -> wn.Sequential:
    return wn.Sequential(*(layer.widenets(ndim) for layer in layers))


def relative_error(actual, expected: np.ndarray) -> float:
    actual = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


# ------------------------------------------------------------- Neural Tangents check
NT_CASES = {
    "cnn_flatten": [
        Conv(3, 1, "same", 1.5, 0.1), RELU, Conv(3, 1, "same", 1.5, 0.1), RELU,
        Flatten(), Dense(1.0, 0.1),
    ],
    "cnn_gap": [
        Conv(3, 1, "same", 1.5, 0.1), RELU, Conv(3, 1, "same", 1.5, 0.1), RELU,
        GlobalPool(), Dense(1.0, 0.1),
    ],
}


def off_diagonal(a: np.ndarray) -> np.ndarray:
    return a[~np.eye(len(a), dtype=bool)]


@pytest.mark.parametrize("case", sorted(NT_CASES))
def test_reference_matches_neural_tangents(case, reference):
    """The reference written here reproduces Neural Tangents (this needs no widenets).

    Everything agrees to 1e-10 except the diagonal of the NTK of ``x1`` with itself in
    ``cnn_flatten``, which Neural Tangents has 4e-10 to 2.5e-9 too small: there the ReLU
    sees identical inputs, the correlation is 1 and its angle should be 0, but an
    ``arccos`` of a correlation rounded just below 1 gives an angle of order 1e-8, which
    ``E[step step] = (pi - theta) / (2 pi)`` passes on, and Flatten keeps only those
    same-position entries. The reference computes the angle with ``arctan2`` (exactly 0
    there), so the diagonal is checked to ``RTOL_NT_DIAGONAL`` only.
    """
    x1, x2 = reference[f"{case}/x1"], reference[f"{case}/x2"]
    k12 = reference_kernels(NT_CASES[case], x1, x2)
    k11 = reference_kernels(NT_CASES[case], x1)
    for kind in ("nngp", "ntk"):
        expected11 = reference[f"{case}/{kind}11"]
        assert relative_error(k12[kind], reference[f"{case}/{kind}12"]) < RTOL_REFERENCE, kind
        off = relative_error(off_diagonal(k11[kind]), off_diagonal(expected11))
        assert off < RTOL_REFERENCE, kind
        diagonal = relative_error(np.diag(k11[kind]), np.diag(expected11))
        assert diagonal < (RTOL_REFERENCE if kind == "nngp" else RTOL_NT_DIAGONAL), kind


def test_reference_is_symmetric_and_blocks_agree(reference):
    """``K(x1, x1)`` is symmetric and the joint kernel's blocks are the separate kernels."""
    x1, x2 = reference["cnn_gap/x1"], reference["cnn_gap/x2"]
    layers = NT_CASES["cnn_gap"]
    joint = reference_kernels(layers, np.concatenate([x1, x2]))
    k12, k11 = reference_kernels(layers, x1, x2), reference_kernels(layers, x1)
    n1 = len(x1)
    for kind in ("nngp", "ntk"):
        np.testing.assert_allclose(k11[kind], k11[kind].T, rtol=1e-14)
        np.testing.assert_allclose(joint[kind][:n1, n1:], k12[kind], rtol=1e-14)
        np.testing.assert_allclose(joint[kind][:n1, :n1], k11[kind], rtol=1e-14)


def test_padding_tables_follow_the_convention():
    """Output lengths and padding of the tables: the extra padded pixel goes at the end."""
    assert padding_amounts(6, 2, 1, "same") == (6, 0)  # total 1: 0 before, 1 after
    assert padding_amounts(6, 4, 1, "same") == (6, 1)  # total 3: 1 before, 2 after
    assert padding_amounts(5, 3, 2, "same") == (3, 1)
    assert padding_amounts(6, 3, 2, "same") == (3, 0)  # total 1
    assert padding_amounts(7, 3, 2, "valid") == (3, 0)
    assert axis_table(4, 3, 1, "circular")[0] == [3, 0, 1]
    assert axis_table(4, 2, 1, "same")[3] == [3, None]
    table, out_shape = window_table((2, 3), (1, 2), (1, 1), "valid")
    assert out_shape == (2, 2)
    np.testing.assert_array_equal(table, [[0, 1], [1, 2], [3, 4], [4, 5]])


@pytest.mark.parametrize("case", sorted(NT_CASES))
def test_package_matches_neural_tangents(case, reference):
    net = build(NT_CASES[case], ndim=2)
    x1, x2 = reference[f"{case}/x1"], reference[f"{case}/x2"]
    k12 = net.kernel(x1, x2, get=("nngp", "ntk"))
    k11 = net.kernel(x1, None, get=("nngp", "ntk"))
    for kind in ("nngp", "ntk"):
        assert relative_error(k12[kind], reference[f"{case}/{kind}12"]) < RTOL_NEURAL_TANGENTS
        assert relative_error(k11[kind], reference[f"{case}/{kind}11"]) < RTOL_NEURAL_TANGENTS


# ------------------------------------------------------------- package vs reference
def _inputs(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, *shape))


IMAGE = (5, 6)  # not square, so that swapped axes show
LINE = (7,)
INPUTS = {
    2: (_inputs(3, IMAGE, seed=1), _inputs(2, IMAGE, seed=2)),
    1: (_inputs(3, LINE, seed=3), _inputs(2, LINE, seed=4)),
}

# name -> (number of spatial dimensions, layers)
CASES = {
    # padding and strides of one convolution, odd and even filters
    "conv3-same-s1": (2, [Conv(3, 1, "same"), RELU, Flatten(), Dense()]),
    "conv3-same-s2": (2, [Conv(3, 2, "same"), RELU, Flatten(), Dense()]),
    "conv3-valid-s1": (2, [Conv(3, 1, "valid"), RELU, Flatten(), Dense()]),
    "conv3-valid-s2": (2, [Conv(3, 2, "valid"), RELU, Flatten(), Dense()]),
    "conv2-same-s1": (2, [Conv(2, 1, "same"), RELU, Conv(2, 1, "same"), Flatten(), Dense()]),
    "conv2-same-s2": (2, [Conv(2, 2, "same"), RELU, Flatten(), Dense()]),
    "conv4-same-s1": (2, [Conv(4, 1, "same"), RELU, GlobalPool(), Dense()]),
    "conv4-same-s2": (2, [Conv(4, 2, "same"), RELU, Flatten(), Dense()]),
    "conv2-same-s3-no-padding": (2, [Conv(2, 3, "same"), RELU, Flatten(), Dense()]),  # max(., 0)
    "conv2-valid-s1": (2, [Conv(2, 1, "valid"), RELU, GlobalPool(), Dense()]),
    "conv3-circular-s1": (2, [Conv(3, 1, "circular"), RELU, Flatten(), Dense()]),
    "conv3-circular-s2": (2, [Conv(3, 2, "circular"), RELU, Flatten(), Dense()]),
    "conv2-circular-s1": (2, [Conv(2, 1, "circular"), RELU, GlobalPool(), Dense()]),
    "conv4-circular-s2": (2, [Conv(4, 2, "circular"), ERF, Flatten(), Dense()]),
    # non-square filters and strides
    "conv2x3-same-s1x2": (2, [Conv((2, 3), (1, 2), "same"), RELU, Flatten(), Dense()]),
    "conv3x1-valid-s2x1": (2, [Conv((3, 1), (2, 1), "valid"), RELU, GlobalPool(), Dense()]),
    "conv1x4-circular": (2, [Conv((1, 4), 1, "circular"), ERF, Flatten(), Dense()]),
    "conv3x2-same-gap": (2, [Conv((3, 2), 1, "same"), RELU, GlobalPool(), Dense()]),
    "conv-no-bias": (2, [Conv(3, 1, "same", 1.2, None), RELU, Flatten(), Dense(1.0, None)]),
    # two hidden layers with both readouts and both activations
    "deep-relu-flatten": (
        2, [Conv(3, 1, "same"), RELU, Conv(3, 2, "same", 2.0, 0.3), RELU, Flatten(), Dense()],
    ),
    "deep-erf-gap": (
        2, [Conv(3, 1, "same", 1.3, 0.2), ERF, Conv(2, 1, "valid"), ERF, GlobalPool(), Dense()],
    ),
    # average pooling
    "pool2-default-stride": (
        2, [Conv(3, 1, "same"), RELU, Pool(2), GlobalPool(), Dense()],
    ),
    "pool2-default-stride-flatten": (
        2, [Conv(3, 1, "same"), RELU, Pool(2), Flatten(), Dense()],
    ),
    "pool3-s1-valid": (2, [Conv(3, 1, "same"), RELU, Pool(3, 1), Flatten(), Dense()]),
    "pool2-s1-same": (2, [Conv(3, 1, "same"), RELU, Pool(2, 1, "same"), Flatten(), Dense()]),
    "pool3-s2-same": (2, [Conv(3, 1, "same"), ERF, Pool(3, 2, "same"), Flatten(), Dense()]),
    "pool2-default-stride-same": (2, [Conv(3, 1, "same"), RELU, Pool(2, None, "same"), Flatten(),
                                      Dense()]),
    "pool2-s3-same-no-padding": (2, [Conv(3, 1, "same"), RELU, Pool(2, 3, "same"), Flatten(),
                                     Dense()]),
    "pool2x3-valid": (2, [Conv(3, 1, "same"), RELU, Pool((2, 3)), Flatten(), Dense()]),
    "pool-then-conv": (
        2, [Conv(3, 1, "same"), RELU, Pool(2, 1), Conv(2, 1, "same"), RELU, GlobalPool(), Dense()],
    ),
    "lead-example": (
        2, [
            Conv(3, 1, "same", 1.5, 0.05), RELU, Conv(3, 1, "same", 1.5, 0.05), RELU,
            Pool(2), GlobalPool(), Dense(1.5, 0.05),
        ],
    ),
    # residual blocks
    "residual-same": (
        2, [
            Conv(3, 1, "same"), Res([RELU, Conv(3, 1, "same", 1.0, 0.1)]), RELU,
            GlobalPool(), Dense(),
        ],
    ),
    "residual-circular-flatten": (
        2, [
            Conv(2, 1, "circular"), Res([ERF, Conv(4, 1, "circular", 0.8, 0.2)]), ERF,
            Flatten(), Dense(),
        ],
    ),
    # one-dimensional convolutions
    "conv1d-same-flatten": (1, [Conv(3, 1, "same"), RELU, Conv(2, 2, "same"), RELU, Flatten(),
                                Dense()]),
    "conv1d-valid-gap": (1, [Conv(4, 1, "valid"), ERF, Conv(3, 2, "valid"), ERF, GlobalPool(),
                             Dense()]),
    "conv1d-circular": (1, [Conv(4, 2, "circular"), RELU, Flatten(), Dense()]),
    "conv1d-pool": (1, [Conv(3, 1, "same"), RELU, Pool(2), Pool(3, 1, "same"), Flatten(),
                        Dense()]),
    "conv1d-residual": (1, [Conv(3, 1, "same"), Res([RELU, Conv(3, 1, "same", 1.0, 0.1)]),
                            RELU, Pool(2, 2, "same"), GlobalPool(), Dense()]),
}

SECOND = ["x2=given", "x2=None"]


def _second_input(ndim: int, second: str) -> np.ndarray | None:
    return INPUTS[ndim][1] if second == "x2=given" else None


@pytest.mark.parametrize("second", SECOND)
@pytest.mark.parametrize("case", sorted(CASES))
def test_package_matches_direct_reference(case, second):
    ndim, layers = CASES[case]
    x1, x2 = INPUTS[ndim][0], _second_input(ndim, second)
    expected = reference_kernels(layers, x1, x2)
    kernels = build(layers, ndim).kernel(x1, x2, get=("nngp", "ntk"))
    for kind in ("nngp", "ntk"):
        error = relative_error(kernels[kind], expected[kind])
        assert error < RTOL_REFERENCE, f"{case} {second} {kind}: relative error {error:.3e}"


@pytest.mark.parametrize("case", ["conv3-same-s2", "pool3-s2-same", "conv1d-residual"])
def test_tensor_inputs_and_single_get(case):
    """Tensor inputs give the same kernels as arrays; ``get="ntk"`` returns one tensor."""
    ndim, layers = CASES[case]
    x1, x2 = INPUTS[ndim]
    net = build(layers, ndim)
    ntk = net.kernel(torch.from_numpy(x1), torch.from_numpy(x2), get="ntk")
    assert isinstance(ntk, torch.Tensor) and ntk.dtype == torch.float64
    error = relative_error(ntk, reference_kernels(layers, x1, x2)["ntk"])
    assert error < RTOL_REFERENCE, f"{case}: relative error {error:.3e}"


# ------------------------------------------------------------- spatial paths agree
NO_POOLING = [name for name, (_, layers) in CASES.items() if isinstance(layers[-2], Flatten)
              and not any(isinstance(layer, Pool) for layer in layers)]


@pytest.mark.parametrize("second", SECOND)
@pytest.mark.parametrize("case", NO_POOLING)
def test_spatial_paths_agree_without_pooling(case, second):
    ndim, layers = CASES[case]
    x1, x2 = INPUTS[ndim][0], _second_input(ndim, second)
    net = build(layers, ndim)
    full = net.kernel(x1, x2, get=("nngp", "ntk"), spatial="full")
    diagonal = net.kernel(x1, x2, get=("nngp", "ntk"), spatial="diagonal")
    default = net.kernel(x1, x2, get=("nngp", "ntk"))
    expected = reference_kernels(layers, x1, x2)
    for kind in ("nngp", "ntk"):
        assert relative_error(full[kind], expected[kind]) < RTOL_REFERENCE, kind
        for name, other in (("diagonal", diagonal), ("default", default)):
            error = relative_error(other[kind], full[kind].numpy())
            assert error < RTOL_SPATIAL, f"{case} {second} {kind} {name}: {error:.3e}"


def test_no_pooling_cases_cover_both_dimensions_and_residuals():
    """The spatial-path test runs on enough architectures to be meaningful."""
    assert len(NO_POOLING) >= 10
    assert any(CASES[name][0] == 1 for name in NO_POOLING)
    assert any(any(isinstance(layer, Res) for layer in CASES[name][1]) for name in NO_POOLING)
