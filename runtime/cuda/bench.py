"""`coreinfer bench` on a GPU: Hugging Face dense ``generate`` vs our graph-captured fast path, dense and
sparse, side by side in one run, each against its memory-bandwidth roofline.

Per model: HF transformers ``generate`` (dense, greedy, default dynamic cache, and with
``cache_implementation="static"``, transformers' own compiled decode), our dense fast path, our
sparse fast path at each kept fraction. Every configuration decodes the same prompt (``PROMPT_TOKENS``
tokens) for exactly ``new_tokens`` tokens (EOS ignored), after a warm-up; medians of ``repeats`` runs.

Roofline: weight bytes one decode step reads (``FastLM.bytes_per_token``) / the device's measured copy
bandwidth (a large device-to-device copy, bytes read + written). Decode tok/s counts the model steps after
the first token (which the prefill produces); TTFT = prefill + core-set selection + gather + first token.

Models: published shapes with random weights, built from a config on the GPU (no download) — see
``SHAPES`` — and any spec ``loading.load_model`` accepts (e.g. the real ``smollm2-135m``).
"""

from __future__ import annotations

import gc
import json
import math
import platform
import statistics
import sys
import time

import torch

from ..selection import kept_count

PROMPT_TOKENS = 256
SUITE = ("llama-3.1-8b", "llama-2-7b", "mistral-7b", "opt-6.7b", "smollm2-135m")

# Published configurations (Hugging Face config.json of each model), for random-weight models of that shape.
SHAPES = {
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={
                                       "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                 tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                                   sliding_window=4096, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
                             max_position_embeddings=2048, word_embed_proj_dim=4096, do_layer_norm_before=True,
                             activation_function="relu", enable_bias=True)),
    "smollm2-135m-shape": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0})),
}


# ------------------------------------------------------------------------------------------ arithmetic


def roofline_tok_s(bytes_per_token: int, bandwidth_bytes_s: float) -> float:
    """Tokens/s if every decode step only streamed its weights at the measured copy bandwidth."""
    if bytes_per_token <= 0 or bandwidth_bytes_s <= 0:
        raise ValueError("bytes_per_token and bandwidth must be positive")
    return bandwidth_bytes_s / bytes_per_token


def shape_bytes_per_token(name: str, elem_bytes: int, kept_fraction: float | None = None) -> int:
    """Weight bytes per decode step of a published shape, from its config alone (all layers sparse)."""
    family, c = SHAPES[name]
    H, L, V, nh = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"], c["num_attention_heads"]
    if family == "opt":
        I, nkv, hd = c["ffn_dim"], nh, H // nh
        k = I if kept_fraction is None else kept_count(kept_fraction, I)
        attn = H * 3 * H + 3 * H + H * H + H + 4 * H  # q,k,v,o weights + biases, two layer norms
        ffn = 2 * H * k + k + H  # fc1 rows + their bias, fc2 columns, fc2 bias
        return elem_bytes * (L * (attn + ffn) + 2 * H + V * H + 2 * H)  # final LN, lm_head, token + position row
    I, nkv = c["intermediate_size"], c["num_key_value_heads"]
    hd = H // nh
    k = I if kept_fraction is None else kept_count(kept_fraction, I)
    attn = H * (nh + 2 * nkv) * hd + H * nh * hd  # the two RMSNorm weights are folded into qkv / gate||up
    return elem_bytes * (L * (attn + 3 * H * k) + H + V * H + H)


# ------------------------------------------------------------------------------------------ measurement


def _sync():
    torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    assert torch.equal(dst[:4096], src[:4096])
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times)


def shape_config(name: str, **overrides):
    """The Hugging Face config of a published shape (``SHAPES``), SDPA attention, ``overrides`` applied."""
    import transformers

    family, kwargs = SHAPES[name]
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "opt": transformers.OPTConfig}[family]
    cfg = cls(**{**kwargs, **overrides})
    cfg._attn_implementation = "sdpa"
    return cfg


