"""What a kernel store guarantees against concurrent writers, foreign folders, damage and
read-only files:

* one writer at a time (an OS lock: a second writer is refused at once, naming the
  first's pid; a SIGKILLed writer leaves no lock behind), and the identity read back
  from disk before every tile, so a store changed or replaced under a writer is never
  mixed;
* a folder holding anything widenets did not create (a Zarr group of the user's
  included) is refused and left byte-for-byte untouched, while a store killed at any
  step of its creation is started over;
* every finished tile's checksums are verified when it is read: a deleted, altered or
  truncated chunk makes ``load_kernel`` name the tile, and the same call again repairs
  it to the bits of a fresh computation;
* a read-only complete store is read without writing, an unfinished one is refused
  before anything is computed;
* broken store metadata is a ``ValueError`` naming the path.

Read-only files: as root, permission bits do not stop writes, so there the store's
files are also refused by ``os.open`` for writing, as the kernel refuses them to any
other user; in both cases every file of the store is checked to be unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import widenets as wn
from tests.test_tiles import FC, data, kill, start_blocked_writer
from widenets import store as store_module
from widenets import tiles as tiles_module
from widenets.apps import cli

zarr = pytest.importorskip("zarr")


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: its inode, modification time and bytes
    (so that even rewriting a file with the same bytes shows)."""
    result = {}
    for path in sorted([folder, *folder.rglob("*")]):
        info = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        result[str(path.relative_to(folder))] = (info.st_ino, info.st_mtime_ns, content)
    return result


def counting(monkeypatch) -> list:
    """Record the tiles computed from now on."""
    calls = []
    original = tiles_module.compute_tile
    monkeypatch.setattr(tiles_module, "compute_tile",
                        lambda *a: calls.append(a[3]) or original(*a))
    return calls


def fresh(x: torch.Tensor, **kwargs) -> wn.Kernels:
    return wn.kernel_matrix(FC, x, get=("nngp", "ntk"), progress=False, **kwargs)


def assert_identical(result, expected) -> None:
    for name in ("nngp", "ntk"):
        assert torch.equal(result[name], expected[name]), name


def finished(path: Path) -> set[str]:
    return {p.name for p in (path / "done").iterdir() if not p.name.startswith(".")}


# --------------------------------------------------------------------------- one writer
def test_a_second_writer_is_refused_at_once_and_a_killed_one_leaves_no_lock(tmp_path):
    """The scenario of two processes writing one store with different inputs: the second
    is refused (no mix); after SIGKILL of the first, its call resumes."""
    path = tmp_path / "k.zarr"
    child = start_blocked_writer(path, 3, tmp_path)  # holds the lock, 3 tiles written
    try:
        for x in (data(30, (5,), seed=7), data(30, (5,), seed=8)):  # same inputs, other
            with pytest.raises(ValueError, match=re.escape(
                    f"store {path} is being written by another process (pid {child.pid})")):
                fresh(x, tile=4, store=path)
        assert len(finished(path)) == 3
    finally:
        kill(child)
    with pytest.raises(ValueError, match="its inputs_sha256 is"):
        fresh(data(30, (5,), seed=8), tile=4, store=path)
    x = data(30, (5,), seed=7)
    resumed = fresh(x, tile=4, store=path)
    assert_identical(resumed, fresh(x, tile=4))
    assert_identical(wn.load_kernel(path), resumed)


def test_the_lock_is_held_from_prepare_to_the_end_of_compute(tmp_path):
    x, path = data(12, (5,), seed=20), tmp_path / "k.zarr"
    job = tiles_module.prepare_kernel(FC, x, get=("nngp", "ntk"), tile=4, store=path)
    with pytest.raises(ValueError, match=rf"being written by another process \(pid {os.getpid()}"):
        fresh(x, tile=4, store=path)
    result = tiles_module.compute_kernel(job, progress=False)
    assert_identical(fresh(x, tile=4, store=path), result)  # released: this call may write
    job = tiles_module.prepare_kernel(FC, x, get=("nngp", "ntk"), tile=4, store=path)
    job.close()
    assert_identical(fresh(x, tile=4, store=path), result)
    with pytest.raises(ValueError, match="was closed"):
        tiles_module.compute_kernel(job, progress=False)


