"""Pipeline test helpers: configs in a temporary directory, tiny corpora, a tiny model's artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coreinfer.pipeline.config import from_dict

from .synthetic import synthetic_artifact_inputs  # noqa: F401  (re-exported for the tests)


def make_cfg(tmp_path: Path, sources=None, **sections):
    """A validated PipelineConfig whose outputs go under ``tmp_path``; ``sections`` update the defaults."""
    data = {
        "model": {"name": "tiny", "slug": "tiny", "spec": "tiny", "batch_size": 3, "max_tokens": 64},
        "corpus": {"name": "test", "sources": sources or [], "heldout_fraction": 0.0, "min_chars": 3},
        "work_dir": str(tmp_path / "work"),
        "artifacts_dir": str(tmp_path / "artifacts"),
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return from_dict(data)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def src(path, **kw):
    return {"name": kw.pop("name", "s"), "path": str(path), "text_field": "text", "task": "t", **kw}


@pytest.fixture
def artifact_inputs():
    return synthetic_artifact_inputs()
