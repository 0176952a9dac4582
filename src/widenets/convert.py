r"""From a PyTorch model to its infinite-width architecture: :func:`widenets.from_torch`.

The module is traced with ``torch.fx`` (a plain nested ``nn.Sequential`` that does not
trace is read child by child), each operation becomes the widenets layer with the same
finite forward, and the data flow becomes widenets' combinators: an operation that
merges branches (``+``, ``torch.cat`` on channels, ``*``) becomes ``FanOut``, ``Parallel``
and a ``FanIn`` layer from the last value that all its branches go through. The result is
an ordinary widenets architecture (printable, with a spec, a kernel store identity and a
finite twin of the same structure).

Initialisation (what "the kernel of this module family" means): every weight matrix
``N(0, W_std^2 / fan_in)`` and every bias ``N(0, b_std^2)``, in the *standard*
parameterisation by default (the module's own ``x @ W.T + b``, so the NTK is that of
training the module as written, at its real widths; ``parameterization="ntk"`` for the
NTK parameterisation). The defaults are PyTorch's own variances: ``nn.Linear`` and the
convolutions draw ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, variance ``1 / (3 fan_in)``,
for weights and biases alike, so ``W_std = 1/sqrt(3)`` and ``b_std = 1/sqrt(3 fan_in)``
with each layer's real ``fan_in``. As the hidden widths grow, those biases vanish and the
uniform draws have the Gaussian limit (a unit sums infinitely many of them); only the
first layer, whose fan-in stays finite, keeps non-Gaussian pre-activations, which the
Gaussian kernel does not describe exactly.
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .layers import (
    GELU,
    Conv1d,
    Conv2d,
    Conv3d,
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
    Layer,
    LayerNorm,
    LeakyReLU,
    Linear,
    Parallel,
    ReLU,
    Sequential,
)
from .layers.pooling import AvgPool1d, AvgPool2d, AvgPool3d

#: PyTorch's default weight scale: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` has variance
#: ``1 / (3 fan_in)``.
TORCH_DEFAULT_W_STD = 1.0 / math.sqrt(3.0)

PARAMETERIZATIONS = ("standard", "ntk")

Scale = float | dict[str, float] | Callable[[str, nn.Module], float] | None

#: Elementwise functions without a closed form: integrated numerically (``Elementwise``).
_NUMERICAL: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.Sigmoid: torch.sigmoid, nn.Tanh: torch.tanh, nn.SiLU: F.silu, nn.Softplus: F.softplus,
    nn.ELU: F.elu, nn.Mish: F.mish, nn.Softsign: F.softsign, nn.SELU: F.selu,
}
_NUMERICAL_FUNCTIONS = {
    torch.sigmoid, torch.tanh, F.silu, F.softplus, F.elu, F.mish, F.softsign, F.selu,
    F.sigmoid, F.tanh, torch.sin, torch.cos, torch.exp,
}
_CONVOLUTIONS: dict[type[nn.Module], type[Layer]] = {
    nn.Conv1d: Conv1d, nn.Conv2d: Conv2d, nn.Conv3d: Conv3d}
_AVG_POOLS: dict[type[nn.Module], type[Layer]] = {
    nn.AvgPool1d: AvgPool1d, nn.AvgPool2d: AvgPool2d, nn.AvgPool3d: AvgPool3d}
_ADAPTIVE = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


#: Modules refused as a whole (not traced into), with what to do instead.
_REFUSED_WHOLE: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention, nn.RNNBase, nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd, nn.Softmax, nn.Transformer, nn.TransformerEncoderLayer)
_ADVICE: dict[type[nn.Module], str] = {
    nn.modules.pooling._MaxPoolNd: "use average pooling (nn.AvgPool, or a mean over "
                                   "positions)",
    nn.modules.batchnorm._BatchNorm: "remove it, or use LayerNorm",
    nn.Softmax: "widenets has softmax only inside attention (wn.SelfAttention)",
    nn.MultiheadAttention: "write the model with wn.SelfAttention",
    nn.TransformerEncoderLayer: "write the block with wn.SelfAttention, wn.LayerNorm and "
                                "wn.Residual",
    nn.RNNBase: "write the model with wn.RNN or wn.Recurrent",
}


class UnsupportedModule(ValueError):
    """A part of a module that has no infinite-width counterpart in widenets."""


def from_torch(
    module: nn.Module,
    example_input: torch.Tensor | None = None,
    W_std: Scale = None,
    b_std: Scale = None,
    parameterization: str = "standard",
) -> Layer:
    """The widenets architecture of ``module``: its kernels are those of the module family
    as its hidden widths go to infinity, initialised as the module docstring says.

    ``example_input`` (a batch such as ``torch.randn(2, 3, 8, 8)``) tells the shapes of the
    values inside the module; it is needed when the module has positions (convolutions,
    pooling, flattening). ``W_std`` and ``b_std``: one number for every layer, a dict from
    module names (``"conv1"``, ``"block.0"``) to numbers (unnamed layers keep the default),
    or a function ``(name, module) -> number``; ``None`` (default) is PyTorch's own
    variance (``W_std = 1/sqrt(3)``, ``b_std = 1/sqrt(3 fan_in)``); a layer without a bias
    has none. ``parameterization``: ``"standard"`` (default, the module as written) or
    ``"ntk"``. Raises ``UnsupportedModule`` (a ``ValueError``) naming the operation, its
    module and source line, and what to do instead.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be a tensor batch, got {type(example_input).__name__}")
    converter = _Converter(W_std, b_std, parameterization)
    architecture = converter.convert(module, example_input)
    for name, given in (("W_std", W_std), ("b_std", b_std)):
        if isinstance(given, dict):
            unknown = sorted(set(given) - converter.weighted_names)
            if unknown:
                raise ValueError(
                    f"{name} names layers the module does not have (or that have no "
                    f"weights): {unknown}; its weighted layers are "
                    f"{sorted(converter.weighted_names)}")
    return architecture


