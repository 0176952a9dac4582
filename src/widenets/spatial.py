"""Padding and sliding windows along one spatial axis, for finite layers and kernel rules.

The finite convolutions and poolings pad their input with :func:`pad_axis`, and their
kernel rules pad the kernel moments with the same function and amounts
(:func:`padding`), so the finite twin and the infinite-width kernel agree by
construction. Conventions (as TensorFlow, JAX and Neural Tangents; PyTorch's
``padding="same"`` for stride 1):

* ``"valid"``: no padding, ``out = (size - window) // stride + 1``;
* ``"same"``: ``out = ceil(size / stride)``, zeros added, ``total = max((out - 1) *
  stride + window - size, 0)`` split as ``total // 2`` before and the rest after;
* ``"circular"``: the amounts of ``"same"``, filled by wrapping around (periodic images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .paths import fast_paths_enabled

PADDINGS = ("valid", "same", "circular")


@dataclass(frozen=True)
class AxisPadding:
    """Padding of one axis: amounts before and after, wrap-around or zeros, output size."""

    before: int
    after: int
    circular: bool
    out: int


def padding(size: int, window: int, stride: int, mode: str, owner: str, axis: int) -> AxisPadding:
    """The padding of an axis of ``size`` for a ``window`` moved by ``stride``.

    Raises ``ValueError`` (naming ``owner`` and the axis) when a ``"valid"`` window does
    not fit in the input.
    """
    if mode == "valid":
        if size < window:
            raise ValueError(
                f"{owner}: the input has size {size} along spatial axis {axis}, smaller "
                f"than the window ({window}) with padding='valid'; use padding='same' or "
                "larger inputs"
            )
        return AxisPadding(0, 0, False, (size - window) // stride + 1)
    out = -(-size // stride)
    total = max((out - 1) * stride + window - size, 0)
    return AxisPadding(total // 2, total - total // 2, mode == "circular", out)


def pad_axis(t: torch.Tensor, dim: int, pad: AxisPadding) -> torch.Tensor:
    """``t`` padded along ``dim`` with zeros, or by wrapping around if ``pad.circular``."""
    if pad.before == 0 and pad.after == 0:
        return t
    if pad.circular:
        size = t.shape[dim]
        index = torch.arange(-pad.before, size + pad.after, device=t.device) % size
        return t.index_select(dim, index)
    dim = dim % t.ndim
    widths = [0, 0] * (t.ndim - 1 - dim) + [pad.before, pad.after]
    return F.pad(t, widths)


def pad_images(x: torch.Tensor, pads: list[AxisPadding]) -> torch.Tensor:
    """A batch ``(N, C, *sizes)`` padded along each spatial axis by its ``AxisPadding``."""
    for dim, pad in enumerate(pads):
        x = pad_axis(x, 2 + dim, pad)
    return x


def _window_slice(t: torch.Tensor, dims: tuple[int, ...], offset: int, stride: int, out: int):
    index = [slice(None)] * t.ndim
    for dim in dims:
        index[dim] = slice(offset, offset + stride * (out - 1) + 1, stride)
    return t[tuple(index)]


def window_mean(
    t: torch.Tensor, dims: tuple[int, ...], window: int, stride: int, out: int
) -> torch.Tensor:
    """``mean_{o < window} t[..., stride * i + o, ...]`` with the same offset ``o`` on all ``dims``.

    With one axis this is average pooling (already padded input). With the two axes of
    a pair of positions it is the shared-filter sum of a convolution's kernel rule,
    ``K'[i, i'] = mean_o K[s i + o, s i' + o]``: the weights at offset ``o`` meet the
    pixel ``s i + o`` of one image and ``s i' + o`` of the other.
    """
    total = _window_slice(t, dims, 0, stride, out).clone()
    for offset in range(1, window):
        total += _window_slice(t, dims, offset, stride, out)
    return total / window


def padded_window_mean(
    t: torch.Tensor, dims: tuple[int, ...], window: int, stride: int, pad: AxisPadding
) -> torch.Tensor:
    """:func:`window_mean` of ``t`` padded along each of ``dims`` by ``pad``.

    The fast path (zero padding) never builds the padded tensor: for each offset it adds
    the slice of ``t`` that meets real pixels into the matching slice of the output,
    since padded zeros add nothing. Circular padding, and the straightforward path, pad
    with :func:`pad_axis` and then take :func:`window_mean`.
    """
    if pad.circular or not fast_paths_enabled():
        for dim in dims:
            t = pad_axis(t, dim, pad)
        return window_mean(t, dims, window, stride, pad.out)
    size = t.shape[dims[0]]
    shape = list(t.shape)
    for dim in dims:
        shape[dim] = pad.out
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    for offset in range(window):
        # output i reads input stride * i + offset - pad.before, where it lies in [0, size)
        shift = offset - pad.before
        first = max(0, -(shift // stride))
        last = min(pad.out - 1, (size - 1 - shift) // stride)
        if last < first:
            continue
        start = stride * first + shift
        target, source = [slice(None)] * t.ndim, [slice(None)] * t.ndim
        for dim in dims:
            target[dim] = slice(first, last + 1)
            source[dim] = slice(start, start + stride * (last - first) + 1, stride)
        out[tuple(target)].add_(t[tuple(source)], alpha=1.0 / window)
    return out
