"""Shared fixtures: tiny models of every supported family, built from configs (no download)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("COREINFER_DATA", REPO.parent / "shared" / "data"))

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Two plus two equals four; three times five is fifteen.",
    "Write a short poem about the sea and the wind in the evening.",
    "def add(a, b):\n    return a + b",
    "Translate to German: good morning, how are you today?",
]


@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences: real tokenisation, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _config(family: str, vocab: int):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=0,
                  pad_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    if family in ("llama", "reglu", "drelu"):
        cfg = tf.LlamaConfig(**common, hidden_act="relu" if family != "llama" else "silu")
    elif family == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common)
    elif family == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=16, hidden_activation="gelu_pytorch_tanh")
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, hidden_activation="gelu_pytorch_tanh", sliding_window=8)
    elif family == "phi3":
        cfg = tf.Phi3Config(**common, pad_token_id_=None) if False else tf.Phi3Config(**common)
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=64, eos_token_id=0, pad_token_id=1,
                           bos_token_id=0, enable_bias=True, do_layer_norm_before=True)
    else:
        raise KeyError(family)
    return cfg


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "gemma3", "phi3", "opt", "reglu", "drelu"]


def _drelu_reference(model) -> None:
    """Hand-written dReLU MLP forward for the reference model: relu(gate x) * relu(up x)."""
    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda m: (lambda x: m.down_proj(torch.relu(m.gate_proj(x)) * torch.relu(m.up_proj(x)))))(mlp)


def build_tiny(family: str, tokenizer, seed: int = 0):
    """(model for SparseLM, untouched dense reference copy) of a tiny random model of ``family``."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = _config(family, len(tokenizer))
    cls = tf.Gemma3ForCausalLM if family == "gemma3" else tf.AutoModelForCausalLM
    model = (cls(cfg) if family == "gemma3" else tf.AutoModelForCausalLM.from_config(cfg)).eval()
    # random weights with some spread so activations are not all tiny
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    reference = copy.deepcopy(model).eval()
    if family == "drelu":
        model.config.hidden_act = "drelu"  # as a dReLU checkpoint's config names it
        _drelu_reference(reference)
    return model, reference


def tiny_lm(family: str, tokenizer, seed: int = 0):
    from coreinfer.runtime.loading import LoadedModel
    from coreinfer.runtime.sparse_lm import SparseLM

    model, reference = build_tiny(family, tokenizer, seed)
    lm = SparseLM(LoadedModel(model, tokenizer, f"tiny-{family}", "memory", torch.device("cpu"), torch.float32))
    return lm, reference


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    return tiny_lm("llama", tokenizer)
