r"""Weight-tied recurrent networks: finite forward and kernel rule side by side.

A recurrent layer runs a *cell* over the time steps of a sequence ``(N, C, T)`` with the
same weights at every step: ``h_t = cell(x_t, h_{t-1})``, ``h_{-1} = 0``, and outputs the
states ``(N, width, T)``.

Kernel rule (Yang 2019, "Wide feedforward or recurrent neural networks of any architecture
are Gaussian processes", and Tensor Programs II (Yang 2020) for the NTK; for the standard
cell Alemohammad et al. 2021, "The recurrent neural tangent kernel"). As the widths grow,
the states of two sequences at steps ``t`` and ``s`` are jointly Gaussian before each
nonlinearity of the cell, and the shared weights make the steps correlated: the cell's own
kernel rule maps the pair of its inputs ``(x_t, h_{t-1})`` and ``(x'_s, h'_{s-1})`` to the
pair of its outputs, for *every* pair of steps ``(t, s)``::

    K_h(t, s) = cell rule of [K_x(t, s), K_h(t - 1, s - 1)]
    T_h(t, s) = cell rule of [T_x(t, s), T_h(t - 1, s - 1)]   (same weights at each step)

The NTK recursion sums the contributions of the shared weights over the pairs of steps that
lie equally far from ``(t, s)``; the other cross terms vanish in the limit (Tensor
Programs II). ``tied=False`` draws fresh weights at every step (the approximation of
libraries without weight sharing): then states at different steps are independent, the
NNGP's cross-step entries are the products of their means (0 for an odd activation or a
cell that ends with a weighted layer), the NTK's are 0, and the equal-step entries are
those of the tied network.

Computation: ``K_h(t, s)`` needs ``K_h(t - 1, s - 1)`` and the variances at ``t - 1`` and
``s - 1``, so the pairs are computed in fronts of equal ``max(t, s)``, all pairs of one
front (and of both sequences' own covariances) in one application of the cell to a batch of
items (``Layout.items`` in ``widenets.kernel``). The cost is ``O(T1 T2)`` items per pair of
sequences, no temporaries beyond one front, and ``T`` applications of the cell.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from ..gaussian import is_functorch_wrapped
from ..inputs import check_hyperparameter, check_positive_int
from ..kernel import Kernel, Layout, batch_diagonal
from ..requirements import Needs
from ..side_inputs import current_mask
from .activations import Activation
from .base import KernelState, Layer, Shape, single_kernel, single_shape
from .combinators import FanInSum, Parallel, Sequential
from .dense import Linear


def check_right_padded(mask: torch.Tensor | None, name: str) -> None:
    """A recurrent network reads its sequences from the start: padding must come after the
    real steps (``[True, ..., True, False, ..., False]`` per sequence)."""
    if mask is None or mask.ndim != 2:
        return
    if bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError(
            f"{name} must be right-padded for a recurrent layer: the real steps of each "
            "sequence first, then the padding (True ... True False ... False)"
        )


def _fronts(length1: int, length2: int, tied: bool,
            device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pairs of steps ``(t, s)`` by front ``max(t, s) = 0, 1, ...`` (only ``t = s``
    untied), as two index tensors per front."""
    fronts = []
    for k in range(max(length1, length2)):
        if not tied:
            pairs = [(k, k)] if k < min(length1, length2) else []
        else:
            pairs = [(k, s) for s in range(min(k + 1, length2))] if k < length1 else []
            pairs += [(t, k) for t in range(min(k, length1))] if k < length2 else []
        if pairs:
            first, second = zip(*pairs)
            fronts.append((torch.tensor(first, device=device),
                           torch.tensor(second, device=device)))
    return fronts


class ReadsFromTheStart:
    """For layers that read sequences from their first step: masks must be right-padded."""

    def check_masks(self, mask1: torch.Tensor | None, mask2: torch.Tensor | None) -> None:
        check_right_padded(mask1, "mask1")
        check_right_padded(mask2, "mask2")


