"""Convolutions: finite forward and kernel rule side by side (CNN-GP and convolutional NTK)."""

from __future__ import annotations

import math
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..inputs import scale_value
from ..kernel import Layout
from ..spatial import PADDINGS, AxisPadding, pad_images, padded_window_mean, padding
from .base import KernelState, Shape, single_kernel, single_shape
from .dense import WeightedLayer, WeightedModule


def check_window(value: object, ndim: int, name: str) -> tuple[int, ...]:
    """An int or a tuple of ``ndim`` positive ints, as a tuple of ``ndim`` ints."""
    values = (value,) * ndim if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(values, tuple)
        or len(values) != ndim
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    ):
        raise ValueError(
            f"{name} must be a positive integer or a tuple of {ndim} positive integers, "
            f"got {value!r}"
        )
    return values


def check_padding(value: object) -> str:
    if value not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {value!r}")
    return value


class Windowed(Protocol):
    """A layer that slides a window over the positions: a convolution or a pooling."""

    ndim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: str


def window_dilation(layer: Windowed) -> tuple[int, ...]:
    """The spacing of a windowed layer's taps along each axis: a convolution's
    ``dilation``, ones for a pooling (whose windows are contiguous)."""
    dilation: tuple[int, ...] = getattr(layer, "dilation", (1,) * layer.ndim)
    return dilation


def window_paddings(layer: Windowed, sizes: tuple[int, ...]) -> list[AxisPadding]:
    """The padding of each spatial axis of inputs of ``sizes`` for a windowed layer (a
    convolution or a pooling: its ``ndim``, ``kernel_size``, ``stride``, ``padding`` and,
    for a convolution, ``dilation``: the amounts use the effective window), after
    checking the number of spatial axes."""
    owner = type(layer).__name__
    if len(sizes) != layer.ndim:
        layout = ("L", "H, W", "D, H, W")[layer.ndim - 1]
        raise ValueError(
            f"{owner} needs inputs (N, C, {layout}) with {layer.ndim} spatial axes, got a "
            f"representation with {len(sizes)} spatial axes"
        )
    return [padding(n, w, s, layer.padding, owner, axis, d)
            for axis, (n, w, s, d) in enumerate(
                zip(sizes, layer.kernel_size, layer.stride, window_dilation(layer)))]


