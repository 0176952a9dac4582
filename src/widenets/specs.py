"""Canonical specs: a process-independent description of every layer and architecture.

A layer's spec is a JSON-serialisable dict ``{"layer": NAME, "args": {...}}`` holding the
constructor arguments that rebuild it, in canonical form: numbers as given after the
layer's own validation (``W_std=1`` and ``1.0`` agree, ``AvgPool2d(2)`` and
``AvgPool2d((2, 2), stride=(2, 2))`` agree), tuples as lists, sub-layers as their specs and
functions by their importable name ``"module:qualname"``. ``NAME`` is the class name for
widenets' own layers and ``"module:qualname"`` for layers defined elsewhere.

What rests on it (see :class:`widenets.Layer`): equality and hashing (two layers are equal
when their specs are), ``repr``, :func:`from_spec` (the inverse of ``layer.spec()``), and
the identity of a kernel store (``widenets.store``), which can thus be resumed from
another process. A function that cannot be imported by name (a lambda, a function defined
inside another) has no canonical spec: ``spec()`` raises :class:`NotCanonicalError`, and
equality and hashing fall back on that function object's identity within the process.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Callable
from typing import Any

import torch

#: Layer classes by spec name (filled when a subclass of ``widenets.Layer`` is defined).
_LAYER_TYPES: dict[str, type] = {}

Spec = dict[str, Any]


class NotCanonicalError(ValueError):
    """A layer holds something without a process-independent description (e.g. a lambda)."""


def type_name(cls: type) -> str:
    """A layer class's name in specs: its name for widenets' classes, else
    ``"module:qualname"``."""
    if cls.__module__.split(".")[0] == "widenets":
        return cls.__name__
    return f"{cls.__module__}:{cls.__qualname__}"


def layer_type(name: str) -> type | None:
    """The registered layer class of a spec name, or ``None``."""
    return _LAYER_TYPES.get(name)


def register_layer_type(cls: type) -> None:
    """Record a layer class so that :func:`from_spec` can rebuild its instances."""
    _LAYER_TYPES[type_name(cls)] = cls


def _resolve(path: str) -> object:
    module_name, _, qualname = path.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def function_name(fn: Callable) -> str | None:
    """``"module:name"`` under which ``fn`` can be imported in any process, or ``None``
    (lambdas, local functions, objects without a module)."""
    module = getattr(fn, "__module__", None)
    if not isinstance(module, str):
        return None
    for name in (getattr(fn, "__qualname__", None), getattr(fn, "__name__", None)):
        if not isinstance(name, str) or "<" in name:
            continue
        path = f"{module}:{name}"
        try:
            found = _resolve(path)
        except (ImportError, AttributeError, ValueError):
            continue
        if found is fn or found == fn:
            return path
    return None


def describe_function(fn: Callable) -> str:
    """``module.qualname`` of a function, for messages and representations."""
    module = getattr(fn, "__module__", "?")
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{module}.{name}"


def canonical(value: object, strict: bool = True) -> object:
    """``value`` in canonical, JSON-serialisable form (see the module docstring).

    With ``strict=False`` a function without an importable name is described by its
    identity in this process instead of raising :class:`NotCanonicalError`.
    """
    spec = getattr(value, "spec", None)
    if type(value) in _LAYER_TYPES.values() and callable(spec):
        return spec(strict=strict)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotCanonicalError(f"a spec holds the non-finite number {value}")
        return float(value)
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        # a hyperparameter given as a tensor (to differentiate by): its values
        return canonical(value.detach().cpu().tolist(), strict)
    if isinstance(value, (tuple, list)):
        return [canonical(v, strict) for v in value]
    if callable(value):
        name = function_name(value)
        if name is not None:
            return {"function": name}
        if strict:
            raise NotCanonicalError(
                f"the function {describe_function(value)} cannot be imported by name (a "
                "lambda or a function defined inside another), so it has no description "
                "that another process can rebuild; define it at module level"
            )
        return {"object": f"{describe_function(value)}@{id(value):x}"}
    raise NotCanonicalError(f"no canonical form for {type(value).__name__} {value!r}")


def layer_spec(layer: object, arguments: dict[str, object], strict: bool = True) -> Spec:
    """The spec of ``layer`` from its constructor ``arguments``."""
    return {"layer": type_name(type(layer)),
            "args": {name: canonical(value, strict) for name, value in arguments.items()}}


def spec_key(spec: Spec) -> str:
    """A string that is equal for equal specs (for hashing and comparisons)."""
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _decode(value: object) -> object:
    if isinstance(value, dict) and set(value) == {"layer", "args"}:
        return from_spec(value)
    if isinstance(value, dict) and set(value) == {"function"}:
        return _resolve(value["function"])
    if isinstance(value, dict):
        raise ValueError(f"cannot rebuild {value!r} from a spec (not a canonical value)")
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def from_spec(spec: Spec) -> Any:
    """The layer described by ``spec`` (the inverse of ``layer.spec()``).

    Raises ``ValueError`` for a malformed spec or an unknown layer name.
    """
    if not isinstance(spec, dict) or set(spec) != {"layer", "args"} or not isinstance(
            spec["args"], dict):
        raise ValueError(f"a layer spec is a dict with keys 'layer' and 'args', got {spec!r}")
    name = spec["layer"]
    cls: type[Any] | None = _LAYER_TYPES.get(name)
    if cls is None and isinstance(name, str) and ":" in name:
        try:
            found = _resolve(name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import the layer class {name!r}: {error}") from None
        # a layer class is registered when it is defined (by the import)
        cls = next((c for c in _LAYER_TYPES.values() if c is found), None)
        if cls is None:
            raise ValueError(f"{name!r} in spec is not a layer class")
    if cls is None:
        raise ValueError(f"unknown layer {name!r} in spec")
    parameters = inspect.signature(cls.__init__).parameters
    positional, keywords = [], {}
    for arg, value in spec["args"].items():
        parameter = parameters.get(arg)
        if parameter is None:
            raise ValueError(f"{name} has no argument {arg!r}")
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            positional = [_decode(v) for v in value]
        else:
            keywords[arg] = _decode(value)
    return cls(*positional, **keywords)
