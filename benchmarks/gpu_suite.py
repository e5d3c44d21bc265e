"""One GPU session's worth of work in one command: tests, correctness on a real model, the benchmark.

    python -m benchmarks.gpu_suite --out DIR [--steps tests,greedy,suite,e2e,memory] [--smollm2 PATH.gguf]

From the repo root on the GPU machine (scripts/gpu_run.sh sets it up). Steps:
* tests: ``pytest tests/runtime/test_cuda_fastpath.py tests/runtime/test_memory*.py`` with the ``gpu`` tests
  (DIR/pytest.log);
* greedy: greedy decoding on the real SmolLM2-135M (prompts below): the fast path vs the eager ``SparseLM``
  path, dense and sparse: same tokens, same core sets (DIR/greedy.json);
* tune: the GEMV tilings timed in the whole decode step (DIR/tune.json);
* lesion: the step timed without its attention / residual+norm launches (DIR/lesion.json);
* rounding: on the real SmolLM2, the bf16 fast path with the eager and with the captured prefill and the bf16
  Hugging Face model as loaded and with the fast path's folded weights, each against the float32 path
  (DIR/rounding.json);
* given: calls given their core sets with compact buffers, without, and as chosen by call length, by number of
  new tokens, and the crossover per kept fraction (DIR/given.json);
* prefill: the prefill replayed from its CUDA graph against the eager prefill, by prompt length, dense and
  kept 0.4 (its own selection, and given its core sets before a sparse prefill) (DIR/prefill.json);
* select: where the selection of a kept-0.4 prompt runs: after the captured prefill, or inside its graph after
  the last layer (the default); the time to first token by prompt length against dense (DIR/select.json);
* variants: decode-step variants (``--variants``, JSON) timed side by side, with their logits against the plain
  step (DIR/variants.json);
* e2e: the product's main call (``SparseLM.generate`` with an artifact, auto, chat, sampling, streaming) and
  the CLI on the Llama-3.1-8B shape, against the benchmark's rows on the same weights (DIR/e2e.json);
* suite: the benchmark (``bench.run_suite``: HF generate dynamic and static-compiled, our dense and sparse
  rows, ablations), DIR/results.json and DIR/table.md, the table printed last;
* memory: ``python -m benchmarks.memory_budget`` (DIR/memory.log and its JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in two sentences.",
    "List three uses of a paperclip:",
    "def fibonacci(n):",
]


@contextlib.contextmanager
def _eager_only():
    old = os.environ.get("COREINFER_FAST")
    os.environ["COREINFER_FAST"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["COREINFER_FAST"]
        else:
            os.environ["COREINFER_FAST"] = old


def greedy_check(gguf: str, new_tokens: int = 48, log=print, device: str = "cuda",
                 dtypes=("float32", "bfloat16")) -> dict:
    """Greedy decoding of the chat-formatted PROMPTS by the eager SparseLM path and by the fast path, same
    model, same settings: identical tokens? identical core sets? And, teacher-forced along the eager
    tokens, how often the fast path's top-1 agrees, and by how much it prefers its own token where not
    (a near-tie in bf16 rounding shows as a tiny gap)."""
    from coreinfer.runtime.loading import load_model
    from coreinfer.runtime.selection import DEFAULT_SCORE, jaccard
    from coreinfer.runtime.sparse_lm import SparseLM
    from coreinfer.runtime.cuda.fastlm import FastLM, FastWeights

    out = {"model": "SmolLM2-135M-Instruct (real weights, GGUF Q4_1 de-quantised)", "new_tokens": new_tokens,
           "configs": []}
    for dtype in dtypes:
        lm = SparseLM(load_model(gguf, device=device, dtype=dtype))
        weights = FastWeights.from_hf(lm.model, adapter=lm.adapter)
        eos = sorted(lm._eos_ids())
        n = lm.adapter.n_layers
        for label, beta, layers in (("dense", None, None), ("sparse beta=0.4, paper layers", 0.4, lm.resolve_layers(None)),
                                    ("sparse beta=0.4, all layers", 0.4, range(n))):
            fast = FastLM(weights, max_seq_len=256, kept_fraction=beta, sparse_layers=layers, score=DEFAULT_SCORE)
            rows = []
            for p in PROMPTS:
                ids = lm.encode(p, chat=True)[0]
                with _eager_only():  # SparseLM.generate would otherwise answer through the fast path on CUDA
                    if beta is None:
                        ref = lm.generate(p, method="dense", max_new_tokens=new_tokens, chat=True)
                    else:
                        ref = lm.generate(p, method="stability", beta=beta, layers=layers, max_new_tokens=new_tokens,
                                          chat=True, score=DEFAULT_SCORE)
                assert ref.stats.decode_tokens_per_s < 200 or len(ref.token_ids) < 3, "reference ran the fast path"
                got = fast.generate(ids, new_tokens, eos_token_id=eos)
                toks = [t for t in got.tokens if t not in eos]
                first_diff = next((i for i, (a, b) in enumerate(zip(toks, ref.token_ids)) if a != b),
                                  None if len(toks) == len(ref.token_ids) else min(len(toks), len(ref.token_ids)))
                same_sets = jac = None
                if beta is not None:
                    same_sets = sum(torch.equal(got.core_sets[i].cpu(), ref.core_sets[i].cpu()) for i in got.core_sets)
                    jac = sum(jaccard(got.core_sets[i].cpu(), ref.core_sets[i].cpu()) for i in got.core_sets) / len(got.core_sets)
                agree, max_gap = None, None
                if ref.token_ids:
                    forced, _ = fast.forced_logits(ids, ref.token_ids[:-1])
                    target = torch.tensor(ref.token_ids, device=forced.device)
                    top = forced.argmax(-1)
                    agree = (top == target).float().mean().item()
                    gap = forced.gather(1, top[:, None])[:, 0] - forced.gather(1, target[:, None])[:, 0]
                    max_gap = gap.max().item()
                rows.append({"prompt": p, "match": toks == ref.token_ids, "first_diff": first_diff, "n_fast": len(toks),
                             "n_eager": len(ref.token_ids), "identical_core_sets": same_sets, "core_set_jaccard": jac,
                             "forced_top1_agreement": agree, "forced_max_logit_gap": max_gap,
                             "text_fast": lm.tokenizer.decode(toks), "text_eager": ref.text})
            cfg = {"dtype": dtype, "config": label, "matches": sum(r["match"] for r in rows), "prompts": len(rows),
                   "forced_top1_agreement": sum(r["forced_top1_agreement"] or 0 for r in rows) / len(rows), "rows": rows}
            out["configs"].append(cfg)
            log(f"[smollm2 greedy {dtype}] {label}: {cfg['matches']}/{cfg['prompts']} identical; first diffs "
                f"{[r['first_diff'] for r in rows]}; lengths {[r['n_eager'] for r in rows]}; identical core-set layers "
                f"{[r['identical_core_sets'] for r in rows]}; forced top-1 agreement {cfg['forced_top1_agreement']:.3f}, "
                f"max gap {max((r['forced_max_logit_gap'] or 0) for r in rows):.3f}")
            del fast
        if dtype == "bfloat16":  # eager SparseLM decode speed on the same GPU, for reference
            with _eager_only():
                t = lm.generate(PROMPTS[1], method="stability", beta=0.4, max_new_tokens=new_tokens, chat=True)
            out["eager_sparselm_decode_tok_s_bf16"] = t.stats.decode_tokens_per_s
        del lm, weights
    return out


def prefill_rounding(gguf: str, new_tokens: int = 32, log=print, device: str = "cuda") -> dict:
    """Is the fast path's bf16 rounding worse than the eager one's, or only different? The real SmolLM2, the
    PROMPTS (chat), teacher-forced along the float32 model's greedy tokens: the bf16 fast path with the eager
    prefill, with the captured (padded) one and with the norms in launches of their own (``fold_norm=False``; the
    weights hold the norms' either way), the Hugging Face model itself in bf16 (``EagerReference``, the eager
    SparseLM path) and that model with its norm weights folded into its weights as ``FastWeights`` folds them,
    each against the float32 eager fast path as the truth (core-set Jaccard per layer, relative logit error,
    top-1 agreement), dense and kept 0.4 in all layers."""
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.cuda.fastlm import FastLM, FastWeights
    from coreinfer.runtime.cuda.reference import EagerReference
    from coreinfer.runtime.loading import load_model
    from coreinfer.runtime.selection import DEFAULT_SCORE, jaccard
    from coreinfer.runtime.sparse_lm import SparseLM

    lms = {dt: SparseLM(load_model(gguf, device=device, dtype=dt)) for dt in ("float32", "bfloat16")}
    w = {dt: FastWeights.from_hf(lm.model, adapter=lm.adapter) for dt, lm in lms.items()}
    tok = lms["float32"]
    hf = {dt: EagerReference(load_model(gguf, device=device, dtype=dt).model) for dt in ("float32", "bfloat16")}
    hf["bfloat16 folded"] = EagerReference(_fold_norms(load_model(gguf, device=device, dtype="bfloat16").model))
    n_layers = lms["float32"].adapter.n_layers
    rows = []
    for beta in (None, 0.4):
        kw = dict(max_seq_len=256, kept_fraction=beta, score=DEFAULT_SCORE)
        paths = {"f32 eager": bench.step_variant(w["float32"], {"prefill_graph": False}, **kw),
                 "f32 captured": FastLM(w["float32"], **kw),
                 "bf16 eager": bench.step_variant(w["bfloat16"], {"prefill_graph": False}, **kw),
                 "bf16 captured": FastLM(w["bfloat16"], **kw),
                 "bf16 unfolded": bench.step_variant(w["bfloat16"], {"fold_norm": False}, **kw)}
        for p in PROMPTS:
            ids = tok.encode(p, chat=True)[0]
            cont = paths["f32 eager"].generate(ids, new_tokens).tokens[:-1]
            got = {name: fast.forced_logits(ids, cont) for name, fast in paths.items()}
            for dt, ref in hf.items():
                logits, sets = ref.forced_logits(ids, cont, kept_fraction=beta, score=DEFAULT_SCORE,
                                                 sparse_layers=range(n_layers) if beta else None)
                got[dt.replace("float32", "f32").replace("bfloat16", "bf16") + " hf"] = (logits, sets)
            truth, truth_sets = got["f32 eager"]
            row = {"prompt": p, "beta": beta, "prompt_tokens": int(ids.numel())}
            for name, (logits, sets) in got.items():
                row[name] = {"rel_err": ((logits - truth).norm(dim=-1) / truth.norm(dim=-1)).max().item(),
                             "top1_vs_truth": (logits.argmax(-1) == truth.argmax(-1)).float().mean().item(),
                             "jaccard_vs_truth": (sum(jaccard(sets[i].cpu(), truth_sets[i].cpu()) for i in sets)
                                                  / len(sets)) if sets else None}
            for a, b in (("bf16 eager", "bf16 captured"), ("bf16 captured", "bf16 hf"), ("bf16 unfolded", "bf16 hf"),
                         ("bf16 hf", "bf16 folded hf"), ("bf16 captured", "bf16 folded hf")):
                e, c = got[a][1], got[b][1]
                row[f"{a} vs {b} jaccard"] = sum(jaccard(e[i].cpu(), c[i].cpu()) for i in e) / len(e) if e else None
            rows.append(row)
            log(f"[rounding] {row}")
        del paths
    return {"model": "SmolLM2-135M-Instruct (real weights, GGUF Q4_1 de-quantised)", "new_tokens": new_tokens,
            "rows": rows}


def _fold_norms(model):
    """``model`` (a Llama-family transformers model) with its RMSNorm weights folded into the next products as
    ``FastWeights`` folds them (``fastlm._fold``), the norms' own weights set to one: the same function, the fast
    path's rounding of the folded weights."""
    from coreinfer.runtime.cuda.fastlm import _fold

    with torch.no_grad():
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            for lin, norm in ((at.q_proj, layer.input_layernorm), (at.k_proj, layer.input_layernorm),
                              (at.v_proj, layer.input_layernorm), (mlp.gate_proj, layer.post_attention_layernorm),
                              (mlp.up_proj, layer.post_attention_layernorm)):
                lin.weight.copy_(_fold(lin.weight, norm.weight))
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
    return model


