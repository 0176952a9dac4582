"""Fully connected layer: finite forward and kernel rule side by side."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inputs import check_hyperparameter, check_positive_int, scale_value
from ..kernel import Kernel
from ..requirements import WeightIdentity
from .base import KernelState, Layer, Shape, single_kernel, single_shape, standard_normal

PARAMETERIZATIONS = ("ntk", "standard")


def check_parameterization(value: object) -> str:
    if value not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be 'ntk' or 'standard', got {value!r}")
    return value


class WeightedLayer(Layer):
    """A layer with fresh weights and biases: the shared set-up and kernel rule of
    :class:`Linear` and the convolutions.

    NTK parameterization (default): ``f = (W_std / sqrt(fan_in)) W x + b_std b`` with
    ``W, b`` standard normal, trained at the same rate. Kernel rule (Jacot et al. 2018;
    Lee et al. 2018), with ``K`` the input kernel averaged over the ``fan_in`` inputs of
    one unit (a convolution averages over its filter offsets)::

        K' = W_std^2 K + b_std^2
        T' = W_std^2 T + K'

    Standard parameterization (Sohl-Dickstein et al. 2020, "On the infinite width
    limit of neural networks with a standard parameterization", as Neural Tangents):
    ``f = W x + b`` with ``W ~ N(0, W_std^2 / fan_in)``, ``b ~ N(0, b_std^2)``; the NNGP
    is the same and the NTK is ``T' = fan_in K + [bias] + W_std^2 T``, where ``fan_in``
    comes from the declared widths. ``b_std=None`` or ``0``: no bias parameter.
    """

    def __init__(
        self,
        width: int,
        W_std: float | torch.Tensor = 1.0,
        b_std: float | torch.Tensor | None = None,
        parameterization: str = "ntk",
    ) -> None:
        self.width = check_positive_int(width, "width")
        self.W_std = check_hyperparameter(W_std, "W_std", nonnegative=True)
        b_std = None if b_std is None else check_hyperparameter(b_std, "b_std", nonnegative=True)
        # a plain 0 means no bias; a tensor stays (its gradient is asked for, even at 0)
        self.b_std = None if isinstance(b_std, float) and b_std == 0 else b_std
        self.parameterization = check_parameterization(parameterization)

    width_argument = "width"

    def uses_declared_widths(self) -> bool:
        return self.parameterization == "standard"

    def affine_rule(
        self, averaged: Kernel, fan_in: int, weights: WeightIdentity | None = None
    ) -> Kernel:
        """The output kernel from the input kernel ``averaged`` over one unit's inputs.

        ``weights``: the identity of the weights applied (a fresh one by default: every
        application of a layer draws its own weights, as its finite twin does); an
        application that reuses an identity uses the same weights (tied).
        """
        w2, b2 = self.W_std**2, (self.b_std or 0.0) ** 2
        out = averaged.map_moments(lambda m: torch.mul(m, w2).add_(b2))
        ntk = averaged.ntk
        if ntk is not None:
            if self.parameterization == "ntk":
                # (alpha= takes only a number: a tensor W_std multiplies)
                ntk = (out.nngp + w2 * ntk if isinstance(w2, torch.Tensor)
                       else torch.add(out.nngp, ntk, alpha=w2))
            else:
                ntk = fan_in * averaged.nngp + (1.0 if self.b_std else 0.0) + w2 * ntk
        return out.replace(
            ntk=ntk, width=self.width, is_gaussian=True,
            sources=frozenset({weights or WeightIdentity()})
        )


class Linear(WeightedLayer):
    r"""A fully connected layer of ``width`` outputs on ``(N, features)`` representations.

    Kernel rule: :class:`~widenets.layers.dense.WeightedLayer` with ``fan_in`` the input
    width. Images need
    ``Flatten()`` or ``GlobalAvgPool()`` first (or a convolution with ``kernel_size=1``).
    """

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if k.layout.sizes:
            raise ValueError(_SPATIAL_INPUT_MESSAGE.format(len(k.layout.sizes)))
        return self.affine_rule(k, fan_in=k.width)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        if len(shape) != 1:
            raise ValueError(_SPATIAL_INPUT_MESSAGE.format(len(shape) - 1))
        module = FiniteLinear(shape[0], self.width, float(self.W_std), scale_value(self.b_std),
                              self.parameterization, generator)
        return module, (self.width,)


_SPATIAL_INPUT_MESSAGE = (
    "Linear needs (N, features) inputs, got a representation with {} spatial axes; put "
    "Flatten() or GlobalAvgPool() before it, or use a convolution with kernel_size=1"
)


class WeightedModule(nn.Module):
    """Finite weights and bias of a :class:`~widenets.layers.dense.WeightedLayer`, in its
    parameterization.

    ``weight`` has shape ``weight_shape`` and ``fan_in`` inputs per unit; the forward
    uses ``weight_scale * weight`` and ``bias_scale * bias``.
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        fan_in: int,
        W_std: float,
        b_std: float | None,
        parameterization: str,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        self.fan_in, self.parameterization = fan_in, parameterization
        weight = standard_normal(weight_shape, generator)
        bias = standard_normal(weight_shape[:1], generator) if b_std else None
        if parameterization == "ntk":
            self.weight_scale, self.bias_scale = W_std / math.sqrt(fan_in), b_std
        else:
            weight *= W_std / math.sqrt(fan_in)
            bias = None if bias is None or b_std is None else bias * b_std
            self.weight_scale, self.bias_scale = 1.0, 1.0
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def scaled_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.bias_scale is None:  # a bias has a scale
            return None
        return self.bias_scale * self.bias


class FiniteLinear(WeightedModule):
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
        super().__init__((width, fan_in), fan_in, W_std, b_std, parameterization, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.weight_scale * (x @ self.weight.T)
        bias = self.scaled_bias()
        return out if bias is None else out + bias
