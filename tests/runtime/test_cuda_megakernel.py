"""The one-launch decode step (coreinfer.runtime.cuda.megakernel) on a GPU, where its programs run at once
and wait on each other: against the plain multi-launch step and Hugging Face's model. (Its arithmetic on CPU,
through Triton's interpreter: tests/benchmarks/test_megakernel_check.py.)"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from coreinfer.runtime.cuda.bench import step_variant  # noqa: E402
from coreinfer.runtime.cuda.fastlm import FastWeights, Sampling  # noqa: E402
from coreinfer.runtime.cuda.reference import EagerReference  # noqa: E402
from tests.runtime.test_cuda_fastpath import _ids, _tiny  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MEGA = {"megakernel": True}
PLAIN = {"pdl": False, "fused_norm": False}  # the multi-launch step, unfused


def _wide(dtype, seed=7):
    """Wide enough that every phase has more tasks than the GPU has programs."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=3, num_attention_heads=8,
                                   num_key_value_heads=2, vocab_size=5000, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(cfg).to("cuda", dtype).eval()


@pytest.mark.parametrize("family, kw", [("llama", {}), ("llama", {"kept_fraction": 0.4}),
                                        ("llama", {"layer_k": {0: 33, 2: 101}}), ("mistral", {"kept_fraction": 0.4}),
                                        ("qwen2", {})], ids=["llama-dense", "llama-0.4", "llama-layer_k",
                                                             "mistral-0.4", "qwen2-dense"])
def test_megakernel_equals_plain_step_float32(family, kw):
    weights = FastWeights.from_hf(_tiny(family, seed=51, device="cuda"))
    prompt, cont = _ids(33, 52), _ids(40, 53)  # 73 positions: two key blocks; past Mistral's window of 9
    ref, core = step_variant(weights, PLAIN, max_seq_len=80, **kw).forced_logits(prompt, cont)
    fast = step_variant(weights, MEGA, max_seq_len=80, **kw)
    assert fast._mega is not None and fast.cuda_graph
    got, _ = fast.forced_logits(prompt, cont, core_sets=core or None)
    assert (got - ref).abs().max().item() < 1e-3
    assert not fast._mega.cnt.any()  # every launch leaves its counters at zero


@pytest.mark.parametrize("kept", [None, 0.4])
def test_megakernel_wide_model_many_programs(kept):
    """float32: every phase spans all SMs; greedy tokens, logits, and bit-identical replays."""
    weights = FastWeights.from_hf(_wide(torch.float32))
    prompt, cont = _ids(40, 61, 5000), _ids(24, 62, 5000)
    plain = step_variant(weights, PLAIN, max_seq_len=80, kept_fraction=kept)
    mega = step_variant(weights, MEGA, max_seq_len=80, kept_fraction=kept)
    ref, core = plain.forced_logits(prompt, cont)
    got, _ = mega.forced_logits(prompt, cont, core_sets=core or None)
    assert (got - ref).abs().max().item() < 1e-3
    again, _ = mega.forced_logits(prompt, cont, core_sets=core or None)
    assert torch.equal(got, again)
    assert mega.generate(prompt, 24).tokens == plain.generate(prompt, 24).tokens


def test_megakernel_bf16_matches_hugging_face():
    model = _wide(torch.bfloat16, seed=9)
    weights = FastWeights.from_hf(model)
    prompt, cont = _ids(33, 63, 5000), _ids(60, 64, 5000)
    got, core = step_variant(weights, MEGA, max_seq_len=128, kept_fraction=0.4).forced_logits(prompt, cont)
    ref, _ = EagerReference(model).forced_logits(prompt, cont, kept_fraction=0.4, core_sets=core)
    rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_megakernel_token_pick_equals_separate_kernel():
    """The token picked inside the launch (greedy; a seeded draw) is the one the separate argmax / draw kernel
    picks from the same logits (``keep_logits`` hands them to it); a seed fixes the draws."""
    weights = FastWeights.from_hf(_wide(torch.float32, seed=11))
    prompt = _ids(30, 65, 5000)
    mega = step_variant(weights, MEGA, max_seq_len=80, kept_fraction=0.4)
    for sampling in (None, Sampling(temperature=0.9, seed=3), Sampling(temperature=1.5, seed=4)):
        own = mega.generate(prompt, 20, sampling=sampling).tokens
        assert own == mega.generate(prompt, 20, sampling=sampling, keep_logits=True).tokens
        assert own == mega.generate(prompt, 20, sampling=sampling).tokens
    s = Sampling(temperature=1.2, top_k=50, top_p=0.9, seed=5)
    multi = step_variant(weights, {}, max_seq_len=80, kept_fraction=0.4)
    core = {li: idx for li, idx in mega.generate(prompt, 1).core_sets.items()}
    assert mega.generate(prompt, 20, sampling=s, core_sets=core).tokens == \
        multi.generate(prompt, 20, sampling=s, core_sets=core).tokens
