"""Validation and conversion of user inputs (data arrays and the ``get`` argument)."""

from __future__ import annotations

import operator
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Literal, SupportsIndex, cast, overload

import numpy as np
import torch

KERNEL_NAMES = ("nngp", "ntk")

#: At most this many channels on the last axis, and more than this many on the second,
#: make an input of 3 to 5 dimensions look channels-last (see :func:`warn_channels_last`).
FEW_CHANNELS = 4
#: Layouts per number of dimensions: (what widenets reads, what the input looks like).
_LAYOUTS = {
    3: ("(N, C, L)", "(N, L, C)"),
    4: ("(N, C, H, W)", "(N, H, W, C)"),
    5: ("(N, C, D, H, W)", "(N, D, H, W, C)"),
}
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def as_data_tensor(x: object, name: str, layout_warning: bool = True) -> torch.Tensor:
    """Return ``x`` as a floating tensor of shape ``(N, ...)`` with finite values.

    NumPy arrays (and array-likes) become float64 tensors; a tensor keeps its dtype
    and device. Raises ``TypeError`` for non-numeric or complex data and
    ``ValueError`` for empty input, fewer than 2 dimensions, or NaN/inf values.
    ``layout_warning``: warn when the shape looks channels-last (for inputs, not for
    targets).
    """
    if isinstance(x, torch.Tensor):
        tensor = x
    elif isinstance(x, (np.ndarray, Sequence, np.generic)) and not isinstance(x, (str, bytes)):
        array = np.asarray(x)
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise TypeError(f"{name} must hold real numbers, got NumPy dtype {array.dtype}")
        if np.iscomplexobj(array):
            raise TypeError(f"{name} must be real, got complex dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or a NumPy array, got {type(x).__name__}"
        )
    if tensor.is_complex():
        raise TypeError(f"{name} must be real, got complex dtype {tensor.dtype}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must have a floating dtype (float32 or float64), got {tensor.dtype}"
        )
    tensor = as_compute_dtype(tensor, name)
    if tensor.ndim < 2:
        raise ValueError(
            f"{name} must have shape (N, features) or (N, C, ...), got shape {tuple(tensor.shape)}"
        )
    if tensor.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if layout_warning:  # (not for targets, whose trailing axes are not channels)
        warn_channels_last(tensor.shape, name)
    return tensor


