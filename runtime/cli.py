"""The `coreinfer` command: generate, bench, export, eval, and the pipeline stages (`coreinfer pipeline STAGE`).

Heavy or optional parts (evaluation, pipeline) are imported only by their own subcommands, so the
runtime commands never load Hydra, DVC or HDBSCAN. Quiet by default: ``--verbose`` shows the libraries'
progress bars and warnings and the runtime's own log (e.g. why the GPU fast path did not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; an option whose default is None says in words what None does."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def _subcommand(sub, name: str, help: str, **kwargs) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter, **kwargs)


def _quiet(verbose: bool) -> None:
    """The libraries' warnings off unless ``verbose``; with it, the runtime's INFO log on stderr too."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return
    warnings.filterwarnings("ignore", module=r"(transformers|torch|sentence_transformers|huggingface_hub)(\.|$)")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .loading import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="alias (smollm2-135m, gemma3-270m), HF folder, coreinfer export folder, .gguf file or hub id")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU, bf16 on CUDA)")
    p.add_argument("--verbose", action="store_true",
                   help="show the libraries' progress bars and warnings, and the runtime's log")


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifact", default=None, help="calibration artifact (coreneurons.zarr) for similarity/auto "
                   "(default: none)")
    p.add_argument("--method", default=None, choices=["dense", "stability", "similarity", "auto"],
                   help="how core sets are chosen (default: auto with --artifact, else stability)")
    p.add_argument("--beta", type=float, default=None,
                   help="kept fraction of FFN neurons in sparse layers (default: the artifact's with --artifact, else 0.4)")
    p.add_argument("--alpha", type=float, default=0.4, help="token-wise core fraction of active neurons")
    p.add_argument("--score", default="magnitude", choices=["positive", "magnitude"],
                   help="token-wise score: |a| (measured best) or the paper's positive-only rule")
    p.add_argument("--layers", default=None,
                   help="sparse layers 'start:stop' or fractions '0.15:0.85' (default: the paper's 5:27 of 32, as fractions)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the tokenizer's chat template (default: when the tokenizer has one)")


def _add_memory_budget_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", default=None,
                   help="GPU memory the model may use, e.g. 12GiB or 16GB: what does not fit stays in host memory and "
                        "streams (runtime/offload.py); with --device cpu the mode runs on the CPU (default: none)")


def _memory_budget(args, kept=None, layers=None, eager: bool = False):
    """The --memory-budget as ``offload.MemoryBudget`` planned for the command's kept fraction and layers, or None;
    ``eager``: the call needs the eager offloaded path (sampling, stop strings: not the graph-captured one)."""
    if getattr(args, "memory_budget", None) is None:
        return None
    from .offload import MemoryBudget

    return MemoryBudget(args.memory_budget, kept_fraction=kept, layers=layers, fast_path=False if eager else None)


def _chat(args, lm) -> bool:
    return args.chat if args.chat is not None else getattr(lm.tokenizer, "chat_template", None) is not None


def _cmd_generate(args) -> int:
    from .selection import check_fraction
    from .sparse_lm import SparseLM

    if args.beta is not None:
        check_fraction("beta", args.beta)  # cheap checks before the model loads
    check_fraction("alpha", args.alpha)
    lm = SparseLM.from_pretrained(args.model, artifact=args.artifact, device=args.device, dtype=args.dtype,
                                  verbose=args.verbose, memory_budget=_memory_budget(
                                      args, args.beta, args.layers, eager=bool(args.sample or args.stop)))
    stream = None if args.json else (lambda text: print(text, end="", flush=True))
    kwargs = {"do_sample": args.sample, "seed": args.seed, "chat": _chat(args, lm), "stop": args.stop or None}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):  # unset: the model's generation defaults
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    out = lm.generate(args.prompt, method=args.method, alpha=args.alpha, beta=args.beta, layers=args.layers,
                      max_new_tokens=args.max_new_tokens, score=args.score, on_text=stream, **kwargs)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "stats": out.stats.to_dict()}))
    else:
        s = out.stats
        cluster = f", cluster {s.cluster}" if s.cluster is not None else ""
        print(f"\n\n[{s.method_used}{cluster}: kept {s.kept_fraction:.1%} of FFN neurons, prefill {s.prefill_ms:.0f} ms, "
              f"select+gather {s.select_ms:.1f} ms{' (selected in the prefill)' if s.select_in_prefill else ''}, "
              f"decode {s.decode_tokens_per_s:.1f} tok/s, "
              f"{s.new_tokens} tokens ({s.stop_reason})]", file=sys.stderr)
    return 0


