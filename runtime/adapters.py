"""Architecture adapters: where each model family keeps its FFN, and how its weights map to ``FFNWeights``.

An adapter points each layer's FFN module's ``forward`` at a session-aware function that computes the same
function from ``FFNWeights`` views of the module's own parameters, and asks the active per-call session
(if any) what to do: dense, capture the activations, or run the compact core FFN. No module is replaced or
wrapped, so the model's module tree, ``state_dict`` keys and ``save_pretrained`` output stay the library's
own, as do attention, norms, caches and ``generate``.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .ffn import ACTIVATIONS, FFNWeights


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    kind: str  # "gated" | "fused_gated" | "mlp"
    examples: str


FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "mixtral_dense", "smollm3"), "gated",
           "Llama, Mistral, Qwen2/3, SmolLM2, ReluLLaMA/ProSparse (ReGLU), TurboSparse (dReLU)"),
    Family("gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), "gated", "Gemma, Gemma-2, Gemma-3 (GeGLU)"),
    Family("phi3", ("phi3",), "fused_gated", "Phi-3 (fused gate_up_proj)"),
    Family("opt", ("opt",), "mlp", "OPT (fc1/ReLU/fc2 with biases)"),
)


def supported_architectures() -> str:
    return "; ".join(f"{f.name}: {f.examples} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


class UnsupportedArchitecture(ValueError):
    pass


def _family(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedArchitecture(
        f"model_type {model_type!r} is not supported by coreinfer. Supported architectures: {supported_architectures()}"
    )


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _activation_name(config, fam: Family) -> tuple[str, str]:
    """(kind, act) for the FFN, from the config's activation name. dReLU is recognised by name."""
    if fam.kind == "mlp":
        act = getattr(config, "activation_function", "relu")
        return "mlp", act
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if str(act).lower() in ("drelu", "d_relu", "dual_relu"):
        return "drelu", "relu"
    if act not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"FFN activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)} and 'drelu'")
    return "gated", act


class SessionForward:
    """The ``forward`` of one FFN module: dense by default, or whatever the active session says for this layer.

    Set as an instance attribute (as accelerate's hooks are), so the module and its parameters stay in place.
    """

    def __init__(self, layer_idx: int, weights: FFNWeights, active: ContextVar):
        self.layer_idx = layer_idx
        self.weights = weights  # views of the module's parameters
        self.active = active

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        session = self.active.get()
        if session is None:
            return self.weights(x)
        return session.ffn(self.layer_idx, x, self.weights)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class ModelAdapter:
    """What the runtime needs to know about a loaded model's FFNs."""

    family: Family
    kind: str
    act: str
    n_layers: int
    n_neurons: int
    hidden_size: int
    layers: list  # decoder layer modules
    dense: list[FFNWeights]

    def describe(self) -> str:
        return f"{self.family.name} ({self.kind}, {self.act}), {self.n_layers} layers x {self.n_neurons} FFN neurons"


def _decoder_layers(model, fam: Family):
    if fam.name == "opt":
        return model.model.decoder.layers
    inner = model.model
    if hasattr(inner, "language_model"):  # multimodal wrappers (Gemma-3 4B+)
        inner = inner.language_model
    return inner.layers


def _layer_weights(layer, fam: Family, kind: str, act: str) -> FFNWeights:
    if fam.name == "opt":
        b1 = layer.fc1.bias.detach() if layer.fc1.bias is not None else None
        b2 = layer.fc2.bias.detach() if layer.fc2.bias is not None else None
        return FFNWeights("mlp", act, layer.fc2.weight.detach(), fc1=layer.fc1.weight.detach(), fc1_bias=b1, down_bias=b2)
    mlp = layer.mlp
    if fam.kind == "fused_gated":
        gate, up = mlp.gate_up_proj.weight.detach().chunk(2, dim=0)
    else:
        gate, up = mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()
    for name in ("gate_proj", "up_proj", "down_proj", "gate_up_proj"):
        if getattr(getattr(mlp, name, None), "bias", None) is not None:
            raise UnsupportedArchitecture(f"{fam.name} MLP with a bias on {name} is not supported")
    return FFNWeights(kind, act, mlp.down_proj.weight.detach(), gate=gate, up=up)


def install(model, active: ContextVar) -> ModelAdapter:
    """Make every FFN of ``model`` session-aware; returns the adapter.

    Only the FFN modules' ``forward`` changes; they compute from views of their own parameters (no copy).
    """
    config = _text_config(model.config)
    fam = _family(config)
    kind, act = _activation_name(config, fam)
    layers = list(_decoder_layers(model, fam))
    dense = []
    for i, layer in enumerate(layers):
        w = _layer_weights(layer, fam, kind, act)
        dense.append(w)
        if fam.name == "opt":
            # OPT runs fc1 -> activation_fn -> fc2 inline in the layer: fc1 computes the whole FFN, the
            # parameter-free activation and fc2's forward pass it through.
            layer.fc1.forward = SessionForward(i, w, active)
            layer.activation_fn = nn.Identity()
            layer.fc2.forward = _identity
        else:
            layer.mlp.forward = SessionForward(i, w, active)
    return ModelAdapter(fam, kind, act, len(layers), dense[0].n_neurons, dense[0].down.shape[0], layers, dense)


Hook = Callable[[int, torch.Tensor], None]
