"""The engine: runs a kernel computation for an architecture (any ``widenets.Layer``,
called ``net`` here; the engine needs only its ``transform`` and ``walk``).

It checks the inputs and arguments, chooses the dtype and the spatial layout (from the
needs the layers declare, :mod:`widenets.requirements`), plans the tiles (one planner,
:mod:`widenets.tiling`), runs the layers' kernel rules on each tile, symmetrises the
diagonal tiles of ``x2=None`` (or computes them on their listed pairs ``i <= j`` where
every layer takes them) and copies the others' transposes, and refuses non-finite
results. The layers only transform kernel states (``Layer.transform``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .heap import keep_freed_temporaries
from .inputs import COMPUTE_DTYPES, all_finite, as_input_pair, parse_get
from .kernel import Kernel, Kernels, Layout, PairList
from .paths import fast_paths_enabled, straightforward
from .requirements import network_needs
from .side_inputs import check_adjacency, check_mask
from .tiling import balanced_side, plan_tiles

#: Pairs of examples in one tile of a dense network (2 MiB per moment in float64; a
#: layer holds a few such temporaries). Measured on 2 cores (benchmarks/bench_speed.py):
#: 2^17 to 2^19 within noise of each other, 2^16 and below slower (per-operation
#: overhead), whole matrices 4 times slower (every pass goes to memory).
TILE_ENTRIES = 1 << 18
#: Numbers in one tile's spatial moments (4 MiB in float64). Larger than the dense
#: tiles because each tile also maps the self-covariances of its images (``var1``,
#: ``var2``), work that falls as the tile's side grows: measured on 2 cores, 2^19 was
#: 1.4 times faster than 2^17 on the pooled CNN and as fast on the Flatten CNN.
SPATIAL_TILE_ENTRIES = 1 << 19
#: The same budgets on a CUDA GPU, where each operation has a fixed launch cost of
#: microseconds: CPU-sized tiles leave the GPU idle. Measured on an H100 (a 10000 x 784
#: three-layer ReLU NNGP + NTK in float64): 0.84 s with the CPU budgets, 0.036 s with
#: these; :func:`tile_budget` lowers them where the GPU has less free memory.
CUDA_TILE_ENTRIES = 1 << 24
CUDA_SPATIAL_TILE_ENTRIES = 1 << 23
#: Tile-sized arrays a CUDA tile may hold at once (moments, temporaries, results), for
#: the free-memory bound of :func:`tile_budget`: a deliberately generous count.
LIVE_TILE_ARRAYS = 64
SPATIAL_CHOICES = ("auto", "full", "diagonal")
#: Seconds a call runs before its progress bar appears when ``progress=None`` (auto):
#: quick calls print nothing, long ones show how far they are.
PROGRESS_DELAY = 2.0


def check_progress(progress: object) -> bool | None:
    """Return ``progress`` if it is ``True``, ``False`` or ``None`` (a ``TypeError``
    otherwise)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    return progress


def progress_bar(total: int, progress: bool | None, desc: str, unit: str) -> tqdm:
    """A tqdm bar on stderr over ``total`` steps: ``progress=True`` always shown,
    ``False`` never, ``None`` (auto) only once the call has run :data:`PROGRESS_DELAY`
    seconds and has more than one step."""
    progress = check_progress(progress)
    disable = progress is False or (progress is None and total <= 1)
    delay = PROGRESS_DELAY if progress is None else 0.0
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, delay=delay,
                file=sys.stderr)


