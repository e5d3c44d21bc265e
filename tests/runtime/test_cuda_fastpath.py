"""The GPU fast path (coreinfer.runtime.cuda): its static-cache step against the Hugging Face model on CPU
(float32, tiny random models of each supported family), its bad-input errors, its roofline arithmetic;
and, on a CUDA machine only, the graph-captured bf16 step against the eager reference."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coreinfer.runtime.cuda import bench as cuda_bench  # noqa: E402
from coreinfer.runtime.cuda.bench import step_variant  # noqa: E402
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
    assert fast.k_pad[1] > fast.k  # 48 core neurons in 64 slots: the zero padding is exercised
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


def test_per_layer_core_set_sizes(tokenizer):
    """A calibrated budget (``layer_k``, a different k per layer, a dense layer between sparse ones): each layer
    selects what a uniform-k selection of that size selects, and the logits equal the eager adapter path given
    those sets (gathered buffers here; the gather-free kernels: benchmarks/interpreter_check.py, GPU tests)."""
    from coreinfer.runtime.session import CoreSetSession
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm("llama", tokenizer, seed=17)
    weights = FastWeights.from_hf(lm.model, adapter=lm.adapter)
    ids = lm.encode("Per-layer budgets keep more neurons where a layer needs them")
    layer_k = {0: 30, 2: 101, 3: 7}
    fast = FastLM(weights, max_seq_len=96, layer_k=layer_k)
    assert fast.uniform_k is None and fast.k == 101 and list(fast.sparse_layers) == [0, 2, 3]
    gen = fast.generate(ids[0], 6, keep_logits=True)
    for li, k in layer_k.items():
        one = FastLM(weights, max_seq_len=96, kept_fraction=k / weights.n_neurons, sparse_layers=range(li, li + 1))
        assert gen.core_sets[li].numel() == k
        assert torch.equal(gen.core_sets[li], one.generate(ids[0], 1).core_sets[li])
    session = CoreSetSession(fast.sparse_layers, None, core_sets=gen.core_sets)
    ref = lm.score_ids(ids, gen.tokens, "similarity", 0.4, 0.4, range(0, 4), session=session, keep_logprobs=True)
    assert (torch.stack(gen.logits).log_softmax(-1) - ref.logprobs).abs().max().item() < 1e-4
    n, i = weights.n_neurons, len(weights.layers)
    assert fast.kept_fraction_overall() == pytest.approx((30 + 101 + 7 + (i - 3) * n) / (i * n))
    for bad, words in (({0: 0}, "outside 1.."), ({9: 3}, "names layer 9"), ({}, "names no sparse layer")):
        with pytest.raises(FastPathError, match=words):
            FastLM(weights, layer_k=bad)
    with pytest.raises(FastPathError, match="either layer_k or kept_fraction"):
        FastLM(weights, layer_k={0: 3}, kept_fraction=0.5)


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


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_prefill_equals_the_prompt_alone(family):
    """What the captured prefill runs (CUDA): the prompt padded to its length bucket, logits of its last real
    position, activations into the first rows of a longer buffer. Here eagerly, against the prompt alone: same
    logits, cache rows and activations (causal attention keeps the padding out; Mistral's window of 9 too)."""
    from coreinfer.runtime.cuda.fastlm import PREFILL_BUCKET

    weights = FastWeights.from_hf(_tiny(family, seed=61))
    fast = FastLM(weights, max_seq_len=2 * PREFILL_BUCKET, kept_fraction=0.4)
    assert not fast.prefill_graph  # CPU: no graph; the padded forward alone
    T, n = 21, PREFILL_BUCKET
    prompt = _ids(T, 62)
    with torch.no_grad():
        want, want_acts = fast._prefill_forward(prompt, select=True)
        want_k = [c[:, :, :T].clone() for c in fast.k_cache]
        padded = torch.cat([prompt, torch.zeros(n - T, dtype=torch.long)])
        buf = torch.full((len(fast.sparse_layers), n + 5, weights.n_neurons), float("nan"))
        got, acts = fast._prefill_forward(padded, select=True, last=torch.tensor([T - 1]), acts=buf[:, :n])
    assert (got - want).abs().max().item() < TOL
    assert acts.data_ptr() == buf.data_ptr() and (acts[:, :T] - want_acts).abs().max().item() < TOL
    assert all((c[:, :, :T] - k).abs().max().item() < TOL for c, k in zip(fast.k_cache, want_k))
    assert torch.isnan(buf[:, n:]).all()  # nothing written past the bucket


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
        step_variant(w, {"cuda_graph": True}, max_seq_len=24)
    with pytest.raises(ValueError, match="kept_fraction"):
        FastLM(w, kept_fraction=1.5)
    if not torch.cuda.is_available():
        with pytest.raises(FastPathError, match="no CUDA|is_available"):
            check_device_dtype("cuda", torch.bfloat16)
    opt = _tiny("opt")
    with pytest.raises(FastPathError, match="learned positions"):
        FastLM(FastWeights.from_hf(opt), max_seq_len=1000)


def test_compact_pays_interpolates_the_measured_crossovers():
    """The crossover table read by hand: linear between its points, along its end segments outside them, at
    least one token; the product's table grows with the kept fraction (the gather grows, the gain shrinks)."""
    from coreinfer.runtime.cuda.fastlm import COMPACT_GIVEN_MIN_TOKENS, compact_pays

    table = ((0.2, 10), (0.4, 30), (0.6, 70))
    for kept, need in ((0.2, 10), (0.3, 20), (0.4, 30), (0.5, 50), (0.6, 70), (0.7, 90), (0.1, 1), (0.0, 1)):
        assert compact_pays(kept, need, table) and (need == 1 or not compact_pays(kept, need - 1, table)), kept
    assert not compact_pays(0.45, 39, table) and compact_pays(0.45, 40, table)
    fractions = [f for f, _ in COMPACT_GIVEN_MIN_TOKENS]
    needs = [n for _, n in COMPACT_GIVEN_MIN_TOKENS]
    assert fractions == sorted(fractions) and needs == sorted(needs)


def test_triton_attention_refused_on_cpu():
    w = FastWeights.from_hf(_tiny("llama"))
    with pytest.raises(FastPathError, match="pdl=True needs"):
        step_variant(w, {"pdl": True})
    with pytest.raises(FastPathError, match="pdl=True needs"):
        step_variant(w, {"pdl_trigger": "entry"})
    with pytest.raises(FastPathError, match="pdl_trigger must be 'wait' or 'entry'"):
        step_variant(w, {"pdl_trigger": "early"})
    with pytest.raises(FastPathError, match="fused_norm=True needs"):
        step_variant(w, {"fused_norm": True})
    with pytest.raises(FastPathError, match="attention='triton' needs a CUDA device"):
        step_variant(w, {"attention": "triton"})
    with pytest.raises(FastPathError, match="gemv='triton' needs a CUDA device"):
        step_variant(w, {"gemv": "triton"})
    with pytest.raises(FastPathError, match="fold_norm=True needs the fused residual"):
        step_variant(w, {"fold_norm": True}, kept_fraction=0.4)
    with pytest.raises(FastPathError, match="compact_given=True needs the gather-free sparse step on a CUDA"):
        step_variant(w, {"compact_given": True}, kept_fraction=0.4)
    with pytest.raises(FastPathError, match=r"prefill_graph=True needs cuda_graph"):
        step_variant(w, {"prefill_graph": True})
    with pytest.raises(FastPathError, match="select_in_prefill=True needs the gather-free sparse step"):
        step_variant(w, {"select_in_prefill": True}, kept_fraction=0.4)
    with pytest.raises(FastPathError, match=r"unknown decode-step choices \['fused_ffn'\]"):
        step_variant(w, {"fused_ffn": True})
    with pytest.raises(TypeError):  # the product class builds the device's default step: no such options
        FastLM(w, pdl=False)
    fast = FastLM(w)
    assert fast.attention == "sdpa" and fast.gemv == "torch" and not fast.fused_norm and not fast.cuda_graph
    assert not fast.prefill_graph and not fast.generate(_ids(5, 1), 2, timing=True).timings["prefill_graph"]


def test_bench_table_rows_line_up_and_name_the_selection_in_the_prefill():
    """``coreinfer bench``'s table: every row (errors too) has the header's cells; a row whose selection ran
    inside the captured prefill says so by its select time; TTFT over dense as a share of its prefill."""
    base = dict(kept_fraction=0.4, decode_tok_s=400.0, roofline_tok_s=500.0, pct_roofline=80.0, e2e_tok_s=300.0,
                ttft_ms=11.0, prefill_ms=10.8, select_ms=0.02, gather_ms=0.0, peak_mem_gb=17.0)
    env = {"device": "GPU", "sms": 132, "torch": "2.11", "cuda": "13", "transformers": "5",
           "copy_bandwidth_gb_s": 4200.0}
    rows = [{**base, "path": "fast-sparse", "select_in_prefill": True, "ttft_over_dense_ms": 0.4,
             "ttft_over_dense_pct_prefill": 100 * 0.4 / 10.4},
            {**base, "path": "fast-sparse-select-after-prefill", "select_ms": 1.4, "select_in_prefill": False},
            {"path": "fast-dense", "beta": None, "error": "RuntimeError('x')"}]
    result = {"env": env, "dtype": "bfloat16", "prompt_tokens": 256, "new_tokens": 128, "repeats": 3,
              "models": [{"model": "llama-3.1-8b", "weights": "random", "rows": rows}, {"model": "m2", "error": "E"}]}
    lines = [ln for ln in cuda_bench.format_table(result).splitlines() if ln.startswith("|")]
    cells = [ln.count("|") for ln in lines]
    assert len(lines) == 6 and len(set(cells)) == 1, cells
    inside, after = (ln.split(" | ") for ln in lines[2:4])
    col = lines[0].split(" | ").index("select ms")
    assert inside[col] == "0.0 (in prefill)" and after[col] == "1.4"
    pct = lines[0].split(" | ").index("TTFT − dense % dense prefill")
    assert inside[pct] == "3.8%" and after[pct] == "—"  # 0.4 ms over the dense row's 10.4 ms prefill; none given


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
    attn = L * (H * (nh + 2 * nkv) * hd + H * nh * hd) * b  # the two norm weights: folded into qkv / gate||up
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
    by_hand = 2 * (L * (H * 6144 + H * H + 3 * H * I) + H + V * H + H)  # (norm weights folded into the products)
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
@pytest.mark.parametrize("attention", ["triton", "sdpa", "triton-16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_graph_step_matches_eager_reference_bf16(family, attention):
    model = _tiny(family, seed=21, dtype=torch.bfloat16, device="cuda")
    prompt, cont = _ids(33, 22), _ids(70, 23)  # 103 positions: past Mistral's window of 9
    weights = FastWeights.from_hf(model)
    step = {"attention": attention, "gemv": "triton" if attention == "triton" else "torch"}
    if attention == "triton-16":  # 16 keys per program: several key blocks, their partials merged
        step = {"attention": "triton", "gemv": "triton", "attention_block": 16}
        attention = "triton"
    fast = step_variant(weights, step, max_seq_len=128, kept_fraction=0.4)
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
    graph, core = step_variant(weights, {"compile_elementwise": False, "attention": attention, "prefill_graph": False},
                               max_seq_len=40, kept_fraction=0.5).forced_logits(prompt, cont)
    eager, _ = step_variant(weights, {"cuda_graph": False, "compile_elementwise": False, "attention": attention},
                            max_seq_len=40, kept_fraction=0.5).forced_logits(prompt, cont, core_sets=core)
    assert torch.equal(graph, eager)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 96, 1000), (2, 24, 14336)])
