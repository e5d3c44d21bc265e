"""The fast path under a memory budget (runtime/cuda/offload.py: BudgetFastLM) against the in-memory fast path.

On CPU (float32, eager step, "device" = CPU, the host blocks separate tensors): logits, core sets, tokens and
bytes over the bus. On CUDA (@gpu): the graph-captured step against the in-memory FastLM, float32 and bf16, and
peak ``torch.cuda.max_memory_allocated`` under the budget.
"""

from __future__ import annotations

import gc

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coreinfer.runtime.cuda.fastlm import FastLM, FastWeights  # noqa: E402
from coreinfer.runtime.cuda.offload import BudgetFastLM, HostFFNStore, model_rope  # noqa: E402
from coreinfer.runtime.memory import MemoryBudgetError, ModelShape, plan_memory  # noqa: E402
from coreinfer.runtime.selection import kept_count  # noqa: E402

KEPT = 0.3  # k = 48 of 160 in 64 padded slots: the zero padding is exercised
CONTEXT = 48
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tiny(family: str, seed: int, dtype=torch.float32, n_layers: int = 4, **sizes):
    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4, vocab_size=97,
                  max_position_embeddings=128)
    common.update(sizes)
    if family == "llama":
        cfg = transformers.LlamaConfig(intermediate_size=common.pop("intermediate_size", 160), num_key_value_heads=2,
                                       **common)
    else:
        cfg = transformers.OPTConfig(ffn_dim=common.pop("intermediate_size", 160),
                                     word_embed_proj_dim=common["hidden_size"], do_layer_norm_before=True, **common)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype=dtype).eval()
    with torch.no_grad():  # spread enough that the FFN (and so the core set) moves the logits
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _ids(n: int, seed: int, vocab: int = 97):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _plan(model, resident_sparse: int, extra: int = 0, dtype=torch.float32, kept=KEPT, context=CONTEXT):
    """A plan that streams all sparse layers but ``resident_sparse`` (two staging buffers); ``extra`` bytes more."""
    shape = ModelShape.from_config(model.config)
    ks = {i: kept_count(kept, shape.n_neurons) for i in range(shape.n_layers)}
    big = plan_memory(shape, "1TiB", dtype=dtype, layer_k=ks, context_length=context)
    p = big.parts
    base = sum(p[k] for k in ("attention", "embeddings", "lm_head_norm", "kv_cache", "workspace", "core_ffn",
                              "dense_ffn_outside_sparse"))
    return plan_memory(shape, base + (2 + resident_sparse) * big.dense_layer_bytes + extra, dtype=dtype, layer_k=ks,
                       context_length=context)


