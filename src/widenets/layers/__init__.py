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
from .dense import Linear
from .normalization import LayerNorm

__all__ = [
    "ABReLU", "Abs", "Activation", "Cos", "Elementwise", "Erf", "GELU", "Identity",
    "LeakyReLU", "Rbf", "RectifiedMonomial", "ReLU", "Sign", "Sin", "Step", "Layer",
    "FanInConcat", "FanInProd", "FanInSum", "FanOut", "Parallel", "Residual",
    "Sequential", "Linear", "LayerNorm",
]
