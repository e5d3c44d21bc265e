"""Atomic outputs: who counts as a stale writer, what a failed or empty write leaves, directory swaps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coreinfer.runtime.atomic import (
    atomic_output, is_stale, lock_path, remove_stale_temporaries, temporary_name,
)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_temporary_names_are_unique_and_name_their_owner(tmp_path):
    dest = tmp_path / "x.zarr"
    a, b = temporary_name(dest), temporary_name(dest)
    assert a != b and a.parent == tmp_path and a.name.startswith(".x.zarr.tmp-")
    assert not is_stale(a)  # this process owns it


def test_only_temporaries_of_exited_owners_on_this_host_are_removed(tmp_path):
    dest = tmp_path / "x.zarr"
    mine = temporary_name(dest)
    host = mine.name.rsplit("-", 1)[-1]
    dead = tmp_path / f".x.zarr.tmp-{dead_pid()}-00ab-{host}"
    elsewhere = tmp_path / f".x.zarr.tmp-{dead_pid()}-00cd-otherhost"  # cannot be checked from here: kept
    unknown = tmp_path / ".x.zarr.tmp-12345"  # not our naming: kept
    other_dest = tmp_path / f".y.zarr.tmp-{dead_pid()}-00ef-{host}"  # another destination's: not ours to judge
    for p in (mine, dead, elsewhere, unknown, other_dest):
        p.mkdir()
        (p / "zarr.json").write_text("{}")
    lock_path(dest).touch()
    assert remove_stale_temporaries(dest) == [dead]
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in (mine, elsewhere, unknown, other_dest, lock_path(dest))}


def test_failed_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    dest = tmp_path / "m.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert dest.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_output(dest):
            pass
    assert dest.read_text() == "old"


def test_directory_output_replaces_the_old_one_whole(tmp_path):
    dest = tmp_path / "d.zarr"
    for files in (("a", "b"), ("c",)):
        with atomic_output(dest) as tmp:
            tmp.mkdir()
            for f in files:
                (tmp / f).write_text(f)
    assert sorted(p.name for p in dest.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock_path(dest).name, "d.zarr"]


def test_a_linked_output_is_replaced_by_the_new_directory(tmp_path):
    """DVC's symlink cache type checks outputs out as links; the new store replaces the link, not its target."""
    target = tmp_path / "cache-copy"
    target.mkdir()
    (target / "old").write_text("old")
    dest = tmp_path / "d.zarr"
    dest.symlink_to(target)
    with atomic_output(dest) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert not dest.is_symlink() and sorted(p.name for p in dest.iterdir()) == ["new"]
    assert (target / "old").read_text() == "old"  # the cache is untouched
