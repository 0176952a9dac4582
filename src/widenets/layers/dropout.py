"""Dropout in training mode: finite forward and kernel rule side by side."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..kernel import Layout
from .base import KernelState, Layer, Shape, single_kernel, single_shape


class Dropout(Layer):
    r"""Dropout (Srivastava et al. 2014) as PyTorch defines it: each unit is set to zero
    with probability ``p`` and the units kept are divided by ``keep = 1 - p``.

    Write ``d`` for the 0/1 mask (``E[d] = keep``) and ``h' = d h / keep``. In training
    mode one forward pass draws an independent mask for every example, every unit and
    every position, independent of the weights, so for two entries of one call

    * different examples, or different positions: ``E[d_a d_b] / keep^2 = 1``, so
      ``E[h'_a h'_b] = E[h_a h_b]``;
    * one example with itself at one position: ``E[d_a^2] / keep^2 = 1 / keep``.

    The kernel rule therefore divides by ``keep`` only the moments that pair an input
    with itself at the same position::

        var'(x)[p, p] = var(x)[p, p] / keep                    (var1, var2)
        K'(x_i, x_i)[p, p] = K(x_i, x_i)[p, p] / keep          (x2=None only)
        T'(x_i, x_i)[p, p] = T(x_i, x_i)[p, p] / keep          (x2=None only)

    and leaves every other entry as it is: the entries of two examples, of two positions,
    and every entry of ``kernel(x1, x2)`` with ``x2`` given. The latter stands for two
    separate calls of the network, with independent masks, so ``kernel(x1, x1)`` is
    ``kernel(x1)`` less the extra variance on its diagonal. The NTK gets the same factor:
    the gradient of an output with respect to the weights before the dropout passes
    through the same mask ``d / keep``, and so do the inputs of the weights after it.
    This is the convention of Neural Tangents' ``stax.Dropout`` in mode ``'train'``,
    whose ``rate`` is our ``keep = 1 - p``.

    ``Dropout(0)`` is the identity (the kernel state passes through unchanged).

    The finite twin is ``torch.nn.Dropout(p)`` in training mode (the default of a new
    module), which is what the kernel describes: check a twin with a Jacobian of a whole
    batch in one forward pass, so that the masks stay fixed. ``.eval()`` turns the twin
    into the identity, whose kernel is that of the network without this layer.

    After this layer the representation is *not* a centred Gaussian process
    (``is_gaussian`` becomes ``False``, unless ``p == 0``): each unit is zero with
    probability ``p``, and two examples are dropped independently, which no Gaussian
    with these moments describes. A following weighted layer sums many such units and
    is Gaussian again, so place Dropout before a ``Linear`` or convolution (``ReLU,
    Dropout, Linear``). An activation, ``LayerNorm`` or a ``FanInSum`` that needs a
    Gaussian branch directly after Dropout is refused with a ``ValueError``: the
    Gaussian rule would not be the limit of the finite twin there (Neural Tangents
    computes it anyway).
    """

    def __init__(self, p: float = 0.5) -> None:
        self.p = _check_probability(p)

    @property
    def noise_on_self_pairs(self) -> bool:
        """Whether the kernel of ``x1`` with itself (``x2=None``) carries extra variance on
        the entries that pair an input with itself at one position, so that ``kernel(x1)``
        differs from ``kernel(x1, x1)`` on its diagonal: ``p > 0`` (see
        :func:`widenets.testing.has_noise_on_self_pairs`)."""
        return self.p > 0.0

    @property
    def keep(self) -> float:
        """The probability ``1 - p`` of keeping a unit."""
        return 1.0 - self.p

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if self.p == 0.0:
            return k
        extra = 1.0 / self.keep - 1.0
        like = k.var1
        same = _same_positions(k.layout, like.dtype, like.device)

        def self_pairs(var: torch.Tensor) -> torch.Tensor:
            return var * (1.0 + extra * same)

        if k.symmetric:
            identical = k.identical_examples()
            factor = 1.0 + extra * identical.reshape(*identical.shape, *(1,) * k.layout.ndim) * same
            nngp = k.nngp * factor
            ntk = None if k.ntk is None else k.ntk * factor
        else:
            nngp, ntk = k.nngp, k.ntk
        return k.replace(
            nngp=nngp,
            ntk=ntk,
            var1=self_pairs(k.var1),
            var2=None if k.var2 is None else self_pairs(k.var2),
            is_gaussian=False,
        )

    def takes_pair_list(self) -> bool:
        return self.own_rule(Dropout)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return nn.Dropout(self.p), single_shape(input_shape, self)


def _same_positions(layout: Layout, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 where the two positions of a moment entry are equal, else 0, shaped like the
    layout axes ``(*layout)`` (all ones in the diagonal layout; a scalar 1 when dense)."""
    if not layout.paired or not layout.sizes:
        return torch.ones((1,) * layout.ndim, dtype=dtype, device=device)
    mask = torch.ones((), dtype=dtype, device=device)
    for size in layout.sizes:
        eye = torch.eye(size, dtype=dtype, device=device)
        mask = mask.unsqueeze(-1).unsqueeze(-1) * eye  # appends the axes (size, size)
    return mask


def _check_probability(p: object) -> float:
    """``p`` as a float in ``[0, 1)``; a ``TypeError`` for a non-number and a ``ValueError``
    for a number outside, both naming ``p``."""
    if isinstance(p, (bool, np.bool_)) or not isinstance(
            p, (int, float, np.floating, np.integer)):
        raise TypeError(f"p (the probability of dropping a unit) must be a number in [0, 1), "
                        f"got {p!r}")
    value = float(p)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"p (the probability of dropping a unit) must be in [0, 1), got {p!r}"
                         + (" (p=1 drops every unit)" if value == 1.0 else ""))
    return value
