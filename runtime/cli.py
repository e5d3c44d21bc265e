"""The `coreinfer` command: generate, bench, eval, and the pipeline stages (`coreinfer pipeline STAGE`).

Heavy or optional parts (evaluation, pipeline) are imported only by their own subcommands, so the
runtime commands never load Hydra, DVC or HDBSCAN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .loading import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="alias (smollm2-135m, gemma3-270m), HF folder, .gguf file or hub id")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bf16 on CUDA)")


def _cmd_generate(args) -> int:
    from .selection import check_fraction
    from .sparse_lm import SparseLM

    if args.beta is not None:
        check_fraction("beta", args.beta)  # cheap checks before the model loads
    check_fraction("alpha", args.alpha)
    lm = SparseLM.from_pretrained(args.model, artifact=args.artifact, device=args.device, dtype=args.dtype)
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    kwargs = {"do_sample": args.sample, "seed": args.seed, "chat": args.chat, "stop": args.stop or None}
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    out = lm.generate(args.prompt, method=args.method, alpha=args.alpha, beta=args.beta, layers=args.layers,
                      max_new_tokens=args.max_new_tokens, score=args.score, on_text=stream, **kwargs)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}))
    else:
        s = out.stats
        cluster = f", cluster {s.cluster}" if s.cluster is not None else ""
        print(f"\n\n[{s.method_used}{cluster}: kept {s.kept_fraction:.1%} of FFN neurons, prefill {s.prefill_ms:.0f} ms, "
              f"select+gather {s.select_ms:.1f} ms, decode {s.decode_tokens_per_s:.1f} tok/s, "
              f"{s.new_tokens} tokens ({s.stop_reason})]", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    from .loading import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        from .cuda import bench as cuda_bench  # graph-captured fast path, see docs/benchmarks.md

        return cuda_bench.main(args)
    from .bench import format_table, run_bench
    from .sparse_lm import SparseLM

    lm = SparseLM.from_pretrained(args.model, device=device, dtype=args.dtype)
    result = run_bench(lm, betas=args.beta, layers=args.layers, new_tokens=args.new_tokens, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _cmd_eval(argv: list[str]) -> int:
    from coreinfer.pipeline.evaluate.cli import main as eval_main

    return eval_main(argv)


def _cmd_lm_eval(argv: list[str]) -> int:
    from coreinfer.pipeline.evaluate.lm_eval_adapter import main as lm_eval_main  # registers --model coreinfer

    return lm_eval_main(argv)


def _cmd_pipeline(argv: list[str]) -> int:
    from coreinfer.pipeline.cli import main as pipeline_main

    return pipeline_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreinfer", description="Core-neuron sparse inference (CoreInfer).")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with the prompt's core neurons")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--artifact", default=None, help="calibration artifact (coreneurons.zarr) for similarity/auto")
    g.add_argument("--method", default=None, choices=["dense", "stability", "similarity", "auto"],
                   help="default: auto with --artifact, else stability")
    g.add_argument("--beta", type=float, default=None,
                   help="kept fraction of FFN neurons in sparse layers (default: the artifact's with --artifact, else 0.4)")
    g.add_argument("--alpha", type=float, default=0.4, help="token-wise core fraction of active neurons")
    g.add_argument("--score", default="magnitude", choices=["positive", "magnitude"],
                   help="token-wise score: |a| (default, measured best) or the paper's positive-only rule")
    g.add_argument("--layers", default=None, help="sparse layers 'start:stop' or fractions '0.15:0.85'")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object with text and stats")
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser("bench", help="dense vs sparse prefill/decode speed and memory, side by side")
    _add_model_args(b)
    b.add_argument("--beta", type=_floats, default=[0.2, 0.4, 0.6], help="kept fractions, comma-separated")
    b.add_argument("--layers", default=None)
    b.add_argument("--new-tokens", type=int, default=64)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=_cmd_bench)

    sub.add_parser("eval", help="quality evaluation (coreinfer eval --help)", add_help=False)
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the coreinfer model registered: "
                   "coreinfer lm-eval --model coreinfer --model_args model=...,method=...,beta=... --tasks ...",
                   add_help=False)
    sub.add_parser("pipeline", help="run a calibration pipeline stage (coreinfer pipeline --help)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if argv and argv[0] == "eval":
        return _cmd_eval(argv[1:])
    if argv and argv[0] == "lm-eval":
        return _cmd_lm_eval(argv[1:])
    if argv and argv[0] == "pipeline":
        return _cmd_pipeline(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # bad input: say what and how to fix, no traceback
        print(f"coreinfer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
