"""Large kernel matrices in tiles: bounded memory, a progress bar, a resumable Zarr store,
and Dask clusters.

:func:`kernel_matrix` splits ``K(x1, x2)`` into tiles of ``rows x cols`` examples (any
``N1``, ``N2``; the last tiles are smaller), computes each tile with ``net.kernel`` and
places it into the output; with ``x2=None`` only the tiles on and above the diagonal are
computed and the others are their transposes.

With ``store="path.zarr"`` every finished tile is also written to a Zarr group on disk
(one chunk per tile, so no two tiles share a file), followed by a marker file in
``path.zarr/done/`` that records the SHA-256 of the tile's numbers and is created
atomically (written under a temporary name, then renamed). A tile counts as finished
only when its marker exists, so a process killed at any moment loses at most the tiles
in flight: a half-written chunk has no marker and is recomputed. Running the same call
again resumes, and recomputes any finished tile whose numbers no longer match its
checksums. The group's attributes record what the numbers are (architecture, ``get``, a
SHA-256 of the inputs, dtype, shape, tiles, widenets version); a store made for anything
else is refused, and so is a folder holding anything widenets did not create. One
process writes a store at a time (an OS lock, released if it dies). The store itself
(layout, lock, identity checks, checksums) is :mod:`widenets.store`. :func:`load_kernel`
reads a finished store back, verifying every tile (Zarr arrays and JSON: no pickle).

With ``client=`` a ``dask.distributed.Client``, the tiles are computed as Dask tasks on
the cluster's workers; this process writes the store and assembles the result, so the
store and resume behave the same, and the numbers are identical.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from .engine import (
    SideInputs,
    channels_first,
    checked_side_inputs,
    reads_channels_last,
    tracks_gradients,
)
from .inputs import as_input_pair, check_positive_int, parse_get
from .kernel import Kernels
from .layers.base import Layer
from .optional import require
from .requirements import network_needs
from .specs import NotCanonicalError
from .store import DONE as DONE
from .store import DamagedTileError, TileStore, stored_tile_sizes
from .store import store_description as store_description
from .tiling import Tile, plan_tiles
from .version import __version__

#: Bytes per kernel entry of one tile's working set, per position pair: the moment
#: tensors a layer holds at once (input and output NNGP, NTK, variances, temporaries).
WORKING_COPIES = 12
#: Largest tile side: keeps the progress bar moving and a store's chunks a few hundred MiB.
MAX_TILE = 4096
#: Fraction of the available memory used when ``memory_limit`` is not given.
MEMORY_FRACTION = 0.5


def available_memory() -> int:
    """Bytes of memory available now (Linux ``/proc/meminfo``; 4 GiB if unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def pair_cost(net: Layer, example_shape: tuple[int, ...]) -> int:
    """Numbers held per pair of examples in a layer's moments: ``1`` for a dense network,
    ``P`` positions for a convolutional one that needs only equal positions, ``P^2``
    for one that pools (the full spatial covariance)."""
    positions = math.prod(example_shape[1:]) if len(example_shape) > 1 else 1
    return positions * positions if network_needs(net.walk()).full_covariance else positions


def auto_tile(
    net: Layer, n1: int, n2: int, example_shape: tuple[int, ...], n_kernels: int,
    itemsize: int, memory_limit: int | None,
) -> int:
    """A square tile side such that the output plus one tile's working set fits in
    ``memory_limit`` bytes (default: half the available memory)."""
    budget = int(MEMORY_FRACTION * available_memory()) if memory_limit is None else memory_limit
    output = n1 * n2 * n_kernels * itemsize
    per_pair = pair_cost(net, example_shape) * itemsize * WORKING_COPIES
    room = budget - output
    if room < per_pair:
        raise ValueError(
            f"memory_limit of {budget / 2**20:.0f} MiB leaves no room for tiles next to the "
            f"{output / 2**20:.0f} MiB output; raise memory_limit or use a store and "
            "smaller inputs"
        )
    side = int(math.isqrt(room // per_pair))
    return max(1, min(side, MAX_TILE, max(n1, n2)))


def _tile_sizes(tile: object, n1: int, n2: int, symmetric: bool) -> tuple[int, int]:
    if isinstance(tile, tuple) and len(tile) == 2:
        sizes = (check_positive_int(tile[0], "tile rows"), check_positive_int(tile[1], "tile cols"))
    elif isinstance(tile, (str, tuple, list, float)):
        raise TypeError(f"tile must be 'auto', an int or (rows, cols), got {tile!r}")
    else:
        side = check_positive_int(tile, "tile")
        sizes = (side, side)
    if symmetric and sizes[0] != sizes[1]:
        raise ValueError(f"with x2=None tiles must be square, got {tile!r}")
    return min(sizes[0], n1), min(sizes[1], n2)


def compute_tile(
    net: Layer, x1: torch.Tensor, x2: torch.Tensor | None, tile: Tile, names: tuple[str, ...],
    side: SideInputs = (None, None, None, None),
) -> dict[str, np.ndarray]:
    """One tile of each kernel, as NumPy arrays (a Dask task; picklable arguments).
    ``side``: the checked ``(mask1, mask2, adjacency1, adjacency2)`` of all the inputs.

    The rows and columns are copied into fresh buffers: the results of vectorised sums
    can depend on the memory alignment of their operands, and a fresh buffer is aligned
    the same way in every process, so a tile has the same bits wherever it is computed.
    """
    rows = x1[tile.r0 : tile.r1].clone()
    mask1, mask2, adjacency1, adjacency2 = (
        None if value is None else value[span]
        for value, span in zip(side, (tile.rows, tile.cols, tile.rows, tile.cols)))
    if x2 is None and tile.is_diagonal:
        kernels = net.kernel(rows, None, get=names, mask1=mask1, adjacency1=adjacency1,
                             progress=False)  # (the callers' bars count the tiles)
    else:
        cols = (x1 if x2 is None else x2)[tile.c0 : tile.c1].clone()
        kernels = net.kernel(rows, cols, get=names, mask1=mask1, mask2=mask2,
                             adjacency1=adjacency1, adjacency2=adjacency2, progress=False)
    values = {name: cast(torch.Tensor, kernels[name]).detach().cpu().numpy()  # all asked for
              for name in names}
    if any(value.ndim != 2 for value in values.values()):
        raise ValueError(
            "kernel_matrix keeps one entry per pair of examples, but the network's output "
            "keeps its positions; compute its positional kernel with net.kernel"
        )
    return values


def side_inputs_digest(side: SideInputs, symmetric: bool) -> str:
    """SHA-256 of the masks and adjacencies (those of ``x2`` only when it is given)."""
    mask1, mask2, adjacency1, adjacency2 = side
    if symmetric:
        mask2 = adjacency2 = None
    return tensors_digest(mask1, mask2, adjacency1, adjacency2)


def inputs_digest(x1: torch.Tensor, x2: torch.Tensor | None) -> str:
    """SHA-256 of the inputs' shapes, dtypes and bytes."""
    return tensors_digest(x1, x2)


def tensors_digest(*tensors: torch.Tensor | None) -> str:
    """SHA-256 of the tensors' shapes, dtypes and bytes, in order (``None`` counted)."""
    digest = hashlib.sha256()
    for x in tensors:
        if x is None:
            digest.update(b"none")
            continue
        array = x.detach().cpu().contiguous().numpy()
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def architecture_identity(net: Layer) -> dict:
    """What identifies ``net`` in a store: its :meth:`~widenets.Layer.kernel_spec` (the same
    in every process, without declared widths that do not enter the kernels)."""
    try:
        return net.kernel_spec()
    except NotCanonicalError as error:
        raise ValueError(
            f"a kernel store identifies the architecture by a description that another "
            f"process can rebuild, and this one has none: {error}"
        ) from None


def _identity(net: Layer, names, x1, x2, n1, n2, rows, cols, symmetric, dtype,
              single: bool, side: SideInputs) -> dict:
    identity = {
        "architecture": architecture_identity(net), "architecture_repr": repr(net),
        "get": list(names), "inputs_sha256": inputs_digest(x1, x2),
        "dtype": str(dtype), "shape": [n1, n2], "tile": [rows, cols], "symmetric": symmetric,
        "version": __version__, "returns": "tensor" if single else "Kernels",
    }
    if any(value is not None for value in side):  # (stores without them keep their identity)
        identity["side_inputs_sha256"] = side_inputs_digest(side, symmetric)
    return identity


def tile_results(net, x1, x2, todo: list[Tile], names, client,
             side: SideInputs = (None, None, None, None)) -> Iterator[tuple[Tile, dict]]:
    """``(tile, values)`` for each tile to compute, here or on a Dask cluster."""
    if client is None:
        for tile in todo:
            yield tile, compute_tile(net, x1, x2, tile, names, side)
        return
    # Scattered under fresh keys (hash=False): content-hashed keys are shared by calls with
    # equal data, and a call made while the previous one's data is being released lost its
    # dependencies. Not broadcast: the workers fetch what they need from each other, while
    # broadcasting replicates through the scheduler, which fights the active memory
    # manager's reduction of replicas (hangs, dask/distributed#4907).
    net_f, x1_f = client.scatter(net, hash=False), client.scatter(x1, hash=False)
    x2_f = None if x2 is None else client.scatter(x2, hash=False)
    side_f = client.scatter(side, hash=False) if any(v is not None for v in side) else side
    yield from on_workers(client, compute_tile, [
        (tile, (net_f, x1_f, x2_f, tile, names, side_f)) for tile in todo])


def on_workers(client: Any, function: Callable[..., Any], calls: list[tuple[Any, tuple]]
               ) -> Iterator[tuple[Any, Any]]:
    """``(key, function(*arguments))`` for each ``(key, arguments)`` of ``calls``, run on the
    workers of the Dask ``client`` and yielded as they finish (each result released from
    the cluster once taken). Large arguments shared by the calls should be scattered by
    the caller first (``client.scatter(value, hash=False)``, see :func:`tile_results`)."""
    as_completed = require("distributed", "dask", "client=").as_completed
    futures = {client.submit(function, *arguments, pure=False): key
               for key, arguments in calls}
    for future in as_completed(futures):
        yield futures[future], future.result()
        future.release()


#: Side of the blocks in which a tile is copied transposed (cache-friendly).
TRANSPOSE_BLOCK = 256


def copy_transposed(value: np.ndarray, out: np.ndarray, r0: int, c0: int) -> None:
    """``out[r0:, c0:]`` (the size of ``value.T``) ``= value.T``, block by block: a
    transposed copy of a large array in one go strides through memory."""
    rows, cols = value.shape
    for i in range(0, rows, TRANSPOSE_BLOCK):
        for j in range(0, cols, TRANSPOSE_BLOCK):
            block = value[i : i + TRANSPOSE_BLOCK, j : j + TRANSPOSE_BLOCK]
            out[r0 + j : r0 + j + block.shape[1], c0 + i : c0 + i + block.shape[0]] = block.T


def place_tile(out: dict[str, np.ndarray], tile: Tile, values: dict[str, np.ndarray],
               symmetric: bool) -> None:
    """Put a tile's numbers into the output (and, off the diagonal of a symmetric
    matrix, their transpose into the mirrored tile)."""
    for name, value in values.items():
        out[name][tile.r0 : tile.r1, tile.c0 : tile.c1] = value
        if symmetric and not tile.is_diagonal:
            copy_transposed(value, out[name], tile.c0, tile.r0)


def _result(out: dict[str, np.ndarray], single: bool) -> torch.Tensor | Kernels:
    """The output as ``net.kernel`` gives it: a tensor for one kernel asked by name, else
    :class:`Kernels`."""
    result = {name: torch.from_numpy(value) for name, value in out.items()}
    return next(iter(result.values())) if single else Kernels(**result)


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The NumPy dtype of a torch dtype (``TypeError`` if NumPy has none, e.g.
    ``bfloat16``: validated inputs are never in such a dtype)."""
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:
        raise TypeError(f"inputs of dtype {dtype} have no NumPy equivalent; convert them "
                        "to float32 or float64") from None


@dataclass
class KernelJob:
    """A kernel matrix to compute: its inputs, tiles and (opened, checked, locked)
    store. ``single``: ``get`` named one kernel as a string, so the result is a tensor.
    ``repaired``: the damaged finished tiles that :func:`compute_kernel` recomputed."""

    net: Layer
    names: tuple[str, ...]
    x1: torch.Tensor
    x2: torch.Tensor | None
    rows: int
    cols: int
    dtype: np.dtype
    store: TileStore | None
    single: bool = False
    repaired: list[Tile] = field(default_factory=list)
    #: The checked ``(mask1, mask2, adjacency1, adjacency2)``.
    side: SideInputs = (None, None, None, None)

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    @property
    def shape(self) -> tuple[int, int]:
        return self.x1.shape[0], (self.x1 if self.x2 is None else self.x2).shape[0]

    @property
    def plan(self) -> list[Tile]:
        return plan_tiles(*self.shape, self.rows, self.cols, self.symmetric)

    def finished(self) -> set[str]:
        """Keys of the tiles already in the store (their checksums are verified when
        they are read)."""
        return set() if self.store is None else self.store.finished()

    def close(self) -> None:
        """Release the store's lock without computing (:func:`compute_kernel` releases
        it when it returns or fails)."""
        if self.store is not None:
            self.store.close()


def prepare_kernel(
    net: Layer,
    x1: object,
    x2: object | None = None,
    get: str | tuple[str, ...] = "ntk",
    tile: int | tuple[int, int] | str = "auto",
    store: str | os.PathLike | None = None,
    memory_limit: int | None = None,
    *,
    mask1: object | None = None,
    mask2: object | None = None,
    adjacency1: object | None = None,
    adjacency2: object | None = None,
) -> KernelJob:
    """Check the arguments of :func:`kernel_matrix`, choose its tiles and open its store
    without computing anything: a store of another computation, a folder holding
    anything widenets did not create, a store another process is writing and an
    unfinished read-only store are refused with a ``ValueError``. The store stays locked
    against other writers until :func:`compute_kernel` returns (or :meth:`KernelJob.close`).
    """
    if not isinstance(net, Layer):
        raise TypeError(f"net must be a widenets layer, got {type(net).__name__}")
    names = parse_get(get)
    if store is not None:  # before the store's folder is touched
        require("zarr", "store", "kernel_matrix(store=...)")
    if memory_limit is not None:
        memory_limit = check_positive_int(memory_limit, "memory_limit")
    auto = isinstance(tile, str)
    if auto and tile != "auto":
        raise TypeError(f"tile must be 'auto', an int or (rows, cols), got {tile!r}")
    t1, t2 = as_input_pair(x1, x2, layout_warning=not reads_channels_last(net))
    net, t1, t2 = channels_first(net, t1, t2)
    side_inputs = checked_side_inputs(t1, t2, (mask1, mask2), (adjacency1, adjacency2))
    symmetric = t2 is None
    n1, n2 = t1.shape[0], t1.shape[0] if t2 is None else t2.shape[0]
    dtype = numpy_dtype(t1.dtype)
    stored_tile = None if store is None else stored_tile_sizes(store)
    if auto and stored_tile is not None:
        rows, cols = stored_tile  # resume with the store's tiles, whatever memory is free now
    elif auto:
        side = auto_tile(net, n1, n2, tuple(t1.shape[1:]), len(names), dtype.itemsize,
                         memory_limit)
        rows, cols = min(side, n1), min(side, n2)
    else:
        rows, cols = _tile_sizes(tile, n1, n2, symmetric)
    if symmetric:
        rows = cols = min(rows, cols)
    single = isinstance(get, str)
    tile_store = None
    if store is not None:
        identity = _identity(net, names, t1, t2, n1, n2, rows, cols, symmetric, dtype, single,
                             side_inputs)
        tile_store = TileStore(store, identity, n1, n2, rows, cols, names, dtype)
    return KernelJob(net, names, t1, t2, rows, cols, dtype, tile_store, single,
                     side=side_inputs)


def compute_kernel(
    job: KernelJob, progress: bool = True, client: object | None = None
) -> torch.Tensor | Kernels:
    """Compute a prepared kernel matrix: finished tiles are read from the store and
    verified against their checksums, the others (and damaged ones, listed in
    ``job.repaired``) computed here or on ``client``'s workers and written to it. The
    store's lock is released when this returns or fails."""
    names, symmetric, plan, tile_store = job.names, job.symmetric, job.plan, job.store
    if tile_store is not None and tile_store.closed:
        raise ValueError(f"the store {tile_store.path} of this job was closed; call "
                         "prepare_kernel again")
    try:
        out = {name: np.empty(job.shape, dtype=job.dtype) for name in names}
        finished = job.finished()
        todo, damaged = [], []
        for t in plan:
            if t.key not in finished:
                todo.append(t)
                continue
            assert tile_store is not None  # a finished tile is in the store
            try:
                place_tile(out, t, tile_store.read(t, names), symmetric)
            except DamagedTileError as damage:
                if tile_store.read_only:
                    raise ValueError(f"{damage}; but the store is read-only "
                                     f"({tile_store.read_only_reason})") from None
                damaged.append(t)
                todo.append(t)
        if todo and tile_store is not None:
            tile_store.prepare_writes(damaged)
        job.repaired = damaged
        bar = tqdm(total=len(plan), initial=len(plan) - len(todo), disable=not progress,
                   desc="kernel tiles", unit="tile")
        start, entries = time.perf_counter(), 0
        try:
            for t, values in tile_results(job.net, job.x1, job.x2, todo, names, client, job.side):
                if tile_store is not None:
                    tile_store.write(t, values)
                place_tile(out, t, values, symmetric)
                entries += (t.r1 - t.r0) * (t.c1 - t.c0)
                bar.update(1)
                bar.set_postfix(entries_per_s=f"{entries / (time.perf_counter() - start):.3g}",
                                refresh=False)
                del values  # one tile in memory while the next is computed
        finally:
            bar.close()
        if tile_store is not None:
            tile_store.mark_complete()
    finally:
        if tile_store is not None:
            tile_store.close()
    return _result(out, job.single)


def kernel_matrix(
    net: Layer,
    x1: object,
    x2: object | None = None,
    get: str | tuple[str, ...] = "ntk",
    tile: int | tuple[int, int] | str = "auto",
    store: str | os.PathLike | None = None,
    progress: bool = True,
    client: object | None = None,
    memory_limit: int | None = None,
    *,
    mask1: object | None = None,
    mask2: object | None = None,
    adjacency1: object | None = None,
    adjacency2: object | None = None,
) -> torch.Tensor | Kernels:
    """The kernel matrix ``K(x1, x2)`` of an architecture, computed in tiles.

    Args:
        net: the architecture.
        x1, x2: inputs as for ``net.kernel``; ``x2=None`` means ``x1`` and computes only
            the tiles on and above the diagonal.
        get: ``"nngp"`` or ``"ntk"`` (then a tensor), or a tuple or list of them (then a
            :class:`Kernels`), as for ``net.kernel``.
        tile: ``"auto"`` (from ``memory_limit`` and the architecture's numbers per pair,
            see ``auto_tile``; an existing store's tiles when resuming), a side, or
            ``(rows, cols)`` (integers: Python, NumPy or 0-D tensors); need not divide N.
        store: a folder (``.zarr``) where finished tiles are kept; the same call again
            resumes, and recomputes finished tiles that fail their checksums. Refused
            with a ``ValueError``: a store of another computation, a folder holding
            anything widenets did not create, a store another process is writing, an
            unfinished store that cannot be written. A complete store that cannot be
            written is read without writing.
        progress: a tqdm bar over tiles, with entries per second and time left.
        client: a ``dask.distributed.Client``; tiles become tasks on its workers.
        memory_limit: bytes for the output plus one tile's working set (default: half
            the available memory); an integer.
        mask1, mask2, adjacency1, adjacency2: masks of real positions and graphs, as for
            ``net.kernel``; a store records their digest, so a store of other masks or
            graphs is refused.

    Returns a CPU tensor ``(N1, N2)`` in the inputs' dtype (or :class:`Kernels`). The
    same as ``compute_kernel`` of ``prepare_kernel``.
    """
    if client is not None:  # before any store is opened and locked
        require("distributed", "dask", "kernel_matrix(client=...)")
    if tracks_gradients(net, x1, x2):
        if store is not None or client is not None:
            raise ValueError(
                "kernel_matrix with store= or client= keeps numbers, not gradients, but the "
                "inputs or a hyperparameter require grad: detach them (or use torch.no_grad()),"
                " or compute without store and client"
            )
        prepare_kernel(net, x1, x2, get, tile, None, memory_limit, mask1=mask1, mask2=mask2,
                       adjacency1=adjacency1, adjacency2=adjacency2)  # the same checks
        kernels = net.kernel(x1, x2, get=parse_get(get), progress=progress, mask1=mask1,
                             mask2=mask2, adjacency1=adjacency1, adjacency2=adjacency2)
        if isinstance(get, str):
            return cast(torch.Tensor, kernels[get]).cpu()
        return Kernels(**{name: cast(torch.Tensor, kernels[name]).cpu()
                          for name in parse_get(get)})
    job = prepare_kernel(net, x1, x2, get, tile, store, memory_limit, mask1=mask1, mask2=mask2,
                         adjacency1=adjacency1, adjacency2=adjacency2)
    return compute_kernel(job, progress, client)



def load_kernel(path: str | os.PathLike) -> torch.Tensor | Kernels:
    """A finished kernel store of :func:`kernel_matrix` as a CPU tensor or :class:`Kernels`,
    in the form of the call that created it: a tensor if its ``get`` was one name as a
    string, :class:`Kernels` if it was a tuple or list (stores of widenets versions that
    did not record this: a tensor for one kernel, else :class:`Kernels`).

    Every tile is verified against the checksums recorded when it was written; a damaged
    one raises a ``ValueError`` naming it (running the same ``kernel_matrix`` call again
    repairs it). An unfinished store, a path that is not a kernel store and a store
    whose metadata is broken raise a ``ValueError`` naming the path.
    """
    tile_store = TileStore.open_finished(path)
    identity = tile_store.identity
    (n1, n2), (rows, cols) = identity["shape"], identity["tile"]
    symmetric, names = identity["symmetric"], tile_store.names
    out = {name: np.empty((n1, n2), dtype=tile_store.dtype) for name in names}
    for t in plan_tiles(n1, n2, rows, cols, symmetric):
        place_tile(out, t, tile_store.read(t, names), symmetric)
    returns = identity.get("returns")
    return _result(out, len(names) == 1 if returns is None else returns == "tensor")