def build_shape_model(name: str, dtype: torch.dtype):
    """A random-weight model of a published shape, initialised directly on the GPU."""
    import transformers

    cfg = shape_config(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to("cuda").eval()
    return model, None


def load_real_model(spec: str, dtype: torch.dtype):
    from ..loading import load_model

    loaded = load_model(spec, device="cuda", dtype=dtype)
    return loaded.model, loaded.tokenizer


def bench_prompt(tokenizer, vocab: int, n: int = PROMPT_TOKENS) -> torch.Tensor:
    """``n`` prompt tokens: real text for a real tokenizer, fixed random ids for a random-weight model."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(1234)
        return torch.randint(0, vocab, (n,), generator=g)
    from ..bench import BENCH_PROMPT

    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer(BENCH_PROMPT + "\n\n")["input_ids"]
    return torch.tensor(ids[:n])


def hf_generate_bench(model, ids: torch.Tensor, new_tokens: int, repeats: int, static: bool = False) -> dict:
    """Hugging Face ``generate``, dense, greedy, exactly ``new_tokens`` tokens; TTFT from a 1-token generate.

    ``static``: ``cache_implementation="static"``, with which transformers compiles its own decode step
    (torch.compile, reduce-overhead): the strongest dense peer transformers has."""
    x = ids.view(1, -1).cuda()
    mask = torch.ones_like(x)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"

    def run(n):
        _sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync()
        assert out.shape[1] == x.shape[1] + n
        return time.perf_counter() - t0, out[0, x.shape[1]:].tolist()

    torch.cuda.reset_peak_memory_stats()
    run(8)  # warm-up (and, static, the compilation)
    if static:
        run(new_tokens)
    ttft = statistics.median(run(1)[0] for _ in range(repeats))
    runs = [run(new_tokens) for _ in range(repeats)]
    total = statistics.median(r[0] for r in runs)
    return {"path": "hf-generate-static" if static else "hf-generate", "kept_fraction": 1.0, "decode_tok_s": (new_tokens - 1) / (total - ttft),
            "e2e_tok_s": new_tokens / total, "ttft_ms": ttft * 1e3, "prefill_ms": None, "select_ms": None, "gather_ms": None,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "tokens": runs[0][1]}


def step_variant(weights, step: dict | None = None, **kwargs):
    """A ``FastLM`` whose decode step is built as ``step`` says (``fastlm.STEP_CHOICES``: e.g. ``{"pdl": False}``,
    ``{"gemv": "torch", "attention": "sdpa"}``, ``{"cuda_graph": False}``), or the product's own with none:
    the benchmark's ablation rows and the slower reference steps the tests compare against. The product
    class takes no such options."""
    from .fastlm import FastLM

    if not step:
        return FastLM(weights, **kwargs)
    overrides = dict(step)

    class StepVariant(FastLM):
        def _step_overrides(self) -> dict:
            return overrides

    return StepVariant(weights, **kwargs)


def fast_bench(weights, ids: torch.Tensor, new_tokens: int, repeats: int, kept_fraction, sparse_layers=None,
               label=None, step: dict | None = None, given: bool = False) -> dict:
    """One row: our fast path (the product's step, or the ``step_variant`` ``step``) timed on ``ids``.

    ``given``: the timed calls are given their core sets before the prefill, as similarity-guided calls are
    (the warm-up call's own selection); the row then also has ``wall_ms``, the median wall time of untimed
    calls (no synchronisation between the phases), which is what overlapping work shows in."""
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fast = step_variant(weights, step, max_seq_len=ids.numel() + new_tokens, kept_fraction=kept_fraction,
                        sparse_layers=sparse_layers)
    fast.warmup()
    setup_s = time.perf_counter() - t0
    first = fast.generate(ids, new_tokens, timing=True)  # warm-up
    sets = first.core_sets if (given and kept_fraction is not None) else None
    if sets is not None:
        fast.generate(ids, new_tokens, timing=True, core_sets=sets)  # warm-up of the given-sets call
    runs = [fast.generate(ids, new_tokens, timing=True, core_sets=sets) for _ in range(repeats)]
    med = {k: statistics.median(r.timings[k] for r in runs) for k in ("prefill_ms", "select_ms", "gather_ms", "ttft_ms", "decode_ms")}
    wall = None
    if sets is not None:
        walls = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fast.generate(ids, new_tokens, core_sets=sets)
            walls.append((time.perf_counter() - t) * 1e3)
        wall = statistics.median(walls)
    steps = runs[0].timings["decode_steps"]
    row = {"path": label or ("fast-dense" if kept_fraction is None else "fast-sparse"),
           "kept_fraction": fast.kept_fraction_overall(), "beta": kept_fraction,
           "sparse_layers": f"{fast.sparse_layers.start}:{fast.sparse_layers.stop}" if kept_fraction else None,
           "k": fast.k, "decode_tok_s": steps / (med["decode_ms"] / 1e3),
           "e2e_tok_s": new_tokens / ((med["ttft_ms"] + med["decode_ms"]) / 1e3), **med,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "bytes_per_token": fast.bytes_per_token(),
           "fast_buffers_gb": fast.buffer_bytes() / 1e9, "setup_s": setup_s, "step": dict(step or {}),
           "cuda_graph": fast.cuda_graph, "compiled_elementwise": fast.ops.compiled, "attention": fast.attention,
           "gemv": fast.gemv, "pdl": fast.pdl, "fused_norm": fast.fused_norm, "gemv_config": fast.gemv_config,
           "rows_config": fast.rows_config, "gather_free": fast.indexed, "down_t_gb": weights.down_t_bytes() / 1e9,
           "tokens": runs[0].tokens, "given": sets is not None, "wall_ms": wall,
           "prefill_graph": runs[0].timings["prefill_graph"],
           "select_in_prefill": runs[0].timings.get("select_in_prefill", False),
           "gather_side_ms": statistics.median(r.timings.get("gather_side_ms", 0.0) for r in runs)}
    row["select_gather_pct_prefill"] = 100 * (med["select_ms"] + med["gather_ms"]) / med["prefill_ms"]
    return row, fast


# the ablation rows of ``bench_model``: (label, kept fraction, step_variant), what each piece of the step is worth
ABLATION = (
    ("fast-dense-eager-prefill", None, {"prefill_graph": False}),
    ("fast-sparse-eager-prefill", 0.4, {"prefill_graph": False}),
    ("fast-sparse-select-after-prefill", 0.4, {"select_in_prefill": False}),
    ("fast-dense-norm-launches", None, {"fold_norm": False}),
    ("fast-sparse-norm-launches", 0.4, {"fold_norm": False}),
    ("fast-dense-no-pdl-unfused-norm", None, {"pdl": False, "fused_norm": False}),
    ("fast-sparse-no-pdl", 0.4, {"pdl": False}),
    ("fast-sparse-no-pdl-unfused-norm", 0.4, {"pdl": False, "fused_norm": False}),
    ("fast-dense-cublas-gemv", None, {"gemv": "torch", "pdl": False}),
    ("fast-sparse-cublas-gemv", 0.4, {"gemv": "torch", "pdl": False}),
    ("fast-sparse-cublas-sdpa-attention", 0.4, {"gemv": "torch", "attention": "sdpa", "pdl": False}),
    ("fast-sparse-cublas-sdpa-unfused", 0.4, {"gemv": "torch", "attention": "sdpa", "pdl": False,
                                             "compile_elementwise": False}),
    ("fast-sparse-eager-no-graph", 0.4, {"gemv": "torch", "attention": "sdpa", "pdl": False,
                                        "compile_elementwise": False, "cuda_graph": False}),
)


def _kernel_class(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk", "sm90_", "cublas")):
        return "matmul"
    if any(s in n for s in ("fmha", "attention", "flash", "attn")):
        return "attention"
    if "residual_rms" in n or "split_sum" in n:
        return "residual_norm"
    if "argmax" in n:
        return "argmax"
    if "triton" in n:
        return "fused_elementwise"
    if "index" in n or "scatter" in n or "gather" in n:
        return "index_copy"
    return "other"


def profile_decode(fast, ids: torch.Tensor, steps: int = 20) -> dict:
    """Per-step GPU time by kernel class for the decode step (graph replays; eager steps if the profiler
    sees no kernels inside graphs), next to the step's wall time from the timed runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from .fastlm import GREEDY

    fast.generate(ids, 2)  # fill the cache and the compact buffers for this prompt
    T = ids.numel()
    graph = fast._graphs.get(GREEDY)

    def reset():
        fast._pos.fill_(T)
        fast._step.fill_(1)

    def collect(use_graph: bool):
        reset()
        _sync()
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                if use_graph:
                    graph[0].replay()
                else:
                    fast._decode_step()
            _sync()
        by, count, names = {}, 0, {}
        for e in prof.key_averages():
            if getattr(e, "device_type", None) != DeviceType.CUDA:
                continue
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0.0)
            if t <= 0:
                continue
            c = _kernel_class(e.key)
            by[c] = by.get(c, 0.0) + t / steps
            count += e.count
            names[e.key] = names.get(e.key, 0.0) + t / steps
        return by, count / steps, names

    source = "graph"
    by, kernels, names = collect(graph is not None)
    if not by:
        source = "eager-step"
        by, kernels, names = collect(False)
    reset()
    top = sorted(names.items(), key=lambda kv: -kv[1])[:12]
    matmul_bytes = fast.bytes_per_token()  # all weight bytes go through the matmuls (norms are negligible)
    total = sum(by.values())
    return {"source": source, "us_per_step_by_class": {k: round(v, 1) for k, v in sorted(by.items())},
            "kernel_us_per_step": round(total, 1), "kernels_per_step": kernels,
            "matmul_gb_s": matmul_bytes / (by.get("matmul", float("nan")) * 1e-6) / 1e9 if by.get("matmul") else None,
            "top_kernels_us_per_step": [(k[:110], round(v, 1)) for k, v in top]}


# ------------------------------------------------------------------------------------------ correctness


def check_logits(model, weights, ids: torch.Tensor, cont: torch.Tensor, kept_fraction: float = 0.4,
                 sparse_layers=None) -> dict:
    """Fast path vs eager path on the same model, teacher-forced over ``cont``:
    dense fast vs the plain HF forward; sparse fast vs the eager adapter path given the same core sets;
    and the eager path's own selection vs the fast path's (Jaccard)."""
    from ..selection import jaccard
    from .fastlm import FastLM
    from .reference import EagerReference

    def rel(a, b):
        return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()

    out = {}
    x = torch.cat([ids, cont]).view(1, -1).cuda()
    with torch.inference_mode():
        hf = model(input_ids=x).logits[0, ids.numel() - 1:].float()
    dense = FastLM(weights, max_seq_len=x.shape[1] + 1)
    got, _ = dense.forced_logits(ids, cont)
    out["dense_rel_err"] = rel(got, hf)
    out["dense_argmax_agree"] = (got.argmax(-1) == hf.argmax(-1)).float().mean().item()
    del dense, hf
    fast = FastLM(weights, max_seq_len=x.shape[1] + 1, kept_fraction=kept_fraction, sparse_layers=sparse_layers)
    got, core = fast.forced_logits(ids, cont)
    del fast
    ref_model = EagerReference(model)
    ref, _ = ref_model.forced_logits(ids, cont, kept_fraction=kept_fraction, sparse_layers=sparse_layers, core_sets=core)
    out["sparse_rel_err"] = rel(got, ref)
    out["sparse_argmax_agree"] = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    _, own = ref_model.forced_logits(ids, cont[:0], kept_fraction=kept_fraction, sparse_layers=sparse_layers)
    out["selection_jaccard_mean"] = statistics.mean(jaccard(core[i].cpu(), own[i].cpu()) for i in core)
    out["selection_identical_layers"] = sum(torch.equal(core[i].cpu(), own[i].cpu()) for i in core)
    out["sparse_layers"] = len(core)
    out["kept_fraction"] = kept_fraction
    out["forced_tokens"] = cont.numel()
    return out


# ------------------------------------------------------------------------------------------ driver


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def bench_model(spec: str, dtype: torch.dtype, betas, new_tokens: int, repeats: int, bandwidth: float,
                layers=None, check: bool = True, profile: bool = False, ablation: bool = False, log=print,
                step: dict | None = None, hf_static: bool = True) -> dict:
    """Every row for one model, side by side. ``step``: a ``step_variant`` for all our rows (a tiling the GPU
    suite tunes); ``ablation``: also the ``ABLATION`` rows."""
    from .fastlm import FastWeights

    t0 = time.perf_counter()
    real = spec not in SHAPES
    model, tok = load_real_model(spec, dtype) if real else build_shape_model(spec, dtype)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = bench_prompt(tok, vocab)
    n_layers = model.config.num_hidden_layers
    sparse_layers = None if layers is None else _parse_layers(layers, n_layers)
    res = {"model": spec, "weights": "real" if real else "random (published shape)", "prompt_tokens": ids.numel(),
           "new_tokens": new_tokens, "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "rows": []}
    log(f"[{spec}] built in {time.perf_counter() - t0:.1f}s ({res['params_b']:.2f} B params)")
    hf_row = hf_generate_bench(model, ids, new_tokens, repeats)
    res["rows"].append(hf_row)
    log(f"[{spec}] hf-generate {hf_row['decode_tok_s']:.1f} tok/s decode, TTFT {hf_row['ttft_ms']:.1f} ms")
    if hf_static:
        try:
            row = hf_generate_bench(model, ids, new_tokens, repeats, static=True)
            res["rows"].append(row)
            log(f"[{spec}] hf-generate-static {row['decode_tok_s']:.1f} tok/s decode, TTFT {row['ttft_ms']:.1f} ms")
        except Exception as err:  # recorded, never hidden
            res["rows"].append({"path": "hf-generate-static", "error": repr(err)})
            log(f"[{spec}] hf-generate-static FAILED {err!r}")
        torch.compiler.reset()
        _free()
    weights = FastWeights.from_hf(model)
    if check:
        g = torch.Generator().manual_seed(99)
        cont = torch.randint(0, vocab, (16,), generator=g) if not real else torch.tensor(hf_row["tokens"][:16])
        try:
            res["check"] = check_logits(model, weights, ids, cont, 0.4, sparse_layers)
            log(f"[{spec}] check {res['check']}")
        except Exception as err:  # recorded, never hidden
            res["check"] = {"error": repr(err)}
            log(f"[{spec}] check FAILED {err!r}")
        _free()
    del model
    _free()
    res["bandwidth_gb_s"] = bandwidth / 1e9
    base = dict(step or {})
    configs = [(None, None, base, False)] + [(None, b, base, False) for b in betas]
    # the same kept fractions with the core sets given before the prefill, as similarity-guided calls have them
    configs += [("fast-sparse-given", b, base, True) for b in betas]
    if ablation:
        configs += [(label, b, {**base, **st}, False) for label, b, st in ABLATION]
    for label, beta, st, given in configs:
        graph = st.get("cuda_graph", True)
        if st.get("gemv") == "torch":
            st = {k: v for k, v in st.items() if k not in ("rows_config", "gemv_config", "gemv_config_up")}
        try:
            row, fast = fast_bench(weights, ids, new_tokens if graph else min(new_tokens, 32), repeats, beta,
                                   sparse_layers, label=label, step=st, given=given)
        except Exception as err:
            res["rows"].append({"path": label or ("fast-dense" if beta is None else "fast-sparse"), "beta": beta,
                                "error": repr(err)})
            log(f"[{spec}] beta={beta} FAILED {err!r}")
            _free()
            continue
        row["roofline_tok_s"] = roofline_tok_s(row["bytes_per_token"], bandwidth)
        row["pct_roofline"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
        if profile and label is None and beta in (None, 0.4):
            try:
                row["profile"] = profile_decode(fast, ids)
            except Exception as err:
                row["profile"] = {"error": repr(err)}
        res["rows"].append(row)
        log(f"[{spec}] {row['path']} beta={beta}: {row['decode_tok_s']:.1f} tok/s ({row['pct_roofline']:.0f}% of "
            f"{row['roofline_tok_s']:.0f}), TTFT {row['ttft_ms']:.1f} ms, select {row['select_ms']:.1f} ms, "
            f"gather {row['gather_ms']:.2f} ms, prefill {row['prefill_ms']:.1f} ms, setup {row['setup_s']:.1f}s")
        del fast
        _free()
    del weights
    _free()
    hf = res["rows"][0]
    hf_static_row = next((r for r in res["rows"] if r.get("path") == "hf-generate-static" and "error" not in r), None)
    dense = next((r for r in res["rows"] if r.get("path") == "fast-dense" and "error" not in r), None)
    for r in res["rows"]:
        if "error" in r:
            continue
        r["x_hf_decode"] = r["decode_tok_s"] / hf["decode_tok_s"]
        r["x_hf_e2e"] = r["e2e_tok_s"] / hf["e2e_tok_s"]
        if hf_static_row is not None:
            r["x_hf_static_decode"] = r["decode_tok_s"] / hf_static_row["decode_tok_s"]
        if dense is not None:
            r["x_dense_fast"] = r["decode_tok_s"] / dense["decode_tok_s"]
        if r["path"].startswith("hf-generate") and dense is not None:
            r["bytes_per_token"] = dense["bytes_per_token"]
            r["roofline_tok_s"] = dense["roofline_tok_s"]
            r["pct_roofline"] = 100 * r["decode_tok_s"] / r["roofline_tok_s"]
        if dense is not None and r is not hf:
            r["greedy_match_hf"] = r["tokens"] == hf["tokens"] if r["path"] == "fast-dense" else None
            # what the sparse path adds to the time to first token (where the selection runs inside the captured
            # prefill, the only measure of its cost), also as a share of the dense prefill
            r["ttft_over_dense_ms"] = r["ttft_ms"] - dense["ttft_ms"]
            r["ttft_over_dense_pct_prefill"] = 100 * r["ttft_over_dense_ms"] / dense["prefill_ms"]
    for r in res["rows"]:
        r.pop("tokens", None)
    res["total_s"] = time.perf_counter() - t0
    return res


def _parse_layers(layers, n: int) -> range:
    if isinstance(layers, range):
        return layers
    a, b = str(layers).split(":")
    return range(int(a) if a else 0, int(b) if b else n)


def environment(bandwidth: float | None = None) -> dict:
    import transformers

    props = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sms": props.multi_processor_count,
            "memory_gb": props.total_memory / 1e9, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9}


def run_suite(models, dtype=torch.bfloat16, betas=(0.2, 0.4, 0.6), new_tokens: int = 128, repeats: int = 3,
              layers=None, check: bool = True, profile_first: bool = True, ablation_first: bool = True,
              log=print, on_model=None, step: dict | None = None) -> dict:
    from .fastlm import check_device_dtype

    check_device_dtype("cuda", dtype)
    bw = copy_bandwidth()
    from .kernels import GEMV_ROWS_CONFIG

    result = {"env": environment(bw), "dtype": str(dtype).replace("torch.", ""), "new_tokens": new_tokens,
              "gemv_rows_config": list((step or {}).get("rows_config") or GEMV_ROWS_CONFIG), "step": step or {},
              "prompt_tokens": PROMPT_TOKENS, "repeats": repeats, "betas": list(betas), "models": []}
    log(f"env {result['env']}")
    for i, spec in enumerate(models):
        try:
            r = bench_model(spec, dtype, betas, new_tokens, repeats, bw, layers, check=check,
                            profile=profile_first and i == 0, ablation=ablation_first and i == 0, log=log,
                            step=step)
        except Exception as err:
            import traceback

            r = {"model": spec, "error": repr(err), "traceback": traceback.format_exc()}
            log(f"[{spec}] FAILED {err!r}")
        result["models"].append(r)
        _free()
        if on_model is not None:
            on_model(result)
    return result


def _f(v, fmt="{:.1f}"):
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def format_table(result: dict) -> str:
    env = result["env"]
    lines = [f"{env['device']} ({env['sms']} SMs), torch {env['torch']} (CUDA {env['cuda']}), transformers "
             f"{env['transformers']}; copy bandwidth {env['copy_bandwidth_gb_s']:.0f} GB/s (read+write); {result['dtype']}, "
             f"batch 1, {result['prompt_tokens']}-token prompt, {result['new_tokens']} new tokens, median of {result['repeats']}",
             "",
             "| model | path | kept | decode tok/s | roofline tok/s | % roofline | × HF decode | × HF static | "
             "× our dense | e2e tok/s | TTFT ms | TTFT − dense ms | TTFT − dense % dense prefill | prefill ms | "
             "select ms | gather ms | sel+gather % prefill | peak GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in result["models"]:
        if "error" in m:
            lines.append(f"| {m['model']} | FAILED: {m['error'][:80]} |" + " |" * 16)
            continue
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"| {m['model']} | {r['path']} β={r.get('beta')} FAILED: {r['error'][:60]} |" + " |" * 16)
                continue
            lines.append("| " + " | ".join([
                m["model"] + ("" if m["weights"] == "real" else "*"), r["path"], _f(r["kept_fraction"], "{:.2f}"),
                _f(r["decode_tok_s"]), _f(r.get("roofline_tok_s"), "{:.0f}"), _f(r.get("pct_roofline"), "{:.0f}%"),
                _f(r.get("x_hf_decode"), "{:.2f}"), _f(r.get("x_hf_static_decode"), "{:.2f}"),
                _f(r.get("x_dense_fast"), "{:.2f}"), _f(r["e2e_tok_s"]),
                _f(r["ttft_ms"]), _f(r.get("ttft_over_dense_ms")), _f(r.get("ttft_over_dense_pct_prefill"), "{:.1f}%"),
                _f(r["prefill_ms"]), _f(r["select_ms"]) + (" (in prefill)" if r.get("select_in_prefill") else ""),
                _f(r["gather_ms"], "{:.2f}"),
                _f(r.get("select_gather_pct_prefill"), "{:.0f}%"), _f(r["peak_mem_gb"], "{:.1f}")]) + " |")
    lines.append("")
    lines.append("\\* random weights in the model's published shape (built from its config, no download). "
                 "\"(in prefill)\": the captured prefill's graph selected the core sets itself (their device time is in "
                 "prefill ms; the sets are copied out after the decode).")
    return "\n".join(lines)


def main(args) -> int:
    """Entry point of ``coreinfer bench`` when the device is CUDA (see ``runtime/cli.py``).

    ``--model`` takes one spec, a comma-separated list, or ``suite`` (the issue's five models); shape
    names (``llama-3.1-8b``, ``llama-2-7b``, ``mistral-7b``, ``opt-6.7b``, ``smollm2-135m-shape``) build
    random-weight models of the published shape. ``--layers`` defaults to all layers sparse here.
    """
    from ..loading import resolve_dtype

    dtype = resolve_dtype(args.dtype, torch.device("cuda"))
    models = list(SUITE) if args.model == "suite" else [m.strip() for m in str(args.model).split(",") if m.strip()]
    result = run_suite(models, dtype=dtype, betas=tuple(args.beta), new_tokens=args.new_tokens, repeats=args.repeats,
                       layers=args.layers, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(result, indent=2, default=str) if args.json else format_table(result))
    return 0
