"""Fast batch-1 decoding with a compact core FFN: static KV cache, one-token step in a CUDA graph.

gpt-fast style: ``FastWeights`` holds one model's weights in decode-friendly layouts (fused q||k||v,
fused gate||up; the rest shared with the model), built from a Hugging Face model through the FFN
adapter. ``FastLM`` adds, for one kept fraction ``beta``:

* a static KV cache of ``max_seq_len`` positions;
* per sparse layer, the core neurons chosen at prefill from the prompt's own activations: all sparse
  layers' activations are kept (n_sparse, T, I) and ranked in one batched, sync-free call of
  ``selection.stability_select_layers`` (the one selection implementation). With the Triton GEMVs (CUDA
  default) the decode is gather-free: the kernels read the core rows of gate||up and of a row-major (I, H)
  copy of the down projection in place, by index, from one fixed-address index buffer, so the per-prompt
  "gather" is writing k indices per layer. A call given its core sets before the prefill (similarity-
  guided) and asking for enough new tokens decodes from compact buffers instead, gathered on a second
  stream under the prefill (``compact_given``, ``compact_pays``). With cuBLAS GEMVs (and on CPU) the core
  rows are always gathered into preallocated compact buffers (zero-padded to a multiple of ``PAD``). Either
  way nothing the captured CUDA graph reads moves, so one graph of the decode step (per mode) stays valid
  for every prompt;
* the decode step (embed -> layers -> lm_head -> argmax -> feed back) captured once in a CUDA graph:
  the whole decode loop is ``graph.replay()`` with no host work or synchronisation in between. On CUDA
  its pieces are Triton kernels (``kernels.py``: split-KV attention with RoPE and the cache write, the
  matrix-vector products with the FFN activation fused, the RMSNorms folded into them and the residual
  adds in their epilogues) and ``torch.compile``d element-wise fusions.

The prefill runs the dense FFN (the prompt's activations choose the core set) or, given the core sets
first, the core FFN; the first new token comes from the prefill's logits, every later one from the compact
FFN, as in CoreInfer. On CUDA it too is replayed from a CUDA graph, one per 64-token length bucket up to 512
tokens (the prompt padded; ``_prefill``), captured on a bucket's first use: the eager prefill is ~30 PyTorch
ops per layer launched from Python, host-bound at these lengths. Longer prompts prefill eagerly. In the
captured prefill of the gather-free step the graph also selects the core sets, all layers batched after the
last one, its kernels reading the prompt's length from the device and writing the index buffer itself
(``select_in_prefill``); elsewhere the selection runs after the prefill, launched from Python.

One ``FastLM`` instance decodes ONE prompt at a time: its KV cache and compact buffers are instance
state that a call fills and reads; each public call holds the instance's lock for its whole duration.
Each call's core sets and timings are returned in a per-call ``FastGeneration``.

On CPU (or in a ``cuda.bench.step_variant`` without the graph) the same step runs eagerly: that is how the tests compare it,
in float32, with the Hugging Face model itself.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import adapters
from ..ffn import FFNWeights, activation_fn
from ..selection import (DEFAULT_SCORE, check_fraction, check_layer_k, check_score, kept_count, layer_statistics,
                         select_from_statistics, stability_select_layers)

SUPPORTED = ("llama", "mistral", "qwen2", "opt")
PAD = 64  # compact FFN slots are padded to a multiple of this (see FastLM.__init__)
# how a decode step can be built (FastLM._step_overrides); the product always builds the device's default
STEP_CHOICES = ("cuda_graph", "compile_elementwise", "attention", "gemv", "pdl", "fused_norm", "gemv_config",
                "gemv_config_up", "rows_config", "gather_free", "fold_norm", "compact_given", "prefill_graph",
                "attention_block", "select_in_prefill", "pdl_trigger")
# the captured prefill: prompts are padded to a multiple of PREFILL_BUCKET tokens (one graph per length bucket);
# longer than PREFILL_GRAPH_MAX they prefill eagerly, where the kernels outlast their launches from Python
PREFILL_BUCKET = 64
PREFILL_GRAPH_MAX = 512
# a call given its core sets decodes from compact buffers only when it asks for at least this many new tokens
# (the gather costs time to first token, the compact step saves a little per token): (kept fraction of the
# sparse layers, fewest new tokens), interpolated linearly: where the compact calls' wall time fell below the
# gather-free calls', on the Llama-3.1-8B shape on the H200 (run h200-32, docs/benchmarks.md "Compact buffers by
# call length")
COMPACT_GIVEN_MIN_TOKENS = ((0.2, 24), (0.4, 70), (0.6, 116))
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FastPathError(ValueError):
    """Bad input to the fast path (unsupported model, dtype, device, or a request that does not fit)."""


def compact_pays(kept_fraction: float, max_new_tokens: int, table=COMPACT_GIVEN_MIN_TOKENS) -> bool:
    """Whether a call given its core sets should gather compact buffers: ``max_new_tokens`` at least the
    crossover of ``table`` at ``kept_fraction`` (linear between its points, and along its end segments
    outside them)."""
    i = next((j for j in range(1, len(table) - 1) if kept_fraction <= table[j][0]), len(table) - 1)
    (f0, n0), (f1, n1) = table[i - 1], table[i]
    need = n0 + (n1 - n0) * (kept_fraction - f0) / (f1 - f0)
    return max_new_tokens >= max(1.0, need)


# --------------------------------------------------------------------------------------------------
# device / dtype checks


def check_device_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.device:
    """Validate that ``device`` exists and supports ``dtype``; clear errors, never a silent fallback."""
    dev = torch.device(device)
    if dtype not in DTYPES:
        raise FastPathError(f"dtype {dtype} is not supported by the fast path; use one of {[str(d) for d in DTYPES]}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FastPathError(
                f"a CUDA device was asked for ({dev}) but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); run on a GPU machine or use device='cpu'"
            )
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise FastPathError(f"{dev} was asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(index)
            raise FastPathError(f"{name} has no native bfloat16 support (compute capability < 8.0); use dtype=torch.float16")
    elif dev.type != "cpu":
        raise FastPathError(f"device {dev} is not supported by the fast path (cuda or cpu)")
    return dev


# --------------------------------------------------------------------------------------------------
# element-wise pieces of the step (pure functions; compiled into fused kernels for the CUDA decode step)


def rms_norm(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Llama RMSNorm exactly as Hugging Face computes it (float32 statistics, weight in model dtype); ``w``
    None: the weight is folded into the next product's weights."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) if w is None else w * h.to(x.dtype)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, eps: float):
    s = x + y
    return s, rms_norm(s, w, eps)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float):
    s = x + y
    return s, layer_norm(s, w, b, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (1, nh, T, hd), k (1, nkv, T, hd), cos/sin (T, hd): Hugging Face's rotate-half RoPE."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def gated_act(gu: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up from a fused gate||up output (..., 2k)."""
    g, u = gu.chunk(2, dim=-1)
    if act == "drelu":
        return F.relu(g) * F.relu(u)
    return activation_fn(act)(g) * u


def mlp_act(h: torch.Tensor, act: str) -> torch.Tensor:
    return activation_fn(act)(h)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1, keepdim=True)


