"""Combinators: sequences, branches and their merges, residual blocks.

Branches are exact only where they are independent in the limit. Each kernel state
carries the identities of the weights it depends on directly (``Kernel.sources``, see
:class:`widenets.requirements.WeightIdentity`); a weighted layer makes a fresh, centred
Gaussian independent of everything that does not share its weights. The merges declare
what they need (``needs``), and the engine refuses what the kernels alone do not
determine, rather than return a wrong number.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..inputs import check_positive_int
from ..kernel import Kernel
from ..requirements import Needs
from ..side_inputs import check_adjacency, check_mask, current_mask, finite_side_inputs
from .activations import Identity
from .base import KernelState, Layer, Shape, branch_states, single_shape


def _check_layers(layers: tuple[object, ...], owner: str) -> tuple[Layer, ...]:
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(
                f"{owner} takes widenets layers, got {type(layer).__name__} at position {i}"
            )
    return cast("tuple[Layer, ...]", layers)  # checked above


class Sequential(Layer):
    """Layers applied one after the other."""

    needs = Needs(input="any")

    def __init__(self, *layers: Layer) -> None:
        self.layers = _check_layers(layers, "Sequential")

    def sublayers(self) -> tuple[Layer, ...]:
        return self.layers

    def after_channels_last(self) -> Layer | None:
        first = self.layers[0].after_channels_last() if self.layers else None
        return None if first is None else Sequential(first, *self.layers[1:])

    def kernel_rule(self, k: KernelState) -> KernelState:
        for layer in self.layers:
            k = layer.transform(k)
        return k

    def takes_pair_list(self) -> bool:
        return self.own_rule(Sequential)  # (the engine asks each of its layers)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        modules = []
        for layer in self.layers:
            module, input_shape = layer.build_module(input_shape, generator)
            modules.append(module)
        return SequentialModule(modules), input_shape


class SequentialModule(nn.ModuleList):
    """Finite twin of :class:`Sequential`; passes tuples of branches through unchanged.

    ``mask`` (the real positions, boolean ``(N, *positions)``) and ``adjacency`` (one
    graph per example, dense ``(N, P, P)`` or an integer ``(N, E, 2)`` edge list) are
    those of the kernels (``net.kernel(..., mask1=, adjacency1=)``): masked positions are
    zeroed in the input and after every layer, attention and pooling skip them, and
    ``Aggregate`` uses the graphs. Given to the outermost module, they reach the nested
    ones.
    """

    def forward(self, x, mask=None, adjacency=None):
        if mask is None and adjacency is None:
            return self.run(x)
        mask = check_mask(mask, x, "mask")
        adjacency = check_adjacency(adjacency, x, "adjacency")
        with finite_side_inputs(mask, adjacency):
            return self.run(x)

    def run(self, x):
        """The forward pass with the side inputs already set (unchecked), by
        ``widenets.side_inputs.finite_side_inputs`` or an enclosing call."""
        x = _zero_masked(x)
        for module in self:
            x = _zero_masked(module(x))
        return x


def _zero_masked(x):
    """``x`` with the masked positions of the current batch set to 0 (tensors only)."""
    if not isinstance(x, torch.Tensor):
        return tuple(_zero_masked(branch) for branch in x)
    mask = current_mask(x)
    return x if mask is None else x * mask.unsqueeze(1).to(x.dtype)


class Parallel(Layer):
    """Applies its i-th layer to the i-th branch (after ``FanOut``)."""

    needs = Needs(input="branches")

    def __init__(self, *layers: Layer) -> None:
        if not layers:
            raise ValueError("Parallel needs at least one layer")
        self.layers = _check_layers(layers, "Parallel")

    def sublayers(self) -> tuple[Layer, ...]:
        return self.layers

    def _check_branches(self, count: int) -> None:
        if count != len(self.layers):
            raise ValueError(
                f"Parallel has {len(self.layers)} layers but got {count} branches"
            )

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = branch_states(k, self)
        self._check_branches(len(k))
        return tuple(layer.transform(branch) for layer, branch in zip(self.layers, k))

    def takes_pair_list(self) -> bool:
        return self.own_rule(Parallel)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        if not isinstance(input_shape, list):
            raise ValueError("Parallel needs parallel branches: put FanOut(n) before it")
        self._check_branches(len(input_shape))
        built = [layer.build_module(s, generator) for layer, s in zip(self.layers, input_shape)]
        return ParallelModule([m for m, _ in built]), [s for _, s in built]


class ParallelModule(nn.ModuleList):
    """Finite twin of :class:`Parallel`."""

    def forward(self, xs):
        return tuple(module(x) for module, x in zip(self, xs))


class FanOut(Layer):
    """Copies its input into ``n`` branches."""

    def __init__(self, n: int) -> None:
        self.n = check_positive_int(n, "n")

    def kernel_rule(self, k: KernelState) -> KernelState:
        return (k,) * self.n

    def takes_pair_list(self) -> bool:
        return self.own_rule(FanOut)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return FanOutModule(self.n), [single_shape(input_shape, self)] * self.n


class FanOutModule(nn.Module):
    """Finite twin of :class:`FanOut`."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x):
        return (x,) * self.n


