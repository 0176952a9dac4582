"""Named architectures: the one place where the networks that the estimators, the command
line, the demo, the lazy-training experiment and the benchmarks share are written; and
the operations on architectures they share (their weighted layers, hidden widths).

All are in the NTK parameterization, where the declared widths do not enter the kernels
(they are the widths of the finite twins built with ``build``).
"""

from __future__ import annotations

import copy
from typing import cast

import torch

from .inputs import check_positive_int
from .layers import (
    GELU,
    Abs,
    AvgPool2d,
    Conv2d,
    Erf,
    Flatten,
    GlobalAvgPool,
    Identity,
    LeakyReLU,
    Linear,
    ReLU,
    Sequential,
)
from .layers.base import Layer
from .layers.dense import WeightedLayer

#: Activations by name, each with a closed-form kernel.
ACTIVATIONS: dict[str, type[Layer]] = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,  # negative_slope=0.01, as torch.nn.LeakyReLU
    "abs": Abs,
    "erf": Erf,
    "gelu": GELU,  # exact GELU, x Phi(x)
    "identity": Identity,  # a linear network: Bayesian linear regression
}
#: Readouts of :func:`cnn`: from the positions to the read-out layer.
CNN_READOUTS = ("gap", "flatten")

#: The scales of the demo's networks (and of the lazy-training experiment).
DEMO_W_STD, DEMO_B_STD, DEMO_READOUT_W_STD = 1.5, 0.05, 0.5


def weighted_layers(net: Layer) -> list[WeightedLayer]:
    """The weighted layers of ``net`` (those with a declared width, a ``width_argument``:
    ``Linear``, the convolutions), depth-first through :meth:`~widenets.Layer.sublayers`,
    in order; a layer object used at several places appears once per place."""
    if not isinstance(net, Layer):
        raise TypeError(f"net must be a widenets Layer, got {type(net).__name__}")
    # the layers with a width_argument are the WeightedLayers (Linear, Conv)
    return [cast(WeightedLayer, layer) for layer in net.walk()
            if layer.width_argument is not None]


def with_hidden_width(net: Layer, width: int, *, readout: bool = False) -> Layer:
    """A deep copy of ``net`` whose hidden weighted layers (:func:`weighted_layers`) all
    have ``width`` units (or channels); the last one, the read-out, keeps its width (the
    number of outputs) unless ``readout``. ``net`` itself is not changed.

    In the NTK parameterization the kernels do not depend on these widths, so the copy
    has the same NNGP and NTK as ``net``; its finite twin (:meth:`~widenets.Layer.build`)
    has them. Raises ``TypeError`` if ``net`` is not a ``Layer``,
    ``TypeError``/``ValueError`` for a width that is not a positive integer, and
    ``ValueError`` if ``net`` has no weighted layer or if its read-out layer object is
    also used as a hidden layer.
    """
    width = check_positive_int(width, "width")
    copied = copy.deepcopy(net)
    layers = weighted_layers(copied)
    if not layers:
        raise ValueError(f"net has no weighted layer (Linear or convolution): {net!r}")
    *hidden, last = layers
    if not readout and any(layer is last for layer in hidden):
        raise ValueError(
            "the read-out layer (the last weighted layer) is also used as a hidden layer "
            "(the same object appears twice in net); give each place its own layer"
        )
    for layer in (layers if readout else hidden):
        layer.width = width
    return copied


def activation_layer(activation: str | Layer) -> Layer:
    """A layer from an activation name of :data:`ACTIVATIONS`, or the layer itself."""
    if isinstance(activation, Layer):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)} or a widenets layer, got "
            f"{activation!r}"
        )
    return ACTIVATIONS[activation]()


def mlp(
    depth: int,
    activation: str | Layer = "relu",
    width: int = 1,
    W_std: float | torch.Tensor = 1.0,
    b_std: float | torch.Tensor | None = None,
    outputs: int = 1,
    readout_W_std: float | torch.Tensor | None = None,
) -> Sequential:
    """``depth x [Linear(width, W_std, b_std), activation]`` and a read-out
    ``Linear(outputs, readout_W_std (default W_std), b_std)``; ``depth=0`` is linear."""
    readout = W_std if readout_W_std is None else readout_W_std
    layers: list[Layer] = []
    for _ in range(depth):
        layers += [Linear(width, W_std, b_std), activation_layer(activation)]
    return Sequential(*layers, Linear(outputs, readout, b_std))


def cnn(
    depth: int,
    activation: str | Layer = "relu",
    channels: int = 1,
    readout: str = "gap",
    W_std: float = 1.0,
    b_std: float | None = None,
    outputs: int = 1,
    readout_W_std: float | None = None,
) -> Sequential:
    """``depth x [Conv2d(channels, 3x3, "same", W_std, b_std), activation]``, then
    ``GlobalAvgPool()`` (``readout="gap"``) or ``Flatten()`` (``"flatten"``) and a
    read-out ``Linear(outputs, readout_W_std (default W_std), b_std)``."""
    if readout not in CNN_READOUTS:
        raise ValueError(f"readout must be one of {CNN_READOUTS}, got {readout!r}")
    layers: list[Layer] = []
    for _ in range(depth):
        layers += [Conv2d(channels, 3, padding="same", W_std=W_std, b_std=b_std),
                   activation_layer(activation)]
    layers.append(GlobalAvgPool() if readout == "gap" else Flatten())
    out_std = W_std if readout_W_std is None else readout_W_std
    return Sequential(*layers, Linear(outputs, out_std, b_std))


def demo_mlp(width: int = 1, hidden_layers: int = 2, outputs: int = 10) -> Sequential:
    """The fully connected ReLU network of the demo and the lazy-training experiment:
    ``hidden_layers x [Linear(width, 1.5, 0.05), ReLU]`` and ``Linear(outputs, 0.5, 0.05)``.
    """
    return mlp(hidden_layers, "relu", width, DEMO_W_STD, DEMO_B_STD, outputs,
               DEMO_READOUT_W_STD)


def demo_cnn(channels: int = 1, outputs: int = 10) -> Sequential:
    """The convolutional network of the demo (CNN-GAP) on ``(N, 1, 8, 8)`` images: 3x3
    "same" convolutions of ``channels``, ReLU, 2x2 average pooling, again without the
    pooling, then the mean over positions and ``Linear(outputs, 0.5, 0.05)``."""
    return Sequential(
        Conv2d(channels, 3, padding="same", W_std=DEMO_W_STD, b_std=DEMO_B_STD),
        ReLU(),
        AvgPool2d(2),
        Conv2d(channels, 3, padding="same", W_std=DEMO_W_STD, b_std=DEMO_B_STD),
        ReLU(),
        GlobalAvgPool(),
        Linear(outputs, DEMO_READOUT_W_STD, DEMO_B_STD),
    )


__all__ = ["ACTIVATIONS", "CNN_READOUTS", "activation_layer", "cnn", "demo_cnn", "demo_mlp",
           "mlp", "weighted_layers", "with_hidden_width"]

