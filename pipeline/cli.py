"""One CLI for every pipeline stage (dvc.yaml calls it): ``python -m coreinfer.pipeline <stage> [key=value ...]``.

The configuration is ``params.yaml`` (DVC's composed Hydra config), validated before anything is loaded;
``key=value`` dotlist overrides are for ad-hoc runs outside DVC. A stage that fails prints one line that names
the problem and its fix (exit status 2); ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from .config import load_config

STAGES = ("validate", "prepare", "profile", "embed", "cluster", "budget", "coreset", "report", "evaluate")


def run_stage(stage: str, cfg):
    if stage == "validate":
        from .validate import validate as fn
    elif stage == "prepare":
        from .prepare import prepare as fn
    elif stage == "profile":
        from .profile import profile as fn
    elif stage == "embed":
        from .embed import embed as fn
    elif stage == "cluster":
        from .cluster import cluster as fn
    elif stage == "budget":
        from .budget import budget as fn
    elif stage == "coreset":
        from .coreset import coreset as fn
    elif stage == "report":
        from .report import report as fn
    elif stage == "evaluate":
        from .evaluate.stage import evaluate as fn
    else:  # argparse restricts the choices; kept for direct callers
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return fn(cfg)


def one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coreinfer.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=STAGES + ("all",), help="stage to run ('all': every stage in order)")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides of params.yaml, e.g. coreset.beta=0.3")
    ap.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = ap.parse_args(argv)
    stage = args.stage
    try:
        cfg = load_config(args.params, args.overrides)
        for stage in STAGES if args.stage == "all" else (args.stage,):
            t0 = time.perf_counter()
            written = run_stage(stage, cfg)
            print(f"[{stage}] done in {time.perf_counter() - t0:.1f}s: " + ", ".join(str(p) for p in written))
    except Exception as e:  # noqa: BLE001 - every stage error ends in one line (the traceback on request)
        if args.verbose:
            traceback.print_exc()
        # bad input (config, corpus, artifact, data, a missing extra) carries its fix in the message;
        # anything else is a bug or an environment problem, and the traceback is what to report
        expected = isinstance(e, (ValueError, OSError, ImportError))
        hint = "" if expected or args.verbose else f" (rerun `python -m coreinfer.pipeline {stage} --verbose` for the traceback)"
        print(f"error: [{stage}] {'' if expected else type(e).__name__ + ': '}{one_line(e)}{hint}", file=sys.stderr)
        return 2 if expected else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