def _core_sets(n_layers: int, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {i: torch.randperm(n, generator=g)[:k].sort().values for i in range(n_layers)}


# ---------------------------------------------------------------------------------------------------- CPU

@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stability_equals_in_memory_fast_path(family):
    model = _tiny(family, seed=3)
    prompt, cont = _ids(17, 4), _ids(9, 5)
    ref, ref_core = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, kept_fraction=KEPT).forced_logits(prompt, cont)
    plan = _plan(model, resident_sparse=1)
    assert plan.resident_dense == [0] and plan.streamed == [1, 2, 3] and plan.staging_buffers == 2
    fast = BudgetFastLM(FastWeights.from_hf(model), plan, "cpu")
    before = fast.bytes_moved
    got, _ = fast.forced_logits(prompt, cont)
    assert (got - ref).abs().max().item() <= 1e-4
    assert sorted(fast._last_core_sets) == [0, 1, 2, 3]
    for li, idx in fast._last_core_sets.items():
        assert torch.equal(idx, ref_core[li])
    assert fast.bytes_moved - before == 3 * fast.store.block_bytes  # each streamed layer copied once
    assert fast.store.block_bytes == sum(t.numel() for t in fast.store.views(fast.store.blocks[0]).values()
                                         if t is not None) * 4
    # generate: the same greedy tokens as the in-memory fast path
    mem = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, kept_fraction=KEPT)
    out = fast.generate_budget(prompt, 12)
    assert out.tokens == mem.generate(prompt, 12).tokens
    assert out.bus_bytes == 3 * fast.store.block_bytes and out.sets_from == "prefill" and out.path == "fast-offload"


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_known_core_sets_sparse_prefill_resident_cluster_moves_nothing(family):
    model = _tiny(family, seed=11)
    prompt = _ids(15, 12)
    k = kept_count(KEPT, 160)
    sets = _core_sets(4, 160, k, 13)
    mem = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, kept_fraction=KEPT)
    want = mem.generate(prompt, 10, core_sets=sets, sparse_prefill=True).tokens
    want_dense_prefill = mem.generate(prompt, 10, core_sets=sets).tokens
    fast = BudgetFastLM(FastWeights.from_hf(model), _plan(model, resident_sparse=1), "cpu")
    # only the k core neurons' rows cross the bus (not the padding): gate, up, down (or fc1, its bias, fc2)
    core_bytes = (3 * 64 * k if family == "llama" else 2 * 64 * k + k) * 4
    first = fast.generate_budget(prompt, 10, core_sets=sets, cluster="c7", sparse_prefill=True)
    assert first.tokens == want and first.sets_from == "gathered"
    assert first.bus_bytes == 3 * core_bytes  # the three streamed layers' core rows; layer 0 from its resident copy
    again = fast.generate_budget(prompt, 10, core_sets=sets, cluster="c7", sparse_prefill=True)
    assert again.tokens == want and again.sets_from == "resident" and again.bus_bytes == 0
    # a stability prompt overwrites the decode buffers (no room for a second set): the cluster comes from host again
    fast.generate_budget(prompt, 4)
    third = fast.generate_budget(prompt, 10, core_sets=sets, cluster="c7", sparse_prefill=True)
    assert third.tokens == want and third.sets_from == "gathered"
    # dense prefill with the cluster's sets: streams the dense FFN, gathers on the device
    dense = fast.generate_budget(prompt, 10, core_sets=sets, cluster="c7")
    assert dense.tokens == want_dense_prefill and dense.sets_from == "prefill"
    assert dense.bus_bytes == 3 * fast.store.block_bytes


def _close(xs, ys, tol=1e-4):
    assert len(xs) == len(ys) > 0
    return max((x - y).abs().max().item() for x, y in zip(xs, ys)) <= tol


def test_cluster_lru_with_room_for_a_second_set():
    model = _tiny("llama", seed=21)
    prompt = _ids(15, 22)
    k = kept_count(KEPT, 160)
    a, b = _core_sets(4, 160, k, 1), _core_sets(4, 160, k, 2)
    one_set = 4 * 3 * 64 * 64 * 4
    plan = _plan(model, resident_sparse=2, extra=one_set)  # every dense FFN fits, and one more core set
    assert plan.cluster_slots == 2 and plan.streamed == []
    fast = BudgetFastLM(FastWeights.from_hf(model), plan, "cpu")
    mem = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, kept_fraction=KEPT)
    # (cloned: on CPU in float32, FastLM's returned logits are views of its reused buffer)
    want_a = [t.clone() for t in mem.generate(prompt, 8, core_sets=a, sparse_prefill=True, keep_logits=True).logits]
    want_b = [t.clone() for t in mem.generate(prompt, 8, core_sets=b, sparse_prefill=True, keep_logits=True).logits]
    assert not _close(want_a, want_b)  # the two clusters' sets give different logits

    def run(sets, name):
        return fast.generate_budget(prompt, 8, core_sets=sets, cluster=name, sparse_prefill=True, keep_logits=True)

    first_a, first_b = run(a, "a"), run(b, "b")
    assert (first_a.sets_from, first_b.sets_from) == ("gathered", "gathered")
    assert _close(first_a.logits, want_a) and _close(first_b.logits, want_b)
    assert first_a.bus_bytes == 0  # every dense FFN is resident: gathered on the device
    back_a = run(a, "a")  # "a" was kept in the LRU when "b" replaced it in the decode buffers
    assert back_a.sets_from == "lru" and back_a.bus_bytes == 0 and _close(back_a.logits, want_a)
    back_b = run(b, "b")  # and "b" was swapped into the LRU
    assert back_b.sets_from == "lru" and _close(back_b.logits, want_b)
    assert len(fast._spare) == 1
    assert run(b, "b").sets_from == "resident"