def _twin_layer(module: nn.Module) -> Layer | None:
    """The layer of a widenets finite twin (they carry their layer), or ``None``."""
    layer = getattr(module, "widenets_layer", None)
    return layer if isinstance(layer, Layer) else None


class _Tracer(fx.Tracer):
    """Leaves: widenets twins and the modules converted as a whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _twin_layer(m) is not None or isinstance(m, _REFUSED_WHOLE):
            return True
        return super().is_leaf_module(m, module_qualified_name)


class _Converter:
    def __init__(self, W_std: Scale, b_std: Scale, parameterization: str) -> None:
        self.W_std, self.b_std = W_std, b_std
        self.parameterization = parameterization
        self.weighted_names: set[str] = set()  # the layers whose scales were looked up

    # ----------------------------------------------------------------- entry
    def convert(self, module: nn.Module, example_input: torch.Tensor | None) -> Layer:
        twin = _twin_layer(module)
        if twin is not None:
            return twin
        tracer = _Tracer()
        tracer.record_stack_traces = True
        try:
            graph = tracer.trace(module)
        except Exception as error:  # tracing fails on data-dependent control flow
            if isinstance(module, nn.Sequential):
                return self._sequential_children(module, example_input)
            raise UnsupportedModule(
                f"{type(module).__name__} cannot be traced by torch.fx ({error}); widenets "
                "converts modules whose forward is a fixed sequence of operations (no "
                "control flow on the data). Use wn.empirical_ntk or wn.monte_carlo_kernel "
                "of the finite model instead"
            ) from error
        traced = fx.GraphModule(module, graph)
        inputs = [n for n in graph.nodes if n.op == "placeholder" and not _has_default(n)]
        if len(inputs) != 1:
            raise UnsupportedModule(
                f"from_torch converts modules of one input tensor; this forward takes "
                f"{len(inputs)} ({', '.join(n.name for n in inputs)})"
            )
        if example_input is not None:
            from torch.fx.passes.shape_prop import ShapeProp

            with torch.no_grad():
                ShapeProp(traced).propagate(_like_parameters(example_input, module))
        return _GraphConversion(self, traced, inputs[0]).run()

    def _sequential_children(self, module: nn.Sequential,
                             example_input: torch.Tensor | None) -> Layer:
        layers, x = [], example_input
        for child in module:
            layers.append(self.convert(child, x))
            if x is not None:
                with torch.no_grad():
                    x = child(_like_parameters(x, child))
        return Sequential(*layers)

    # ----------------------------------------------------------------- scales
    def scale(self, which: str, name: str, module: nn.Module, fan_in: int) -> float | None:
        """``W_std`` or ``b_std`` of the layer ``name``."""
        self.weighted_names.add(name)
        given = self.W_std if which == "W_std" else self.b_std
        if isinstance(given, dict):
            value = given.get(name)
        elif callable(given):
            value = given(name, module)
        else:
            value = given
        if value is None:
            return TORCH_DEFAULT_W_STD if which == "W_std" else 1.0 / math.sqrt(3.0 * fan_in)
        return float(value)


def _like_parameters(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` in the dtype and on the device of ``module``'s parameters (if it has any)."""
    for parameter in module.parameters():
        return x.to(dtype=parameter.dtype, device=parameter.device)
    return x