def test_identity_is_read_back_before_every_tile(tmp_path, monkeypatch):
    """Another process rewriting the store's identity while this one computes: the next
    tile is refused, none is written after the change."""
    x, path = data(12, (5,), seed=21), tmp_path / "k.zarr"
    original = tiles_module.compute_tile
    calls = []

    def rewrite_identity_on_third_tile(*args):
        calls.append(1)
        if len(calls) == 3:
            metadata = json.loads((path / "zarr.json").read_text())
            metadata["attributes"]["widenets"]["inputs_sha256"] = "0" * 64
            (path / "zarr.json").write_text(json.dumps(metadata))
        return original(*args)

    monkeypatch.setattr(tiles_module, "compute_tile", rewrite_identity_on_third_tile)
    with pytest.raises(ValueError, match="now holds a different computation"):
        fresh(x, tile=4, store=path)
    assert len(finished(path)) == 2


def test_a_store_replaced_under_a_writer_is_not_mixed(tmp_path):
    """The store deleted and made again by another call (with other inputs) while a job
    holds it: the job writes nothing into the new store, which keeps its own numbers."""
    path = tmp_path / "k.zarr"
    x, y = data(12, (5,), seed=22), data(12, (5,), seed=23)
    job = tiles_module.prepare_kernel(FC, x, get=("nngp", "ntk"), tile=4, store=path)
    shutil.rmtree(path)
    other = fresh(y, tile=4, store=path)
    before = snapshot(path)
    with pytest.raises(ValueError, match="was deleted or replaced"):
        tiles_module.compute_kernel(job, progress=False)
    assert snapshot(path) == before
    assert_identical(wn.load_kernel(path), other)
    assert_identical(other, fresh(y, tile=4))


# --------------------------------------------------------------------------- foreign folders
def foreign_zarr_group(path: Path) -> np.ndarray:
    group = zarr.open_group(str(path), mode="w")
    mine = np.arange(16.0).reshape(4, 4)
    group.create_array("ntk", shape=(4, 4), dtype="float64")[:] = mine
    group.attrs["owner"] = "me"
    return mine


@pytest.mark.parametrize("kind", ["zarr group", "zarr group with the marker's name inside",
                                  "zarr array", "plain files"])
def test_a_foreign_folder_is_refused_and_left_untouched(tmp_path, kind):
    path = tmp_path / "mine.zarr"
    if kind.startswith("zarr group"):
        mine = foreign_zarr_group(path)
        if "marker" in kind:
            (path / "ntk" / store_module.MARKER).write_text("{}")  # not at the top
    elif kind == "zarr array":
        zarr.create_array(str(path), shape=(3, 3), dtype="float64")[:] = 1.0
    else:
        path.mkdir()
        (path / "notes.txt").write_text("mine")
        (path / "done").mkdir()
    before = snapshot(path)
    x = data(4, (5,), seed=24)
    with pytest.raises(ValueError, match=re.escape(
            f"store {path} is a folder that is not a kernel store")) as info:
        wn.kernel_matrix(FC, x, store=path, progress=False)
    assert "left untouched" in str(info.value)
    assert cli.main(["kernel", "--data", "digits", "--n", "4", "--store", str(path),
                     "--no-progress"]) == 2
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wn.load_kernel(path)
    assert snapshot(path) == before
    if kind.startswith("zarr group"):
        np.testing.assert_array_equal(zarr.open_group(str(path), mode="r")["ntk"][:], mine)


def test_a_file_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "k.zarr"
    path.write_text("mine")
    with pytest.raises(ValueError, match=re.escape(f"store {path} exists and is not a folder")):
        wn.kernel_matrix(FC, data(4, (5,), seed=24), store=path, progress=False)
    assert path.read_text() == "mine"


@pytest.mark.parametrize("state", ["only the lock file", "only the marker",
                                   "marker and a Zarr group without attributes",
                                   "marker and a broken zarr.json", "killed in create_array"])
