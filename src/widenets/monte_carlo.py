"""Monte Carlo estimates of the kernels: averages over sampled finite twins."""

from __future__ import annotations

from typing import overload

import torch
from tqdm.auto import tqdm

from .empirical import empirical_nngp, empirical_ntk
from .inputs import as_input_pair, check_positive_int, parse_get
from .kernel import Kernels
from .layers.base import Layer


@overload
def monte_carlo_kernel(
    net: Layer,
    x1: object,
    x2: object | None = None,
    get: str = "ntk",
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
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
) -> Kernels: ...


def monte_carlo_kernel(
    net: Layer,
    x1: object,
    x2: object | None = None,
    get: str | tuple[str, ...] = "ntk",
    n_samples: int = 64,
    generator: torch.Generator | None = None,
    progress: bool = False,
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
    """
    if not isinstance(net, Layer):
        raise TypeError(f"net must be a widenets layer, got {type(net).__name__}")
    names = parse_get(get)
    n_samples = check_positive_int(n_samples, "n_samples")
    t1, t2 = as_input_pair(x1, x2)
    totals: dict[str, torch.Tensor] = {}
    for _ in tqdm(range(n_samples), disable=not progress, desc="monte carlo", unit="net"):
        model = net.build(tuple(t1.shape[1:]), generator, dtype=t1.dtype, device=t1.device)
        for name in names:
            fn = empirical_ntk if name == "ntk" else empirical_nngp
            value = fn(model, t1, t2)
            totals[name] = value if name not in totals else totals[name] + value
    means = {name: total / n_samples for name, total in totals.items()}
    if isinstance(get, str):
        return means[get]
    return Kernels(**means)