def test_per_layer_core_sizes_equal_in_memory():
    """A calibrated budget (one k per layer, one layer dense): the same selection and logits as FastLM(layer_k=...)."""
    model = _tiny("llama", seed=31)
    prompt, cont = _ids(19, 32), _ids(7, 33)
    layer_k = {1: 30, 2: 64, 3: 100}  # layer 0 decodes dense (resident in full)
    ref, ref_core = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, layer_k=layer_k).forced_logits(prompt, cont)
    shape = ModelShape.from_config(model.config)
    big = plan_memory(shape, "1TiB", dtype=torch.float32, layer_k=layer_k, context_length=CONTEXT)
    p = big.parts
    base = sum(p[k] for k in ("attention", "embeddings", "lm_head_norm", "kv_cache", "workspace", "core_ffn",
                              "dense_ffn_outside_sparse"))
    plan = plan_memory(shape, base + 2 * big.dense_layer_bytes + 8, dtype=torch.float32, layer_k=layer_k,
                       context_length=CONTEXT)
    assert plan.streamed == [1, 2, 3] and 0 in plan.resident_dense
    fast = BudgetFastLM(FastWeights.from_hf(model), plan, "cpu")
    assert [fast.w.layers[i].down.shape[1] for i in range(4)] == [160, 64, 64, 128]  # dense, then k padded to 64
    got, _ = fast.forced_logits(prompt, cont)
    assert (got - ref).abs().max().item() <= 1e-4
    assert {i: c.numel() for i, c in fast._last_core_sets.items()} == layer_k
    for li, idx in fast._last_core_sets.items():
        assert torch.equal(idx, ref_core[li])


def test_model_rope_equals_the_fast_weights_own():
    model = _tiny("llama", seed=2)
    pos = torch.arange(40)
    want = FastWeights.from_hf(model).rope_fn(pos)
    got = model_rope(model, "cpu")(pos)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert model_rope(_tiny("opt", seed=2), "cpu") is None


def test_errors():
    model = _tiny("llama", seed=1)
    plan = _plan(model, resident_sparse=0)
    fast = BudgetFastLM(FastWeights.from_hf(model), plan, "cpu")
    with pytest.raises(MemoryBudgetError, match="positions the memory plan reserved"):
        fast.generate_budget(_ids(40, 1), 20)
    with pytest.raises(ValueError, match="sparse_prefill needs core sets"):
        fast.generate_budget(_ids(10, 1), 4, sparse_prefill=True)
    with pytest.raises(ValueError, match="one core set per sparse layer"):
        fast.generate_budget(_ids(10, 1), 4, core_sets={0: torch.arange(48)})
    big = {i: torch.arange(100) for i in range(4)}
    with pytest.raises(MemoryBudgetError, match="reserved 48"):
        fast.generate_budget(_ids(10, 1), 4, core_sets=big)
    other = _tiny("llama", seed=1, n_layers=3)
    with pytest.raises(MemoryBudgetError, match="another model"):
        BudgetFastLM(FastWeights.from_hf(other), plan, "cpu")