class Conv(WeightedLayer):
    r"""A convolution over ``ndim`` spatial axes with ``channels`` output channels.

    Inputs ``(N, C, *sizes)``; weights ``(channels, C, *kernel_size)``;
    ``fan_in = C * prod(kernel_size)``. ``padding`` is ``"valid"``, ``"same"`` or
    ``"circular"`` (see ``widenets.spatial``). ``dilation`` (an int or a tuple of
    ``ndim`` positive ints, default 1, as ``torch.nn.Conv2d``'s) spaces the filter taps
    ``dilation`` apart: the filter spans the effective window ``dilation * (kernel_size
    - 1) + 1`` positions, which sets the output sizes and the padding amounts, while
    ``fan_in`` still counts the taps. It is the last argument so that calls passing
    ``W_std`` positionally keep their meaning.

    Kernel rule (Novak et al. 2019, "Bayesian deep convolutional networks with many
    channels are Gaussian processes"; Arora et al. 2019, "On exact computation with an
    infinitely wide neural net"): a unit at output position ``i`` sees the inputs at
    ``s i + d o`` for the filter taps ``o < kernel_size`` (stride ``s``, dilation ``d``,
    positions of the padded input), and the same weights serve every position, so for
    two images the input kernel averaged over one unit's inputs is
    ``A[i, i'] = mean_o K[s i + d o, s i' + d o]`` (padded positions are zeros, or
    wrapped around; the mean divides by the number of taps), and then
    :class:`~widenets.layers.dense.WeightedLayer`'s rule applies. The mean is separable
    over the spatial axes and maps the diagonal ``i = i'`` to itself, so the diagonal
    layout needs only the diagonal.
    """

    ndim = 2

    def __init__(
        self,
        channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: str = "valid",
        W_std: float | torch.Tensor = 1.0,
        b_std: float | torch.Tensor | None = None,
        parameterization: str = "ntk",
        dilation: int | tuple[int, ...] = 1,
    ) -> None:
        super().__init__(channels, W_std, b_std, parameterization)
        self.kernel_size = check_window(kernel_size, self.ndim, "kernel_size")
        self.stride = check_window(stride, self.ndim, "stride")
        self.padding = check_padding(padding)
        self.dilation = check_window(dilation, self.ndim, "dilation")

    def spec_arguments(self) -> dict[str, object]:
        arguments = super().spec_arguments()
        if all(d == 1 for d in self.dilation):  # plain layers: specs, stores as they were
            del arguments["dilation"]
        return arguments

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if k.has_masks:
            self._check_keeps_positions()
        pads = window_paddings(self, k.layout.sizes)

        def filter_mean(moment: torch.Tensor) -> torch.Tensor:
            for dim, pad in enumerate(pads):
                moment = padded_window_mean(moment, k.layout.axes(dim), self.kernel_size[dim],
                                            self.stride[dim], pad, self.dilation[dim])
            return moment

        averaged = k.map_linear(filter_mean).replace(
            layout=Layout(tuple(pad.out for pad in pads), k.layout.paired)
        )
        return self.affine_rule(averaged, fan_in=k.width * math.prod(self.kernel_size))

    def takes_pair_list(self) -> bool:
        return self.own_rule(Conv)  # (sums over the spatial axes)

    def _check_keeps_positions(self) -> None:
        """Masks follow a convolution that keeps every position in place: stride 1 and a
        one-tap filter or zero padding ``"same"`` (which reads masked positions as the
        zeros past the end of a sequence)."""
        one_tap = all(size == 1 for size in self.kernel_size)
        if any(s != 1 for s in self.stride) or not (one_tap or self.padding == "same"):
            raise ValueError(
                f"{type(self).__name__} with masks needs stride 1 and padding='same' (or "
                "kernel_size 1): other strides and paddings move positions, and circular "
                "padding would wrap real positions onto padding"
            )

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        pads = window_paddings(self, shape[1:])
        module = FiniteConv(self, shape[0], generator)
        return module, (self.width, *(pad.out for pad in pads))

    width_argument = "channels"

    @property
    def channels(self) -> int:
        """The output channels: the convolution's width."""
        return self.width


class Conv1d(Conv):
    """A 1-D convolution, inputs ``(N, C, L)``: see :class:`~widenets.layers.conv.Conv`."""

    ndim = 1


class Conv2d(Conv):
    """A 2-D convolution, inputs ``(N, C, H, W)``: see :class:`~widenets.layers.conv.Conv`."""

    ndim = 2


class Conv3d(Conv):
    """A 3-D convolution, inputs ``(N, C, D, H, W)``: see :class:`~widenets.layers.conv.Conv`."""

    ndim = 3


_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class FiniteConv(WeightedModule):
    """The finite twin of :class:`~widenets.layers.conv.Conv`, padding as its kernel rule does."""

    def __init__(self, layer: Conv, in_channels: int, generator: torch.Generator | None) -> None:
        fan_in = in_channels * math.prod(layer.kernel_size)
        super().__init__((layer.width, in_channels, *layer.kernel_size), fan_in,
                         cast(float, scale_value(layer.W_std)), scale_value(layer.b_std),
                         layer.parameterization,
                         generator)
        self.layer, self.in_channels = layer, in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self.layer).__name__
        if x.ndim != self.layer.ndim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects inputs (N, {self.in_channels}, ...) with "
                f"{self.layer.ndim} spatial axes, got shape {tuple(x.shape)}"
            )
        convolve = _CONVOLUTIONS[self.layer.ndim]
        return convolve(self.pad(x), self.weight_scale * self.weight, self.scaled_bias(),
                        stride=self.layer.stride, dilation=self.layer.dilation)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(N, C, *S)`` padded as the kernel rule pads them (before the filter)."""
        return pad_images(x, window_paddings(self.layer, tuple(x.shape[2:])))

    def extra_repr(self) -> str:
        return repr(self.layer)
