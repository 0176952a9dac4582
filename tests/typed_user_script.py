"""A user's script written against widenets' public API, type-checked by mypy in
``tests/test_typing.py`` (and run there): it pins the types users see, e.g. that
``net.kernel(x, get="ntk")`` is a ``torch.Tensor`` and that ``get=("nngp", "ntk")``
gives :class:`widenets.Kernels`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import widenets as wn


def architecture(width: int = 64) -> wn.Layer:
    """A two-layer ReLU network."""
    return wn.Sequential(wn.Linear(width), wn.ReLU(), wn.Linear(1))


def kernels(net: wn.Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The NTK as a tensor, and the NNGP read from a :class:`widenets.Kernels`."""
    ntk: torch.Tensor = net.kernel(x, get="ntk")
    default: torch.Tensor = net.kernel(x, x, progress=False)
    both: wn.Kernels = net.kernel(x, get=("nngp", "ntk"))
    nngp = both.nngp  # Kernels' fields are Optional: None when not asked for
    assert nngp is not None
    positional: wn.Kernels = net.kernel(x, None, ["nngp"], dtype=torch.float64)
    assert positional.nngp is not None and positional.nngp.shape == default.shape
    return ntk, nngp


def empirical(x: torch.Tensor) -> torch.Tensor:
    """The empirical NTK of a finite twin."""
    model: nn.Module = architecture().build(x.shape[1], torch.Generator().manual_seed(0))
    return wn.empirical_ntk(model, x, progress=False)


def posterior(net: wn.Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The GP posterior mean and covariance on the training inputs."""
    predict: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = (
        wn.predict.gp_inference(net, x, y, diag_reg=1e-4))
    mean, cov = predict(x, get="nngp", compute_cov=True)
    assert cov is not None
    return mean + cov.diagonal()[:, None]


def main() -> None:
    """Run every step on a few random examples."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = x[:, :1] ** 2
    net = architecture()
    ntk, nngp = kernels(net, x)
    assert ntk.shape == nngp.shape == empirical(x).shape == (6, 6)
    assert posterior(net, x, y).shape == (6, 1)


if __name__ == "__main__":
    main()
