r"""From a PyTorch model to its infinite-width architecture: :func:`widenets.from_torch`.

The module is traced with ``torch.fx`` (a plain nested ``nn.Sequential`` that does not
trace is read child by child), each operation becomes the widenets layer with the same
finite forward, and the data flow becomes widenets' combinators: an operation that
merges branches (``+``, ``torch.cat`` on channels, ``*``) becomes ``FanOut``, ``Parallel``
and a ``FanIn`` layer from the last value that all its branches go through. The result is
an ordinary widenets architecture (printable, with a spec, a kernel store identity and a
finite twin of the same structure).

Layouts: the conversion follows where each value's channels are, on dim 1 (convolutions)
or on the last dim (``nn.Linear`` and ``nn.LayerNorm`` on ``(N, L, C)`` tokens, which are
the same weights at every position: convolutions of kernel size 1); transposes that move
the channels between the two change nothing in the kernel, and a module that reads its
input channels last becomes an architecture that starts with ``ChannelsLast``.
``nn.RNN(batch_first=True)`` becomes weight-tied ``Recurrent`` layers.

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
    LastStep,
    Layer,
    LayerNorm,
    LeakyReLU,
    Linear,
    Parallel,
    Recurrent,
    ReLU,
    Sequential,
)
from .layers.layout import ChannelsLast
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
#: ``nn.Linear`` on ``(N, *positions, C)``: the convolution of kernel size 1 by the number
#: of position axes.
_CONVOLUTION_BY_POSITIONS: dict[int, type[Layer]] = {1: Conv1d, 2: Conv2d, 3: Conv3d}
_PERMUTATIONS = {torch.transpose, torch.swapaxes, torch.permute, torch.movedim,
                 torch.moveaxis}
_PERMUTATION_METHODS = {"transpose", "swapaxes", "permute", "movedim", "moveaxis"}

# Where a value's channels are: no positions (``(N, features)``), on dim 1 (PyTorch's
# convolutions), on the last dim (``nn.Linear`` and ``nn.LayerNorm`` on ``(N, L, C)``),
# or as in the module's input (not known until an operation tells), or moved from there;
# UNKNOWN: no example input told the shapes (read as (N, features), or as channels first
# by a convolution). A recurrent module's result is a pair (its output and final states).
DENSE, FIRST, LAST, SOURCE, SOURCE_MOVED = "dense", "first", "last", "source", "source-moved"
UNKNOWN = "unknown"
RNN_RESULT, FINAL_STATES = "rnn-result", "final-states"
_MOVED = {FIRST: LAST, LAST: FIRST, SOURCE: SOURCE_MOVED, SOURCE_MOVED: SOURCE}


#: Modules refused as a whole (not traced into), with what to do instead.
_REFUSED_WHOLE: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention, nn.RNNBase, nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd, nn.Softmax, nn.Transformer, nn.TransformerEncoderLayer)
_ADVICE: dict[type[nn.Module], str] = {
    nn.modules.pooling._MaxPoolNd: "use average pooling (nn.AvgPool, or a mean over "
                                   "positions)",
    nn.modules.batchnorm._BatchNorm: "remove it, or use LayerNorm",
    nn.Softmax: "widenets has softmax only inside attention (wn.SelfAttention)",
    nn.MultiheadAttention: "its logits are scaled by 1/sqrt(head_dim), so as the width grows "
                           "they stay random and the softmax of them has no closed-form "
                           "kernel; write the attention as a widenets twin "
                           "(wn.SelfAttention(...).build(...), tied query and key with "
                           "1/head_dim logits) inside the model, or use Monte Carlo "
                           "(wn.empirical_ntk of the finite model)",
    nn.TransformerEncoderLayer: "write the block with wn.SelfAttention, wn.LayerNorm and "
                                "wn.Residual",
    nn.RNNBase: "widenets has no kernel for gated cells (LSTM, GRU): use nn.RNN, or "
                "wn.Recurrent with a cell of widenets layers",
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
    def scale(self, which: str, name: str, module: nn.Module, fan_in: int) -> float:
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
        self.layout: dict[fx.Node, str] = {}             # where the channels are (DENSE...)
        self.source_layout: str | None = None            # the input's, once an op tells
        self.used_modules: dict[str, fx.Node] = {}

    def run(self) -> Layer:
        ndim = _ndim(self.source)
        self.layout[self.source] = UNKNOWN if ndim is None else DENSE if ndim == 2 else SOURCE
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
        layers = self._build(result, self.source)
        if self.source_layout == LAST:
            layers = Sequential(ChannelsLast(), layers)
        return _simplified(layers)

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
            self.layout[node] = self._common_layout(node, tensors)
            return
        if len(tensors) != 1:
            raise UnsupportedModule(
                f"{_where(node, self.modules)} combines {len(tensors)} tensors in a way "
                "widenets has no layer for")
        (previous,) = tensors
        self.inputs[node] = [previous]
        layer, layout = self._layer(node, previous)
        self.layer[node] = layer
        self.layout[node] = self.layout[previous] if layout is None else layout

    def _is_tensor(self, node: fx.Node) -> bool:
        if node.op == "placeholder":
            return not _has_default(node)
        if node.op == "call_module" and isinstance(self.modules[str(node.target)], nn.RNN):
            return True  # (output, final states): read by the getitems that follow
        meta = node.meta.get("tensor_meta")
        if meta is not None:
            return hasattr(meta, "shape")
        if node.op == "call_method" and node.target in ("size", "dim"):
            return False
        if node.op == "call_function" and node.target in (getattr, operator.getitem):
            return node.args[1] not in ("shape",) and not (
                isinstance(node.args[0], fx.Node) and not self._is_tensor(node.args[0]))
        return True

    # ----------------------------------------------------------------- layouts
    def _resolved(self, layout: str) -> str:
        """``layout`` with the input's layout filled in once it is known."""
        if layout in (SOURCE, SOURCE_MOVED) and self.source_layout is not None:
            return self.source_layout if layout == SOURCE else _MOVED[self.source_layout]
        return layout

    def _require(self, node: fx.Node, previous: fx.Node, wanted: str, why: str) -> None:
        """Check that the channels of ``previous`` are where ``node`` reads them (``wanted``:
        FIRST or LAST); the first such node tells the input's layout."""
        layout = self._resolved(self.layout[previous])
        if layout in (SOURCE, SOURCE_MOVED):
            self.source_layout = wanted if layout == SOURCE else _MOVED[wanted]
        elif layout == UNKNOWN and wanted == FIRST:
            return  # (PyTorch's layout, as without example inputs before)
        elif layout == UNKNOWN:
            self._refuse(node, f"{why}, but the shape of its input is unknown",
                         "pass example_input to from_torch")
        elif layout == DENSE:
            self._refuse(node, f"{why}, but its input is (N, features)",
                         "give it an input with positions")
        elif layout != wanted:
            where = "dim 1" if layout == FIRST else "the last dim"
            self._refuse(node, f"{why}, but its input has its channels on {where}",
                         "move the channel axis with transpose/permute first, or keep one "
                         "layout throughout")

    def _positions(self, previous: fx.Node) -> bool:
        """Whether ``previous`` has positions (not ``(N, features)``, nor of unknown
        shape)."""
        return self._resolved(self.layout[previous]) not in (DENSE, UNKNOWN)

    def _common_layout(self, node: fx.Node, tensors: list[fx.Node]) -> str:
        """The layout of a node merging ``tensors``: they must agree."""
        known = [self._resolved(self.layout[t]) for t in tensors]
        fixed = next((layout for layout in known if layout in (DENSE, FIRST, LAST)), None)
        if fixed is None:
            if len(set(known)) > 1:
                self._refuse(node, "merges branches whose channels lie on different axes",
                             "keep one layout in all branches")
            return known[0]
        for tensor in tensors:
            if fixed == DENSE:
                if self._positions(tensor):
                    self._refuse(node, "merges branches with and without positions",
                                 "merge branches of one shape")
            else:
                self._require(node, tensor, fixed, "merges branches")
        return fixed

    def _moved_channels(self, node: fx.Node, previous: fx.Node) -> tuple[None, str]:
        """A transpose/permute/movedim: allowed when it moves the channels between dim 1
        and the last dim and keeps the batch and the order of the positions."""
        ndim = _ndim(previous)
        if ndim is None or ndim < 3:
            self._refuse(node, "permutes axes whose meaning is unknown",
                         "pass example_input to from_torch")
        assert ndim is not None
        order = _permutation(node, ndim)
        to_last, to_first = (0, *range(2, ndim), 1), (0, ndim - 1, *range(1, ndim - 1))
        layout = self._resolved(self.layout[previous])
        if order == tuple(range(ndim)):
            return None, layout
        if order not in (to_last, to_first):
            self._refuse(node, f"permutes the axes as {order}",
                         "only move the channel axis between dim 1 and the last dim")
        if order == to_first and order != to_last:
            self._require(node, previous, LAST, "moves the last axis to dim 1")
        elif order == to_last and order != to_first:
            self._require(node, previous, FIRST, "moves dim 1 to the end")
        return None, _MOVED[self._resolved(self.layout[previous])]

    # ----------------------------------------------------------------- merges
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
            ndim = _ndim_or(node, 2)
            wanted = FIRST if dim in (1, 1 - ndim) else LAST if dim in (-1, ndim - 1) else None
            if wanted is None or (ndim == 2 and dim not in (1, -1)):
                self._refuse(node, f"concatenates along dim {dim}",
                             "concatenate on the channel/feature axis (dim=1)")
            if ndim > 2:
                for tensor in tensors:
                    self._require(node, tensor, wanted or FIRST, f"concatenates on dim {dim}")
            return FanInConcat()
        return None

    # ----------------------------------------------------------------- one input
    def _layer(self, node: fx.Node, previous: fx.Node) -> tuple[Layer | None, str | None]:
        """The layer of a one-input node and the layout of its output (``None``: the
        input's)."""
        if node.op == "call_module":
            return self._module_layer(node, previous)
        target, kwargs = node.target, node.kwargs
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
                return self._adaptive(node, previous, _argument(node, 1, "output_size", None))
            if target is torch.mean:
                return self._mean(node, previous, _argument(node, 1, "dim", None))
            if target in _PERMUTATIONS:
                return self._moved_channels(node, previous)
            if target is operator.getitem:
                return self._item(node, previous)
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
            if target in _PERMUTATION_METHODS:
                return self._moved_channels(node, previous)
            if target == "squeeze" and self.layout[previous] == FINAL_STATES:
                return self._final_state(node, previous, 0)
        self._refuse(node, "has no infinite-width counterpart in widenets",
                     "use wn.empirical_ntk or wn.monte_carlo_kernel of the finite model")
        raise AssertionError  # (unreachable: _refuse raises)

    def _item(self, node: fx.Node, previous: fx.Node) -> tuple[Layer | None, str]:
        """``x[...]``: the parts of a recurrent module's result, or the last step of a
        sequence (``out[:, -1]``)."""
        index = node.args[1]
        if self.layout[previous] == RNN_RESULT:
            return None, LAST if index == 0 else FINAL_STATES
        if self.layout[previous] == FINAL_STATES:
            return self._final_state(node, previous, index)
        ndim = _ndim(previous)
        whole = slice(None)
        if ndim == 3 and index in ((whole, -1), (whole, -1, whole)):
            self._require(node, previous, LAST, "reads the last step of dim 1")
            return LastStep(), DENSE
        if ndim == 3 and index == (whole, whole, -1):
            self._require(node, previous, FIRST, "reads the last step of dim 2")
            return LastStep(), DENSE
        self._refuse(node, f"indexes the tensor with {index!r}",
                     "read sequences whole, by a mean over positions or their last step "
                     "(out[:, -1] for (N, L, C))")
        raise AssertionError

    def _final_state(self, node: fx.Node, previous: fx.Node, index: Any) -> tuple[Layer, str]:
        """``h_n[-1]`` of a recurrent module (the last layer's final state)."""
        (rnn,) = self.inputs[previous]
        layers = self.modules[str(rnn.target)].num_layers
        if index not in (-1, layers - 1):
            self._refuse(node, f"reads the final state of layer {index} of {layers}",
                         "read the last layer's (h_n[-1])")
        return LastStep(), DENSE

    def _module_layer(self, node: fx.Node,
                      previous: fx.Node) -> tuple[Layer | None, str | None]:
        name = str(node.target)
        module = self.modules[name]
        twin = _twin_layer(module)
        if twin is not None:
            return self._twin(node, previous, twin)
        if any(True for _ in module.parameters(recurse=False)) or isinstance(
                module, (nn.Linear, *_CONVOLUTIONS)):
            if name in self.used_modules:
                self._refuse(node, f"uses the layer {name!r} a second time (its weights "
                             "would be shared)", "give each place its own layer")
            self.used_modules[name] = node
        if isinstance(module, nn.Linear):
            return self._linear(node, previous, name, module)
        for torch_type, conv_type in _CONVOLUTIONS.items():
            if isinstance(module, torch_type):
                self._require(node, previous, FIRST, "convolves with channels on dim 1")
                return self._conv(node, name, module, conv_type), FIRST
        if isinstance(module, nn.RNN):
            return self._rnn(node, previous, name, module), RNN_RESULT
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
                self._require(node, previous, FIRST, "pools with channels on dim 1")
                return self._avg_pool(node, module, pool_type), FIRST
        if isinstance(module, _ADAPTIVE):
            return self._adaptive(node, previous, module.output_size)
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

    def _linear(self, node: fx.Node, previous: fx.Node, name: str,
                module: nn.Linear) -> tuple[Layer, str]:
        """``nn.Linear``: a dense layer, or on ``(N, *positions, C)`` the same weights at
        every position (a convolution with kernel size 1)."""
        if not self._positions(previous):
            return self._weighted(Linear, name, module, module.in_features,
                                  (module.out_features,)), DENSE
        self._require(node, previous, LAST, "applies nn.Linear to the last dim")
        ndim = _ndim_or(previous, 3)
        if ndim - 2 not in _CONVOLUTION_BY_POSITIONS:
            self._refuse(node, f"applies nn.Linear to a tensor of {ndim} dims",
                         "use inputs with 1 to 3 position axes")
        kind = _CONVOLUTION_BY_POSITIONS[ndim - 2]
        return self._weighted(kind, name, module, module.in_features,
                              (module.out_features, (1,) * (ndim - 2))), LAST

    def _twin(self, node: fx.Node, previous: fx.Node,
              twin: Layer) -> tuple[Layer, str | None]:
        """A widenets twin inside the model: its own layer (channels first)."""
        if self._positions(previous):
            self._require(node, previous, FIRST, "is a widenets layer (channels on dim 1)")
        return twin, DENSE if _ndim(node) == 2 else (FIRST if self._positions(previous)
                                                      else None)

    def _rnn(self, node: fx.Node, previous: fx.Node, name: str, module: nn.RNN) -> Layer:
        """``nn.RNN(batch_first=True)``: a stack of weight-tied recurrent layers, each
        ``h_t = activation(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.

        Scales: ``W_std`` of the module for both weight matrices (each over its own fan-in:
        PyTorch draws both with variance ``1 / (3 hidden_size)``, which would make the
        input weights vanish as the hidden size grows); ``b_std`` for each of the two
        biases, which add up (by default PyTorch's variance ``1 / (3 hidden_size)``)."""
        if not module.batch_first:
            self._refuse(node, "reads (L, N, C) sequences (batch_first=False)",
                         "use batch_first=True: widenets reads the batch on dim 0")
        if module.bidirectional:
            self._refuse(node, "is bidirectional", "use bidirectional=False")
        if module.dropout and module.training and module.num_layers > 1:
            self._refuse(node, "drops between its layers",
                         "use dropout=0 (or a separate nn.Dropout with one-layer modules)")
        self._require(node, previous, LAST, "reads (N, L, C) sequences")
        width = module.hidden_size
        W_std = self.converter.scale("W_std", name, module, width)
        b_std = None
        if module.bias:
            b_std = math.sqrt(2.0) * self.converter.scale("b_std", name, module, width)
        activation = ReLU() if module.nonlinearity == "relu" else Elementwise(torch.tanh)
        p = self.converter.parameterization
        layers = []
        for _ in range(module.num_layers):
            cell = Sequential(
                Parallel(Linear(width, W_std, b_std, parameterization=p),
                         Linear(width, W_std, parameterization=p)),
                FanInSum(), activation)
            layers.append(Recurrent(cell, tied=True))
        return layers[0] if len(layers) == 1 else Sequential(*layers)

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

    def _adaptive(self, node: fx.Node, previous: fx.Node,
                  output_size: Any) -> tuple[Layer, str]:
        sizes = output_size if isinstance(output_size, tuple) else (output_size,)
        if any(s != 1 for s in sizes):
            self._refuse(node, f"pools to size {output_size}",
                         "use an output size of 1 (a mean over all positions)")
        self._require(node, previous, FIRST, "pools with channels on dim 1")
        return GlobalAvgPool(), DENSE

    def _mean(self, node: fx.Node, previous: fx.Node, dims: Any) -> tuple[Layer, str]:
        ndim = _ndim(previous)
        if ndim is None:
            self._refuse(node, "takes a mean over axes whose meaning is unknown",
                         "pass example_input to from_torch")
        assert ndim is not None
        given = {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))
                 } if dims is not None else None
        if ndim > 2 and given == set(range(2, ndim)):
            self._require(node, previous, FIRST, f"averages over dims {dims}")
        elif ndim > 2 and given == set(range(1, ndim - 1)):
            self._require(node, previous, LAST, f"averages over dims {dims}")
        else:
            self._refuse(node, f"takes a mean over dims {dims}",
                         "average over all positions (dims 2 and on, or for (N, L, C) "
                         "dim 1), as global pooling")
        return GlobalAvgPool(), DENSE

    def _flatten(self, node: fx.Node, previous: fx.Node,
                 start_dim: int) -> tuple[Layer | None, str]:
        if start_dim != 1:
            self._refuse(node, f"flattens from dim {start_dim}", "flatten from dim 1")
        if not self._positions(previous):
            return None, DENSE
        if self._resolved(self.layout[previous]) in (SOURCE, SOURCE_MOVED):
            self.source_layout = FIRST  # (the order of the flattened entries does not matter)
        return Flatten(), DENSE

    def _is_batch_flatten(self, node: fx.Node) -> bool:
        shape = node.args[1:]
        return bool(len(shape) == 2 and shape[1] == -1)

    def _layer_norm(self, node: fx.Node, previous: fx.Node, module: nn.LayerNorm) -> Layer:
        if len(module.normalized_shape) != 1:
            self._refuse(node, "normalises over several axes",
                         "normalise over the features (the last dim) only")
        if self._positions(previous):
            self._require(node, previous, LAST, "normalises over the last dim")
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


def _permutation(node: fx.Node, ndim: int) -> tuple[int, ...]:
    """The order of the input's axes in the output of a transpose/permute/movedim node."""
    name = node.target if isinstance(node.target, str) else node.target.__name__
    args: list[Any] = [*node.args[1:], *node.kwargs.values()]
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return tuple(int(d) % ndim for d in dims)
    first, second = (int(a) % ndim for a in args[:2])
    order = list(range(ndim))
    if name in ("transpose", "swapaxes"):
        order[first], order[second] = order[second], order[first]
        return tuple(order)
    order.remove(first)  # movedim(source, destination)
    order.insert(second, first)
    return tuple(order)


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