class _Items:
    """The cell's inputs for one front, gathered as flat items, and where the outputs go."""

    def __init__(self) -> None:
        self.inputs: list[list[torch.Tensor]] = [[] for _ in range(8)]
        self.targets: list[tuple[str, tuple, int]] = []

    def add(self, target: str, index: tuple, count: int, *values: torch.Tensor) -> None:
        """Items ``values`` = (input moment, its variances a and b, input NTK, state
        moment, its variances a and b, state NTK), all broadcast to one shape."""
        shape = torch.broadcast_shapes(*(v.shape for v in values))
        for store, value in zip(self.inputs, values):
            store.append(value.expand(shape).reshape(-1))
        self.targets.append((target, index, count))

    def kernels(self, input_state: Kernel, state_width: int, state_is_gaussian: bool,
                with_ntk: bool, sources: frozenset) -> tuple[Kernel, Kernel]:
        """The input and state branches as kernels over the items."""
        flat = [torch.cat(values) for values in self.inputs]
        layout = Layout((flat[0].numel(),), paired=False, items=True)

        def branch(offset: int, width: int, is_gaussian: bool, branch_sources) -> Kernel:
            nngp, var_a, var_b, ntk = flat[offset:offset + 4]
            return Kernel(nngp=nngp[None, None], ntk=ntk[None, None] if with_ntk else None,
                          var1=var_a[None], var2=var_b[None], width=width,
                          is_gaussian=is_gaussian, sources=branch_sources, layout=layout)

        return (branch(0, input_state.width, input_state.is_gaussian, input_state.sources),
                branch(4, state_width, state_is_gaussian, sources))


