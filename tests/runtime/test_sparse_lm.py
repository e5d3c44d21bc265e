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
        cache = o.cache
        for layer, core in out.core_sets.items():
            keep = torch.zeros(lm.adapter.n_neurons, dtype=torch.bool)
            keep[core] = True
            ref.model.layers[layer].mlp.down_proj.weight[:, ~keep] = 0
        for step, token in enumerate(out.token_ids[:-1]):
            o = ref(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = o.cache
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
    (dict(temperature=0.0, do_sample=True), "strictly positive"),  # transformers' own check
    (dict(foo=3), "not used by the model"),  # an unknown keyword: transformers' own error
    (dict(prompt=[]), "list of prompts is empty"),
    (dict(prompt=torch.zeros(2, 0, dtype=torch.long)), "non-empty"),
    (dict(prompt=torch.ones(3)), "must be integers"),
    (dict(prompt=[PROMPT, "x"], on_text=print), "follow one prompt"),
    (dict(fast_path=True), "the fast path runs on CUDA and this model is on cpu; pass fast_path=None"),
    (dict(fast_path="yes"), "fast_path must be"),
])
def test_bad_input_errors(lm, kwargs, match):
    args = dict(prompt=PROMPT, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        lm.generate(args.pop("prompt"), **args)


def test_bad_types(lm):
    with pytest.raises(TypeError, match="prompt must be a str, a list of str or a tensor"):
        lm.generate(42)
    with pytest.raises(TypeError, match="item 1 is int"):
        lm.generate([PROMPT, 3])
    with pytest.raises(ValueError, match="chat template to text"):
        lm.generate(lm.encode(PROMPT)[0], chat=True)
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


# ---- transformers' generation arguments, batches, seeds, the fast-path switch -------------------------------

def _hf_generate(ref, ids, **kwargs):
    """The untouched dense model's own transformers generate: the reference for generation arguments."""
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), **(dict(eos_token_id=0, pad_token_id=1) | kwargs))
    return out[:, ids.shape[1]:].tolist()


def _dense_twin(tokenizer):
    return build_tiny("llama", tokenizer, seed=0)[1]  # the fixture's weights, in a model we never wrapped


@pytest.mark.parametrize("kwargs", [
    dict(repetition_penalty=1.5),
    dict(num_beams=3),
    dict(no_repeat_ngram_size=2),
    dict(do_sample=True, top_k=5, temperature=0.7),
])
def test_generation_keywords_reach_transformers(lm, tokenizer, kwargs):
    """At kept fraction 1.0 SparseLM.generate with a transformers keyword equals plain transformers' generate."""
    ids, twin = lm.encode(PROMPT), _dense_twin(tokenizer)
    torch.manual_seed(11)
    expected = _hf_generate(twin, ids, max_new_tokens=10, **(dict(do_sample=False) | kwargs))[0]
    out = lm.generate(PROMPT, beta=1.0, layers="0:4", max_new_tokens=10, seed=11, **kwargs)
    assert out.stats.kept_fraction == 1.0
    assert out.token_ids == expected[:len(out.token_ids)] and len(out.token_ids) >= 1
    plain = lm.generate(PROMPT, beta=1.0, layers="0:4", max_new_tokens=10)
    assert out.token_ids != plain.token_ids  # the keyword changed the output


def test_generation_config_and_eos_and_min_new_tokens(lm, tokenizer):
    from transformers import GenerationConfig

    by_kwarg = lm.generate(PROMPT, method="dense", max_new_tokens=10, repetition_penalty=1.5)
    by_config = lm.generate(PROMPT, method="dense", max_new_tokens=10,
                            generation_config=GenerationConfig(repetition_penalty=1.5))
    assert by_config.token_ids == by_kwarg.token_ids
    third = by_kwarg.token_ids[2]
    cut = lm.generate(PROMPT, method="dense", max_new_tokens=10, repetition_penalty=1.5, eos_token_id=third)
    assert cut.token_ids == by_kwarg.token_ids[:2] and cut.stats.stop_reason == "eos"
    longer = lm.generate(PROMPT, method="dense", max_new_tokens=10, repetition_penalty=1.5, eos_token_id=third,
                         min_new_tokens=5)
    expected = _hf_generate(_dense_twin(tokenizer), lm.encode(PROMPT), max_new_tokens=10, repetition_penalty=1.5,
                            min_new_tokens=5, do_sample=False, eos_token_id=third)[0]
    expected = expected[:5 + expected[5:].index(third)] if third in expected[5:] else expected
    assert longer.token_ids == expected and len(longer.token_ids) >= 5
    greedy = lm.generate(PROMPT, method="dense", max_new_tokens=6, do_sample=False, temperature=0.0)
    assert greedy.token_ids == lm.generate(PROMPT, method="dense", max_new_tokens=6).token_ids