def test_cuda_selection_kernels_equal_cpu_definition(dtype, shape):
    """The Triton statistics (sync-free) give the CPU's core sets exactly: counts, float64 sums, sets (a small
    FFN, and Llama-3.1-8B's 14336 neurons: one 16384-wide block per token, the threshold's bisection over it)."""
    from coreinfer.runtime.selection import layer_statistics, stability_select_layers

    g = torch.Generator().manual_seed(5)
    acts = torch.randn(*shape, generator=g).to(dtype)
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
    free = FastLM(weights, max_seq_len=64, kept_fraction=0.4)
    assert free.gemv == "triton" and free.indexed and all(b is None for b in free.c_up)
    got, core = free.forced_logits(prompt, cont)
    ref, core_ref = step_variant(weights, {"gemv": "torch"}, max_seq_len=64, kept_fraction=0.4).forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("layer_k", [None, {0: 33, 2: 101}])
def test_cuda_compact_triton_step_equals_gathered_cublas(layer_k):
    """The benchmark variant ``gather_free=False`` (compact buffers, Triton GEMVs: the down product a plain GEMV
    over the gathered (H, k) columns) against the cuBLAS step on the same buffers, float32, same core sets."""
    model = _tiny("llama", seed=44, device="cuda")
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(20, 46), _ids(8, 47)
    kw = {"layer_k": layer_k} if layer_k else {"kept_fraction": 0.4}
    compact = step_variant(weights, {"gather_free": False}, max_seq_len=64, **kw)
    assert compact.gemv == "triton" and not compact.indexed and compact._partial is None
    got, core = compact.forced_logits(prompt, cont)
    ref, core_ref = step_variant(weights, {"gemv": "torch", "attention": "sdpa", "pdl": False, "cuda_graph": False},
                                 max_seq_len=64, **kw).forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    assert (got - ref).abs().max().item() < 1e-3
    with pytest.raises(FastPathError, match="gather_free=True needs a sparse step"):
        step_variant(weights, {"gather_free": True}, max_seq_len=64)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("step", [{}, {"gather_free": False}, {"fold_norm": False}])
