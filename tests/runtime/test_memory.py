"""Memory-budget plan (runtime/memory.py): budget parsing, the plan's byte counts on published shapes against
hand-computed numbers, and the errors for budgets and kept fractions that do not fit."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coreinfer.runtime.memory import (CORE_PAD, WORKSPACE_MARGIN, HostRowGather, MemoryBudgetError, ModelShape,  # noqa: E402
                                      check_budget_device, parse_budget, plan_memory, prefill_workspace_bytes)

GiB = 1 << 30

# Published config.json values (Hugging Face) of the issue's three shapes.
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False)
LLAMA_2_13B = dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                   num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)
OPT_30B = dict(hidden_size=7168, ffn_dim=28672, num_hidden_layers=48, num_attention_heads=56, vocab_size=50272,
               max_position_embeddings=2048, word_embed_proj_dim=7168, do_layer_norm_before=True)


def llama8b() -> ModelShape:
    return ModelShape.from_config(transformers.LlamaConfig(**LLAMA_31_8B))


def llama13b() -> ModelShape:
    return ModelShape.from_config(transformers.LlamaConfig(**LLAMA_2_13B))


def opt30b() -> ModelShape:
    return ModelShape.from_config(transformers.OPTConfig(**OPT_30B))


# ------------------------------------------------------------------------------------------- parse_budget

@pytest.mark.parametrize("text,expected", [
    ("12GiB", 12 * GiB), ("16GB", 16 * 10 ** 9), ("500MiB", 500 << 20), ("1.5 GiB", 3 * GiB // 2), ("2gib", 2 * GiB),
    ("4096", 4096), (123456789, 123456789), ("750kB", 750_000)])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["12 gigs", "-1", -1, 0, "0GiB", "", "GiB", "12GiBs", "1e9", True, 12.5, None])
def test_parse_budget_rejects_with_the_fix(bad):
    with pytest.raises(MemoryBudgetError) as err:
        parse_budget(bad)
    msg = str(err.value)
    assert "\n" not in msg and repr(bad) in msg and '"12GiB"' in msg


# ------------------------------------------------------------------------------------------- shapes and bytes

def test_llama8b_kept_04_decode_resident_matches_the_issue():
    """The issue's arithmetic: attention 2.7 GB + embeddings and lm_head 2.1 GB + core FFN 4.5 GB ~ 9.3 GB."""
    plan = plan_memory(llama8b(), "12GiB", kept_fraction=0.4, context_length=384, prompt_length=256)
    p = plan.parts
    # per layer: q (4096x4096) + k, v (4096x1024 each) + o (4096x4096) + two RMSNorms (4096), 2 bytes each
    assert p["attention"] == 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 2 * 4096) * 2 == 2_684_878_848
    assert p["embeddings"] == 128256 * 4096 * 2
    assert p["lm_head_norm"] == 128256 * 4096 * 2 + 4096 * 2
    k = 5734  # round(0.4 * 14336)
    assert plan.layer_k == {i: k for i in range(32)}
    assert p["core_ffn"] == 32 * 3 * 4096 * 5760 * 2  # k padded to 5760 = 90 * 64
    assert p["dense_ffn_outside_sparse"] == 0
    assert plan.decode_resident_bytes == 2_684_878_848 + 2 * 1_050_673_152 + 8192 + 4_529_848_320
    assert abs(plan.decode_resident_bytes / 1e9 - 9.3) < 0.05
    assert p["kv_cache"] == 2 * 32 * 8 * 128 * 384 * 2  # 50 MB
    assert plan.dense_layer_bytes == 3 * 4096 * 14336 * 2
    assert plan.staging_buffers == 2 and p["staging"] == 2 * plan.dense_layer_bytes
    # what is left after the rest holds whole dense layers: the first ones
    rest = plan.budget - sum(v for key, v in p.items() if key not in ("dense_ffn_resident_sparse", "cluster_cache"))
    n_res = rest // plan.dense_layer_bytes
    assert plan.resident_dense == list(range(n_res)) and plan.streamed == list(range(n_res, 32))
    assert plan.streamed_bytes() == (32 - n_res) * plan.dense_layer_bytes
    assert plan.cluster_slots == 1  # a second 4.5 GB core set does not fit in 12 GiB
    assert plan.resident_bytes <= plan.budget
    text = plan.describe()
    assert "compact core FFN" in text and "4.53 GB" in text and f"({n_res}..31)" in text


