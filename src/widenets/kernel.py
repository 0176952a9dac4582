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
* ``sources``: tokens of the weighted layers whose fresh weights the representation
  depends on *directly* (a weighted layer replaces them by its own token). Two
  branches with disjoint sources are independent in the limit, which ``FanInSum``
  and ``FanInProd`` need to be exact.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

_tokens = itertools.count()


def new_source() -> int:
    """A fresh token for the weights of one weighted-layer application."""
    return next(_tokens)


@dataclass(frozen=True)
class Kernel:
    """Second moments of one unit of a representation, for a pair of input batches."""

    nngp: torch.Tensor
    ntk: torch.Tensor | None
    var1: torch.Tensor
    var2: torch.Tensor | None
    width: int
    is_gaussian: bool
    sources: frozenset[int]

    @property
    def symmetric(self) -> bool:
        """Whether this is the kernel of ``x1`` with itself (``x2=None``)."""
        return self.var2 is None

    @property
    def var2_or_var1(self) -> torch.Tensor:
        """The diagonal of the second batch (``var1`` in the symmetric case)."""
        return self.var1 if self.var2 is None else self.var2

    def replace(self, **changes: object) -> Kernel:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def map_moments(self, fn) -> Kernel:
        """Apply the same elementwise map to ``nngp``, ``var1`` and ``var2``."""
        return self.replace(
            nngp=fn(self.nngp),
            var1=fn(self.var1),
            var2=None if self.var2 is None else fn(self.var2),
        )

    @classmethod
    def from_inputs(cls, x1: torch.Tensor, x2: torch.Tensor | None, with_ntk: bool) -> Kernel:
        """The kernel of the raw inputs, flattened to features: ``x . x' / d``.

        The inputs are deterministic, so the NTK (no parameters yet) is zero.
        """
        f1 = x1.reshape(x1.shape[0], -1)
        d = f1.shape[1]
        f2 = f1 if x2 is None else x2.reshape(x2.shape[0], -1)
        nngp = f1 @ f2.T / d
        var1 = (f1 * f1).sum(dim=1) / d
        if x2 is None:
            nngp = 0.5 * (nngp + nngp.T)
            nngp.diagonal().copy_(var1)
            var2 = None
        else:
            var2 = (f2 * f2).sum(dim=1) / d
        ntk = torch.zeros_like(nngp) if with_ntk else None
        return cls(nngp, ntk, var1, var2, d, is_gaussian=False, sources=frozenset())


@dataclass(frozen=True)
class Kernels:
    """Several kernels of one computation: ``k.nngp`` and ``k.ntk`` (``None`` if not asked)."""

    nngp: torch.Tensor | None = None
    ntk: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return getattr(self, name)