def test_stop_strings_alias(lm):
    out = lm.generate(PROMPT, method="dense", max_new_tokens=12)
    stop = out.text[3:5]
    a = lm.generate(PROMPT, method="dense", max_new_tokens=12, stop=[stop])
    b = lm.generate(PROMPT, method="dense", max_new_tokens=12, stop_strings=[stop])
    assert a.token_ids == b.token_ids and a.text == b.text == out.text[:out.text.index(stop)]
    assert stop in lm.tokenizer.decode(a.token_ids)  # the tokens that completed the stop string are kept


def test_batch_equals_prompts_run_alone(lm):
    prompts = ["Two plus two equals four; three times five", "def add(a, b):\n    return a + b\nprint(add",
               "Paris is"]
    alone = [lm.generate(p, beta=0.3, layers="0:4", max_new_tokens=8, return_logits=True) for p in prompts]
    assert any(not torch.equal(alone[0].core_sets[i], alone[2].core_sets[i]) for i in range(4))
    batch = lm.generate(prompts, beta=0.3, layers="0:4", max_new_tokens=8, return_logits=True)
    assert isinstance(batch, list) and len(batch) == 3
    for one, row in zip(alone, batch):
        assert row.token_ids == one.token_ids and row.text == one.text
        assert row.stats.prompt_tokens == one.stats.prompt_tokens and row.stats.stop_reason == one.stats.stop_reason
        for i in range(4):
            assert torch.equal(row.core_sets[i], one.core_sets[i])
        assert len(row.logits) == len(one.logits)
        assert max((a - b).abs().max() for a, b in zip(row.logits, one.logits)) <= 1e-4
    ids = torch.cat([lm.encode(prompts[0]), lm.encode(prompts[0])])  # a 2-D tensor of ids is a batch too
    twice = lm.generate(ids, beta=0.3, layers="0:4", max_new_tokens=8)
    assert [o.token_ids for o in twice] == [alone[0].token_ids] * 2
    assert lm.generate(ids[0], beta=0.3, layers="0:4", max_new_tokens=8).token_ids == alone[0].token_ids


def test_seed_leaves_global_rng_alone(lm):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = lm.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = lm.generate(PROMPT, max_new_tokens=8, do_sample=True, seed=5)
    assert a.token_ids == b.token_ids


def test_eager_path_records_why(lm):
    out = lm.generate(PROMPT, max_new_tokens=2)
    assert out.stats.path == "eager" and out.stats.fallback_reason == "the fast path runs on CUDA and this model is on cpu"
    assert lm.generate(PROMPT, max_new_tokens=2, fast_path=False).stats.fallback_reason is None


def test_greedy_unless_asked_even_when_the_checkpoint_samples(tokenizer):
    """A checkpoint whose generation config samples (as Llama-3.1-Instruct's does) still decodes greedily by
    default; do_sample=True then samples with the checkpoint's temperature, as transformers would."""
    lm, reference = tiny_lm("llama", tokenizer)
    lm.model.generation_config.do_sample, lm.model.generation_config.temperature = True, 0.7
    greedy = lm.generate(PROMPT, method="dense", max_new_tokens=8)
    ids = lm.encode(PROMPT)
    assert greedy.token_ids == _hf_generate(reference, ids, max_new_tokens=8, do_sample=False)[0][:len(greedy.token_ids)]
    sampled = lm.generate(PROMPT, method="dense", max_new_tokens=8, do_sample=True, seed=4)
    torch.manual_seed(4)
    expected = _hf_generate(reference, ids, max_new_tokens=8, do_sample=True, temperature=0.7)[0]
    assert sampled.token_ids == expected[:len(sampled.token_ids)] and sampled.token_ids != greedy.token_ids
