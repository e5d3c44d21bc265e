"""The folded step's sum of the gather-free down product's partial rows: one tile per program
(``kernels._partial_sum_residual_kernel``, the step's) against the loop over the rows in the residual + norm
kernel (``_residual_rms_kernel`` without its norm, the step's before), alone and in the whole step.

    python -m benchmarks.partial_sum_ab --out DIR        (GPU machine, repo root; DIR/partial_sum_ab.json)

Alone: 32 dependent launches (one per layer) replayed in a CUDA graph, PDL off and on, µs per launch. In the
step: the product's step on the Llama-3.1-8B shape with random weights, kept 0.4 and 0.2, the two forms
alternated A B A B in one process (median decode tok/s of each ``bench.fast_bench`` row).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
from pathlib import Path

import torch
import triton


def loop_sum(x, y, weight, eps, scratch, bias=None, pdl=False, norm=True, tile=None):
    """``residual_rms_norm`` as it was: partial rows summed by the residual kernel's loop when ``norm`` is off
    (``tile``: the step's ``residual_rms_norm``, for everything else)."""
    from coreinfer.runtime.cuda import kernels

    if norm or y is None or y.dim() != 2:
        return (tile or kernels.residual_rms_norm)(x, y, weight, eps, scratch, bias, pdl, norm)
    h, block = x.numel(), kernels.RESIDUAL_BLOCK_SPLIT
    x_out = torch.empty_like(x)
    nprog = triton.cdiv(h, block)
    kernels._residual_rms_kernel[(nprog,)](
        x, y, bias if bias is not None else x, x, x_out, x_out, scratch.ss, scratch.counts, float(eps), H=h,
        H_P2=triton.next_power_of_2(h), BLOCK=block, NPROG=nprog, NP2=triton.next_power_of_2(max(2, nprog)),
        SPLIT=y.shape[0], Y_MODE=2, HAS_BIAS=bias is not None, NORM=False, HAS_W=False, GDC=pdl, num_warps=4,
        **kernels._launch(pdl))
    return x_out, None


@contextlib.contextmanager
def loop_form():
    """The step captured while this is open sums its partial rows with ``loop_sum`` (benchmark only)."""
    from coreinfer.runtime.cuda import kernels

    tile = kernels.residual_rms_norm
    kernels.residual_rms_norm = functools.partial(loop_sum, tile=tile)
    try:
        yield
    finally:
        kernels.residual_rms_norm = tile


def alone(pdl: bool, layers: int = 32, split: int = 128, hidden: int = 4096) -> dict:
    from coreinfer.runtime.cuda import kernels

    from .gpu_suite import _graph_time_us

    scratch = kernels.StepScratch(hidden, 64, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(hidden, device="cuda", generator=g).to(torch.bfloat16)
    parts = torch.randn(layers, split, hidden, device="cuda", generator=g)
    out = {}
    for name, fn in (("tile", kernels.residual_rms_norm), ("loop", loop_sum)):
        xs = [x0]

        def launch(i, fn=fn, xs=xs):
            if i == 0:
                del xs[1:]
            xs.append(fn(xs[-1], parts[i], None, 1e-5, scratch, None, pdl, norm=False)[0])

        out[name] = _graph_time_us(launch, layers)
        got = xs[-1].float()
        ref = x0
        for p in parts:
            ref = ref + p.sum(0).to(torch.bfloat16)
        out[f"{name}_rel_err"] = ((got - ref.float()).norm() / ref.float().norm()).item()
    return out


def in_step(betas=(0.4, 0.2), new_tokens: int = 128, repeats: int = 3, rounds: int = 2) -> list[dict]:
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.cuda.fastlm import FastWeights

    model, tok = bench.build_shape_model("llama-3.1-8b", torch.bfloat16)
    ids = bench.bench_prompt(tok, model.get_input_embeddings().weight.shape[0]).cuda()
    weights = FastWeights.from_hf(model)
    del model
    rows = []
    for beta in betas:
        for r in range(rounds):
            for form in ("tile", "loop"):
                with loop_form() if form == "loop" else contextlib.nullcontext():
                    row, fast = bench.fast_bench(weights, ids, new_tokens, repeats, beta)
                    del fast
                rows.append({"beta": beta, "round": r, "form": form, "decode_tok_s": row["decode_tok_s"]})
                print(rows[-1], flush=True)
                torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-out")
    args = ap.parse_args(argv)
    result = {"alone_us_per_launch": {f"pdl={p}": alone(p) for p in (False, True)}}
    print(result, flush=True)
    result["in_step"] = in_step()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "partial_sum_ab.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
