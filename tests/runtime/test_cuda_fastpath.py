"""The GPU fast path (coreinfer.runtime.cuda): its static-cache step against the Hugging Face model on CPU
(float32, tiny random models of each supported family), its bad-input errors, its roofline arithmetic;
and, on a CUDA machine only, the graph-captured bf16 step against the eager reference."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coreinfer.runtime.cuda import bench as cuda_bench  # noqa: E402
from coreinfer.runtime.cuda.fastlm import FastLM, FastPathError, FastWeights, check_device_dtype  # noqa: E402
from coreinfer.runtime.cuda.reference import EagerReference  # noqa: E402
from coreinfer.runtime.selection import kept_count  # noqa: E402

TOL = 1e-4  # float32, CPU


def _tiny(family: str, seed: int = 0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=97, max_position_embeddings=128)
    if family == "llama":  # Llama-3.1 style: GQA + llama3 RoPE scaling
        cfg = transformers.LlamaConfig(intermediate_size=160, num_key_value_heads=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **common)
    elif family == "mistral":  # sliding window shorter than the test sequences
        cfg = transformers.MistralConfig(intermediate_size=160, num_key_value_heads=1, sliding_window=9, **common)
    elif family == "qwen2":  # q/k/v biases, tied embeddings
        cfg = transformers.Qwen2Config(intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True, **common)
    elif family == "opt":
        cfg = transformers.OPTConfig(ffn_dim=160, word_embed_proj_dim=64, do_layer_norm_before=True, **common)
    else:
        raise AssertionError(family)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong norm/bias path cannot pass
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(n: int, seed: int, vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


FAMILIES = ["llama", "mistral", "qwen2", "opt"]


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_step_matches_hf(family):
    model = _tiny(family)
    prompt, cont = _ids(13, 1), _ids(8, 2)
    with torch.no_grad():
        ref = model(torch.cat([prompt, cont]).view(1, -1)).logits[0, prompt.numel() - 1:].float()
    fast = FastLM(FastWeights.from_hf(model), max_seq_len=40)
    got, core = fast.forced_logits(prompt, cont)
    assert core == {}
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_step_matches_eager_core_path(family):
    model = _tiny(family, seed=3)
    prompt, cont = _ids(17, 4), _ids(9, 5)
    weights = FastWeights.from_hf(model)  # read before the adapter changes the model's modules
    fast = FastLM(weights, max_seq_len=40, kept_fraction=0.3, sparse_layers=range(1, 3))
    assert fast.k_pad > fast.k  # 48 core neurons in 64 slots: the zero padding is exercised
    got, core = fast.forced_logits(prompt, cont)
    ref_model = EagerReference(model)
    ref, ref_core = ref_model.forced_logits(prompt, cont, kept_fraction=0.3, sparse_layers=range(1, 3))
    # the same selection (stability_select on the same activations) and the same logits
    assert sorted(core) == [1, 2] == sorted(ref_core)
    k = kept_count(0.3, weights.n_neurons)
    for li in core:
        assert core[li].numel() == k
        assert torch.equal(core[li].cpu(), ref_core[li].cpu())
    assert (got - ref).abs().max().item() <= TOL
    # and the compact FFN really changes the function (so the comparison above is not vacuous)
    dense, _ = ref_model.forced_logits(prompt, cont)
    assert (dense[1:] - ref[1:]).abs().max().item() > 100 * TOL


def test_second_prompt_reuses_buffers_and_matches():
    """The compact buffers are refilled in place per prompt; the results match a fresh instance."""
    model = _tiny("llama", seed=7)
    weights = FastWeights.from_hf(model)
    fast = FastLM(weights, max_seq_len=48, kept_fraction=0.5)
    addr = [b.data_ptr() for b in fast.c_up]
    fast.forced_logits(_ids(20, 8), _ids(5, 9))
    got, _ = fast.forced_logits(_ids(11, 10), _ids(6, 11))
    assert [b.data_ptr() for b in fast.c_up] == addr
    fresh, _ = FastLM(weights, max_seq_len=48, kept_fraction=0.5).forced_logits(_ids(11, 10), _ids(6, 11))
    assert torch.equal(got, fresh)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_greedy_generate_matches_hf_generate(family):
    model = _tiny(family, seed=12)
    prompt = _ids(10, 13)
    with torch.no_grad():
        hf = model.generate(prompt.view(1, -1), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                            pad_token_id=0)[0, prompt.numel():].tolist()
    out = FastLM(FastWeights.from_hf(model), max_seq_len=32).generate(prompt, 12)
    assert out.tokens == hf


def test_generate_stops_at_eos():
    model = _tiny("llama", seed=12)
    prompt = _ids(10, 13)
    fast = FastLM(FastWeights.from_hf(model), max_seq_len=32)
    full = fast.generate(prompt, 12).tokens
    eos = full[3]
    cut = fast.generate(prompt, 12, eos_token_id=eos).tokens
    assert cut == full[:full.index(eos) + 1]


def test_bad_inputs_raise_clear_errors():
    model = _tiny("llama")
    w = FastWeights.from_hf(model)
    fast = FastLM(w, max_seq_len=24, kept_fraction=0.4)
    with pytest.raises(FastPathError, match="exceeds the static KV cache"):
        fast.generate(_ids(20, 1), max_new_tokens=5)
    fast.generate(_ids(20, 1), max_new_tokens=4)  # exactly fits
    with pytest.raises(FastPathError, match="batch 1"):
        fast.generate(torch.zeros(2, 5, dtype=torch.long), 2)
    with pytest.raises(FastPathError, match="non-empty"):
        fast.generate([], 2)
    with pytest.raises(FastPathError, match="token ids must be in"):
        fast.generate([1, 2, 500], 2)
    with pytest.raises(FastPathError, match="max_new_tokens"):
        fast.generate([1, 2], 0)
    with pytest.raises(FastPathError, match="dtype"):
        check_device_dtype("cpu", torch.float64)
    with pytest.raises(FastPathError, match="cuda_graph=True"):
        FastLM(w, max_seq_len=24, cuda_graph=True)
    with pytest.raises(ValueError, match="kept_fraction"):
        FastLM(w, kept_fraction=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(FastPathError, match="no CUDA|is_available"):
            check_device_dtype("cuda", torch.bfloat16)
    opt = _tiny("opt")
    with pytest.raises(FastPathError, match="learned positions"):
        FastLM(FastWeights.from_hf(opt), max_seq_len=1000)


def test_attention_kernel_math_in_triton_interpreter():
    """The Triton decode kernels against plain PyTorch, run on CPU by Triton's interpreter (skips where triton
    is not installed): attention (RoPE, cache write, GQA, sliding window, split-KV softmax) and the GEMV
    (bias, fused activations, gate||up, ragged K)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, "-m", "coreinfer.runtime.cuda.interpreter_check"], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("ok") == 6 and "gemv ok" in r.stdout
    # the gather-free decode (indexed GEMVs, end to end on tiny models) and the selection kernels
    for line in ("gemv_rows passed", "residual norm + argmax passed", "select_kernels passed", "indexed decode passed"):
        assert line in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("every", [1, 2, 5])