class _GraphConversion:
    """One traced graph: its nodes as layers and merges, then the combinators."""

    def __init__(self, converter: _Converter, traced: fx.GraphModule,
                 source: fx.Node) -> None:
        self.converter, self.traced, self.source = converter, traced, source
        self.modules = dict(traced.named_modules())
        self.nodes = list(traced.graph.nodes)
        self.inputs: dict[fx.Node, list[fx.Node]] = {}   # tensor inputs of each node
        self.layer: dict[fx.Node, Layer | None] = {}     # None: the identity
        self.merge: dict[fx.Node, Layer] = {}            # FanIn layers of merging nodes
        self.dense: dict[fx.Node, bool] = {}             # no positions left (widenets' view)
        self.used_modules: dict[str, fx.Node] = {}

    def run(self) -> Layer:
        self.dense[self.source] = _ndim(self.source) in (None, 2)
        output = next(n for n in self.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, fx.Node):
            raise UnsupportedModule(
                "from_torch converts modules that return one tensor; this one returns "
                f"{type(result).__name__}")
        needed = _ancestors(result)
        for node in self.nodes:
            if node.op not in ("placeholder", "output") and node in needed:
                self._classify(node)
        self.dominators = self._dominators(result)
        return _simplified(self._build(result, self.source))

    # ----------------------------------------------------------------- the graph
    def _dominators(self, result: fx.Node) -> dict[fx.Node, set[fx.Node]]:
        """For each node, the nodes every path from the input to it goes through."""
        order = [n for n in self.nodes if n in self.inputs or n is self.source]
        dom: dict[fx.Node, set[fx.Node]] = {}
        for node in order:
            if node is self.source:
                dom[node] = {node}
                continue
            sets = [dom[p] for p in self.inputs[node] if p in dom]
            common = set.intersection(*sets) if sets else set()
            dom[node] = common | {node}
        return dom

    def _split_point(self, branches: list[fx.Node]) -> fx.Node:
        """The last value all ``branches`` go through."""
        common = set.intersection(*(self.dominators[b] for b in branches))
        position = {n: i for i, n in enumerate(self.nodes)}
        return max(common, key=lambda n: position[n])

    def _between(self, start: fx.Node, end: fx.Node) -> set[fx.Node]:
        """The nodes on paths from ``start`` to ``end``, ``start`` excluded."""
        found, stack = set(), [end]
        while stack:
            node = stack.pop()
            if node is start or node in found:
                continue
            found.add(node)
            stack.extend(self.inputs.get(node, []))
        return found

    def _build(self, target: fx.Node, source: fx.Node) -> Layer:
        if target is source:
            return Identity()
        if target in self.merge:
            branches = self.inputs[target]
            split = self._split_point(branches)
            parts = [self._between(split, b) for b in branches]
            for i, first in enumerate(parts):
                for second in parts[i + 1:]:
                    shared = first & second
                    if shared:
                        node = min(shared, key=self.nodes.index)
                        raise UnsupportedModule(
                            f"{_where(node, self.modules)} feeds several branches that merge "
                            f"at {_where(target, self.modules)} without passing through one "
                            "common value first; widenets composes branches that split from "
                            "one value and merge again (FanOut, Parallel, FanIn)"
                        )
            return Sequential(
                self._build(split, source), FanOut(len(branches)),
                Parallel(*(self._build(b, split) for b in branches)), self.merge[target])
        (previous,) = self.inputs[target]
        layer = self.layer[target]
        before = self._build(previous, source)
        return before if layer is None else Sequential(before, layer)

    # ----------------------------------------------------------------- nodes
    def _classify(self, node: fx.Node) -> None:
        tensors = [n for n in node.all_input_nodes if self._is_tensor(n)]
        if node.op == "get_attr":
            raise UnsupportedModule(
                f"{_where(node, self.modules)} reads the tensor {node.target!r} of the module "
                "directly; widenets converts parameters only through the layers that own "
                "them (nn.Linear, the convolutions)")
        if not self._is_tensor(node) and (
                node.op == "call_function" and node.target in (getattr, operator.getitem)
                or node.op == "call_method" and node.target in ("size", "dim")):
            return  # sizes and shapes, used by view/reshape
        merge = self._merge_layer(node, tensors)
        if merge is not None:
            self.inputs[node] = tensors
            self.merge[node] = merge
            self.dense[node] = self.dense[tensors[0]]
            return
        if len(tensors) != 1:
            raise UnsupportedModule(
                f"{_where(node, self.modules)} combines {len(tensors)} tensors in a way "
                "widenets has no layer for")
        (previous,) = tensors
        self.inputs[node] = [previous]
        layer, dense = self._layer(node, previous)
        self.layer[node] = layer
        self.dense[node] = self.dense[previous] if dense is None else dense

    def _is_tensor(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return not _has_default(node)
        meta = node.meta.get("tensor_meta")
        if meta is not None:
            return hasattr(meta, "shape")
        if node.op == "call_method" and node.target in ("size", "dim"):
            return False
        if node.op == "call_function" and node.target in (getattr, operator.getitem):
            return node.args[1] not in ("shape",) and not (
                isinstance(node.args[0], fx.Node) and not self._is_tensor(node.args[0]))
        return True

    def _merge_layer(self, node: fx.Node, tensors: list[fx.Node]) -> Layer | None:
        target = node.target
        if node.op == "call_function" and target in (operator.add, torch.add) or (
                node.op == "call_method" and target == "add"):
            if len(tensors) == 2 and len(node.args) == 2 and not node.kwargs:
                return FanInSum()
            self._refuse(node, "adds a constant (or scales a branch)",
                         "add only branches of the network")
        if node.op == "call_function" and target in (operator.mul, torch.mul) or (
                node.op == "call_method" and target == "mul"):
            if len(tensors) == 2:
                return FanInProd()
            return None  # a constant factor: refused among the unary operations
        if node.op == "call_function" and target in (torch.cat, torch.concat):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim not in (1, -_ndim_or(node, 2) + 1):
                self._refuse(node, f"concatenates along dim {dim}",
                             "concatenate on the channel/feature axis (dim=1)")
            return FanInConcat()
        return None

    def _layer(self, node: fx.Node, previous: fx.Node) -> tuple[Layer | None, bool | None]:
        """The layer of a one-input node and whether its output is dense (``None``: as
        the input)."""
        if node.op == "call_module":
            return self._module_layer(node, previous)
        target, args, kwargs = node.target, node.args, node.kwargs
        if node.op == "call_function":
            if target in (F.relu, torch.relu):
                return ReLU(), None
            if target is F.leaky_relu:
                return LeakyReLU(_argument(node, 1, "negative_slope", 0.01)), None
            if target is F.gelu:
                return GELU(approximate=kwargs.get("approximate", "none") == "tanh"), None
            if target in (torch.erf, torch.special.erf):
                return Erf(), None
            if target in _NUMERICAL_FUNCTIONS:
                return Elementwise(target), None
            if target is torch.flatten:
                return self._flatten(node, previous, _argument(node, 1, "start_dim", 0))
            if target is F.dropout:
                p, training = _argument(node, 1, "p", 0.5), _argument(node, 2, "training", True)
                return (Dropout(p) if training else None), None
            if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
                return self._adaptive(node, _argument(node, 1, "output_size", None))
            if target is torch.mean:
                return self._mean(node, previous, _argument(node, 1, "dim", None))
        if node.op == "call_method":
            if target == "relu":
                return ReLU(), None
            if target in ("flatten",):
                return self._flatten(node, previous, _argument(node, 1, "start_dim", 0))
            if target in ("view", "reshape") and self._is_batch_flatten(node):
                return self._flatten(node, previous, 1)
            if target == "mean":
                return self._mean(node, previous, _argument(node, 1, "dim", None))
            if target in ("contiguous", "clone"):
                return None, None
            if target in ("tanh", "sigmoid", "exp", "sin", "cos"):
                return Elementwise(getattr(torch, str(target))), None
        del args
        self._refuse(node, "has no infinite-width counterpart in widenets",
                     "use wn.empirical_ntk or wn.monte_carlo_kernel of the finite model")
        raise AssertionError  # (unreachable: _refuse raises)

    def _module_layer(self, node: fx.Node,
                      previous: fx.Node) -> tuple[Layer | None, bool | None]:
        name = str(node.target)
        module = self.modules[name]
        twin = _twin_layer(module)
        if twin is not None:
            return twin, None
        if any(True for _ in module.parameters(recurse=False)) or isinstance(
                module, (nn.Linear, *_CONVOLUTIONS)):
            if name in self.used_modules:
                self._refuse(node, f"uses the layer {name!r} a second time (its weights "
                             "would be shared)", "give each place its own layer")
            self.used_modules[name] = node
        if isinstance(module, nn.Linear):
            return self._weighted(Linear, name, module, module.in_features,
                                  (module.out_features,)), True
        for torch_type, conv_type in _CONVOLUTIONS.items():
            if isinstance(module, torch_type):
                return self._conv(node, name, module, conv_type), False
        if isinstance(module, nn.ReLU):
            return ReLU(), None
        if isinstance(module, nn.LeakyReLU):
            return LeakyReLU(module.negative_slope), None
        if isinstance(module, nn.GELU):
            return GELU(approximate=module.approximate == "tanh"), None
        for torch_type, fn in _NUMERICAL.items():
            if isinstance(module, torch_type):
                return Elementwise(fn), None
        if isinstance(module, nn.Identity):
            return None, None
        if isinstance(module, nn.Dropout):
            return (Dropout(module.p) if module.training else None), None
        if isinstance(module, nn.Flatten):
            return self._flatten(node, previous, module.start_dim)
        for torch_type, pool_type in _AVG_POOLS.items():
            if isinstance(module, torch_type):
                return self._avg_pool(node, module, pool_type), False
        if isinstance(module, _ADAPTIVE):
            return self._adaptive(node, module.output_size)
        if isinstance(module, nn.LayerNorm):
            return self._layer_norm(node, previous, module), None
        advice = next((text for kind, text in _ADVICE.items() if isinstance(module, kind)),
                      "use wn.empirical_ntk or wn.monte_carlo_kernel of the finite model")
        self._refuse(node, f"is a {type(module).__name__}, which from_torch cannot convert",
                     advice)
        raise AssertionError

    # ----------------------------------------------------------------- layer kinds
    def _weighted(self, kind: type, name: str, module: nn.Module, fan_in: int,
                  head: tuple, **options: Any) -> Layer:
        W_std = self.converter.scale("W_std", name, module, fan_in)
        has_bias = getattr(module, "bias", None) is not None
        b_std = self.converter.scale("b_std", name, module, fan_in) if has_bias else None
        return kind(*head, W_std=W_std, b_std=b_std,
                    parameterization=self.converter.parameterization, **options)

    def _conv(self, node: fx.Node, name: str, module: nn.Module, kind: type) -> Layer:
        conv = module
        assert isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if conv.groups != 1:
            self._refuse(node, f"is a grouped convolution (groups={conv.groups})",
                         "use groups=1")
        if conv.padding_mode not in ("zeros", "circular"):
            self._refuse(node, f"pads with padding_mode={conv.padding_mode!r}",
                         "use padding_mode 'zeros' or 'circular'")
        kernel, stride, dilation = conv.kernel_size, conv.stride, conv.dilation
        padding = self._conv_padding(node, conv.padding, kernel, stride, dilation,
                                     conv.padding_mode)
        fan_in = conv.in_channels * math.prod(kernel)
        return self._weighted(kind, name, conv, fan_in, (conv.out_channels, tuple(kernel)),
                              stride=tuple(stride), padding=padding, dilation=tuple(dilation))

    def _conv_padding(self, node: fx.Node, padding: Any, kernel: tuple, stride: tuple,
                      dilation: tuple, mode: str) -> str:
        if padding == "valid" or padding == (0,) * len(kernel) or padding == 0:
            return "valid"
        same = padding == "same" or (
            isinstance(padding, tuple) and all(
                2 * p == d * (k - 1) for p, k, d in zip(padding, kernel, dilation))
            and all(s == 1 for s in stride))
        if not same:
            self._refuse(node, f"pads by {padding} with kernel {kernel}, stride {stride}",
                         "use padding 0 ('valid') or the padding that keeps the size "
                         "with stride 1 ('same')")
        return "circular" if mode == "circular" else "same"

    def _avg_pool(self, node: fx.Node, module: nn.Module, kind: type[Layer]) -> Layer:
        pool = module
        assert isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d))
        ndim = 1 if isinstance(pool, nn.AvgPool1d) else 2 if isinstance(pool, nn.AvgPool2d) else 3
        padding = pool.padding if isinstance(pool.padding, tuple) else (pool.padding,) * ndim
        if any(p != 0 for p in padding) or pool.ceil_mode:
            self._refuse(node, "pads or uses ceil_mode", "use padding=0, ceil_mode=False")
        make: Any = kind
        return make(pool.kernel_size, pool.stride)

    def _adaptive(self, node: fx.Node, output_size: Any) -> tuple[Layer, bool]:
        sizes = output_size if isinstance(output_size, tuple) else (output_size,)
        if any(s != 1 for s in sizes):
            self._refuse(node, f"pools to size {output_size}",
                         "use an output size of 1 (a mean over all positions)")
        return GlobalAvgPool(), True

    def _mean(self, node: fx.Node, previous: fx.Node, dims: Any) -> tuple[Layer, bool]:
        ndim = _ndim(previous)
        if ndim is None:
            self._refuse(node, "takes a mean over axes whose meaning is unknown",
                         "pass example_input to from_torch")
        assert ndim is not None
        wanted = set(range(2, ndim))
        given = {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))
                 } if dims is not None else None
        if given != wanted:
            self._refuse(node, f"takes a mean over dims {dims}",
                         "average over all positions (dims 2 and on), as global pooling")
        return GlobalAvgPool(), True

    def _flatten(self, node: fx.Node, previous: fx.Node,
                 start_dim: int) -> tuple[Layer | None, bool]:
        if start_dim != 1:
            self._refuse(node, f"flattens from dim {start_dim}", "flatten from dim 1")
        if self.dense.get(previous, False):
            return None, True
        return Flatten(), True

    def _is_batch_flatten(self, node: fx.Node) -> bool:
        shape = node.args[1:]
        return bool(len(shape) == 2 and shape[1] == -1)

    def _layer_norm(self, node: fx.Node, previous: fx.Node, module: nn.LayerNorm) -> Layer:
        if not self.dense.get(previous, False) or len(module.normalized_shape) != 1:
            self._refuse(node, "normalises a representation with positions",
                         "use LayerNorm on (N, features) representations")
        if module.elementwise_affine and not (
                bool((module.weight == 1).all()) and (
                    module.bias is None or bool((module.bias == 0).all()))):
            self._refuse(node, "has a trained affine transformation",
                         "use elementwise_affine=False, or its initial value")
        return LayerNorm(eps=module.eps)

    def _refuse(self, node: fx.Node, what: str, instead: str) -> None:
        raise UnsupportedModule(f"{_where(node, self.modules)} {what}; {instead}")


