"""SparseLM behaviour on a tiny Llama: stats, sparse decoding, bad input, concurrency, streaming."""

import threading
import time

import pytest
import torch

from coreinfer.runtime.selection import kept_count, stability_select
from tests.conftest import build_tiny, tiny_lm

PROMPT = "Write a short poem about the sea and the wind"


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("llama", tokenizer)[0]


def test_kept_fraction_matches_request(lm):
    n, i = lm.adapter.n_layers, lm.adapter.n_neurons
    out = lm.generate(PROMPT, beta=0.5, layers=f"0:{n}", max_new_tokens=4)
    assert out.stats.kept_fraction == kept_count(0.5, i) / i == 0.5
    assert out.stats.neurons_per_layer == 64
    assert sorted(out.core_sets) == list(range(n)) and all(len(c) == 64 for c in out.core_sets.values())
    out = lm.generate(PROMPT, beta=0.25, layers="1:3", max_new_tokens=4)
    assert out.stats.layers == [1, 2]
    assert out.stats.kept_fraction == pytest.approx((2 * 32 + 2 * 128) / (4 * 128))


def test_core_sets_come_from_prompt_prefill(lm, tokenizer):
    """The stored core set of each layer is stability_select of that layer's prefill activations."""
    captured = {}
    ids = lm.encode(PROMPT)
    lm.capture(ids, None, lambda layer, acts: captured.setdefault(layer, acts[0].clone()))
    for score in ("positive", "magnitude"):
        out = lm.generate(PROMPT, beta=0.3, alpha=0.5, layers="0:4", max_new_tokens=2, score=score)
        for layer in range(4):
            assert torch.equal(out.core_sets[layer], stability_select(captured[layer], alpha=0.5, beta=0.3, score=score))
    assert lm.generate(PROMPT, max_new_tokens=1).stats.score == "magnitude"  # the measured default


def test_sparse_decode_uses_only_core_neurons(lm, tokenizer):
    """Reference: the library's own model, prefilled dense, then decoding with non-core FFN columns zeroed."""
    out = lm.generate(PROMPT, beta=0.4, layers="1:3", max_new_tokens=6, return_logits=True)
    ref = build_tiny("llama", tokenizer, seed=0)[1]  # same weights as the fixture's model, untouched by us
    with torch.no_grad():
        o = ref(input_ids=lm.encode(PROMPT), use_cache=True)
        assert (o.logits[0, -1] - out.logits[0]).abs().max() <= 1e-5  # the prefill is dense
        cache = o.past_key_values
        for layer, core in out.core_sets.items():
            keep = torch.zeros(lm.adapter.n_neurons, dtype=torch.bool)
            keep[core] = True
            ref.model.layers[layer].mlp.down_proj.weight[:, ~keep] = 0
        for step, token in enumerate(out.token_ids[:-1]):
            o = ref(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            assert (o.logits[0, -1] - out.logits[step + 1]).abs().max() <= 1e-5


def test_greedy_is_reproducible_and_sampling_seeded(lm):
    a = lm.generate(PROMPT, beta=0.5, max_new_tokens=10)
    b = lm.generate(PROMPT, beta=0.5, max_new_tokens=10)
    assert a.token_ids == b.token_ids
    s1 = lm.generate(PROMPT, beta=0.5, max_new_tokens=10, do_sample=True, seed=3, top_k=20, top_p=0.9)
    s2 = lm.generate(PROMPT, beta=0.5, max_new_tokens=10, do_sample=True, seed=3, top_k=20, top_p=0.9)
    assert s1.token_ids == s2.token_ids


def test_streaming_callback_and_stop_string(lm):
    chunks = []
    out = lm.generate(PROMPT, method="dense", max_new_tokens=12, on_text=chunks.append)
    assert "".join(chunks) == out.text
    if len(out.text) > 3:
        stop = out.text[2:4]
        cut = lm.generate(PROMPT, method="dense", max_new_tokens=12, stop=[stop])
        assert cut.stats.stop_reason == "stop_string" and stop not in cut.text
        assert out.text.startswith(cut.text)


def test_text_streamer(lm, tokenizer, capsys):
    from transformers import TextStreamer

    out = lm.generate(PROMPT, method="dense", max_new_tokens=6, streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.strip() == out.text.strip()


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=""), "empty"),
    (dict(prompt="   \n"), "empty"),
    (dict(beta=0.0), "beta must be in"),
    (dict(beta=1.2), "beta must be in"),
    (dict(alpha=-1), "alpha must be in"),
    (dict(layers="0:99"), "outside the model's 4 layers"),
    (dict(layers="3:1"), "outside"),
    (dict(layers="x"), "start:stop"),
    (dict(method="magic"), "unknown method"),
    (dict(max_new_tokens=0), "positive int"),
    (dict(max_new_tokens=300), "context window of 256"),
    (dict(temperature=0.0, do_sample=True), "temperature"),
])
def test_bad_input_errors(lm, kwargs, match):
    args = dict(prompt=PROMPT, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        lm.generate(args.pop("prompt"), **args)


def test_bad_types(lm):
    with pytest.raises(TypeError, match="prompt must be a str"):
        lm.generate(["list"])
    with pytest.raises(TypeError, match="unknown generation arguments"):
        lm.generate(PROMPT, num_beams=4)
    with pytest.raises(ValueError, match="needs core sets known before the prefill"):
        lm.generate(PROMPT, sparse_prefill=True)


def test_prompt_longer_than_context(lm):
    with pytest.raises(ValueError, match="exceeds the model's context window"):
        lm.generate("sea " * 400, max_new_tokens=1)
    with pytest.raises(ValueError, match="exceeds the model's context window"):
        lm.score("sea " * 200, " wind" * 100)


def test_fractional_layers(lm):
    assert lm.resolve_layers("0.25:0.75") == range(1, 3)
    assert lm.resolve_layers(None) == range(1, 3)  # 5/32 and 27/32 of 4 layers
    assert lm.resolve_layers(":2") == range(0, 2)


def test_concurrent_calls_never_share_core_sets(lm):
    prompts = ["Two plus two equals four; three times five", "def add(a, b):\n    return a + b\nprint(add"]
    alone = [lm.generate(p, beta=0.3, layers="0:4", max_new_tokens=8) for p in prompts]
    assert any(not torch.equal(alone[0].core_sets[i], alone[1].core_sets[i]) for i in range(4))
    results = [None, None]
    barrier = threading.Barrier(2)

    def run(k):
        barrier.wait()
        # the callback yields the GIL mid-decode so the two calls interleave step by step
        results[k] = lm.generate(prompts[k], beta=0.3, layers="0:4", max_new_tokens=8,
                                 on_text=lambda _t: time.sleep(0.002))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert results[k].token_ids == alone[k].token_ids
        for i in range(4):
            assert torch.equal(results[k].core_sets[i], alone[k].core_sets[i])


def test_no_session_leaks_after_call(lm):
    lm.generate(PROMPT, beta=0.3, max_new_tokens=2)
    assert lm._active.get() is None  # the model is dense again outside a call
    ids = lm.encode(PROMPT)
    with torch.no_grad():
        direct = lm.model(input_ids=ids).logits
    dense = lm.score(PROMPT, " sea", method="dense")
    assert torch.allclose(direct[0, -1].log_softmax(-1)[dense.token_ids[0]], dense.token_logprobs[0], atol=1e-5)