def test_statistics_during_prefill_equal_batched_selection(every):
    """select_every: each group of sparse layers' statistics computed right after the group's prefill FFN gives
    exactly the core sets, and so the logits, of the one batched selection after the prefill (CPU, float32;
    groups of 1, 2 and one group larger than the 3 sparse layers)."""
    model = _tiny("llama", seed=21)
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(19, 22), _ids(7, 23)
    ref, core_ref = FastLM(weights, max_seq_len=40, kept_fraction=0.3).forced_logits(prompt, cont)
    fast = FastLM(weights, max_seq_len=40, kept_fraction=0.3, select_every=every)
    got, core = fast.forced_logits(prompt, cont)
    assert sorted(core) == [0, 1, 2]
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    assert torch.equal(got, ref)
    # given core sets skip the statistics and are used as they are
    given = {i: torch.arange(kept_count(0.3, weights.n_neurons)) for i in range(3)}
    _, used = fast.forced_logits(prompt, cont, core_sets=given)
    assert all(torch.equal(used[i].cpu(), given[i]) for i in used)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(FastPathError, match="select_every must be"):
            FastLM(weights, kept_fraction=0.3, select_every=bad)


def test_selection_ttft_measure_runs_and_compares_like_with_like():
    """The GPU session's TTFT comparison (device_check.selection_ttft) on CPU: every configuration timed, the
    three sparse ones choosing identical core sets, the extra time reported against the dense prefill."""
    from coreinfer.runtime.cuda.device_check import selection_ttft

    weights = FastWeights.from_hf(_tiny("llama", seed=31))
    out = selection_ttft(weights, _ids(24, 32), rounds=2, log=lambda s: None)
    assert out["identical_core_sets"] is True
    for name in ("batched", "select-every-8", "select-every-4"):
        r = out[name]
        assert r["ttft_ms"] > 0 and r["prefill_ms"] > 0
        assert r["ttft_over_dense_ms"] == r["ttft_ms"] - out["dense"]["ttft_ms"]
        assert r["pct_of_dense_prefill"] == pytest.approx(100 * r["ttft_over_dense_ms"] / out["dense"]["prefill_ms"])


