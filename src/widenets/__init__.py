"""widenets: infinitely wide neural networks in PyTorch.

Exact NNGP and NTK kernels of an architecture, its finite-width twin as a
``torch.nn.Module``, Monte Carlo estimates of its kernels, the empirical kernels of
any module, and the predictions of the infinitely wide network.
"""

from . import predict
from .convert import from_torch
from .empirical import empirical_nngp, empirical_ntk
from .kernel import Kernel, Kernels
from .layers import (
    GELU,
    RNN,
    ABReLU,
    Abs,
    Aggregate,
    AvgPool1d,
    AvgPool2d,
    AvgPool3d,
    ChannelsLast,
    Conv1d,
    Conv2d,
    Conv3d,
    Cos,
    Dropout,
    Elementwise,
    Erf,
    FanInConcat,
    FanInProd,
    FanInSum,
    FanOut,
    Flatten,
    GlobalAvgPool,
    Identity,
    LastStep,
    Layer,
    LayerNorm,
    LeakyReLU,
    Linear,
    Parallel,
    Rbf,
    RectifiedMonomial,
    Recurrent,
    ReLU,
    Residual,
    SelfAttention,
    Sequential,
    Sign,
    Sin,
    Step,
)
from .linearize import TaylorExpansion, linearize, taylor_expand
from .monte_carlo import monte_carlo_kernel
from .tiles import kernel_matrix, load_kernel
from .version import __version__

__all__ = [
    "ABReLU", "Abs", "Aggregate", "AvgPool1d", "AvgPool2d", "AvgPool3d", "ChannelsLast",
    "Conv1d", "Conv2d", "Conv3d", "Dropout", "Flatten", "GlobalAvgPool", "Cos", "Elementwise",
    "Erf", "FanInConcat",
    "FanInProd", "FanInSum", "FanOut", "GELU", "Identity", "Kernel", "Kernels", "Layer",
    "LastStep", "LayerNorm", "LeakyReLU", "Linear", "Parallel", "Rbf", "RectifiedMonomial",
    "Recurrent", "ReLU", "Residual", "RNN",
    "SelfAttention", "Sequential", "Sign", "Sin", "Step", "empirical_nngp", "empirical_ntk",
    "monte_carlo_kernel", "datasets", "experiments", "kernel_matrix", "load_kernel", "predict",
    "__version__", "TaylorExpansion", "linearize", "taylor_expand", "from_torch",
]

#: Submodules imported on first use: those that need optional dependencies
#: (scikit-learn, matplotlib, GPyTorch; the data sets load through scikit-learn), and the
#: lazy-training experiment (an application, see
#: :mod:`widenets.apps`), so that ``import widenets`` needs and imports none of them.
_OPTIONAL_SUBMODULES = ("datasets", "sklearn", "plot", "experiments", "gpytorch")


def __getattr__(name: str):
    if name in _OPTIONAL_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'widenets' has no attribute {name!r}")