def tile_budget(spatial: bool, inputs: torch.Tensor) -> int:
    """Numbers in one tile's moments for a computation on ``inputs``' device.

    The CPU budgets (:data:`TILE_ENTRIES`, :data:`SPATIAL_TILE_ENTRIES`) on a CPU or any
    other device; on a CUDA GPU the larger :data:`CUDA_TILE_ENTRIES` and
    :data:`CUDA_SPATIAL_TILE_ENTRIES`, but never more than the free GPU memory holds
    :data:`LIVE_TILE_ARRAYS` times over, and never less than the CPU budget."""
    cpu_budget = SPATIAL_TILE_ENTRIES if spatial else TILE_ENTRIES
    if inputs.device.type != "cuda":
        return cpu_budget
    free_bytes, _ = torch.cuda.mem_get_info(inputs.device)
    affordable = free_bytes // (inputs.element_size() * LIVE_TILE_ARRAYS)
    wanted = CUDA_SPATIAL_TILE_ENTRIES if spatial else CUDA_TILE_ENTRIES
    return max(cpu_budget, min(wanted, affordable))


def compute_kernels(
    net: Any,
    x1: object,
    x2: object | None = None,
    get: str | Sequence[str] = "ntk",
    spatial: str = "auto",
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
    masks: tuple[object, object] = (None, None),
    adjacencies: tuple[object, object] = (None, None),
) -> torch.Tensor | Kernels:
    """``net.kernel(x1, x2, get, spatial=spatial, dtype=dtype, progress=progress,
    mask1=masks[0], mask2=masks[1], adjacency1=adjacencies[0], adjacency2=adjacencies[1])``:
    see :meth:`widenets.Layer.kernel` for the arguments and the result."""
    names = parse_get(get)
    progress = check_progress(progress)
    t1, t2 = as_input_pair(x1, x2, layout_warning=not reads_channels_last(net))
    net, t1, t2 = channels_first(net, t1, t2)
    if dtype is not None:
        if dtype not in COMPUTE_DTYPES:
            raise TypeError(
                "dtype must be a floating torch.dtype to compute in: torch.float32, "
                f"torch.float64 or None, got {dtype!r}"
            )
        t1, t2 = t1.to(dtype), None if t2 is None else t2.to(dtype)
    keep_freed_temporaries()
    if t1.ndim > 5:
        raise ValueError(
            "x1 must be (N, features), (N, C, L), (N, C, H, W) or (N, C, D, H, W), got "
            f"shape {tuple(t1.shape)}"
        )
    side = checked_side_inputs(t1, t2, masks, adjacencies)
    if tracks_gradients(net, t1, t2):
        # the fast paths overwrite intermediate results in place, which autograd forbids
        with straightforward():
            return compute_kernel_tiles(net, t1, t2, get, names, spatial, progress,
                                        recorded=True, side_inputs=side)
    return compute_kernel_tiles(net, t1, t2, get, names, spatial, progress, side_inputs=side)


#: Checked masks and adjacencies: ``(mask1, mask2, adjacency1, adjacency2)``, the
#: second of each pair that of ``x2`` (``mask1``'s and ``adjacency1``'s when ``x2`` is
#: ``None``).
SideInputs = tuple[torch.Tensor | None, ...]


def reads_channels_last(net: Any) -> bool:
    """Whether ``net`` starts with :class:`~widenets.ChannelsLast` (its inputs are
    ``(N, *positions, C)``)."""
    return net.after_channels_last() is not None


def channels_first(
    net: Any, x1: torch.Tensor, x2: torch.Tensor | None
) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
    """``net`` and inputs ``x1``, ``x2`` as the kernel computation takes them: for a
    network that starts with :class:`~widenets.ChannelsLast`, the network after it and
    the inputs with their last axis moved to position 1; otherwise unchanged."""
    inner = net.after_channels_last()
    if inner is None:
        return net, x1, x2
    return inner, channels_to_front(x1), None if x2 is None else channels_to_front(x2)


def channels_to_front(x: torch.Tensor) -> torch.Tensor:
    """Inputs ``(N, *positions, C)`` as ``(N, C, *positions)`` (``(N, features)`` as they
    are): what :class:`~widenets.ChannelsLast` does, in the kernels and in its twin."""
    return x if x.ndim <= 2 else x.movedim(-1, 1)


