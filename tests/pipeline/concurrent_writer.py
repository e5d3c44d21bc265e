"""One writer process of the concurrent-writer tests: ``python -m tests.pipeline.concurrent_writer KIND DEST VALUE``.

It waits until the file ``--start`` exists (all writers begin together), then writes ``DEST`` ``--rounds``
times with ``VALUE`` in the data, each array write slowed by ``--delay`` seconds so the writers overlap, and
reads ``DEST`` back after every write (whoever committed last, the store must be whole). With ``--pause``
it stops after its first array until that file exists (a live writer holding its temporary). Prints one line
per round: ``ok <value read back>``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["artifact", "zarr"])
    ap.add_argument("dest", type=Path)
    ap.add_argument("value", type=int)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.02)
    ap.add_argument("--start", type=Path)
    ap.add_argument("--pause", type=Path)
    a = ap.parse_args()

    import zarr

    real = zarr.Group.create_array
    calls = []

    def slow(self, *args, **kw):
        calls.append(1)
        if a.pause is not None and len(calls) == 2:
            print("paused", flush=True)
            _wait_for(a.pause)
        time.sleep(a.delay)
        return real(self, *args, **kw)

    zarr.Group.create_array = slow
    if a.start is not None:
        _wait_for(a.start)
    for _ in range(a.rounds):
        if a.kind == "artifact":
            from coreinfer.runtime.artifact import read_artifact, write_artifact

            from .synthetic import synthetic_artifact_inputs

            arrays, attrs, _ = synthetic_artifact_inputs(n_clusters=3, n_layers=4, n_neurons=100)
            arrays["sizes"] = np.full(3, a.value)
            write_artifact(a.dest, arrays, attrs)
            got = read_artifact(a.dest).arrays["sizes"]
        elif a.kind == "zarr":
            from coreinfer.pipeline.io import read_zarr_arrays, write_zarr_arrays

            write_zarr_arrays(a.dest, {f"x{i}": np.full((50, 20), a.value) for i in range(6)}, {"value": a.value})
            arrays, attrs = read_zarr_arrays(a.dest)
            got = [arrays[f"x{i}"] for i in range(6)]
            assert all(np.all(x == attrs["value"]) for x in got), "a store mixes two writers"
            got = np.asarray([attrs["value"]])
        assert len(set(np.asarray(got).ravel().tolist())) == 1, "a store mixes two writers"
        print("ok", json.dumps(int(np.asarray(got).ravel()[0])), flush=True)


if __name__ == "__main__":
    main()
