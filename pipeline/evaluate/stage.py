"""The DVC ``evaluate`` stage: quality of every method on the artifact the pipeline built.

    python -m coreinfer.pipeline evaluate          (what dvc.yaml runs)

The model comes from ``params.yaml`` (``model.spec``/``dtype``/``device``), the artifact is
``<artifacts_dir>/<model.slug>/coreneurons.zarr``, the evaluation settings are the ``eval`` section of
``params.yaml`` (composed from ``conf/eval/``; ``EvalConfig``). Writes ``<artifacts_dir>/<model.slug>/eval/``:
``results.jsonl`` (resumable, kept between runs with the same settings), ``headline.json`` (the DVC metric: top-1
agreement of each method at the artifact's kept fraction), the full tables ``metrics.json``, ``summary.json`` and
one json per task, and ``plots/<task>__<metric>.csv`` (x: kept, one column per method) plus PNGs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from coreinfer.runtime.atomic import atomic_output

PLOT_METRICS = {"agreement": ("top1_agreement", "kl", "ppl_dense_continuation"), "wikitext": ("ppl",),
                "truthfulqa_mc": ("mc1", "mc2"), "truthfulqa_gen": ("rougeL_acc",), "nq_open": ("exact_match", "f1"),
                "gsm8k": ("accuracy",), "summarization": ("rougeL",), "translation": ("bleu",)}


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


HEADLINE_METRIC = "top1_agreement"


def headline(summary: dict, score: str) -> dict:
    """A handful of numbers for ``dvc metrics``: each method's top-1 agreement with dense on the held-out prompts
    at the artifact's kept fraction (where ``similarity`` runs), with the runtime's default score where several
    were swept."""
    task = summary["tasks"].get("agreement", {"rows": [], "n_items": 0})
    art_rows = [r for r in task["rows"] if r["method"] in ("similarity", "auto")]
    kept = art_rows[0]["kept"] if art_rows else None
    agreement = {r["method"]: None if r[HEADLINE_METRIC] is None else round(r[HEADLINE_METRIC], 4)
                 for r in task["rows"]
                 if r["method"] != "dense" and kept is not None and abs(r["kept"] - kept) < 1e-6 and r["score"] in (score, "-")}
    return {"kept": kept, "score": score, "items": task["n_items"], HEADLINE_METRIC: agreement}


def evaluate(cfg) -> list[Path]:
    """Run (or resume) the evaluation of ``cfg.eval`` on the pipeline's artifact; returns the paths it wrote."""
    from coreinfer.pipeline.config import check_eval
    from coreinfer.runtime.sparse_lm import DEFAULT_SCORE

    from .plots import draw_plots
    from .runner import EvalError, run

    ec = check_eval(cfg)
    try:
        summary = run(ec)
    except EvalError as e:
        if "holds results of a different evaluation" not in str(e):
            raise
        # DVC reruns this stage because a dependency or parameter changed: old results are stale
        print(f"evaluate: settings changed, starting over ({e})")
        ec.fresh = True
        summary = run(ec)
    out = Path(ec.out)
    written = write_wide_csvs(summary, out, list(ec.scores)) + draw_plots(summary, out)
    score = DEFAULT_SCORE if DEFAULT_SCORE in ec.scores else ec.scores[0]
    path = out / "headline.json"
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(headline(summary, score), indent=2, sort_keys=True) + "\n")
    return [out / "results.jsonl", out / "metrics.json", path, *written]
