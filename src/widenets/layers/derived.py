"""A network whose masks and graphs are functions of its inputs.

Masks and adjacencies are per-example inputs beside the data (:mod:`widenets.side_inputs`).
When they are a function of each example (a padding value marks the padded positions;
a graph built from the node features), :class:`DerivedSideInputs` computes them itself,
so the network is called like one without side inputs: ``net.kernel(x1, x2)``, its
twin ``module(x)``, ``monte_carlo_kernel`` and the contract kit (:mod:`widenets.testing`)
all work unchanged. The kit's own examples are :func:`example_masks` and
:func:`example_graphs`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..requirements import Needs
from ..side_inputs import finite_side_inputs
from .base import KernelState, Layer, Shape
from .combinators import SequentialModule

#: A function of a batch ``x`` ``(N, C, *positions)`` returning some of ``{"mask": (N,
#: *positions) bool, "adjacency": (N, P, P) float}``, computed per example (so that it
#: works on any sub-batch, and under ``torch.func.vmap`` on single examples).
SideInputsFunction = Callable[[torch.Tensor], dict[str, torch.Tensor]]


class DerivedSideInputs(Layer):
    """``net`` with its masks and adjacencies computed from the inputs by ``side_inputs``.

    ``net.kernel(x1, x2)`` becomes ``net.kernel(x1, x2, mask1=side_inputs(x1)["mask"],
    mask2=side_inputs(x2)["mask"], ...)`` (side inputs given explicitly take precedence);
    the finite twin calls ``module(x, mask=..., adjacency=...)`` the same way. The kernel
    rule is ``net``'s. ``side_inputs`` must be importable by name for the layer to have a
    spec (see :mod:`widenets.specs`).
    """

    needs = Needs(input="any")

    def __init__(self, net: Layer, side_inputs: SideInputsFunction) -> None:
        if not isinstance(net, Layer):
            raise TypeError(f"net must be a widenets Layer, got {type(net).__name__}")
        if not callable(side_inputs):
            raise TypeError(f"side_inputs must be callable, got {type(side_inputs).__name__}")
        self.net, self.side_inputs = net, side_inputs

    def sublayers(self) -> tuple[Layer, ...]:
        return (self.net,)

    def kernel_rule(self, k: KernelState) -> KernelState:
        return self.net.transform(k)

    def kernel(self, x1, x2=None, get="ntk", **options):  # noqa: ANN001, ANN201
        """:meth:`widenets.Layer.kernel` with the side inputs of ``x1`` and ``x2``."""
        for suffix, x in (("1", x1), ("2", x2)):
            for name, value in derived(self.side_inputs, x).items():
                options.setdefault(f"{name}{suffix}", value)
        return super().kernel(x1, x2, get, **options)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        module, shape = self.net.build_module(input_shape, generator)
        return DerivedSideInputsModule(SequentialModule([module]), self.side_inputs), shape


def derived(side_inputs: SideInputsFunction, x: object) -> dict[str, torch.Tensor]:
    """``side_inputs(x)`` for a batch with positions; nothing for anything else (which
    the kernel then refuses with its own error)."""
    if not isinstance(x, torch.Tensor) or x.ndim < 3 or not bool(torch.isfinite(x).all()):
        return {}
    return side_inputs(x)


class DerivedSideInputsModule(nn.Module):
    """The finite twin of :class:`DerivedSideInputs`."""

    def __init__(self, module: SequentialModule, side_inputs: SideInputsFunction) -> None:
        super().__init__()
        self.module, self.side_inputs = module, side_inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The twin on ``x`` with its derived side inputs (trusted: not checked, so that
        it runs under ``torch.func.vmap`` too)."""
        side = self.side_inputs(x) if x.ndim >= 3 else {}
        adjacency = side.get("adjacency")
        with finite_side_inputs(side.get("mask"),
                                None if adjacency is None else adjacency.to(x.dtype)):
            return self.module.run(x)


def example_masks(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Masks for the contract kit: the positions after the first where channel 0 is
    below -0.5 are padding (the first position is always real), per example."""
    low = x[:, 0].flatten(1) < -0.5
    low[:, 0] = False
    padded = torch.cumsum(low.to(torch.int64), dim=1) > 0
    return {"mask": (~padded).reshape(x.shape[:1] + x.shape[2:])}


def example_graphs(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Graphs for the contract kit: an edge from node ``i`` to node ``j`` with weight
    ``sigmoid(x_i0 x_j0)`` (channel 0), per example; no data-dependent branching, so it
    runs under ``torch.func.vmap``."""
    first = x[:, 0].flatten(1)
    return {"adjacency": torch.sigmoid(first.unsqueeze(2) * first.unsqueeze(1))}
