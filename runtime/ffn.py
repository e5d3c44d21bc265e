"""FFN weights of one layer, its forward, and the once-per-prompt gather to a compact core FFN.

Every supported MLP is one of three shapes:
  ``gated``: a = act(gate x) * up x           (Llama/Mistral/Qwen2 SiLU, Gemma GeGLU, ReGLU)
  ``drelu``: a = relu(gate x) * relu(up x)    (dReLU: TurboSparse)
  ``mlp``:   a = act(fc1 x + b1)              (OPT: ReLU, biases)
and y = down a (+ b2). ``a`` is the intermediate activation the selection works on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation_fn(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported FFN activation {name!r}; supported: {sorted(ACTIVATIONS)} and 'drelu'") from None


@dataclass(frozen=True)
class FFNWeights:
    """Weights of one FFN layer in (out_features, in_features) layout.

    ``gate``/``up`` (I, H) for gated kinds, ``fc1`` (I, H) for ``mlp``; ``down`` (H, I). For a dense layer
    these are views of the model's own parameters (no copy); for a core FFN they are compact gathers.
    """

    kind: str  # "gated" | "drelu" | "mlp"
    act: str
    down: torch.Tensor
    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None
    fc1: torch.Tensor | None = None
    fc1_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    gate_up: torch.Tensor | None = None  # (2k, H) fused gate||up, present on compact gated FFNs

    @property
    def n_neurons(self) -> int:
        return self.down.shape[1]

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """The activation ``a`` (..., I) that feeds the down projection."""
        if self.kind == "mlp":
            return activation_fn(self.act)(F.linear(x, self.fc1, self.fc1_bias))
        if self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = F.linear(x, self.gate), F.linear(x, self.up)
        if self.kind == "drelu":
            return F.relu(gate) * F.relu(up)
        return activation_fn(self.act)(gate) * up

    def output(self, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, self.down, self.down_bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x))

    def gather(self, core_set: torch.Tensor) -> "FFNWeights":
        """Compact FFN over ``core_set`` (sorted int64 indices): rows of gate/up/fc1, columns of down.

        Done once per prompt; every decoded token then reads only k neurons' weights.
        """
        idx = core_set.to(self.down.device)
        down = self.down.index_select(1, idx).contiguous()
        if self.kind == "mlp":
            fc1_bias = None if self.fc1_bias is None else self.fc1_bias.index_select(0, idx)
            return FFNWeights("mlp", self.act, down, fc1=self.fc1.index_select(0, idx), fc1_bias=fc1_bias, down_bias=self.down_bias)
        gate_up = torch.cat([self.gate.index_select(0, idx), self.up.index_select(0, idx)], dim=0)
        return FFNWeights(self.kind, self.act, down, down_bias=self.down_bias, gate_up=gate_up)

    def nbytes(self) -> int:
        """Bytes of weights read by one token through this FFN."""
        ts = (self.gate, self.up, self.fc1, self.fc1_bias, self.down, self.down_bias, self.gate_up)
        if self.gate_up is not None:
            ts = (self.fc1, self.fc1_bias, self.down, self.down_bias, self.gate_up)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)
