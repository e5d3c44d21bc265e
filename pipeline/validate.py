"""Stage 0, validate: the whole configuration checked, and the resolved config that every stage depends on.

DVC removes a stage's outputs just before it runs that stage. This stage is first in the DAG: every other
stage depends on its slice of the resolved config, so a rejected value (``dvc exp run -S coreset.beta=2``)
stops the run here, before DVC has touched any other stage's outputs.

Writes ``<work_dir>/config/``: ``resolved.yaml`` (the whole typed config, defaults filled in) and, for each
stage of ``dvc.yaml``, ``<stage>.yaml`` with exactly the params that stage lists. A stage's slice changes
only when one of its own params does, so a change still reruns only the stages it concerns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from .config import FIX, ConfigError, PipelineConfig, check_eval
from .io import atomic_output


def stage_params(dvc_yaml: Path) -> dict[str, list[str]]:
    """{stage: the params.yaml keys it lists} from ``dvc.yaml`` (entries naming other files are skipped)."""
    stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {name: [p for p in (st.get("params") or []) if isinstance(p, str)] for name, st in stages.items()}


def select(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise ConfigError(f"dvc.yaml lists the param {key!r}, which the configuration does not have{FIX}")
        data = data[part]
    return data


def check_environment(cfg: PipelineConfig) -> None:
    """What can be checked without loading anything: the corpus files exist, the embedding model resolves."""
    from coreinfer.runtime.artifact import ArtifactError, check_embedding_model

    for i, src in enumerate(cfg.corpus.sources):
        if src.path and not Path(src.path).is_file():
            raise ConfigError(f"invalid pipeline configuration: corpus.sources[{i}].path: {src.path} not found "
                              f"(paths are relative to the project folder){FIX}")
    try:
        check_embedding_model(cfg.embed.model_id)
    except ArtifactError as e:
        raise ConfigError(f"invalid pipeline configuration: embed.model_id: {e}{FIX}") from None


def validate(cfg: PipelineConfig, dvc_yaml: str | Path = "dvc.yaml") -> list[Path]:
    check_eval(cfg)
    check_environment(cfg)
    resolved = OmegaConf.to_container(OmegaConf.structured(cfg))
    out_dir = Path(cfg.work_dir) / "config"
    slices = {"resolved": resolved}
    dvc_yaml = Path(dvc_yaml)
    if dvc_yaml.is_file():
        for stage, keys in stage_params(dvc_yaml).items():
            if stage != "validate":
                slices[stage] = {k: select(resolved, k) for k in keys}
    written = []
    for name, data in slices.items():
        path = out_dir / f"{name}.yaml"
        with atomic_output(path) as tmp:
            tmp.write_text(yaml.safe_dump(data, sort_keys=True), encoding="utf-8")
        written.append(path)
    print(f"validate: configuration valid; resolved config and {len(slices) - 1} stage slices in {out_dir}")
    return written
