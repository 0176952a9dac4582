"""Layer normalization (no affine parameters): finite forward and kernel rule side by side."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..inputs import check_hyperparameter, scale_value
from ..requirements import Needs
from .base import KernelState, Layer, Shape, single_kernel, single_shape


class LayerNorm(Layer):
    r"""Normalise each example over its features (over the channels at each position, for
    images): ``(h - mean(h)) / sqrt(var(h) + eps)``.

    For a centred Gaussian input the feature mean tends to 0 and the feature variance
    to ``K(x, x)``, so in the limit (as in Neural Tangents' ``LayerNorm``)::

        K'(x, x') = K(x, x') / sqrt((K(x, x) + eps) (K(x', x') + eps))
        T'(x, x') = T(x, x') / sqrt((K(x, x) + eps) (K(x', x') + eps))

    (for images, per pair of positions ``p, p'`` with ``K(x, x)[p, p]`` and
    ``K(x', x')[p', p']``).
    The input must be Gaussian (after a weighted layer): after a nonlinearity the
    features have a non-zero mean that the kernel alone does not determine.
    A zero input maps to zero, in the finite twin and in the kernel.
    """

    def __init__(self, eps: float | torch.Tensor = 1e-12) -> None:
        self.eps = check_hyperparameter(eps, "eps", nonnegative=True)

    needs = Needs(gaussian_input=True)
    gaussian_input_advice = (
        "a centred Gaussian input: put it after a Linear layer (the feature mean of raw "
        "inputs or of activations is not determined by the kernel)"
    )

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        positions = k.layout.positions
        scale1 = _inverse_std(positions(k.var1), self.eps)
        scale2 = None if k.var2 is None else _inverse_std(positions(k.var2), self.eps)
        first, second = k.pair_broadcast(scale1, scale1 if scale2 is None else scale2)
        outer = first * second

        def self_normalised(var: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return var * k.layout.as_first(scale) * k.layout.as_second(scale)

        var1 = self_normalised(k.var1, scale1)
        nngp = k.nngp * outer
        if k.symmetric:
            k.write_self_entries(nngp, var1)
        return k.replace(
            nngp=nngp,
            ntk=None if k.ntk is None else k.ntk * outer,
            var1=var1,
            var2=None if k.var2 is None or scale2 is None else self_normalised(k.var2, scale2),
        )

    def takes_pair_list(self) -> bool:
        return self.own_rule(LayerNorm)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return FiniteLayerNorm(cast(float, scale_value(self.eps))), single_shape(input_shape, self)


def _inverse_std(var: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(var + eps)``, and 0 where ``var + eps`` is 0 (a zero input stays zero)."""
    total = var + eps
    positive = total > 0
    return torch.where(positive, torch.rsqrt(torch.where(positive, total, 1.0)), 0.0)


class FiniteLayerNorm(nn.Module):
    """The finite twin of :class:`LayerNorm`, over the feature axis (axis 1)."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=1, keepdim=True)
        var = (centred * centred).mean(dim=1, keepdim=True)
        return centred * _inverse_std(var, self.eps)
