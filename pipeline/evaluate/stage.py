"""The DVC ``evaluate`` stage: quality of every method on the artifact the pipeline built.

    python -m coreinfer.pipeline.evaluate.stage [--params params.yaml] [--config conf/eval/default.yaml]

The model comes from ``params.yaml`` (``model.spec``/``dtype``/``device``), the artifact is
``<artifacts_dir>/<model.slug>/coreneurons.zarr``, the evaluation settings are ``conf/eval/default.yaml``
(``EvalConfig``). Writes ``<artifacts_dir>/<model.slug>/eval/``: ``results.jsonl`` (resumable, kept
between runs with the same settings), ``metrics.json`` and one json per task (``dvc metrics``), and
``plots/<task>__<metric>.csv`` (x: kept, one column per method, ``dvc plots``) plus PNGs.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from . import methods as MM

PLOT_METRICS = {"agreement": ("top1_agreement", "kl", "ppl_dense_continuation"), "wikitext": ("ppl",),
                "truthfulqa_mc": ("mc1", "mc2"), "truthfulqa_gen": ("rougeL_acc",), "nq_open": ("exact_match", "f1"),
                "gsm8k": ("accuracy",), "summarization": ("rougeL",), "translation": ("bleu",)}


@dataclass
class StageArgs:
    params: str = "params.yaml"
    config: str = "conf/eval/default.yaml"


def series_name(method: str, score: str, scores: list[str]) -> str:
    """Column name of a method in the wide plot CSVs: the method, plus the score when several are swept."""
    return method if score == "-" or len(scores) == 1 else f"{method}-{score}"


def write_wide_csvs(summary: dict, out: Path, scores: list[str]) -> list[Path]:
    """plots/<task>__<metric>.csv with columns kept, <series>...; dense (kept 1) is repeated on every row."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for task, s in summary["tasks"].items():
        for metric in PLOT_METRICS.get(task, s["metrics"]):
            table: dict[float, dict[str, float]] = {}
            dense = None
            names: list[str] = []
            for r in s["rows"]:
                if r["method"] == "dense":
                    dense = r[metric]
                    continue
                name = series_name(r["method"], r["score"], scores)
                if name not in names:
                    names.append(name)
                table.setdefault(r["kept"], {})[name] = r[metric]
            cols = (["dense"] if dense is not None else []) + names
            path = plots / f"{task}__{metric}.csv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["kept"] + cols)
                for k in sorted(table):
                    row = table[k]
                    w.writerow([k] + ([dense] if dense is not None else []) + ["" if row.get(n) is None else row[n] for n in names])
            written.append(path)
    return written


def stage_config(args: StageArgs):
    from coreinfer.pipeline.config import load_config

    from .cli import load_yaml_config

    pc = load_config(args.params)
    cfg = load_yaml_config(args.config)
    cfg.model = pc.model.spec
    cfg.dtype = None if pc.model.dtype == "auto" else pc.model.dtype
    cfg.device = None if pc.model.device == "auto" else pc.model.device
    needs_artifact = any(MM.METHODS[m].needs_artifact for m in cfg.methods) or (
        "static" in cfg.methods and cfg.static_source == "artifact")
    cfg.artifact = str(pc.artifact_path) if needs_artifact else None
    cfg.out = str(pc.model_dir / "eval")
    if "agreement" in cfg.tasks and cfg.task_cfg("agreement").file is None:
        # held-out prompts of the calibration corpus: in the project, never seen by the clustering
        cfg.task_config["agreement"] = replace(cfg.task_cfg("agreement"), file=str(Path(pc.corpus_path).resolve()))
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coreinfer.pipeline.evaluate.stage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=StageArgs.params)
    p.add_argument("--config", default=StageArgs.config)
    a = p.parse_args(argv)
    from .plots import draw_plots
    from .runner import EvalError, run

    try:
        cfg = stage_config(StageArgs(a.params, a.config))
        try:
            summary = run(cfg)
        except EvalError as e:
            if "holds results of a different evaluation" not in str(e):
                raise
            # DVC reruns this stage because a dependency or parameter changed: old results are stale
            print(f"evaluate: settings changed, starting over ({e})", file=sys.stderr)
            cfg.fresh = True
            summary = run(cfg)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    write_wide_csvs(summary, Path(cfg.out), list(cfg.scores))
    draw_plots(summary, cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
