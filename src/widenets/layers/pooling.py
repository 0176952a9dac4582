"""Average pooling, global average pooling and flattening: finite forward and kernel rule.

Pooling mixes positions with independent offsets in the two images, so its kernel
rule needs the full spatial covariance (the paired layout); ``Flatten`` followed by a
weighted layer needs only equal positions (the diagonal). Pooling layers declare it
(``needs = Needs(full_covariance=True)``) and the engine chooses the layout from the
declarations of all layers (:mod:`widenets.requirements`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernel import DENSE, Layout
from ..requirements import Needs
from ..spatial import pad_images, padded_window_mean
from .base import KernelState, Layer, Shape, single_kernel, single_shape
from .conv import check_padding, check_window, window_paddings


class AvgPool(Layer):
    r"""Average pooling over ``ndim`` spatial axes (windows ``kernel_size``, moved by
    ``stride``, default ``kernel_size``); ``padding`` ``"valid"`` (default), ``"same"``
    (zeros, counted in the mean as PyTorch's ``count_include_pad=True``) or ``"circular"``.

    Kernel rule: a linear map applied to each image separately, so
    ``K'[i, i'] = mean_o mean_o' K[s i + o, s i' + o']`` (likewise ``T``), separable
    over the axes of each image (Novak et al. 2019).
    """

    ndim = 2
    needs = Needs(full_covariance=True)

    def __init__(
        self,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] | None = None,
        padding: str = "valid",
    ) -> None:
        self.kernel_size = check_window(kernel_size, self.ndim, "kernel_size")
        self.stride = self.kernel_size if stride is None else check_window(
            stride, self.ndim, "stride")
        self.padding = check_padding(padding)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        pads = window_paddings(self, k.layout.sizes)

        def pool(moment: torch.Tensor) -> torch.Tensor:
            for dim, pad in enumerate(pads):
                for axis in k.layout.axes(dim):
                    moment = padded_window_mean(moment, (axis,), self.kernel_size[dim],
                                                self.stride[dim], pad)
            return moment

        return k.map_linear(pool).replace(layout=Layout(tuple(p.out for p in pads), True))

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        pads = window_paddings(self, shape[1:])
        return FiniteAvgPool(self), (shape[0], *(pad.out for pad in pads))


class AvgPool1d(AvgPool):
    """Average pooling of ``(N, C, L)`` inputs: see :class:`~widenets.layers.pooling.AvgPool`."""

    ndim = 1


class AvgPool2d(AvgPool):
    """Average pooling of ``(N, C, H, W)`` inputs: see :class:`~widenets.layers.pooling.AvgPool`."""

    ndim = 2


class AvgPool3d(AvgPool):
    """Average pooling of ``(N, C, D, H, W)`` inputs: see
    :class:`~widenets.layers.pooling.AvgPool`."""

    ndim = 3


_POOLINGS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


class FiniteAvgPool(nn.Module):
    """The finite twin of :class:`~widenets.layers.pooling.AvgPool`, padding as its kernel
    rule does."""

    def __init__(self, layer: AvgPool) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_images(x, window_paddings(self.layer, tuple(x.shape[2:])))
        pool = _POOLINGS[self.layer.ndim]
        return pool(x, self.layer.kernel_size, self.layer.stride)

    def extra_repr(self) -> str:
        return repr(self.layer)


def _check_spatial(spatial_axes: int, layer: Layer) -> None:
    if spatial_axes == 0:
        raise ValueError(
            f"{type(layer).__name__} needs spatial inputs (N, C, ...), got (N, features)"
        )


class GlobalAvgPool(Layer):
    r"""The mean over all positions: ``(N, C, *sizes) -> (N, C)``.

    Kernel rule: ``K' = mean_{p, p'} K[p, p']`` (likewise ``T``), the covariance of the
    two images' spatial means (Novak et al. 2019, Arora et al. 2019).
    """

    needs = Needs(full_covariance=True)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        _check_spatial(len(k.layout.sizes), self)
        axes = tuple(range(-k.layout.ndim, 0))
        return k.map_linear(lambda m: m.mean(dim=axes)).replace(layout=DENSE)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        _check_spatial(len(shape) - 1, self)
        return FiniteGlobalAvgPool(), (shape[0],)


class FiniteGlobalAvgPool(nn.Module):
    """The finite twin of :class:`GlobalAvgPool`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=tuple(range(2, x.ndim)))


class Flatten(Layer):
    r"""``(N, C, *sizes) -> (N, C * prod(sizes))``, as ``torch.flatten(x, 1)``.

    Kernel rule: a weighted layer after ``Flatten`` averages its input kernel over the
    ``C * P`` features, which pairs each position only with itself:
    ``K' = mean_p K[p, p]`` (likewise ``T``); the width becomes ``C * P``. Only the
    diagonal of the spatial covariance is needed (Novak et al. 2019).
    """

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if not k.layout.sizes:
            return k
        layout = k.layout
        axes = tuple(range(-len(layout.sizes), 0))
        flat = k.map_linear(lambda m: layout.positions(m).mean(dim=axes))
        return flat.replace(layout=DENSE, width=k.width * math.prod(layout.sizes))

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        return FiniteFlatten(), (math.prod(shape),)


class FiniteFlatten(nn.Module):
    """The finite twin of :class:`Flatten`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)