def test_a_store_killed_while_being_created_is_started_over(tmp_path, monkeypatch, state):
    """Creation writes the marker first and the identity last: every intermediate state
    is recognised as widenets' own and, having no finished tile, created again."""
    path = tmp_path / "k.zarr"
    x = data(10, (5,), seed=25)
    if state == "killed in create_array":
        def killed(*args, **kwargs):
            raise KeyboardInterrupt

        with monkeypatch.context() as patch:
            patch.setattr(zarr.Group, "create_array", killed)
            with pytest.raises(KeyboardInterrupt):
                fresh(x, tile=4, store=path)
        assert (path / store_module.MARKER).exists() and (path / "zarr.json").exists()
        assert "widenets" not in json.loads((path / "zarr.json").read_text())["attributes"]
    else:
        path.mkdir()
        (path / store_module.LOCK).write_text("")
        if state != "only the lock file":
            (path / store_module.MARKER).write_text("{}\n")
        if "without attributes" in state:
            group = zarr.open_group(str(path), mode="a")
            group.create_array("nngp", shape=(10, 10), chunks=(4, 4), dtype="float64")
            (path / "done").mkdir()
        if "broken" in state:
            (path / "zarr.json").write_text('{"zarr_format": 3, "node_')
    calls = counting(monkeypatch)
    result = fresh(x, tile=4, store=path)
    assert len(calls) == len(tiles_module.plan_tiles(10, 10, 4, 4, True))
    assert_identical(result, fresh(x, tile=4))
    assert_identical(wn.load_kernel(path), result)


def test_a_group_without_attributes_is_foreign_unless_widenets_marked_it(tmp_path):
    """The same Zarr group without attributes: someone else's without the marker."""
    path = tmp_path / "k.zarr"
    zarr.open_group(str(path), mode="a").create_array("ntk", shape=(10, 10), dtype="float64")
    before = snapshot(path)
    with pytest.raises(ValueError, match="without widenets' attributes"):
        fresh(data(10, (5,), seed=25), tile=4, store=path)
    assert snapshot(path) == before


