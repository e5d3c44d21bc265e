"""The one-launch decode step (``runtime/cuda/megakernel.py``) against the reference step, on CPU through
Triton's interpreter (float32, tiny random models of each family it covers).

    TRITON_INTERPRET=1 python -m benchmarks.megakernel_check     (from the repo root; run by
    tests/benchmarks/test_megakernel_check.py)

The interpreter runs the programs one after another, so this checks the arithmetic, the task numbering and
the counters' reset, not the cross-program waits (the GPU tests do: tests/runtime/test_cuda_fastpath.py).
"""

import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402
import transformers  # noqa: E402

from coreinfer.runtime.cuda import megakernel  # noqa: E402  (imported after the interpreter switch)
from coreinfer.runtime.cuda.bench import step_variant  # noqa: E402
from coreinfer.runtime.cuda.fastlm import FastPathError, FastWeights, Sampling  # noqa: E402

MEGA = {"gemv": "triton", "megakernel": True}
REF = {"gemv": "torch"}  # PyTorch ops, eager: the reference the other CPU tests hold to Hugging Face


def tiny(family: str, seed: int, hidden: int = 64, heads: int = 4):
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=3, num_attention_heads=heads, vocab_size=97,
                  max_position_embeddings=128, intermediate_size=160)
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=heads // 2, **common)
    elif family == "mistral":  # a window shorter than the sequences
        cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=9, **common)
    else:  # qwen2: q/k/v biases, tied embeddings
        cfg = transformers.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return FastWeights.from_hf(model)


def ids(n, seed):
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


def check_logits(weights, name, **kw):
    prompt, cont = ids(14, 1), ids(6, 2)
    ref, core = step_variant(weights, REF, max_seq_len=40, **kw).forced_logits(prompt, cont)
    fast = step_variant(weights, MEGA, max_seq_len=40, **kw)
    got, _ = fast.forced_logits(prompt, cont, core_sets=core or None)
    err = rel(got, ref)
    assert err < 1e-5, (name, kw, err)
    assert not fast._mega.cnt.any() and int(fast._mega.best) == megakernel.INT64_MIN  # reset for the next launch
    again, _ = fast.forced_logits(prompt, cont, core_sets=core or None)
    assert torch.equal(again, got), name  # replays are bit-identical
    print(f"{name} {kw}: rel err {err:.2e}")
    return fast, core


# dense, some layers sparse, per-layer core-set sizes; a hidden width that is not a power of two; a sliding
# window; q/k/v biases
for family, hidden, heads, kws in [
        ("llama", 64, 4, [{}, dict(kept_fraction=0.4, sparse_layers=range(1, 3)), dict(layer_k={0: 33, 2: 101})]),
        ("llama", 48, 3, [dict(layer_k={1: 70, 2: 9})]),
        ("mistral", 64, 4, [dict(kept_fraction=0.4)]),
        ("qwen2", 64, 4, [{}])]:
    w = tiny(family, seed=hidden, hidden=hidden, heads=heads)
    for kw in kws:
        check_logits(w, family, **kw)

# the token the launch picks itself (greedy; a seeded draw) = the one the separate argmax / draw kernel picks
# from the same logits (``keep_logits`` makes the step hand its logits to that kernel)
w = tiny("llama", seed=5)
fast, core = check_logits(w, "llama", kept_fraction=0.5)
prompt = ids(14, 3)
for sampling in (None, Sampling(temperature=0.8, seed=11), Sampling(temperature=2.0, seed=12)):
    own = fast.generate(prompt, 10, sampling=sampling).tokens
    sep = fast.generate(prompt, 10, sampling=sampling, keep_logits=True).tokens
    assert own == sep, (sampling, own, sep)
    print("picked in the launch = picked apart:", sampling, own)
s = Sampling(temperature=1.5, seed=11)
assert fast.generate(prompt, 10, sampling=s).tokens != fast.generate(prompt, 10, sampling=Sampling(1.5, seed=99)).tokens
# top-k / top-p: the launch leaves the token to the cutoff + draw kernels, as the multi-launch step
multi = step_variant(w, {"gemv": "triton"}, max_seq_len=40, kept_fraction=0.5)
s = Sampling(temperature=1.2, top_k=20, top_p=0.9, seed=4)
assert fast.generate(prompt, 10, sampling=s).tokens == multi.generate(prompt, 10, sampling=s).tokens
print("top-k / top-p as the multi-launch step")

# what it does not cover is refused with the reason
opt = transformers.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, vocab_size=97,
                             word_embed_proj_dim=64, do_layer_norm_before=True)
ow = FastWeights.from_hf(transformers.AutoModelForCausalLM.from_config(opt).eval())
try:
    step_variant(ow, MEGA, max_seq_len=40)
except FastPathError as err:
    assert "megakernel=True" in str(err) and "RMSNorm" in str(err), err
    print("refused:", err)
else:
    raise AssertionError("OPT was not refused")
print("megakernel ok")