def _user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn``, called by the caller of this function,
    that points at the first frame outside widenets (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def warn_channels_last(shape: Sequence[int], name: str) -> None:
    """Warn (``UserWarning``) if an input of ``shape`` looks channels-last.

    widenets reads convolutional inputs channels-first, as PyTorch does: ``(N, C, L)``,
    ``(N, C, H, W)``, ``(N, C, D, H, W)``. An input of 3 to 5 dimensions whose last axis
    is small (at most :data:`FEW_CHANNELS`) while its second is not, like an image batch
    ``(N, 32, 32, 3)``, is most likely ``(N, H, W, C)`` and would be read as 32 channels
    of 32 x 3 pixels; the warning names ``name``, the layouts and the conversion.
    """
    if len(shape) not in _LAYOUTS:
        return
    channels, second = int(shape[-1]), int(shape[1])
    if channels > FEW_CHANNELS or second <= FEW_CHANNELS:
        return
    expected, looks = _LAYOUTS[len(shape)]
    order = (0, len(shape) - 1, *range(1, len(shape) - 1))
    warnings.warn(
        f"{name} has shape {tuple(shape)}, which looks like {looks} with C = {channels} "
        f"channel{'s' if channels != 1 else ''} last; widenets reads it as {expected} "
        f"(PyTorch's layout), that is, {second} channels of "
        f"size {' x '.join(str(int(n)) for n in shape[2:])}. If it is channels-last, convert "
        f"it with x.permute{order} (torch) or np.transpose(x, {order}) (NumPy)",
        UserWarning,
        stacklevel=_user_stacklevel(),
    )


#: Floating dtypes the kernels are computed in.
COMPUTE_DTYPES = (torch.float32, torch.float64)
#: Half-precision dtypes: accepted as inputs, computed (and returned) in float32, because
#: their 3 or 4 significant digits cannot carry a kernel through a network's layers.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def as_compute_dtype(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` in a dtype the kernels are computed in: float32 and float64 as they are,
    float16 and bfloat16 converted to float32; other floating dtypes (float8) refused."""
    if tensor.dtype in COMPUTE_DTYPES:
        return tensor
    if tensor.dtype in HALF_DTYPES:
        return tensor.to(torch.float32)
    raise TypeError(
        f"{name} has dtype {tensor.dtype}; widenets computes in float32 or float64 (float16 "
        "and bfloat16 inputs are computed in float32): convert it with .float() or .double()"
    )


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite, from one ``aminmax`` pass (NaN and inf
    propagate into the extremes); true for an empty tensor."""
    return not tensor.numel() or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def as_input_pair(
    x1: object, x2: object | None, layout_warning: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate ``x1`` and ``x2`` (``None`` meaning ``x2 = x1``) as one batch pair.

    ``x2`` is converted to the dtype and device of ``x1`` when it is NumPy data; two
    tensors must already agree. Per-example shapes must be equal. ``layout_warning``:
    warn when a shape looks channels-last (not for networks that read channels last).
    """
    t1 = as_data_tensor(x1, "x1", layout_warning)
    if x2 is None:
        return t1, None
    t2 = as_data_tensor(x2, "x2", layout_warning)
    if not isinstance(x2, torch.Tensor):
        t2 = t2.to(dtype=t1.dtype, device=t1.device)
    elif not isinstance(x1, torch.Tensor):
        t1 = t1.to(dtype=t2.dtype, device=t2.device)
    if t1.dtype != t2.dtype or t1.device != t2.device:
        raise ValueError(
            f"x1 and x2 must share dtype and device, got {t1.dtype} on {t1.device} "
            f"and {t2.dtype} on {t2.device}"
        )
    if t1.shape[1:] != t2.shape[1:]:
        raise ValueError(
            f"x1 and x2 must have the same per-example shape, got {tuple(t1.shape[1:])} "
            f"and {tuple(t2.shape[1:])}"
        )
    return t1, t2


def parse_get(get: object) -> tuple[str, ...]:
    """Normalise ``get`` ("nngp", "ntk" or a tuple of them) into a tuple of names."""
    names = (get,) if isinstance(get, str) else get
    if not isinstance(names, (tuple, list)) or len(names) == 0:
        raise TypeError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}")
    for entry in names:
        if entry not in KERNEL_NAMES:
            raise ValueError(f"get must name 'nngp' or 'ntk', got {entry!r}")
    return tuple(names)


@overload
def check_nonnegative(
    value: object, name: str, allow_none: Literal[False] = False
) -> float: ...


@overload
def check_nonnegative(value: object, name: str, allow_none: bool) -> float | None: ...


def check_nonnegative(value: object, name: str, allow_none: bool = False) -> float | None:
    """Return ``value`` as a float, raising if it is not a finite number >= 0."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` as an int if it is an integer >= 1: a Python or NumPy integer or a
    0-D integer tensor (anything with ``__index__``), never a bool or a float."""
    if isinstance(value, (bool, np.bool_)) or (
            isinstance(value, torch.Tensor) and (value.dtype == torch.bool or value.ndim != 0)):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}")
    try:
        number = operator.index(cast(SupportsIndex, value))  # TypeError caught below
    except TypeError:
        raise TypeError(f"{name} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {number}")
    return number


def check_finite_number(value: object, name: str) -> float:
    """Return ``value`` as a float, raising if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


#: Largest magnitude of a scale parameter (``W_std``, ``b_std``, an activation's ``a``, ``b``):
#: its square enters the kernel and must stay finite in float64.
MAX_SCALE = 1e150


def check_hyperparameter(
    value: object, name: str, nonnegative: bool = False
) -> float | torch.Tensor:
    """A scale parameter that kernels may be differentiated by: a number (returned as a
    float, as :func:`check_scale`) or a 0-d floating tensor, ``nn.Parameter`` included
    (returned as it is, so that gradients flow to it; its value is checked as a number's
    is). Anything else, a tensor of another shape or dtype among them, is a ``TypeError``."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or not value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"{name} must be a number or a 0-d floating tensor, got a tensor of shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
        check_scale(float(value.detach()), name, nonnegative)
        return value
    return check_scale(value, name, nonnegative)


def scale_value(value: float | torch.Tensor | None) -> float | None:
    """The number a hyperparameter holds (a tensor's value, detached): for finite twins,
    which are sampled with plain numbers."""
    if value is None:
        return None
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def check_scale(value: object, name: str, nonnegative: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number (``>= 0`` if
    ``nonnegative``) of magnitude at most :data:`MAX_SCALE`."""
    value = check_nonnegative(value, name) if nonnegative else check_finite_number(value, name)
    if abs(value) > MAX_SCALE:
        raise ValueError(
            f"{name} must be at most {MAX_SCALE:g} in magnitude (its square enters the "
            f"kernel), got {value:g}"
        )
    return value
