"""The layer protocol: every layer knows its kernel rule and how to build its finite twin."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Union, cast, overload

import torch
from torch import nn

from ..engine import compute_kernels
from ..kernel import Kernel, Kernels
from ..requirements import Needs, check_input
from ..specs import (
    describe_function,
    function_name,
    layer_spec,
    layer_type,
    register_layer_type,
    spec_key,
)

#: The state between layers (one kernel, or one per branch after ``FanOut``).
KernelState = Union[Kernel, tuple["KernelState", ...]]
#: A per-example shape, or a list of them (one per branch) after ``FanOut``.
Shape = Union[tuple[int, ...], list["Shape"]]


class Layer:
    """An architecture element, width-agnostic in its kernel and concrete in its twin.

    Subclasses implement :meth:`kernel_rule` (how the infinite-width kernel state
    changes) and :meth:`build_module` (the finite ``torch.nn.Module`` with exactly the
    same parameterization), side by side.
    """

    #: What this layer needs of its input (checked by :meth:`~widenets.Layer.transform` before
    #: :meth:`kernel_rule` runs) and of the whole computation (the full spatial
    #: covariance): see :mod:`widenets.requirements`.
    needs: Needs = Needs()

    def kernel_rule(self, k: KernelState) -> KernelState:
        """Map the kernel state of this layer's input to that of its output."""
        raise NotImplementedError

    def build_module(
        self, input_shape: Shape, generator: torch.Generator | None
    ) -> tuple[nn.Module, Shape]:
        """The finite module (float64, CPU) for inputs of ``input_shape``, and its output shape."""
        raise NotImplementedError

    def sublayers(self) -> tuple[Layer, ...]:
        """The layers this one is made of (combinators); none for a plain layer."""
        return ()

    def check_masks(self, mask1: torch.Tensor | None, mask2: torch.Tensor | None) -> None:
        """Raise a ``ValueError`` if this layer cannot take these (checked) masks; for
        entry points that do not run the kernel rule (Monte Carlo). Accepts any."""

    def takes_pair_list(self) -> bool:
        """Whether this layer's kernel rule (on the fast path) takes the listed pairs of a
        symmetric tile, moments ``(P, *layout)`` (:class:`~widenets.kernel.PairList`);
        the engine lists the pairs of a tile only when every layer of the network does.
        A rule that acts on the trailing (spatial) axes alone, or on each pair through
        ``Kernel.pair_broadcast``, can say yes; with ``own_rule``, a subclass that writes
        a rule of its own says no."""
        return False

    def own_rule(self, cls: type[Layer]) -> bool:
        """Whether this layer's kernel rule is that of ``cls`` (not a subclass's own)."""
        return type(self).kernel_rule is cls.kernel_rule

    def after_channels_last(self) -> Layer | None:
        """This network without the :class:`~widenets.ChannelsLast` it starts with (the
        kernel entry points move the channels of its inputs first), or ``None`` if it does
        not start with one."""
        return None

    def transform(self, k: KernelState) -> KernelState:
        """This layer's kernel rule, after checking that ``k`` meets :attr:`needs` (a
        ``ValueError`` that says what to change otherwise). Combinators apply their
        sublayers through it."""
        check_input(self, k)
        state = self.kernel_rule(k)
        # entries that involve a masked position are 0 after every layer (combinators'
        # sublayers have done it)
        return state if self.sublayers() else _masked(state)

    # ----------------------------------------------------------------- public API
    @overload
    def kernel(
        self,
        x1: object,
        x2: object | None = None,
        get: str = "ntk",
        *,
        spatial: str = "auto",
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        mask1: object | None = None,
        mask2: object | None = None,
        adjacency1: object | None = None,
        adjacency2: object | None = None,
    ) -> torch.Tensor: ...

    @overload
    def kernel(
        self,
        x1: object,
        x2: object | None,
        get: tuple[str, ...] | list[str],
        *,
        spatial: str = "auto",
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        mask1: object | None = None,
        mask2: object | None = None,
        adjacency1: object | None = None,
        adjacency2: object | None = None,
    ) -> Kernels: ...

    @overload
    def kernel(
        self,
        x1: object,
        x2: object | None = None,
        *,
        get: tuple[str, ...] | list[str],
        spatial: str = "auto",
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        mask1: object | None = None,
        mask2: object | None = None,
        adjacency1: object | None = None,
        adjacency2: object | None = None,
    ) -> Kernels: ...

    def kernel(
        self,
        x1: object,
        x2: object | None = None,
        get: str | Sequence[str] = "ntk",
        *,
        spatial: str = "auto",
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
        mask1: object | None = None,
        mask2: object | None = None,
        adjacency1: object | None = None,
        adjacency2: object | None = None,
    ) -> torch.Tensor | Kernels:
        """The infinite-width kernel(s) between ``x1`` and ``x2`` (``None``: ``x1``).

        Args:
            x1: inputs ``(N1, features)``, or images ``(N1, C, L)``, ``(N1, C, H, W)``,
                ``(N1, C, D, H, W)``: a tensor or a NumPy array (float64).
            x2: inputs of the same per-example shape, or ``None`` for ``x1`` itself
                (symmetric: only the upper triangle of blocks is computed).
            get: ``"nngp"`` or ``"ntk"`` (the result is that kernel, a tensor), or a
                tuple (or list) of them (the result is :class:`Kernels`). Type checkers
                see the precise result type of each form.
            spatial: for images, which spatial covariance flows through the layers:
                ``"full"`` (every pair of positions, ``P^2`` numbers per pair of
                images; pooling needs it), ``"diagonal"`` (equal positions only, ``P``
                numbers; enough when positions reach the read-out only through
                ``Flatten``) or ``"auto"``: ``"full"`` exactly when a layer pools.
            dtype: compute in this floating dtype (default: the input tensor's, float64
                for NumPy input). ``torch.float32`` is 1.4 to 1.9 times faster on a
                CPU and keeps about 6 digits: on the benchmark workloads the largest
                error is 4e-7 of the largest entry (float64 keeps 14 to 16).
            progress: a tqdm bar over the tiles on stderr: ``True`` always, ``False``
                never, ``None`` (default) only for a call of several tiles that is still
                running after 2 seconds (``engine.PROGRESS_DELAY``).
            mask1, mask2: the real positions of inputs with positions, boolean
                ``(N, *positions)`` (``True`` for a real position; an integer 0/1 tensor
                such as Hugging Face's ``attention_mask`` works too), ``None`` when all
                are real. Masked positions count as zeros, every kernel entry that
                involves one is 0 after each layer, attention ignores them as keys and
                global pooling averages over real positions only, so padding changes
                no entry of real positions (see :mod:`widenets.side_inputs`). With
                ``x2=None``, ``mask1`` serves both.
            adjacency1, adjacency2: one graph per example for
                :class:`~widenets.Aggregate`, dense ``(N, P, P)`` or an integer
                ``(N, E, 2)`` edge list over the ``P`` positions (nodes); with
                ``x2=None``, ``adjacency1`` serves both.

        Returns:
            An ``(N1, N2)`` tensor for a single name, else :class:`Kernels` with
            attributes ``nngp`` and ``ntk``. Tensors keep the dtype and device of the
            input; NumPy input is computed in float64.

        The matrix is computed in blocks of pairs of examples sized so that one
        block's spatial moments hold about ``TILE_ENTRIES`` numbers (for dense
        networks) or ``SPATIAL_TILE_ENTRIES`` (for images): memory stays bounded for
        any ``N1, N2``.
        """
        return compute_kernels(self, x1, x2, get, spatial, dtype, progress,
                               masks=(mask1, mask2), adjacencies=(adjacency1, adjacency2))

    def build(
        self,
        input_shape: tuple[int, ...] | int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> nn.Module:
        """A finite network of this architecture, with freshly sampled parameters.

        Args:
            input_shape: the per-example input shape, e.g. ``(d,)``.
            generator: a CPU ``torch.Generator`` for reproducible sampling.
            dtype: of the parameters (default: torch's default dtype).
            device: of the parameters (default: the CPU). Parameters are drawn in
                float64 on the CPU and then cast and moved, so the same generator state
                gives the same network in every dtype and on every device.
        """
        if isinstance(input_shape, int):
            input_shape = (input_shape,)
        if (
            not isinstance(input_shape, tuple)
            or not input_shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                       for s in input_shape)
        ):
            raise ValueError(
                f"input_shape must be a tuple of positive integers, got {input_shape!r}"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {generator!r}")
        module, out_shape = self.build_module(input_shape, generator)
        if isinstance(out_shape, list):
            raise ValueError(
                f"the network ends with {len(out_shape)} parallel branches; close them with "
                "FanInSum, FanInConcat or FanInProd"
            )
        # the twin carries its architecture (wn.from_torch gives it back)
        module.widenets_layer = copy.deepcopy(self)  # type: ignore[assignment]
        return module.to(dtype=dtype or torch.get_default_dtype(), device=device)

    # ----------------------------------------------------------------- specs
    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        register_layer_type(cls)

    def spec_arguments(self) -> dict[str, object]:
        """The constructor arguments that rebuild this layer, by name (a ``*layers``
        argument as a tuple). By default each constructor parameter's value is read from
        the attribute of the same name; a layer that stores one under another name
        overrides this (or exposes a property of that name)."""
        return {name: getattr(self, name) for name in _constructor_arguments(type(self))}

    def spec(self, strict: bool = True) -> dict:
        """The canonical, process-independent description of this layer: a JSON-serialisable
        dict that :func:`widenets.specs.from_spec` turns back into an equal layer (see
        :mod:`widenets.specs`). Raises :class:`~widenets.specs.NotCanonicalError` for a
        layer holding a function that cannot be imported by name, unless ``strict=False``
        (then that function is described by its identity in this process)."""
        return layer_spec(self, self.spec_arguments(), strict)

    #: The constructor argument that is this layer's declared width (weighted layers).
    width_argument: str | None = None

    def uses_declared_widths(self) -> bool:
        """Whether this layer's own kernel rule depends on declared widths (the standard
        parameterization's NTK; a concatenation weighing branches by width)."""
        return False

    def kernel_spec(self) -> dict:
        """The spec less what does not change the kernels: the declared widths, when no
        layer of the network uses them (:meth:`uses_declared_widths`). Two architectures
        with equal kernel specs have equal kernels; a kernel store is identified by it."""
        spec = self.spec()
        if any(layer.uses_declared_widths() for layer in self.walk()):
            return spec
        return cast(dict, _without_widths(spec))  # a layer's spec maps to a dict

    def hyperparameters(self) -> dict[str, torch.Tensor]:
        """The hyperparameters given as tensors (``W_std=torch.tensor(1.5,
        requires_grad=True)``, an ``nn.Parameter``), by name: ``"W_std"`` of this layer,
        ``"2.W_std"`` of a combinator's third part, and so on; for example to hand to a
        ``torch.optim`` optimiser. Hyperparameters given as numbers are constants and are
        not listed. A tensor shared by several layers appears under each of their names."""
        found = {name: value for name, value in self.spec_arguments().items()
                 if isinstance(value, torch.Tensor)}
        for index, layer in enumerate(self.sublayers()):
            for name, value in layer.hyperparameters().items():
                found[f"{index}.{name}"] = value
        return found

    def walk(self) -> list[Layer]:
        """This layer and all its sublayers, depth first."""
        found = [self]
        for layer in self.sublayers():
            found += layer.walk()
        return found

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layer):
            return NotImplemented
        return type(self) is type(other) and (
            spec_key(self.spec(strict=False)) == spec_key(other.spec(strict=False)))

    def __hash__(self) -> int:
        return hash(spec_key(self.spec(strict=False)))

    def __repr__(self) -> str:
        parameters = {} if type(self).__init__ is object.__init__ else (
            inspect.signature(type(self).__init__).parameters)
        parts = []
        for name, value in self.spec_arguments().items():
            if parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
                parts += [repr(v) for v in cast(tuple, value)]  # a *layers argument
            else:
                parts.append(f"{name}={_value_repr(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"


#: Constructor parameter names by layer class (:func:`_constructor_arguments`).
_CONSTRUCTOR_ARGUMENTS: dict[type, tuple[str, ...]] = {}


def _constructor_arguments(cls: type) -> tuple[str, ...]:
    """The names of ``cls``'s constructor parameters (not ``**kwargs``), looked up once
    per class (``inspect.signature`` costs 40 us, on every kernel call)."""
    names = _CONSTRUCTOR_ARGUMENTS.get(cls)
    if names is None:
        if not any("__init__" in vars(base) for base in cls.__mro__ if base is not object):
            names = ()
        else:
            names = tuple(p.name for p in inspect.signature(cls).parameters.values()
                          if p.kind is not inspect.Parameter.VAR_KEYWORD)
        _CONSTRUCTOR_ARGUMENTS[cls] = names
    return names


def _masked(state: KernelState) -> KernelState:
    """``Kernel.masked`` of one kernel or of each branch."""
    if isinstance(state, Kernel):
        return state.masked()
    return tuple(_masked(branch) for branch in state)


def _without_widths(spec: object) -> object:
    """A spec with the declared-width argument of every layer removed."""
    if isinstance(spec, list):
        return [_without_widths(v) for v in spec]
    if not (isinstance(spec, dict) and set(spec) == {"layer", "args"}):
        return spec
    cls = layer_type(spec["layer"])
    width = None if cls is None else cast("type[Layer]", cls).width_argument  # registered
    return {"layer": spec["layer"],
            "args": {k: _without_widths(v) for k, v in spec["args"].items() if k != width}}


def _value_repr(value: object) -> str:
    """``repr`` of a constructor argument; a function by its importable name (no memory
    address), so that equal layers have equal representations in any process."""
    if callable(value) and not isinstance(value, Layer):
        name = function_name(value)
        return name.replace(":", ".") if name else describe_function(value)
    return repr(value)




def standard_normal(
    shape: tuple[int, ...], generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal draws in float64 on the CPU (the twin is cast afterwards)."""
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def single_kernel(k: KernelState, layer: Layer) -> Kernel:
    """``k`` as one kernel, or the error of :func:`single_shape` for parallel branches
    (``Layer.transform`` has checked this already for a layer whose ``needs.input`` is
    ``"single"``)."""
    if not isinstance(k, Kernel):
        raise ValueError(
            f"{type(layer).__name__} got {len(k)} parallel branches; use Parallel to apply "
            "layers per branch, or a FanIn layer to merge them"
        )
    return k


def branch_states(k: KernelState, layer: Layer) -> tuple[KernelState, ...]:
    """``k`` as parallel branches, or the error of ``Layer.transform`` for one kernel
    (checked there already for a layer whose ``needs.input`` is ``"branches"``)."""
    if isinstance(k, Kernel):
        raise ValueError(f"{type(layer).__name__} needs parallel branches: use FanOut first")
    return k


def single_shape(shape: Shape, layer: Layer) -> tuple[int, ...]:
    """``shape`` as one per-example shape, or a clear error for parallel branches."""
    if isinstance(shape, list):
        raise ValueError(
            f"{type(layer).__name__} got {len(shape)} parallel branches; use Parallel to "
            "apply layers per branch, or a FanIn layer to merge them"
        )
    return shape
