"""The evaluation runner: every (task, method, kept fraction, score) on the same items, resumable.

Each finished (task, method, kept, score, item) appends one JSON line to ``<out>/results.jsonl`` (flushed
and fsynced); a restarted run skips what is there, so a killed evaluation continues where it stopped. The
first line records what the numbers depend on (model, artifact hash, parameters, data file hashes); a
restart with different settings is refused instead of mixing results.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coreinfer.runtime.selection import SCORES, check_fraction

from . import methods as MM
from . import tasks as T

RESULTS_FILE = "results.jsonl"
# per-call cost details some methods record (stability-refresh), averaged into the summary rows where present
EXTRA_COST_KEYS = ("ffn_bytes_per_token_full_refresh", "refreshes", "core_jaccard")
FORMAT = "coreinfer.eval.v1"


class EvalError(ValueError):
    pass


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"
    artifact: str | None = None
    methods: list[str] = field(default_factory=lambda: ["dense", "stability", "griffin", "random", "oracle-token",
                                                         "svd-predictor"])
    kept: list[float] = field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    scores: list[str] = field(default_factory=lambda: ["magnitude"])  # the runtime default (measured best)
    tasks: list[str] = field(default_factory=lambda: ["agreement", "wikitext"])
    limit: int | None = None  # items per task (None: all)
    task_limits: dict[str, int] = field(default_factory=dict)  # per-task override of limit
    seed: int = 0
    alpha: float = 0.4
    layers: str | None = None  # sparse layers, "a:b" or fractions; None: the paper's 5/32..27/32
    out: str = "metrics/eval"
    static_source: str = "artifact"  # artifact | profile
    svd_rank: int = 128
    profile_alpaca: int | None = None  # even seed-task rows in the profile corpus (None: all)
    profile_gsm8k: int = 64  # GSM8K train questions in the profile corpus
    profile_max_tokens: int = 256
    profile_dir: str | None = None  # where the profile cache (profile-<hash>.npz) lives; None: ``out``
    budget: str | None = None  # the budget stage's budget.json (method "budget": per-layer sizes at each kept bytes)
    refresh_every: int | None = None  # method "stability-refresh": decoded tokens between re-selections
    task_config: dict[str, T.TaskConfig] = field(default_factory=dict)
    dtype: str | None = None
    device: str | None = None
    memory_budget: str | None = None  # GPU memory the model may use ("12GiB"): the eager offloaded path (issue 11)
    progress: bool = True
    fresh: bool = False  # discard an existing results file

    def task_cfg(self, name: str) -> T.TaskConfig:
        return self.task_config.get(name) or T.DEFAULT_TASK_CONFIG[name]

    def task_limit(self, name: str) -> int | None:
        return self.task_limits.get(name, self.limit)


def validate(cfg: EvalConfig) -> EvalConfig:
    """Check everything that needs no model; errors name the option and the fix."""
    T.check_tasks(list(cfg.tasks))
    if cfg.static_source not in ("artifact", "profile"):
        raise EvalError(f"static_source must be 'artifact' or 'profile', got {cfg.static_source!r}")
    MM.check_methods(list(cfg.methods), cfg.artifact is not None, cfg.static_source, cfg.budget is not None,
                     cfg.refresh_every)
    if cfg.budget is not None and not Path(cfg.budget).is_file():
        raise EvalError(f"--budget {cfg.budget}: no such file; the budget stage writes artifacts/<model>/budget.json")
    if not cfg.kept:
        raise EvalError("no kept fractions given; e.g. --kept 0.2,0.4,0.6,0.8")
    for k in cfg.kept:
        try:
            check_fraction("kept fraction", k)
        except (TypeError, ValueError) as e:
            raise EvalError(f"{e} (--kept takes fractions in (0, 1], e.g. --kept 0.2,0.4)") from None
    if not cfg.scores:
        raise EvalError(f"no selection scores given; choose from {SCORES}")
    for s in cfg.scores:
        if s not in SCORES:
            raise EvalError(f"unknown selection score {s!r}; choose from {SCORES}")
    for name, lim in [("limit", cfg.limit)] + [(f"limit of task {t}", v) for t, v in cfg.task_limits.items()]:
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim < 1):
            raise EvalError(f"{name} must be a positive number of items (or unset for all), got {lim!r}")
    for t in cfg.task_limits:
        T.check_tasks([t])
    check_fraction("alpha", cfg.alpha)
    if cfg.svd_rank < 1:
        raise EvalError(f"svd_rank must be >= 1, got {cfg.svd_rank}")
    for name, tc in cfg.task_config.items():
        T.check_tasks([name])
        if tc.max_new_tokens < 1 or tc.continuation < 2 or tc.shots < 0:
            raise EvalError(f"task {name}: max_new_tokens >= 1, continuation >= 2 and shots >= 0 are required")
    return cfg


# ---------------------------------------------------------------------------------------------------
# results file


def config_key(task: str, method: str, kept: float, score: str | None, item: str) -> tuple:
    return (task, method, round(float(kept), 6), score or "-", str(item))


class ResultsFile:
    """Append-only JSON lines; a torn last line (killed mid-write) is dropped on open."""

    def __init__(self, path: Path, meta: dict, fresh: bool = False):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and path.exists():
            path.unlink()
        self.records: dict[tuple, dict] = {}
        if path.exists():
            self._load(meta)
        else:
            self._append(meta)

    def _load(self, meta: dict) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # torn write: cut back to the last full line
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        lines = raw.decode("utf-8").splitlines()
        if not lines:
            self._append(meta)
            return
        first = json.loads(lines[0])
        if first.get("type") != "meta" or first.get("format") != FORMAT:
            raise EvalError(f"{self.path} is not a coreinfer evaluation results file; choose another --out")
        known = dict(first["identity"])
        for line in lines[1:]:
            rec = json.loads(line)
            if rec.get("type") == "meta":
                known = merge_identity(known, rec["identity"], self.path)
                continue
            self.records[config_key(rec["task"], rec["method"], rec["kept"], rec["score"], rec["item"])] = rec
        merged = merge_identity(known, meta["identity"], self.path)
        if merged != known:  # new tasks, data files or a profile: record what the new lines depend on
            self._append({**meta, "identity": merged})

    def _append(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, rec: dict) -> None:
        self._append(rec)
        self.records[config_key(rec["task"], rec["method"], rec["kept"], rec["score"], rec["item"])] = rec

    def __contains__(self, key: tuple) -> bool:
        return key in self.records


def merge_identity(old: dict, new: dict, path: Path) -> dict:
    """Union of two identities; a value set in both must agree (per entry for dict values: data hashes,
    task configs), otherwise the results would mix two different evaluations."""
    out = dict(old)
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a is None or b is None:
            out[k] = a if b is None else b
        elif isinstance(a, dict) and isinstance(b, dict) and k in ("data_sha256", "task_config"):
            sub = dict(a)
            for kk, vv in b.items():
                if kk in a and a[kk] != vv:
                    diffs.append(f"{k}.{kk}: file {a[kk]!r} vs now {vv!r}")
                sub[kk] = vv
            out[k] = sub
        elif a != b:
            diffs.append(f"{k}: file {a!r} vs now {b!r}")
    if diffs:
        raise EvalError(f"{path} holds results of a different evaluation ({'; '.join(diffs)}). "
                        "Use another --out, or --fresh to discard them")
    return out


# ---------------------------------------------------------------------------------------------------
# run


def _artifact_hash(path: Path) -> str:
    return hashlib.sha256((path / "zarr.json").read_bytes()).hexdigest()


def portable_path(p) -> str:
    """How results record a path: relative to the working directory (the repository) when inside it, else
    ``~/``-relative when under the home folder, so a clone elsewhere finds its own results valid. A name that
    is no path (a hub id) is kept as it is."""
    if not Path(str(p)).expanduser().exists():
        return str(p)
    p = Path(p).expanduser().resolve()
    for base, prefix in ((Path.cwd().resolve(), ""), (Path.home().resolve(), "~/")):
        try:
            return prefix + str(p.relative_to(base))
        except ValueError:
            continue
    return str(p)


def _data_name(f: Path) -> str:
    try:
        return str(f.resolve().relative_to(T.data_dir().resolve()))
    except ValueError:
        return portable_path(f)


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def load_model(cfg: EvalConfig):
    from coreinfer.runtime.offload import MemoryBudget
    from coreinfer.runtime.sparse_lm import SparseLM

    # the artifact is read, checksum-verified and validated against the model (or refused) by SparseLM; a memory
    # budget is planned for the largest kept fraction on the eager offloaded path (scoring and sessions need it)
    budget = None if cfg.memory_budget is None else MemoryBudget(
        cfg.memory_budget, kept_fraction=max(cfg.kept), layers=cfg.layers, fast_path=False)
    return SparseLM.from_pretrained(cfg.model, artifact=cfg.artifact, device=cfg.device, dtype=cfg.dtype,
                                    memory_budget=budget)


def run(cfg: EvalConfig, lm=None) -> dict:
    """Run (or resume) the evaluation; returns the summary also written to ``<out>/metrics.json``."""
    validate(cfg)
    out = Path(cfg.out)
    tasks = [T.make_task(n, cfg.task_cfg(n), cfg.seed) for n in cfg.tasks]
    if lm is None:
        lm = load_model(cfg)
    layers = lm.resolve_layers(cfg.layers)
    data_hashes = {_data_name(f): T.file_sha256(f) for t in tasks for f in t.files() if f.is_file()}

    ctx = MM.MethodContext(lm, layers, cfg.alpha, cfg.seed, artifact=lm.artifact if cfg.artifact else None,
                           static_source=cfg.static_source, budget=cfg.budget, refresh_every=cfg.refresh_every)
    profile_info = None
    needs_profile = any(MM.METHODS[m].needs_profile and (m != "static" or cfg.static_source == "profile")
                        for m in cfg.methods)
    if needs_profile:
        ctx.profile, ctx.predictors, profile_info = _profile(cfg, lm, layers, out)

    items = {t.name: t.items(lm, cfg.task_limit(t.name)) for t in tasks}
    identity = {
        "model": cfg.model,
        "model_source": portable_path(lm.loaded.source),
        "artifact": portable_path(cfg.artifact) if cfg.artifact else None,
        "artifact_sha256": _artifact_hash(Path(cfg.artifact)) if cfg.artifact else None,
        "budget_sha256": T.file_sha256(Path(cfg.budget)) if cfg.budget else None,
        "alpha": cfg.alpha,
        "layers": [layers.start, layers.stop],
        "seed": cfg.seed,
        "static_source": cfg.static_source if "static" in cfg.methods else None,
        "refresh_every": cfg.refresh_every if "stability-refresh" in cfg.methods else None,
        "profile": profile_info,
        "data_sha256": data_hashes,
        "task_config": {t.name: {k: portable_path(v) if k == "file" and v else v for k, v in asdict(t.cfg).items()}
                        for t in tasks},
    }
    meta = {"type": "meta", "format": FORMAT, "identity": identity}
    results = ResultsFile(out / RESULTS_FILE, meta, fresh=cfg.fresh)

    artifact_beta = artifact_kept = None
    if cfg.artifact and lm.artifact is not None:
        if lm.artifact.per_layer:  # per-layer sizes: its methods run once, at its FFN bytes over dense
            n, n_layers = lm.adapter.n_neurons, lm.adapter.n_layers
            sizes = lm.artifact.layer_k
            artifact_kept = (sum(sizes.values()) + (n_layers - len(sizes)) * n) / (n_layers * n)
        else:
            artifact_beta = float(lm.artifact.attrs["beta"])
    try:
        configs = MM.method_configs(list(cfg.methods), [float(k) for k in cfg.kept], list(cfg.scores), artifact_beta,
                                    artifact_kept)
    except ValueError as err:
        raise EvalError(str(err)) from None
    runs = [MM.MethodRun(m, k, s, ctx) for m, k, s in configs]
    todo = sum(1 for t in tasks for it in items[t.name] for r in runs
               if config_key(t.name, r.method, r.kept, r.score, it.id) not in results)
    from tqdm.auto import tqdm

    bar = tqdm(total=todo, desc="eval", disable=not cfg.progress, unit="run")
    try:
        for t in tasks:
            for it in items[t.name]:
                pending = [r for r in runs if config_key(t.name, r.method, r.kept, r.score, it.id) not in results]
                if not pending:
                    continue
                ref = t.reference(lm, it, layers) if t.needs_reference else None
                for r in pending:
                    bar.set_postfix_str(f"{t.name} {r.method} {r.kept:g} {r.score or ''}".strip())
                    t0 = time.perf_counter()
                    rec = t.evaluate(lm, it, r, ref)
                    _check_not_dense(r, rec)
                    rec = {k: _finite(v) for k, v in rec.items()}
                    rec.update(task=t.name, method=r.method, kept=round(float(r.kept), 6), score=r.score or "-",
                               item=it.id, seconds=round(time.perf_counter() - t0, 4))
                    results.add(rec)
                    bar.update(1)
    finally:
        bar.close()

    summary = summarize(cfg, tasks, items, runs, results, identity)
    write_outputs(out, summary)
    return summary


def _check_not_dense(run: MM.MethodRun, rec: dict) -> None:
    """Evaluation never silently falls back to dense: a sparse method must have used fewer neurons."""
    if run.method == "dense" or run.kept >= 1.0:
        return
    ks = rec.get("kept_sparse")
    if ks is not None and isinstance(ks, float) and math.isfinite(ks) and ks >= 1.0:
        raise EvalError(f"method {run.method!r} at kept {run.kept} ran with every neuron (dense); refusing to record it")
    if rec.get("method_used") == "dense":
        raise EvalError(f"method {run.method!r} fell back to dense; refusing to record it")


def _profile(cfg: EvalConfig, lm, layers: range, out: Path):
    prompts, files = T.profile_prompts(cfg.profile_alpaca, cfg.profile_gsm8k, cfg.seed)
    predictors = MM.build_predictors(lm, layers, cfg.svd_rank) if "svd-predictor" in cfg.methods else {}
    h = hashlib.sha256(json.dumps({
        "prompts": hashlib.sha256("\n\x00".join(prompts).encode()).hexdigest(), "model": portable_path(lm.loaded.source),
        "layers": [layers.start, layers.stop], "alpha": cfg.alpha, "rank": cfg.svd_rank if predictors else None,
        "max_tokens": cfg.profile_max_tokens, "v": 1}, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.profile_dir or out) / f"profile-{h}.npz"
    if path.is_file():
        profile = MM.Profile.load(path)
    else:
        profile = MM.compute_profile(lm, prompts, layers, cfg.alpha, predictors, cfg.profile_max_tokens, cfg.progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        profile.save(tmp)
        os.replace(tmp, path)
    info = {"hash": h, "prompts": profile.n_prompts, "tokens": profile.n_tokens, "svd_rank": cfg.svd_rank if predictors else None,
            "files": {_data_name(f): T.file_sha256(f) for f in files}}
    return profile, predictors, info


# ---------------------------------------------------------------------------------------------------
# summary and outputs


def summarize(cfg, tasks, items, runs, results: ResultsFile, identity: dict) -> dict:
    summary: dict[str, Any] = {"model": cfg.model, "identity": identity, "tasks": {}}
    for t in tasks:
        rows = []
        for r in runs:
            recs = [results.records[k] for it in items[t.name]
                    if (k := config_key(t.name, r.method, r.kept, r.score, it.id)) in results.records]
            if not recs:
                continue
            agg = t.aggregate(recs)
            def avg(key):
                vals = [x[key] for x in recs if isinstance(x.get(key), (int, float))]
                return sum(vals) / len(vals) if vals else None
            used = sorted({str(x.get("method_used")) for x in recs})
            extra = {k: _finite(avg(k)) for k in EXTRA_COST_KEYS if any(k in x for x in recs)}
            rows.append({"method": r.method, "kept": round(r.kept, 6), "score": r.score or "-", "n": len(recs),
                         **{k: _finite(v) for k, v in agg.items()},
                         "kept_sparse": _finite(avg("kept_sparse")), "kept_model": _finite(avg("kept_model")),
                         "ffn_bytes_per_token": avg("ffn_bytes_per_token"), "method_used": ",".join(used),
                         "speed_path": MM.METHODS[r.method].speed_path, **extra})
        summary["tasks"][t.name] = {"metrics": list(t.metric_names), "n_items": len(items[t.name]), "rows": rows}
    return summary


def nested_metrics(task_summary: dict) -> dict:
    """{method: {score: {kept: {metric: value}}}} for ``dvc metrics``."""
    out: dict = {}
    for row in task_summary["rows"]:
        vals = {m: row[m] for m in task_summary["metrics"]}
        vals.update(kept_model=row["kept_model"], ffn_bytes_per_token=row["ffn_bytes_per_token"], n=row["n"])
        out.setdefault(row["method"], {}).setdefault(row["score"], {})[f"{row['kept']:g}"] = vals
    return out


def write_outputs(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"model": summary["model"], **{t: nested_metrics(s) for t, s in summary["tasks"].items()}}
    _write_json(out / "metrics.json", metrics)
    _write_json(out / "summary.json", summary)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    for name, s in summary["tasks"].items():
        _write_json(out / f"{name}.json", {"model": summary["model"], name: nested_metrics(s)})
        # flat rows for `dvc plots` (x: kept, y: a metric, one line per method/score)
        flat = [{"series": f"{r['method']}" + (f"/{r['score']}" if r["score"] != "-" else ""), **r} for r in s["rows"]]
        _write_json(plots / f"{name}.json", flat)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown_table(task_summary: dict, name: str) -> str:
    """One table per task: rows = method[/score], columns = kept fractions, cells = the first metric
    (and the other metrics after a slash)."""
    metrics = task_summary["metrics"]
    rows = task_summary["rows"]
    kepts = sorted({r["kept"] for r in rows if r["method"] != "dense"})
    series: dict[str, dict] = {}
    for r in rows:
        label = r["method"] + (f" ({r['score']})" if r["score"] != "-" else "")
        series.setdefault(label, {})[r["kept"]] = r
    head = f"| {name}: {' / '.join(metrics)} | " + " | ".join(f"kept {k:g}" for k in kepts) + " |"
    lines = [head, "|" + "---|" * (len(kepts) + 1)]

    def cell(r):
        if r is None:
            return ""
        return " / ".join("n/a" if r[m] is None else f"{r[m]:.3f}" if abs(r[m]) < 100 else f"{r[m]:.1f}" for m in metrics)

    for label, by_k in series.items():
        if label == "dense":
            r = by_k.get(1.0)
            lines.append("| dense | " + " | ".join(cell(r) for _ in kepts) + " |")
        else:
            lines.append(f"| {label} | " + " | ".join(cell(by_k.get(k)) for k in kepts) + " |")
    return "\n".join(lines)


def cost_table(task_summary: dict, name: str) -> str:
    """Kept fraction over all FFN neurons and FFN weight MB read per decoded token, per method and kept fraction
    (token-mask methods: measured over the task's sparse tokens; svd-predictor includes its predictor)."""
    rows = task_summary["rows"]
    kepts = sorted({r["kept"] for r in rows if r["method"] != "dense"})
    lines = [f"| {name}: model-wide kept / FFN MB per token | " + " | ".join(f"kept {k:g}" for k in kepts) + " |",
             "|" + "---|" * (len(kepts) + 1)]
    seen: dict[str, dict] = {}
    for r in rows:
        label = r["method"] + ("" if r["method"] != "oracle-token" else " (bound, not a speed path)")
        seen.setdefault(label, {})[r["kept"]] = r

    def cell(r):
        if r is None or r["kept_model"] is None or r["ffn_bytes_per_token"] is None:
            return ""
        return f"{r['kept_model']:.3f} / {r['ffn_bytes_per_token'] / 1e6:.1f}"

    for label, by_k in seen.items():
        if label == "dense":
            lines.append("| dense | " + " | ".join(cell(by_k.get(1.0)) for _ in kepts) + " |")
        else:
            lines.append(f"| {label} | " + " | ".join(cell(by_k.get(k)) for k in kepts) + " |")
    return "\n".join(lines)