class _Ops:
    """The element-wise functions one FastLM uses: eager, or torch.compile'd (fused) for the decode step."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        fns = dict(rms_norm=rms_norm, add_rms_norm=add_rms_norm, layer_norm=layer_norm, add_layer_norm=add_layer_norm,
                   rope=rope, gated_act=gated_act, mlp_act=mlp_act, argmax=argmax)
        if compiled:
            # one specialisation per shape (models x kept fractions): allow more than dynamo's default 8
            cfg = torch._dynamo.config
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, knob):
                    setattr(cfg, knob, max(getattr(cfg, knob), 256))
        for name, fn in fns.items():
            setattr(self, name, torch.compile(fn, dynamic=False, fullgraph=True) if compiled else fn)


# --------------------------------------------------------------------------------------------------
# weights


@dataclass
class LayerWeights:
    norm1_w: torch.Tensor | None  # None: folded into qkv_w (RMSNorm models, see FastWeights)
    norm1_b: torch.Tensor | None
    qkv_w: torch.Tensor  # (nh*hd + 2*nkv*hd, H)
    qkv_b: torch.Tensor | None
    o_w: torch.Tensor  # (H, nh*hd)
    o_b: torch.Tensor | None
    norm2_w: torch.Tensor | None  # None: folded into up_w
    norm2_b: torch.Tensor | None
    ffn_kind: str  # gated | drelu | mlp
    up_w: torch.Tensor  # gated/drelu: (2I, H) gate||up ; mlp: fc1 (I, H)
    up_b: torch.Tensor | None  # mlp: fc1 bias (I,)
    down: torch.Tensor  # (H, I): the model's own down projection (fc2 for OPT), shared, not copied
    down_b: torch.Tensor | None
    down_t: torch.Tensor | None = None  # (I, H) row-major copy for the gather-free sparse decode (built on demand)

    def tensors(self):
        return [t for t in (self.norm1_w, self.norm1_b, self.qkv_w, self.qkv_b, self.o_w, self.o_b, self.norm2_w,
                            self.norm2_b, self.up_w, self.up_b, self.down, self.down_b) if t is not None]


def _fold(weight: torch.Tensor, norm_w: torch.Tensor) -> torch.Tensor:
    """A new (N, H) tensor: ``weight`` with the RMSNorm weight (H,) multiplied into its columns, W @ (g * x) =
    (W * g) @ x, computed in float32 a block of rows at a time and rounded once."""
    out = torch.empty(weight.shape, device=weight.device, dtype=weight.dtype)
    g = norm_w.detach().float()
    for r in range(0, weight.shape[0], 4096):
        out[r:r + 4096] = (weight[r:r + 4096].detach().float() * g).to(weight.dtype)
    return out


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class FastWeights:
    """One model's weights in decode layouts. Built once; shared by any number of ``FastLM`` instances.

    RMSNorm models (family "llama"): each layer's two norm weights are folded into the columns of the fused
    q||k||v and gate||up copies (W @ (g * n(x)) = (W * g) @ n(x), rounded once to the model dtype), so the
    decode step's GEMVs normalise their own input and no launch of its own is left for the norms
    (``LayerWeights.norm1_w`` / ``norm2_w`` are then None); the final norm keeps its weight (lm_head is shared)."""

    family: str  # "llama" (llama/mistral/qwen2) | "opt"
    model_type: str
    act: str
    layers: list[LayerWeights]
    embed: torch.Tensor  # (V, H)
    pos_embed: torch.Tensor | None  # OPT learned positions (P + 2, H)
    final_w: torch.Tensor
    final_b: torch.Tensor | None
    lm_head: torch.Tensor  # (V, H)
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    n_neurons: int
    eps: float
    sliding_window: int | None
    max_positions: int
    rope_fn: object | None  # positions (S,) -> (cos, sin) each (S, hd); None for OPT
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def vocab(self) -> int:
        return self.lm_head.shape[0]

    # ---- construction

    @classmethod
    def from_hf(cls, model, adapter: "adapters.ModelAdapter | None" = None) -> "FastWeights":
        """Copy ``model``'s weights into decode layouts (same device and dtype as the model).

        FFN weights come from ``adapter.dense`` (the runtime's FFN adapter); without an adapter they are
        read the same way without touching the model. Copies: fused q||k||v and fused gate||up (two
        thirds of the FFN); embeddings, norms, o/down projections and lm_head are shared with the model.
        """
        config = adapters._text_config(model.config)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED:
            raise FastPathError(f"the fast path supports model types {SUPPORTED}, got {model_type!r}; use the eager path")
        dtype = model.get_input_embeddings().weight.dtype
        device = model.get_input_embeddings().weight.device
        check_device_dtype(device, dtype)
        fam = adapters._family(config)
        if adapter is None:
            kind, act = adapters._activation_name(config, fam)
            ffns = [adapters._layer_weights(layer, fam, kind, act) for layer in adapters._decoder_layers(model, fam)]
        else:
            ffns, act = list(adapter.dense), adapter.act
        if model_type == "opt":
            return cls._from_opt(model, config, ffns, act)
        return cls._from_llama(model, config, ffns, act, model_type)

    @classmethod
    def _from_llama(cls, model, config, ffns: list[FFNWeights], act: str, model_type: str) -> "FastWeights":
        inner = model.model
        if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
            raise FastPathError("qwen2 with use_sliding_window=True is not supported by the fast path")
        window = getattr(config, "sliding_window", None) if model_type == "mistral" else None
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        layers = []
        with torch.no_grad():
            for layer, ffn in zip(inner.layers, ffns):
                at = layer.self_attn
                if hasattr(at, "q_norm"):
                    raise FastPathError(f"{model_type} attention with q/k norms is not supported by the fast path")
                qkv_w = _fold(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight], 0),
                              layer.input_layernorm.weight)
                biases = [at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]
                qkv_b = torch.cat(biases, 0).contiguous() if biases[0] is not None else None
                ffn_w = _ffn_layout(ffn)
                ffn_w["up_w"] = _fold(ffn_w["up_w"], layer.post_attention_layernorm.weight)
                layers.append(LayerWeights(
                    norm1_w=None, norm1_b=None, qkv_w=qkv_w, qkv_b=qkv_b,
                    o_w=at.o_proj.weight.detach(), o_b=None if at.o_proj.bias is None else at.o_proj.bias.detach(),
                    norm2_w=None, norm2_b=None, **ffn_w))
        rotary = inner.rotary_emb
        emb = inner.embed_tokens.weight.detach()

        def rope_fn(positions: torch.Tensor):
            with torch.no_grad():
                cos, sin = rotary(emb[:1], positions.view(1, -1))
            return cos[0].to(emb.dtype).contiguous(), sin[0].to(emb.dtype).contiguous()

        return cls("llama", model_type, act, layers, emb, None, inner.norm.weight.detach(), None,
                   model.lm_head.weight.detach(), n_heads, n_kv, head_dim, config.hidden_size, ffns[0].n_neurons,
                   float(config.rms_norm_eps), window, int(config.max_position_embeddings), rope_fn)

    @classmethod
    def _from_opt(cls, model, config, ffns: list[FFNWeights], act: str) -> "FastWeights":
        dec = model.model.decoder
        if dec.project_in is not None or dec.project_out is not None:
            raise FastPathError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported by the fast path")
        if not config.do_layer_norm_before or dec.final_layer_norm is None:
            raise FastPathError("OPT with post-layer-norm (do_layer_norm_before=False, e.g. opt-350m) is not supported by the fast path")
        n_heads = config.num_attention_heads
        head_dim = config.hidden_size // n_heads
        layers = []
        with torch.no_grad():
            for layer, ffn in zip(dec.layers, ffns):
                at = layer.self_attn
                ws = [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]
                bs = [at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]
                layers.append(LayerWeights(
                    norm1_w=layer.self_attn_layer_norm.weight.detach(), norm1_b=layer.self_attn_layer_norm.bias.detach(),
                    qkv_w=torch.cat(ws, 0).contiguous(), qkv_b=torch.cat(bs, 0).contiguous() if bs[0] is not None else None,
                    o_w=at.out_proj.weight.detach(), o_b=None if at.out_proj.bias is None else at.out_proj.bias.detach(),
                    norm2_w=layer.final_layer_norm.weight.detach(), norm2_b=layer.final_layer_norm.bias.detach(),
                    **_ffn_layout(ffn)))
        eps = float(dec.layers[0].self_attn_layer_norm.eps)
        return cls("opt", "opt", act, layers, dec.embed_tokens.weight.detach(), dec.embed_positions.weight.detach(),
                   dec.final_layer_norm.weight.detach(), dec.final_layer_norm.bias.detach(), model.lm_head.weight.detach(),
                   n_heads, n_heads, head_dim, config.hidden_size, ffns[0].n_neurons, eps, None,
                   int(config.max_position_embeddings), None)

    def ensure_down_t(self, layers) -> None:
        """Build the (I, H) row-major copy of the down projection of ``layers`` (once; kept for all FastLMs):
        the gather-free sparse decode reads its core rows in place (8 KB contiguous each for H = 4096)."""
        with self._lock:
            for li in layers:
                lw = self.layers[li]
                if lw.down_t is None:
                    lw.down_t = lw.down.t().contiguous()

    def down_t_bytes(self) -> int:
        return _nbytes([lw.down_t for lw in self.layers])

    # ---- accounting

    def attention_bytes(self) -> int:
        return sum(_nbytes([lw.norm1_w, lw.norm1_b, lw.qkv_w, lw.qkv_b, lw.o_w, lw.o_b, lw.norm2_w, lw.norm2_b])
                   for lw in self.layers)

    def ffn_bytes(self, k: int | None = None, sparse_layers=None, layer_k: dict[int, int] | None = None) -> int:
        """FFN weight bytes one token reads: all I neurons, or k core neurons in ``sparse_layers`` (default all),
        or ``layer_k[l]`` core neurons in each layer l it names."""
        if layer_k is None:
            sparse = range(len(self.layers)) if sparse_layers is None else sparse_layers
            layer_k = {li: k for li in sparse} if k is not None else {}
        total = 0
        for li, lw in enumerate(self.layers):
            full = _nbytes([lw.up_w, lw.up_b, lw.down])
            frac = layer_k[li] / self.n_neurons if li in layer_k else 1.0
            total += int(round(full * frac)) + _nbytes([lw.down_b])
        return total

    def bytes_per_token(self, k: int | None = None, sparse_layers=None, layer_k: dict[int, int] | None = None) -> int:
        """Weight bytes read by one decode step: attention + FFN (dense, or k core neurons in the sparse
        layers) + final norm + lm_head + one embedding row (+ one position row for OPT). KV cache not counted."""
        row = self.embed.shape[1] * self.embed.element_size()
        pos_row = row if self.pos_embed is not None else 0
        return (self.attention_bytes() + self.ffn_bytes(k, sparse_layers, layer_k)
                + _nbytes([self.final_w, self.final_b, self.lm_head]) + row + pos_row)


def _ffn_layout(ffn: FFNWeights) -> dict:
    if ffn.kind == "mlp":
        return dict(ffn_kind="mlp", up_w=ffn.fc1.contiguous(), up_b=None if ffn.fc1_bias is None else ffn.fc1_bias.contiguous(),
                    down=ffn.down.contiguous(), down_b=ffn.down_bias)
    if ffn.gate_up is not None:
        gate_up = ffn.gate_up.contiguous()
    else:
        gate_up = torch.cat([ffn.gate, ffn.up], 0).contiguous()
    return dict(ffn_kind=ffn.kind, up_w=gate_up, up_b=None, down=ffn.down.contiguous(), down_b=ffn.down_bias)


# --------------------------------------------------------------------------------------------------
# the model


@dataclass
class FastGeneration:
    """What one call produced: new token ids, the per-layer core sets it chose, and its timings (ms; and
    ``prefill_graph``: whether the prefill was replayed from its CUDA graph, ``compact``: whether the call
    decoded from compact buffers, ``compact_pays``)."""

    tokens: list[int]
    core_sets: dict[int, torch.Tensor]  # sparse layer -> sorted neuron indices (empty when dense)
    timings: dict = field(default_factory=dict)
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) float32 per new token, with keep_logits


class FastLM:
    """Static-cache batch-1 decoder over ``FastWeights`` with compact core-FFN buffers (see module doc).

    kept_fraction=None decodes with the dense FFN (the dense fast path). ``sparse_layers`` (default: all)
    are the layers that decode with ``kept_count(kept_fraction, I)`` core neurons; the others stay dense.
    ``layer_k`` {layer: k} instead gives each sparse layer its own core-set size (a calibrated budget).
    """

    # False where the weights stream in during the prefill (offload.BudgetFastLM): it prefills eagerly
    _prefill_capturable = True

    def __init__(self, weights: FastWeights, *, max_seq_len: int = 1024, kept_fraction: float | None = None,
                 alpha: float = 0.4, score: str = DEFAULT_SCORE, sparse_layers: range | None = None,
                 layer_k: dict[int, int] | None = None):
        w = weights
        self.w = w
        on_cuda = w.device.type == "cuda"
        check_device_dtype(w.device, w.dtype)
        step = dict(self._step_overrides())
        if set(step) - set(STEP_CHOICES):
            raise FastPathError(f"unknown decode-step choices {sorted(set(step) - set(STEP_CHOICES))}; "
                                f"known: {', '.join(STEP_CHOICES)}")
        cuda_graph, compile_elementwise = step.get("cuda_graph"), step.get("compile_elementwise")
        if cuda_graph is None:
            cuda_graph = on_cuda
        if compile_elementwise is None:
            compile_elementwise = on_cuda
        if cuda_graph and not on_cuda:
            raise FastPathError("cuda_graph=True needs the weights on a CUDA device")
        prefill_graph = step.get("prefill_graph")
        if prefill_graph and not (cuda_graph and self._prefill_capturable):
            raise FastPathError("prefill_graph=True needs cuda_graph (the weights on a CUDA device) and a resident "
                                "model (no memory budget)")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise FastPathError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if w.pos_embed is not None and max_seq_len > w.max_positions:
            raise FastPathError(f"max_seq_len {max_seq_len} exceeds the model's {w.max_positions} learned positions")
        self.max_seq_len = max_seq_len
        self.cache_len = -(-max_seq_len // 16) * 16  # slots (multiple of 16 for aligned attention masks)
        self.alpha = check_fraction("alpha", alpha)
        self.score = check_score(score)
        self.kept_fraction = None if kept_fraction is None else check_fraction("kept_fraction", kept_fraction)
        n_layers = len(w.layers)
        if layer_k is not None:
            if kept_fraction is not None or sparse_layers is not None:
                raise FastPathError("give either layer_k or kept_fraction (with sparse_layers), not both")
            try:
                layer_k = check_layer_k(layer_k, w.n_neurons, n_layers)
            except (TypeError, ValueError) as err:
                raise FastPathError(str(err)) from None
            if not layer_k:
                raise FastPathError("layer_k names no sparse layer; use kept_fraction=None for the dense fast path")
            sparse_layers = tuple(layer_k)
        elif self.kept_fraction is not None:
            if sparse_layers is None:
                sparse_layers = range(n_layers)
            if not isinstance(sparse_layers, range) or not (0 <= sparse_layers.start and sparse_layers.stop <= n_layers):
                raise FastPathError(f"sparse_layers must be a range within 0:{n_layers}, got {sparse_layers!r}")
            layer_k = {li: kept_count(self.kept_fraction, w.n_neurons) for li in sparse_layers}
        else:
            sparse_layers, layer_k = range(0), {}
        self.sparse_layers = sparse_layers
        self.layer_k = layer_k  # {sparse layer: its core-set size}
        self._row = {li: j for j, li in enumerate(sparse_layers)}  # sparse layer -> row of the index buffer
        self.k = max(layer_k.values()) if layer_k else None  # the widest core set (buffer width); None: dense
        self.uniform_k = self.k if len(set(layer_k.values())) == 1 else None
        self.cuda_graph = cuda_graph
        self.prefill_graph = (cuda_graph and self._prefill_capturable) if prefill_graph is None else bool(prefill_graph)
        self.attention = self._pick_attention(step.get("attention"), on_cuda)
        self.gemv = self._pick_gemv(step.get("gemv"), on_cuda)
        self.pdl = self._pick_pdl(step.get("pdl"), step.get("pdl_trigger"))
        self.fused_norm = self._pick_fused_norm(step.get("fused_norm"))
        self.fold_norm = self._pick_fold_norm(step.get("fold_norm"))
        self.gemv_config = step.get("gemv_config")  # the Triton GEMV's kernel config (None: kernels.GEMV_CONFIG)
        # ... of gate||up / fc1 (None: kernels.GEMV_CONFIG_UP)
        self.gemv_config_up = step.get("gemv_config_up") or self.gemv_config
        rows_config = step.get("rows_config")
        self.ops = _Ops(compile_elementwise)
        self._lock = threading.Lock()
        dev, dt = w.device, w.dtype
        shape = (1, w.n_kv_heads, self.cache_len, w.head_dim)
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in w.layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in w.layers]
        if w.rope_fn is not None:
            self.cos, self.sin = w.rope_fn(torch.arange(self.cache_len, device=dev))
        self._attn = None
        if self.attention == "triton":
            from .kernels import ATTENTION_BLOCK, DecodeAttention

            # attention_block: keys per program (a benchmark / test choice; the tests take small ones for
            # several blocks in short caches)
            self._attn = DecodeAttention(w.n_heads, w.n_kv_heads, w.head_dim, self.cache_len, dev, w.sliding_window,
                                         pdl=self.pdl, block=step.get("attention_block") or ATTENTION_BLOCK)
        self._scratch = None
        if self.gemv == "triton":
            from .kernels import StepScratch

            self._scratch = StepScratch(w.hidden, w.vocab, dev)
        # Sparse layers, two ways of decoding with the core neurons only:
        # * gather-free (``indexed``: Triton GEMVs): the kernels read the core rows of gate||up (or fc1) and of
        #   the row-major transposed down projection in place, by index, from one fixed-address index buffer
        #   (n_sparse, k); per prompt the "gather" is writing k indices per layer;
        # * gathered (cuBLAS GEMVs, and CPU): compact FFN buffers at fixed addresses, refilled per prompt by
        #   index_select(out=...). The k neuron slots are padded to a multiple of PAD with zero rows (zero in,
        #   zero out: the function is unchanged), so cuBLAS picks its aligned fast GEMV kernels.
        # (``gather_free=False``, a benchmark variant: the compact buffers with the Triton GEMVs)
        can_index = self.k is not None and self.gemv == "triton" and all(
            self._kernel_act(w.layers[li]) is not None for li in self.sparse_layers)
        if step.get("gather_free") and not can_index:
            raise FastPathError("gather_free=True needs a sparse step with gemv='triton' and a SiLU/ReLU FFN")
        self.indexed = can_index and step.get("gather_free") is not False
        # compact_given: with the gather-free step, a call given its core sets before the prefill (similarity-
        # guided) may decode from compact buffers instead, gathered on a second stream during the prefill
        # (allocated on the first such call): 3.5-7.5% faster decode for 2-8 ms more time to first token, since
        # the captured prefill shares the memory bandwidth with it. By default (None) a call does so when it asks
        # for enough new tokens to win that back (``compact_pays``); True: every such call, False: none.
        given = step.get("compact_given")
        if given and not (self.indexed and on_cuda):
            raise FastPathError("compact_given=True needs the gather-free sparse step on a CUDA device")
        self.compact_given = (None if (self.indexed and on_cuda) else False) if given is None else bool(given)
        self._side = None  # the stream of that gather
        # select_in_prefill: the captured prefill's graph also selects the core sets, all layers batched after the
        # last one, into the index buffer (no launches from Python, no separate gather); False (a benchmark row,
        # and what the eager prefill does): the same selection launched after the graph. Run h200-39: 0.5 vs 1.2 ms
        # over the dense time to first token at 256 tokens; each layer's selection on a second stream under the
        # later layers lost at every length (1.3 ms at 256, 3.0 at 512: it competes with the prefill for the SMs)
        sip = step.get("select_in_prefill")
        if sip and not (self.indexed and self.prefill_graph):
            raise FastPathError("select_in_prefill=True needs the gather-free sparse step and the captured prefill")
        self.select_in_prefill = (self.indexed and self.prefill_graph) if sip is None else bool(sip)
        self.k_pad = {li: -(-k // PAD) * PAD for li, k in layer_k.items()}
        self.c_up, self.c_up_b, self.c_down = [None] * n_layers, [None] * n_layers, [None] * n_layers
        self._idx = self._partial = None
        self.rows_config = rows_config  # the down GEMV's kernel config (None: kernels.GEMV_ROWS_CONFIG)
        if self.indexed:
            from .kernels import gemv_rows_split

            w.ensure_down_t(self.sparse_layers)
            # rows padded to 64 bytes: every layer's index row equally aligned, so every layer runs the same
            # compiled kernel (an unaligned row is specialised apart, without vector loads: cuda/aot.py shows it)
            self._idx = torch.zeros(len(self.sparse_layers), -(-self.k // 16) * 16, dtype=torch.int32, device=dev)
            split = max(gemv_rows_split(w.hidden, k, rows_config) for k in layer_k.values())
            self._partial = torch.empty(split, w.hidden, device=dev, dtype=torch.float32) if split > 1 else None
        if not self.indexed:
            self._alloc_compact()
        # static step state
        self._tok = torch.zeros(1, dtype=torch.long, device=dev)
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)
        self._step = torch.zeros(1, dtype=torch.long, device=dev)
        self._out = torch.zeros(self.cache_len, dtype=torch.long, device=dev)
        self._slots = torch.arange(self.cache_len, device=dev)
        self._graphs: dict = {}  # _Mode -> (CUDA graph of the step, its logits)
        self._pool = None  # one memory pool for all of them (never replayed concurrently)
        # sampling parameters as device scalars: a captured draw reads them at replay
        self._temp = torch.ones(1, dtype=torch.float32, device=dev)
        self._top_p = torch.ones(1, dtype=torch.float32, device=dev)
        self._seed = torch.zeros(1, dtype=torch.long, device=dev)
        self._logit_rows = None  # (cache_len, V) per-step logits, allocated by the first call that keeps them
        self._host_out = None  # pinned copy of _out that chunks of new tokens are read back through
        # the captured prefill: (bucket length, select, sparse) -> (graph, its logits, its activations or None),
        # replayed from fixed-address inputs (the padded ids, the last real position) into one activation buffer
        self._prefill_graphs: dict = {}
        self._prefill_pool = None
        self._prefill_ids = self._prefill_last = self._prefill_len = self._acts = None

    def _alloc_compact(self) -> None:
        """The compact FFN buffers of the sparse layers (zero-padded to ``k_pad`` slots)."""
        w, dev, dt = self.w, self.w.device, self.w.dtype
        for li in self.sparse_layers:
            lw = w.layers[li]
            kp = self.k_pad[li]
            rows = 2 * kp if lw.ffn_kind != "mlp" else kp
            self.c_up[li] = torch.zeros(rows, w.hidden, device=dev, dtype=dt)
            self.c_up_b[li] = None if lw.up_b is None else torch.zeros(kp, device=dev, dtype=dt)
            self.c_down[li] = torch.zeros(w.hidden, kp, device=dev, dtype=dt)  # (H, kp) like the model's

    def _step_overrides(self) -> dict:
        """How this instance's decode step departs from the device's default (``STEP_CHOICES``): never, for the
        product, which builds the measured-fastest step; ``cuda.bench.step_variant`` overrides it for the
        benchmark's ablation rows and for the slower reference steps the tests compare against."""
        return {}

    def _pick_attention(self, attention: str | None, on_cuda: bool) -> str:
        """"triton": two Triton launches per layer (RoPE + cache write + split-KV attention; CUDA only);
        "sdpa": the same step from PyTorch ops. Default: triton where it can run."""
        if attention not in (None, "triton", "sdpa"):
            raise FastPathError(f"attention must be 'triton' or 'sdpa', got {attention!r}")
        if attention == "sdpa":
            return "sdpa"
        why = None
        if not on_cuda:
            why = "needs a CUDA device"
        else:
            try:
                from . import kernels
            except ImportError as err:
                why = f"triton is not importable ({err})"
            else:
                if not kernels.supported(self.w.head_dim):
                    why = f"head_dim {self.w.head_dim} is not a power of two >= 16"
        if why is None:
            return "triton"
        if attention == "triton":
            raise FastPathError(f"attention='triton' {why}; use attention='sdpa'")
        return "sdpa"

    def _pick_gemv(self, gemv: str | None, on_cuda: bool) -> str:
        """"triton": the decode step's matrix-vector products by ``kernels.gemv`` (gate/up fused with the
        activation; sparse layers read their core rows in place); "torch": F.linear (cuBLAS) on gathered
        compact buffers. Default: triton on CUDA. (Off CUDA only under Triton's interpreter, for the checks.)"""
        if gemv not in (None, "triton", "torch"):
            raise FastPathError(f"gemv must be 'triton' or 'torch', got {gemv!r}")
        if gemv == "torch" or (gemv is None and not on_cuda):
            return "torch"
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise FastPathError("gemv='triton' needs a CUDA device; use gemv='torch'")
        try:
            from . import kernels  # noqa: F401  (importable: triton is installed)
        except ImportError as err:
            if gemv == "triton":
                raise FastPathError(f"gemv='triton' needs triton ({err}); use gemv='torch'") from err
            return "torch"
        return "triton"

    def _pick_pdl(self, pdl: bool | None, trigger: str | None = None) -> int:
        """Programmatic dependent launch of the step's Triton kernels (Hopper+): each kernel's first weight loads
        overlap the previous kernel's run. Default: on where supported (``COREINFER_PDL=0`` turns it off). 0: off;
        otherwise where a kernel lets the next one launch (``kernels.PDL_AFTER_WAIT`` / ``PDL_AT_ENTRY``;
        ``trigger`` "wait" / "entry", a benchmark choice until run h200-40 measures it)."""
        if trigger not in (None, "wait", "entry"):
            raise FastPathError(f"pdl_trigger must be 'wait' or 'entry', got {trigger!r}")
        if pdl is False or (self.gemv != "triton" and self.attention != "triton"):
            if pdl or trigger:
                raise FastPathError("pdl=True needs the Triton kernels (gemv='triton' or attention='triton')")
            return 0
        from .kernels import PDL_AFTER_WAIT, PDL_AT_ENTRY, pdl_supported

        mode = PDL_AT_ENTRY if trigger == "entry" else PDL_AFTER_WAIT
        ok = pdl_supported(self.w.device)
        if pdl is None:
            return mode if ok and os.environ.get("COREINFER_PDL", "1") != "0" else 0
        if not ok:
            raise FastPathError("pdl=True needs a CUDA device of compute capability >= 9.0 (Hopper); use pdl=False")
        return mode

    def _pick_fold_norm(self, fold_norm: bool | None) -> bool:
        """No residual + RMSNorm launches between the layers: the o / down products add the residual in their
        epilogue, the qkv / gate||up products read the raw residual (their weights hold the norm's, folded by
        ``FastWeights``) and scale by its rsqrt(mean square), which each program computes from the input it
        loads. Default: on where the fused norms are (measured +2-5% dense, +4-7% sparse: docs/benchmarks.md);
        ``fold_norm=False`` is the step with the norm launches (a benchmark variant)."""
        ok = self.fused_norm and all(lw.norm1_w is None and lw.norm2_w is None and self._kernel_act(lw) is not None
                                     for lw in self.w.layers)
        if fold_norm and not ok:
            raise FastPathError("fold_norm=True needs the fused residual + RMSNorm step (gemv='triton', an RMSNorm "
                                "model) and a SiLU/ReLU FFN")
        return ok if fold_norm is None else bool(fold_norm)

    def _pick_fused_norm(self, fused_norm: bool | None) -> bool:
        """Residual add + RMSNorm (+ the split down product's sum) and argmax + step counters as one Triton
        launch each. Default: on with the Triton GEMVs for the RMSNorm models (not OPT's LayerNorm)."""
        ok = self.gemv == "triton" and self.w.family == "llama"
        if fused_norm and not ok:
            raise FastPathError("fused_norm=True needs gemv='triton' and an RMSNorm model (llama/mistral/qwen2)")
        return ok if fused_norm is None else bool(fused_norm)

    # ---- accounting

    def bytes_per_token(self) -> int:
        return self.w.bytes_per_token(layer_k=self.layer_k)

    def ffn_bytes(self) -> int:
        """FFN weight bytes one decoded token reads."""
        return self.w.ffn_bytes(layer_k=self.layer_k)

    def _compact_call(self, core_sets, max_new_tokens: int) -> bool:
        """Whether a call decodes from compact buffers (``compact_given``): only calls given their core sets."""
        if core_sets is None or self.k is None or self.compact_given is False:
            return False
        if self.compact_given:
            return True
        kept = sum(self.layer_k.values()) / (len(self.layer_k) * self.w.n_neurons)
        return compact_pays(kept, max_new_tokens)

    def kept_fraction_overall(self) -> float:
        """FFN neurons used per decoded token / all FFN neurons of the model."""
        n, i = len(self.w.layers), self.w.n_neurons
        return (sum(self.layer_k.values()) + (n - len(self.layer_k)) * i) / (n * i)

    def buffer_bytes(self) -> int:
        """KV cache + compact FFN buffers (padding included) or index buffer (the shared (I, H) down copy of
        the gather-free path is ``FastWeights.down_t_bytes``)."""
        return _nbytes(self.k_cache + self.v_cache + self.c_up + self.c_up_b + self.c_down + [self._idx, self._partial])

    # ---- input checks

    def _check_request(self, input_ids, n_new: int) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise FastPathError(f"the fast path decodes batch 1; got input_ids of shape {tuple(ids.shape)}")
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise FastPathError(f"input_ids must be a non-empty 1-D sequence (or shape (1, T)), got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise FastPathError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if not isinstance(n_new, int) or n_new < 1:
            raise FastPathError(f"max_new_tokens must be an int >= 1, got {n_new!r}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.w.vocab:
            raise FastPathError(f"token ids must be in [0, {self.w.vocab}), got range [{lo}, {hi}]")
        if ids.numel() + n_new > self.max_seq_len:
            raise FastPathError(
                f"prompt ({ids.numel()} tokens) + max_new_tokens ({n_new}) = {ids.numel() + n_new} exceeds the static "
                f"KV cache of max_seq_len={self.max_seq_len}; build FastLM with a larger max_seq_len or shorten the request")
        return ids.to(self.w.device, torch.long)

    # ---- forward pieces

    def _embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = F.embedding(ids.view(1, -1), self.w.embed)
        if self.w.pos_embed is not None:
            x = x + F.embedding((pos + 2).view(1, -1), self.w.pos_embed)  # OPT's position offset
        return x

    def _norm(self, x, wt, b, ops=None):
        ops = ops or _EAGER
        return ops.rms_norm(x, wt, self.w.eps) if b is None else ops.layer_norm(x, wt, b, self.w.eps)

    def _add_norm(self, x, y, wt, b, ops, y_bias=None):
        """(x + y, norm(x + y)). With ``fused_norm``: one Triton launch, where ``y`` may also be the split
        down product's float32 partial rows (summed in order, + ``y_bias``), or None (norm of x alone)."""
        if self.fused_norm:
            from .kernels import residual_rms_norm

            return residual_rms_norm(x, y, wt, self.w.eps, self._scratch, y_bias, self.pdl)
        if y is None:
            return x, self._norm(x, wt, b, ops)
        return ops.add_rms_norm(x, y, wt, self.w.eps) if b is None else ops.add_layer_norm(x, y, wt, b, self.w.eps)

    def _qkv(self, lw: LayerWeights, h: torch.Tensor, cos, sin, ops, qkv: torch.Tensor | None = None):
        """(q, k, v) heads of ``h`` (1, T, H), RoPE applied; ``qkv`` (1, T, .): the projection already made."""
        w = self.w
        T = h.shape[1]
        if qkv is None:
            qkv = F.linear(h, lw.qkv_w, lw.qkv_b)
        nq, nk = w.n_heads * w.head_dim, w.n_kv_heads * w.head_dim
        q = qkv[..., :nq].view(1, T, w.n_heads, w.head_dim).transpose(1, 2)
        k = qkv[..., nq:nq + nk].view(1, T, w.n_kv_heads, w.head_dim).transpose(1, 2)
        v = qkv[..., nq + nk:].view(1, T, w.n_kv_heads, w.head_dim).transpose(1, 2)
        if w.family == "opt":
            q = q * (w.head_dim ** -0.5)  # OPT scales q after the projection (as Hugging Face does)
        else:
            q, k = ops.rope(q, k, cos, sin)
        return q, k, v

    def _scale(self) -> float:
        return 1.0 if self.w.family == "opt" else self.w.head_dim ** -0.5

    def _ffn_dense(self, lw: LayerWeights, h: torch.Tensor, out: torch.Tensor | None = None):
        """Dense FFN for the prefill: returns the output; the intermediate activation (1, T, I) is written into
        ``out`` where given (the same kernel, another address)."""
        if lw.ffn_kind == "mlp":
            a = mlp_act(F.linear(h, lw.up_w, lw.up_b), self.w.act)
            if out is not None:
                a = out.copy_(a)
        else:
            a = self._gated(lw, *F.linear(h, lw.up_w).chunk(2, dim=-1), out=out)
        return F.linear(a, lw.down, lw.down_b)

    def _prefill_setup(self, ids: torch.Tensor):
        """(the embedded prompt, its RoPE tables (cos, sin) or None, the sliding-window mask or None)."""
        w = self.w
        T = ids.numel()
        pos = torch.arange(T, device=w.device)
        rope = (self.cos[:T], self.sin[:T]) if w.rope_fn is not None else None
        mask = None
        if w.sliding_window is not None and T > w.sliding_window:
            i = pos.view(-1, 1)
            mask = (pos.view(1, -1) <= i) & (pos.view(1, -1) > i - w.sliding_window)
        return self._embed(ids, pos), rope, mask

    def _prefill_attention(self, li: int, lw: LayerWeights, x: torch.Tensor, rope, mask):
        """Layer ``li``'s attention over the whole prompt (its KV cache filled): (x + attention, the FFN's input)."""
        w = self.w
        T = x.shape[1]
        cos, sin = rope if rope is not None else (None, None)
        h = self._norm(x, lw.norm1_w, lw.norm1_b)
        q, k, v = self._qkv(lw, h, cos, sin, _EAGER)
        self.k_cache[li][:, :, :T].copy_(k)
        self.v_cache[li][:, :, :T].copy_(v)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self._scale(),
                                           enable_gqa=w.n_kv_heads != w.n_heads)
        x = x + F.linear(o.transpose(1, 2).reshape(1, T, -1), lw.o_w, lw.o_b)
        return x, self._norm(x, lw.norm2_w, lw.norm2_b)

    def _prefill_forward(self, ids: torch.Tensor, select: bool, sparse: bool = False,
                         last: torch.Tensor | None = None, acts: torch.Tensor | None = None):
        """Forward of the prompt at positions 0..T-1: fills the KV cache; returns (last logits, acts).

        ``select``: the sparse layers' activations are kept, stacked (n_sparse, T, I), for the one batched
        selection after it or at the end of the captured graph (else acts is None), into ``acts`` where given.
        ``sparse``: the sparse layers' FFN already runs on the core neurons of ``_gather``ed sets
        (similarity-guided prompts with ``sparse_prefill``). ``last`` (1,) on the device: the position whose logits are returned (default
        T - 1; the captured prefill's padded prompt ends earlier)."""
        w = self.w
        T = ids.numel()
        x, rope, mask = self._prefill_setup(ids)
        if self.k is None or not select:
            acts = None
        elif acts is None:
            acts = torch.empty(len(self.sparse_layers), T, w.n_neurons, device=w.device, dtype=w.dtype)
        for li, lw in enumerate(self.w.layers):
            x, h = self._prefill_attention(li, lw, x, rope, mask)
            in_sparse = li in self.sparse_layers
            if sparse and in_sparse:
                y = self._ffn_core_prefill(li, lw, h)
            else:
                y = self._ffn_dense(lw, h, acts[self._row[li]].view(1, T, -1)
                                    if (in_sparse and acts is not None) else None)
            x = x + y
        h = self._norm(x[:, -1:] if last is None else x.index_select(1, last), w.final_w, w.final_b)
        return F.linear(h, w.lm_head)[0, -1], acts

    def _prefill(self, ids: torch.Tensor, select: bool, sparse: bool):
        """(last logits, acts, captured): the prefill, replayed from the CUDA graph of the prompt's length bucket
        where ``prefill_graph`` allows (captured on its first use), else ``_prefill_forward`` eagerly.

        The prompt is padded with token 0 to a multiple of ``PREFILL_BUCKET`` (or to ``max_seq_len``). Causal
        attention keeps the padding out of every real position; its keys and values land in cache rows >= T,
        which the decode overwrites before it reads them; only the T real rows of the activations go to the
        selection."""
        T = ids.numel()
        n = min(-(-T // PREFILL_BUCKET) * PREFILL_BUCKET, self.max_seq_len)  # T <= max_seq_len (_check_request)
        if not self.prefill_graph or n > PREFILL_GRAPH_MAX:
            return (*self._prefill_forward(ids, select, sparse), False)
        select = select and self.k is not None
        if self._prefill_ids is None:
            dev = self.w.device
            self._prefill_ids = torch.zeros(min(PREFILL_GRAPH_MAX, self.max_seq_len), dtype=torch.long, device=dev)
            self._prefill_last = torch.zeros(1, dtype=torch.long, device=dev)
            self._prefill_len = torch.zeros(1, dtype=torch.long, device=dev)
        self._prefill_ids[:T].copy_(ids)
        self._prefill_ids[T:n].zero_()
        self._prefill_last.fill_(T - 1)
        self._prefill_len.fill_(T)
        key = (n, select, sparse)
        if key not in self._prefill_graphs:
            self._capture_prefill(key)
        graph, logits, acts = self._prefill_graphs[key]
        graph.replay()
        return logits, (acts[:, :T] if acts is not None else None), True

    def _capture_prefill(self, key: tuple) -> None:
        n, select, sparse = key
        if select and (self._acts is None or self._acts.shape[1] < n):
            for old in [k for k in self._prefill_graphs if k[1]]:
                del self._prefill_graphs[old]  # captured against the smaller buffer
            self._acts = None
            self._acts = torch.empty(len(self.sparse_layers), n, self.w.n_neurons, device=self.w.device,
                                     dtype=self.w.dtype)
        acts = self._acts[:, :n] if select else None  # each layer's n rows contiguous, the layers apart

        def forward():
            logits = self._prefill_forward(self._prefill_ids[:n], select, sparse, last=self._prefill_last, acts=acts)[0]
            if select and self.select_in_prefill:
                self._select_into_index(acts)
            return logits

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()  # warm-up outside the capture: cuBLAS / attention workspaces; replayed over below
        torch.cuda.current_stream().wait_stream(stream)
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._prefill_pool):
            logits = forward()
        self._prefill_graphs[key] = (graph, logits, acts)

    def _select_into_index(self, acts: torch.Tensor) -> None:
        """The core sets of the captured prefill's activations ``acts`` (n_sparse, bucket, I), of the prompt's first
        T rows (T read on the device), written into the index buffer: ``_select`` in the graph."""
        from . import select_kernels

        if self.uniform_k is not None:
            select_kernels.select(acts, self.alpha, self.score, self.uniform_k, n_tokens=self._prefill_len,
                                  out=self._idx)
            return
        counts, sums = select_kernels.layer_statistics(acts, self.alpha, self.score, as_int64=False,
                                                       n_tokens=self._prefill_len)
        for j, li in enumerate(self.sparse_layers):
            select_kernels.top_neurons(counts[j:j + 1], sums[j:j + 1], self.layer_k[li], acts.shape[1],
                                       out=self._idx[j:j + 1])

    def _ffn_core_prefill(self, li: int, lw: LayerWeights, h: torch.Tensor) -> torch.Tensor:
        """The prompt's FFN on the core neurons only: the compact buffers, or (gather-free path) the core rows
        of gate||up and of the (I, H) down copy selected for this one product."""
        if not self.indexed:
            kp = self.k_pad[li]
            up_w, down = self.c_up[li], self.c_down[li]
            if lw.ffn_kind == "mlp":
                a = mlp_act(F.linear(h, up_w, self.c_up_b[li]), self.w.act)
            else:
                a = self._gated(lw, *F.linear(h, up_w).split(kp, dim=-1))
            return F.linear(a, down, lw.down_b)
        k = self.layer_k[li]
        idx = self._idx[self._row[li], :k].long()
        if lw.ffn_kind == "mlp":
            a = mlp_act(F.linear(h, lw.up_w.index_select(0, idx), None if lw.up_b is None else lw.up_b[idx]), self.w.act)
        else:
            I = self.w.n_neurons
            a = self._gated(lw, *F.linear(h, lw.up_w.index_select(0, torch.cat([idx, idx + I]))).split(k, dim=-1))
        return F.linear(a, lw.down_t.index_select(0, idx).t(), lw.down_b)

    def _gated(self, lw: LayerWeights, g: torch.Tensor, u: torch.Tensor, out: torch.Tensor | None = None):
        """The gated FFN's intermediate activation act(g) * u (dReLU: relu(g) * relu(u)), into ``out`` if given."""
        if lw.ffn_kind == "drelu":
            g, u = F.relu(g), F.relu(u)
        else:
            g = activation_fn(self.w.act)(g)
        return torch.mul(g, u, out=out) if out is not None else g * u

    def _stack_core_sets(self, core_sets: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        if sorted(core_sets) != list(self.sparse_layers):
            raise FastPathError(f"need one core set per sparse layer {list(self.sparse_layers)}, got layers {sorted(core_sets)}")
        for li, idx in core_sets.items():
            if idx.numel() != self.layer_k[li]:
                raise FastPathError(f"layer {li}: core set has {idx.numel()} neurons, the buffers hold {self.layer_k[li]}")
        return [core_sets[li].to(self.w.device, torch.long).view(-1) for li in self.sparse_layers]

    def _select(self, acts: torch.Tensor, n_tokens: int) -> list[torch.Tensor]:
        """Core sets of every sparse layer from their stacked prefill activations, on the device, sync-free: one
        batched selection (one k), or the statistics of all layers at once ranked per layer (per-layer k)."""
        if self.uniform_k is not None:
            return list(stability_select_layers(acts, self.alpha, score=self.score, k=self.uniform_k).unbind(0))
        counts, sums = layer_statistics(acts, self.alpha, self.score)
        return [select_from_statistics(counts[j:j + 1], sums[j:j + 1], self.layer_k[li], n_tokens)[0]
                for j, li in enumerate(self.sparse_layers)]

    def _index_sets(self) -> dict[int, torch.Tensor]:
        """Copies of the core sets the index buffer holds (the captured prefill's selection wrote them), by layer.
        Taken after the decode (which only reads the buffer), so the copy is not on the way to the first token."""
        if self.uniform_k is not None:
            return dict(zip(self.sparse_layers, self._idx[:, :self.uniform_k].long().unbind(0)))
        return {li: self._idx[j, :self.layer_k[li]].long() for j, li in enumerate(self.sparse_layers)}

    def _gather(self, sets: list[torch.Tensor], compact: bool = False) -> None:
        """Make the decode use core sets ``sets`` (one per sparse layer): write the index buffer (gather-free
        path) and/or gather the compact buffers (``compact``, or no gather-free path); with both, the gather
        runs on a second stream, which the decode waits for (``_join_gather``)."""
        if self.indexed:
            if self.uniform_k is not None:
                self._idx[:, :self.uniform_k].copy_(torch.stack(sets))
            else:
                for j, idx in enumerate(sets):
                    self._idx[j, :idx.numel()].copy_(idx)
            if not compact:
                return
            side = self._side_stream()
            side.wait_stream(torch.cuda.current_stream())  # the sets, and earlier decodes of these buffers
            with torch.cuda.stream(side):
                self._gather_compact(sets)
            for idx in sets:
                idx.record_stream(side)
            return
        self._gather_compact(sets)

    def _side_stream(self) -> "torch.cuda.Stream":
        if self._side is None:
            self._side = torch.cuda.Stream(self.w.device)
        return self._side

    def _join_gather(self) -> None:
        """The current stream waits (on the device) for the side-stream gather of ``_gather(compact=True)``."""
        if self._side is not None:
            torch.cuda.current_stream().wait_stream(self._side)

    def _gather_compact(self, sets: list[torch.Tensor]) -> None:
        I = self.w.n_neurons
        for j, li in enumerate(self.sparse_layers):
            lw = self.w.layers[li]
            idx = sets[j]
            k, kp = idx.numel(), self.k_pad[li]
            # rows [k, kp) of each part stay zero (allocated so, never written)
            if lw.ffn_kind == "mlp":
                torch.index_select(lw.up_w, 0, idx, out=self.c_up[li][:k])
                if lw.up_b is not None:
                    torch.index_select(lw.up_b, 0, idx, out=self.c_up_b[li][:k])
            else:
                torch.index_select(lw.up_w, 0, idx, out=self.c_up[li][:k])  # gate rows
                torch.index_select(lw.up_w, 0, idx + I, out=self.c_up[li][kp:kp + k])  # up rows
            self.c_down[li][:, :k].copy_(lw.down.index_select(1, idx))  # columns of down

    def _decode_step(self, mode: "_Mode" = None) -> torch.Tensor:
        """One token at position ``_pos`` from token ``_tok``: fixed shapes and addresses (graph-capturable).

        Writes the next token (greedy, or drawn as ``mode`` says) into ``_tok`` and ``_out[_step]``, advances
        ``_pos`` and ``_step``; returns logits.
        """
        mode = mode or GREEDY
        if self.fold_norm:
            return self._decode_step_folded(mode)
        w, ops = self.w, self.ops
        pos = self._pos
        x = self._embed(self._tok, pos)
        rope = self._step_rope()
        first = w.layers[0]
        x, h = self._add_norm(x, None, first.norm1_w, first.norm1_b, ops)
        for li, lw in enumerate(w.layers):
            qkv = self._linear(lw.qkv_w, h, lw.qkv_b) if self._attn is not None else None
            o = self._attend(li, lw, h, qkv, rope)
            o = self._linear(lw.o_w, o.reshape(1, 1, -1), lw.o_b)
            sparse = self.indexed and not mode.compact and li in self.sparse_layers
            x, h = self._add_norm(x, o, lw.norm2_w, lw.norm2_b, ops)
            if sparse:  # core rows read in place (kernels.py)
                from .kernels import gemv_rows

                idx = self._idx[self._row[li], :self.layer_k[li]]
                a = self._ffn_up(lw, lw.up_w, lw.up_b, h, idx)
                y = torch.empty(w.hidden, device=h.device, dtype=h.dtype)
                # fused_norm: the partial rows go unsummed to the residual add + norm below
                y = gemv_rows(lw.down_t, a.view(-1), y, idx, lw.down_b, self._partial, self.rows_config,
                              reduce=not self.fused_norm, pdl=self.pdl)
                y_bias = lw.down_b if y.dim() == 2 else None
                if y.dim() == 1:
                    y = y.view(1, 1, -1)
            else:
                compact = li in self.layer_k and (mode.compact or not self.indexed)
                up_w = self.c_up[li] if compact else lw.up_w
                up_b = (self.c_up_b[li] if compact else lw.up_b) if lw.up_b is not None else None
                down = self.c_down[li] if compact else lw.down
                a = self._ffn_up(lw, up_w, up_b, h)
                y = self._linear(down, a, lw.down_b)
                y_bias = None
            if li + 1 < len(w.layers):
                nxt = w.layers[li + 1]
                x, h = self._add_norm(x, y, nxt.norm1_w, nxt.norm1_b, ops, y_bias)
            else:
                x, h = self._add_norm(x, y, w.final_w, w.final_b, ops, y_bias)
        logits = self._linear(w.lm_head, h, None).view(-1)
        self._next_token(logits, mode)
        return logits

    def _step_rope(self):
        """(cos, sin, mask) of the new position for the PyTorch attention (None for the Triton kernel, which
        reads them itself)."""
        w, pos = self.w, self._pos
        if self.attention != "sdpa":
            return None
        cos = sin = None
        if w.rope_fn is not None:
            cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)
        valid = self._slots <= pos
        if w.sliding_window is not None:
            valid = valid & (self._slots > pos - w.sliding_window)
        return cos, sin, valid.view(1, 1, 1, -1)

    def _attend(self, li: int, lw: LayerWeights, h: torch.Tensor, qkv: torch.Tensor | None, rope) -> torch.Tensor:
        """Attention of the new token at layer ``li`` (its k/v written into the cache): the fused Triton
        launch from the projection ``qkv``, or PyTorch from ``h`` (or ``qkv`` where given) and ``rope``."""
        w = self.w
        if self._attn is not None:  # fused RoPE + cache write + split-KV attention (kernels.py)
            qkv = qkv.view(-1)
            o = torch.empty(w.n_heads * w.head_dim, device=qkv.device, dtype=qkv.dtype)
            has_rope = w.rope_fn is not None
            self._attn(qkv, self.cos if has_rope else None, self.sin if has_rope else None, self.k_cache[li],
                       self.v_cache[li], self._pos, o, w.head_dim ** -0.5)
            return o
        cos, sin, mask = rope
        q, k, v = self._qkv(lw, h.view(1, 1, -1), cos, sin, self.ops, None if qkv is None else qkv.view(1, 1, -1))
        self.k_cache[li].index_copy_(2, self._pos, k)
        self.v_cache[li].index_copy_(2, self._pos, v)
        # GQA for one query token: the g query heads of a kv head become g query rows
        g = w.n_heads // w.n_kv_heads
        return F.scaled_dot_product_attention(q.reshape(1, w.n_kv_heads, g, w.head_dim), self.k_cache[li],
                                              self.v_cache[li], attn_mask=mask, scale=self._scale())

    def _decode_step_folded(self, mode: "_Mode") -> torch.Tensor:
        """``_decode_step`` with the norms folded into the GEMVs (``fold_norm``): five launches per layer (qkv,
        attention, o + residual, gate||up, down + residual; the gather-free down product's partial rows are
        summed with the residual in a sixth), then the final norm, lm_head and the next token."""
        from .kernels import GEMV_CONFIG_UP, gemv, gemv_rows, residual_rms_norm

        w, pos, eps, dev, dt = self.w, self._pos, self.w.eps, self.w.device, self.w.dtype
        rope = self._step_rope()
        x = self._embed(self._tok, pos).view(-1)
        for li, lw in enumerate(w.layers):
            qkv = gemv(lw.qkv_w, x, torch.empty(lw.qkv_w.shape[0], device=dev, dtype=dt), lw.qkv_b, pdl=self.pdl,
                       config=self.gemv_config, norm_eps=eps)
            o = self._attend(li, lw, x, qkv, rope).reshape(-1)
            x = gemv(lw.o_w, o, torch.empty(w.hidden, device=dev, dtype=dt), lw.o_b, pdl=self.pdl,
                     config=self.gemv_config, residual=x)
            gated, code = lw.ffn_kind != "mlp", self._kernel_act(lw)
            indexed = self.indexed and not mode.compact and li in self.sparse_layers
            compact = li in self.layer_k and (mode.compact or not self.indexed)
            idx = self._idx[self._row[li], :self.layer_k[li]] if indexed else None
            up_w = self.c_up[li] if compact else lw.up_w
            up_b = (self.c_up_b[li] if compact else lw.up_b) if lw.up_b is not None else None
            n = idx.numel() if indexed else (up_w.shape[0] // 2 if gated else up_w.shape[0])
            a = gemv(up_w, x, torch.empty(n, device=dev, dtype=dt), up_b, gated=gated, act=code,
                     act_up=lw.ffn_kind == "drelu", idx=idx, pdl=self.pdl,
                     config=self.gemv_config_up or GEMV_CONFIG_UP, norm_eps=eps)
            y = torch.empty(w.hidden, device=dev, dtype=dt)
            if indexed:
                y = gemv_rows(lw.down_t, a, y, idx, lw.down_b, self._partial, self.rows_config, reduce=False,
                              pdl=self.pdl)
                x, _ = residual_rms_norm(x, y, None, eps, self._scratch, lw.down_b if y.dim() == 2 else None,
                                         self.pdl, norm=False)
            else:
                x = gemv(self.c_down[li] if compact else lw.down, a, y, lw.down_b, pdl=self.pdl,
                         config=self.gemv_config, residual=x)
        _, h = residual_rms_norm(x, None, w.final_w, eps, self._scratch, pdl=self.pdl)
        logits = gemv(w.lm_head, h, torch.empty(w.lm_head.shape[0], device=dev, dtype=dt), pdl=self.pdl,
                      config=self.gemv_config)
        self._next_token(logits, mode)
        return logits

    def _next_token(self, logits: torch.Tensor, mode: "_Mode") -> None:
        """out[step] = tok = the next token (greedy or drawn), pos += 1, step += 1; with ``mode.keep_logits``
        the logits are first stored as row ``step`` of the per-call logits buffer."""
        if mode.keep_logits:
            self._logit_rows.index_copy_(0, self._step, logits.view(1, -1).to(self._logit_rows.dtype))
        if self._scratch is not None:  # argmax / draw + out[step] = tok + pos/step counters: one launch
            from .kernels import argmax_step

            sample = (self._cutoff(logits, mode), self._temp, self._seed) if mode.sample else None
            argmax_step(logits, self._tok, self._pos, self._step, self._out, self._scratch, self.pdl, sample)
            return
        if mode.sample:
            if self.cuda_graph:
                raise FastPathError("sampling on the fast path needs its Triton step (gemv='triton')")
            nxt_tok = self._draw_eager(logits, mode)
        else:
            nxt_tok = self.ops.argmax(logits)
        self._out.index_copy_(0, self._step, nxt_tok)
        self._tok.copy_(nxt_tok)
        self._pos.add_(1)
        self._step.add_(1)

    def _cutoff(self, logits: torch.Tensor, mode: "_Mode") -> torch.Tensor | None:
        """The smallest logit a draw may pick, (1,) float32, or None (no top-k / top-p): transformers' order,
        temperature, then top-k, then the top-p nucleus of what is left. Static shapes (graph-capturable):
        top-k is ``topk(k)``, top-p alone sorts the whole vocabulary; the thresholds live in device scalars."""
        if mode.top_k is None and not mode.top_p:
            return None
        lf = logits.float()
        vals = torch.topk(lf, min(mode.top_k, lf.numel())).values if mode.top_k is not None \
            else torch.sort(lf, descending=True).values
        if not mode.top_p:
            return vals[-1:]
        p = torch.softmax(vals / self._temp, 0)
        keep = (torch.cumsum(p, 0) - p) < self._top_p  # the smallest prefix whose mass reaches top_p
        n = keep.sum().clamp(min=1)
        return vals.gather(0, (n - 1).view(1))

    def _draw_eager(self, logits: torch.Tensor, mode: "_Mode") -> torch.Tensor:
        """The kernel's Gumbel-max draw in PyTorch (CPU / no graph): the same rule; its uniform numbers come from
        a generator seeded with seed + step (the CPU's stream, not Philox's)."""
        lf = logits.float()
        cut = self._cutoff(logits, mode)
        gen = torch.Generator(device=lf.device)
        gen.manual_seed(int(self._seed) + int(self._step))
        u = torch.rand(lf.shape, generator=gen, device=lf.device)
        score = lf / self._temp - torch.log(-torch.log(u))
        if cut is not None:
            score = score.masked_fill(lf < cut, float("-inf"))
        return score.argmax().view(1)

    def _linear(self, weight: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (1, 1, K) @ weight (N, K)^T + bias -> (1, 1, N): Triton GEMV or cuBLAS (``self.gemv``)."""
        if self.gemv == "triton":
            from .kernels import gemv

            out = torch.empty(weight.shape[0], device=x.device, dtype=x.dtype)
            return gemv(weight, x.reshape(-1), out, bias, pdl=self.pdl, config=self.gemv_config).view(1, 1, -1)
        return F.linear(x, weight, bias)

    def _kernel_act(self, lw: LayerWeights):
        """The GEMV kernel's code of this layer's FFN activation, or None where the kernel lacks it."""
        from .kernels import ACT_CODES

        return ACT_CODES.get("relu" if lw.ffn_kind == "drelu" else self.w.act)

    def _ffn_up(self, lw: LayerWeights, up_w: torch.Tensor, up_b: torch.Tensor | None, h: torch.Tensor,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        """The FFN's intermediate activation for one token: gate/up (or fc1) and the activation, fused into
        one GEMV kernel where the activation is one the kernel has; with ``idx`` only the core neurons', read
        from the full matrices in place."""
        if self.gemv == "triton":
            from .kernels import GEMV_CONFIG_UP, gemv

            code = self._kernel_act(lw)
            if code is not None:
                gated = lw.ffn_kind != "mlp"
                n = (up_w.shape[0] // 2 if gated else up_w.shape[0]) if idx is None else idx.numel()
                out = torch.empty(n, device=h.device, dtype=h.dtype)
                return gemv(up_w, h.reshape(-1), out, up_b, gated=gated, act=code, act_up=lw.ffn_kind == "drelu",
                            idx=idx, pdl=self.pdl, config=self.gemv_config_up or GEMV_CONFIG_UP).view(1, 1, -1)
            if idx is not None:
                raise FastPathError(f"no fused kernel for activation {self.w.act!r}")  # excluded by self.indexed
        if lw.ffn_kind == "mlp":
            return self.ops.mlp_act(self._linear(up_w, h, up_b), self.w.act)
        return self.ops.gated_act(self._linear(up_w, h, None), "drelu" if lw.ffn_kind == "drelu" else self.w.act)

    def _ensure_graph(self, mode: "_Mode") -> None:
        """Capture the decode step for ``mode`` once (one graph per greedy / sampling variant, sharing one
        memory pool); later calls replay it."""
        if not self.cuda_graph or mode in self._graphs:
            return
        saved = [t.clone() for t in (self._tok, self._pos, self._step)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: compiles the fused element-wise kernels, cuBLAS handles
                self._decode_step(mode)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode_step(mode)
        torch.cuda.synchronize()
        for t, s in zip((self._tok, self._pos, self._step), saved):
            t.copy_(s)
        self._graphs[mode] = (graph, logits)

    def _run_step(self, mode: "_Mode") -> torch.Tensor:
        captured = self._graphs.get(mode)
        if captured is not None:
            captured[0].replay()
            return captured[1]
        return self._decode_step(mode)

    def warmup(self, sampling: "Sampling | None" = None) -> None:
        """Capture the decode graph for greedy decoding (or ``sampling``'s variant) now, not in the first call."""
        with self._lock, torch.inference_mode():
            self._ensure_graph(_Mode.of(sampling, False))

    # ---- public calls (each holds the instance lock throughout)

    def _set_sampling(self, sampling: "Sampling | None", keep_logits: bool, n_rows: int,
                      compact: bool = False) -> "_Mode":
        mode = _Mode.of(sampling, keep_logits, compact)
        if sampling is not None:
            self._temp.fill_(sampling.temperature)
            self._top_p.fill_(sampling.top_p if sampling.top_p is not None else 1.0)
            self._seed.fill_(sampling.seed)
        if keep_logits and (self._logit_rows is None or self._logit_rows.shape[0] < n_rows):
            rows = self.cache_len  # one row per step a call can run: a fixed address for every captured graph
            self._logit_rows = torch.empty(rows, self.w.vocab, device=self.w.device, dtype=self.w.dtype)
            for key in [m for m in self._graphs if m.keep_logits]:
                del self._graphs[key]  # captured against the old buffer
        return mode

    def _start(self, ids: torch.Tensor, timings: dict, sync: bool, core_sets=None, mode: "_Mode" = None,
               sparse_prefill: bool = False):
        """Prefill, core sets and the first token: (logits, chosen core sets, t0). ``chosen`` is None where the
        captured prefill selected them into the index buffer (``_index_sets`` copies them out later)."""
        mode = mode or GREEDY
        dev_sync = torch.cuda.synchronize if (sync and self.w.device.type == "cuda") else (lambda: None)
        if mode.compact and self.c_up[self.sparse_layers[0]] is None:
            self._alloc_compact()
        self._ensure_graph(mode)
        if sparse_prefill and (core_sets is None or self.k is None):
            raise FastPathError("sparse_prefill needs core sets known before the prefill (similarity-guided prompts)")
        dev_sync()
        t0 = time.perf_counter()
        given = self._stack_core_sets(core_sets) if (self.k is not None and core_sets is not None) else None
        early = given is not None and (sparse_prefill or mode.compact)  # gathered before (and under) the prefill
        if early:
            side = None
            if mode.compact and sync:
                side = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                side[0].record(self._side_stream())
            self._gather(given, compact=mode.compact)
            if side is not None:
                side[1].record(self._side_stream())
        logits, acts, captured = self._prefill(ids, select=core_sets is None, sparse=sparse_prefill)
        # the captured prefill wrote the core sets into the index buffer itself
        in_prefill = captured and given is None and self.k is not None and self.select_in_prefill
        timings["prefill_graph"] = captured
        timings["select_in_prefill"] = in_prefill
        timings["compact"] = mode.compact
        dev_sync()
        t1 = time.perf_counter()
        chosen: dict[int, torch.Tensor] | None = {}
        if in_prefill:
            chosen = None  # the sets stay in the index buffer; the caller copies them after the decode
            t2 = t3 = t1
        elif self.k is not None:
            # all sparse layers at once, on the device, no host synchronisation (selection.py)
            sets = self._select(acts, ids.numel()) if given is None else given
            chosen = {li: sets[j] for j, li in enumerate(self.sparse_layers)}
            dev_sync()
            t2 = time.perf_counter()
            if not early:
                self._gather(sets)
            dev_sync()
            t3 = time.perf_counter()
        else:
            t2 = t3 = t1
        if mode.compact:
            self._join_gather()
        del acts
        T = ids.numel()
        self._pos.fill_(T - 1)  # the first new token comes from the prefill's logits, picked as every later one
        self._step.zero_()
        self._next_token(logits, mode)
        if sync:
            timings.update(prefill_ms=(t1 - t0) * 1e3, select_ms=(t2 - t1) * 1e3, gather_ms=(t3 - t2) * 1e3)
            if early and mode.compact:  # its device time, under the prefill (which waited for it, if it was longer)
                timings["gather_side_ms"] = side[0].elapsed_time(side[1])
        return logits, chosen, t0

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 timing: bool = False, core_sets: dict[int, torch.Tensor] | None = None,
                 sampling: "Sampling | None" = None, on_tokens=None, keep_logits: bool = False,
                 sparse_prefill: bool = False, chunk: int | None = None) -> FastGeneration:
        """Up to ``max_new_tokens`` new tokens, greedy or drawn (``sampling``); stops after an EOS when given.

        ``core_sets`` (sparse layer -> indices) skips the selection and uses these sets (similarity-guided
        prompts; checks against a reference); ``sparse_prefill`` then runs the prompt's FFN on them too.
        ``on_tokens(tokens) -> bool`` sees the new tokens in order, a chunk at a time, while the device
        decodes the next chunk (tokens reach pinned host memory asynchronously; no graph is broken); True
        from it ends the call (stop strings), as does an EOS. ``keep_logits`` returns each new token's (V,)
        logits. With ``timing=True`` the phases are separated by device synchronisations, in ms.
        """
        with self._lock, torch.inference_mode():
            ids = self._check_request(input_ids, max_new_tokens)
            timings: dict = {}
            on_cuda = self.w.device.type == "cuda"
            mode = self._set_sampling(sampling, keep_logits, max_new_tokens,
                                      compact=self._compact_call(core_sets, max_new_tokens))
            _, chosen, t0 = self._start(ids, timings, timing, core_sets, mode, sparse_prefill)
            eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
            watched = on_tokens is not None
            chunk = chunk or (8 if watched else 32)
            if self._host_out is None and on_cuda:
                self._host_out = torch.empty(self.cache_len, dtype=torch.long, pin_memory=True)
            host = self._host_out if on_cuda else None
            pending = []  # chunks (start, n, event) whose tokens are on their way to host memory

            def publish(a: int, n: int) -> None:
                if host is None:
                    pending.append((a, n, None))
                    return
                host[a:a + n].copy_(self._out[a:a + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record()
                pending.append((a, n, ev))

            def enqueue(a: int, n: int) -> None:
                for _ in range(n):
                    self._run_step(mode)
                publish(a, n)

            if timing:
                if on_cuda:
                    torch.cuda.synchronize()
                timings["ttft_ms"] = (time.perf_counter() - t0) * 1e3
            t_dec = time.perf_counter()
            tokens: list[int] = []
            publish(0, 1)  # the first token (from the prefill) travels like every chunk
            launched = 1
            try:
                launched = self._drain(pending, enqueue, launched, max_new_tokens, chunk, eos, tokens, on_tokens)
            finally:
                if on_cuda:
                    torch.cuda.synchronize()  # a chunk launched past the stop (or an error) finishes; tokens dropped
            if timing:
                timings["decode_ms"] = (time.perf_counter() - t_dec) * 1e3
                timings["decode_steps"] = launched - 1
            logits = []
            if keep_logits:
                logits = list(self._logit_rows[:len(tokens)].to("cpu", torch.float32, copy=True).unbind(0))
            return FastGeneration(tokens, self._index_sets() if chosen is None else chosen, timings, logits)

    def _drain(self, pending: list, enqueue, launched: int, max_new: int, chunk: int, eos: set, tokens: list,
               on_tokens) -> int:
        """Read the chunks of new tokens back in order, keeping one more chunk queued on the device meanwhile;
        returns how many tokens were launched. Stops at an EOS or when ``on_tokens`` says so."""
        host = self._host_out
        while pending:
            a, n, ev = pending.pop(0)
            if launched < max_new and not pending:
                m = min(chunk, max_new - launched)
                enqueue(launched, m)  # the device decodes this chunk while the host reads the last one
                launched += m
            if ev is not None:
                ev.synchronize()
            new = (host if ev is not None else self._out)[a:a + n].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in eos), None)
            new = new if cut is None else new[:cut]
            tokens.extend(new)
            if on_tokens is not None and on_tokens(new):
                break
            if cut is not None:
                break
        return launched

    def forced_logits(self, input_ids, continuation, core_sets: dict[int, torch.Tensor] | None = None):
        """Teacher-forced logits: the prefill's last-position logits, then one decode step per token of
        ``continuation`` (fed regardless of what the model predicts). Returns (float32 (1+n, V), core sets)."""
        cont = [int(t) for t in torch.as_tensor(continuation).view(-1).tolist()]
        with self._lock, torch.inference_mode():
            ids = self._check_request(input_ids, len(cont) + 1)
            mode = _Mode(compact=self._compact_call(core_sets, len(cont) + 1))
            logits, chosen, _ = self._start(ids, {}, False, core_sets, mode)
            rows = [logits.float().clone()]
            for t in cont:
                self._tok.fill_(t)
                rows.append(self._run_step(mode).float().clone())
            return torch.stack(rows), self._index_sets() if chosen is None else chosen


@dataclass(frozen=True)
class Sampling:
    """How the fast path draws tokens: softmax(logits / temperature) restricted to the ``top_k`` largest and
    then the ``top_p`` nucleus (transformers' order), by the Gumbel-max trick with a counter-based RNG keyed by
    ``seed`` + step, so a seed gives the same tokens on every run of the same device."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise FastPathError(f"temperature must be a finite number > 0, got {t!r}; use greedy decoding for 0")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise FastPathError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise FastPathError(f"top_p must be None or in (0, 1], got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 62:
            raise FastPathError(f"seed must be an int in [0, 2**62), got {self.seed!r}")


@dataclass(frozen=True)
class _Mode:
    """What a captured decode step does after the logits: the key of its CUDA graph."""

    sample: bool = False
    top_k: int | None = None
    top_p: bool = False
    keep_logits: bool = False
    compact: bool = False  # the sparse layers read the compact buffers (``compact_given``), not the core rows in place

    @classmethod
    def of(cls, sampling: "Sampling | None", keep_logits: bool, compact: bool = False) -> "_Mode":
        if sampling is None:
            return cls(keep_logits=keep_logits, compact=compact)
        return cls(True, sampling.top_k, sampling.top_p is not None and sampling.top_p < 1, keep_logits, compact)


GREEDY = _Mode()
_EAGER = _Ops(False)
