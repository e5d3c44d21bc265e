"""One CLI for every pipeline stage (dvc.yaml calls it): ``python -m coreinfer.pipeline <stage> [key=value ...]``.

The configuration is ``params.yaml`` (DVC's composed Hydra config), validated before anything is loaded;
``key=value`` dotlist overrides are for ad-hoc runs outside DVC.
"""

from __future__ import annotations

import argparse
import sys
import time

from .config import ConfigError, load_config

STAGES = ("prepare", "profile", "embed", "cluster", "budget", "coreset", "report")


def run_stage(stage: str, cfg):
    if stage == "prepare":
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
    else:  # argparse restricts the choices; kept for direct callers
        raise ValueError(f"unknown stage {stage!r}; stages: {STAGES}")
    return fn(cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m coreinfer.pipeline", description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=STAGES + ("all", "validate"), help="stage to run ('all': every stage in order)")
    ap.add_argument("overrides", nargs="*", help="dotlist overrides of params.yaml, e.g. coreset.beta=0.3")
    ap.add_argument("--params", default="params.yaml", help="composed config (default: params.yaml)")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.stage == "validate":
        print(f"{args.params}: valid")
        return 0
    for stage in STAGES if args.stage == "all" else (args.stage,):
        t0 = time.perf_counter()
        from .budget import BudgetError

        try:
            written = run_stage(stage, cfg)
        except BudgetError as e:  # a target out of reach, a corpus too small: the message says what to change
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"[{stage}] done in {time.perf_counter() - t0:.1f}s: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