def _branches(state: KernelState, layer: Layer) -> tuple[Kernel, ...]:
    k = branch_states(state, layer)
    for branch in k:
        if not isinstance(branch, Kernel):
            raise ValueError(f"{type(layer).__name__} got nested branches; merge them first")
    branches = cast("tuple[Kernel, ...]", k)  # checked above
    layouts = [branch.layout.sizes for branch in branches]
    if len(set(layouts)) != 1:
        raise ValueError(
            f"{type(layer).__name__} got branches of different spatial sizes {layouts}"
        )
    return branches


def _ntks(branches: tuple[Kernel, ...]) -> list[torch.Tensor]:
    """The branches' NTKs, when the first has one: then all have (the branches come from
    one kernel, computed with or without its NTK)."""
    return [cast(torch.Tensor, b.ntk) for b in branches]


def _branch_shapes(shape: Shape, layer: Layer, same: bool) -> list[tuple[int, ...]]:
    if not isinstance(shape, list):
        raise ValueError(f"{type(layer).__name__} needs parallel branches: use FanOut first")
    shapes = [single_shape(s, layer) for s in shape]
    reference = shapes[0]
    for s in shapes[1:]:
        differs = s != reference if same else (len(s) != len(reference) or s[1:] != reference[1:])
        if differs:
            raise ValueError(
                f"{type(layer).__name__} got branches of incompatible shapes {shapes}"
            )
    return shapes


def _check_equal_widths(branches: tuple[Kernel, ...], layer: Layer) -> None:
    widths = [b.width for b in branches]
    if len(set(widths)) != 1:
        raise ValueError(f"{type(layer).__name__} needs branches of equal width, got {widths}")


