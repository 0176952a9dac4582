"""The resumable Zarr store of :func:`widenets.kernel_matrix`: who may write it, what it
holds, and whether its finished tiles are intact.

A store is a folder holding

* ``widenets.json``: the marker that widenets made the folder, written first when a store
  is created (so a store killed while being created is recognised as widenets' own);
* ``widenets.lock``: the file the one writing process holds an OS lock on
  (``fcntl.flock``, ``msvcrt.locking`` on Windows; released by the operating system
  when the process ends, however it ends) and in which it writes its pid;
* a Zarr group (``zarr.json``) whose attributes are the *identity* of the computation
  (``widenets``: architecture, ``get``, inputs' SHA-256, dtype, shape, tiles, symmetry,
  version; ``complete``), written last when a store is created, with one array per
  kernel chunked by tile;
* ``done/``: one marker per finished tile, JSON with the tile's rows and columns and the
  SHA-256 of each kernel's numbers, created atomically (a temporary file renamed) after
  the numbers are written.

The rules (see :class:`TileStore`): a folder holding anything widenets did not create is
refused before anything in it is touched; one process writes at a time, and a second
one is refused at once; the identity is read back from disk and checked before every
tile is written; a finished tile is verified against its checksums whenever it is read
(:class:`DamagedTileError` names it), and a resume recomputes it. A store whose files
cannot be opened for writing is read-only: a complete one can be read, an unfinished one
is refused. Markers are not fsynced: after a power loss the last tiles may be damaged,
which the checksums detect and a resume repairs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from .inputs import KERNEL_NAMES
from .optional import require
from .tiling import Tile

#: Folder of finished-tile markers inside a store.
DONE = "done"
#: File that makes a folder a widenets store; the first thing a new store gets.
MARKER = "widenets.json"
#: File that the writing process holds an OS lock on; it holds the writer's pid.
LOCK = "widenets.lock"
#: Identity fields that may differ between calls on one store (they do not change the
#: numbers): the widenets version, and whether ``load_kernel`` returns a tensor.
#: ``architecture_repr`` shows the architecture to people (its spec, ``architecture``,
#: identifies it; stores written before specs hold a repr there instead).
INFORMATIONAL = ("version", "returns", "architecture_repr")
#: Identity entries recorded only by computations that use them (masks and graphs): a
#: store that has one is refused to a call without it.
ONLY_WHEN_USED = ("side_inputs_sha256",)
#: ``errno`` values of a failed open for writing that mean "this store is read-only".
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
#: Content of the finished-tile markers of widenets versions before checksums.
LEGACY_MARKER = "1"


class DamagedTileError(ValueError):
    """A finished tile of a store whose numbers cannot be trusted: a missing or
    unreadable marker, a chunk that cannot be decoded, or numbers that differ from the
    checksum recorded when the tile was written."""

    def __init__(self, path: Path, tile: Tile, name: str | None, reason: str) -> None:
        what = "tile" if name is None else f"{name} tile"
        super().__init__(
            f"store {path}: the {what} of rows {tile.r0}:{tile.r1}, columns "
            f"{tile.c0}:{tile.c1} is damaged ({reason}); run the same kernel_matrix call "
            "again to recompute it"
        )
        self.tile = tile
        self.name = name


def checksum(value: np.ndarray) -> str:
    """SHA-256 of an array's numbers as C-ordered little-endian bytes (the same on
    every machine, whatever the array's memory layout)."""
    array = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
    return hashlib.sha256(array.reshape(-1).view(np.uint8).data).hexdigest()


def read_attributes(path: Path) -> dict[str, Any]:
    """The attributes of the Zarr group at ``path``, read from its ``zarr.json`` on disk
    (not from a cache). ``ValueError`` naming the path and what is wrong otherwise."""
    try:
        metadata = json.loads((path / "zarr.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is not a kernel store (no zarr.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"store {path} is damaged: its zarr.json cannot be read ({error})"
                         ) from None
    node = metadata.get("node_type") if isinstance(metadata, dict) else None
    if node != "group":
        what = "a Zarr array" if node == "array" else "not a Zarr group"
        raise ValueError(f"{path} is {what}, not a kernel store (a Zarr group written by "
                         "widenets.kernel_matrix)")
    attributes = metadata.get("attributes", {})
    if not isinstance(attributes, dict):
        raise ValueError(f"store {path} is damaged: its zarr.json attributes are not a "
                         "JSON object")
    return attributes


def _pair_of_counts(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))


