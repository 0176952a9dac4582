"""What layers declare they need, and how the engine checks and combines it.

Each layer class declares a :class:`Needs` (its class attribute ``needs``). The kernel
rules are exact only when these hold, so they are checked before a layer's rule runs
(:func:`check_input`, called by ``Layer.transform``), with errors that say what to change:

* ``input``: one kernel (``"single"``, the default), parallel branches after ``FanOut``
  (``"branches"``: the ``FanIn`` layers, ``Parallel``) or either (``"any"``: layers that
  pass their input on, such as ``Sequential`` and ``Identity``);
* ``gaussian_input``: the input is a centred Gaussian process in the limit, i.e. it
  comes straight from a weighted layer (activations, ``LayerNorm``): after a
  nonlinearity the features have a mean that the kernel does not determine;
* ``independent_branches``: ``"sum"`` (``FanInSum``: branches pairwise independent and
  in each pair one centred Gaussian, so that every cross moment vanishes, or both of
  known means, whose products are the cross moments) or
  ``"product"`` (``FanInProd``: pairwise independent);
* ``full_covariance``: the rule mixes positions of an image (pooling), so the covariance
  of every pair of positions must flow through the network, not only its diagonal.
  This one concerns the whole computation: :func:`network_needs` combines the
  declarations of all layers, and the engine chooses the spatial layout from it.

Weight identity: every application of a weighted layer's weights has a
:class:`WeightIdentity`; a representation carries the identities of the weights it
depends on directly (``Kernel.sources``), and two branches are independent exactly when
they share none. A new identity for each application is the default (the finite twin
of a layer used twice has two weight matrices); a layer that reuses one identity (the
same weights at every step of a recurrent network) ties them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from typing import Any, cast

from .kernel import Kernel

INPUT_KINDS = ("single", "branches", "any")
INDEPENDENCE_KINDS = (None, "sum", "product")

_tokens = itertools.count()


class WeightIdentity:
    """The identity of one set of weights: two uses of one identity are the same weights
    (tied); a fresh identity is independent of every other."""

    __slots__ = ("token",)

    def __init__(self) -> None:
        self.token = next(_tokens)

    def __repr__(self) -> str:
        return f"WeightIdentity({self.token})"


@dataclass(frozen=True)
class Needs:
    """What a layer needs of its input (see the module docstring)."""

    input: str = "single"
    gaussian_input: bool = False
    independent_branches: str | None = None
    full_covariance: bool = False

    def __post_init__(self) -> None:
        if self.input not in INPUT_KINDS:
            raise ValueError(f"input must be one of {INPUT_KINDS}, got {self.input!r}")
        if self.independent_branches not in INDEPENDENCE_KINDS:
            raise ValueError(f"independent_branches must be one of {INDEPENDENCE_KINDS}, "
                             f"got {self.independent_branches!r}")

    def __or__(self, other: Needs) -> Needs:
        """The needs of a computation containing both (only ``full_covariance`` spans a
        whole computation; the others are checked layer by layer)."""
        return Needs(input="any", full_covariance=self.full_covariance or other.full_covariance)


NO_NEEDS = Needs(input="any")


def network_needs(layers: Iterable[Any]) -> Needs:
    """The needs of a computation made of ``layers`` (e.g. ``net.walk()``) combined."""
    combined = NO_NEEDS
    for layer in layers:
        combined = combined | layer.needs
    return combined


def check_input(layer: Any, k: Kernel | tuple[Any, ...]) -> None:
    """Raise a ``ValueError`` saying what to change unless the kernel state ``k`` meets
    what ``layer`` declares in ``layer.needs``."""
    needs, name = layer.needs, type(layer).__name__
    if needs.input == "single" and not isinstance(k, Kernel):
        raise ValueError(
            f"{name} got {len(k)} parallel branches; use Parallel to apply layers per "
            "branch, or a FanIn layer to merge them"
        )
    if needs.input == "branches" and isinstance(k, Kernel):
        raise ValueError(f"{name} needs parallel branches: use FanOut first")
    # a Kernel here: the layers that need a Gaussian input need a single input
    if needs.gaussian_input and not cast(Kernel, k).is_gaussian:
        raise ValueError(f"{name} needs {layer.gaussian_input_advice}")
    if needs.full_covariance and isinstance(k, Kernel) and k.layout.sizes and not (
            k.layout.paired):
        raise ValueError(
            f"{name} needs the full spatial covariance; call kernel with spatial='auto' or "
            "'full', not 'diagonal'"
        )
    if needs.independent_branches is not None:
        # branches here: the layers that need independent branches need branches
        _check_independent(name, needs.independent_branches, cast(tuple, k))


def independent(a: Kernel, b: Kernel) -> bool:
    """Independent in the limit: no weights in common, and not both deterministic."""
    return not (a.sources & b.sources) and bool(a.sources or b.sources)


def _check_independent(name: str, kind: str, branches: tuple) -> None:
    for (i, a), (j, b) in combinations(enumerate(branches), 2):
        if not isinstance(a, Kernel) or not isinstance(b, Kernel):
            continue  # nested branches: the layer refuses them itself
        if kind == "sum" and not (independent(a, b) and (
                a.is_gaussian or b.is_gaussian or (a.mean_known and b.mean_known))):
            raise ValueError(
                f"{name}: branches {i} and {j} have a cross moment that their kernels do not "
                "determine; each pair needs one branch that ends with its own Linear layer "
                "(e.g. Residual(Sequential(ReLU(), Linear(...)))), or two independent "
                "branches that each end with an activation of a Linear layer's output"
            )
        if kind == "product" and not independent(a, b):
            raise ValueError(
                f"{name}: branches {i} and {j} are not independent (they share weights or "
                "are both deterministic); give each its own Linear layer"
            )
