"""A prompt's sparse model as a plain transformers model: same logits as SparseLM, saved and loaded back."""

import pytest
import torch

from coreinfer.runtime.export import intermediate_sizes, load_sparse_model, save_folder
from coreinfer.runtime.session import CoreSetSession
from tests.conftest import FAMILIES, tiny_lm

PROMPT = "Paris is the capital of France and"
CONT = " Berlin is the capital of Germany."


def _layers(model):
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def _sparse_prefill_logprobs(lm, core_sets, ids, cont):
    """SparseLM's log-probs along prompt + continuation with these core sets known before the prefill."""
    session = CoreSetSession(range(min(core_sets), max(core_sets) + 1), None, core_sets=core_sets, sparse_prefill=True)
    return lm.score_ids(ids, cont, "stability", 0.4, 0.4, session.layers, session=session, keep_logprobs=True).logprobs


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "drelu"])
def test_sparse_model_logits_equal_sparse_lm(family, tokenizer):
    lm, reference = tiny_lm(family, tokenizer)
    core_sets = lm.generate(PROMPT, beta=0.3, layers="1:3", max_new_tokens=2).core_sets
    sparse = lm.sparse_model(core_sets)
    assert type(sparse) is type(reference)
    for i, layer in enumerate(_layers(sparse)):
        ffn, ref = (layer.fc1, _layers(reference)[i].fc1) if family == "opt" else (layer.mlp, _layers(reference)[i].mlp)
        assert type(ffn) is type(ref)  # the family's own module, smaller where sparse
        down = layer.fc2 if family == "opt" else layer.mlp.down_proj
        assert down.in_features == (len(core_sets[i]) if i in core_sets else lm.adapter.n_neurons)
    ids = lm.encode(PROMPT)
    cont = tokenizer(CONT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = sparse(input_ids=torch.cat([ids, torch.tensor([cont[:-1]])], dim=1)).logits[0, ids.shape[1] - 1:]
    expected = _sparse_prefill_logprobs(lm, core_sets, ids, cont)
    assert (logits.log_softmax(-1) - expected).abs().max() <= 1e-5
    with torch.no_grad():  # the SparseLM's own model is untouched: still dense
        assert (lm.model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "phi3", "opt"])
def test_export_round_trip(family, tokenizer, tmp_path):
    from transformers import pipeline

    from coreinfer.runtime.sparse_lm import SparseLM

    lm, _ = tiny_lm(family, tokenizer)
    sparse = lm.sparse_model(PROMPT, beta=0.3, layers="1:3")
    folder = save_folder(sparse, tokenizer, tmp_path / "export")
    assert intermediate_sizes(folder) == {1: 38, 2: 38}
    loaded = load_sparse_model(folder, dtype=torch.float32)
    ids = lm.encode(PROMPT)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, sparse(input_ids=ids).logits)
        hf = sparse.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=0, pad_token_id=1)[0, ids.shape[1]:].tolist()
    hf = hf[:hf.index(0)] if 0 in hf else hf
    again = SparseLM.from_pretrained(str(folder))  # an export folder is a model spec: dense = the exported FFNs
    out = again.generate(PROMPT, max_new_tokens=6)
    assert out.stats.method_used == "dense" and out.token_ids == hf
    assert out.stats.kept_fraction == pytest.approx((2 * 128 + 2 * 38) / (4 * 128))  # the exported FFNs' share
    text = pipeline("text-generation", model=sparse, tokenizer=tokenizer)(PROMPT, max_new_tokens=6, do_sample=False,
                                                                         return_full_text=False)[0]["generated_text"]
    assert text == tokenizer.decode(hf, skip_special_tokens=True)


def test_export_refuses_a_non_empty_folder(tokenizer, tmp_path):
    lm, _ = tiny_lm("llama", tokenizer)
    sparse = lm.sparse_model(PROMPT, beta=0.5, layers="1:3")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        save_folder(sparse, tokenizer, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_bad_core_sets_and_methods(tokenizer):
    lm, _ = tiny_lm("llama", tokenizer)
    with pytest.raises(ValueError, match="neuron indices in 0..127"):
        lm.sparse_model({1: torch.tensor([0, 128])})
    with pytest.raises(ValueError, match="layers 0..3"):
        lm.sparse_model({7: torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="no sparse model"):
        lm.sparse_model(PROMPT, method="dense")
    drelu, _ = tiny_lm("drelu", tokenizer)
    with pytest.raises(ValueError, match="dReLU"):
        drelu.sparse_model({1: torch.tensor([0, 1])})
