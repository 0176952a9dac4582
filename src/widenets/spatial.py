"""Padding and sliding windows along one spatial axis, for finite layers and kernel rules.

The finite convolutions and poolings pad their input with :func:`pad_axis`, and their
kernel rules pad the kernel moments with the same function and amounts
(:func:`padding`), so the finite twin and the infinite-width kernel agree by
construction. A window of ``window`` taps with ``dilation`` (a convolution's filter; 1
for a pooling) reads the positions ``stride * i + dilation * o`` of the padded input for
``o < window``, so it spans the *effective window* ``dilation * (window - 1) + 1``
positions, and the amounts below use that span. Conventions (as TensorFlow, JAX and
Neural Tangents; PyTorch's ``padding="same"`` for stride 1):

* ``"valid"``: no padding, ``out = (size - effective) // stride + 1``;
* ``"same"``: ``out = ceil(size / stride)``, zeros added, ``total = max((out - 1) *
  stride + effective - size, 0)`` split as ``total // 2`` before and the rest after;
* ``"circular"``: the amounts of ``"same"``, filled by wrapping around (periodic images;
  an amount larger than the input wraps around more than once).

The window mean divides by the number of taps ``window``, whatever the dilation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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


def effective_window(window: int, dilation: int = 1) -> int:
    """The number of positions spanned by ``window`` taps ``dilation`` apart."""
    return dilation * (window - 1) + 1


def padding(size: int, window: int, stride: int, mode: str, owner: str, axis: int,
            dilation: int = 1) -> AxisPadding:
    """The padding of an axis of ``size`` for a ``window`` of taps ``dilation`` apart,
    moved by ``stride`` (the amounts use the effective window, see the module docstring).

    Raises ``ValueError`` (naming ``owner`` and the axis) when a ``"valid"`` window does
    not fit in the input.
    """
    span = effective_window(window, dilation)
    if mode == "valid":
        if size < span:
            described = (f"the window ({window})" if dilation == 1 else
                         f"the effective window ({span} = dilation {dilation} x "
                         f"(kernel_size {window} - 1) + 1)")
            raise ValueError(
                f"{owner}: the input has size {size} along spatial axis {axis}, smaller "
                f"than {described} with padding='valid'; use padding='same' or "
                "larger inputs"
            )
        return AxisPadding(0, 0, False, (size - span) // stride + 1)
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
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
    t: torch.Tensor, dims: tuple[int, ...], window: int, stride: int, out: int,
    dilation: int = 1,
) -> torch.Tensor:
    """``mean_{o < window} t[..., stride * i + dilation * o, ...]`` with the same offset
    ``o`` on all ``dims``.

    With one axis this is average pooling (already padded input). With the two axes of
    a pair of positions it is the shared-filter sum of a convolution's kernel rule,
    ``K'[i, i'] = mean_o K[s i + d o, s i' + d o]``: the weights of tap ``o`` meet the
    pixel ``s i + d o`` of one image and ``s i' + d o`` of the other.
    """
    total = _window_slice(t, dims, 0, stride, out).clone()
    for tap in range(1, window):
        total += _window_slice(t, dims, dilation * tap, stride, out)
    return total / window


def _shifted_slices(
    size: int, ndim: int, dims: tuple[int, ...], window: int, stride: int, pad: AxisPadding,
    dilation: int = 1,
) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """For each filter tap that meets real pixels, the slices ``(target, source)`` of
    the output and of the unpadded input with ``output[target] += input[source]``.

    At tap ``o``, output ``i`` reads input ``stride * i + dilation * o - pad.before``
    where that lies in ``[0, size)``; padded zeros add nothing, so they are skipped.
    """
    for tap in range(window):
        shift = dilation * tap - pad.before
        first = max(0, -(shift // stride))
        last = min(pad.out - 1, (size - 1 - shift) // stride)
        if last < first:
            continue
        start = stride * first + shift
        target, source = [slice(None)] * ndim, [slice(None)] * ndim
        for dim in dims:
            target[dim] = slice(first, last + 1)
            source[dim] = slice(start, start + stride * (last - first) + 1, stride)
        yield tuple(target), tuple(source)


def _sum_windows(
    t: torch.Tensor, dims: tuple[int, ...], window: int, stride: int, pad: AxisPadding,
    dilation: int = 1,
) -> torch.Tensor:
    """The zero-padded window mean of ``t`` by in-place additions of shifted slices."""
    shape = list(t.shape)
    for dim in dims:
        shape[dim] = pad.out
    slices = list(_shifted_slices(t.shape[dims[0]], t.ndim, dims, window, stride, pad,
                                  dilation))
    # start from an offset that every output sees, if there is one: no zeros to fill
    full = [(target, source) for target, source in slices
            if all(target[dim].stop - target[dim].start == pad.out for dim in dims)]
    if full:
        slices.remove(full[0])
        out = t[full[0][1]] * (1.0 / window)
    else:
        out = t.new_zeros(shape)
    for target, source in slices:
        out[target].add_(t[source], alpha=1.0 / window)
    return out


def _spread_windows(
    grad: torch.Tensor, size: int, dims: tuple[int, ...], window: int, stride: int,
    pad: AxisPadding, dilation: int = 1,
) -> torch.Tensor:
    """The adjoint of :func:`_sum_windows`: each output's value spread over its window."""
    shape = list(grad.shape)
    for dim in dims:
        shape[dim] = size
    out = grad.new_zeros(shape)
    for target, source in _shifted_slices(size, grad.ndim, dims, window, stride, pad,
                                          dilation):
        out[source].add_(grad[target], alpha=1.0 / window)
    return out


class WindowMean(torch.autograd.Function):
    """The zero-padded window mean as one autograd node whose backward is its adjoint
    (:class:`SpreadWindows`): slicing ``window`` shifted views under autograd would make
    each view's backward a full-size zero tensor."""

    generate_vmap_rule = True  # for torch.func.jacrev and vmap

    @staticmethod
    def forward(t: torch.Tensor, dims: tuple[int, ...], window: int, stride: int,
                pad: AxisPadding, dilation: int) -> torch.Tensor:
        """:func:`_sum_windows`."""
        with torch.no_grad():
            return _sum_windows(t, dims, window, stride, pad, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        """Keep the window's geometry (the backward needs no tensor)."""
        t, ctx.dims, ctx.window, ctx.stride, ctx.pad, ctx.dilation = inputs
        ctx.size = t.shape[ctx.dims[0]]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The adjoint, itself differentiable."""
        spread = SpreadWindows.apply(grad, ctx.size, ctx.dims, ctx.window, ctx.stride, ctx.pad,
                                     ctx.dilation)
        return spread, None, None, None, None, None


class SpreadWindows(torch.autograd.Function):
    """The adjoint of :class:`WindowMean`; its backward is :class:`WindowMean`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad: torch.Tensor, size: int, dims: tuple[int, ...], window: int,
                stride: int, pad: AxisPadding, dilation: int) -> torch.Tensor:
        """:func:`_spread_windows`."""
        with torch.no_grad():
            return _spread_windows(grad, size, dims, window, stride, pad, dilation)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        """Keep the window's geometry."""
        _, _, ctx.dims, ctx.window, ctx.stride, ctx.pad, ctx.dilation = inputs

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The window mean, the adjoint of the adjoint."""
        mean = WindowMean.apply(grad, ctx.dims, ctx.window, ctx.stride, ctx.pad, ctx.dilation)
        return mean, None, None, None, None, None, None


def padded_window_mean(
    t: torch.Tensor, dims: tuple[int, ...], window: int, stride: int, pad: AxisPadding,
    dilation: int = 1,
) -> torch.Tensor:
    """:func:`window_mean` of ``t`` padded along each of ``dims`` by ``pad``: the mean over
    ``window`` taps ``dilation`` apart (``pad`` computed by :func:`padding` with the same
    dilation).

    The fast path (zero padding) never builds the padded tensor: for each tap it adds
    the slice of ``t`` that meets real pixels into the matching slice of the output,
    since padded zeros add nothing. When autograd records ``t``, the same sums run as one
    node (:class:`WindowMean`) whose backward is their adjoint, after wrapping around
    for circular padding. The straightforward path pads with :func:`pad_axis` and then
    takes :func:`window_mean`.
    """
    if torch.is_grad_enabled() and t.requires_grad:
        if pad.circular:
            for dim in dims:
                t = pad_axis(t, dim, pad)
            pad = AxisPadding(0, 0, False, pad.out)
        return WindowMean.apply(t, dims, window, stride, pad, dilation)
    if pad.circular or not fast_paths_enabled():
        for dim in dims:
            t = pad_axis(t, dim, pad)
        return window_mean(t, dims, window, stride, pad.out, dilation)
    return _sum_windows(t, dims, window, stride, pad, dilation)