@pytest.mark.parametrize("kept", [None, 0.4, {0: 33, 2: 101}])
def test_cuda_folded_norm_step_equals_plain_step(family, step, kept):
    """The default step (``fold_norm``: no residual + RMSNorm launches; the norm weights folded into the qkv /
    gate||up weights, rstd computed by each GEMV program from its raw input, the residual added in the o / down
    epilogue), with compact buffers, and the step with its norm launches, against the cuBLAS step, float32, in the
    captured graph; the same core sets. (The cuBLAS step itself is checked against Hugging Face elsewhere.)"""
    if kept is None and "gather_free" in step:
        pytest.skip("gather_free concerns sparse steps only")
    model = _tiny(family, seed=48, device="cuda")
    weights = FastWeights.from_hf(model)
    assert all(lw.norm1_w is None and lw.norm2_w is None for lw in weights.layers)
    prompt, cont = _ids(20, 49), _ids(8, 50)
    kw = {"layer_k": kept} if isinstance(kept, dict) else {"kept_fraction": kept}
    folded = step_variant(weights, step, max_seq_len=64, **kw)
    assert folded.fold_norm == (step.get("fold_norm") is not False) and folded.cuda_graph
    got, core = folded.forced_logits(prompt, cont)
    ref, core_ref = step_variant(weights, {"gemv": "torch", "attention": "sdpa", "pdl": False, "cuda_graph": False},
                                 max_seq_len=64, **kw).forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    assert (got - ref).abs().max().item() < 1e-3
    gen = folded.generate(prompt, 12)  # the graph replayed: the same tokens as the reference's greedy decode
    want = step_variant(weights, {"gemv": "torch", "attention": "sdpa", "pdl": False, "cuda_graph": False},
                        max_seq_len=64, **kw).generate(prompt, 12, core_sets=gen.core_sets or None)
    assert gen.tokens == want.tokens
    with pytest.raises(FastPathError, match="fold_norm=True needs"):
        step_variant(FastWeights.from_hf(_tiny("opt", seed=1, device="cuda")), {"fold_norm": True}, max_seq_len=64)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kept", [0.4, {0: 33, 2: 101}])
