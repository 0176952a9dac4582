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
from ..side_inputs import current_mask
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
        if k.has_masks:
            raise ValueError(
                f"{type(self).__name__} changes the positions, which masks cannot follow; "
                "with masks, pool with GlobalAvgPool (over the real positions)"
            )
        pads = window_paddings(self, k.layout.sizes)

        def pool(moment: torch.Tensor) -> torch.Tensor:
            for dim, pad in enumerate(pads):
                for axis in k.layout.axes(dim):
                    moment = padded_window_mean(moment, (axis,), self.kernel_size[dim],
                                                self.stride[dim], pad)
            return moment

        return k.map_linear(pool).replace(layout=Layout(tuple(p.out for p in pads), True))

    def takes_pair_list(self) -> bool:
        return self.own_rule(AvgPool)  # (sums over the spatial axes)

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
    two images' spatial means (Novak et al. 2019, Arora et al. 2019). With masks the
    means run over real positions only: ``K' = sum_{p, p'} K[p, p'] / (n1 n2)`` with
    ``n1``, ``n2`` the real positions of the two inputs (masked entries are 0), as Neural
    Tangents' masked pooling; the twin divides by the same counts.
    """

    needs = Needs(full_covariance=True)

    def takes_pair_list(self) -> bool:
        return self.own_rule(GlobalAvgPool)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        _check_spatial(len(k.layout.sizes), self)
        axes = tuple(range(-k.layout.ndim, 0))
        count1, count2 = (real_positions(mask, var, k.layout.sizes)
                          for mask, var in ((k.mask1, k.var1), (k.second_mask, k.var2_or_var1)))
        pair_counts = k.pair_counts(count1, count2)
        position_axes = tuple(range(1, 1 + len(k.layout.sizes)))

        def pooled(m: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
            return m.sum(dim=axes) / counts

        def pooled_mean(mean: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor | None:
            # (masked positions have mean 0: Kernel.masked)
            return None if mean is None else mean.sum(dim=position_axes) / counts

        return k.replace(
            nngp=pooled(k.nngp, pair_counts),
            ntk=None if k.ntk is None else pooled(k.ntk, pair_counts),
            var1=pooled(k.var1, count1 * count1),
            var2=None if k.var2 is None else pooled(k.var2, count2 * count2),
            layout=DENSE, mask1=None, mask2=None, adjacency1=None, adjacency2=None,
            mean1=pooled_mean(k.mean1, count1), mean2=pooled_mean(k.mean2, count2),
        )

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        _check_spatial(len(shape) - 1, self)
        return FiniteGlobalAvgPool(), (shape[0],)


def real_positions(mask: torch.Tensor | None, like: torch.Tensor, sizes: tuple[int, ...]
                   ) -> torch.Tensor:
    """The number of real positions of each example of a moment ``like`` (batch first):
    ``mask``'s, or all ``prod(sizes)`` without one; in ``like``'s dtype."""
    if mask is None:
        return torch.full((like.shape[0],), float(math.prod(sizes)), dtype=like.dtype,
                          device=like.device)
    return mask.flatten(1).sum(dim=1).to(like.dtype)


class FiniteGlobalAvgPool(nn.Module):
    """The finite twin of :class:`GlobalAvgPool` (the mean over real positions when the
    network is called with a mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axes = tuple(range(2, x.ndim))
        mask = current_mask(x)
        if mask is None:
            return x.mean(dim=axes)
        real = mask.unsqueeze(1).to(x.dtype)
        return (x * real).sum(dim=axes) / real.sum(dim=axes)


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
        # masked positions are zero features of the flattened vector (as Neural Tangents)
        return flat.replace(layout=DENSE, width=k.width * math.prod(layout.sizes),
                            mask1=None, mask2=None, adjacency1=None, adjacency2=None)

    def takes_pair_list(self) -> bool:
        return self.own_rule(Flatten)  # (the equal positions of each pair)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        return FiniteFlatten(), (math.prod(shape),)


class FiniteFlatten(nn.Module):
    """The finite twin of :class:`Flatten`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)
