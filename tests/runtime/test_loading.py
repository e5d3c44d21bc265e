"""Model loading: bad specs get clear errors; the packaged real models load and generate (slow)."""

import pytest
import torch

from coreinfer.runtime.loading import ModelLoadError, load_model, resolve_dtype


@pytest.mark.parametrize("spec, match", [
    ("no-such-alias", "unknown model 'no-such-alias'"),
    ("./definitely/not/here", "unknown model"),
])
def test_unknown_specs(spec, match):
    with pytest.raises(ModelLoadError, match=match):
        load_model(spec)


def test_path_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        load_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        load_model(str(tmp_path))


def test_non_string_spec():
    with pytest.raises(TypeError, match="alias, a path or a hub id"):
        load_model(42)


def test_offline_hub_id_says_how_to_use_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="pass the local folder"):
        load_model("some-org/some-model-that-is-not-cached")


def test_device_and_dtype_errors():
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU is available"):
            load_model("smollm2-135m", device="cuda")
    with pytest.raises(ModelLoadError, match="dtype 'int8' is not supported"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.slow
def test_smollm2_end_to_end():
    from coreinfer.runtime import SparseLM

    lm = SparseLM.from_pretrained("smollm2-135m")
    assert lm.adapter.n_layers == 30 and lm.adapter.n_neurons == 1536
    out = lm.generate("The capital of France is", beta=0.5, layers="0:30", max_new_tokens=12)
    assert out.text.strip() and out.stats.method_used == "stability"
    assert out.stats.kept_fraction == 768 / 1536
    again = lm.generate("The capital of France is", beta=0.5, layers="0:30", max_new_tokens=12)
    assert again.token_ids == out.token_ids
    # beta = 1 scores equal the dense model's
    dense = lm.score("The capital of France is", " Paris, on the Seine.", method="dense")
    full = lm.score("The capital of France is", " Paris, on the Seine.", beta=1.0, layers="0:30")
    assert (dense.token_logprobs - full.token_logprobs).abs().max() <= 1e-5
    chat = lm.generate("Name a colour.", chat=True, max_new_tokens=8)
    assert chat.stats.prompt_tokens > 5  # the chat template wrapped the prompt


@pytest.mark.slow
def test_gemma3_end_to_end():
    from coreinfer.runtime import SparseLM

    lm = SparseLM.from_pretrained("gemma3-270m")
    assert lm.adapter.family.name == "gemma" and lm.adapter.act == "gelu_pytorch_tanh"
    dense = lm.score("The capital of France is", " Paris.", method="dense")
    full = lm.score("The capital of France is", " Paris.", beta=1.0, layers=f"0:{lm.adapter.n_layers}")
    assert (dense.token_logprobs - full.token_logprobs).abs().max() <= 1e-5
    out = lm.generate("The capital of France is", beta=0.6, max_new_tokens=8)
    assert out.text.strip()