def test_triton_attention_refused_on_cpu():
    w = FastWeights.from_hf(_tiny("llama"))
    with pytest.raises(FastPathError, match="pdl=True needs"):
        FastLM(w, pdl=True)
    with pytest.raises(FastPathError, match="fused_norm=True needs"):
        FastLM(w, fused_norm=True)
    with pytest.raises(FastPathError, match="fused_ffn=True needs"):
        FastLM(w, kept_fraction=0.4, fused_ffn=True)
    with pytest.raises(FastPathError, match="ffn_norm_in=True needs"):
        FastLM(w, kept_fraction=0.4, ffn_norm_in=True)
    dense = FastLM(w, fused_ffn=True, ffn_norm_in=True)  # no sparse layer: nothing to fuse, no error
    assert not dense.fused_ffn and not dense.ffn_norm_in
    with pytest.raises(FastPathError, match="attention='triton' needs a CUDA device"):
        FastLM(w, attention="triton")
    with pytest.raises(FastPathError, match="gemv='triton' needs a CUDA device"):
        FastLM(w, gemv="triton")
    fast = FastLM(w)
    assert fast.attention == "sdpa" and fast.gemv == "torch"


def test_unsupported_architecture_is_refused():
    cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, vocab_size=50)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(FastPathError, match="supports model types"):
        FastWeights.from_hf(model)


def test_bytes_per_token_by_hand():
    model = _tiny("llama")
    w = FastWeights.from_hf(model)
    H, I, L, V, nh, nkv, hd, b = 64, 160, 3, 97, 4, 2, 16, 4
    attn = L * (H * (nh + 2 * nkv) * hd + H * nh * hd + 2 * H) * b
    ffn = L * 3 * H * I * b
    other = (H + V * H + H) * b  # final norm, lm_head, one embedding row
    assert w.bytes_per_token() == attn + ffn + other
    k = kept_count(0.4, I)
    assert w.bytes_per_token(k) == attn + L * 3 * H * k * b + other
    assert w.bytes_per_token(k, range(1, 3)) == attn + (2 * 3 * H * k + 3 * H * I) * b + other
    fast = FastLM(w, max_seq_len=16, kept_fraction=0.4, sparse_layers=range(1, 3))
    assert fast.bytes_per_token() == w.bytes_per_token(k, range(1, 3))
    assert fast.kept_fraction_overall() == pytest.approx((2 * k + I) / (3 * I))
    # roofline: bytes / (bytes per second)
    assert cuda_bench.roofline_tok_s(fast.bytes_per_token(), 2.0e12) == pytest.approx(2.0e12 / fast.bytes_per_token())
    # the published shapes' weight bytes per token (bf16), by hand: Llama-3.1-8B reads all 8.03 B parameters
    # except the 128256 x 4096 embedding table (one row of it): 7.505 B parameters = 15.01 GB
    H, I, L, V = 4096, 14336, 32, 128256
    by_hand = 2 * (L * (H * 6144 + H * H + 2 * H + 3 * H * I) + H + V * H + H)
    assert cuda_bench.shape_bytes_per_token("llama-3.1-8b", 2) == by_hand == pytest.approx(15.01e9, rel=1e-3)
    k = kept_count(0.4, I)
    assert cuda_bench.shape_bytes_per_token("llama-3.1-8b", 2, 0.4) == by_hand - 2 * L * 3 * H * (I - k)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_shape_bytes_formula_matches_built_model(family, monkeypatch):
    """The config-only byte count used for the published shapes equals the count over real tensors."""
    model = _tiny(family)
    cfg = model.config
    if family == "opt":
        kw = dict(hidden_size=64, ffn_dim=160, num_hidden_layers=3, num_attention_heads=4, vocab_size=97)
    else:
        kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=cfg.num_key_value_heads, vocab_size=97)
    monkeypatch.setitem(cuda_bench.SHAPES, "tiny", (family, kw))
    w = FastWeights.from_hf(model)
    for beta in (None, 0.2, 0.4):
        k = None if beta is None else kept_count(beta, 160)
        assert cuda_bench.shape_bytes_per_token("tiny", 4, beta) == w.bytes_per_token(k)


