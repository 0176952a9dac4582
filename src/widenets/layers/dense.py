"""Fully connected layer: finite forward and kernel rule side by side."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import numpy as np
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

    def weight_variance(self) -> float | torch.Tensor:
        """``W_std^2``: the variance of a weight times ``fan_in``."""
        return self.W_std**2

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
        w2, b2 = self.weight_variance(), (self.b_std or 0.0) ** 2
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

    Weighted input features, for a ``Linear`` that reads the raw inputs (the first layer,
    or the first of a branch): ``W_std`` a vector of ``d`` non-negative scales, one per
    input feature (automatic relevance determination), or ``W_cov`` a symmetric positive
    semi-definite ``(d, d)`` matrix: each unit's weight vector is drawn from
    ``N(0, W_cov / d)`` (NTK parameterization: ``W = L z / sqrt(d)`` with ``L L^T = W_cov``
    and ``z`` standard normal, trained), so ``W_cov = W_std^2 I`` is the plain layer and a
    vector ``W_std`` is ``W_cov = diag(W_std^2)``. The kernel rule is::

        K' = x W_cov x'^T / d + b_std^2,    T' = K'

    With ``Erf`` after it this is Williams (1997), "Computing with infinite networks",
    whose covariance of the augmented input ``(1, x)`` is ``diag(b_std^2, W_cov / d)``.
    Both may be tensors that require grad. Only the NTK parameterization is supported.
    """

    def __init__(
        self,
        width: int,
        W_std: float | torch.Tensor | Sequence[float] = 1.0,
        b_std: float | torch.Tensor | None = None,
        parameterization: str = "ntk",
        W_cov: torch.Tensor | Sequence[Sequence[float]] | None = None,
    ) -> None:
        feature_scales = as_feature_scales(W_std)
        scalar = 1.0 if feature_scales is not None else cast("float | torch.Tensor", W_std)
        super().__init__(width, scalar, b_std, parameterization)
        self.W_cov = None if W_cov is None else check_covariance(W_cov)
        if feature_scales is not None:
            self.W_std = feature_scales
        if self.W_cov is not None and (isinstance(self.W_std, torch.Tensor)
                                       or self.W_std != 1.0):
            raise ValueError("give W_std or W_cov, not both (W_cov = W_std^2 I is W_std)")
        if self.input_metric() is not None and self.parameterization != "ntk":
            raise ValueError(
                "a vector W_std or W_cov needs parameterization='ntk' (the standard "
                "parameterization of weighted input features is not supported)"
            )

    def spec_arguments(self) -> dict[str, object]:
        arguments = super().spec_arguments()
        if arguments["W_cov"] is None:  # specs (and stores) of plain layers stay as they were
            del arguments["W_cov"]
        return arguments

    def input_metric(self) -> torch.Tensor | None:
        """``M`` in ``x M x'^T / d``: the vector ``W_std^2`` (ARD), ``W_cov``, or ``None``
        for a plain layer (``W_std`` a number)."""
        if self.W_cov is not None:
            return self.W_cov
        if isinstance(self.W_std, torch.Tensor) and self.W_std.ndim == 1:
            return self.W_std**2
        return None

    def weight_variance(self) -> float | torch.Tensor:
        return 1.0 if self.input_metric() is not None else self.W_std**2

    def takes_pair_list(self) -> bool:
        # (weighted features read the raw inputs)
        return self.own_rule(Linear) and self.input_metric() is None

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if k.layout.sizes and not k.layout.items:
            raise ValueError(_SPATIAL_INPUT_MESSAGE.format(len(k.layout.sizes)))
        metric = self.input_metric()
        if metric is None:
            return self.affine_rule(k, fan_in=k.width)
        if k.raw_inputs is None:
            raise ValueError(
                "a Linear with a vector W_std or W_cov weighs the raw input features: it "
                "must read the inputs (be the first layer, or the first of a branch)"
            )
        x1, x2 = k.raw_inputs
        if metric.shape[0] != x1.shape[1]:
            raise ValueError(
                f"W_std or W_cov has {metric.shape[0]} features, the inputs have "
                f"{x1.shape[1]}"
            )
        metric = metric.to(dtype=x1.dtype, device=x1.device)
        weighted = Kernel.weighted_inputs(x1, x2, k.ntk is not None, metric)
        return self.affine_rule(weighted, fan_in=k.width)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        if len(shape) != 1:
            raise ValueError(_SPATIAL_INPUT_MESSAGE.format(len(shape) - 1))
        metric = self.input_metric()
        if metric is not None and metric.shape[0] != shape[0]:
            raise ValueError(
                f"W_std or W_cov has {metric.shape[0]} features, the inputs have {shape[0]}")
        W_std = 1.0 if metric is not None else cast(float, scale_value(self.W_std))
        module = FiniteLinear(shape[0], self.width, W_std, scale_value(self.b_std),
                              self.parameterization, generator,
                              None if metric is None else covariance_root(metric))
        return module, (self.width,)


