"""Layers of widenets: each keeps its finite forward and its kernel rule side by side."""

from .activations import (
    GELU,
    ABReLU,
    Abs,
    Activation,
    Cos,
    Elementwise,
    Erf,
    Identity,
    LeakyReLU,
    Rbf,
    RectifiedMonomial,
    ReLU,
    Sign,
    Sin,
    Step,
)
from .attention import SelfAttention
from .base import Layer
from .combinators import (
    FanInConcat,
    FanInProd,
    FanInSum,
    FanOut,
    Parallel,
    Residual,
    Sequential,
)
from .conv import Conv1d, Conv2d, Conv3d
from .dense import Linear
from .dropout import Dropout
from .graph import Aggregate
from .layout import ChannelsLast
from .normalization import LayerNorm
from .pooling import AvgPool1d, AvgPool2d, AvgPool3d, Flatten, GlobalAvgPool
from .recurrent import RNN, LastStep, Recurrent

__all__ = [
    "Aggregate", "ChannelsLast", "Dropout", "SelfAttention", "RNN", "Recurrent", "LastStep",
    "ABReLU", "Abs",
    "Activation", "Cos", "Elementwise",
    "Erf", "GELU", "Identity", "LeakyReLU", "Rbf", "RectifiedMonomial", "ReLU", "Sign", "Sin",
    "Step", "Layer", "FanInConcat", "FanInProd", "FanInSum", "FanOut", "Parallel", "Residual",
    "Sequential", "Linear", "LayerNorm", "Conv1d", "Conv2d", "Conv3d", "AvgPool1d", "AvgPool2d",
    "AvgPool3d", "Flatten", "GlobalAvgPool",
]
