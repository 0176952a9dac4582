"""Monte Carlo estimates of the kernels: averages over sampled finite twins."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import overload

import torch
from torch import nn
from tqdm.auto import tqdm

from .empirical import empirical_nngp, empirical_ntk, one_pass_ntk
from .engine import channels_first, checked_side_inputs, reads_channels_last
from .inputs import as_input_pair, check_positive_int, parse_get
from .kernel import Kernels
from .layers.base import Layer
from .layers.combinators import SequentialModule
from .side_inputs import finite_side_inputs


@overload
def monte_carlo_kernel(
    net: Layer,
    x1: object,
    x2: object | None = None,
    get: str = "ntk",
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    mask1: object | None = None,
    mask2: object | None = None,
    adjacency1: object | None = None,
    adjacency2: object | None = None,
) -> torch.Tensor: ...


@overload
def monte_carlo_kernel(
    net: Layer,
    x1: object,
    x2: object | None,
    get: tuple[str, ...],
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    mask1: object | None = None,
    mask2: object | None = None,
    adjacency1: object | None = None,
    adjacency2: object | None = None,
) -> Kernels: ...


@overload
def monte_carlo_kernel(
    net: Layer,
    x1: object,
    x2: object | None = None,
    *,
    get: tuple[str, ...],
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
    mask1: object | None = None,
    mask2: object | None = None,
    adjacency1: object | None = None,
    adjacency2: object | None = None,
) -> Kernels: ...


def monte_carlo_kernel(
    net: Layer,
    x1: object,
    x2: object | None = None,
    get: str | tuple[str, ...] = "ntk",
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
    *,
    mask1: object | None = None,
    mask2: object | None = None,
    adjacency1: object | None = None,
    adjacency2: object | None = None,
) -> torch.Tensor | Kernels:
    """Average the empirical kernels (mean over outputs) of ``n_samples`` finite twins.

    Each twin is ``net.build(x1.shape[1:], generator)`` in the dtype and on the device
    of the inputs. Converges to ``net.kernel(x1, x2, get)`` as the widths grow. The
    NTK error has a standard deviation of order ``1 / sqrt(width * n_samples)``. The
    empirical NNGP is a product of outputs, so its noise is of order
    ``1 / sqrt(outputs * n_samples)`` whatever the width: estimate an NNGP with a wide
    read-out layer (many outputs) or many samples.

    Safe to call from several threads on one ``net`` (``net`` is only read; each twin is
    private to its call). Give each thread its own ``generator``: draws from a shared one
    interleave in an unpredictable order. Raises ``ValueError`` if a twin's kernel
    overflows the dtype (see :func:`~widenets.empirical_ntk`).

    A network with ``Dropout`` (:func:`widenets.testing.has_noise_on_self_pairs`) is run
    in training mode with one forward pass per batch (``widenets.empirical.one_pass_ntk``
    for the NTK), whose masks come from torch's global random generator: seed it
    (``torch.manual_seed``) for reproducible estimates.

    ``mask1``, ``mask2``, ``adjacency1``, ``adjacency2``: as for ``net.kernel``. The twins
    receive them with each example (carried as extra input channels that the twin strips
    off, so every way of computing the empirical kernels sees them).
    """
    if not isinstance(net, Layer):
        raise TypeError(f"net must be a widenets layer, got {type(net).__name__}")
    names = parse_get(get)
    n_samples = check_positive_int(n_samples, "n_samples")
    t1, t2 = as_input_pair(x1, x2, layout_warning=not reads_channels_last(net))
    net, t1, t2 = channels_first(net, t1, t2)
    side = checked_side_inputs(t1, t2, (mask1, mask2), (adjacency1, adjacency2))
    for layer in net.walk():
        layer.check_masks(side[0], side[1])
    carried = CarriedLayout.needed(side, t1)
    if carried is not None:
        t1 = carried.attach(t1, side[0], side[2])
        t2 = None if t2 is None else carried.attach(t2, side[1], side[3])
    totals: dict[str, torch.Tensor] = {}
    noisy = has_noise_on_self_pairs(net)
    for _ in tqdm(range(n_samples), disable=not progress, desc="monte carlo", unit="net"):
        shape = tuple(t1.shape[1:]) if carried is None else carried.input_shape
        model = net.build(shape, generator, dtype=t1.dtype, device=t1.device)
        if carried is not None:
            model = SideChannels(model, carried)
        for name in names:
            with warnings.catch_warnings():
                if carried is not None:  # the carried channels are ours; x1, x2 were checked
                    warnings.filterwarnings("ignore", message=".*channels last",
                                            category=UserWarning)
                if name == "nngp":
                    value = empirical_nngp(model, t1, t2)
                elif noisy:  # dropout: one pass per batch keeps its masks fixed
                    value = one_pass_ntk(model, t1, t2)
                else:
                    value = empirical_ntk(model, t1, t2)
            totals[name] = value if name not in totals else totals[name] + value
    means = {name: total / n_samples for name, total in totals.items()}
    if isinstance(get, str):
        return means[get]
    return Kernels(**means)


def has_noise_on_self_pairs(net: Layer) -> bool:
    """Whether a layer of ``net`` (itself or a sublayer, :meth:`~widenets.Layer.walk`)
    declares ``noise_on_self_pairs = True``: its finite twin draws fresh noise for every
    example in each forward pass (``Dropout``), so ``kernel(x1)`` carries extra variance on
    the entries that pair an input with itself, which ``kernel(x1, x1)`` (two calls,
    independent noise) does not. A layer declares it as a class attribute or a property;
    it is looked up with ``getattr``, so layers without it are noise-free."""
    return any(getattr(layer, "noise_on_self_pairs", False) for layer in net.walk())


@dataclass(frozen=True)
class CarriedLayout:
    """How :class:`SideChannels` lays side inputs out as extra channels of inputs
    ``(N, channels, *sizes)``: the data, then ``P`` channels of adjacency rows (if
    ``adjacency``), then one of mask (if ``mask``)."""

    channels: int
    sizes: tuple[int, ...]
    mask: bool
    adjacency: bool

    @classmethod
    def needed(cls, side: tuple[torch.Tensor | None, ...], x: torch.Tensor
               ) -> CarriedLayout | None:
        """The layout for checked side inputs ``(mask1, mask2, adjacency1, adjacency2)``
        of inputs like ``x``, or ``None`` when there are none."""
        mask1, mask2, adjacency1, _ = side
        if all(value is None for value in side):
            return None
        return cls(x.shape[1], tuple(x.shape[2:]), mask1 is not None or mask2 is not None,
                   adjacency1 is not None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-example shape of the data alone."""
        return (self.channels, *self.sizes)

    def attach(self, x: torch.Tensor, mask: torch.Tensor | None,
               adjacency: torch.Tensor | None) -> torch.Tensor:
        """``x`` with the side inputs appended as channels (no mask: all positions real)."""
        n = x.shape[0]
        parts = [x]
        if self.adjacency:
            assert adjacency is not None  # (given for both inputs or neither: checked)
            parts.append(adjacency.to(x.dtype).reshape(n, -1, *self.sizes))
        if self.mask:
            real = torch.ones(n, *self.sizes, dtype=torch.bool, device=x.device) \
                if mask is None else mask
            parts.append(real.unsqueeze(1).to(x.dtype))
        return torch.cat(parts, dim=1)


class SideChannels(nn.Module):
    """A finite twin fed with its side inputs as extra channels of each example, so that
    the empirical kernels (which slice, batch and ``vmap`` examples) carry them along:
    the adjacency row of node ``i`` is channel ``C + i`` over the positions, the mask the
    last channel (:meth:`CarriedLayout.attach`). The forward pass strips them off and
    runs the twin with them."""

    def __init__(self, model: nn.Module, layout: CarriedLayout) -> None:
        super().__init__()
        self.model = model if isinstance(model, SequentialModule) else SequentialModule([model])
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        data = x[:, : layout.channels]
        adjacency = None
        if layout.adjacency:
            positions = math.prod(layout.sizes)
            adjacency = x[:, layout.channels:layout.channels + positions].flatten(2)
        mask = x[:, -1] > 0.5 if layout.mask else None
        with finite_side_inputs(mask, adjacency):
            return self.model.run(data)
