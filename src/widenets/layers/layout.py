"""Inputs with their channels last, ``(N, *positions, C)``: :class:`ChannelsLast`.

widenets computes with channels first, as PyTorch's convolutions do. Sequence models
written with ``nn.Linear`` and ``nn.LayerNorm`` on ``(N, L, C)`` (tokens, time steps)
read their inputs channels last; an architecture that starts with ``ChannelsLast()``
takes its inputs that way. The kernel does not depend on where the channels were (they
are summed over when the input covariances are formed), so the kernel entry points move
the channel axis of the inputs to position 1 and compute the rest of the network as
usual (:func:`widenets.engine.channels_first`, with :meth:`Layer.after_channels_last`);
the finite twin moves the axis itself.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine import channels_to_front
from .base import KernelState, Layer, Shape, single_shape
from .combinators import Sequential


class ChannelsLast(Layer):
    """The network's inputs are ``(N, *positions, C)`` (channels last); the layers after it
    see ``(N, C, *positions)``. Only as the first layer of a network (the kernel entry
    points move the channel axis of the inputs before any layer runs); for inputs
    ``(N, features)`` it changes nothing.

    Finite twin: ``x.movedim(-1, 1)``.
    """

    def kernel_rule(self, k: KernelState) -> KernelState:
        raise ValueError(
            "ChannelsLast must be the first layer of the network (it says how the inputs "
            "are laid out); put it first, or move the channel axis inside the model"
        )

    def after_channels_last(self) -> Layer | None:
        return Sequential()

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        moved = shape if len(shape) == 1 else (shape[-1], *shape[:-1])
        return MoveChannelsFirst(), moved


class MoveChannelsFirst(nn.Module):
    """Finite twin of :class:`ChannelsLast`: ``(N, *positions, C) -> (N, C, *positions)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_to_front(x)