def _float_dtype(value: object) -> bool:
    try:
        return isinstance(value, str) and np.dtype(value).kind == "f"
    except TypeError:
        return False


#: The identity fields a store must have, with a test of their values.
IDENTITY_FIELDS = {
    "get": lambda v: (isinstance(v, list) and 0 < len(v) == len(set(v))
                      and all(n in KERNEL_NAMES for n in v)),
    "dtype": _float_dtype,
    "shape": _pair_of_counts,
    "tile": _pair_of_counts,
    "symmetric": lambda v: isinstance(v, bool),
}


def read_identity(path: Path) -> tuple[dict[str, Any], bool]:
    """The ``widenets`` identity of the store at ``path`` and whether it is complete,
    read from disk; ``ValueError`` naming the path if it is missing or malformed."""
    attributes = read_attributes(path)
    identity = attributes.get("widenets")
    if identity is None:
        raise ValueError(f"store {path} was not written by widenets.kernel_matrix (its Zarr "
                         "group has no widenets attributes)")
    if not isinstance(identity, dict):
        raise ValueError(f"store {path} is damaged: its widenets attributes are not a JSON "
                         "object")
    for field, valid in IDENTITY_FIELDS.items():
        if field not in identity:
            raise ValueError(f"store {path} is damaged: its widenets attributes lack {field!r}")
        if not valid(identity[field]):
            raise ValueError(f"store {path} is damaged: its widenets attribute {field!r} is "
                             f"{identity[field]!r}")
    return identity, attributes.get("complete") is True


def stored_tile_sizes(path: str | os.PathLike) -> tuple[int, int] | None:
    """The tile sizes of an existing kernel store, or ``None`` if there is none (or it
    cannot be read: opening it then says why)."""
    try:
        identity, _ = read_identity(Path(path))
    except ValueError:
        return None
    return tuple(identity["tile"])


def store_description(path: str | os.PathLike) -> dict[str, Any]:
    """What a store holds (its Zarr group's attributes: ``widenets`` and ``complete``),
    as a dict for display."""
    return read_attributes(Path(path))


def foreign_content(path: Path) -> str | None:
    """Why the folder ``path`` is not (and cannot become) a widenets store without
    touching something widenets did not create, or ``None`` if it may be used (or is
    not a folder).

    A folder may be used if it does not exist, is empty, holds only the lock file (a
    store killed just after locking), holds the widenets marker, or is a Zarr group with
    widenets' attributes (a store of a widenets version before the marker). Anything
    else, a Zarr group without widenets' attributes included, is someone else's.
    """
    if not path.is_dir():
        return None
    entries = sorted(os.listdir(path))
    if MARKER in entries:
        return None
    if "zarr.json" in entries:
        try:
            read_identity(path)
        except ValueError:
            return "it holds a Zarr node without widenets' attributes"
        return None
    others = [entry for entry in entries if entry != LOCK]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return f"it holds {shown}, which widenets did not create"
    return None


def _try_lock(fd: int) -> bool:
    """Lock the open file ``fd`` exclusively without waiting; ``False`` if another
    process (or another open of the file) holds the lock. The operating system releases
    the lock when the file is closed or the process ends, even by SIGKILL."""
    try:
        if sys.platform == "win32":  # no fcntl on Windows: lock the first byte instead
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