def as_feature_scales(value: object) -> torch.Tensor | None:
    """A vector ``W_std`` (a 1-d tensor, array or sequence of non-negative finite
    numbers, one per input feature) as a tensor (the given one, if it is a tensor, so
    that gradients reach it), or ``None`` for anything else (a number, a 0-d tensor)."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 1:
            return None
        scales = value
    elif isinstance(value, (list, tuple, np.ndarray)):
        scales = torch.as_tensor(np.asarray(value, dtype=np.float64))
        if scales.ndim != 1:
            raise TypeError(f"W_std must be a number or a vector, got shape {tuple(scales.shape)}")
    else:
        return None
    if not scales.is_floating_point() or len(scales) == 0:
        raise TypeError(f"W_std as a vector must be non-empty and floating, got {value!r}")
    values = scales.detach()
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError("W_std as a vector must hold finite numbers >= 0")
    return scales


def check_covariance(value: object) -> torch.Tensor:
    """``W_cov``: a symmetric positive semi-definite ``(d, d)`` floating matrix (a tensor,
    kept as given so that gradients reach it, or an array or nested sequence)."""
    matrix = value if isinstance(value, torch.Tensor) else torch.as_tensor(
        np.asarray(value, dtype=np.float64))
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"W_cov must be a square (d, d) matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"W_cov must be floating, got {matrix.dtype}")
    values = matrix.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("W_cov must be finite")
    scale = float(values.abs().max())
    if float((values - values.T).abs().max()) > 1e-12 * max(scale, 1e-300):
        raise ValueError("W_cov must be symmetric")
    if scale > 0 and float(torch.linalg.eigvalsh(values)[0]) < -1e-10 * scale:
        raise ValueError("W_cov must be positive semi-definite (it has a negative eigenvalue)")
    return matrix


def covariance_root(metric: torch.Tensor) -> torch.Tensor:
    """A float64 ``L`` with ``L L^T = W_cov`` (the symmetric square root, from the
    eigendecomposition, negative rounding clipped), or the scales ``sqrt(metric)`` of a
    vector: the finite twin's map of its input features."""
    values = metric.detach().to(torch.float64).cpu()
    if values.ndim == 1:
        return values.sqrt()
    eigenvalues, vectors = torch.linalg.eigh(values)
    return (vectors * eigenvalues.clamp_min(0.0).sqrt()) @ vectors.T


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
        input_map: torch.Tensor | None = None,
    ) -> None:
        super().__init__((width, fan_in), fan_in, W_std, b_std, parameterization, generator)
        # x -> x L^T with L L^T = W_cov (a vector: the features' scales): weighted features
        self.register_buffer("input_map", input_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.input_map, torch.Tensor):
            input_map = self.input_map.to(x.dtype)
            x = x * input_map if input_map.ndim == 1 else x @ input_map.T
        out = self.weight_scale * (x @ self.weight.T)
        bias = self.scaled_bias()
        return out if bias is None else out + bias