@pytest.mark.parametrize("kept,core_gb,decode_gb", [(0.2, 2.26, 7.05), (0.6, 6.79, 11.58)])
def test_llama8b_other_kept_fractions(kept, core_gb, decode_gb):
    """The issue: 0.2 -> 7.0 GB, 0.6 -> 11.6 GB decode-resident; both fit 12 GiB at a 384-token context."""
    plan = plan_memory(llama8b(), "12GiB", kept_fraction=kept, context_length=384, prompt_length=256)
    k = {0.2: 2867, 0.6: 8602}[kept]
    kp = -(-k // CORE_PAD) * CORE_PAD
    assert plan.parts["core_ffn"] == 32 * 3 * 4096 * kp * 2
    assert round(plan.parts["core_ffn"] / 1e9, 2) == core_gb
    assert round(plan.decode_resident_bytes / 1e9, 2) == decode_gb


def test_llama13b_under_16gib():
    """Issue: kept 0.4 of Llama-2-13B fits 16 GiB (about 16.1 GB with a 384-token KV cache); no room for a
    double buffer, so the prefill streams through one."""
    plan = plan_memory(llama13b(), "16GiB", kept_fraction=0.4, context_length=384, prompt_length=256)
    attn = 40 * (4 * 5120 * 5120 + 2 * 5120) * 2
    assert plan.parts["attention"] == attn
    assert plan.parts["kv_cache"] == 2 * 40 * 40 * 128 * 384 * 2
    assert plan.parts["core_ffn"] == 40 * 3 * 5120 * 5568 * 2  # k = 5530 -> 5568
    weights_kv = plan.decode_resident_bytes + plan.parts["kv_cache"]
    assert abs(weights_kv / 1e9 - 16.2) < 0.1
    assert plan.staging_buffers == 1 and plan.streamed == list(range(40))


def test_opt30b_under_40gib():
    """OPT: fc1 (I, H) + bias, fc2 (H, I) + bias, LayerNorms with biases, learned positions, tied lm_head."""
    plan = plan_memory(opt30b(), "40GiB", kept_fraction=0.4, context_length=384, prompt_length=256)
    H, I = 7168, 28672
    assert plan.parts["attention"] == 48 * (4 * H * H + 4 * H + 4 * H) * 2
    assert plan.parts["embeddings"] == (50272 + 2050) * H * 2
    assert plan.parts["lm_head_norm"] == 2 * H * 2  # tied: the final LayerNorm only
    kp = 11520  # k = round(0.4 * 28672) = 11469 -> 11520
    assert plan.parts["core_ffn"] == 48 * (2 * H * kp + kp + H) * 2
    assert plan.dense_layer_bytes == (2 * H * I + I + H) * 2
    assert abs((plan.decode_resident_bytes + plan.parts["kv_cache"]) / 1e9 - 36.8) < 0.15


def test_dense_layers_outside_the_sparse_range_are_resident():
    plan = plan_memory(llama8b(), "40GiB", kept_fraction=0.4, sparse_layers=range(5, 27), context_length=384)
    assert plan.parts["dense_ffn_outside_sparse"] == 10 * 3 * 4096 * 14336 * 2
    assert sorted(plan.layer_k) == list(range(5, 27))
    assert plan.streamed == [] and plan.staging_buffers == 0  # 40 GiB holds every dense FFN
    assert plan.resident_dense == list(range(32))
    assert plan.cluster_slots >= 2  # room left for further clusters' core FFNs


def test_layer_k_is_used_per_layer():
    plan = plan_memory(llama8b(), "40GiB", layer_k={3: 100, 4: 64}, context_length=128)
    assert plan.layer_k == {3: 100, 4: 64}
    assert plan.parts["core_ffn"] == (3 * 4096 * 128 + 3 * 4096 * 64) * 2
    assert plan.parts["dense_ffn_outside_sparse"] == 30 * 3 * 4096 * 14336 * 2


def test_workspace_estimate():
    s = llama8b()
    got = prefill_workspace_bytes(s, 256, 2)
    assert got == 256 * (6 * 4096 + 2 * 6144 + 4 * 14336) * 2 + 256 * 14336 * 24 + 2 * 128256 * 4 + WORKSPACE_MARGIN


# ------------------------------------------------------------------------------------------- errors

def test_budget_below_attention_embeddings_kv():
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(llama8b(), "4GiB", kept_fraction=0.2, context_length=384)
    msg = str(err.value)
    assert "below what must stay on the GPU" in msg and "attention 2.68 GB" in msg and "raise the budget" in msg


def test_kept_fraction_that_does_not_fit_names_what_would():
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(llama13b(), "16GiB", kept_fraction=0.6, context_length=384, prompt_length=256)
    msg = str(err.value)
    assert "kept fraction 0.6" in msg and "largest kept fraction that fits" in msg and "context" in msg
    # the largest kept fraction it names does fit, one more neuron does not
    k = int(msg.split("(k = ")[2].split(" of")[0])
    plan_memory(llama13b(), "16GiB", layer_k={i: k for i in range(40)}, context_length=384, prompt_length=256)
    with pytest.raises(MemoryBudgetError):
        plan_memory(llama13b(), "16GiB", layer_k={i: k + CORE_PAD for i in range(40)}, context_length=384,
                    prompt_length=256)


def test_longest_context_named_when_only_the_context_is_too_long():
    # 0.4 fits 16 GiB at 384 positions, not at 4096: the message names a context between the two that fits
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(llama13b(), "16GiB", kept_fraction=0.4, context_length=4096)
    msg = str(err.value)
    n = int(msg.split("longest context that fits at this kept fraction is ")[1].split(" tokens")[0])
    assert 384 <= n < 4096
    plan_memory(llama13b(), "16GiB", kept_fraction=0.4, context_length=n)
    with pytest.raises(MemoryBudgetError):
        plan_memory(llama13b(), "16GiB", kept_fraction=0.4, context_length=n + KV_STEP)


KV_STEP = 16


def test_check_request():
    plan = plan_memory(llama8b(), "12GiB", kept_fraction=0.4, context_length=384)
    plan.check_request({i: 5734 for i in range(32)}, 384)
    plan.check_request({i: 5700 for i in range(32)}, 100)  # same padded size
    with pytest.raises(MemoryBudgetError, match="exceeds the 384 positions"):
        plan.check_request({i: 5734 for i in range(32)}, 385)
    with pytest.raises(MemoryBudgetError, match="reserved 5734"):
        plan.check_request({i: 8602 for i in range(32)}, 384)


def test_bad_plan_arguments():
    with pytest.raises(MemoryBudgetError, match="context_length"):
        plan_memory(llama8b(), "12GiB", context_length=0)
    with pytest.raises(MemoryBudgetError, match="exceeds the model's 4096 positions"):
        plan_memory(llama13b(), "16GiB", context_length=5000)
    with pytest.raises(ValueError, match="beta"):
        plan_memory(llama8b(), "12GiB", kept_fraction=1.5)


def test_device_checks_on_this_machine():
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        with pytest.raises(MemoryBudgetError, match="exceeds the GPU"):
            check_budget_device(total + 1, "cuda")
        assert check_budget_device(1 << 30, "cuda").type == "cuda"
    else:
        with pytest.raises(MemoryBudgetError, match="no CUDA GPU"):
            check_budget_device(1 << 30, None)
        with pytest.raises(MemoryBudgetError, match="no CUDA GPU"):
            check_budget_device(1 << 30, "cuda")
    assert check_budget_device(1 << 30, "cpu").type == "cpu"
    with pytest.raises(MemoryBudgetError, match="CUDA device"):
        check_budget_device(1 << 30, "meta")


def test_largest_core_k_and_longest_context():
    from coreinfer.runtime.memory import largest_core_k, longest_context

    k = largest_core_k(llama13b(), "16GiB", context_length=384, prompt_length=256)
    plan_memory(llama13b(), "16GiB", layer_k={i: k for i in range(40)}, context_length=384, prompt_length=256)
    with pytest.raises(MemoryBudgetError):
        plan_memory(llama13b(), "16GiB", layer_k={i: k + 1 for i in range(40)}, context_length=384, prompt_length=256)
    ks = {i: 5530 for i in range(40)}
    n = longest_context(llama13b(), "16GiB", ks)
    assert 384 <= n < 4096
    plan_memory(llama13b(), "16GiB", layer_k=ks, context_length=n)
    with pytest.raises(MemoryBudgetError):
        plan_memory(llama13b(), "16GiB", layer_k=ks, context_length=n + 1)
    assert largest_core_k(llama8b(), "4GiB", context_length=384) == 0


def test_host_row_gather_copies_rows_in_turn_and_refuses_more_than_it_holds():
    g = torch.Generator().manual_seed(0)
    rows, bias = torch.randn(10, 4, generator=g), torch.randn(10, generator=g)
    gather = HostRowGather(3 * 4 + 3 + 4, torch.float32, pin=False)
    idx = torch.tensor([1, 4, 9])
    dst = torch.zeros(32)
    for _ in range(3):  # the two buffers in turn
        n = gather.copy([(rows, idx), (bias, idx), (rows[0], None)], dst)
        assert n == 19 and torch.equal(dst[:n], torch.cat([rows[idx].reshape(-1), bias[idx], rows[0]]))
    with pytest.raises(ValueError, match="exceed the 19 the row buffers hold"):
        gather.copy([(rows, torch.arange(5))], dst)
