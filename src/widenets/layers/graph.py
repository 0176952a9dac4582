"""Graph aggregation: finite forward and kernel rule side by side (graph neural networks)."""

from __future__ import annotations

import torch
from torch import nn

from ..requirements import Needs
from ..side_inputs import current_adjacency
from .base import KernelState, Layer, Shape, single_kernel, single_shape


class Aggregate(Layer):
    r"""Each node receives the weighted sum of its predecessors' features:
    ``out[n, :, j] = sum_i A[n, i, j] x[n, :, i]`` for node features ``(N, C, nodes)``
    (or any positions, in row-major order), where ``A[n, i, j]`` is the weight of the
    edge from node ``i`` to node ``j`` of example ``n``'s graph. No normalisation by
    degree and no self loops are added: put them in ``A`` (e.g. ``A + I``, or rows
    divided by degrees) if wanted. The graphs are given to the kernel as
    ``net.kernel(x1, x2, adjacency1=A1, adjacency2=A2)`` (dense ``(N, P, P)`` or integer
    ``(N, E, 2)`` edge lists, :mod:`widenets.side_inputs`) and to the finite twin as
    ``module(x, adjacency=A)``.

    Kernel rule (a linear map of each input, no parameters; Du et al. 2019, "Graph
    neural tangent kernel"; Neural Tangents' ``Aggregate``): for a pair of graphs,
    ``K'(x, y) = A_x^T K(x, y) A_y`` over the nodes, likewise ``T``, and
    ``K'(x, x) = A_x^T K(x, x) A_x``. It needs every pair of nodes (the full covariance).
    A centred Gaussian input stays one.
    """

    needs = Needs(full_covariance=True)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if not k.layout.sizes:
            raise ValueError(
                "Aggregate needs node features (N, C, nodes) (or other positions), got a "
                "representation without positions"
            )
        first, second = k.adjacency1, k.second_adjacency
        if first is None or second is None:
            raise ValueError(
                "Aggregate needs the graphs: net.kernel(x1, x2, adjacency1=..., "
                "adjacency2=...) with (N, nodes, nodes) adjacencies or (N, E, 2) edge lists"
            )
        layout = k.layout

        def between(moments: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
            matrix = layout.as_matrix(moments)
            left = torch.einsum("aij,abik->abjk", a1, matrix)
            return layout.from_matrix(torch.einsum("abjk,bkl->abjl", left, a2))

        def within(moments: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            matrix = layout.as_matrix(moments)
            return layout.from_matrix(torch.einsum("aij,aik,akl->ajl", a, matrix, a))

        return k.replace(
            nngp=between(k.nngp, first, second),
            ntk=None if k.ntk is None else between(k.ntk, first, second),
            var1=within(k.var1, first),
            var2=None if k.var2 is None else within(k.var2, second),
        )

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        if len(shape) < 2:
            raise ValueError(
                f"Aggregate needs node features (C, nodes) per example, got shape {shape}"
            )
        return FiniteAggregate(), shape


class FiniteAggregate(nn.Module):
    """The finite twin of :class:`Aggregate`: reads the batch's graphs from
    ``module(x, adjacency=A)`` of the enclosing network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adjacency = current_adjacency()
        if adjacency is None:
            raise ValueError(
                "Aggregate needs the graphs: call the network as module(x, adjacency=A) "
                "with (N, nodes, nodes) adjacencies or (N, E, 2) edge lists"
            )
        out = torch.einsum("ncp,npq->ncq", x.flatten(2), adjacency.to(x.dtype))
        return out.reshape(x.shape)



