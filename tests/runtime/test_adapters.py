"""Every adapter: keep ratio 1 equals the dense model, and the compact FFN equals the masked dense FFN."""

import pytest
import torch

from coreinfer.runtime.adapters import UnsupportedArchitecture, install
from tests.conftest import FAMILIES, tiny_lm

PROMPT = "Paris is the capital of France and"
CONT = " Berlin is the capital of Germany."


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_one_score_equals_dense_reference(family, tokenizer):
    lm, reference = tiny_lm(family, tokenizer)
    out = lm.score(PROMPT, CONT, method="stability", beta=1.0, layers=f"0:{lm.adapter.n_layers}")
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"] + out.token_ids])
    with torch.no_grad():
        ref = reference(input_ids=ids).logits[0].float().log_softmax(-1)
    n_prompt = ids.shape[1] - len(out.token_ids)
    ref_lp = ref[n_prompt - 1:-1].gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert (out.token_logprobs - ref_lp).abs().max() <= 1e-5
    assert out.stats.kept_fraction == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_beta_one_generate_equals_dense_reference(family, tokenizer):
    lm, reference = tiny_lm(family, tokenizer)
    n = lm.adapter.n_layers
    ids = lm.encode(PROMPT)
    # reference greedy loop on the untouched model, full recompute each step (no cache shared with ours)
    seq = ids.clone()
    ref_logits = []
    with torch.no_grad():
        for _ in range(8):
            logits = reference(input_ids=seq).logits[0, -1]
            ref_logits.append(logits)
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    expected = seq[0, ids.shape[1]:].tolist()
    eos = lm._eos_ids()
    if any(t in eos for t in expected):
        expected = expected[: next(i for i, t in enumerate(expected) if t in eos)]
    out = lm.generate(PROMPT, method="stability", beta=1.0, layers=f"0:{n}", max_new_tokens=8, return_logits=True)
    assert out.token_ids == expected
    assert len(out.logits) >= len(expected)
    for ours, ref in zip(out.logits, ref_logits):
        assert (ours - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_compact_ffn_equals_masked_dense(family, tokenizer):
    lm, _ = tiny_lm(family, tokenizer)
    torch.manual_seed(1)
    dense = lm.adapter.dense[1]
    x = torch.randn(3, 5, lm.adapter.hidden_size)
    core = torch.randperm(dense.n_neurons)[:40].sort().values
    mask = torch.zeros(dense.n_neurons)
    mask[core] = 1
    expected = dense.output(dense.intermediate(x) * mask)
    compact = dense.gather(core)
    assert compact.n_neurons == 40
    assert (compact(x) - expected).abs().max() <= 1e-5
    assert compact.nbytes() < dense.nbytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_ffn_matches_library_module(family, tokenizer):
    """Our FFN formula reproduces the library's own MLP module (or the hand-written dReLU one)."""
    lm, reference = tiny_lm(family, tokenizer)
    x = torch.randn(2, 4, lm.adapter.hidden_size)
    layer = reference.model.decoder.layers[0] if family == "opt" else reference.model.layers[0]
    with torch.no_grad():
        if family == "opt":
            ref = layer.fc2(layer.activation_fn(layer.fc1(x)))
        else:
            ref = layer.mlp(x)
    assert (lm.adapter.dense[0](x) - ref).abs().max() <= 1e-5


def test_unsupported_architecture_lists_supported(tokenizer):
    import transformers as tf

    cfg = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2)
    model = tf.GPT2LMHeadModel(cfg)
    from contextvars import ContextVar

    with pytest.raises(UnsupportedArchitecture, match="Supported architectures: llama"):
        install(model, ContextVar("x", default=None))


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "drelu"])  # transformers has no dReLU activation
def test_wrapping_leaves_state_dict_and_save_pretrained_alone(family, tokenizer, tmp_path):
    """save_pretrained of a wrapped model reloads with plain transformers: the same tensors, the same logits."""
    from transformers import AutoModelForCausalLM

    lm, reference = tiny_lm(family, tokenizer)
    lm.generate(PROMPT, beta=0.5, layers="0:4", max_new_tokens=2)  # a sparse call has run on it
    ours, theirs = lm.model.state_dict(), reference.state_dict()
    assert list(ours) == list(theirs)
    lm.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    again = reloaded.state_dict()
    assert list(again) == list(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(again[name], tensor), name
    ids = lm.encode(PROMPT)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)
        assert (lm.model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5