def checked_side_inputs(
    t1: torch.Tensor, t2: torch.Tensor | None, masks: tuple[object, object],
    adjacencies: tuple[object, object],
) -> SideInputs:
    """The masks and adjacencies of ``net.kernel``, checked against the inputs."""
    if t2 is None:
        for value, name, first in ((masks[1], "mask2", "mask1"),
                                   (adjacencies[1], "adjacency2", "adjacency1")):
            if value is not None:
                raise ValueError(f"{name} is for x2, which is None: {first} serves both")
    mask1 = check_mask(masks[0], t1, "mask1")
    adjacency1 = check_adjacency(adjacencies[0], t1, "adjacency1")
    if t2 is None:
        return mask1, mask1, adjacency1, adjacency1
    if (adjacency1 is None) != (adjacencies[1] is None):
        raise ValueError("adjacency1 and adjacency2 must be given together when x2 is given")
    return (mask1, check_mask(masks[1], t2, "mask2"), adjacency1,
            check_adjacency(adjacencies[1], t2, "adjacency2"))


def tracks_gradients(net: Any, x1: object, x2: object) -> bool:
    """Whether autograd records the kernel of ``net`` on ``x1``, ``x2``: gradients are
    enabled and an input tensor, or a hyperparameter given as a tensor, requires them."""
    if not torch.is_grad_enabled():
        return False
    if any(isinstance(x, torch.Tensor) and x.requires_grad for x in (x1, x2)):
        return True
    if not callable(getattr(net, "hyperparameters", None)):  # not a layer: refused later
        return False
    return any(value.requires_grad for value in net.hyperparameters().values())


def compute_kernel_tiles(
    net: Any,
    t1: torch.Tensor,
    t2: torch.Tensor | None,
    get: str | Sequence[str],
    names: tuple[str, ...],
    spatial: str,
    progress: bool | None,
    recorded: bool = False,
    side_inputs: SideInputs = (None, None, None, None),
) -> torch.Tensor | Kernels:
    """The kernels of checked inputs, tile by tile (see :func:`compute_kernels`).

    Tiles are copied into the result, or, when autograd records them (``recorded``),
    concatenated: the backward pass of a copy into a slice clones the whole gradient,
    once per tile, where that of a concatenation takes views.
    """
    paired = spatial_layout(net, spatial, t1)
    try:
        return _compute_tiles(net, t1, t2, get, names, paired, progress, recorded, side_inputs)
    except PositionalOutput:
        if spatial == "diagonal":
            raise ValueError(
                "the network's output keeps positions, whose kernel needs every pair of "
                "them: use spatial='auto' or 'full'"
            ) from None
        return _compute_tiles(net, t1, t2, get, names, True, progress, recorded, side_inputs)