def test_store_is_shared_between_kept_fractions():
    model = _tiny("llama", seed=5)
    weights = FastWeights.from_hf(model)
    store = HostFFNStore(weights, pin=False)
    prompt = _ids(12, 6)
    for kept in (0.2, 0.5):
        plan = _plan(model, resident_sparse=0, kept=kept)
        fast = BudgetFastLM(weights, plan, "cpu", store=store)
        want = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, kept_fraction=kept).generate(prompt, 6).tokens
        assert fast.store is store and fast.generate_budget(prompt, 6).tokens == want


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_store_holds_each_neuron_as_rows_once_as_the_plan_counts(family):
    """The host store's block per layer: gate||up (fc1) rows, fc1's bias and the down projection transposed (I, H),
    nothing else: one copy of the streamed FFN, as many bytes as the plan's streaming buffer holds (down's bias,
    resident, is the plan's only extra)."""
    model = _tiny(family, seed=41)
    weights = FastWeights.from_hf(model)
    store = HostFFNStore(weights, pin=False)
    for lw, block in zip(weights.layers, store.blocks):
        v = store.views(block)
        assert v["down_t"].shape == (160, 64) and v["down_t"].is_contiguous()
        assert torch.equal(v["down_t"], lw.down.t()) and torch.equal(v["up_w"], lw.up_w)
        assert (v["up_b"] is None) == (family == "llama") and (v["up_b"] is None or torch.equal(v["up_b"], lw.up_b))
        assert torch.equal(HostFFNStore.dense_fields(v)["down"], lw.down)
    plan = _plan(model, resident_sparse=0)
    down_bias = 0 if family == "llama" else 64 * 4
    assert store.block_bytes == sum(t.numel() for t in store.views(store.blocks[0]).values() if t is not None) * 4
    assert store.block_bytes + down_bias == plan.dense_layer_bytes
    assert len(store.blocks) == 4 and all(b.numel() == store.numel for b in store.blocks)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_logits_equal_in_memory_stability_and_similarity_resident_or_from_host(family):
    """float32 logits of every new token against the in-memory fast path: stability-guided (the dense prefill
    streams through the transposed down), similarity-guided with the cluster's core rows from host memory (the
    pinned row buffers used in turn and reused), with the cluster resident, from host again after a stability
    prompt, and a smaller core set from host over a larger one's buffers (the padding zeroed)."""
    model = _tiny(family, seed=51)
    prompt = _ids(16, 52)
    k = kept_count(KEPT, 160)
    a, b = _core_sets(4, 160, k, 53), _core_sets(4, 160, 30, 54)
    mem = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, kept_fraction=KEPT)
    small = FastLM(FastWeights.from_hf(model), max_seq_len=CONTEXT, layer_k={i: 30 for i in range(4)})

    def want(lm, sets=None, **kw):
        return [t.clone() for t in lm.generate(prompt, 8, core_sets=sets, keep_logits=True, **kw).logits]

    want_stab, want_a, want_b = want(mem), want(mem, a, sparse_prefill=True), want(small, b, sparse_prefill=True)
    assert not _close(want_a, want_stab) and not _close(want_a, want_b)
    fast = BudgetFastLM(FastWeights.from_hf(model), _plan(model, resident_sparse=1), "cpu")
    assert fast.plan.streamed == [1, 2, 3] and len(fast._host_rows.buffers) == 2
    per_neuron = 3 * 64 if family == "llama" else 2 * 64 + 1  # gate, up, down rows (fc1, fc2 rows, fc1's bias)

    def sim(sets, name):
        return fast.generate_budget(prompt, 8, core_sets=sets, cluster=name, sparse_prefill=True, keep_logits=True)

    stab = fast.generate_budget(prompt, 8, keep_logits=True)
    assert _close(stab.logits, want_stab) and stab.bus_bytes == 3 * fast.store.block_bytes
    cold = sim(a, "a")
    assert cold.sets_from == "gathered" and cold.bus_bytes == 3 * per_neuron * k * 4 and _close(cold.logits, want_a)
    hot = sim(a, "a")
    assert hot.sets_from == "resident" and hot.bus_bytes == 0 and _close(hot.logits, want_a)
    fast.generate_budget(prompt, 2)
    again = sim(a, "a")
    assert again.sets_from == "gathered" and _close(again.logits, want_a)
    smaller = sim(b, "b")
    assert smaller.sets_from == "gathered" and smaller.bus_bytes == 3 * per_neuron * 30 * 4
    assert _close(smaller.logits, want_b)