# ---------------------------------------------------------------------------------------------- CUDA


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_step_matches_eager_reference_bf16(family, attention):
    model = _tiny(family, seed=21, dtype=torch.bfloat16, device="cuda")
    prompt, cont = _ids(33, 22), _ids(70, 23)  # 103 positions: several key blocks; past Mistral's window of 9
    weights = FastWeights.from_hf(model)
    fast = FastLM(weights, max_seq_len=128, kept_fraction=0.4, attention=attention,
                  gemv="triton" if attention == "triton" else "torch")
    assert fast.cuda_graph and fast.attention == attention
    got, core = fast.forced_logits(prompt, cont)
    ref, _ = EagerReference(model).forced_logits(prompt, cont, kept_fraction=0.4, core_sets=core)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_cuda_graph_equals_eager_fast_step(attention):
    model = _tiny("llama", seed=31, dtype=torch.bfloat16, device="cuda")
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(20, 32), _ids(10, 33)
    graph, core = FastLM(weights, max_seq_len=40, kept_fraction=0.5, compile_elementwise=False,
                         attention=attention).forced_logits(prompt, cont)
    eager, _ = FastLM(weights, max_seq_len=40, kept_fraction=0.5, cuda_graph=False, compile_elementwise=False,
                      attention=attention).forced_logits(prompt, cont, core_sets=core)
    assert torch.equal(graph, eager)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_selection_kernels_equal_cpu_definition(dtype):
    """The Triton statistics (sync-free) give the CPU's core sets exactly: counts, float64 sums, sets."""
    from coreinfer.runtime.selection import layer_statistics, stability_select_layers

    g = torch.Generator().manual_seed(5)
    acts = torch.randn(4, 96, 1000, generator=g).to(dtype)
    acts[1] = (acts[1] * 2).round() / 2  # ties
    for score in ("positive", "magnitude"):
        c_gpu, s_gpu = layer_statistics(acts.cuda(), 0.4, score)
        c_cpu, s_cpu = layer_statistics(acts, 0.4, score)
        assert torch.equal(c_gpu.cpu(), c_cpu) and torch.equal(s_gpu.cpu(), s_cpu)
        assert torch.equal(stability_select_layers(acts.cuda(), 0.4, 0.4, score).cpu(),
                           stability_select_layers(acts, 0.4, 0.4, score))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_gather_free_decode_equals_gathered(family):
    """The gather-free step (core rows read in place) against the gathered compact buffers, same core sets."""
    model = _tiny(family, seed=41, dtype=torch.bfloat16, device="cuda")
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(30, 42), _ids(20, 43)
    free = FastLM(weights, max_seq_len=64, kept_fraction=0.4, gemv="triton")
    assert free.indexed and all(b is None for b in free.c_up)
    got, core = free.forced_logits(prompt, cont)
    ref, core_ref = FastLM(weights, max_seq_len=64, kept_fraction=0.4, gemv="torch").forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_no_gpu_dtype_and_cache_errors_on_cuda():
    model = _tiny("llama", seed=1, dtype=torch.bfloat16, device="cuda")
    fast = FastLM(FastWeights.from_hf(model), max_seq_len=16, kept_fraction=0.4)
    with pytest.raises(FastPathError, match="exceeds the static KV cache"):
        fast.generate(_ids(10, 1), max_new_tokens=7)
    with pytest.raises(FastPathError, match="CUDA device"):
        check_device_dtype(f"cuda:{torch.cuda.device_count()}", torch.bfloat16)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pdl", [False, True])
