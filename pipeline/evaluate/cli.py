"""``coreinfer eval``: quality of every selection method, side by side, on the same items.

    coreinfer eval --model smollm2-135m --methods dense,stability,griffin,oracle-token \\
        --kept 0.2,0.4,0.6,0.8 --tasks agreement,wikitext --limit 50 --out metrics/eval/smollm2-135m

Importing this module loads neither torch nor Hydra/DVC; the model loads only when the run starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

USAGE_EXAMPLE = ("coreinfer eval --model smollm2-135m --methods dense,stability,griffin --kept 0.2,0.4 "
                 "--tasks agreement --limit 20")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    out = []
    for x in _csv(s):
        try:
            out.append(float(x))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{x!r} is not a number; e.g. --kept 0.2,0.4,0.6") from None
    return out


def _limit(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a positive number of items, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"--limit must be >= 1 (items per task), got {v}; leave it out for all items")
    return v


def _task_limits(values: list[str] | None) -> dict[str, int]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise argparse.ArgumentTypeError(f"--task-limit takes TASK=N, got {v!r}")
        name, n = v.split("=", 1)
        out[name.strip()] = _limit(n)
    return out


def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS
    from .tasks import TASKS

    p = argparse.ArgumentParser(
        prog="coreinfer eval",
        description="Quality of each neuron-selection method at each kept fraction, with the sparse FFN applied "
                    "to every scored or generated token.",
        epilog=f"methods: {', '.join(METHODS)}\ntasks: {', '.join(TASKS)}\nexample: {USAGE_EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of defaults (conf/eval/*.yaml); command-line options override it")
    p.add_argument("--model", help="model alias, local folder or GGUF file (default smollm2-135m)")
    p.add_argument("--artifact", help="calibration artifact (coreneurons.zarr); enables similarity, auto, static")
    p.add_argument("--methods", type=_csv, help="comma-separated methods")
    p.add_argument("--kept", type=_floats, help="kept fractions in (0, 1], comma-separated")
    p.add_argument("--scores", type=_csv, help="selection scores for stability/similarity/auto: positive,magnitude")
    p.add_argument("--tasks", type=_csv, help="comma-separated tasks")
    p.add_argument("--limit", type=_limit, help="items per task (default: all)")
    p.add_argument("--task-limit", action="append", metavar="TASK=N", help="per-task item limit (repeatable)")
    p.add_argument("--seed", type=int, help="item sampling, few-shot exemplars, random baseline (default 0)")
    p.add_argument("--alpha", type=float, help="token-wise core fraction of the stability selection (default 0.4)")
    p.add_argument("--layers", help="sparse layers 'a:b' or fractions '0.15:0.85' (default: the paper's)")
    p.add_argument("--out", help="output folder: results.jsonl (resumable), metrics.json, per-task json, plots")
    p.add_argument("--static-source", choices=["artifact", "profile"],
                   help="where 'static' takes its hot set: the artifact (default) or the evaluation's profile corpus")
    p.add_argument("--svd-rank", type=int, help="rank of the svd-predictor (default 128)")
    p.add_argument("--profile-dir", help="folder of the cached calibration profile (default: --out)")
    p.add_argument("--budget", help="the budget stage's budget.json: enables method 'budget' (per-layer sizes; its "
                                    "kept fractions are FFN bytes per decoded token over dense)")
    p.add_argument("--refresh-every", type=int, metavar="N",
                   help="method 'stability-refresh': re-select every N decoded tokens from their dense activations")
    p.add_argument("--dtype", help="model dtype (float32, bfloat16, ...)")
    p.add_argument("--device", help="cpu, cuda, cuda:N")
    p.add_argument("--memory-budget", metavar="BUDGET",
                   help="GPU memory the model may use, e.g. 12GiB or 16GB: what does not fit stays in host memory and "
                        "streams (docs/memory-budget.md; planned for the largest --kept, eager offloaded path); with "
                        "--device cpu the mode runs on the CPU (default: none, the whole model on the device)")
    p.add_argument("--fresh", action="store_true", help="discard existing results in --out instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--plots", action="store_true", help="also draw PNG plots (matplotlib) into <out>/plots")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--frontier", type=_csv, metavar="LABEL=DIR,...",
                   help="no run: draw quality against FFN bytes per token over finished runs (each DIR's summary.json) "
                        "into --frontier-png, and print each series' points")
    p.add_argument("--frontier-png", default="frontier.png", help="where --frontier draws (default frontier.png)")
    return p


def config_from_args(args) -> "object":
    from .runner import EvalConfig

    cfg = EvalConfig()
    if args.config:
        cfg = load_yaml_config(args.config)
    for name in ("model", "artifact", "methods", "kept", "scores", "tasks", "limit", "seed", "alpha", "layers", "out",
                 "static_source", "svd_rank", "profile_dir", "budget", "dtype", "device", "memory_budget"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    if args.refresh_every is not None:
        cfg.refresh_every = args.refresh_every
    cfg.task_limits = {**cfg.task_limits, **_task_limits(args.task_limit)}
    cfg.fresh = bool(args.fresh)
    cfg.progress = not args.no_progress
    if args.out is None and not args.config:
        cfg.out = f"metrics/eval/{_slug(cfg.model)}"
    return cfg


def _slug(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1]) or "model"


def load_yaml_config(path: str):
    """An ``EvalConfig`` from a YAML file (conf/eval/*.yaml); unknown keys are errors."""
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if "eval" in data and isinstance(data["eval"], dict):
        data = data["eval"]
    return config_from_mapping(data, source=path)


def config_from_mapping(data: dict, source: str = "config"):
    from .runner import EvalConfig, EvalError
    from .tasks import TaskConfig

    known = {f.name for f in fields(EvalConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EvalError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
    data = dict(data)
    tc = data.pop("task_config", None) or {}
    cfg = EvalConfig(**{k: v for k, v in data.items() if v is not None or k in ("artifact", "limit", "layers")})
    tknown = {f.name for f in fields(TaskConfig)}
    out = {}
    for name, vals in tc.items():
        bad = sorted(set(vals or {}) - tknown)
        if bad:
            raise EvalError(f"{source}: task_config.{name}: unknown key(s) {bad}; known: {sorted(tknown)}")
        from .tasks import DEFAULT_TASK_CONFIG, check_tasks

        check_tasks([name])
        base = DEFAULT_TASK_CONFIG[name]
        out[name] = TaskConfig(**{**{f: getattr(base, f) for f in tknown}, **(vals or {})})
    cfg.task_config = out
    if isinstance(cfg.kept, (int, float)):
        cfg.kept = [cfg.kept]
    return cfg


def print_summary(summary: dict, as_json: bool) -> None:
    from .runner import cost_table, markdown_table

    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"model: {summary['model']}")
    for name, s in summary["tasks"].items():
        print()
        print(markdown_table(s, name))
        print()
        print(cost_table(s, name))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .methods import MethodError
    from .runner import EvalError, run, validate
    from .tasks import TaskError

    if args.frontier:
        return frontier_main(args.frontier, args.frontier_png)
    try:
        cfg = config_from_args(args)
        validate(cfg)
        summary = run(cfg)
        if args.plots:
            from pathlib import Path

            from .plots import draw_plots
            from .stage import write_wide_csvs

            draw_plots(summary, cfg.out)
            write_wide_csvs(summary, Path(cfg.out), list(cfg.scores))
    except (EvalError, MethodError, TaskError, ValueError, FileNotFoundError, ImportError) as e:
        # user-facing problems (bad option, missing data, model or artifact) carry their own fix
        print(f"coreinfer eval: error: {e}", file=sys.stderr)
        return 2
    print_summary(summary, args.json)
    return 0


def frontier_main(runs: list[str], png: str) -> int:
    """``--frontier``: the bytes-vs-quality plot over finished runs, and its points as a table."""
    from pathlib import Path

    from .plots import draw_frontier, frontier_series

    summaries = {}
    for run in runs:
        label, _, folder = run.rpartition("=")
        f = Path(folder) / "summary.json"
        if not f.is_file():
            print(f"coreinfer eval: error: {f} not found; --frontier takes LABEL=DIR of finished runs", file=sys.stderr)
            return 2
        summaries[label or Path(folder).name] = json.loads(f.read_text(encoding="utf-8"))
    for task, metric in (("agreement", "top1_agreement"), ("wikitext", "ppl")):
        for name, pts in frontier_series(summaries, task, metric).items():
            print(f"{task} {metric} | {name} | " + " ".join(f"{b:.3f}:{v:.3f}" for b, v in pts))
    print(f"frontier plot: {draw_frontier(summaries, png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
