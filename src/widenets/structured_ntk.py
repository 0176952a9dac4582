r"""The structured empirical NTK: per-layer contractions for dense and convolutional layers.

Novak, Sohl-Dickstein and Schoenholz (2022), "Fast finite width neural tangent kernel"
(ICML), "structured derivatives": the Jacobian of a layer's output ``y = s W phi(x) + b``
with respect to its weight is the outer product of the cotangent ``g = df_o/dy`` and the
layer's input features, so the layer's share of the NTK need not go through its
parameter-sized Jacobian. For a dense or convolutional layer with output positions
``p``, output channels ``c`` and input features (patches) ``phi[f, p]``::

    Theta_layer(x1, x2)_{o o'} = sum_{p, p'} G_{o o'}[p, p'] (s^2 Phi[p, p'] + beta^2),
    G_{o o'}[p, p'] = sum_c g1_o[c, p] g2_o'[c, p'],   Phi[p, p'] = sum_f phi1[f, p] phi2[f, p']

(``s``: the weight's scale in the forward, ``beta``: the bias's; a frozen weight or bias
drops its term). This *factored* form costs ``P^2 (F + k C)`` per pair of examples
against ``k C F`` for contracting the layer's Jacobians (``k`` pairs of outputs); layers
where it is cheaper (every dense layer on ``(N, features)``, ``P = 1``; convolutions
with few output positions) are factored, the others keep their Jacobians. The
cotangents of the factored layers come from the same reverse pass per output as the
other Jacobians (a zero added to each such layer's output, differentiated, instead of
the layer's weight); the remaining parameters (other layers, normalisations, layers
used twice, grouped convolutions) are contracted through their Jacobians as usual.

Layers recognised: ``torch.nn.Linear``, ``torch.nn.Conv1d/2d/3d`` (``groups=1``, any
padding mode, stride and dilation) and widenets' finite twins ``FiniteLinear`` and
``FiniteConv``, when called once per forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap
from torch.nn.modules.conv import _ConvNd

from .layers.conv import FiniteConv
from .layers.dense import FiniteLinear, WeightedModule

_TORCH_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class AffineLayer:
    """A layer whose output is ``weight_scale * W phi(x) + bias_scale * b``.

    ``weight``/``bias``: the full names of its trainable parameters (``None`` when the
    parameter is absent or frozen); ``output_shape``: its per-example output shape.
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None
    output_shape: tuple[int, ...]

    @property
    def is_dense(self) -> bool:
        return isinstance(self.module, (nn.Linear, FiniteLinear))

    @property
    def scales(self) -> tuple[float, float]:
        """``(s, beta)``: the factors multiplying the weight and the bias in the forward."""
        if isinstance(self.module, WeightedModule):
            return float(self.module.weight_scale), float(self.module.bias_scale or 0.0)
        return 1.0, 1.0

    @property
    def channels(self) -> int:
        return self.output_shape[-1] if self.is_dense else self.output_shape[0]

    @property
    def positions(self) -> int:
        """Output positions ``P`` (``1`` for a dense layer on ``(N, features)``)."""
        return math.prod(self.output_shape) // self.channels

    @property
    def features(self) -> int:
        """Input features ``F`` per output unit: in_features, or in_channels x filter size."""
        weight = cast(torch.Tensor, self.module.weight)
        return math.prod(weight.shape[1:])

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled input features ``s phi`` of a batch of layer inputs: ``(n, F, P)``."""
        s, _ = self.scales
        if self.is_dense:
            flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (n, P, F)
            return s * flat.transpose(1, 2)
        # not dense: a convolution (see _is_affine_module)
        module = cast("FiniteConv | _ConvNd", self.module)
        if isinstance(module, FiniteConv):
            padded = module.pad(x)
            stride, dilation = module.layer.stride, module.layer.dilation
        else:
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            padded = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            stride, dilation = module.stride, module.dilation
        return s * _unfold(padded, tuple(module.weight.shape[2:]), stride, dilation)

    def cotangents(self, g: torch.Tensor) -> torch.Tensor:
        """Output cotangents ``(n, O, *output_shape)`` as ``(n, O, C, P)``."""
        n, n_out = g.shape[:2]
        if self.is_dense:
            return g.reshape(n, n_out, -1, self.channels).transpose(2, 3)
        return g.reshape(n, n_out, self.channels, -1)


def _unfold(
    x: torch.Tensor, kernel_size: tuple[int, ...], stride: tuple[int, ...],
    dilation: tuple[int, ...],
) -> torch.Tensor:
    """Patches of padded images ``(n, C, *S)`` as ``(n, C * prod(kernel_size), P)``."""
    ndim = len(kernel_size)
    for axis, (size, step, gap) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + axis, gap * (size - 1) + 1, step)
        if gap > 1:
            x = x[..., ::gap]
    n, channels = x.shape[:2]
    order = [0, 1, *range(2 + ndim, 2 + 2 * ndim), *range(2, 2 + ndim)]
    return x.permute(order).reshape(n, channels * math.prod(kernel_size), -1)


def _is_affine_module(module: nn.Module) -> bool:
    """Modules whose forward is the plain affine map of their weight and bias."""
    if isinstance(module, (FiniteLinear, FiniteConv)):
        return type(module).forward in (FiniteLinear.forward, FiniteConv.forward)
    if type(module) is nn.Linear:
        return True
    return type(module) in _TORCH_CONVOLUTIONS and cast(_ConvNd, module).groups == 1


def find_affine_layers(
    model: nn.Module, params: dict[str, torch.Tensor],
    probe: Callable[[dict[str, Callable[..., None]]], object],
) -> list[AffineLayer]:
    """The dense and convolutional layers of ``model`` handled by the factored rule.

    ``probe(hooks)`` runs one forward pass of one example with the given forward hooks
    registered; layers called more than once (shared weights) are left to the Jacobian.
    """
    candidates = {}
    for name, module in model.named_modules():
        if not _is_affine_module(module):
            continue
        prefix = f"{name}." if name else ""
        weight = prefix + "weight" if prefix + "weight" in params else None
        bias = prefix + "bias" if prefix + "bias" in params else None
        if weight or bias:
            candidates[name] = (module, weight, bias)
    calls: dict[str, list[tuple[int, ...]]] = {name: [] for name in candidates}

    def record(name):
        def hook(module, inputs, output):
            calls[name].append(tuple(output.shape[1:]))
        return hook

    probe({name: record(name) for name in candidates})
    return [
        AffineLayer(name, module, weight, bias, calls[name][0])
        for name, (module, weight, bias) in candidates.items()
        if len(calls[name]) == 1
    ]


def with_forward_hooks(model: nn.Module, hooks: dict, run):
    """``run()`` with ``hooks[name]`` registered on ``model``'s submodule ``name``;
    the hooks are always removed afterwards.

    ``model`` must be private to the caller (:func:`widenets.empirical.private_copy` of
    the user's model): hooks registered on a module shared between threads would run in
    every thread's forward passes.
    """
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(hook) for name, hook in hooks.items()]
    try:
        return run()
    finally:
        for handle in handles:
            handle.remove()


def structured_parts(model, call, x, params, layers: list[AffineLayer]):
    """For a batch ``x``: the Jacobians ``{name: (n, O, *shape)}`` of the parameters not
    in ``layers``, and per layer of ``layers`` its output cotangents ``(n, O, C, P)`` and
    scaled input features ``(n, F, P)``.

    ``call(params, x)`` is the model's ``(n, O)`` outputs.
    """
    in_layers = {p for layer in layers for p in (layer.weight, layer.bias) if p}
    rest = {name: p for name, p in params.items() if name not in in_layers}
    fixed = {name: p for name, p in params.items() if name in in_layers}
    zeros = {layer.name: x.new_zeros((1, *layer.output_shape)) for layer in layers}

    def single(rest_params, shifts, example):
        captured = {}

        def shift(name):
            def hook(module, inputs, output):
                captured[name] = inputs[0]
                return output + shifts[name]
            return hook

        out = with_forward_hooks(
            model, {name: shift(name) for name in shifts},
            lambda: call({**fixed, **rest_params}, example.unsqueeze(0)),
        )
        return out.squeeze(0), captured

    (jac_rest, jac_shifts), inputs = vmap(
        jacrev(single, argnums=(0, 1), has_aux=True), in_dims=(None, None, 0)
    )(rest, zeros, x)
    parts = {}
    for layer in layers:
        g = jac_shifts[layer.name].squeeze(2)  # (n, O, *output_shape)
        parts[layer.name] = (layer.cotangents(g), layer.patches(inputs[layer.name].squeeze(1)))
    return jac_rest, parts


def pair_costs(layer: AffineLayer, output_pairs: int) -> tuple[int, int]:
    """Flops per pair of examples of the factored form, ``P^2 (F + k C)``, and of
    contracting the layer's Jacobians, ``k C F`` (``k``: the pairs of outputs kept,
    ``O`` for ``mean`` and ``O^2`` for ``full``)."""
    p, c, f = layer.positions, layer.channels, layer.features
    return p * p * (f + output_pairs * c), output_pairs * c * f


def is_factored(layer: AffineLayer, output_pairs: int) -> bool:
    """Whether the factored form is the cheaper one for this layer."""
    factored, jacobian = pair_costs(layer, output_pairs)
    return factored <= jacobian


def output_pairs(outputs: str, n_out: int) -> int:
    """Pairs of outputs an NTK keeps: ``O`` (the diagonal, ``mean``) or ``O^2`` (``full``)."""
    return n_out if outputs == "mean" else n_out * n_out


def factored_layers(layers: list[AffineLayer], outputs: str, n_out: int) -> list[AffineLayer]:
    """The layers cheaper in the factored form; the others stay with the Jacobian."""
    pairs = output_pairs(outputs, n_out)
    return [layer for layer in layers if is_factored(layer, pairs)]


def layer_ntk(layer: AffineLayer, part1, part2, outputs: str) -> torch.Tensor:
    """The layer's NTK share between two batches: ``(n1, n2)`` summed over the diagonal
    outputs (``mean``) or ``(n1, n2, O, O)`` (``full``)."""
    (g1, phi1), (g2, phi2) = part1, part2
    _, beta = layer.scales
    n1, n2, positions = g1.shape[0], g2.shape[0], layer.positions
    if layer.weight:
        features = torch.einsum("afp,bfq->abpq", phi1, phi2)
        if layer.bias:
            features = features + beta * beta
    else:
        features = g1.new_full((n1, n2, positions, positions), beta * beta)
    if outputs == "mean":
        grams = torch.einsum("aocp,bocq->abpq", g1, g2)
        return (grams * features).sum(dim=(2, 3))
    if positions == 1:
        grams = torch.einsum("aoc,bqc->aboq", g1[..., 0], g2[..., 0])
        return grams * features[:, :, 0, 0, None, None]
    return torch.einsum("aocp,bqcr,abpr->aboq", g1, g2, features)
