"""Small shared helpers of the pipeline stages: atomic outputs, JSON, hashing, the prepared corpus table."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from coreinfer.runtime.atomic import atomic_output, read_lock

CORPUS_COLUMNS = ("id", "text", "source", "task", "split")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def corpus_hash(ids, texts, splits) -> str:
    h = hashlib.sha256()
    for i, t, s in zip(ids, texts, splits):
        h.update(json.dumps([i, t, s], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def read_corpus(path: str | os.PathLike):
    """The prepared corpus as a pyarrow Table (columns ``CORPUS_COLUMNS``)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared corpus {path} not found: run the prepare stage first (dvc repro prepare)")
    return pq.read_table(path)


def write_zarr_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> Path:
    """A small zarr v3 group of whole-array chunks, written atomically (intermediate stage outputs)."""
    import zarr

    with atomic_output(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name, a in arrays.items():
            a = np.ascontiguousarray(a)
            z = root.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, s) for s in a.shape), fill_value=0)
            if a.size:
                z[...] = a
        root.attrs.update(json.loads(json.dumps(attrs, sort_keys=True)))
    return Path(path)


def read_zarr_arrays(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    import zarr

    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    with read_lock(path):  # a concurrent writer's commit comes before or after this read, not during it
        root = zarr.open_group(str(path), mode="r")
        arrays = {name: np.asarray(arr[...]) for name, arr in root.arrays()}
        return arrays, dict(root.attrs)
