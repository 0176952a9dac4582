"""The state that flows through the layers of an infinitely wide network.

A :class:`Kernel` holds, for two batches of inputs ``x1`` (N1 examples) and ``x2``
(N2 examples), the second moments of one unit of the current representation:

* ``nngp[i, j] = E[h(x1_i) h(x2_j)]`` (the NNGP kernel, one unit, all units equal);
* ``ntk[i, j]``: the neural tangent kernel of that unit, or ``None`` when only the
  NNGP is asked for (then no NTK work is done);
* ``var1[i] = E[h(x1_i)^2]`` and ``var2[j] = E[h(x2_j)^2]``: the diagonals that the
  nonlinear maps need; ``var2`` is ``None`` when ``x2`` is ``x1`` (symmetric case,
  ``nngp`` is then N1 x N1 and its diagonal equals ``var1`` exactly).

It also carries the facts that decide which rules are exact:

* ``width``: the number of features (declared width) of the representation, used
  by ``FanInConcat`` (width-weighted mean) and by the standard parameterization;
* ``is_gaussian``: the representation is, in the limit, a centred Gaussian process
  (true after a weighted layer, false after a nonlinearity); activations need it;
* ``sources``: the identities (:class:`widenets.requirements.WeightIdentity`) of the
  weights the representation depends on *directly* (a weighted layer replaces them by
  the identity of its own). Two branches with disjoint sources are independent in the
  limit, which ``FanInSum`` and ``FanInProd`` need to be exact.

For images the moments also have spatial axes, described by :class:`Layout`: with the
full spatial covariance, ``nngp[i, j, h, h', w, w'] = E[h(x1_i)[h, w] h(x2_j)[h', w']]``
(each spatial dimension a pair of axes, one per image) and ``var1[i]`` is the full
covariance of ``x1_i`` with itself; with the diagonal layout only equal positions are
kept, ``nngp[i, j, h, w]`` and ``var1[i, h, w]``. In every layout
``nngp`` is ``(N1, N2, *layout)``, ``var1`` is ``(N1, *layout)`` and ``var2`` is
``(N2, *layout)``; a symmetric tile may instead list its pairs ``i <= j``
(:class:`PairList`): ``nngp`` and ``ntk`` are then ``(P, *layout)``, one pair per row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Layout:
    """The spatial axes that follow the batch axes of the kernel moments.

    ``sizes`` are the spatial sizes (``()`` for a fully connected representation).
    ``paired``: each spatial dimension has two axes, the position in the first image and
    the position in the second (the full covariance, which pooling needs); otherwise one
    axis, positions equal in both images (the diagonal, enough for a read-out through
    ``Flatten``). The paired axes are interleaved: ``(H, H', W, W')``.
    """

    sizes: tuple[int, ...] = ()
    paired: bool = False
    #: The positions are independent items, not places in an image: the pairs of time
    #: steps that a recurrent cell runs on (diagonal layout), where layers of vectors
    #: (``Linear``) act on each item (see :mod:`widenets.layers.recurrent`).
    items: bool = False

    @property
    def ndim(self) -> int:
        """The number of trailing spatial axes of a moment tensor."""
        return len(self.sizes) * (2 if self.paired else 1)

    @property
    def positions_per_pair(self) -> int:
        """Entries of one pair of examples: ``P^2`` (paired) or ``P`` (diagonal), 1 if dense."""
        return math.prod(self.sizes) ** (2 if self.paired else 1)

    def axes(self, dim: int) -> tuple[int, ...]:
        """The (negative) axes of spatial dimension ``dim`` in a moment tensor."""
        if self.paired:
            first = -self.ndim + 2 * dim
            return (first, first + 1)
        return (-self.ndim + dim,)

    def positions(self, moments: torch.Tensor) -> torch.Tensor:
        """The entries at equal positions, ``(lead..., *sizes)``: a view of ``moments``.

        In the paired layout these are the per-position variances of ``var1`` (and the
        same-position covariances of ``nngp``); writing into the view writes ``moments``.
        """
        if not self.paired:
            return moments
        lead = moments.ndim - self.ndim
        for _ in self.sizes:
            moments = torch.diagonal(moments, dim1=lead, dim2=lead + 1)
        return moments

    def as_matrix(self, moments: torch.Tensor) -> torch.Tensor:
        """Paired moments ``(lead..., H, H', W, W')`` as matrices ``(lead..., P, P')`` over
        the positions of the two inputs, each in row-major order (a copy)."""
        lead = moments.ndim - self.ndim
        positions = math.prod(self.sizes)
        return self.grouped(moments).reshape(*moments.shape[:lead], positions, positions)

    def grouped(self, moments: torch.Tensor) -> torch.Tensor:
        """Paired moments ``(lead..., H, H', W, W')`` with the positions of the first input
        first: ``(lead..., H, W, H', W')`` (a view)."""
        lead = moments.ndim - self.ndim
        count = len(self.sizes)
        return moments.permute(*range(lead), *(lead + 2 * d for d in range(count)),
                               *(lead + 2 * d + 1 for d in range(count)))

    def from_matrix(self, matrices: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`as_matrix`: ``(lead..., P, P')`` as paired moments."""
        lead = matrices.ndim - 2
        count = len(self.sizes)
        grouped = matrices.reshape(*matrices.shape[:lead], *self.sizes, *self.sizes)
        order = [*range(lead)]
        for d in range(count):
            order += [lead + d, lead + count + d]
        return grouped.permute(order).contiguous()

    def as_first(self, per_position: torch.Tensor) -> torch.Tensor:
        """Per-position values ``(lead..., *sizes)`` broadcast along the first image's axes."""
        return self._spread(per_position, first=True)

    def as_second(self, per_position: torch.Tensor) -> torch.Tensor:
        """Per-position values ``(lead..., *sizes)`` broadcast along the second image's axes."""
        return self._spread(per_position, first=False)

    def _spread(self, per_position: torch.Tensor, first: bool) -> torch.Tensor:
        if not self.paired:
            return per_position
        lead = per_position.shape[: per_position.ndim - len(self.sizes)]
        pairs = [(size, 1) if first else (1, size) for size in self.sizes]
        return per_position.reshape(*lead, *(n for pair in pairs for n in pair))


DENSE = Layout()


@dataclass(frozen=True)
class PairList:
    """The pairs ``(i, j)``, ``i <= j``, of a symmetric tile's examples, listed: moments
    ``(P, *layout)`` then hold one pair per row instead of ``(N, N, *layout)``.

    A symmetric kernel has ``K[j, i]`` the transpose of ``K[i, j]``, so half of the full
    array repeats the other half; networks whose layers all take listed pairs
    (:meth:`widenets.Layer.takes_pair_list`) compute each pair once. ``rows`` and
    ``cols`` (``(P,)``) are the examples of each pair, ``diagonal`` (``(N,)``) the row
    of each pair ``(i, i)`` in the order of the examples.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    diagonal: torch.Tensor

    @classmethod
    def upper(cls, count: int, device: torch.device) -> PairList:
        """The pairs ``i <= j`` of ``count`` examples, row by row."""
        rows, cols = torch.triu_indices(count, count, device=device)
        return cls(rows, cols, torch.nonzero(rows == cols).squeeze(1))

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """The symmetric ``(N, N)`` matrix of per-pair scalars ``values`` ``(P,)``."""
        count = self.diagonal.shape[0]
        full = values.new_empty((count, count))
        full[self.rows, self.cols] = values
        full[self.cols, self.rows] = values
        return full


def batch_diagonal(moments: torch.Tensor) -> torch.Tensor:
    """The entries ``moments[i, i]`` of a symmetric kernel as a view ``(N, *layout)``."""
    return torch.diagonal(moments, dim1=0, dim2=1).movedim(-1, 0)


@dataclass(frozen=True)
class Kernel:
    """Second moments of one unit of a representation, for a pair of input batches."""

    nngp: torch.Tensor
    ntk: torch.Tensor | None
    var1: torch.Tensor
    var2: torch.Tensor | None
    width: int
    is_gaussian: bool
    sources: frozenset
    layout: Layout = DENSE
    #: The raw inputs ``(x1, x2)`` of a dense computation, for a first layer that weighs
    #: the input features (``Linear`` with a vector ``W_std`` or ``W_cov``); dropped by
    #: :meth:`replace`, so that only the state built from the inputs carries them.
    raw_inputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
    #: The real positions of ``x1`` and ``x2`` (boolean ``(N, *sizes)``, see
    #: :mod:`widenets.side_inputs`), ``None`` when all are real; in the symmetric case
    #: ``mask1`` serves both. Kept by :meth:`replace` (layers that drop the positions
    #: drop them).
    mask1: torch.Tensor | None = None
    mask2: torch.Tensor | None = None
    #: Dense ``(N, P, P)`` graph adjacencies of ``x1`` and ``x2`` for ``Aggregate``
    #: (``adjacency1`` serves both in the symmetric case), or ``None``.
    adjacency1: torch.Tensor | None = None
    adjacency2: torch.Tensor | None = None
    #: The mean of a unit per example and position, ``(N, *sizes)``, for ``x1`` and ``x2``
    #: (``mean1`` serves both in the symmetric case), where it is known and may not be 0:
    #: after an activation of a centred Gaussian, and through the layers that keep it
    #: (sums, global pooling). ``None``: 0 if ``is_gaussian`` (a centred Gaussian),
    #: otherwise unknown. Dropped by :meth:`replace` unless given. Sums of independent
    #: branches need it: their cross moment is the product of their means.
    mean1: torch.Tensor | None = None
    mean2: torch.Tensor | None = None
    #: The listed pairs of a symmetric tile (``nngp`` and ``ntk`` are ``(P, *layout)``),
    #: or ``None`` for the full ``(N1, N2, *layout)`` arrays. Kept by :meth:`replace`.
    pairs: PairList | None = None

    @property
    def symmetric(self) -> bool:
        """Whether this is the kernel of ``x1`` with itself (``x2=None``)."""
        return self.var2 is None

    @property
    def var2_or_var1(self) -> torch.Tensor:
        """The diagonal of the second batch (``var1`` in the symmetric case)."""
        return self.var1 if self.var2 is None else self.var2

    @property
    def second_mean(self) -> torch.Tensor | None:
        """The means of the second batch (``mean1`` in the symmetric case)."""
        return self.mean1 if self.symmetric else self.mean2

    @property
    def mean_known(self) -> bool:
        """True when the units' mean is known (0 for a centred Gaussian, or ``mean1``)."""
        return self.is_gaussian or self.mean1 is not None

    def mean_products(self, other: Kernel) -> tuple[torch.Tensor, torch.Tensor,
                                                    torch.Tensor | None]:
        """``E[a] E[b]' + E[b] E[a]'`` for this branch ``a`` and an independent branch ``b``
        of known means, shaped as ``nngp``, ``var1`` and ``var2``: the cross moments of
        two independent representations, which a sum adds to their kernels."""
        layout = self.layout

        def means(k: Kernel) -> tuple[torch.Tensor, torch.Tensor]:
            if k.mean1 is None:
                zero = torch.zeros_like(layout.positions(k.var1))
                return zero, torch.zeros_like(layout.positions(k.var2_or_var1))
            second = k.second_mean
            assert second is not None
            return k.mean1, second

        a1, a2 = means(self)
        b1, b2 = means(other)

        def outer(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            left, right = self.pair_broadcast(first, second)
            return left * right

        def own(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
            return layout.as_first(first) * layout.as_second(second)

        return (outer(a1, b2) + outer(b1, a2), own(a1, b1) + own(b1, a1),
                None if self.var2 is None else own(a2, b2) + own(b2, a2))

    @property
    def has_masks(self) -> bool:
        """Whether some position of ``x1`` or ``x2`` is marked as padding."""
        return self.mask1 is not None or (not self.symmetric and self.mask2 is not None)

    @property
    def second_mask(self) -> torch.Tensor | None:
        """The mask of the second batch (``mask1`` in the symmetric case)."""
        return self.mask1 if self.symmetric else self.mask2

    @property
    def second_adjacency(self) -> torch.Tensor | None:
        """The adjacency of the second batch (``adjacency1`` in the symmetric case)."""
        return self.adjacency1 if self.symmetric else self.adjacency2

    def masked(self) -> Kernel:
        """This kernel with every entry that involves a masked position set to 0 (itself
        when nothing is masked or there are no positions). Out of place, so autograd can
        record it."""
        if not self.has_masks or not self.layout.sizes:
            return self
        layout, dtype = self.layout, self.nngp.dtype

        def real(mask: torch.Tensor | None, n: int) -> torch.Tensor:
            if mask is None:
                return torch.ones(n, *layout.sizes, dtype=dtype, device=self.nngp.device)
            return mask.to(dtype)

        real1 = real(self.mask1, self.var1.shape[0])
        real2 = real(self.second_mask, self.var2_or_var1.shape[0])
        first, second = self.pair_broadcast(real1, real2)

        def on_self(var: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return var * (layout.as_first(mask) * layout.as_second(mask))

        pair = first * second
        return dataclasses.replace(
            self,
            nngp=self.nngp * pair,
            ntk=None if self.ntk is None else self.ntk * pair,
            var1=on_self(self.var1, real1),
            var2=None if self.var2 is None else on_self(self.var2, real2),
            mean1=None if self.mean1 is None else self.mean1 * real1,
            mean2=None if self.mean2 is None else self.mean2 * real2,
        )

    def replace(self, **changes: Any) -> Kernel:
        """A copy with some fields changed (without the raw inputs and the means unless
        given)."""
        changes.setdefault("raw_inputs", None)
        changes.setdefault("mean1", None)
        changes.setdefault("mean2", None)
        return dataclasses.replace(self, **changes)

    def map_moments(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Kernel:
        """Apply the same map to ``nngp``, ``var1`` and ``var2`` (not to ``ntk``)."""
        return self.replace(
            nngp=fn(self.nngp),
            var1=fn(self.var1),
            var2=None if self.var2 is None else fn(self.var2),
        )

    def map_linear(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Kernel:
        """Apply the same linear map to every moment, ``ntk`` included."""
        return self.map_moments(fn).replace(ntk=None if self.ntk is None else fn(self.ntk))

    def pair_broadcast(
        self, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position values of ``x1`` ``(N1, *sizes)`` and ``x2`` ``(N2, *sizes)``,
        shaped to broadcast against ``nngp`` (for listed pairs, those of each pair's two
        examples)."""
        if self.pairs is not None:
            return (self.layout.as_first(first)[self.pairs.rows],
                    self.layout.as_second(second)[self.pairs.cols])
        return (
            self.layout.as_first(first).unsqueeze(1),
            self.layout.as_second(second).unsqueeze(0),
        )

    def pair_counts(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """Products ``first[i] * second[j]`` of per-example values ``(N1,)``, ``(N2,)`` for
        every pair of examples, shaped as ``nngp``'s batch axes."""
        if self.pairs is not None:
            return first[self.pairs.rows] * second[self.pairs.cols]
        return first.unsqueeze(1) * second.unsqueeze(0)

    def self_entries(self, moments: torch.Tensor) -> torch.Tensor:
        """The entries ``moments[i, i]`` of a symmetric kernel, ``(N, *layout)``: a view of
        full arrays, a copy for listed pairs."""
        if self.pairs is not None:
            return moments[self.pairs.diagonal]
        return batch_diagonal(moments)

    def identical_examples(self) -> torch.Tensor:
        """1.0 for the pairs ``(i, i)`` of a symmetric kernel, 0.0 for the others, shaped
        as ``nngp``'s batch axes."""
        if self.pairs is not None:
            return (self.pairs.rows == self.pairs.cols).to(self.var1.dtype)
        count = self.nngp.shape[0]
        return torch.eye(count, dtype=self.var1.dtype, device=self.var1.device)

    def fill_self_positions(self, moments: torch.Tensor, value: float) -> None:
        """Set the entries of the pairs ``(i, i)`` at equal positions, ``moments[i, i, p,
        p]`` (the variances of a symmetric kernel), to ``value``."""
        if self.pairs is not None:
            self.layout.positions(moments).index_fill_(0, self.pairs.diagonal, value)
        else:
            self.layout.positions(batch_diagonal(moments)).fill_(value)

    def write_self_entries(self, moments: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` ``(N, *layout)`` into the entries ``moments[i, i]``."""
        if self.pairs is not None:
            moments.index_copy_(0, self.pairs.diagonal, values)
        else:
            batch_diagonal(moments).copy_(values)

    def pair_variances(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The variances ``K(x1_i, x1_i)[p, p]`` and ``K(x2_j, x2_j)[p', p']`` of each entry
        of ``nngp``, shaped to broadcast against it."""
        layout = self.layout
        return self.pair_broadcast(
            layout.positions(self.var1), layout.positions(self.var2_or_var1)
        )

    def self_variances(self, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a self-covariance ``var`` (``var1`` or ``var2``): the two variances of each of
        its entries, shaped to broadcast against it."""
        per_position = self.layout.positions(var)
        return self.layout.as_first(per_position), self.layout.as_second(per_position)

    @classmethod
    def from_inputs(
        cls,
        x1: torch.Tensor,
        x2: torch.Tensor | None,
        with_ntk: bool,
        paired: bool = False,
        masks: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        adjacencies: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
        pairs: PairList | None = None,
    ) -> Kernel:
        """The kernel of the raw inputs: ``x . x' / d`` for vectors ``(N, d)``; for images
        ``(N, C, *sizes)`` the channel mean ``sum_c x[c, p] x'[c, p'] / C`` per pair of
        positions (``paired``) or per position.

        The inputs are deterministic, so the NTK (no parameters yet) is zero. ``masks``
        and ``adjacencies`` (checked by :mod:`widenets.side_inputs`; the second ``None``
        when ``x2`` is ``None``) are carried along, and masked positions count as zeros.
        ``pairs``: listed pairs of ``x1`` with itself (images in the paired layout,
        ``x2=None``).
        """
        if x1.ndim == 2:
            return cls._dense_from_inputs(x1, x2, with_ntk)
        mask1, mask2 = masks
        if mask1 is not None:
            x1 = x1 * mask1.unsqueeze(1).to(x1.dtype)
        if x2 is not None and mask2 is not None:
            x2 = x2 * mask2.unsqueeze(1).to(x2.dtype)
        kernel = cls._positional_from_inputs(x1, x2, with_ntk, paired, pairs)
        return dataclasses.replace(kernel, mask1=mask1, mask2=mask2,
                                   adjacency1=adjacencies[0], adjacency2=adjacencies[1])

    @classmethod
    def _positional_from_inputs(
        cls, x1: torch.Tensor, x2: torch.Tensor | None, with_ntk: bool, paired: bool,
        pairs: PairList | None = None,
    ) -> Kernel:
        channels, sizes = x1.shape[1], tuple(x1.shape[2:])
        layout = Layout(sizes, paired)
        first = x1.flatten(2)

        def moments(a: torch.Tensor, b: torch.Tensor, same_example: bool) -> torch.Tensor:
            """Channel means of products, batch axes then ``layout`` axes."""
            batch = "i" if same_example else "ij"
            if not paired:
                out = torch.einsum(f"icp,{batch[-1]}cp->{batch}p", a, b)
                return out.reshape(*out.shape[:-1], *sizes) / channels
            out = torch.einsum(f"icp,{batch[-1]}cq->{batch}pq", a, b)
            lead = len(batch)
            out = out.reshape(*out.shape[:lead], *sizes, *sizes)
            interleaved = [*range(lead)]
            for d in range(len(sizes)):
                interleaved += [lead + d, lead + len(sizes) + d]
            return out.permute(interleaved).contiguous() / channels

        var1 = moments(first, first, same_example=True)
        if pairs is not None:
            # each pair from its two examples, unless that gathers more numbers (channels
            # than positions) than the full moments, whose pairs are read then
            if channels <= first.shape[2]:
                nngp = moments(first[pairs.rows], first[pairs.cols], same_example=True)
            else:
                nngp = moments(first, first, same_example=False)[pairs.rows, pairs.cols]
            nngp.index_copy_(0, pairs.diagonal, var1)
            var2 = None
        elif x2 is None:
            nngp = moments(first, first, same_example=False)
            batch_diagonal(nngp).copy_(var1)
            var2 = None
        else:
            second = x2.flatten(2)
            nngp = moments(first, second, same_example=False)
            var2 = moments(second, second, same_example=True)
        ntk = torch.zeros_like(nngp) if with_ntk else None
        return cls(nngp, ntk, var1, var2, channels, is_gaussian=False, sources=frozenset(),
                   layout=layout, pairs=pairs)

    @classmethod
    def _dense_from_inputs(
        cls, x1: torch.Tensor, x2: torch.Tensor | None, with_ntk: bool
    ) -> Kernel:
        kernel = cls.weighted_inputs(x1, x2, with_ntk)
        return dataclasses.replace(kernel, raw_inputs=(x1, x2))

    @classmethod
    def weighted_inputs(
        cls,
        x1: torch.Tensor,
        x2: torch.Tensor | None,
        with_ntk: bool,
        metric: torch.Tensor | None = None,
    ) -> Kernel:
        """The kernel ``x M x'^T / d`` of vector inputs ``(N, d)``: ``M`` the identity
        (``metric=None``), ``diag(metric)`` (a vector of ``d`` non-negative weights) or
        ``metric`` (a symmetric positive semi-definite ``(d, d)`` matrix)."""
        d = x1.shape[1]
        f2 = x1 if x2 is None else x2

        def weighted(x: torch.Tensor) -> torch.Tensor:
            if metric is None:
                return x
            return x * metric if metric.ndim == 1 else x @ metric

        w1 = weighted(x1)
        nngp = w1 @ f2.T / d
        var1 = (w1 * x1).sum(dim=1) / d
        if x2 is None:
            nngp = 0.5 * (nngp + nngp.T)
            nngp.diagonal().copy_(var1)
            var2 = None
        else:
            var2 = (weighted(f2) * f2).sum(dim=1) / d
        ntk = torch.zeros_like(nngp) if with_ntk else None
        return cls(nngp, ntk, var1, var2, d, is_gaussian=False, sources=frozenset())


@dataclass(frozen=True)
class Kernels:
    """Several kernels of one computation: ``k.nngp`` and ``k.ntk`` (``None`` if not asked)."""

    nngp: torch.Tensor | None = None
    ntk: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return getattr(self, name)