def test_cuda_last_program_reductions_match_torch(pdl):
    """Residual add + RMSNorm over split partial rows and argmax + counters: many programs per launch, the last
    one finishing the reduction (atomics), back to back (with PDL: overlapping launches), eager and in a graph."""
    from coreinfer.runtime.cuda import kernels
    from coreinfer.runtime.cuda.fastlm import rms_norm

    if pdl and not kernels.pdl_supported():
        pytest.skip("programmatic dependent launch needs compute capability >= 9.0")
    H, V, dt = 4096, 128256, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    scratch = kernels.StepScratch(H, V, "cuda")
    wn = (1 + 0.1 * torch.randn(H, device="cuda", generator=g)).to(dt)
    x0 = torch.randn(H, device="cuda", generator=g).to(dt)
    part = torch.randn(10 * 8, H, device="cuda", generator=g)
    bias = torch.randn(H, device="cuda", generator=g).to(dt)
    logits = torch.randn(6, V, device="cuda", generator=g).to(dt)
    logits[2, 7] = logits[2, 90000] = logits[2].max() + 1  # a tie: the first index, as torch.argmax

    def run():
        xs, hs = [], []
        x = x0
        for i in range(10):
            x, h = kernels.residual_rms_norm(x, part[8 * i:8 * i + 8], wn, 1e-5, scratch, bias, pdl=pdl)
            xs.append(x)
            hs.append(h)
        x, h = kernels.residual_rms_norm(x, hs[-1], wn, 1e-5, scratch, pdl=pdl)  # a vector y
        xs.append(x)
        hs.append(h)
        tok, pos, step = (torch.zeros(1, dtype=torch.long, device="cuda"), torch.full((1,), 5, device="cuda"),
                          torch.zeros(1, dtype=torch.long, device="cuda"))
        out = torch.zeros(8, dtype=torch.long, device="cuda")
        for row in logits:
            kernels.argmax_step(row, tok, pos, step, out, scratch, pdl=pdl)
        return xs, hs, out, pos, step

    xs, hs, out, pos, step = run()
    x = x0
    for i in range(11):
        if i < 10:
            acc = part[8 * i].clone()
            for r in range(1, 8):
                acc += part[8 * i + r]
            y = (acc + bias.float()).to(dt)
        else:
            y = hs[9]
        x = x + y
        assert torch.equal(xs[i], x), i
        ref = rms_norm(x, wn, 1e-5).float()
        assert ((hs[i].float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all(), i
    assert out[:6].tolist() == logits.float().argmax(-1).tolist() and int(out[2]) == 7
    assert int(pos) == 11 and int(step) == 6 and int(scratch.counts.abs().sum()) == 0
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(static[0] + static[1], xs + hs))
        assert torch.equal(static[2], out)


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_pdl_step_equals_plain_step():
    """The default CUDA step (PDL launches, fused residual+RMSNorm summing the split down product's partial rows,
    fused argmax) and the opt-in one-launch core FFN (with and without the norm inside it) against the plain
    step, float32, on a model wide enough for several programs per reduction."""
    torch.manual_seed(7)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=5000, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).cuda().eval()
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(40, 71, 5000), _ids(12, 72, 5000)
    fused = FastLM(weights, max_seq_len=64, kept_fraction=0.4)
    assert fused.fused_norm and fused.indexed and not fused.fused_ffn
    plain = FastLM(weights, max_seq_len=64, kept_fraction=0.4, pdl=False, fused_norm=False)
    assert not plain.fused_ffn
    got, core = fused.forced_logits(prompt, cont)
    ref, core_ref = plain.forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    assert (got - ref).abs().max().item() < 1e-3
    assert fused.generate(prompt, 12).tokens == plain.generate(prompt, 12).tokens
    for opts in ({"fused_ffn": True}, {"fused_ffn": True, "ffn_norm_in": False}):  # norm inside the FFN; before it
        one = FastLM(weights, max_seq_len=64, kept_fraction=0.4, **opts)
        assert one.fused_ffn and one.ffn_norm_in == opts.get("ffn_norm_in", True)
        got2, core2 = one.forced_logits(prompt, cont)
        assert all(torch.equal(core2[i], core_ref[i]) for i in core2)
        assert (got2 - ref).abs().max().item() < 1e-3, opts
        assert one.generate(prompt, 12).tokens == plain.generate(prompt, 12).tokens, opts


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("every", [1, 3, 8])
def test_cuda_statistics_during_prefill_equal_batched_selection(every):
    """select_every launches the selection kernels group by group inside the prefill: the same core sets and
    tokens as the one batched selection after it, in bf16 on the device."""
    model = _tiny("llama", seed=44, dtype=torch.bfloat16, device="cuda")
    weights = FastWeights.from_hf(model)
    prompt = _ids(30, 45)
    ref = FastLM(weights, max_seq_len=64, kept_fraction=0.4).generate(prompt, 10)
    got = FastLM(weights, max_seq_len=64, kept_fraction=0.4, select_every=every).generate(prompt, 10)
    assert all(torch.equal(got.core_sets[i], ref.core_sets[i]) for i in ref.core_sets)
    assert got.tokens == ref.tokens