def _graph_time_us(fn, n: int, reps: int = 10) -> float:
    """Median µs of one call of ``fn(i)``, i over n inputs, replayed in a CUDA graph (no launch gaps)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(n):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(n):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / n * 1e3)
    return sorted(ts)[len(ts) // 2]


def _kernel_us(fn, reps: int = 5) -> dict[str, float]:
    """Mean device time per call of each CUDA kernel ``fn`` launches, from the torch profiler (µs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {e.key[:60]: round(getattr(e, "self_device_time_total", 0.0) / reps, 1) for e in prof.key_averages()
            if getattr(e, "self_device_time_total", 0.0) > 0}


def _event_ms(fn, reps: int = 10) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def tune_gemv_rows(log=print) -> dict:
    """The gather-free decode's down product (compact activation x core rows of the (I, H) transposed down
    projection), Llama-3.1-8B shape, bf16, kept fraction 0.4: every ``kernels.GEMV_ROWS_CANDIDATES`` config,
    32 distinct matrices and core sets (no L2 reuse), replayed in a CUDA graph; the fastest is used."""
    from coreinfer.runtime.selection import kept_count
    from coreinfer.runtime.cuda import kernels

    I, H = 14336, 4096
    k = kept_count(0.4, I)
    n_mat = 32
    dt = [torch.randn(I, H, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(n_mat)]
    idxs = [torch.randperm(I, device="cuda")[:k].sort().values.to(torch.int32) for _ in range(n_mat)]
    a = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    ys = [torch.empty(H, device="cuda", dtype=torch.bfloat16) for _ in range(n_mat)]
    ref = a.float() @ dt[0][idxs[0].long()].float()
    part = torch.empty(512, H, device="cuda", dtype=torch.float32)
    rows = []
    for cfg in kernels.GEMV_ROWS_CANDIDATES:
        try:
            ys[0].fill_(float("nan"))
            kernels.gemv_rows(dt[0], a, ys[0], idxs[0], None, part, config=cfg)
            err = ((ys[0].float() - ref).norm() / ref.norm()).item()
            us = _graph_time_us(lambda i: kernels.gemv_rows(dt[i], a, ys[i], idxs[i], None, part, config=cfg), n_mat)
            rows.append({"config": list(cfg), "us": us, "gb_s": k * H * 2 / us / 1e3, "rel_err": err,
                         "split": kernels.gemv_rows_split(H, k, cfg)})
        except Exception as e:  # recorded, never hidden
            rows.append({"config": list(cfg), "error": repr(e)})
        log(f"[tune gemv_rows] {rows[-1]}")
    del dt
    torch.cuda.empty_cache()
    ok = [r for r in rows if "error" not in r and r["rel_err"] < 1e-2]
    best = min(ok, key=lambda r: r["us"]) if ok else None
    return {"k": k, "rows": rows, "best": None if best is None else best["config"]}


def _free_cuda():
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def selection_profile(log=print) -> dict:
    """The sync-free selection of Llama-3.1-8B's 32 layers x 256 tokens (bf16, SwiGLU-like activations):
    event-timed median of the whole ``stability_select_layers`` call, and GPU time per kernel (profiler)."""
    import torch.nn.functional as F

    from coreinfer.runtime.selection import DEFAULT_SCORE, stability_select_layers

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (32, 256, 14336)
    acts = F.silu(torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)) * torch.randn(
        shape, device="cuda", dtype=torch.bfloat16, generator=g)
    out = {"select_ms_event_median": _event_ms(lambda: stability_select_layers(acts, 0.4, 0.4, DEFAULT_SCORE), reps=20)}
    out["kernel_us"] = _kernel_us(lambda: stability_select_layers(acts, 0.4, 0.4, DEFAULT_SCORE))
    log(f"[selection profile] {out}")
    del acts
    torch.cuda.empty_cache()
    return out


# the down product's row loop pipelined (``kernels.gemv_rows``' loop_stages; not yet measured): the product's
# split with two 16 KB blocks ahead, and half the splits (half the partial rows to sum) three blocks ahead
PIPELINED_DOWN = ((2048, 4, 128, 8, 3, 3), (2048, 4, 64, 8, 3, 4))
# the persistent GEMV (``kernels.gemv``'s fifth config entry; not yet measured): 4 programs per SM, the loop 3 deep
PERSISTENT_GEMV = (1, 4096, 4, 3, 4)
TILINGS = [  # (label, ``bench.step_variant`` choices) timed in the whole decode step by ``tune_tilings``
    # (gemv_config alone sets qkv / o / lm_head and, unless gemv_config_up is given, gate||up too)
    ("default", {}),
    ("H100 tiling: 2x2048 w8 s4, gate||up 2x4096 w8 s2", {"gemv_config": (2, 2048, 8, 4), "gemv_config_up": (2, 4096, 8, 2)}),
    ("all 2x4096 w8 s2", {"gemv_config": (2, 4096, 8, 2)}),
    ("all 1x4096 w8 s2", {"gemv_config": (1, 4096, 8, 2)}),
    ("all 1x4096 w4 s3", {"gemv_config": (1, 4096, 4, 3)}),
    ("all 1x4096 w2 s2", {"gemv_config": (1, 4096, 2, 2)}),
    ("down split 96", {"rows_config": (2048, 4, 96, 8, 3)}),
    ("down split 160", {"rows_config": (2048, 4, 160, 8, 3)}),
    *[(f"down split {c[2]}, loop {c[5]} stages", {"rows_config": c}) for c in PIPELINED_DOWN],
    ("gate||up persistent", {"gemv_config_up": PERSISTENT_GEMV}),
    ("all one-tile GEMVs persistent", {"gemv_config": PERSISTENT_GEMV, "gemv_config_up": PERSISTENT_GEMV}),
]


def tune_tilings(log=print, spec: str = "llama-3.1-8b", beta: float = 0.4, new_tokens: int = 128,
                 repeats: int = 3) -> dict:
    """The GEMV tilings (``TILINGS``) timed in the whole graph-captured decode step on this device, sparse at
    ``beta`` and, for the best qkv/o/lm_head tiling, dense: median decode tok/s of ``repeats`` runs."""
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.cuda.fastlm import FastWeights

    model, tok = bench.build_shape_model(spec, torch.bfloat16)
    ids = bench.bench_prompt(tok, model.get_input_embeddings().weight.shape[0]).cuda()
    weights = FastWeights.from_hf(model)
    del model
    rows = []
    for label, opts in TILINGS + [("dense " + l, o) for l, o in TILINGS[:4]]:
        b = None if label.startswith("dense") else beta
        try:
            row, fast = bench.fast_bench(weights, ids, new_tokens, repeats, b, step=opts)
            rows.append({"tiling": label, "beta": b, "decode_tok_s": row["decode_tok_s"]})
            del fast
        except Exception as err:  # recorded, never hidden
            rows.append({"tiling": label, "beta": b, "error": repr(err)})
        log(f"[tune] {rows[-1]}")
        _free_cuda()
    del weights
    _free_cuda()
    return {"model": spec, "rows": rows}


def lesion_profile(log=print, spec: str = "llama-3.1-8b", new_tokens: int = 128, repeats: int = 3,
                   triggers=("wait", "entry")) -> dict:
    """Where the product's captured step (norms folded into the GEMVs, PDL) spends the time beyond the weights'
    roofline, two ways (PDL overlaps kernels, so profiler times do not add up to the step):

    * lesions: the step with pieces left out - its 32 attention launches, the sparse step's 32 partial-row
      sums, both (the outputs are garbage; only the time counts) - dense and at kept 0.4: median ms per step;
    * families: each kind of launch of the step alone, its 32 layers' launches (distinct weights, the step's
      own buffers and core sets) replayed in one CUDA graph: µs per launch and GB/s of the bytes it must read.

    Both with each ``pdl_trigger`` of ``triggers`` (where a kernel lets the next one launch)."""
    from unittest import mock

    from coreinfer.runtime.cuda import bench, kernels

    weights, tok, vocab = _shape_weights(spec)
    ids = bench.bench_prompt(tok, vocab).cuda()
    bw = bench.copy_bandwidth()
    real_sum = kernels.residual_rms_norm

    def no_partial_sum(x, y, weight, eps, scratch, bias=None, pdl=False, norm=True):
        return (x, None) if not norm else real_sum(x, y, weight, eps, scratch, bias, pdl, norm)

    class NoAttention:
        def __call__(self, *args, **kwargs):
            return None

    rows = []
    variants = ("full step", "no attention", "no partial-row sum", "no attention, no partial-row sum")
    for trigger, beta in itertools.product(triggers, (None, 0.4)):
        for label in variants if beta else variants[:2]:
            fast = bench.step_variant(weights, {"pdl_trigger": trigger}, max_seq_len=ids.numel() + new_tokens,
                                      kept_fraction=beta)
            if label.startswith("no attention"):
                fast._attn = NoAttention()
            with mock.patch.object(kernels, "residual_rms_norm",
                                   no_partial_sum if "partial-row" in label else real_sum):
                fast.warmup()  # the decode graph is captured here, with the lesion
                fast.generate(ids, new_tokens)
                ms = [fast.generate(ids, new_tokens, timing=True).timings for _ in range(repeats)]
            step_ms = statistics.median(t["decode_ms"] / t["decode_steps"] for t in ms)
            rows.append({"pdl_trigger": trigger, "beta": beta, "variant": label, "step_ms": step_ms,
                         "decode_tok_s": 1e3 / step_ms,
                         "roofline_step_ms": fast.bytes_per_token() / bw * 1e3, "launches": _graph_launches(fast)})
            log(f"[lesion] {rows[-1]}")
            del fast
            _free_cuda()
    families = [dict(row, pdl_trigger=t) for t in triggers for row in _launch_families(weights, ids, new_tokens, bw,
                                                                                        log, t)]
    del weights
    _free_cuda()
    return {"model": spec, "copy_bandwidth_gb_s": bw / 1e9, "rows": rows, "families": families}


def _graph_launches(fast) -> int | None:
    """Kernels one replay of the captured greedy decode step runs (profiler count; None where it cannot say)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        graph = next(iter(fast._graphs.values()))[0]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if getattr(e, "self_device_time_total", 0.0) > 0
                   and "memcpy" not in e.key.lower() and "memset" not in e.key.lower())
    except Exception:
        return None


def _launch_families(weights, ids, new_tokens: int, bw: float, log, trigger: str = "wait") -> list[dict]:
    """Each launch family of the decode step alone (``lesion_profile``): the 32 layers' launches in one graph."""
    from coreinfer.runtime.cuda import bench, kernels

    fast = bench.step_variant(weights, {"pdl_trigger": trigger}, max_seq_len=ids.numel() + new_tokens,
                              kept_fraction=0.4)
    fast.generate(ids, new_tokens)  # real core sets in the index buffer, a filled cache
    w, eps, pdl, dev, dt = fast.w, fast.w.eps, fast.pdl, fast.w.device, fast.w.dtype
    L, H, I = len(w.layers), w.hidden, w.n_neurons
    k = fast.layer_k[fast.sparse_layers[0]]
    idx = [fast._idx[fast._row[li], :fast.layer_k[li]] for li in range(L)]
    x = torch.randn(H, device=dev, dtype=dt)
    qkv = [torch.randn(lw.qkv_w.shape[0], device=dev, dtype=dt) for lw in w.layers]
    o = torch.empty(w.n_heads * w.head_dim, device=dev, dtype=dt)
    a_core = torch.randn(k, device=dev, dtype=dt) * 0.1
    a_all = torch.randn(I, device=dev, dtype=dt) * 0.1
    y = torch.empty(H, device=dev, dtype=dt)
    up_cfg = fast.gemv_config_up or kernels.GEMV_CONFIG_UP
    split = kernels.gemv_rows_split(H, k, fast.rows_config)
    part = fast._partial.view(-1)[:split * H].view(split, H)
    has_rope = w.rope_fn is not None
    keys = int(fast._pos.item()) + 1
    kv_bytes = 2 * w.n_kv_heads * keys * w.head_dim * 2
    b = lambda t: t.numel() * t.element_size()  # noqa: E731
    fams = [
        ("qkv (norm folded)", lambda i: kernels.gemv(w.layers[i].qkv_w, x, qkv[i], w.layers[i].qkv_b, pdl=pdl,
                                                     config=fast.gemv_config, norm_eps=eps),
         b(w.layers[0].qkv_w)),
        ("attention", lambda i: fast._attn(qkv[i], fast.cos if has_rope else None, fast.sin if has_rope else None,
                                           fast.k_cache[i], fast.v_cache[i], fast._pos, o, w.head_dim ** -0.5),
         kv_bytes),
        ("o + residual", lambda i: kernels.gemv(w.layers[i].o_w, o, y, w.layers[i].o_b, pdl=pdl,
                                                config=fast.gemv_config, residual=x), b(w.layers[0].o_w)),
        ("gate||up dense", lambda i: kernels.gemv(w.layers[i].up_w, x, a_all, None, gated=True, act=kernels.ACT_SILU,
                                                  pdl=pdl, config=up_cfg, norm_eps=eps), b(w.layers[0].up_w)),
        ("down dense + residual", lambda i: kernels.gemv(w.layers[i].down, a_all, y, None, pdl=pdl,
                                                         config=fast.gemv_config, residual=x), b(w.layers[0].down)),
        ("gate||up core rows (0.4)", lambda i: kernels.gemv(w.layers[i].up_w, x, a_core, None, gated=True,
                                                            act=kernels.ACT_SILU, idx=idx[i], pdl=pdl, config=up_cfg,
                                                            norm_eps=eps), 2 * k * H * 2),
        ("down core rows, split (0.4)", lambda i: kernels.gemv_rows(w.layers[i].down_t, a_core, y, idx[i], None,
                                                                    fast._partial, fast.rows_config, reduce=False,
                                                                    pdl=pdl), k * H * 2),
        ("partial-row sum + residual (0.4)", lambda i: kernels.residual_rms_norm(x, part, None, eps, fast._scratch,
                                                                                 None, pdl, norm=False),
         split * H * 4),
    ]
    fams += [
        ("qkv (norm folded), persistent", lambda i: kernels.gemv(w.layers[i].qkv_w, x, qkv[i], w.layers[i].qkv_b,
                                                                 pdl=pdl, config=PERSISTENT_GEMV, norm_eps=eps),
         b(w.layers[0].qkv_w)),
        ("gate||up core rows (0.4), persistent", lambda i: kernels.gemv(w.layers[i].up_w, x, a_core, None, gated=True,
                                                                        act=kernels.ACT_SILU, idx=idx[i], pdl=pdl,
                                                                        config=PERSISTENT_GEMV, norm_eps=eps),
         2 * k * H * 2),
    ]
    for c in PIPELINED_DOWN:  # each with no more splits than the product's, so fast._partial holds its rows
        fams.append((f"down core rows, {c[2]} splits, loop {c[5]} stages (0.4)",
                     lambda i, c=c: kernels.gemv_rows(w.layers[i].down_t, a_core, y, idx[i], None, fast._partial, c,
                                                      reduce=False, pdl=pdl), k * H * 2))
    rows = []
    for name, fn, nbytes in fams:
        try:
            us = _graph_time_us(fn, L)
            rows.append({"family": name, "us_per_launch": us, "bytes": nbytes, "gb_s": nbytes / us / 1e3,
                         "pct_copy_bw": 100 * nbytes / us / 1e3 / (bw / 1e9)})
        except Exception as err:  # recorded, never hidden
            rows.append({"family": name, "error": repr(err)})
        log(f"[lesion family] {rows[-1]}")
    h = torch.randn(H, device=dev, dtype=dt)
    logits = torch.empty(w.lm_head.shape[0], device=dev, dtype=dt)
    us = _graph_time_us(lambda i: kernels.gemv(w.lm_head, h, logits, pdl=pdl, config=fast.gemv_config), 4)
    rows.append({"family": "lm_head", "us_per_launch": us, "bytes": b(w.lm_head), "gb_s": b(w.lm_head) / us / 1e3,
                 "pct_copy_bw": 100 * b(w.lm_head) / us / 1e3 / (bw / 1e9)})
    log(f"[lesion family] {rows[-1]}")
    del fast
    _free_cuda()
    return rows


def step_variants(variants: list[dict], log=print, spec: str = "llama-3.1-8b", betas=(None, 0.4),
                  new_tokens: int = 128, repeats: int = 3, check: bool = True) -> dict:
    """Decode-step variants (``bench.step_variant`` choices) side by side on one set of weights, dense and
    sparse: median decode tok/s, and teacher-forced logits against the plain step (Triton GEMVs, but the
    residual adds and norms unfused, no PDL) given the same core sets (max relative error, top-1 agreement), and
    against the truth: the plain step in float32 on the same (upcast) weights and core sets. ``check=False``:
    the timings alone, without the float32 copy of the model (the GPU tests check the variants)."""
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.cuda.fastlm import FastWeights

    model, tok = bench.build_shape_model(spec, torch.bfloat16)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = bench.bench_prompt(tok, vocab).cuda()
    cont = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(99))
    weights = FastWeights.from_hf(model)
    refs, truth = {}, {}
    if check:
        for beta in betas:
            plain = bench.step_variant(weights, {"fused_norm": False, "pdl": False}, max_seq_len=ids.numel() + 32,
                                       kept_fraction=beta)
            refs[beta] = plain.forced_logits(ids, cont)
            del plain
        weights32 = FastWeights.from_hf(model.float())  # the truth: float32 arithmetic, the same weight values
        for beta in betas:
            plain32 = bench.step_variant(weights32, {"fused_norm": False, "pdl": False},
                                         max_seq_len=ids.numel() + 32, kept_fraction=beta)
            truth[beta] = plain32.forced_logits(ids, cont, core_sets=refs[beta][1] or None)[0]
            del plain32
        del weights32
    del model
    _free_cuda()
    bw = bench.copy_bandwidth()
    rows = []

    def rel(a, b):
        return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()

    for beta in betas:
        if check:
            log(f"[variants] beta {beta}: the plain bf16 step against the float32 truth: "
                f"rel err {rel(refs[beta][0], truth[beta]):.4f}")
        for variant in variants:
            given = bool(variant.get("given"))  # not a step choice: the calls are given their core sets
            variant = {k: v for k, v in variant.items() if k != "given"}
            try:
                row, fast = bench.fast_bench(weights, ids, new_tokens, repeats, beta, step=variant, given=given)
                del fast
                row = {"step": variant, "beta": beta, "given": given, "wall_ms": row["wall_ms"],
                       "gather_side_ms": row["gather_side_ms"], "decode_tok_s": row["decode_tok_s"],
                       "pct_roofline": 100 * row["decode_tok_s"] / bench.roofline_tok_s(row["bytes_per_token"], bw),
                       "ttft_ms": row["ttft_ms"], "prefill_ms": row["prefill_ms"], "select_ms": row["select_ms"],
                       "gather_ms": row["gather_ms"], "peak_mem_gb": row["peak_mem_gb"], "tokens": row["tokens"][:8]}
                if check:
                    ref, core = refs[beta]
                    got, _ = bench.step_variant(weights, variant, max_seq_len=ids.numel() + 32,
                                                kept_fraction=beta).forced_logits(ids, cont, core_sets=core or None)
                    row.update(rel_err_vs_plain=rel(got, ref),
                               top1_vs_plain=(got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                               rel_err_vs_f32=rel(got, truth[beta]), plain_rel_err_vs_f32=rel(ref, truth[beta]),
                               top1_vs_f32=(got.argmax(-1) == truth[beta].argmax(-1)).float().mean().item())
            except Exception as err:  # recorded, never hidden
                row = {"step": variant, "beta": beta, "given": given, "error": repr(err)}
            rows.append(row)
            log(f"[variants] {row}")
            _free_cuda()
    del weights
    _free_cuda()
    return {"model": spec, "copy_bandwidth_gb_s": bw / 1e9, "new_tokens": new_tokens, "repeats": repeats,
            "checked": check, "rows": rows}


def _shape_weights(spec: str):
    """(FastWeights of the published shape with random bf16 weights, its tokenizer, its vocabulary size); the HF
    model is freed."""
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.cuda.fastlm import FastWeights

    model, tok = bench.build_shape_model(spec, torch.bfloat16)
    vocab = model.get_input_embeddings().weight.shape[0]
    weights = FastWeights.from_hf(model)
    del model
    _free_cuda()
    return weights, tok, vocab


def prefill_lengths(log=print, spec: str = "llama-3.1-8b", lengths=(32, 128, 256, 512, 1024), repeats: int = 5) -> dict:
    """Time to first token by prompt length, the captured prefill (``prefill_graph``, the default) against the
    eager one, and the selection inside the captured prefill (``select_in_prefill``, the default) against after
    it, side by side on one set of weights: median of ``repeats`` one-token calls after two warm-ups (the
    first captures the length's bucket). Beyond ``PREFILL_GRAPH_MAX`` the default is eager; the rows with
    ``graph_max`` 2048 capture those lengths too (the constant raised for them alone)."""
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.cuda import fastlm as fastlm_module

    weights, _, vocab = _shape_weights(spec)
    g = torch.Generator().manual_seed(7)
    prompts = {T: torch.randint(0, vocab, (T,), generator=g).cuda() for T in lengths}
    rows = []
    default_max = fastlm_module.PREFILL_GRAPH_MAX
    for label, beta, step, graph_max in (("dense", None, {}, default_max), ("dense", None, {"prefill_graph": False}, 0),
                                         ("sparse", 0.4, {}, default_max),
                                         ("sparse", 0.4, {"select_in_prefill": False}, default_max),
                                         ("sparse", 0.4, {"prefill_graph": False}, 0),
                                         ("dense", None, {}, 2048), ("sparse", 0.4, {}, 2048)):
        fastlm_module.PREFILL_GRAPH_MAX = graph_max or default_max
        try:
            rows += _prefill_rows(bench, weights, prompts, label, beta, step, graph_max, repeats, log)
        finally:
            fastlm_module.PREFILL_GRAPH_MAX = default_max
        _free_cuda()
    del weights
    _free_cuda()
    return {"model": spec, "repeats": repeats, "rows": rows}


SELECT_VARIANTS = ({"select_in_prefill": False}, {})


def select_placement(log=print, spec: str = "llama-3.1-8b", lengths=(32, 128, 256, 512), repeats: int = 7,
                     variants=SELECT_VARIANTS) -> dict:
    """Time to first token by prompt length for each ``variants`` placement of the selection (kept 0.4, its own
    selection) and dense, on one set of weights: median of ``repeats`` one-token calls after two warm-ups; the
    core sets of every variant checked equal to the first's."""
    from coreinfer.runtime.cuda import bench

    weights, _, vocab = _shape_weights(spec)
    g = torch.Generator().manual_seed(8)
    prompts = {T: torch.randint(0, vocab, (T,), generator=g).cuda() for T in lengths}
    rows, first_sets = [], {}
    for beta, step in [(None, {})] + [(0.4, v) for v in variants]:
        fast = bench.step_variant(weights, step, max_seq_len=max(lengths) + 8, kept_fraction=beta)
        fast.warmup()
        for T, ids in prompts.items():
            for _ in range(2):
                sets = fast.generate(ids, 1).core_sets
            runs = [fast.generate(ids, 1, timing=True).timings for _ in range(repeats)]
            same = None
            if beta is not None:
                ref = first_sets.setdefault(T, sets)
                same = all(torch.equal(ref[li], sets[li]) for li in ref)
            row = {"beta": beta, "step": step, "prompt_tokens": T, "select_in_prefill": runs[0]["select_in_prefill"],
                   "same_core_sets": same,
                   **{k: statistics.median(r[k] for r in runs) for k in ("prefill_ms", "select_ms", "gather_ms",
                                                                       "ttft_ms")}}
            rows.append(row)
            log(f"[select] {row}")
        del fast
        _free_cuda()
    dense = {r["prompt_tokens"]: r for r in rows if r["beta"] is None}
    for r in rows:
        d = dense[r["prompt_tokens"]]
        r["ttft_over_dense_ms"] = r["ttft_ms"] - d["ttft_ms"]
        r["ttft_over_dense_pct_prefill"] = 100 * r["ttft_over_dense_ms"] / d["prefill_ms"]
    del weights
    _free_cuda()
    return {"model": spec, "repeats": repeats, "rows": rows}


def given_lengths(log=print, spec: str = "llama-3.1-8b", lengths=(8, 16, 32, 64, 128, 192), betas=(0.2, 0.4, 0.6),
                  repeats: int = 3) -> dict:
    """Calls given their core sets (similarity-guided) with compact buffers (``compact_given=True``), without
    (False) and as the product chooses by call length (None), side by side on one set of weights, by number of
    new tokens: the median wall time of untimed calls (the compact buffers' gather runs beside the captured
    prefill) and of the timed calls' time to first token, after two warm-ups per length; per kept fraction the
    crossover, where the compact calls' wall time falls below the gather-free calls' (linear between lengths)."""
    from coreinfer.runtime.cuda import bench

    weights, tok, vocab = _shape_weights(spec)
    ids = bench.bench_prompt(tok, vocab).cuda()
    rows, crossover = [], {}
    for beta in betas:
        sets = None
        for compact in (True, False, None):
            fast = bench.step_variant(weights, {"compact_given": compact}, max_seq_len=ids.numel() + max(lengths) + 8,
                                      kept_fraction=beta)
            fast.warmup()
            sets = sets or fast.generate(ids, 1).core_sets
            for n in lengths:
                for _ in range(2):
                    fast.generate(ids, n, core_sets=sets)
                walls = []
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    fast.generate(ids, n, core_sets=sets)
                    torch.cuda.synchronize()
                    walls.append((time.perf_counter() - t) * 1e3)
                timed = [fast.generate(ids, n, core_sets=sets, timing=True).timings for _ in range(repeats)]
                row = {"beta": beta, "compact_given": compact, "compact": timed[0]["compact"], "new_tokens": n,
                       "wall_ms": statistics.median(walls), "ttft_ms": statistics.median(t["ttft_ms"] for t in timed),
                       "decode_ms": statistics.median(t["decode_ms"] for t in timed)}
                rows.append(row)
                log(f"[given] {row}")
            del fast
            _free_cuda()
        gap = [(r["new_tokens"], r["wall_ms"] - next(q["wall_ms"] for q in rows if q["beta"] == beta and
                                                      q["compact_given"] is False and q["new_tokens"] == r["new_tokens"]))
               for r in rows if r["beta"] == beta and r["compact_given"] is True]
        crossover[str(beta)] = next((n0 + (n1 - n0) * g0 / (g0 - g1) for (n0, g0), (n1, g1) in zip(gap, gap[1:])
                                     if g0 > 0 >= g1), None if gap[0][1] > 0 else gap[0][0])
        log(f"[given] kept {beta}: compact - gather-free wall ms by length {gap}; crossover {crossover[str(beta)]}")
    del weights
    _free_cuda()
    return {"model": spec, "prompt_tokens": int(ids.numel()), "repeats": repeats, "rows": rows,
            "crossover_new_tokens": crossover}


def _prefill_rows(bench, weights, prompts, label, beta, step, graph_max, repeats, log) -> list[dict]:
    rows = []
    fast = bench.step_variant(weights, step, max_seq_len=max(prompts) + 8, kept_fraction=beta)
    fast.warmup()
    for T, ids in prompts.items():
        for given in ((False, True) if beta else (False,)):
            sets = fast.generate(ids, 1).core_sets if given else None
            kw = dict(core_sets=sets, sparse_prefill=True) if given else {}
            for _ in range(2):
                fast.generate(ids, 1, **kw)
            runs = [fast.generate(ids, 1, timing=True, **kw).timings for _ in range(repeats)]
            row = {"path": label, "beta": beta, "prompt_tokens": T, "given_sparse_prefill": given, "step": step,
                   "graph_max": graph_max, "prefill_graph": runs[0]["prefill_graph"],
                   "select_in_prefill": runs[0]["select_in_prefill"],
                   **{k: statistics.median(r[k] for r in runs) for k in ("prefill_ms", "select_ms", "gather_ms",
                                                                       "ttft_ms")}}
            rows.append(row)
            log(f"[prefill] {row}")
    del fast
    return rows


E2E_PROMPTS = ["Explain in two sentences why the sky is blue.", "Capital of Peru?",
               "Write a haiku about the sea."]


def main_job_e2e(carry: Path, out_dir: Path, log=print, shape: str = "llama-3.1-8b", beta: float = 0.4,
                 new_tokens: int = 128, repeats: int = 3, cli: bool = True) -> dict:
    """The product's main call on a published shape (random weights), through ``SparseLM.generate`` and the CLI.

    A synthetic calibration artifact with this model's fingerprint (one cluster per prompt, centred on its
    embedding by a small carried sentence-transformers model; random core sets of ``beta`` x I neurons in every
    layer) makes ``method="auto"`` take the similarity path for the short prompts. Rows: greedy; sampling with a
    streamer; sampling with ``on_text`` and a stop string that never matches; stability-guided and dense for
    a 256-token prompt; the eager path for reference; and, side by side on the same weights, the benchmark's
    own sparse and dense rows (``bench.fast_bench``), which the ratios are taken against."""
    import subprocess
    import tempfile

    from transformers import AutoTokenizer

    from coreinfer.runtime import artifact as artifacts
    from coreinfer.runtime.cuda import bench
    from coreinfer.runtime.loading import LoadedModel
    from coreinfer.runtime.selection import kept_count
    from coreinfer.runtime.similarity import PromptEmbedder
    from coreinfer.runtime.sparse_lm import SparseLM
    from tests.pipeline.synthetic import synthetic_artifact_inputs

    t0 = time.perf_counter()
    model, _ = bench.build_shape_model(shape, torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(carry / "smollm2-tokenizer")
    loaded = LoadedModel(model, tok, f"{shape} (random weights)", "memory", torch.device("cuda"), torch.bfloat16)
    probe = SparseLM(loaded)
    n_layers, n_neurons = probe.adapter.n_layers, probe.adapter.n_neurons
    embedder_dir = str(carry / "tiny-embedder")
    emb = PromptEmbedder(embedder_dir).embed(E2E_PROMPTS)
    arrays, attrs, _ = synthetic_artifact_inputs(n_clusters=len(E2E_PROMPTS), n_layers=n_layers, n_neurons=n_neurons,
                                                 dim=emb.shape[1])
    arrays["centroids"] = emb.astype("float32")
    arrays["radii"] = arrays["radii"] * 0 + 0.05
    attrs.update(model=artifacts.model_fingerprint(probe.adapter, model.config), model_spec=shape, beta=beta,
                 k=kept_count(beta, n_neurons), layer_start=0, layer_end=n_layers, min_stable_tokens=64)
    attrs["embedding"] = {**attrs["embedding"], "model_id": embedder_dir, "dim": int(emb.shape[1])}
    tmp = Path(tempfile.mkdtemp(prefix="coreinfer-e2e-"))
    art_path = artifacts.write_artifact(tmp / "coreneurons.zarr", arrays, attrs)
    del probe
    lm = SparseLM(loaded, artifact=art_path)
    out = {"shape": shape, "beta": beta, "new_tokens": new_tokens, "repeats": repeats, "rows": [],
           "setup_s": time.perf_counter() - t0}
    every = f"0:{n_layers}"  # every layer sparse, as the benchmark's rows
    long_ids = bench.bench_prompt(tok, lm.tokenizer.vocab_size)
    long_prompt = tok.decode(long_ids)

    class Collect:  # a streamer: counts what it is handed, as TextStreamer would print it
        def __init__(self):
            self.tokens = 0

        def put(self, value):
            self.tokens += value.numel()

        def end(self):
            pass

    configs = [
        ("auto, chat, greedy", E2E_PROMPTS[0], dict(method="auto", chat=True, layers=every)),
        ("auto, chat, sampled + streamer", E2E_PROMPTS[0],
         dict(method="auto", chat=True, layers=every, do_sample=True, temperature=0.8, top_p=0.95, seed=0,
              streamer="collect")),
        ("auto, chat, sampled + on_text + stop string", E2E_PROMPTS[1],
         dict(method="auto", chat=True, layers=every, do_sample=True, temperature=0.8, top_k=50, seed=1,
              on_text="collect", stop=["\u2603never\u2603"])),
        ("stability, 256-token prompt, greedy", long_prompt, dict(method="stability", beta=beta, layers=every)),
        ("dense, 256-token prompt, greedy", long_prompt, dict(method="dense")),
    ]
    for label, prompt, kw in configs:
        runs = []
        try:
            for r in range(repeats + 1):  # the first run captures the graph
                kw2 = dict(kw)
                if kw2.get("streamer") == "collect":
                    kw2["streamer"] = Collect()
                if kw2.get("on_text") == "collect":
                    pieces = []
                    kw2["on_text"] = pieces.append
                t = time.perf_counter()
                res = lm.generate(prompt, max_new_tokens=new_tokens, **kw2)
                wall = time.perf_counter() - t
                if r:
                    runs.append((res, wall))
            s = runs[0][0].stats
            row = {"config": label, "path": s.path, "fallback_reason": s.fallback_reason, "method_used": s.method_used,
                   "cluster": s.cluster, "kept_fraction": s.kept_fraction, "new_tokens": s.new_tokens,
                   "decode_tok_s": statistics.median(r.stats.decode_tokens_per_s for r, _ in runs),
                   "prefill_ms": statistics.median(r.stats.prefill_ms for r, _ in runs),
                   "select_ms": statistics.median(r.stats.select_ms for r, _ in runs),
                   "wall_s": statistics.median(w for _, w in runs), "stop_reason": s.stop_reason,
                   "text_head": runs[0][0].text[:80]}
        except Exception as err:  # recorded, never hidden
            import traceback

            row = {"config": label, "error": repr(err), "traceback": traceback.format_exc()}
        out["rows"].append(row)
        log(f"[e2e] {row}")
    try:  # the eager path for reference (fewer tokens: it is slow)
        res = lm.generate(E2E_PROMPTS[0], method="auto", chat=True, layers=every, max_new_tokens=32, fast_path=False)
        out["rows"].append({"config": "auto, chat, greedy, eager path (32 tokens)", "path": res.stats.path,
                            "decode_tok_s": res.stats.decode_tokens_per_s, "method_used": res.stats.method_used})
    except Exception as err:
        out["rows"].append({"config": "eager path", "error": repr(err)})
    log(f"[e2e] {out['rows'][-1]}")
    weights = lm.__dict__.get("_coreinfer_cuda_fast", {}).get("weights")
    if weights is not None:  # the benchmark's rows on the same weights, same process
        ids = long_ids.cuda()
        for b in (beta, None):
            row, fast = bench.fast_bench(weights, ids, new_tokens, repeats, b)
            out.setdefault("bench_rows", []).append({k: row[k] for k in ("path", "beta", "decode_tok_s", "ttft_ms",
                                                                         "prefill_ms", "select_ms", "gather_ms")})
            del fast
        sparse = out["bench_rows"][0]["decode_tok_s"]
        for r in out["rows"]:
            if "decode_tok_s" in r and r.get("kept_fraction") is not None and abs(r["kept_fraction"] - beta) < 1e-3:
                r["x_bench_sparse"] = r["decode_tok_s"] / sparse
        log(f"[e2e] bench rows {out['bench_rows']}")
    if cli:  # the main job through the CLI: a saved model folder, the artifact, auto, chat, streaming
        folder = tmp / "model"
        t = time.perf_counter()
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        out["save_s"] = time.perf_counter() - t
        del lm, loaded, model, weights
        _free_cuda()
        cmd = [sys.executable, "-m", "coreinfer.runtime.cli", "generate", E2E_PROMPTS[0], "--model", str(folder),
               "--artifact", str(art_path), "--method", "auto", "--chat", "--layers", every,
               "--max-new-tokens", str(new_tokens)]
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        out["cli"] = {"command": " ".join(cmd), "rc": r.returncode, "wall_s": time.perf_counter() - t,
                      "stdout_chars": len(r.stdout), "stderr_tail": r.stderr[-1500:]}
        log(f"[e2e] cli {out['cli']}")
    (out_dir / "e2e.json").write_text(json.dumps(out, indent=1, default=str))
    return out


def run_tests(out: Path, log, tests: list[str] | None = None, timeout_s: float = 480) -> None:
    tests = tests or (["tests/runtime/test_cuda_fastpath.py"]
                      + [str(p) for p in sorted(Path("tests/runtime").glob("test_memory*.py"))])
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu or not gpu", "-p", "no:cacheprovider",
                            *tests], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:  # a hung kernel must not take the rest of the call with it
        (out / "pytest.log").write_text(str(err.stdout or "") + str(err.stderr or ""))
        log(f"pytest: TIMED OUT after {timeout_s:.0f} s")
        return
    (out / "pytest.log").write_text(r.stdout + r.stderr)
    log("pytest: " + (r.stdout.strip().splitlines() or ["(no output)"])[-1])
    for line in r.stdout.splitlines():
        if line.startswith(("FAILED", "ERROR")):
            log(line[:300])


def run_suite_step(args, out: Path, log) -> None:
    from coreinfer.runtime.cuda import bench

    models = [m for m in args.models.split(",") if m]
    rows_config = tuple(json.loads(args.rows_config)) if args.rows_config else None
    if rows_config is None:
        rows_config = tuple(tune_gemv_rows(log=log)["best"] or ()) or None
    sel = {}
    try:
        sel["selection_profile"] = selection_profile(log=log)
    except Exception as err:  # recorded, never hidden
        sel["selection_profile"] = {"error": repr(err)}

    def save(result):
        (out / "results.json").write_text(json.dumps({**result, **sel}, indent=1, default=str))

    result = bench.run_suite(models, new_tokens=args.new_tokens, repeats=args.repeats, log=log, on_model=save,
                             step={"rows_config": rows_config} if rows_config else None,
                             ablation_first=not args.no_ablation)
    save(result)
    table = bench.format_table(result)
    (out / "table.md").write_text(table + "\n")
    for m in result["models"]:
        for r in m.get("rows", []):
            if "profile" in r:
                log(f"profile {m['model']} {r['path']} beta={r.get('beta')}: {json.dumps(r['profile'])}")
        if "check" in m:
            log(f"check {m['model']}: {json.dumps(m['check'])}")
    print(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="folder for the raw JSON and logs")
    ap.add_argument("--steps", default="tests,e2e,suite",
                    help="comma-separated, run in this order: tests, greedy, tune, lesion, rounding, given, select, "
                         "prefill, variants, e2e, suite, memory")
    ap.add_argument("--carry", default=".carry", help="folder with smollm2-tokenizer/ and tiny-embedder/ (e2e)")
    ap.add_argument("--smollm2", default=None, help="path of SmolLM2-135M-Instruct.Q4_1.gguf (greedy step)")
    ap.add_argument("--models", default="llama-3.1-8b", help="comma-separated shapes or specs for the suite")
    ap.add_argument("--no-ablation", action="store_true", help="suite without the ablation rows")
    ap.add_argument("--new-tokens", type=int, default=128, help="new tokens per timed generation")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (median)")
    ap.add_argument("--rows-config", default="[2048,4,128,8,3]", help="the down GEMV's tiling as JSON ('' tunes it)")
    ap.add_argument("--memory-args", default="", help="arguments for benchmarks.memory_budget (memory step)")
    ap.add_argument("--tests", default="", help="comma-separated test files for the tests step (default: the GPU ones)")
    ap.add_argument("--tests-timeout", type=float, default=480, help="seconds before the tests step is stopped")
    ap.add_argument("--variant-betas", default="dense,0.4", help="kept fractions of the variants step ('dense': none)")
    ap.add_argument("--variants", default='[{}, {"pdl": false}]',
                    help="JSON list of bench.step_variant choices timed side by side (variants step); "
                         "\"given\": true in one makes its calls take their core sets before the prefill")
    ap.add_argument("--variants-unchecked", action="store_true",
                    help="variants step: timings only, no logits against the plain and float32 steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    def greedy():
        if args.smollm2:
            (out / "greedy.json").write_text(json.dumps(greedy_check(args.smollm2, log=log), indent=1, default=str))

    def memory():
        r = subprocess.run([sys.executable, "-m", "benchmarks.memory_budget", "--out", str(out),
                            *args.memory_args.split()], capture_output=True, text=True)
        (out / "memory.log").write_text(r.stdout + r.stderr)
        log("memory: rc " + str(r.returncode) + "\n" + (r.stdout + r.stderr)[-3000:])

    steps = {
        "tests": lambda: run_tests(out, log, [t for t in args.tests.split(",") if t], args.tests_timeout),
        "greedy": greedy,
        "rounding": lambda: (out / "rounding.json").write_text(json.dumps(prefill_rounding(args.smollm2, log=log),
                                                                          indent=1, default=str)),
        "tune": lambda: (out / "tune.json").write_text(json.dumps(tune_tilings(log=log), indent=1, default=str)),
        "lesion": lambda: (out / "lesion.json").write_text(json.dumps(lesion_profile(log=log), indent=1, default=str)),
        "variants": lambda: (out / "variants.json").write_text(json.dumps(step_variants(
            json.loads(args.variants), log=log, new_tokens=args.new_tokens, repeats=args.repeats,
            betas=[None if b == "dense" else float(b) for b in args.variant_betas.split(",")],
            check=not args.variants_unchecked), indent=1, default=str)),
        "given": lambda: (out / "given.json").write_text(json.dumps(given_lengths(log=log), indent=1, default=str)),
        "select": lambda: (out / "select.json").write_text(json.dumps(select_placement(log=log), indent=1,
                                                                       default=str)),
        "prefill": lambda: (out / "prefill.json").write_text(json.dumps(prefill_lengths(log=log), indent=1,
                                                                          default=str)),
        "e2e": lambda: main_job_e2e(Path(args.carry), out, log=log, new_tokens=args.new_tokens, repeats=args.repeats),
        "suite": lambda: run_suite_step(args, out, log),
        "memory": memory,
    }
    for name in [s.strip() for s in args.steps.split(",") if s.strip()]:
        if name not in steps:
            ap.error(f"unknown step {name!r}; choose from {', '.join(steps)}")
        t0 = time.perf_counter()
        try:
            steps[name]()
        except Exception as err:  # recorded, never hidden; the next step still runs
            import traceback

            (out / f"{name}-error.txt").write_text(traceback.format_exc())
            log(f"{name} FAILED: {err!r}\n{traceback.format_exc()[-2000:]}")
        log(f"[step {name}] {time.perf_counter() - t0:.0f} s")
        _free_cuda()
    return 0


if __name__ == "__main__":
    sys.exit(main())