class TileStore:
    """A kernel store opened by :func:`~widenets.tiles.prepare_kernel` for one call:
    created if new, locked against other writers, its identity checked against the
    call's (see the module docstring for the layout and the rules).

    ``read_only`` is true when its lock file cannot be opened for writing; only a
    complete store is opened so (and then nothing is written). Otherwise the lock is held
    until :meth:`close`. ``compressed``: whether a new store's chunks are compressed
    (Zstandard; kernels compress a little, Cholesky factors not at all, and reading them
    back uncompressed is three times faster).
    """

    def __init__(self, path: str | os.PathLike, identity: dict, n1: int, n2: int,
                 rows: int, cols: int, names: tuple[str, ...], dtype: np.dtype,
                 compressed: bool = True) -> None:
        self.path = Path(path)
        self.done = self.path / DONE
        self.names = names
        self.dtype = np.dtype(dtype)
        self.read_only = False
        self.read_only_reason = ""
        self.compressed = compressed
        self._lock: IO[bytes] | None = None
        self._refuse_foreign()  # before anything in the folder is touched
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise ValueError(f"cannot create store {self.path}: {error.strerror}") from None
        self._acquire()
        try:
            self._refuse_foreign()  # again, now that no other widenets process can write
            if self._needs_creation():
                if self.read_only:
                    raise ValueError(f"store {self.path} is read-only ({self.read_only_reason})"
                                     " and holds no kernel; use a writable path")
                self._create(identity, n1, n2, rows, cols)
            self.identity, self.complete = read_identity(self.path)
            self._check(identity)
            if self.read_only and not self.complete:
                raise ValueError(
                    f"store {self.path} is read-only ({self.read_only_reason}) and unfinished:"
                    " its remaining tiles cannot be written; make it writable or use "
                    "another path"
                )
            if not self.read_only:
                self.done.mkdir(exist_ok=True)
            self._open_arrays()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_finished(cls, path: str | os.PathLike) -> TileStore:
        """A complete store, opened for reading only (no lock: reading writes nothing);
        ``ValueError`` naming the path for anything else."""
        store = cls.open_for_reading(path)
        if not store.complete:
            raise ValueError(f"store {store.path} is unfinished; run the same kernel_matrix "
                             "call again to complete it")
        return store

    @classmethod
    def open_for_reading(cls, path: str | os.PathLike) -> TileStore:
        """A store opened to read its finished tiles, complete or not, without its lock
        (for the workers of a computation whose one writer holds it)."""
        store = cls.__new__(cls)
        store.path = Path(path)
        store.done = store.path / DONE
        store.read_only, store.read_only_reason, store._lock = True, "opened for reading", None
        store.identity, store.complete = read_identity(store.path)
        store.names = tuple(store.identity["get"])
        store.dtype = np.dtype(store.identity["dtype"])
        store._open_arrays()
        return store

    # ----------------------------------------------------------------- opening
    def _refuse_foreign(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"store {self.path} exists and is not a folder; it is left "
                             "untouched: use a new path")
        reason = foreign_content(self.path)
        if reason is not None:
            raise ValueError(f"store {self.path} is a folder that is not a kernel store "
                             f"({reason}); it is left untouched: use a new path")

    def _acquire(self) -> None:
        """Hold the store's OS lock, or find the store read-only (its lock file cannot
        be opened for writing); ``ValueError`` at once if another process holds it."""
        lock_path = self.path / LOCK
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            if error.errno not in READ_ONLY_ERRNOS:
                raise
            self.read_only = True
            self.read_only_reason = f"{lock_path} cannot be opened for writing: {error.strerror}"
            return
        lock = os.fdopen(fd, "r+b")  # closing it (or the process ending) releases the lock
        if not _try_lock(fd):
            lock.close()
            try:
                pid = lock_path.read_text().strip() or "unknown"
            except OSError:
                pid = "unknown"
            if pid == str(os.getpid()):
                pid += ", this process: another call still holds it"
            raise ValueError(f"store {self.path} is being written by another process "
                             f"(pid {pid}); wait for it to finish, or use another path")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n".encode())
        lock.flush()
        self._lock = lock

    def _needs_creation(self) -> bool:
        """Whether the store is new, or was killed while being created: it has the
        marker but no identity yet, and no finished tile. A store with finished tiles
        whose identity cannot be read is damaged, not new (``read_identity`` says why)."""
        if not (self.path / "zarr.json").exists() and not (self.path / MARKER).exists():
            return True
        try:
            read_identity(self.path)
        except ValueError as error:
            if not (self.path / MARKER).exists():
                raise
            if not self.finished():
                return True
            raise ValueError(f"{error}; it has finished tiles, so it is not started over: "
                             "delete it or use another path") from None
        return False

    def _create(self, identity: dict, n1: int, n2: int, rows: int, cols: int) -> None:
        """Marker first (from then on the folder is widenets'), then the Zarr group and
        its arrays, the ``done`` folder, and the identity last (from then on the store
        exists). A creation killed at any step is recognised and started over."""
        zarr = require("zarr", "store", "a kernel store (kernel_matrix(store=...), load_kernel)")

        marker = self.path / MARKER
        if not marker.exists():
            marker.write_text(json.dumps({"kernel_store": "widenets.kernel_matrix",
                                          "version": identity.get("version")}) + "\n")
        (self.path / "zarr.json").unlink(missing_ok=True)  # left by an interrupted creation
        group = zarr.open_group(str(self.path), mode="a")
        for name in self.names:
            group.create_array(name, shape=(n1, n2), chunks=(rows, cols), dtype=self.dtype,
                               fill_value=np.nan, overwrite=True,
                               compressors="auto" if self.compressed else None)
        self.done.mkdir(exist_ok=True)
        group.attrs.update({"widenets": identity, "complete": False})

    def _check(self, identity: dict) -> None:
        for key in ONLY_WHEN_USED:
            if key in self.identity and key not in identity:
                raise ValueError(
                    f"store {self.path} holds a different computation: its {key} is "
                    f"{self.identity[key]!r}, this call has none; use another store path"
                )
        for key, value in identity.items():
            if key in INFORMATIONAL:
                continue
            stored = self.identity.get(key)
            shown = (stored, value)
            if key == "architecture":
                shown = (self.identity.get("architecture_repr", stored),
                         identity.get("architecture_repr", value))
                if isinstance(stored, str):  # written before specs: identified by a repr
                    value = shown[1]
            if stored != value:
                raise ValueError(
                    f"store {self.path} holds a different computation: its {key} is "
                    f"{shown[0]!r}, this call's is {shown[1]!r}; use another store path"
                )

    def _open_arrays(self) -> None:
        """Open the group and its arrays, checking them against the identity."""
        zarr = require("zarr", "store", "a kernel store (kernel_matrix(store=...), load_kernel)")

        shape = tuple(self.identity["shape"])
        chunks = tuple(self.identity["tile"])
        try:
            group = zarr.open_group(str(self.path), mode="r" if self.read_only else "r+")
            self.arrays = {name: group[name] for name in self.names}
        except MemoryError:
            raise
        except Exception as error:  # zarr raises KeyError, JSON and its own errors
            raise ValueError(f"store {self.path} is damaged: its arrays cannot be opened "
                             f"({type(error).__name__}: {error})") from None
        self.group = group
        for name, array in self.arrays.items():
            if (array.shape, array.chunks, array.dtype) != (shape, chunks, self.dtype):
                raise ValueError(
                    f"store {self.path} is damaged: its {name} array is {array.shape} in "
                    f"chunks {array.chunks} of {array.dtype}, its attributes say {shape} in "
                    f"{chunks} of {self.dtype}"
                )

    # ----------------------------------------------------------------- reading
    def finished(self) -> set[str]:
        """Keys of the tiles that have a marker (intact or not: :meth:`read` checks)."""
        if not self.done.is_dir():
            return set()
        return {p.name for p in self.done.iterdir() if not p.name.startswith(".")}

    def _checksums(self, tile: Tile) -> dict[str, str] | None:
        """The checksums in a finished tile's marker (``None`` for a marker of a widenets
        version before checksums, which cannot be verified)."""
        try:
            text = (self.done / tile.key).read_text()
        except FileNotFoundError:
            raise DamagedTileError(self.path, tile, None, "its marker is missing") from None
        except (OSError, UnicodeDecodeError) as error:
            raise DamagedTileError(self.path, tile, None, f"its marker cannot be read: {error}"
                                   ) from None
        if text.strip() == LEGACY_MARKER:
            return None
        try:
            marker = json.loads(text)
        except json.JSONDecodeError:
            marker = None
        if (not isinstance(marker, dict) or marker.get("rows") != [tile.r0, tile.r1]
                or marker.get("cols") != [tile.c0, tile.c1]
                or not isinstance(marker.get("sha256"), dict)):
            raise DamagedTileError(self.path, tile, None, "its marker is not this tile's")
        return marker["sha256"]

    def read(self, tile: Tile, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """A finished tile's numbers, verified against its marker's checksums;
        :class:`DamagedTileError` if they cannot be trusted."""
        sums = self._checksums(tile)
        values = {}
        for name in names:
            try:
                value = self.arrays[name][tile.r0 : tile.r1, tile.c0 : tile.c1]
            except MemoryError:
                raise
            except Exception as error:  # a damaged chunk fails in its codec (e.g. Zstd)
                raise DamagedTileError(self.path, tile, name, "its chunk cannot be decoded: "
                                       f"{type(error).__name__}: {error}") from None
            if sums is not None and sums.get(name) != checksum(value):
                raise DamagedTileError(self.path, tile, name, "its numbers differ from the "
                                       "checksum recorded when it was written")
            values[name] = value
        return values

    # ----------------------------------------------------------------- writing
    def check_unchanged(self) -> None:
        """Refuse to write unless the store on disk is still the one this process opened
        and locked: the same lock file (not a folder deleted and made again) and the same
        identity, read back from disk."""
        if self._lock is None:
            reason = self.read_only_reason if self.read_only else "it was closed"
            raise ValueError(f"store {self.path} cannot be written ({reason})")
        try:
            same = os.path.samestat(os.fstat(self._lock.fileno()), os.stat(self.path / LOCK))
        except FileNotFoundError:
            same = False
        if not same:
            raise ValueError(f"store {self.path} was deleted or replaced while this process "
                             "was writing it; nothing more is written to it")
        try:
            identity, _ = read_identity(self.path)
        except ValueError as error:
            raise ValueError(f"{error}; it changed while this process was writing it, "
                             "nothing more is written to it") from None
        if identity != self.identity:
            raise ValueError(f"store {self.path} now holds a different computation (its "
                             "widenets attributes changed on disk while this process was "
                             "writing it); nothing more is written to it")

    def prepare_writes(self, damaged: list[Tile]) -> None:
        """Before tiles are written: the store is no longer complete, and the markers of
        damaged tiles are removed (a repair killed halfway leaves them unfinished)."""
        self.check_unchanged()
        if self.complete:
            self.group.attrs["complete"] = False
            self.complete = False
        for tile in damaged:
            (self.done / tile.key).unlink(missing_ok=True)

    def write(self, tile: Tile, values: dict[str, np.ndarray]) -> None:
        """The tile's numbers, then its marker with their checksums (atomically: a
        temporary file renamed), after checking that the store is unchanged."""
        self.check_unchanged()
        sums = {}
        for name, value in values.items():
            value = np.ascontiguousarray(value, dtype=self.dtype)
            self.arrays[name][tile.r0 : tile.r1, tile.c0 : tile.c1] = value
            sums[name] = checksum(value)
        marker = {"rows": [tile.r0, tile.r1], "cols": [tile.c0, tile.c1], "sha256": sums}
        temporary = self.done / f".{tile.key}.{os.getpid()}"
        temporary.write_text(json.dumps(marker) + "\n")
        os.replace(temporary, self.done / tile.key)

    def mark_complete(self) -> None:
        """Record that every tile is finished (nothing is written if it already is)."""
        if not self.complete:
            self.check_unchanged()
            self.group.attrs["complete"] = True
            self.complete = True

    def close(self) -> None:
        """Release the lock (if held); the store can then no longer be written."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def closed(self) -> bool:
        """Whether this writable store's lock was released by :meth:`close`."""
        return not self.read_only and self._lock is None