class Recurrent(ReadsFromTheStart, Layer):
    r"""Runs ``cell`` over the steps of sequences ``(N, C, T)`` with the same weights at
    every step (``tied=True``): ``h_t = cell([x_t, h_{t-1}])`` from ``h_{-1} = 0``; the
    output is the states ``(N, width, T)``.

    ``cell`` is any widenets network of vectors that takes two branches, the input at
    the step and the previous state, and returns the new state, e.g.
    ``Sequential(Parallel(Linear(512), Linear(512, b_std=0.1)), FanInSum(), ReLU())``.
    ``tied=False`` draws fresh weights at every step (the untied approximation, for
    comparison). Kernel rule and its cost: :mod:`widenets.layers.recurrent`. Masks of
    variable-length sequences must be right-padded; a padded step never changes the
    states of the real ones (they come before it).
    """

    needs = Needs(full_covariance=True)

    def __init__(self, cell: Layer, tied: bool = True) -> None:
        if not isinstance(cell, Layer):
            raise TypeError(
                f"cell must be a widenets layer taking [input, state], got {type(cell).__name__}")
        if not isinstance(tied, bool):
            raise TypeError(f"tied must be True or False, got {tied!r}")
        self.cell = cell
        self.tied = tied
        _cell_width(cell)  # (checks the cell)

    def sublayers(self) -> tuple[Layer, ...]:
        return (self.cell,)

    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        sizes = k.layout.sizes
        if len(sizes) != 1:
            raise ValueError(
                f"{type(self).__name__} needs sequences (N, C, T), got a representation "
                f"with {len(sizes)} spatial axes"
            )
        if not k.layout.paired:
            raise ValueError(
                f"{type(self).__name__} mixes time steps: it needs the full covariance "
                "(spatial='full' or 'auto', not 'diagonal')"
            )
        self.check_masks(k.mask1, k.mask2)
        return self.recurrence(k).masked()

    def recurrence(self, k: Kernel) -> Kernel:
        """The states' kernel for the input kernel ``k`` (paired layout over time)."""
        symmetric = k.var2 is None
        n1, length1 = k.var1.shape[0], k.var1.shape[-1]
        var2_in = k.var1 if symmetric else k.var2
        assert var2_in is not None
        n2, length2 = var2_in.shape[0], var2_in.shape[-1]
        with_ntk = k.ntk is not None
        zeros = k.nngp.new_zeros
        # states padded with h_{-1} = 0 in front: index t + 1 holds step t
        own1 = zeros((n1, length1 + 1, length1 + 1))
        own2 = own1 if symmetric else zeros((n2, length2 + 1, length2 + 1))
        cross = zeros((n1, n2, length1 + 1, length2 + 1))
        cross_ntk = torch.zeros_like(cross) if with_ntk else None
        input_ntk = k.ntk if with_ntk else None

        def diagonal(var: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            return var[:, steps, steps]

        device = k.nngp.device
        fronts1 = _fronts(length1, length1, self.tied, device)
        fronts2 = [] if symmetric else _fronts(length2, length2, self.tied, device)
        fronts = _fronts(length1, length2, self.tied, device)
        state_is_gaussian, width = True, self._state_width(k)
        sources: frozenset = frozenset()
        out: Kernel | None = None
        # the mean of a state per example and step (where the cell's output has a known one)
        means1 = zeros((n1, length1))
        means2 = means1 if symmetric else zeros((n2, length2))
        means_known = True
        for front in range(max(len(fronts1), len(fronts2), len(fronts))):
            items = _Items()
            for own, var, part, n in ((own1, k.var1, fronts1, n1),
                                      (own2, var2_in, fronts2, n2)):
                if front >= len(part):
                    continue
                t, s = part[front]
                no_ntk = var.new_zeros(())
                items.add("own1" if own is own1 else "own2", (t, s), n * len(t),
                          var[:, t, s], diagonal(var, t), diagonal(var, s), no_ntk,
                          own[:, t, s], diagonal(own, t), diagonal(own, s), no_ntk)
            if front < len(fronts):
                t, s = fronts[front]
                items.add("cross", (t, s), n1 * n2 * len(t),
                          k.nngp[:, :, t, s], diagonal(k.var1, t)[:, None],
                          diagonal(var2_in, s)[None],
                          (input_ntk[:, :, t, s] if input_ntk is not None
                           else k.nngp.new_zeros(())),
                          cross[:, :, t, s], diagonal(own1, t)[:, None],
                          diagonal(own2, s)[None],
                          cross_ntk[:, :, t, s] if cross_ntk is not None else k.nngp.new_zeros(()))
            inputs = items.kernels(k, width, state_is_gaussian, with_ntk, sources)
            state = cast(Kernel, self.cell.transform(inputs))  # one state: _state_width
            out = state
            state_is_gaussian, sources, width = state.is_gaussian, state.sources, state.width
            means_known = means_known and state.mean_known
            offset = 0
            for target, (t, s), count in items.targets:
                values = state.nngp.reshape(-1)[offset:offset + count]
                if target == "cross":
                    cross[:, :, t + 1, s + 1] = values.reshape(n1, n2, len(t))
                    if cross_ntk is not None:
                        ntk_values = cast(torch.Tensor, state.ntk).reshape(-1)
                        cross_ntk[:, :, t + 1, s + 1] = ntk_values[offset:offset + count].reshape(
                            n1, n2, len(t))
                else:
                    own = own1 if target == "own1" else own2
                    own[:, t + 1, s + 1] = values.reshape(own.shape[0], len(t))
                    if state.mean1 is not None:
                        equal = t == s
                        item_means = state.mean1.reshape(-1)[offset:offset + count]
                        means = means1 if target == "own1" else means2
                        means[:, t[equal]] = item_means.reshape(own.shape[0], len(t))[:, equal]
                offset += count
        assert out is not None
        nngp = cross[:, :, 1:, 1:]
        var1 = own1[:, 1:, 1:]
        var2 = None if symmetric else own2[:, 1:, 1:]
        if not self.tied:
            nngp, var1, var2 = self._untied_cross_steps(nngp, var1, var2, means1, means2,
                                                        means_known)
        if symmetric:
            nngp = nngp.clone()
            batch_diagonal(nngp).copy_(var1)
        with_means = means_known and not out.is_gaussian
        return k.replace(
            nngp=nngp,
            ntk=None if cross_ntk is None else cross_ntk[:, :, 1:, 1:],
            var1=var1, var2=var2,
            width=out.width, is_gaussian=out.is_gaussian, sources=out.sources,
            mean1=means1 if with_means else None,
            mean2=means2 if with_means and not symmetric else None,
        )

    def _untied_cross_steps(
        self, nngp: torch.Tensor, var1: torch.Tensor, var2: torch.Tensor | None,
        means1: torch.Tensor, means2: torch.Tensor, means_known: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Untied weights: the states at two different steps are independent, so their
        covariance is the product of their means (0 for a cell that ends with a weighted
        layer; the NTK's cross-step entries vanish)."""
        if not means_known:
            raise ValueError(
                f"the untied {type(self).__name__} needs the mean of the cell's states (their "
                "covariance across steps): end the cell with an activation of a weighted "
                "layer's output, or with a weighted layer")
        steps1, steps2 = means1.shape[1], means2.shape[1]
        apart = ~torch.eye(steps1, steps2, dtype=torch.bool, device=nngp.device)
        products = means1[:, None, :, None] * means2[None, :, None, :]
        nngp = torch.where(apart, products, nngp)
        own_apart = ~torch.eye(steps1, dtype=torch.bool, device=nngp.device)
        var1 = torch.where(own_apart, means1[:, :, None] * means1[:, None, :], var1)
        if var2 is not None:
            own_apart2 = ~torch.eye(steps2, dtype=torch.bool, device=nngp.device)
            var2 = torch.where(own_apart2, means2[:, :, None] * means2[:, None, :], var2)
        return nngp, var1, var2

    def _state_width(self, k: Kernel) -> int:
        """The width of the cell's states, from its kernel rule on one item (cheaper than
        building its twin): what the state branch's first layers see as their fan-in."""
        item = Kernel(nngp=k.nngp.new_ones((1, 1, 1)), ntk=None, var1=k.nngp.new_ones((1, 1)),
                      var2=k.nngp.new_ones((1, 1)), width=k.width, is_gaussian=True,
                      sources=frozenset(), layout=Layout((1,), paired=False, items=True))
        width = 1
        for _ in range(2):  # the width of states from states of the width found
            state = self.cell.transform((item, dataclasses.replace(item, width=width)))
            if not isinstance(state, Kernel):
                raise ValueError(
                    f"the cell of {type(self).__name__} must return one state, got "
                    f"{len(state)} parallel branches; close them with a FanIn layer"
                )
            width = state.width
        return width

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        if len(shape) != 2:
            raise ValueError(
                f"{type(self).__name__} needs sequences (C, T) per example, got shape {shape}")
        channels, length = shape
        width = _cell_width(self.cell)
        cells = [self._build_cell(channels, width, generator)
                 for _ in range(1 if self.tied else length)]
        return FiniteRecurrent(cells, width), (width, length)

    def _build_cell(self, channels: int, width: int,
                    generator: torch.Generator | None) -> nn.Module:
        module, out_shape = self.cell.build_module([(channels,), (width,)], generator)
        if out_shape != (width,):
            raise ValueError(
                f"the cell of {type(self).__name__} returns states of shape {out_shape} from "
                f"states of width {width}: its output must be the next state, a vector of the "
                "same width"
            )
        return module


def _cell_width(cell: Layer) -> int:
    """The width of the states ``cell`` returns, checking that it takes ``[input, state]``
    and returns one vector (its finite twin, built for small inputs, says both)."""
    generator = torch.Generator().manual_seed(0)
    try:
        _, out_shape = cell.build_module([(1,), (1,)], generator)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "a recurrent cell must take two branches of vectors, [input at the step, "
            "previous state], and return the next state, e.g. Sequential(Parallel(Linear(n), "
            f"Linear(n)), FanInSum(), ReLU()); this cell does not: {error}"
        ) from error
    if isinstance(out_shape, list) or len(out_shape) != 1:
        raise ValueError(
            "a recurrent cell must return the next state, one vector per example, got shape "
            f"{out_shape}; close parallel branches with a FanIn layer"
        )
    width = out_shape[0]
    try:
        _, again = cell.build_module([(1,), (width,)], generator)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"a recurrent cell must take its own states (width {width}) back: {error}"
        ) from error
    if again != (width,):
        raise ValueError(
            f"a recurrent cell must return states of the width it takes: it returns {again} "
            f"from states of width {width}"
        )
    return width


class FiniteRecurrent(nn.Module):
    """The finite twin of :class:`Recurrent`: one cell module (tied) or one per step."""

    def __init__(self, cells: list[nn.Module], width: int) -> None:
        super().__init__()
        self.cells = nn.ModuleList(cells)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = current_mask(x)
        if mask is not None and not is_functorch_wrapped(mask):  # (vmap of Monte Carlo)
            check_right_padded(mask, "mask")
        state = x.new_zeros((x.shape[0], self.width))
        states = []
        for step in range(x.shape[-1]):
            cell = self.cells[step if len(self.cells) > 1 else 0]
            state = cell((x[:, :, step], state))
            states.append(state)
        return torch.stack(states, dim=-1)


class RNN(Recurrent):
    r"""The standard recurrent cell, ``h_t = activation(W h_{t-1} + U x_t + b)``, with the
    NTK parameterisation of ``Linear``: ``W`` (state to state) is ``W_std / sqrt(width)``
    times standard normals, ``U`` (input to state) ``U_std / sqrt(C)`` times standard
    normals, ``b`` ``b_std`` times standard normals (no bias for ``None``); ``h_{-1} = 0``.
    ``width`` is the finite twin's state width (the kernel does not depend on it).

    Kernel rule (Alemohammad et al. 2021; :mod:`widenets.layers.recurrent`), for every pair
    of steps of two sequences::

        K_g(t, s) = W_std^2 E[phi(g) phi(g')]_{t-1, s-1} + U_std^2 K_x(t, s) + b_std^2
        T_g(t, s) = K_g(t, s) + W_std^2 E[phi'(g) phi'(g')]_{t-1, s-1} T_g(t - 1, s - 1)
                    + U_std^2 T_x(t, s)

    With a ``tanh`` or ``ReLU`` activation the twin is ``torch.nn.RNN`` with
    ``weight_hh = W_std / sqrt(width) W``, ``weight_ih = U_std / sqrt(C) U``,
    ``bias_ih = b_std beta`` and ``bias_hh = 0``.
    """

    width_argument = "width"

    def __init__(
        self,
        activation: Activation,
        W_std: float | torch.Tensor = 1.0,
        U_std: float | torch.Tensor = 1.0,
        b_std: float | torch.Tensor | None = None,
        tied: bool = True,
        width: int = 64,
    ) -> None:
        if not isinstance(activation, Activation):
            raise TypeError(
                "activation must be a widenets activation such as wn.ReLU() or wn.Erf(), got "
                f"{type(activation).__name__}"
            )
        self.activation = activation
        self.W_std = check_hyperparameter(W_std, "W_std", nonnegative=True)
        self.U_std = check_hyperparameter(U_std, "U_std", nonnegative=True)
        self.b_std = None if b_std is None else check_hyperparameter(b_std, "b_std",
                                                                     nonnegative=True)
        self._input_weights = Linear(width, self.U_std, self.b_std)
        self._state_weights = Linear(width, self.W_std)
        cell = Sequential(Parallel(self._input_weights, self._state_weights), FanInSum(),
                          activation)
        super().__init__(cell, tied)

    @property
    def width(self) -> int:
        """The finite twin's state width (both weight matrices follow it)."""
        return self._state_weights.width

    @width.setter
    def width(self, value: int) -> None:
        value = check_positive_int(value, "width")
        self._input_weights.width = value
        self._state_weights.width = value


class LastStep(ReadsFromTheStart, Layer):
    r"""The state at the last real step of each sequence: ``(N, C, T) -> (N, C)`` (the last
    step, or with a right-padded mask the last real one; a sequence with no real step
    gives 0). The read-out of a recurrent network that sees the whole sequence.

    Kernel rule: ``K'(x, x') = K(x, x')[T_x - 1, T_x' - 1]`` for sequences of real lengths
    ``T_x`` and ``T_x'``, likewise the NTK; it needs the full covariance over time (two
    lengths differ in general).
    """

    needs = Needs(full_covariance=True)


    def kernel_rule(self, k: KernelState) -> KernelState:
        k = single_kernel(k, self)
        if len(k.layout.sizes) != 1 or not k.layout.paired:
            raise ValueError(
                "LastStep needs sequences (N, C, T) with the full covariance over time, got "
                f"{len(k.layout.sizes)} spatial axes"
            )
        self.check_masks(k.mask1, k.mask2)
        length = k.layout.sizes[0]

        def last(mask: torch.Tensor | None, n: int) -> torch.Tensor:
            if mask is None:
                return torch.full((n,), length - 1, device=k.nngp.device)
            return mask.sum(dim=1) - 1

        symmetric = k.var2 is None
        last1 = last(k.mask1, k.var1.shape[0])
        last2 = last1 if symmetric else last(k.second_mask, cast(torch.Tensor, k.var2).shape[0])
        real1, real2 = last1 >= 0, last2 >= 0
        step1, step2 = last1.clamp_min(0), last2.clamp_min(0)
        rows = torch.arange(len(step1), device=step1.device)
        cols = torch.arange(len(step2), device=step2.device)
        both = (real1[:, None] & real2[None, :]).to(k.nngp.dtype)

        def pairs(moments: torch.Tensor) -> torch.Tensor:
            return moments[rows[:, None], cols[None, :], step1[:, None], step2[None, :]] * both

        def own(var: torch.Tensor, step: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
            index = torch.arange(len(step), device=step.device)
            return var[index, step, step] * real.to(var.dtype)

        return k.replace(
            nngp=pairs(k.nngp), ntk=None if k.ntk is None else pairs(k.ntk),
            var1=own(k.var1, step1, real1),
            var2=None if symmetric else own(cast(torch.Tensor, k.var2), step2, real2),
            layout=Layout(), mask1=None, mask2=None,
        )

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        shape = single_shape(input_shape, self)
        if len(shape) != 2:
            raise ValueError(f"LastStep needs sequences (C, T) per example, got shape {shape}")
        return FiniteLastStep(), (shape[0],)


class FiniteLastStep(nn.Module):
    """The finite twin of :class:`LastStep`: reads the batch's mask, if any."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = current_mask(x)
        if mask is None:
            return x[:, :, -1]
        if not is_functorch_wrapped(mask):  # (masks are checked before vmap)
            check_right_padded(mask, "mask")
        last = mask.sum(dim=1) - 1
        picked = x[torch.arange(x.shape[0], device=x.device), :, last.clamp_min(0)]
        return picked * (last >= 0).to(x.dtype)[:, None]


__all__ = ["LastStep", "RNN", "Recurrent", "check_right_padded"]