# ---------------------------------------------------------------------------------------------------- CUDA

def _cuda_model(dtype, seed=7):
    cfg = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, vocab_size=5000)
    return _tiny("llama", seed=seed, dtype=dtype, n_layers=6, **cfg)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_budget_fast_path_equals_in_memory_and_stays_under_budget(dtype):
    model = _cuda_model(dtype)  # on the CPU: the budget path's host copy
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(40, 71, 5000), _ids(12, 72, 5000)
    kept, context = 0.4, 64
    plan = _plan(model, resident_sparse=1, dtype=dtype, kept=kept, context=context)
    assert plan.streamed and plan.staging_buffers == 2
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()  # whatever earlier tests left alive
    torch.cuda.reset_peak_memory_stats()
    fast = BudgetFastLM(weights, plan, "cuda", rope_fn=model_rope(model, "cuda"))  # RoPE as the reference's
    assert fast.cuda_graph
    got, _ = fast.forced_logits(prompt, cont)
    core = {li: idx.cpu() for li, idx in fast._last_core_sets.items()}
    out = fast.generate_budget(prompt, 16)
    sim = fast.generate_budget(prompt, 16, core_sets=core, cluster=0, sparse_prefill=True)
    again = fast.generate_budget(prompt, 16, core_sets=core, cluster=0, sparse_prefill=True, timeline=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak <= plan.budget, f"peak {peak} over the budget {plan.budget}"
    assert fast.resident_bytes() <= plan.resident_bytes
    assert out.bus_bytes == len(plan.streamed) * fast.store.block_bytes
    assert again.sets_from == "resident" and again.bus_bytes == 0
    assert [r["layer"] for r in again.timeline] == list(range(6))
    del fast
    gc.collect()
    torch.cuda.empty_cache()

    mem = FastLM(FastWeights.from_hf(model.cuda()), max_seq_len=context, kept_fraction=kept)
    ref, ref_core = mem.forced_logits(prompt, cont)
    for li in core:
        assert torch.equal(core[li], ref_core[li].cpu()), f"layer {li}: other core set than the in-memory path"
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() < 1e-3
        assert out.tokens == mem.generate(prompt, 16).tokens
        assert sim.tokens == mem.generate(prompt, 16, core_sets=core, sparse_prefill=True).tokens
    else:
        rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        assert rel < 2e-2
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.gpu
@needs_cuda
def test_cuda_streaming_with_one_buffer():
    model = _cuda_model(torch.float32, seed=9)
    prompt = _ids(30, 3, 5000)
    shape = ModelShape.from_config(model.config)
    ks = {i: kept_count(0.4, shape.n_neurons) for i in range(6)}
    one = _plan(model, resident_sparse=0, dtype=torch.float32, kept=0.4, context=64)
    plan = plan_memory(shape, one.budget - one.dense_layer_bytes, dtype=torch.float32, layer_k=ks, context_length=64)
    assert plan.staging_buffers == 1
    fast = BudgetFastLM(FastWeights.from_hf(model), plan, "cuda", rope_fn=model_rope(model, "cuda"))
    mem = FastLM(FastWeights.from_hf(model.cuda()), max_seq_len=64, kept_fraction=0.4)
    assert fast.generate_budget(prompt, 10).tokens == mem.generate(prompt, 10).tokens


def _in_memory_and_offloaded(family: str, tokenizer):
    """(SparseLM in GPU memory, the same tiny model as an OffloadedSparseLM still on the host, a budget with room
    for two staging buffers but no resident dense FFN of its four sparse layers)."""
    import copy

    from coreinfer.runtime.loading import LoadedModel
    from coreinfer.runtime.offload import OffloadedSparseLM
    from coreinfer.runtime.sparse_lm import SparseLM
    from tests.conftest import build_tiny

    model, _ = build_tiny(family, tokenizer, seed=7)
    ref = SparseLM(LoadedModel(copy.deepcopy(model).cuda(), tokenizer, "ref", "memory", torch.device("cuda"),
                               torch.float32))
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    shape = ModelShape.from_config(model.config)
    ks = {i: kept_count(0.4, shape.n_neurons) for i in range(4)}
    big = plan_memory(shape, "1TiB", dtype=torch.float32, layer_k=ks, context_length=96)
    p = big.parts
    budget = sum(p[k] for k in ("attention", "embeddings", "lm_head_norm", "kv_cache", "workspace", "core_ffn",
                                "dense_ffn_outside_sparse")) + 2 * big.dense_layer_bytes + 8
    return ref, lm, budget


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fast_path", [None, False])
def test_cuda_sparse_lm_with_a_budget_runs_the_graph_path(tokenizer, fast_path):
    """SparseLM under a budget on CUDA: BudgetFastLM answers (stats.path "fast-offload"), or with fast_path=False
    the eager offloaded path; the in-memory SparseLM's tokens (float32) either way."""
    from coreinfer.runtime.offload import MemoryBudget, ffn_bytes, offload_loaded

    ref, lm, budget = _in_memory_and_offloaded("llama", tokenizer)
    offload_loaded(lm, MemoryBudget(budget, kept_fraction=0.4, context_length=96, layers="0:4", fast_path=fast_path),
                   "cuda")
    assert (lm.offload.fast is not None) == (fast_path is None) and lm.offload.plan.streamed == [0, 1, 2, 3]
    prompt = "Paris is the capital of France and Berlin is the capital of Germany."
    kw = dict(method="stability", beta=0.4, layers="0:4", max_new_tokens=12)
    want, got = ref.generate(prompt, **kw), lm.generate(prompt, **kw)
    assert got.token_ids == want.token_ids
    if fast_path is None:
        assert got.stats.path == "fast-offload"
        assert got.stats.memory["bus_bytes"] == 4 * lm.offload.fast.store.block_bytes
    else:
        assert got.stats.path == "eager-offload"
        assert got.stats.memory["bus_bytes"] == 4 * ffn_bytes(lm.adapter.dense[0].host)


@pytest.mark.gpu
@needs_cuda
def test_cuda_eager_offload_for_an_architecture_the_fast_path_lacks(tokenizer):
    """Gemma under a budget on CUDA: the eager offloaded path (pinned host FFNs, staging buffers on the GPU) gives
    the in-memory eager path's tokens and logits (float32)."""
    from coreinfer.runtime.offload import HostFFN, MemoryBudget, ffn_bytes, offload_loaded

    ref, lm, budget = _in_memory_and_offloaded("gemma", tokenizer)
    offload_loaded(lm, MemoryBudget(budget, kept_fraction=0.4, context_length=96, layers="0:4"), "cuda")
    assert lm.offload.fast is None and "gemma" in (lm.offload.fast_unsupported or "")
    host = lm.adapter.dense[0]
    assert isinstance(host, HostFFN) and host.host.down.is_pinned()
    prompt = "Paris is the capital of France and Berlin is the capital of Germany."
    kw = dict(method="stability", beta=0.4, layers="0:4", max_new_tokens=8, return_logits=True)
    want, got = ref.generate(prompt, **kw), lm.generate(prompt, **kw)
    assert got.stats.path == "eager-offload" and got.token_ids == want.token_ids
    assert max((a - b).abs().max().item() for a, b in zip(want.logits, got.logits)) < 1e-3
    assert got.stats.memory["bus_bytes"] == 4 * ffn_bytes(host.host)


@pytest.mark.gpu
@needs_cuda
def test_cuda_similarity_from_host_logits_equal_in_memory():
    """Clusters never resident (core rows gathered from the host store's rows through the two pinned buffers, one
    copy per layer, events between calls and layers): each call's float32 logits against the in-memory fast path."""
    model = _cuda_model(torch.float32, seed=13)
    prompt = _ids(40, 14, 5000)
    H, n = 1024, 2816
    k = kept_count(0.4, n)
    plan = _plan(model, resident_sparse=1, dtype=torch.float32, kept=0.4, context=64)
    assert plan.streamed == [1, 2, 3, 4, 5] and plan.cluster_slots == 1
    fast = BudgetFastLM(FastWeights.from_hf(model), plan, "cuda", rope_fn=model_rope(model, "cuda"))
    assert all(b.is_pinned() for b in fast._host_rows.buffers) and fast.store.blocks[1].is_pinned()
    a, b = _core_sets(6, n, k, 15), _core_sets(6, n, k, 16)
    calls = [a, b, a]  # one decode slot: "a" comes from host again after "b"
    got = [fast.generate_budget(prompt, 12, core_sets=s, cluster=j % 2, sparse_prefill=True, keep_logits=True)
           for j, s in enumerate(calls)]
    del fast
    gc.collect()
    torch.cuda.empty_cache()
    mem = FastLM(FastWeights.from_hf(model.cuda()), max_seq_len=64, kept_fraction=0.4)
    for sets, out in zip(calls, got):
        want = [t.clone() for t in mem.generate(prompt, 12, core_sets=sets, sparse_prefill=True, keep_logits=True).logits]
        assert out.sets_from == "gathered" and out.bus_bytes == 5 * 3 * H * k * 4
        assert len(out.logits) == len(want) == 12
        assert max((x - y).abs().max().item() for x, y in zip(out.logits, want)) < 1e-3


@pytest.mark.gpu
@needs_cuda
def test_cuda_eager_offload_similarity_from_host_equals_in_memory(tokenizer):
    """The eager path on CUDA: pinned host FFNs with down stored as rows, staging buffers of the same strides, a
    cluster's compact FFN copied from host in one copy (then resident): the in-memory logits (float32)."""
    from coreinfer.runtime.offload import MemoryBudget, ffn_bytes, offload_loaded
    from coreinfer.runtime.session import CoreSetSession

    ref, lm, budget = _in_memory_and_offloaded("gemma", tokenizer)
    offload_loaded(lm, MemoryBudget(budget, kept_fraction=0.4, context_length=96, layers="0:4"), "cuda")
    host = lm.adapter.dense[0].host
    assert host.down.is_pinned() and host.down.t().is_contiguous() and lm.offload.staging.slots[0].down.is_cuda
    n = lm.adapter.n_neurons
    g = torch.Generator().manual_seed(3)
    sets = {i: torch.randperm(n, generator=g)[:kept_count(0.4, n)].sort().values for i in range(4)}

    def session():
        return CoreSetSession(range(4), None, core_sets={i: c.clone() for i, c in sets.items()}, sparse_prefill=True)

    prompt = "Paris is the capital of France and Berlin is the capital of Germany."
    kw = dict(max_new_tokens=8, return_logits=True, method_used="similarity")
    want = ref.generate(prompt, session=session(), **kw)
    for moved in (4 * ffn_bytes(host.gather(sets[0])), 0):  # from host, then resident
        got = lm.generate(prompt, session=session(), **kw)
        assert got.token_ids == want.token_ids and got.stats.memory["bus_bytes"] == moved
        assert max((a - b).abs().max().item() for a, b in zip(want.logits, got.logits)) < 1e-3