def _product(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out * t
    return out


def _merge(branches: tuple[Kernel, ...], reduce, ntk, **changes) -> Kernel:
    """One kernel from its branches: ``reduce`` combines each of their second moments."""
    first = branches[0]
    return first.replace(
        nngp=reduce([b.nngp for b in branches]),
        ntk=ntk,
        var1=reduce([b.var1 for b in branches]),
        var2=None if first.var2 is None else reduce([b.var2 for b in branches]),
        sources=frozenset().union(*(b.sources for b in branches)),
        **changes,
    )


class FanInSum(Layer):
    r"""Sums its branches: ``K = sum_i K_i``, ``T = sum_i T_i``.

    Exact when the branches are pairwise independent and in each pair at least one is
    a centred Gaussian (it ends with its own weighted layer), so every cross moment
    ``E[a(x) b(x')]`` vanishes, or both have known means (each ends with an activation of
    a weighted layer's output, possibly globally pooled): then the cross moment is
    ``E[a(x)] E[b(x')]`` and ``K = sum_i K_i + sum_{i != j} E[a_i(x)] E[a_j(x')]``, while
    the NTKs still just add (the gradients' cross terms vanish in the limit). Otherwise a
    ``ValueError`` is raised.
    """

    needs = Needs(input="branches", independent_branches="sum")

    def kernel_rule(self, k: KernelState) -> KernelState:
        branches = _branches(k, self)
        _check_equal_widths(branches, self)
        ntk = None if branches[0].ntk is None else sum(_ntks(branches))
        merged = _merge(branches, sum, ntk, is_gaussian=all(b.is_gaussian for b in branches))
        # independent branches with means: E[a b'] = E[a] E[b'] (the gradients' cross
        # terms vanish in the limit: the NTKs just add)
        for i, a in enumerate(branches):
            for b in branches[i + 1:]:
                if not (a.is_gaussian or b.is_gaussian):
                    nngp, var1, var2 = a.mean_products(b)
                    merged = merged.replace(
                        nngp=merged.nngp + nngp, ntk=merged.ntk, var1=merged.var1 + var1,
                        var2=None if var2 is None else cast(torch.Tensor, merged.var2) + var2)
        if all(b.mean_known for b in branches):
            means1 = [b.mean1 for b in branches if b.mean1 is not None]
            means2 = [b.second_mean for b in branches if b.mean1 is not None]
            if means1:
                merged = merged.replace(
                    nngp=merged.nngp, ntk=merged.ntk, mean1=sum(means1),
                    mean2=None if merged.var2 is None else sum(means2))
        return merged

    def takes_pair_list(self) -> bool:
        return self.own_rule(FanInSum)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return FanInModule("sum"), _branch_shapes(input_shape, self, same=True)[0]


class FanInProd(Layer):
    r"""Multiplies its branches elementwise: ``K = prod_i K_i``,
    ``T = sum_i T_i prod_{j != i} K_j`` (product rule), exact for independent branches.
    """

    needs = Needs(input="branches", independent_branches="product")

    def kernel_rule(self, k: KernelState) -> KernelState:
        branches = _branches(k, self)
        _check_equal_widths(branches, self)
        ntk = None
        if branches[0].ntk is not None:
            ntks = _ntks(branches)
            ntk = sum(
                _product([ntks[j] if j == i else b.nngp for j, b in enumerate(branches)])
                for i in range(len(branches))
            )
        return _merge(branches, _product, ntk, is_gaussian=False)

    def takes_pair_list(self) -> bool:
        return self.own_rule(FanInProd)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return FanInModule("prod"), _branch_shapes(input_shape, self, same=True)[0]


class FanInConcat(Layer):
    r"""Concatenates its branches along the feature axis.

    The next weighted layer sees the width-weighted mean of the branch kernels,
    ``K = sum_i w_i K_i / sum_i w_i`` (likewise ``T``). The concatenation of branches
    with different kernels is not one Gaussian, so an activation cannot follow it
    directly; a Linear layer can.
    """

    needs = Needs(input="branches")

    def uses_declared_widths(self) -> bool:
        return True

    def kernel_rule(self, k: KernelState) -> KernelState:
        branches = _branches(k, self)
        widths = [b.width for b in branches]
        total = sum(widths)

        def mean(tensors):
            return sum(w * t for w, t in zip(widths, tensors)) / total

        first = branches[0]
        ntk = None if first.ntk is None else mean([b.ntk for b in branches])
        return _merge(branches, mean, ntk, width=total,
                      is_gaussian=len(branches) == 1 and first.is_gaussian)

    def takes_pair_list(self) -> bool:
        return self.own_rule(FanInConcat)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shapes = _branch_shapes(input_shape, self, same=False)
        return FanInModule("concat"), (sum(s[0] for s in shapes), *shapes[0][1:])


class FanInModule(nn.Module):
    """Finite twin of the FanIn layers: sum, elementwise product or feature concatenation."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, xs):
        if self.mode == "concat":
            return torch.cat(xs, dim=1)
        out = xs[0]
        for x in xs[1:]:
            out = out + x if self.mode == "sum" else out * x
        return out

    def extra_repr(self) -> str:
        return self.mode


class Residual(Layer):
    """``x + block(x)``: ``Sequential(FanOut(2), Parallel(Identity(), block), FanInSum())``."""

    needs = Needs(input="any")

    def __init__(self, block: Layer) -> None:
        self.block = _check_layers((block,), "Residual")[0]
        self._composed = Sequential(FanOut(2), Parallel(Identity(), block), FanInSum())

    def sublayers(self) -> tuple[Layer, ...]:
        return (self._composed,)

    def kernel_rule(self, k: KernelState) -> KernelState:
        return self._composed.transform(k)

    def takes_pair_list(self) -> bool:
        return self.own_rule(Residual)

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        return self._composed.build_module(input_shape, generator)