def _cmd_bench(args) -> int:
    from .loading import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda" and args.memory_budget is not None:
        return _bench_memory_budget(args)
    if device.type == "cuda":
        from .cuda import bench as cuda_bench  # graph-captured fast path, see docs/benchmarks.md

        return cuda_bench.main(args)
    from .bench import format_table, run_bench
    from .sparse_lm import SparseLM

    lm = SparseLM.from_pretrained(args.model, device=device, dtype=args.dtype, verbose=args.verbose,
                                  memory_budget=_memory_budget(args, max(args.beta), args.layers))
    result = run_bench(lm, betas=args.beta, layers=args.layers, new_tokens=args.new_tokens, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _bench_memory_budget(args) -> int:
    """`coreinfer bench --memory-budget` on a GPU: the issue-11 comparison (benchmarks/memory_budget.py, in the
    repository checkout) on the published shape ``--model`` names."""
    from .memory import parse_budget

    parse_budget(args.memory_budget)
    try:
        from benchmarks.memory_budget import run
    except ImportError as err:
        raise ValueError(f"bench --memory-budget on a GPU runs benchmarks/memory_budget.py from the repository "
                         f"checkout ({err}); run it from the repository root") from None
    result = run(shape=args.model, budget=args.memory_budget, kept=tuple(args.beta), new_tokens=args.new_tokens,
                 repeats=args.repeats, log=(lambda m: None) if args.json else print)
    print(json.dumps(result, indent=2, default=str) if args.json else json.dumps(result["ratios"], indent=2))
    return 0


def _cmd_export(args) -> int:
    from .export import save_folder
    from .selection import check_fraction
    from .sparse_lm import SparseLM

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before the model loads; nothing is written
        raise ValueError(f"{out} exists and is not an empty folder; export to a new folder (nothing was written)")
    if args.beta is not None:
        check_fraction("beta", args.beta)
    lm = SparseLM.from_pretrained(args.model, artifact=args.artifact, device=args.device, dtype=args.dtype,
                                  verbose=args.verbose)
    sparse = lm.sparse_model(args.prompt, method=args.method, alpha=args.alpha, beta=args.beta, layers=args.layers,
                             score=args.score, chat=_chat(args, lm))
    save_folder(sparse, lm.tokenizer, out)
    from .export import intermediate_sizes

    sizes = intermediate_sizes(out)
    print(f"wrote {out}: {len(sizes)} sparse layers ({min(sizes)}..{max(sizes)}) with {sorted(set(sizes.values()))} "
          f"FFN neurons of {lm.adapter.n_neurons}. Load it with SparseLM.from_pretrained({str(out)!r}) or "
          f"coreinfer.runtime.export.load_sparse_model({str(out)!r}) (plain from_pretrained refuses per-layer sizes).")
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


def _cmd_init(argv: list[str]) -> int:
    from coreinfer.pipeline.init import main as init_main

    return init_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coreinfer", description="Core-neuron sparse inference (CoreInfer).",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    g = _subcommand(sub, "generate", "generate text with the prompt's core neurons")
    g.add_argument("prompt", help="the text to continue (with --chat: the user's message)")
    _add_model_args(g)
    _add_method_args(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the model's, 1.0)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default: the model's)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: the model's)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="transformers' repetition penalty, > 1 discourages repeats (default: none)")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (default: unseeded)")
    g.add_argument("--stop", action="append", help="stop string, repeatable (default: none)")
    g.add_argument("--json", action="store_true", help="print one JSON object with text and stats")
    _add_memory_budget_arg(g)
    g.set_defaults(func=_cmd_generate)

    b = _subcommand(sub, "bench", "dense vs sparse prefill/decode speed and memory, side by side")
    _add_model_args(b)
    b.add_argument("--beta", type=_floats, default=[0.2, 0.4, 0.6], help="kept fractions, comma-separated")
    b.add_argument("--layers", default=None,
                   help="sparse layers 'start:stop' or fractions '0.15:0.85' (default: the paper's 5:27 of 32, as fractions)")
    b.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per run (end-of-sequence ignored)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs per configuration, after one warm-up; the median is shown")
    b.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    _add_memory_budget_arg(b)
    b.set_defaults(func=_cmd_bench)

    e = _subcommand(sub, "export", "write a prompt's sparse model (compact FFNs) as a transformers model folder")
    e.add_argument("prompt", help="the prompt whose core sets the model keeps")
    e.add_argument("out", help="folder to write; must not exist or be empty")
    _add_model_args(e)
    _add_method_args(e)
    e.set_defaults(func=_cmd_export)

    sub.add_parser("eval", help="quality evaluation (coreinfer eval --help)", add_help=False)
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the coreinfer model registered: "
                   "coreinfer lm-eval --model coreinfer --model_args model=...,method=...,beta=... --tasks ...",
                   add_help=False)
    sub.add_parser("pipeline", help="run a calibration pipeline stage (coreinfer pipeline --help)", add_help=False)
    sub.add_parser("init", help="a calibration project for your own model and corpus (coreinfer init --help)",
                   add_help=False)
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
    if argv and argv[0] == "init":
        return _cmd_init(argv[1:])
    args = build_parser().parse_args(argv)
    _quiet(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except ValueError as err:  # bad input: say what and how to fix, no traceback
        print(f"coreinfer {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
