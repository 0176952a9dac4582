"""Fully connected layer: finite forward and kernel rule side by side."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inputs import check_nonnegative, check_positive_int
from ..kernel import new_source
from .base import KernelState, Layer, Shape, single_kernel, single_shape, standard_normal

PARAMETERIZATIONS = ("ntk", "standard")


def check_parameterization(value: object) -> str:
    if value not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be 'ntk' or 'standard', got {value!r}")
    return value


class Linear(Layer):
    r"""A fully connected layer of ``width`` outputs over the last axis.

    NTK parameterization (default): ``f = (W_std / sqrt(fan_in)) W x + b_std b`` with
    ``W, b`` standard normal, trained at the same rate. Kernel rule (Jacot et al. 2018;
    Lee et al. 2018)::

        K' = W_std^2 K + b_std^2
        T' = W_std^2 T + K'

    Standard parameterization (Sohl-Dickstein et al. 2020, "On the infinite width
    limit of neural networks with a standard parameterization", as Neural Tangents):
    ``f = W x + b`` with ``W ~ N(0, W_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``; the NNGP
    is the same and the NTK is ``T' = fan_in K + [bias] + W_std^2 T``, where ``fan_in``
    is the declared width of the input. ``b_std=None`` or ``0``: no bias parameter.
    """

    def __init__(
        self,
        width: int,
        W_std: float = 1.0,
        b_std: float | None = None,
        parameterization: str = "ntk",
    ) -> None:
        self.width = check_positive_int(width, "width")
        self.W_std = check_nonnegative(W_std, "W_std")
        b_std = check_nonnegative(b_std, "b_std", allow_none=True)
        self.b_std = None if b_std == 0 else b_std
        self.parameterization = check_parameterization(parameterization)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        w2, b2 = self.W_std**2, (self.b_std or 0.0) ** 2
        out = k.map_moments(lambda m: w2 * m + b2)
        ntk = k.ntk
        if ntk is not None:
            if self.parameterization == "ntk":
                ntk = w2 * ntk + out.nngp
            else:
                ntk = k.width * k.nngp + (1.0 if self.b_std else 0.0) + w2 * ntk
        return out.replace(
            ntk=ntk, width=self.width, is_gaussian=True, sources=frozenset({new_source()})
        )

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        module = FiniteLinear(shape[-1], self.width, self.W_std, self.b_std,
                              self.parameterization, generator)
        return module, (*shape[:-1], self.width)


class FiniteLinear(nn.Module):
    """The finite twin of :class:`Linear`: a dense layer in NTK or standard parameterization."""

    def __init__(
        self,
        fan_in: int,
        width: int,
        W_std: float,
        b_std: float | None,
        parameterization: str,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        self.fan_in, self.parameterization = fan_in, parameterization
        weight = standard_normal((width, fan_in), generator)
        bias = standard_normal((width,), generator) if b_std else None
        if parameterization == "ntk":
            self.weight_scale, self.bias_scale = W_std / math.sqrt(fan_in), b_std
        else:
            weight *= W_std / math.sqrt(fan_in)
            bias = None if bias is None else bias * b_std
            self.weight_scale, self.bias_scale = 1.0, 1.0
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight_scale * (x @ self.weight.T)
        if self.bias is not None:
            out = out + self.bias_scale * self.bias
        return out