# ---------------------------------------------------------------------------------------------- SparseLM hook


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "reglu", "drelu"])
def test_hook_answers_like_sparselm_eager(family, tokenizer):
    """``cuda.hook.fast_generate`` (what SparseLM.generate calls on CUDA), forced on CPU, returns what the
    eager SparseLM path returns: tokens, text, core sets, kept fraction, FFN bytes."""
    from coreinfer.runtime.cuda.hook import fast_generate
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm(family, tokenizer, seed=5)
    prompt = "Write a short poem about the sea and the wind"
    for method, layers in (("dense", None), ("stability", "1:3"), ("stability", "0:4")):
        lay = lm.resolve_layers(layers)
        ref = lm.generate(prompt, method=method, beta=0.3, layers=layers, max_new_tokens=10, score="positive")
        got = fast_generate(lm, prompt, method, 0.4, 0.3, lay, 10, "positive", False, {}, force=True)
        assert got is not None
        assert got.token_ids == ref.token_ids and got.text == ref.text
        assert got.stats.stop_reason == ref.stats.stop_reason
        assert got.stats.kept_fraction == pytest.approx(ref.stats.kept_fraction)
        assert got.stats.ffn_bytes_per_token == ref.stats.ffn_bytes_per_token
        assert sorted(got.core_sets) == sorted(ref.core_sets)
        for i in got.core_sets:
            assert torch.equal(got.core_sets[i].cpu(), ref.core_sets[i].cpu())
    # what the fast path does not cover goes to the eager path
    assert fast_generate(lm, prompt, "stability", 0.4, 0.3, lm.resolve_layers(None), 4, "positive", False,
                         {"do_sample": True}, force=True) is None
    assert fast_generate(lm, prompt, "stability", 0.4, 0.3, lm.resolve_layers(None), 4, "positive", False, {}) is None


def test_hook_leaves_unsupported_architectures_to_the_eager_path(tokenizer):
    from coreinfer.runtime.cuda.hook import fast_generate
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm("gemma", tokenizer)
    assert fast_generate(lm, "hello there", "dense", 0.4, 0.4, lm.resolve_layers(None), 4, "positive", False, {},
                         force=True) is None