def _compute_tiles(
    net: Any,
    t1: torch.Tensor,
    t2: torch.Tensor | None,
    get: str | Sequence[str],
    names: tuple[str, ...],
    paired: bool,
    progress: bool | None,
    recorded: bool,
    side_inputs: SideInputs,
) -> torch.Tensor | Kernels:
    """:func:`compute_kernel_tiles` in a chosen layout."""
    layout = Layout(tuple(t1.shape[2:]), paired)
    second = t1 if t2 is None else t2
    result: dict[str, torch.Tensor] = {}  # allocated at the first tile (its shape)
    budget = tile_budget(bool(layout.sizes), t1)
    pairs_per_tile = max(1, budget // layout.positions_per_pair)
    side = max(1, math.isqrt(pairs_per_tile))
    if t2 is None:
        row_side = col_side = balanced_side(t1.shape[0], side)
        if (paired and t1.shape[0] <= math.isqrt(2 * pairs_per_tile)
                and lists_pairs(net, t1, side_inputs)):
            # one tile: its listed pairs, about N^2 / 2, fit the budget
            row_side = col_side = t1.shape[0]
    else:
        row_side = balanced_side(t1.shape[0], side)
        col_side = balanced_side(second.shape[0], side)
    tiles = plan_tiles(t1.shape[0], second.shape[0], row_side, col_side, t2 is None)
    kept: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    with progress_bar(len(tiles), progress, "kernel", "tile") as bar:
        for tile in tiles:
            rows, cols = tile.rows, tile.cols
            diagonal = t2 is None and tile.is_diagonal
            tile_side = tuple(None if value is None else value[span]
                              for value, span in zip(side_inputs, (rows, cols, rows, cols)))
            block = kernel_block(net, t1[rows], None if diagonal else second[cols], names,
                                 paired, tile_side)
            for name in names:
                check_finite_kernel(block[name], name)
            if recorded:
                kept[tile.r0, tile.c0] = block
                if t2 is None and not diagonal:
                    kept[tile.c0, tile.r0] = {name: transposed(block[name]) for name in names}
            else:
                for name in names:
                    if name not in result:
                        result[name] = block[name].new_empty(
                            (t1.shape[0], second.shape[0], *block[name].shape[2:]))
                    result[name][rows, cols] = block[name]
                    if t2 is None and not diagonal:
                        # a contiguous transposed copy takes torch's blocked transpose kernel
                        result[name][cols, rows] = transposed(block[name]).contiguous()
            bar.update(1)
    if recorded and kept:
        row_starts = sorted({r0 for r0, _ in kept})
        col_starts = sorted({c0 for _, c0 in kept})
        result = {
            name: torch.cat([torch.cat([kept[r0, c0][name] for c0 in col_starts], dim=1)
                             for r0 in row_starts])
            for name in names
        }
    if isinstance(get, str):
        return result[get]
    return Kernels(**result)


def spatial_layout(net: Any, spatial: object, x: torch.Tensor) -> bool:
    """Whether the paired (full covariance) layout is used for inputs ``x``."""
    if spatial not in SPATIAL_CHOICES:
        raise ValueError(f"spatial must be one of {SPATIAL_CHOICES}, got {spatial!r}")
    needs_full = network_needs(net.walk()).full_covariance
    if spatial == "diagonal" and needs_full:
        raise ValueError(
            "spatial='diagonal' cannot be used with pooling layers (they mix positions); "
            "use spatial='auto' or 'full'"
        )
    return x.ndim > 2 and (spatial == "full" or needs_full)

def kernel_block(
    net: Any, x1: torch.Tensor, x2: torch.Tensor | None, names: tuple[str, ...], paired: bool,
    side: SideInputs = (None, None, None, None),
) -> dict[str, torch.Tensor]:
    """The requested kernels of one tile (``x2=None``: a symmetric diagonal tile), with
    the tile's masks and adjacencies ``side`` (of ``x2`` ignored when it is ``None``)."""
    mask1, mask2, adjacency1, adjacency2 = side
    if x2 is None:
        mask2 = adjacency2 = None
    if x2 is None and paired and lists_pairs(net, x1, side):
        block = listed_block(net, x1, names, mask1)
        if block is not None:
            return block
    initial = Kernel.from_inputs(x1, x2, with_ntk="ntk" in names, paired=paired,
                                 masks=(mask1, mask2), adjacencies=(adjacency1, adjacency2))
    check_finite_inputs_kernel(initial, x1, x2)
    state = net.transform(initial)
    if not isinstance(state, Kernel):
        raise ValueError(
            f"the network ends with {len(state)} parallel branches; close them with "
            "FanInSum, FanInConcat or FanInProd"
        )
    # the NTK is carried exactly when it is requested (``with_ntk`` above)
    block = {"nngp": state.nngp} if state.ntk is None else {"nngp": state.nngp, "ntk": state.ntk}
    if state.layout.sizes:
        if not state.layout.paired:
            raise PositionalOutput
        # positional outputs: (n1, n2, *positions of x1, *positions of x2)
        block = {name: state.layout.grouped(value) for name, value in block.items()}
    return {name: 0.5 * (block[name] + transposed(block[name])) if x2 is None else block[name]
            for name in names}


def lists_pairs(net: Any, x: torch.Tensor, side: SideInputs) -> bool:
    """Whether the symmetric tile of images ``x`` (full spatial covariance) is computed on
    its listed pairs ``i <= j`` (:class:`~widenets.kernel.PairList`): on the fast path,
    without adjacencies (masks are taken), with more than one example, when every layer
    of ``net`` takes listed pairs."""
    adjacencies = side[2:]
    return (fast_paths_enabled() and x.shape[0] > 1 and all(a is None for a in adjacencies)
            and all(layer.takes_pair_list() for layer in net.walk()))


def listed_block(
    net: Any, x: torch.Tensor, names: tuple[str, ...], mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor] | None:
    """The requested kernels of the symmetric tile of ``x`` (with its ``mask``) from its
    listed pairs: each pair computed once, and the matrices symmetric exactly. ``None``
    when the network's output keeps positions (the caller computes the full tile)."""
    pairs = PairList.upper(x.shape[0], x.device)
    initial = Kernel.from_inputs(x, None, with_ntk="ntk" in names, paired=True,
                                 masks=(mask, None), pairs=pairs)
    check_finite_inputs_kernel(initial, x, None)
    state = net.transform(initial)
    if not isinstance(state, Kernel) or state.layout.sizes:
        return None
    values = {"nngp": state.nngp} if state.ntk is None else {"nngp": state.nngp,
                                                             "ntk": state.ntk}
    return {name: pairs.scatter(values[name]) for name in names}


class PositionalOutput(Exception):
    """The network's output keeps positions, whose kernel needs every pair of them (the
    paired layout); raised by :func:`kernel_block` on the diagonal layout."""


def transposed(block: torch.Tensor) -> torch.Tensor:
    """The kernel block of the swapped inputs: ``(n2, n1)``, or for positional outputs
    ``(n1, n2, *P1, *P2)`` as ``(n2, n1, *P2, *P1)``."""
    if block.ndim == 2:
        return block.T
    count = (block.ndim - 2) // 2
    return block.permute(1, 0, *range(2 + count, 2 + 2 * count), *range(2, 2 + count))


def wider_dtype_hint(dtype: torch.dtype) -> str:
    """The end of an overflow message: a suggestion to compute in float64, unless it is."""
    return ", or compute in torch.float64" if dtype != torch.float64 else ""


def check_finite_inputs_kernel(initial: Kernel, x1: torch.Tensor, x2: torch.Tensor | None) -> None:
    """Raise a ``ValueError`` if the inputs' own second moments (the kernel before the first
    layer) overflow their dtype: the inputs, not the network, are then too large."""
    moments = (initial.nngp, initial.var1, initial.var2)
    if all(all_finite(m) for m in moments if m is not None):
        return
    largest = max(float(x.abs().max()) for x in (x1, x2) if x is not None)
    raise ValueError(
        f"the inputs' second moments overflow {x1.dtype}: inputs reach |x| = {largest:.3g}; "
        f"rescale the inputs (e.g. standardise them){wider_dtype_hint(x1.dtype)}"
    )


def check_finite_kernel(matrix: torch.Tensor, name: str) -> None:
    """Raise a ``ValueError`` if the kernel ``name`` has an infinite or NaN entry.

    With finite inputs (checked first, :func:`check_finite_inputs_kernel`) and closed-form
    maps, inf and NaN arise only from an overflow through the layers (NaN as ``inf - inf``
    or ``0 * inf``); ``Elementwise`` reports NaN from its own function itself.
    """
    if all_finite(matrix):
        return
    raise ValueError(
        f"the {name.upper()} overflows {matrix.dtype} (inf or NaN entries): the kernel "
        "grows beyond the floating-point range through the layers (e.g. a deep network of "
        f"RectifiedMonomial(n >= 2) or large W_std); reduce W_std or the depth"
        f"{wider_dtype_hint(matrix.dtype)}"
    )