@pytest.mark.parametrize("fold", [False, True])
def test_cuda_compact_given_decodes_like_gather_free(kept, fold):
    """``compact_given=True``: a call given its core sets decodes from compact buffers gathered on a second
    stream under the prefill; a call that selects its own reads the core rows in place. Both against the
    gather-free step given the same sets, float32, one instance switching between them."""
    from coreinfer.runtime.cuda.fastlm import Sampling

    model = _tiny("qwen2", seed=52, device="cuda")
    weights = FastWeights.from_hf(model)
    kw = {"layer_k": kept} if isinstance(kept, dict) else {"kept_fraction": kept}
    hybrid = step_variant(weights, {"fold_norm": fold, "compact_given": True}, max_seq_len=64, **kw)
    plain = step_variant(weights, {"compact_given": False, "fold_norm": fold}, max_seq_len=64, **kw)
    assert hybrid.compact_given and hybrid.indexed and all(b is None for b in hybrid.c_up)
    p1, p2, cont = _ids(20, 53), _ids(17, 54), _ids(8, 55)
    sets = plain.generate(p2, 1).core_sets  # another prompt's selection: the "calibrated" sets of these calls
    got, core = hybrid.forced_logits(p1, cont, core_sets=sets)
    assert all(hybrid.c_up[li] is not None for li in hybrid.sparse_layers)
    ref, _ = plain.forced_logits(p1, cont, core_sets=sets)
    assert all(torch.equal(core[li], sets[li]) for li in sets)
    assert (got - ref).abs().max().item() < 1e-3
    s = Sampling(temperature=0.8, top_k=20, seed=3)
    for kwargs in ({}, {"sampling": s}, {"sparse_prefill": True, "sampling": s}):
        a = hybrid.generate(p1, 12, core_sets=sets, timing=True, keep_logits=True, **kwargs)
        b = plain.generate(p1, 12, core_sets=sets, keep_logits=True, **kwargs)
        assert a.tokens == b.tokens, kwargs
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) < 1e-3
        assert a.timings["gather_side_ms"] > 0
        # its own selection: the core rows in place again (the same tokens as the plain step's)
        own = {k: v for k, v in kwargs.items() if k != "sparse_prefill"}
        assert hybrid.generate(p2, 12, **own).tokens == plain.generate(p2, 12, **own).tokens
    other = plain.generate(p1, 1).core_sets  # new sets: the compact buffers are gathered again
    assert hybrid.generate(p2, 12, core_sets=other).tokens == plain.generate(p2, 12, core_sets=other).tokens


