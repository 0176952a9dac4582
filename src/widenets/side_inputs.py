"""Per-example inputs beside the data: masks of real positions and graph adjacencies.

A **mask** marks the real positions of inputs with positions (sequences ``(N, C, L)``,
images, graphs' nodes): a boolean ``(N, *positions)`` tensor, ``True`` for a real
position, as Hugging Face's ``attention_mask`` (an integer tensor of 0 and 1 is
accepted too). Masked positions are excluded everywhere: their inputs count as zeros,
every kernel entry that involves one is 0 after each layer, attention does not attend to
them, and global pooling averages over real positions only. So padding a batch to a
longer length changes no kernel entry of real positions (for the layers that keep
positions).

An **adjacency** describes one graph per example for :class:`~widenets.Aggregate`,
over the ``P`` positions of an input (the nodes; for images the pixels in row-major
order): dense, a floating ``(N, P, P)`` tensor with ``A[n, i, j]`` the weight of the
edge from node ``i`` to node ``j``; or an edge list, an integer ``(N, E, 2)`` tensor of
``(sender, receiver)`` pairs, where a pair with a negative entry is padding (graphs with
fewer edges) and a repeated pair counts as often as it appears. Edge lists become dense
here (Neural Tangents' ``"SPARSE"`` pattern format, its ``"DENSE"`` one transposed to
PyTorch's channels-first layout).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


def _as_tensor(value: object, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    raise TypeError(f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def check_mask(mask: object, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """``mask`` for inputs ``x`` ``(N, C, *positions)`` as a boolean ``(N, *positions)``
    tensor on ``x``'s device, or ``None``.

    Raises ``ValueError`` for inputs without positions, a wrong shape, values other than
    0 and 1, or an example with no real position; ``TypeError`` for a non-tensor or a
    floating mask.
    """
    if mask is None:
        return None
    tensor = _as_tensor(mask, name)
    if x.ndim < 3:
        raise ValueError(
            f"{name} marks real positions, but the inputs {tuple(x.shape)} have none; masks "
            "are for sequences (N, C, L), images and graphs' nodes"
        )
    expected = (x.shape[0], *x.shape[2:])
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"{name} must have shape (N, *positions) = {expected} (True for a real "
            f"position), got {tuple(tensor.shape)}"
        )
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must be boolean (or integer 0/1), got dtype {tensor.dtype}")
    if tensor.dtype != torch.bool:
        if bool(((tensor != 0) & (tensor != 1)).any()):
            raise ValueError(f"{name} must hold only 0 and 1 (or booleans)")
        tensor = tensor != 0
    empty = (~tensor.flatten(1).any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{name} marks no real position in example {int(empty[0])}: every example "
            "needs at least one"
        )
    return tensor.to(x.device)


def check_adjacency(adjacency: object, x: torch.Tensor, name: str) -> torch.Tensor | None:
    """``adjacency`` for inputs ``x`` ``(N, C, *positions)`` as a dense ``(N, P, P)``
    tensor of ``x``'s dtype and device (``P`` positions), or ``None``; see the module
    docstring for the two accepted formats. Raises ``ValueError`` naming ``name`` for a
    wrong shape, NaN or inf, or a node index out of range."""
    if adjacency is None:
        return None
    tensor = _as_tensor(adjacency, name)
    if x.ndim < 3:
        raise ValueError(
            f"{name} describes graphs over the positions of the inputs, but the inputs "
            f"{tuple(x.shape)} have none; give node features as (N, C, nodes)"
        )
    n, positions = x.shape[0], math.prod(x.shape[2:])
    if tensor.is_floating_point():
        if tuple(tensor.shape) != (n, positions, positions):
            raise ValueError(
                f"{name} must be a dense (N, P, P) = {(n, positions, positions)} tensor "
                f"(or an integer (N, E, 2) edge list), got {tuple(tensor.shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or inf")
        return tensor.to(dtype=x.dtype, device=x.device)
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(
            f"{name} must be a floating (N, P, P) matrix or an integer (N, E, 2) edge list, "
            f"got dtype {tensor.dtype}"
        )
    if tensor.ndim != 3 or tensor.shape[0] != n or tensor.shape[2] != 2:
        raise ValueError(
            f"{name} as an edge list must have shape (N, E, 2) = ({n}, E, 2) of (sender, "
            f"receiver) pairs, got {tuple(tensor.shape)}"
        )
    if bool((tensor >= positions).any()):
        raise ValueError(f"{name} names a node >= {positions}, the number of positions")
    return edges_to_dense(tensor.to(x.device), positions, x.dtype)


def edges_to_dense(edges: torch.Tensor, positions: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``(N, P, P)`` adjacencies of integer ``(N, E, 2)`` edge lists (pairs with a
    negative entry skipped, repeated pairs summed)."""
    n = edges.shape[0]
    dense = torch.zeros(n, positions, positions, dtype=dtype, device=edges.device)
    keep = (edges >= 0).all(dim=2)
    example = torch.arange(n, device=edges.device).unsqueeze(1).expand_as(keep)[keep]
    senders, receivers = edges[..., 0][keep], edges[..., 1][keep]
    ones = torch.ones(senders.shape, dtype=dtype, device=edges.device)
    return dense.index_put_((example, senders, receivers), ones, accumulate=True)


# ---------------------------------------------------------------- finite twins
_twin_state = threading.local()


@contextmanager
def finite_side_inputs(
    mask: torch.Tensor | None, adjacency: torch.Tensor | None
) -> Iterator[None]:
    """Within this block (this thread), the finite twins' layers read ``mask`` and
    ``adjacency`` (checked) as those of the batch they run on; see :func:`current_mask`."""
    previous = getattr(_twin_state, "values", (None, None))
    _twin_state.values = (mask, adjacency)
    try:
        yield
    finally:
        _twin_state.values = previous


def current_mask(x: torch.Tensor) -> torch.Tensor | None:
    """The mask of the batch ``x`` ``(N, C, *positions)`` that a finite twin runs on, or
    ``None`` (no mask, or ``x`` no longer has the masked positions)."""
    mask = getattr(_twin_state, "values", (None, None))[0]
    if mask is None or x.ndim < 3 or tuple(x.shape[2:]) != tuple(mask.shape[1:]):
        return None
    return mask


def current_adjacency() -> torch.Tensor | None:
    """The adjacency of the batch that a finite twin runs on, or ``None``."""
    return getattr(_twin_state, "values", (None, None))[1]