# --------------------------------------------------------------------------- damaged tiles
def chunk_file(path: Path, name: str, tile: tiles_module.Tile, rows: int, cols: int) -> Path:
    chunk = path / name / "c" / str(tile.r0 // rows) / str(tile.c0 // cols)
    assert chunk.is_file(), chunk
    return chunk


def delete(chunk: Path) -> None:
    chunk.unlink()


def flip_8_bytes(chunk: Path) -> None:
    content = bytearray(chunk.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 8] = bytes(b ^ 0xFF for b in content[middle : middle + 8])
    chunk.write_bytes(bytes(content))


def truncate(chunk: Path) -> None:
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


@pytest.mark.parametrize("damage", [delete, flip_8_bytes, truncate])
@pytest.mark.parametrize("name", ["nngp", "ntk"])
def test_a_damaged_tile_is_named_and_repaired_by_the_same_call(tmp_path, monkeypatch, damage,
                                                               name):
    path, x = tmp_path / "k.zarr", data(30, (5,), seed=26)
    expected = fresh(x, tile=12)
    fresh(x, tile=12, store=path)
    tile = tiles_module.Tile(12, 24, 24, 30)  # off the diagonal, at the edge: 12 x 6
    damage(chunk_file(path, name, tile, 12, 12))
    message = (f"store {path}: the {name} tile of rows 12:24, columns 24:30 is damaged "
               "(")
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        wn.load_kernel(path)
    assert "run the same kernel_matrix call again" in str(info.value)
    calls = counting(monkeypatch)
    repaired = fresh(x, tile=12, store=path)
    assert calls == [tile]
    assert_identical(repaired, expected)
    assert_identical(wn.load_kernel(path), expected)


def test_a_truncated_chunk_is_reported_as_damage_not_a_codec_error(tmp_path):
    path, x = tmp_path / "k.zarr", data(30, (5,), seed=26)
    fresh(x, tile=12, store=path)
    truncate(chunk_file(path, "ntk", tiles_module.Tile(0, 12, 0, 12), 12, 12))
    with pytest.raises(ValueError, match=r"rows 0:12, columns 0:12 is damaged \(its chunk "
                                         r"cannot be decoded: .*Zstd"):
        wn.load_kernel(path)


@pytest.mark.parametrize("marker", ["", "{not json", '{"rows": [0, 4], "cols": [4, 8]}',
                                    "missing"])
def test_a_damaged_marker_is_a_damaged_tile(tmp_path, monkeypatch, marker):
    path, x = tmp_path / "k.zarr", data(10, (5,), seed=27)
    expected = fresh(x, tile=4, store=path)
    key = tiles_module.Tile(4, 8, 8, 10).key
    if marker == "missing":
        (path / "done" / key).unlink()
    else:
        (path / "done" / key).write_text(marker)
    with pytest.raises(ValueError, match=r"the tile of rows 4:8, columns 8:10 is damaged"):
        wn.load_kernel(path)
    calls = counting(monkeypatch)
    assert_identical(fresh(x, tile=4, store=path), expected)
    assert [t.key for t in calls] == [key]
    assert_identical(wn.load_kernel(path), expected)


def test_the_marker_records_each_kernels_checksum(tmp_path):
    path, x = tmp_path / "k.zarr", data(10, (5,), seed=28)
    result = fresh(x, tile=4, store=path)
    marker = json.loads((path / "done" / "0-4").read_text())
    assert marker["rows"] == [0, 4] and marker["cols"] == [4, 8]
    for name in ("nngp", "ntk"):
        numbers = np.ascontiguousarray(result[name][0:4, 4:8].numpy())
        assert marker["sha256"][name] == hashlib.sha256(numbers.tobytes()).hexdigest()


def test_markers_of_earlier_versions_are_read_without_checksums(tmp_path):
    path, x = tmp_path / "k.zarr", data(10, (5,), seed=29)
    expected = fresh(x, tile=4, store=path)
    for marker in (path / "done").iterdir():
        marker.write_text(store_module.LEGACY_MARKER)
    assert_identical(wn.load_kernel(path), expected)


# --------------------------------------------------------------------------- read-only stores
@pytest.fixture
def read_only(monkeypatch):
    """``read_only(path)``: make every file and folder of ``path`` read-only (as root,
    whom permission bits do not stop, ``os.open`` also refuses to open them for
    writing, as the kernel does for any other user). Permissions restored afterwards."""
    made = []

    def make(path: Path) -> None:
        for item in [path, *path.rglob("*")]:
            mode = item.stat().st_mode
            made.append((item, mode))
            item.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        if os.geteuid() == 0:
            real_open, root = os.open, path.resolve()
            writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

            def refusing(file, flags, *args, **kwargs):
                if flags & writing and Path(file).resolve().is_relative_to(root):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
                return real_open(file, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", refusing)

    yield make
    monkeypatch.undo()
    for item, mode in reversed(made):
        item.chmod(mode)


def test_a_complete_read_only_store_is_read_without_writing(tmp_path, read_only,
                                                            monkeypatch, capsys):
    path, x = tmp_path / "k.zarr", data(10, (5,), seed=30)
    expected = fresh(x, tile=4, store=path)
    read_only(path)
    before = snapshot(path)
    calls = counting(monkeypatch)
    assert_identical(fresh(x, tile=4, store=path), expected)
    assert_identical(wn.load_kernel(path), expected)
    assert calls == []
    assert snapshot(path) == before
    # A damaged tile of a read-only store cannot be repaired: said so, nothing written.
    monkeypatch.undo()
    shutil.copytree(path, tmp_path / "copy.zarr")
    copy = tmp_path / "copy.zarr"
    for item in [copy, *copy.rglob("*")]:
        item.chmod(item.stat().st_mode | stat.S_IWUSR)
    flip_8_bytes(chunk_file(copy, "ntk", tiles_module.Tile(0, 4, 0, 4), 4, 4))
    read_only(copy)
    before = snapshot(copy)
    with pytest.raises(ValueError, match="is damaged .* but the store is read-only"):
        fresh(x, tile=4, store=copy)
    assert snapshot(copy) == before


def test_an_unfinished_read_only_store_is_refused_before_computing(tmp_path, read_only,
                                                                   monkeypatch):
    path, x = tmp_path / "k.zarr", data(10, (5,), seed=31)
    original = tiles_module.compute_tile
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(tiles_module, "compute_tile", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fresh(x, tile=4, store=path)
    read_only(path)
    before = snapshot(path)
    calls = counting(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(f"store {path} is read-only (")) as info:
        fresh(x, tile=4, store=path)
    assert "unfinished" in str(info.value)
    assert calls == [] and snapshot(path) == before


def test_the_cli_reads_a_complete_read_only_store_and_refuses_an_unfinished_one(
        tmp_path, read_only, monkeypatch, capsys):
    store = tmp_path / "k.zarr"
    argv = ["kernel", "--data", "digits", "--n", "20", "--tile", "8", "--store", str(store),
            "--no-progress"]
    assert cli.main(argv) == 0
    read_only(store)
    before = snapshot(store)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "tiles already done: 6 of 6" in capsys.readouterr().out
    assert snapshot(store) == before
    monkeypatch.undo()

    partial = tmp_path / "partial.zarr"
    calls = []
    original = tiles_module.compute_tile

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(tiles_module, "compute_tile", interrupted)
    partial_argv = [*argv[:-3], "--store", str(partial), "--no-progress"]
    assert cli.main(partial_argv) == 130
    read_only(partial)
    capsys.readouterr()
    assert cli.main(partial_argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"widenets kernel: error: store {partial} is read-only")


# --------------------------------------------------------------------------- broken metadata
def finished_store(tmp_path: Path) -> Path:
    path = tmp_path / "k.zarr"
    wn.kernel_matrix(FC, data(6, (3,), seed=32), tile=4, store=path, progress=False)
    return path


def corrupt_zarr_json(path: Path) -> str:
    (path / "zarr.json").write_text('{"attributes": {"widenets"')
    return "zarr.json cannot be read"


def an_array_not_a_group(path: Path) -> str:
    shutil.rmtree(path)
    zarr.create_array(str(path), shape=(6, 6), dtype="float64")
    return "is a Zarr array, not a kernel store"


def attributes_missing_a_key(path: Path) -> str:
    metadata = json.loads((path / "zarr.json").read_text())
    del metadata["attributes"]["widenets"]["tile"]
    (path / "zarr.json").write_text(json.dumps(metadata))
    return "its widenets attributes lack 'tile'"


def attribute_of_the_wrong_type(path: Path) -> str:
    metadata = json.loads((path / "zarr.json").read_text())
    metadata["attributes"]["widenets"]["shape"] = "6 x 6"
    (path / "zarr.json").write_text(json.dumps(metadata))
    return "its widenets attribute 'shape' is '6 x 6'"


def array_metadata_missing(path: Path) -> str:
    (path / "ntk" / "zarr.json").unlink()
    return "its arrays cannot be opened"


def array_of_another_shape(path: Path) -> str:
    zarr.open_group(str(path), mode="a").create_array("ntk", shape=(5, 5), chunks=(4, 4),
                                                      dtype="float64", overwrite=True)
    return "its ntk array is (5, 5)"


@pytest.mark.parametrize("breakage", [corrupt_zarr_json, an_array_not_a_group,
                                      attributes_missing_a_key, attribute_of_the_wrong_type,
                                      array_metadata_missing, array_of_another_shape])
def test_broken_metadata_is_a_value_error_naming_the_path(tmp_path, breakage):
    path = finished_store(tmp_path)
    what = breakage(path)
    with pytest.raises(ValueError, match=re.escape(str(path))) as info:
        wn.load_kernel(path)
    assert what in str(info.value)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        wn.kernel_matrix(FC, data(6, (3,), seed=32), tile=4, store=path, progress=False)