@pytest.mark.gpu
@needs_cuda
def test_cuda_default_compacts_only_calls_long_enough():
    """By default a call given its core sets gathers compact buffers only when it asks for at least
    ``compact_pays``'s number of new tokens; both kinds decode the tokens of the gather-free step."""
    from coreinfer.runtime.cuda.fastlm import compact_pays

    weights = FastWeights.from_hf(_tiny("llama", seed=56, device="cuda"))
    auto = FastLM(weights, max_seq_len=160, kept_fraction=0.4)
    plain = step_variant(weights, {"compact_given": False}, max_seq_len=160, kept_fraction=0.4)
    assert auto.compact_given is None and auto.indexed
    kept = auto.k / weights.n_neurons
    short = next(n for n in range(1, 130) if compact_pays(kept, n)) - 1
    assert 1 <= short < 120
    p1, p2 = _ids(20, 57), _ids(15, 58)
    sets = plain.generate(p2, 1).core_sets
    for n, compact in ((short, False), (short + 1, True), (short, False)):
        got = auto.generate(p1, n, core_sets=sets, timing=True)
        assert got.timings["compact"] is compact and ("gather_side_ms" in got.timings) is compact
        assert got.tokens == plain.generate(p1, n, core_sets=sets).tokens
    assert all(auto.c_up[li] is not None for li in auto.sparse_layers)
    assert not auto.generate(p1, short + 1, timing=True).timings["compact"]  # its own selection: never


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_captured_prefill_equals_eager_prefill(family):
    """The prefill replayed from the graph of its length bucket against the eager prefill, float32: the same
    core sets and logits, for prompts in two buckets and at a bucket's edge, one instance switching between
    them (the activation buffer grows: the smaller bucket's graph is captured again), and with core sets
    given before a sparse prefill. Past ``PREFILL_GRAPH_MAX`` tokens the prefill is eager."""
    from coreinfer.runtime.cuda.fastlm import PREFILL_GRAPH_MAX

    weights = FastWeights.from_hf(_tiny(family, seed=71, device="cuda"))
    longest = 128 if family == "opt" else PREFILL_GRAPH_MAX + 40  # OPT: the tiny model's 128 learned positions
    graphed = FastLM(weights, max_seq_len=longest, kept_fraction=0.4)
    eager = step_variant(weights, {"prefill_graph": False}, max_seq_len=longest, kept_fraction=0.4)
    assert graphed.prefill_graph and not eager.prefill_graph
    cont = _ids(6, 72)
    for T in (20, 64, 70, 20):
        prompt = _ids(T, 73 + T)
        got, core = graphed.forced_logits(prompt, cont)
        ref, core_ref = eager.forced_logits(prompt, cont)
        assert all(torch.equal(core[li], core_ref[li]) for li in core), T
        assert (got - ref).abs().max().item() < 1e-3, T
        a = graphed.generate(prompt, 8, timing=True)
        assert a.timings["prefill_graph"] and a.tokens == eager.generate(prompt, 8).tokens, T
        b = graphed.generate(prompt, 8, core_sets=core_ref, sparse_prefill=True, timing=True)
        assert b.timings["prefill_graph"] and b.tokens == eager.generate(prompt, 8, core_sets=core_ref,
                                                                          sparse_prefill=True).tokens, T
    assert sorted({k[0] for k in graphed._prefill_graphs}) == [64, 128]
    if family == "opt":
        return
    long = _ids(PREFILL_GRAPH_MAX + 1, 74)
    c = graphed.generate(long, 4, timing=True)
    assert not c.timings["prefill_graph"] and c.tokens == eager.generate(long, 4).tokens


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("budget", [{"kept_fraction": 0.4}, {"layer_k": {0: 33, 2: 101}}])
def test_cuda_selection_inside_captured_prefill_equals_after(budget):
    """The captured prefill's own selection (in its graph, the prompt length read on the device, written into
    the index buffer) against the batched selection after the same captured prefill, bf16: the same core sets
    and tokens for prompts that fill their bucket and that do not, one instance going from a longer bucket to a
    shorter one and back (the index buffer rewritten each time), uniform and per-layer k."""
    weights = FastWeights.from_hf(_tiny("llama", seed=75, dtype=torch.bfloat16, device="cuda"))
    inside = FastLM(weights, max_seq_len=200, **budget)
    after = step_variant(weights, {"select_in_prefill": False}, max_seq_len=200, **budget)
    assert inside.select_in_prefill and not after.select_in_prefill
    for T in (70, 20, 64, 128, 70):
        prompt = _ids(T, 76 + T)
        a = inside.generate(prompt, 10, timing=True)
        b = after.generate(prompt, 10, timing=True)
        assert a.timings["select_in_prefill"] and not b.timings["select_in_prefill"], T
        assert sorted(a.core_sets) == sorted(b.core_sets), T
        assert all(torch.equal(a.core_sets[li], b.core_sets[li]) for li in b.core_sets), T
        assert a.tokens == b.tokens, T
        given = inside.generate(prompt, 4, core_sets=b.core_sets, timing=True)  # given sets: nothing to select
        assert not given.timings["select_in_prefill"] and given.tokens == b.tokens[:4], T


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
def test_cuda_partial_row_sum_and_weightless_norm_match_torch(pdl):
    """The folded step's launches around the gather-free down product: x + (128 float32 partial rows summed,
    + bias, rounded) as one tile per program, back to back (with PDL: overlapping), and the RMSNorm without a
    weight (folded into the next product's), against PyTorch."""
    from coreinfer.runtime.cuda import kernels
    from coreinfer.runtime.cuda.fastlm import rms_norm

    if pdl and not kernels.pdl_supported():
        pytest.skip("programmatic dependent launch needs compute capability >= 9.0")
    H, dt = 4096, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(1)
    scratch = kernels.StepScratch(H, 64, "cuda")
    x = x0 = torch.randn(H, device="cuda", generator=g).to(dt)
    parts = torch.randn(4, 128, H, device="cuda", generator=g)
    bias = torch.randn(H, device="cuda", generator=g).to(dt)
    xs = []
    for p in parts:
        x, none = kernels.residual_rms_norm(x, p, None, 1e-5, scratch, bias, pdl=pdl, norm=False)
        assert none is None
        xs.append(x)
    ref = x0
    for p, got in zip(parts, xs):
        ref = ref + (p.sum(0) + bias.float()).to(dt)
        assert ((got.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7 + 1e-6).all()
        ref = got  # the next sum starts from what the kernel stored
    _, h = kernels.residual_rms_norm(x, None, None, 1e-5, scratch, pdl=pdl)
    want = rms_norm(x, None, 1e-5).float()
    assert ((h.float() - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
    assert int(scratch.counts.abs().sum()) == 0


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


def _wide_llama_weights(seed: int, layers: int, dtype: torch.dtype) -> FastWeights:
    """A random Llama 1024 wide (2048 neurons, 8 heads, 2 kv heads, 5000 tokens) on the GPU: wide enough for several
    programs per reduction and per GEMV."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=5000,
                                   max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return FastWeights.from_hf(transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", dtype).eval())


@pytest.mark.gpu
@needs_cuda
def test_cuda_fused_pdl_step_equals_plain_step():
    """The default CUDA step (PDL launches, fused residual+RMSNorm summing the split down product's partial rows,
    fused argmax) against the plain step, float32, on a model wide enough for several programs per reduction."""
    weights = _wide_llama_weights(7, 2, torch.float32)
    prompt, cont = _ids(40, 71, 5000), _ids(12, 72, 5000)
    fused = FastLM(weights, max_seq_len=64, kept_fraction=0.4)
    assert fused.fused_norm and fused.indexed
    plain = step_variant(weights, {"pdl": False, "fused_norm": False}, max_seq_len=64, kept_fraction=0.4)
    got, core = fused.forced_logits(prompt, cont)
    ref, core_ref = plain.forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    assert (got - ref).abs().max().item() < 1e-3
    assert fused.generate(prompt, 12).tokens == plain.generate(prompt, 12).tokens


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kept", [None, 0.4])
def test_cuda_pdl_trigger_moves_no_result(kept):
    """Where a PDL kernel lets the next one launch (after its wait, or at its entry) changes only the scheduling:
    the same logits bit for bit, greedy, sampled and given-core-set tokens, graph replays included, bf16."""
    from coreinfer.runtime.cuda import kernels
    from coreinfer.runtime.cuda.fastlm import Sampling

    if not kernels.pdl_supported():
        pytest.skip("PDL needs a Hopper GPU")
    weights = _wide_llama_weights(8, 3, torch.bfloat16)
    prompt, cont = _ids(40, 73, 5000), _ids(12, 74, 5000)
    lms = [step_variant(weights, {"pdl_trigger": t}, max_seq_len=96, kept_fraction=kept) for t in ("wait", "entry")]
    assert [lm.pdl for lm in lms] == [kernels.PDL_AFTER_WAIT, kernels.PDL_AT_ENTRY]
    (a, core_a), (b, core_b) = (lm.forced_logits(prompt, cont) for lm in lms)
    assert torch.equal(a, b) and all(torch.equal(core_a[i], core_b[i]) for i in core_a)
    s = Sampling(temperature=0.9, top_p=0.9, seed=3)
    for kw in ({}, {"sampling": s}, {"core_sets": core_a or None}):
        assert lms[0].generate(prompt, 24, **kw).tokens == lms[1].generate(prompt, 24, **kw).tokens
    with pytest.raises(FastPathError, match="pdl_trigger must be"):
        step_variant(weights, {"pdl_trigger": "soon"}, max_seq_len=96)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("rows", [(2048, 4, 128, 8, 3), (2048, 4, 16, 8, 3)])
def test_cuda_pipelined_down_loop_moves_no_result(rows):
    """The gather-free down product with its row loop pipelined (rows_config's loop_stages) computes the same
    products in the same order as the plain loop: the same logits bit for bit and the same tokens, bf16; one
    loop iteration per program (split 128) and thirteen (split 16)."""
    weights = _wide_llama_weights(9, 3, torch.bfloat16)
    prompt, cont = _ids(40, 75, 5000), _ids(12, 76, 5000)
    lms = [step_variant(weights, {"rows_config": rows + tail}, max_seq_len=96, kept_fraction=0.4)
           for tail in ((), (3,))]
    assert lms[0].indexed and lms[1].rows_config[5] == 3
    (a, core_a), (b, core_b) = (lm.forced_logits(prompt, cont) for lm in lms)
    assert all(torch.equal(core_a[i], core_b[i]) for i in core_a)
    assert torch.equal(a, b)
    assert lms[0].generate(prompt, 24).tokens == lms[1].generate(prompt, 24).tokens


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kept", [None, 0.4])
def test_cuda_persistent_gemv_moves_no_result(kept):
    """The persistent GEMV (a fifth gemv_config entry: programs per SM, each looping over its output blocks with
    the loads pipelined) computes the same products as one program per block: the same logits bit for bit and
    the same greedy and given-core-set tokens, bf16; dense (the down product, K > BLOCK_K, keeps one program per
    block) and kept 0.4. At 2 programs per SM, q||k||v's 1536 outputs give every program several blocks."""
    from coreinfer.runtime.cuda import kernels

    weights = _wide_llama_weights(10, 3, torch.bfloat16)
    prompt, cont = _ids(40, 77, 5000), _ids(12, 78, 5000)
    persistent = {"gemv_config": (1, 1024, 4, 3, 2), "gemv_config_up": (1, 1024, 4, 3, 2)}
    lms = [step_variant(weights, step, max_seq_len=96, kept_fraction=kept)
           for step in ({"gemv_config": (1, 1024, 4, 2), "gemv_config_up": (1, 1024, 4, 2)}, persistent)]
    assert 2 * kernels.sm_count("cuda") < 1536  # q||k||v: 1024 + 2 x 256 outputs, several blocks per program
    (a, core_a), (b, core_b) = (lm.forced_logits(prompt, cont) for lm in lms)
    assert all(torch.equal(core_a[i], core_b[i]) for i in core_a)
    assert torch.equal(a, b)
    for kw in ({}, {"core_sets": core_a or None}):
        assert lms[0].generate(prompt, 24, **kw).tokens == lms[1].generate(prompt, 24, **kw).tokens


# ---------------------------------------------------------------------------------------------- SparseLM hook


def _request(lm, prompt, method, beta, layers, n, score="positive", sparse_prefill=False, seed=None, stop=(),
             on_text=None, streamer=None, return_logits=False, **generation):
    """A GenerationRequest as SparseLM.generate builds it, and the session the method resolves to."""
    from transformers import GenerationConfig

    from coreinfer.runtime.generation import GenerationRequest

    ids = lm.encode(prompt)
    lay = lm.resolve_layers(layers)
    session, used, extra = lm.core_session(method, ids, prompt, 0.4, beta, lay, score, sparse_prefill)
    cfg = GenerationConfig(max_new_tokens=n, **generation)
    req = GenerationRequest(ids, prompt, method, 0.4, beta, lay, score, sparse_prefill, n, cfg, eos_ids=lm._eos_ids(),
                            stop_strings=list(stop), streamer=streamer, on_text=on_text, return_logits=return_logits,
                            seed=seed)
    return req, session, used, extra


def _fast(lm, *args, **kwargs):
    from coreinfer.runtime.cuda.hook import fast_generate

    req, session, used, extra = _request(lm, *args, **kwargs)
    return fast_generate(lm, req, session, used, extra, force=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "reglu", "drelu"])
def test_hook_answers_like_sparselm_eager(family, tokenizer):
    """``cuda.hook.fast_generate`` (what SparseLM.generate calls on CUDA), forced on CPU, returns what the
    eager SparseLM path returns: tokens, text, core sets, kept fraction, FFN bytes."""
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm(family, tokenizer, seed=5)
    prompt = "Write a short poem about the sea and the wind"
    for method, layers in (("dense", None), ("stability", "1:3"), ("stability", "0:4")):
        ref = lm.generate(prompt, method=method, beta=0.3, layers=layers, max_new_tokens=10, score="positive")
        got, why = _fast(lm, prompt, method, 0.3, layers, 10)
        assert why is None and got.stats.path == "fast"
        assert got.token_ids == ref.token_ids and got.text == ref.text
        assert got.stats.stop_reason == ref.stats.stop_reason
        assert got.stats.kept_fraction == pytest.approx(ref.stats.kept_fraction)
        assert got.stats.ffn_bytes_per_token == ref.stats.ffn_bytes_per_token
        assert sorted(got.core_sets) == sorted(ref.core_sets)
        for i in got.core_sets:
            assert torch.equal(got.core_sets[i].cpu(), ref.core_sets[i].cpu())


def test_hook_says_why_it_cannot_answer(tokenizer):
    """What the fast path does not implement comes back as a reason naming it, never as another answer."""
    from coreinfer.runtime.cuda.hook import fast_generate
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm("llama", tokenizer, seed=5)
    prompt = "Write a short poem about the sea and the wind"
    plain, why = _fast(lm, prompt, "stability", 0.3, None, 4, output_attentions=False, output_hidden_states=False,
                       num_beams=1, repetition_penalty=1.0)  # set to what transformers does anyway: no change
    assert why is None and plain.stats.path == "fast"
    for gen, words in (({"num_beams": 2}, "num_beams=2"), ({"repetition_penalty": 1.3}, "repetition_penalty=1.3"),
                       ({"min_new_tokens": 3}, "min_new_tokens=3")):
        got, why = _fast(lm, prompt, "stability", 0.3, None, 4, **gen)
        assert got is None and words in why and "not implemented on the fast path" in why
    req, session, used, extra = _request(lm, prompt, "stability", 0.3, None, 4)
    got, why = fast_generate(lm, req, session, used, extra)  # not forced: CPU
    assert got is None and "runs on CUDA" in why
    with pytest.raises(ValueError, match="top_p must be"):
        _fast(lm, prompt, "stability", 0.3, None, 4, do_sample=True, top_p=1.5)
    lm_g, _ = tiny_lm("gemma", tokenizer)
    got, why = _fast(lm_g, "hello there", "dense", 0.4, None, 4)
    assert got is None and "supports model types" in why


def test_fast_sampling_is_seeded_and_top_k_1_is_greedy(tokenizer):
    """Sampling on the fast path (CPU: the same Gumbel-max rule as the kernel): a seed fixes the tokens, other
    seeds give others, top_k=1 is greedy whatever the temperature."""
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm("llama", tokenizer, seed=6)
    prompt = "Tell me a story about a dragon who"
    greedy, _ = _fast(lm, prompt, "stability", 0.3, None, 12)
    a, _ = _fast(lm, prompt, "stability", 0.3, None, 12, do_sample=True, temperature=1.5, top_k=0, seed=11)
    b, _ = _fast(lm, prompt, "stability", 0.3, None, 12, do_sample=True, temperature=1.5, top_k=0, seed=11)
    c, _ = _fast(lm, prompt, "stability", 0.3, None, 12, do_sample=True, temperature=1.5, top_k=0, seed=12)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids and a.token_ids != greedy.token_ids
    one, _ = _fast(lm, prompt, "stability", 0.3, None, 12, do_sample=True, temperature=3.0, top_k=1, seed=5)
    assert one.token_ids == greedy.token_ids


@pytest.mark.parametrize("top_k, top_p, temperature", [(5, None, 1.0), (None, 0.6, 0.7), (20, 0.9, 1.3), (1, 0.5, 2.0)])
def test_sampling_cutoff_keeps_what_transformers_keeps(top_k, top_p, temperature):
    """The draw's cutoff logit admits exactly the tokens transformers' temperature -> top-k -> top-p warpers
    leave finite (independent reference: transformers' own logits processors)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from coreinfer.runtime.cuda.fastlm import GREEDY, Sampling, _Mode

    weights = FastWeights.from_hf(_tiny("llama", seed=3))
    fast = FastLM(weights, max_seq_len=24)
    g = torch.Generator().manual_seed(8)
    for _ in range(5):
        logits = torch.randn(97, generator=g) * 3
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
        mode = fast._set_sampling(sampling, False, 1)
        assert mode != GREEDY and mode == _Mode.of(sampling, False)
        cut = fast._cutoff(logits, mode)
        want = logits[None].clone()
        for warper in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
                ([TopPLogitsWarper(top_p)] if top_p else []):
            want = warper(None, want)
        assert torch.equal(logits >= cut, torch.isfinite(want[0]))


def test_fast_stop_strings_stream_and_logits(tokenizer):
    """Stop strings, on_text, a streamer and return_logits on the fast path (chunks read back as it decodes):
    the text ends before the first stop string of the unstopped answer, the streamed pieces add up to it, the
    logits are the teacher-forced logits of the tokens returned."""
    from coreinfer.runtime.cuda.fastlm import FastLM as _FastLM  # noqa: F401  (the hook builds its own)
    from tests.conftest import tiny_lm

    class Collect:
        def __init__(self):
            self.ids, self.ended = [], False

        def put(self, value):
            self.ids.extend(value.view(-1).tolist())

        def end(self):
            self.ended = True

    lm, _ = tiny_lm("llama", tokenizer, seed=9)
    prompt = "Count the colours of the rainbow for me"
    full, _ = _fast(lm, prompt, "stability", 0.3, None, 40)
    assert full.stats.stop_reason == "length" and len(full.text) > 12
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    pieces, streamer = [], Collect()
    got, why = _fast(lm, prompt, "stability", 0.3, None, 40, stop=[stop], on_text=pieces.append, streamer=streamer,
                     return_logits=True)
    assert why is None
    assert got.text == full.text[:full.text.find(stop)] and got.stats.stop_reason == "stop_string"
    assert "".join(pieces) == got.text and streamer.ended
    assert got.token_ids == full.token_ids[:len(got.token_ids)] and len(got.token_ids) < len(full.token_ids)
    prompt_ids = lm.encode(prompt)[0].tolist()
    assert streamer.ids[:len(prompt_ids)] == prompt_ids and streamer.ids[len(prompt_ids):] == got.token_ids
    fast = next(iter(lm.__dict__["_coreinfer_cuda_fast"]["lms"].values()))
    forced, _ = fast.forced_logits(lm.encode(prompt)[0], got.token_ids[:-1])
    assert len(got.logits) == len(got.token_ids)
    assert (torch.stack(got.logits) - forced).abs().max().item() < 1e-4


def test_fast_similarity_sets_and_sparse_prefill_match_eager(tokenizer):
    """Core sets known before the prefill (similarity-guided prompts) on the fast path, with and without
    ``sparse_prefill``: the same logits as the eager adapter path given the same session."""
    from coreinfer.runtime.cuda.fastlm import FastLM, FastWeights
    from coreinfer.runtime.session import CoreSetSession
    from tests.conftest import tiny_lm

    lm, _ = tiny_lm("llama", tokenizer, seed=13)
    ids = lm.encode("A prompt whose cluster is known in advance")
    layers = lm.resolve_layers("1:3")
    k = kept_count(0.3, lm.adapter.n_neurons)
    g = torch.Generator().manual_seed(4)
    sets = {i: torch.randperm(lm.adapter.n_neurons, generator=g)[:k].sort().values for i in layers}
    fast = FastLM(FastWeights.from_hf(lm.model, adapter=lm.adapter), max_seq_len=40, kept_fraction=0.3,
                  sparse_layers=layers)
    for sparse_prefill in (False, True):
        gen = fast.generate(ids[0], 6, core_sets=sets, keep_logits=True, sparse_prefill=sparse_prefill)
        assert all(torch.equal(gen.core_sets[i], sets[i]) for i in layers)
        session = CoreSetSession(layers, None, core_sets=sets, sparse_prefill=sparse_prefill)
        ref = lm.score_ids(ids, gen.tokens, "similarity", 0.4, 0.3, layers, session=session, keep_logprobs=True)
        got = torch.stack(gen.logits).log_softmax(-1)
        assert (got - ref.logprobs).abs().max().item() < 1e-4, sparse_prefill




# ------------------------------------------------------------------------------- every call on the GPU


def _cuda_lm(family, tokenizer, seed=5, dtype=torch.float32):
    from coreinfer.runtime.loading import LoadedModel
    from coreinfer.runtime.sparse_lm import SparseLM
    from tests.conftest import build_tiny

    model, _ = build_tiny(family, tokenizer, seed)
    model = model.to("cuda", dtype)
    return SparseLM(LoadedModel(model, tokenizer, f"tiny-{family}", "memory", torch.device("cuda"), dtype))


@pytest.mark.gpu
@needs_cuda
def test_cuda_sampling_in_the_graph_is_seeded():
    """The draw inside the captured step: a seed fixes the tokens (replayed graph = un-captured step, the same
    Philox numbers), other seeds differ, top_k=1 is greedy; greedy is unchanged by a sampling call before it."""
    from coreinfer.runtime.cuda.fastlm import Sampling

    model = _tiny("llama", seed=41, device="cuda")
    weights = FastWeights.from_hf(model)
    prompt = _ids(20, 42)
    graph = FastLM(weights, max_seq_len=64, kept_fraction=0.4)
    plain = step_variant(weights, {"cuda_graph": False}, max_seq_len=64, kept_fraction=0.4)
    greedy = graph.generate(prompt, 16).tokens
    s = Sampling(temperature=1.3, top_k=40, top_p=0.9, seed=7)
    a = graph.generate(prompt, 16, sampling=s).tokens
    assert a == plain.generate(prompt, 16, sampling=s).tokens == graph.generate(prompt, 16, sampling=s).tokens
    assert a != graph.generate(prompt, 16, sampling=Sampling(temperature=1.3, top_k=40, top_p=0.9, seed=8)).tokens
    assert graph.generate(prompt, 16, sampling=Sampling(temperature=5.0, top_k=1, seed=3)).tokens == greedy
    assert graph.generate(prompt, 16).tokens == greedy


@pytest.mark.gpu
@needs_cuda
def test_cuda_per_layer_core_sets_gather_free_equals_gathered():
    model = _tiny("llama", seed=43, device="cuda")
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(20, 44), _ids(6, 45)
    lk = {0: 33, 2: 101}
    got, core = FastLM(weights, max_seq_len=64, layer_k=lk).forced_logits(prompt, cont)
    ref, core_ref = step_variant(weights, {"gemv": "torch", "attention": "sdpa", "pdl": False, "cuda_graph": False},
                                 max_seq_len=64, layer_k=lk).forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) and core[i].numel() == lk[i] for i in lk)
    assert (got - ref).abs().max().item() < 1e-3


@pytest.mark.gpu
@needs_cuda
def test_cuda_sparselm_generate_takes_the_fast_path_for_every_call(tokenizer):
    """SparseLM.generate on CUDA: greedy, sampled, streamed, stopped, with logits, all answered by the fast path
    (stats.path), greedy equal to the eager path, a stop string ending where the unstopped text has it; a
    streamer that raises ends the call with its error and the instance answers the next call as before."""
    lm = _cuda_lm("llama", tokenizer)
    prompt = "Write a short poem about the sea and the wind"
    kw = dict(method="stability", beta=0.3, eos_token_id=10 ** 6)  # no EOS: a random model could end a call early
    eager = lm.generate(prompt, **kw, max_new_tokens=20, fast_path=False)
    fast = lm.generate(prompt, **kw, max_new_tokens=20)
    assert fast.stats.path == "fast" and eager.stats.path == "eager"
    assert fast.token_ids == eager.token_ids and len(fast.token_ids) == 20
    sampled = lm.generate(prompt, **kw, max_new_tokens=20, do_sample=True, temperature=1.2,
                          top_p=0.95, seed=3)
    again = lm.generate(prompt, **kw, max_new_tokens=20, do_sample=True, temperature=1.2,
                        top_p=0.95, seed=3)
    assert sampled.stats.path == "fast" and sampled.token_ids == again.token_ids
    stop = fast.text[len(fast.text) // 2:len(fast.text) // 2 + 2]
    pieces = []
    stopped = lm.generate(prompt, **kw, max_new_tokens=20, stop=[stop], on_text=pieces.append,
                          return_logits=True)
    assert stopped.stats.path == "fast" and stopped.text == fast.text[:fast.text.find(stop)]
    assert "".join(pieces) == stopped.text and len(stopped.logits) == len(stopped.token_ids)

    class Broken:
        def __init__(self):
            self.n = 0

        def put(self, value):
            self.n += 1
            if self.n > 3:
                raise RuntimeError("streamer failed")

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="streamer failed"):
        lm.generate(prompt, **kw, max_new_tokens=20, streamer=Broken())
    assert lm.generate(prompt, **kw, max_new_tokens=20).token_ids == fast.token_ids
    beams = lm.generate(prompt, **kw, max_new_tokens=8, num_beams=2)
    assert beams.stats.path == "eager" and "num_beams=2" in beams.stats.fallback_reason
    with pytest.raises(ValueError, match="num_beams=2"):
        lm.generate(prompt, **kw, max_new_tokens=8, num_beams=2, fast_path=True)
