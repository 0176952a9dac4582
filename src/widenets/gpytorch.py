r"""The kernels of infinitely wide networks as GPyTorch kernels.

:class:`NetworkKernel` wraps a widenets architecture as a ``gpytorch.kernels.Kernel``:
its covariance is the network's exact NNGP (or NTK), and the weight and bias scales
``W_std``, ``b_std`` of its ``Linear`` and convolution layers become GPyTorch
parameters, positive through ``gpytorch.constraints.Positive()`` (a softplus), that
``gpytorch.mlls.ExactMarginalLogLikelihood`` and a ``torch.optim`` optimiser fit
(type-II maximum likelihood)::

    import gpytorch
    import torch
    import widenets as wn
    from widenets.gpytorch import NetworkKernel

    torch.manual_seed(0)
    x = torch.rand(40, 1, dtype=torch.float64) * 6 - 3
    y = torch.sin(2 * x[:, 0]) + 0.1 * torch.randn(40, dtype=torch.float64)

    class WideNetworkGP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            net = wn.Sequential(wn.Linear(512, W_std=1.5, b_std=0.5), wn.Erf(),
                                wn.Linear(1, W_std=1.5, b_std=0.1))
            self.covar_module = NetworkKernel(net, get="nngp")

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x))

    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = WideNetworkGP(x, y, likelihood).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train(); likelihood.train()
    for _ in range(50):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()

    model.eval(); likelihood.eval()
    x_test = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    with torch.no_grad():
        predictive = likelihood(model(x_test))     # mean, variance (noise included)
    print(model.covar_module.hyperparameter_values())   # {'0.W_std': ..., '0.b_std': ...}

The GPyTorch inputs are ``(..., N, D)`` tensors; images are given flattened, with
``input_shape=(C, H, W)`` to unflatten them for the network. gpytorch is an optional
dependency (the ``gpytorch`` extra: ``pip install 'widenets[gpytorch]'``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from .optional import require

try:
    import gpytorch
except ModuleNotFoundError:
    require("gpytorch", "gpytorch", "widenets.gpytorch")  # names the extra if it is missing
    raise

from .layers.base import Layer
from .layers.dense import WeightedLayer
from .requirements import network_needs

__all__ = ["NetworkKernel"]

KERNELS = ("nngp", "ntk")
#: The hyperparameters of a weighted layer (``Linear``, ``Conv1d/2d/3d``) that become
#: GPyTorch parameters.
HYPERPARAMETERS = ("W_std", "b_std")
#: Examples per block when the diagonal is computed: a block of ``B`` examples costs
#: ``B (B + 1) / 2`` pairs and one call, so the diagonal of ``N`` examples costs about
#: ``N B / 2`` pairs (the full matrix: ``N^2 / 2``) in ``N / B`` calls. Measured on one
#: CPU thread, 3000 inputs of a two-hidden-layer ReLU network: 0.024 s (B = 128),
#: 0.034 s (64), 1.6 s (1), 0.2 s for the full matrix.
DIAGONAL_BLOCK = 128
#: The same for images whose network pools (the full spatial covariance: a pair costs
#: ``P^2`` numbers for ``P`` positions). 200 8x8 images, one convolution and global
#: pooling: 0.18 s (B = 4), 0.33 s (1), 0.43 s (16), 3 s for the full matrix.
POOLED_DIAGONAL_BLOCK = 4
#: The same for images whose network does not pool (``P`` numbers a pair): the same
#: images through ``Flatten``: 0.025 s (B = 16), 0.19 s (1), 0.06 s for the full matrix.
SPATIAL_DIAGONAL_BLOCK = 16


def _paths(layer: Layer, path: str = "") -> list[tuple[str, Layer]]:
    """``(path, layer)`` for ``layer`` and all its sublayers, depth first, with the path
    names of :meth:`widenets.Layer.hyperparameters` (``""``, ``"2"``, ``"1.0"``...)."""
    found = [(path, layer)]
    for index, sub in enumerate(layer.sublayers()):
        found += _paths(sub, f"{path}.{index}" if path else str(index))
    return found


def _qualified(path: str, name: str) -> str:
    """The name of hyperparameter ``name`` of the layer at ``path``: ``"0.W_std"``."""
    return f"{path}.{name}" if path else name


def _raw_name(path: str, name: str) -> str:
    """The GPyTorch parameter name: ``raw_W_std_0``, ``raw_b_std_1_0``, ``raw_W_std``."""
    return f"raw_{name}_{path.replace('.', '_')}" if path else f"raw_{name}"


class NetworkKernel(gpytorch.kernels.Kernel):
    r"""The exact NNGP or NTK of a widenets architecture as a GPyTorch kernel.

    Args:
        net: a widenets architecture (a :class:`widenets.Layer`) with one output; it is
            not modified.
        get: ``"nngp"`` (default: the prior of the Bayesian network, Lee et al. 2018) or
            ``"ntk"`` (the neural tangent kernel used as a GP covariance).
        input_shape: the per-example shape the network takes, e.g. ``(C, H, W)`` for
            images, which GPyTorch cannot batch as such: the inputs are then given
            flattened, ``(N, C*H*W)``, and unflattened here. ``None`` (default): the
            inputs ``(N, features)`` as they are.
        active_dims: passed to ``gpytorch.kernels.Kernel`` (the input columns used).

    ``forward(x1, x2)`` is ``net.kernel(x1, x2, get=get)`` (``x2`` equal to ``x1``:
    ``net.kernel(x1, None)``, exactly symmetric at half the cost), and its diagonal for
    ``diag=True`` (GPyTorch's predictive variances) is computed without the full
    matrix: as the diagonals of the kernels of blocks of ``B`` consecutive inputs
    (``B`` = 128 for vectors, 16 for images, 4 for images through pooling), about
    ``N B / 2`` pairs for ``N`` inputs instead of ``N^2 / 2``, with the values of the
    full matrix's diagonal (to rounding).
    Leading batch dimensions of the inputs (broadcast against each other) are
    computed batch by batch; ``last_dim_is_batch=True`` is refused.

    **Hyperparameters.** For every ``W_std`` and ``b_std`` of a weighted layer
    (``Linear``, ``Conv1d``, ``Conv2d``, ``Conv3d``; ``b_std=None``, no bias, has none)
    the kernel registers a raw parameter with a ``gpytorch.constraints.Positive()``
    constraint, initialised to the layer's value (a number or a tensor's value) and
    named by the layer's path in ``net``: ``raw_W_std_0``, ``raw_b_std_2``,
    ``raw_W_std_1_0`` (the path ``"1.0"``); ``raw_W_std`` for a single layer. Every
    forward uses the constrained values, so gradients reach the raw parameters and the
    optimiser, priors (``register_prior``) and ``requires_grad_(False)`` (to fix one)
    work as for any GPyTorch parameter. :meth:`hyperparameter_values` gives the
    constrained values by the names of :meth:`widenets.Layer.hyperparameters`
    (``"0.W_std"``), :attr:`parameter_names` the raw parameter of each, and
    :meth:`network` the architecture with the current values.

    One tensor object given to several layers (``W_std=w`` for all of them), or to
    both ``W_std`` and ``b_std``, and one layer object used at several places, become
    one GPyTorch parameter (named after its first place): the values stay tied. Equal
    numbers are not tied. A value of exactly 0 (a ``b_std`` tensor of 0) cannot be
    made positive and is refused: use ``b_std=None`` for no bias. The tensors the user
    gave are not used afterwards (the kernel holds its own parameters); other
    hyperparameters given as tensors (of activations, say) are used as they are, and
    are not GPyTorch parameters.
    """

    has_lengthscale = False

    def __init__(
        self,
        net: Layer,
        get: str = "nngp",
        *,
        input_shape: Sequence[int] | None = None,
        active_dims: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(net, Layer):
            raise TypeError(
                "net must be a widenets architecture (a widenets.Layer, e.g. "
                f"wn.Sequential(wn.Linear(512), wn.ReLU(), wn.Linear(1))), got "
                f"{type(net).__name__}"
            )
        if not isinstance(get, str) or get not in KERNELS:
            raise ValueError(f"get must be 'nngp' or 'ntk', got {get!r}")
        super().__init__(active_dims=active_dims)
        self.get = get
        self.input_shape = None if input_shape is None else _check_shape(input_shape)
        # The kernel's own copy of the architecture: its weighted layers get the
        # constrained parameter values at each forward. Tensors of other layers are kept
        # (not copied); the user's W_std and b_std are not used after this.
        memo: dict[int, Any] = {id(t): t for t in net.hyperparameters().values()}
        self._net: Layer = copy.deepcopy(net, memo)
        #: (layer of the copy, attribute, raw parameter name), for every hyperparameter
        self._slots: list[tuple[WeightedLayer, str, str]] = []
        #: the raw parameter name of every hyperparameter, by its path name ("0.W_std")
        self.parameter_names: dict[str, str] = {}
        tied: dict[Any, str] = {}  # id(tensor) or (id(layer), attribute) -> raw name
        for (path, layer), (_, own) in zip(_paths(net), _paths(self._net)):
            if not isinstance(layer, WeightedLayer):
                continue
            assert isinstance(own, WeightedLayer)  # the copy has the same structure
            for name in HYPERPARAMETERS:
                value = getattr(layer, name)
                if value is None:
                    continue
                key = id(value) if isinstance(value, torch.Tensor) else (id(layer), name)
                raw = tied.get(key)
                if raw is None:
                    raw = tied[key] = _raw_name(path, name)
                    self._register(raw, value, _qualified(path, name))
                self._slots.append((own, name, raw))
                self.parameter_names[_qualified(path, name)] = raw
        self._set(detach=True)

    def _register(self, raw: str, value: float | torch.Tensor, where: str) -> None:
        """Register raw parameter ``raw`` with a positivity constraint, at ``value``."""
        if isinstance(value, torch.Tensor):
            initial = value.detach().clone()
        else:
            initial = torch.tensor(value, dtype=torch.float64)
        if not float(initial) > 0:
            raise ValueError(
                f"{where} is {float(initial):g}, but a GPyTorch hyperparameter is "
                "constrained to be positive: give a positive value (b_std=None: no bias)"
            )
        constraint = gpytorch.constraints.Positive()
        self.register_parameter(raw, torch.nn.Parameter(constraint.inverse_transform(initial)))
        self.register_constraint(raw, constraint)

    def _constrained(self, raw: str) -> torch.Tensor:
        constraint = getattr(self, f"{raw}_constraint")
        return constraint.transform(getattr(self, raw))

    def hyperparameter_values(self) -> dict[str, torch.Tensor]:
        """The constrained values (0-d tensors, in the autograd graph) of the
        hyperparameters, by the names of :meth:`widenets.Layer.hyperparameters`:
        ``{"0.W_std": ..., "0.b_std": ..., "2.W_std": ...}``; tied ones under each name."""
        return {name: self._constrained(raw) for name, raw in self.parameter_names.items()}

    def network(self) -> Layer:
        """A copy of the architecture with the current hyperparameter values as numbers:
        a widenets network for :mod:`widenets.predict`, a finite twin (``build``) and the
        rest of widenets, e.g. after fitting the hyperparameters."""
        layers = [layer for layer, _, _ in self._slots]
        fitted, copies = copy.deepcopy((self._net, layers))
        for own, (_, name, raw) in zip(copies, self._slots):
            setattr(own, name, float(self._constrained(raw).detach()))
        return fitted

    def _set(self, detach: bool) -> None:
        """Give the kernel's architecture the constrained hyperparameter values: in the
        autograd graph for a forward, or detached (leaves, which ``copy.deepcopy`` and
        pickling accept) at rest."""
        values = {raw: self._constrained(raw) for _, _, raw in self._slots}
        for layer, name, raw in self._slots:
            setattr(layer, name, values[raw].detach() if detach else values[raw])

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        diag: bool = False,
        last_dim_is_batch: bool = False,
        **params: Any,
    ) -> torch.Tensor:
        if last_dim_is_batch:
            raise NotImplementedError(
                "NetworkKernel does not support last_dim_is_batch=True (deprecated in "
                "GPyTorch): a network kernel depends on all input dimensions together"
            )
        if x1.shape[-1] != x2.shape[-1]:
            raise ValueError(
                f"x1 and x2 must have the same number of features, got {x1.shape[-1]} and "
                f"{x2.shape[-1]}"
            )
        self._set(detach=False)
        try:
            if x1.ndim <= 2 and x2.ndim <= 2:
                return self._kernel(x1, x2, diag)
            batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
            b1 = x1.expand(*batch, *x1.shape[-2:]).reshape(-1, *x1.shape[-2:])
            b2 = x2.expand(*batch, *x2.shape[-2:]).reshape(-1, *x2.shape[-2:])
            same = x1 is x2
            out = torch.stack([self._kernel(a, a if same else b, diag) for a, b in zip(b1, b2)])
            return out.reshape(*batch, *out.shape[1:])
        finally:
            self._set(detach=True)

    def _kernel(self, x1: torch.Tensor, x2: torch.Tensor, diag: bool) -> torch.Tensor:
        """The kernel (or its diagonal) of ``(N, D)`` inputs."""
        net = self._net
        symmetric = _same(x1, x2)
        x1 = self._unflatten(x1)
        x2 = x1 if symmetric else self._unflatten(x2)
        if not diag:
            return net.kernel(x1, None if symmetric else x2, get=self.get)
        if x1.shape[0] != x2.shape[0]:
            raise ValueError(
                f"diag=True needs as many inputs in x1 as in x2, got {x1.shape[0]} and "
                f"{x2.shape[0]}"
            )
        if x1.shape[0] == 0:
            return x1.new_zeros(0)
        if x1.ndim == 2:
            block = DIAGONAL_BLOCK
        elif network_needs(net.walk()).full_covariance:
            block = POOLED_DIAGONAL_BLOCK
        else:
            block = SPATIAL_DIAGONAL_BLOCK
        parts = [
            net.kernel(x1[i:i + block], None if symmetric else x2[i:i + block],
                       get=self.get).diagonal()
            for i in range(0, x1.shape[0], block)
        ]
        return torch.cat(parts)

    def _unflatten(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape is None:
            return x
        if x.shape[-1] != math.prod(self.input_shape):
            raise ValueError(
                f"inputs of input_shape={self.input_shape} are given flattened, with "
                f"{math.prod(self.input_shape)} features, got {x.shape[-1]}"
            )
        return x.reshape(x.shape[0], *self.input_shape)

    def extra_repr(self) -> str:
        return f"net={self._net!r}, get={self.get!r}"


def _same(x1: torch.Tensor, x2: torch.Tensor) -> bool:
    """Whether ``x2`` is ``x1`` (so the kernel is symmetric and ``x2=None`` is exact): the
    same tensor, or equal values when no gradient is to reach either one separately."""
    if x2 is x1:
        return True
    return (x1.shape == x2.shape and not (x1.requires_grad or x2.requires_grad)
            and bool(torch.equal(x1, x2)))


def _check_shape(shape: object) -> tuple[int, ...]:
    if not (isinstance(shape, Sequence) and shape
            and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {shape!r}")
    return tuple(shape)
