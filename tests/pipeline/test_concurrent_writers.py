"""Concurrent writers of one output, as real processes: every writer succeeds with a whole store in place,
and no writer deletes another live writer's temporary (the issue-14 failures: a damaged profile store
moved into place, a FileNotFoundError in one of five coreset rounds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coreinfer.pipeline.io import read_zarr_arrays
from coreinfer.runtime.artifact import read_artifact
from coreinfer.runtime.atomic import lock_path

REPO = Path(__file__).resolve().parents[2]


def writer(kind: str, dest: Path, value: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.pipeline.concurrent_writer", kind, str(dest), str(value), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def temporaries(dest: Path) -> list[Path]:
    return [p for p in dest.parent.glob(f".{dest.name}.tmp-*") if p != lock_path(dest)]


def finish(procs: list[subprocess.Popen]) -> list[list[int]]:
    """Wait for every writer; each must exit 0 having read a whole store back after each of its writes."""
    values = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        values.append([json.loads(line.split()[1]) for line in out.splitlines() if line.startswith("ok ")])
    return values


pytestmark = pytest.mark.slow  # writer processes (each imports torch through coreinfer.runtime)


@pytest.mark.parametrize("kind", ["artifact", "zarr"])
def test_concurrent_writers_all_commit_whole_stores(tmp_path, kind):
    """Three processes write the same destination three times each (write_artifact, or atomic_output through
    write_zarr_arrays), started together, array writes slowed so that their temporaries coexist. All succeed,
    every read-back is whole, the survivor is one writer's."""
    dest = tmp_path / {"artifact": "coreneurons.zarr", "zarr": "profile.zarr"}[kind]
    start = tmp_path / "start"
    procs = [writer(kind, dest, v, "--rounds", "3", "--start", str(start)) for v in (1, 2, 3)]
    start.touch()
    values = finish(procs)
    assert all(len(v) == 3 and set(v) <= {1, 2, 3} for v in values)
    if kind == "artifact":
        final = {int(x) for x in read_artifact(dest).arrays["sizes"]}
    elif kind == "zarr":
        arrays, attrs = read_zarr_arrays(dest)
        final = {int(x) for a in arrays.values() for x in np.unique(a)}
        assert final == {attrs["value"]}
    assert len(final) == 1 and final <= {1, 2, 3}
    assert temporaries(dest) == []


@pytest.mark.parametrize("kind", ["artifact", "zarr"])
def test_a_live_writers_temporary_survives_another_write(tmp_path, kind):
    """Writer A pauses halfway through its store; writer B writes the same destination from start to end
    (removing stale temporaries on the way). A's temporary is untouched, A then commits a whole store."""
    dest = tmp_path / "out.zarr"
    go = tmp_path / "go"
    a = writer(kind, dest, 7, "--rounds", "1", "--pause", str(go), "--delay", "0")
    assert a.stdout.readline().strip() == "paused"
    (held,) = temporaries(dest)
    before = sorted(p.relative_to(held) for p in held.rglob("*"))
    finish([writer(kind, dest, 8, "--rounds", "1", "--delay", "0")])
    assert held.is_dir() and sorted(p.relative_to(held) for p in held.rglob("*")) == before
    go.touch()
    out, err = a.communicate(timeout=300)
    assert a.returncode == 0, err
    assert out.split() == ["ok", "7"]
    if kind == "artifact":
        assert set(read_artifact(dest).arrays["sizes"].tolist()) == {7}
    else:
        assert read_zarr_arrays(dest)[1]["value"] == 7
    assert temporaries(dest) == []
