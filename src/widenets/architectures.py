"""Named architectures: the one place where the networks that the estimators, the command
line, the demo, the lazy-training experiment and the benchmarks share are written.

All are in the NTK parameterization, where the declared widths do not enter the kernels
(they are the widths of the finite twins built with ``build``).
"""

from __future__ import annotations

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
    W_std: float = 1.0,
    b_std: float | None = None,
    outputs: int = 1,
    readout_W_std: float | None = None,
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
           "mlp"]