def _where(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """``"node 'conv1' (module conv1, a Conv2d; model.py:12: h = self.conv1(x))"``."""
    parts = []
    if node.op == "call_module":
        parts.append(f"module {node.target}, a {type(modules[str(node.target)]).__name__}")
    elif node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        parts.append(f"{node.op.replace('_', ' ')} {name}")
    location = _source_line(node.meta.get("stack_trace") or node.stack_trace)
    if location:
        parts.append(location)
    return f"node {node.name!r} ({'; '.join(parts)})"


def _source_line(trace: str | None) -> str | None:
    """``file, line N: code`` of the innermost frame of a traced node's stack outside
    torch itself."""
    if not trace:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
    frames = []
    for index, line in enumerate(lines):
        if line.startswith("File "):
            code = lines[index + 1] if index + 1 < len(lines) and not lines[
                index + 1].startswith("File ") else ""
            frames.append((line[len("File "):].split(", in ")[0], code))
    users = [(where, code) for where, code in frames if torch_dir not in where]
    if not users:
        return None
    where, code = users[-1]
    return f"{where}: {code}" if code else where


def _ancestors(result: fx.Node) -> set[fx.Node]:
    """``result`` and every node it is computed from."""
    found, stack = set(), [result]
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def _has_default(node: fx.Node) -> bool:
    return len(node.args) > 0


def _ndim(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return None if meta is None or not hasattr(meta, "shape") else len(meta.shape)


def _ndim_or(node: fx.Node, default: int) -> int:
    ndim = _ndim(node)
    return default if ndim is None else ndim


def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _simplified(layer: Layer) -> Layer:
    """Nested ``Sequential`` flattened and identities dropped (the same kernel)."""
    if isinstance(layer, Sequential):
        parts: list[Layer] = []
        for part in layer.layers:
            part = _simplified(part)
            if isinstance(part, Sequential):
                parts.extend(part.layers)
            elif not isinstance(part, Identity):
                parts.append(part)
        if not parts:
            return Identity()
        return parts[0] if len(parts) == 1 else Sequential(*parts)
    if isinstance(layer, Parallel):
        return Parallel(*(_simplified(part) for part in layer.layers))
    return layer
