"""Memory-budget mode: what stays on the GPU and what streams from host memory, decided before any weight moves.

A model larger than the GPU can still decode from the GPU alone when its core FFN fits: attention, embeddings,
lm_head, norms, the KV cache and the compact core-FFN buffers are resident; the dense FFN of the sparse layers
is only needed by a dense prefill (stability-guided selection), so the layers that do not fit keep it in
(pinned) host memory and stream it to a staging buffer during the prefill. ``plan_memory`` makes that
decision from the model's config alone (published shapes: ``ModelShape.from_config``) and returns a
``MemoryPlan``; ``parse_budget`` reads the budget ("12GiB", "16GB", "500MiB", bytes). ``HostRowGather`` moves a
core set's rows from the host copies (which lay every neuron's weights out as rows, the down projection transposed)
to the device, for both offloaded paths.

Byte counts follow the layouts the runtime allocates: the compact core FFN of a sparse layer holds k neurons
padded to a multiple of ``CORE_PAD`` (as the fast path's compact buffers), the KV cache ``ceil(C / 16) * 16``
positions (the fast path's static cache), the prefill workspace an upper estimate of one layer's activations
and one layer's selection (``prefill_workspace_bytes``) plus ``WORKSPACE_MARGIN`` for library workspaces.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import torch

CORE_PAD = 64  # = cuda.fastlm.PAD: compact FFN slots are padded so every row stays 128-byte aligned
KV_ALIGN = 16  # the static KV cache holds a multiple of 16 positions (cuda.fastlm.FastLM.cache_len)
WORKSPACE_MARGIN = 256 << 20  # cuBLAS/cuBLASLt workspaces (one per stream), the decode graph's pool, RoPE tables, scratch
STAGING_BUFFERS = 2  # a double buffer: layer l+1's dense FFN is copied while layer l computes

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_BUDGET_FIX = 'write it as a positive size such as "12GiB", "16GB", "500MiB" or a number of bytes'


class MemoryBudgetError(ValueError):
    """A memory budget that cannot be parsed or does not fit; raised before any weight moves."""


def parse_budget(value) -> int:
    """Bytes of a memory budget: a positive int (bytes) or a string "<number><unit>", unit one of B, KB, MB, GB,
    TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), case-insensitive."""
    if isinstance(value, bool):
        raise MemoryBudgetError(f"memory budget {value!r} is not a size; {_BUDGET_FIX}")
    if isinstance(value, int):
        if value <= 0:
            raise MemoryBudgetError(f"memory budget {value!r} is not positive; {_BUDGET_FIX}")
        return value
    if not isinstance(value, str):
        raise MemoryBudgetError(f"memory budget {value!r} ({type(value).__name__}) is not a size; {_BUDGET_FIX}")
    m = _BUDGET_RE.match(value)
    if m is None or m.group(2).lower() not in _UNITS:
        raise MemoryBudgetError(f"memory budget {value!r} is not a size; {_BUDGET_FIX}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise MemoryBudgetError(f"memory budget {value!r} is not positive; {_BUDGET_FIX}")
    return n


def format_bytes(n: int) -> str:
    if abs(n) < 10 ** 8:
        return f"{n / 1e6:.2f} MB ({n / 2 ** 20:.2f} MiB)"
    return f"{n / 1e9:.2f} GB ({n / 2 ** 30:.2f} GiB)"


def padded(k: int) -> int:
    return -(-k // CORE_PAD) * CORE_PAD


# --------------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model: its tensor shapes (read off a Hugging Face config)."""

    family: str  # "llama" (RMSNorm, gated FFN, RoPE) | "opt" (LayerNorm, fc1/fc2 with biases, learned positions)
    hidden: int
    n_neurons: int  # FFN width I
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    qkv_bias: bool = False
    positions: int = 0  # OPT: rows of the learned position embedding (max positions + 2)
    max_context: int = 0

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(c, "model_type", None)
        H, nh = int(c.hidden_size), int(c.num_attention_heads)
        if model_type == "opt":
            if getattr(c, "word_embed_proj_dim", H) != H:
                raise MemoryBudgetError("OPT with word_embed_proj_dim != hidden_size is not supported under a memory budget")
            P = int(c.max_position_embeddings)
            return cls("opt", H, int(c.ffn_dim), int(c.num_hidden_layers), nh, nh, H // nh, int(c.vocab_size),
                       bool(getattr(c, "tie_word_embeddings", True)), qkv_bias=bool(getattr(c, "enable_bias", True)),
                       positions=P + 2, max_context=P)
        nkv = int(getattr(c, "num_key_value_heads", None) or nh)
        hd = int(getattr(c, "head_dim", None) or H // nh)
        bias = model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
        return cls("llama", H, int(c.intermediate_size), int(c.num_hidden_layers), nh, nkv, hd, int(c.vocab_size),
                   bool(getattr(c, "tie_word_embeddings", False)), qkv_bias=bias,
                   max_context=int(getattr(c, "max_position_embeddings", 0) or 0))

    # element counts of each part (multiply by the element size)
    def attention_elems(self) -> int:
        """One layer's attention and norms: q, k, v, o (+ biases), the two norms."""
        H, nq, nkv = self.hidden, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        w = H * (nq + 2 * nkv) + nq * H
        if self.family == "opt":
            return w + (nq + 2 * nkv) * self.qkv_bias + H * self.qkv_bias + 4 * H  # biases, two LayerNorms (w, b)
        return w + (nq + 2 * nkv) * self.qkv_bias + 2 * H

    def embedding_elems(self) -> int:
        return self.vocab * self.hidden + self.positions * self.hidden

    def head_elems(self) -> int:
        """lm_head (unless tied to the embeddings) and the final norm."""
        norm = 2 * self.hidden if self.family == "opt" else self.hidden
        return (0 if self.tied_embeddings else self.vocab * self.hidden) + norm

    def ffn_elems(self, k: int | None = None) -> int:
        """One layer's FFN over k neurons (None: all I). OPT adds fc1's bias (k) and fc2's (H)."""
        k = self.n_neurons if k is None else k
        if self.family == "opt":
            return 2 * self.hidden * k + k + self.hidden
        return 3 * self.hidden * k

    def kv_cache_elems(self, context: int) -> int:
        slots = -(-context // KV_ALIGN) * KV_ALIGN
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * slots


def prefill_workspace_bytes(shape: ModelShape, tokens: int, elem: int) -> int:
    """Upper estimate of what a prefill of ``tokens`` tokens allocates besides weights and the KV cache: one
    layer's activations (residual, norm, q/k/v and their RoPE copies, attention output, gate||up, the
    activation), one layer's stability selection (float32 scores, int64 sort indices, masks), the last
    position's logits, and ``WORKSPACE_MARGIN``."""
    H, I = shape.hidden, shape.n_neurons
    qkv = (shape.n_heads + 2 * shape.n_kv_heads) * shape.head_dim
    acts = tokens * (6 * H + 2 * qkv + 4 * I) * elem
    select = tokens * I * 24
    return acts + select + 2 * shape.vocab * 4 + WORKSPACE_MARGIN


# --------------------------------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """What lives on the GPU under a memory budget, and what streams from host memory (bytes)."""

    budget: int
    dtype: str
    context_length: int  # prompt + new tokens the KV cache holds
    layer_k: dict[int, int]  # sparse layer -> core neurons decoded (every other layer decodes dense)
    resident_dense: list[int]  # layers whose dense FFN is on the GPU (all non-sparse layers, and sparse ones that fit)
    streamed: list[int]  # sparse layers whose dense FFN stays in host memory (streamed during a dense prefill)
    staging_buffers: int  # device buffers of one dense FFN layer for streaming (2: copy/compute overlap, 1: none, 0)
    cluster_slots: int  # complete sets of compact core FFNs that fit (1: the decode buffers; more: an LRU of clusters)
    dense_layer_bytes: int  # one layer's dense FFN (what one streaming buffer holds)
    parts: dict[str, int] = field(default_factory=dict)  # bytes of each resident part

    @property
    def resident_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def headroom(self) -> int:
        return self.budget - self.resident_bytes

    @property
    def decode_resident_bytes(self) -> int:
        """What decoding reads: attention, embeddings, lm_head, norms, dense layers' FFN, core FFN (no KV cache)."""
        p = self.parts
        return p["attention"] + p["embeddings"] + p["lm_head_norm"] + p["core_ffn"] + p["dense_ffn_outside_sparse"]

    def streamed_bytes(self) -> int:
        """Host-to-device bytes of one dense prefill: the dense FFN of every streamed layer."""
        return self.dense_layer_bytes * len(self.streamed)

    def check_request(self, layer_k: dict[int, int], context: int) -> None:
        """A request (per-layer k, prompt + new tokens) within what this plan reserved, or a clear error."""
        if context > self.context_length:
            raise MemoryBudgetError(
                f"prompt + new tokens = {context} exceeds the {self.context_length} positions the memory plan reserved "
                f"for the KV cache; shorten the request or load with a larger planned context_length")
        over = {i: k for i, k in layer_k.items() if i not in self.layer_k or padded(k) > padded(self.layer_k[i])}
        if over:
            i = next(iter(over))
            planned = self.layer_k.get(i)
            raise MemoryBudgetError(
                f"layer {i} would keep {over[i]} neurons but the memory plan reserved "
                f"{'no core FFN (the layer is dense)' if planned is None else f'{planned}'} there; ask for a kept "
                f"fraction (and layers) within the plan's, or load with the larger kept fraction")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(resident_bytes=self.resident_bytes, headroom=self.headroom,
                 decode_resident_bytes=self.decode_resident_bytes, streamed_bytes_per_dense_prefill=self.streamed_bytes())
        d["layer_k"] = {str(i): k for i, k in self.layer_k.items()}
        return d

    def describe(self) -> str:
        p = self.parts
        ks = sorted(set(self.layer_k.values()))
        lines = [f"memory plan: budget {format_bytes(self.budget)}, {self.dtype}, KV cache for {self.context_length} positions",
                 f"  core FFN: {len(self.layer_k)} sparse layers, k = {ks[0] if len(ks) == 1 else ks} neurons "
                 f"(padded to {CORE_PAD})"]
        names = {"attention": "attention + norms", "embeddings": "embeddings", "lm_head_norm": "lm_head + final norm",
                 "kv_cache": "KV cache", "core_ffn": "compact core FFN", "dense_ffn_outside_sparse": "dense FFN, dense layers",
                 "dense_ffn_resident_sparse": "dense FFN, resident sparse layers", "staging": "streaming buffers",
                 "cluster_cache": "LRU of clusters' core FFNs", "workspace": "prefill workspace + margin"}
        for key, name in names.items():
            if p.get(key):
                lines.append(f"  resident  {name:<36s} {format_bytes(p[key])}")
        lines.append(f"  resident  {'total':<36s} {format_bytes(self.resident_bytes)} (headroom {format_bytes(self.headroom)})")
        lines.append(f"  decode reads only resident memory: {format_bytes(self.decode_resident_bytes)} of weights")
        if self.streamed:
            overlap = "double buffer: copy of layer l+1 overlaps compute of layer l" if self.staging_buffers == 2 else \
                "one buffer: no room for two, so copies do not overlap compute"
            lines.append(f"  streamed  dense FFN of {len(self.streamed)} sparse layers ({_ranges(self.streamed)}) from "
                         f"pinned host memory, {format_bytes(self.streamed_bytes())} per dense prefill ({overlap})")
        else:
            lines.append("  streamed  nothing: every dense FFN fits on the GPU")
        lines.append(f"  clusters  {self.cluster_slots} complete core-FFN set(s) resident (similarity-guided prompts of "
                     f"a resident cluster move no bytes)")
        return "\n".join(lines)


def _ranges(xs: list[int]) -> str:
    out, start, prev = [], None, None
    for x in xs:
        if start is None:
            start = prev = x
        elif x == prev + 1:
            prev = x
        else:
            out.append(f"{start}" if start == prev else f"{start}..{prev}")
            start = prev = x
    if start is not None:
        out.append(f"{start}" if start == prev else f"{start}..{prev}")
    return ", ".join(out)


def _elem_size(dtype) -> tuple[int, str]:
    if isinstance(dtype, str):
        from .loading import DTYPES

        if dtype not in DTYPES:
            raise MemoryBudgetError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MemoryBudgetError(f"dtype {dtype!r} is not a floating-point torch dtype; use torch.bfloat16")
    return torch.empty((), dtype=dtype).element_size(), str(dtype).replace("torch.", "")


def _layer_k(shape: ModelShape, kept_fraction, sparse_layers, layer_k) -> dict[int, int]:
    from .selection import check_layer_k, kept_count

    if layer_k is not None:
        return check_layer_k(layer_k, shape.n_neurons, shape.n_layers)
    layers = range(shape.n_layers) if sparse_layers is None else sparse_layers
    if not isinstance(layers, range) or not (0 <= layers.start < layers.stop <= shape.n_layers):
        raise MemoryBudgetError(f"sparse layers {layers!r} are not a range within 0:{shape.n_layers}")
    k = kept_count(kept_fraction, shape.n_neurons)
    return {i: k for i in layers}


def _fixed_parts(shape: ModelShape, elem: int, context: int, prompt: int) -> dict[str, int]:
    return {"attention": shape.n_layers * shape.attention_elems() * elem,
            "embeddings": shape.embedding_elems() * elem,
            "lm_head_norm": shape.head_elems() * elem,
            "kv_cache": shape.kv_cache_elems(context) * elem,
            "workspace": prefill_workspace_bytes(shape, prompt, elem)}


def _decode_parts(shape: ModelShape, elem: int, layer_k: dict[int, int]) -> dict[str, int]:
    dense_layers = [i for i in range(shape.n_layers) if i not in layer_k]
    return {"core_ffn": sum(shape.ffn_elems(padded(k)) for k in layer_k.values()) * elem,
            "dense_ffn_outside_sparse": len(dense_layers) * shape.ffn_elems() * elem}


def _fits(shape: ModelShape, elem: int, budget: int, layer_k: dict[int, int], context: int, prompt: int,
          streaming_ok: bool = True) -> bool:
    need = sum(_fixed_parts(shape, elem, context, prompt).values()) + sum(_decode_parts(shape, elem, layer_k).values())
    all_dense = sum(shape.ffn_elems() for _ in layer_k) * elem
    one_layer = shape.ffn_elems() * elem
    return need + min(all_dense, one_layer if streaming_ok else all_dense) <= budget


def plan_memory(shape: ModelShape, budget, *, dtype=torch.bfloat16, kept_fraction: float = 0.4,
                sparse_layers: range | None = None, layer_k: dict[int, int] | None = None, context_length: int = 1024,
                prompt_length: int | None = None) -> MemoryPlan:
    """The plan for ``shape`` in ``budget`` (see the module doc), or a ``MemoryBudgetError`` saying what would fit.

    ``kept_fraction`` over ``sparse_layers`` (default: every layer), or ``layer_k`` ({layer: k}); ``context_length``:
    prompt + new tokens the KV cache holds; ``prompt_length`` (default ``context_length``) sizes the prefill
    workspace. Order of residency: what decoding needs (attention, embeddings, lm_head, KV cache, compact core FFN,
    dense FFN of the non-sparse layers) and the prefill workspace; then the streaming buffers; then the dense FFN
    of as many sparse layers as fit (first layers first: less to stream); then further cluster slots.
    """
    budget = parse_budget(budget)
    elem, dtype_name = _elem_size(dtype)
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 1:
        raise MemoryBudgetError(f"context_length must be a positive int (prompt + new tokens), got {context_length!r}")
    if shape.max_context and context_length > shape.max_context:
        raise MemoryBudgetError(f"context_length {context_length} exceeds the model's {shape.max_context} positions")
    prompt = context_length if prompt_length is None else min(int(prompt_length), context_length)
    ks = _layer_k(shape, kept_fraction, sparse_layers, layer_k)
    parts = _fixed_parts(shape, elem, context_length, prompt)
    floor = sum(parts.values())
    if floor > budget:
        raise MemoryBudgetError(
            f"memory budget {format_bytes(budget)} is below what must stay on the GPU: attention {format_bytes(parts['attention'])}"
            f" + embeddings and lm_head {format_bytes(parts['embeddings'] + parts['lm_head_norm'])} + KV cache for "
            f"{context_length} positions {format_bytes(parts['kv_cache'])} + prefill workspace "
            f"{format_bytes(parts['workspace'])} = {format_bytes(floor)}; raise the budget above that (and add room for "
            f"the core FFN) or shorten the context")
    parts.update(_decode_parts(shape, elem, ks))
    layer_dense = shape.ffn_elems() * elem
    if not _fits(shape, elem, budget, ks, context_length, prompt):
        raise MemoryBudgetError(_no_fit_message(shape, elem, budget, ks, context_length, prompt, parts))
    sparse = sorted(ks)
    room = budget - sum(parts.values())
    if room >= layer_dense * len(sparse):  # every dense FFN fits: nothing streams
        resident, streamed, buffers = sparse, [], 0
        room -= layer_dense * len(sparse)
    else:
        buffers = STAGING_BUFFERS if room >= STAGING_BUFFERS * layer_dense else 1
        room -= buffers * layer_dense
        n_res = min(len(sparse), room // layer_dense)
        resident, streamed = sparse[:n_res], sparse[n_res:]
        room -= n_res * layer_dense
    core = parts["core_ffn"]
    extra_slots = int(room // core) if core else 0
    parts.update(dense_ffn_resident_sparse=len(resident) * layer_dense, staging=buffers * layer_dense,
                 cluster_cache=extra_slots * core)
    dense_layers = [i for i in range(shape.n_layers) if i not in ks]
    return MemoryPlan(budget, dtype_name, context_length, ks, sorted(dense_layers + resident), streamed, buffers,
                      1 + extra_slots, layer_dense, parts)


def _largest_k(shape, elem, budget, layers, context, prompt) -> int:
    lo, hi = 0, shape.n_neurons
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(shape, elem, budget, {i: mid for i in layers}, context, prompt):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _longest_context(shape, elem, budget, layer_k, upto, prompt) -> int:
    lo, hi = 0, max(1, upto)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(shape, elem, budget, layer_k, mid, mid if prompt is None else min(prompt, mid)):
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest_core_k(shape: ModelShape, budget, *, dtype=torch.bfloat16, sparse_layers: range | None = None,
                   context_length: int = 1024, prompt_length: int | None = None) -> int:
    """The most core neurons per sparse layer (one k for all) that fit ``budget`` at ``context_length``; 0: none."""
    layers = list(range(shape.n_layers) if sparse_layers is None else sparse_layers)
    prompt = context_length if prompt_length is None else min(prompt_length, context_length)
    return _largest_k(shape, _elem_size(dtype)[0], parse_budget(budget), layers, context_length, prompt)


def longest_context(shape: ModelShape, budget, layer_k: dict[int, int], *, dtype=torch.bfloat16,
                    upto: int | None = None, prompt_length: int | None = None) -> int:
    """The most positions (prompt + new tokens, at most ``upto``) whose KV cache and prefill fit with ``layer_k``."""
    upto = upto or shape.max_context or 1 << 20
    return _longest_context(shape, _elem_size(dtype)[0], parse_budget(budget), layer_k, upto, prompt_length)


def _no_fit_message(shape, elem, budget, ks, context, prompt, parts) -> str:
    asked = sum(parts.values()) + min(shape.ffn_elems() * elem, sum(shape.ffn_elems() for _ in ks) * elem)
    layers = sorted(ks)
    uniform = len(set(ks.values())) == 1
    what = (f"kept fraction {next(iter(ks.values())) / shape.n_neurons:.3g} (k = {next(iter(ks.values()))})" if uniform
            else "the per-layer core-set sizes")
    best_k = _largest_k(shape, elem, budget, layers, context, prompt)
    clo = _longest_context(shape, elem, budget, ks, context, prompt)
    largest = (f"the largest kept fraction that fits this budget at {context} positions is "
               f"{math.floor(100 * best_k / shape.n_neurons) / 100:.2f} (k = {best_k} of {shape.n_neurons})"
               if best_k else f"no kept fraction fits at {context} positions")
    longest = (f"the longest context that fits at this kept fraction is {clo} tokens" if clo
               else "no context length fits at this kept fraction")
    return (f"{what} over {len(layers)} sparse layers does not fit the memory budget {format_bytes(budget)}: it needs "
            f"{format_bytes(asked)} (decode weights + KV cache + workspace + one streaming buffer); {largest}, and "
            f"{longest}; lower the kept fraction, shorten the context, or raise the budget")


# --------------------------------------------------------------------------------------------------- core rows


class HostRowGather:
    """Core neurons' weights from host memory to the device, for both offloaded paths: the host copies lay every
    neuron's weights out as rows (gate/up/fc1 rows, the down projection transposed), so a core set's share of each
    tensor is k contiguous row copies into a pinned buffer, then one host-to-device copy for all of them. Two
    buffers, used in turn: the CPU fills one while the other's copy runs (an event guards its reuse)."""

    def __init__(self, numel: int, dtype: torch.dtype, pin: bool):
        self.buffers = [torch.empty(numel, dtype=dtype, pin_memory=pin) for _ in range(2 if numel else 0)]
        self.free: list = [None] * len(self.buffers)  # CUDA event: that buffer's last copy has finished
        self.turn = 0

    def copy(self, parts, dst: torch.Tensor) -> int:
        """``parts``: (host tensor, row indices, or None for the whole tensor), gathered one after another into
        ``dst[:n]`` (flat, on the device); returns n. The copy is asynchronous on CUDA (the current stream)."""
        slot, self.turn = self.turn, 1 - self.turn
        if self.free[slot] is not None:
            self.free[slot].synchronize()
        flat = self.buffers[slot]
        off = sum(math.prod(s) for s in self.shapes(parts))
        if off > flat.numel():
            raise ValueError(f"core rows of {off} elements exceed the {flat.numel()} the row buffers hold")
        for (t, idx), view in zip(parts, self.views(parts, flat)):
            if idx is None:
                view.copy_(t)
            else:
                torch.index_select(t, 0, idx, out=view)
        dst[:off].copy_(flat[:off], non_blocking=True)
        if dst.is_cuda:
            self.free[slot] = torch.cuda.Event()
            self.free[slot].record(torch.cuda.current_stream(dst.device))
        return off

    @staticmethod
    def shapes(parts) -> list[tuple]:
        """Each part's shape once gathered: (k, *its row shape) for k row indices, its own shape for None."""
        return [tuple(t.shape) if idx is None else (idx.numel(), *t.shape[1:]) for t, idx in parts]

    @classmethod
    def views(cls, parts, flat: torch.Tensor) -> list[torch.Tensor]:
        """``flat``'s segments as ``copy`` fills them: one view per part, in its gathered shape."""
        out, off = [], 0
        for shape in cls.shapes(parts):
            n = math.prod(shape)
            out.append(flat[off:off + n].view(shape))
            off += n
        return out


# --------------------------------------------------------------------------------------------------- the device


def check_budget_device(budget: int, device) -> torch.device:
    """The device a budget applies to: CUDA needs a GPU whose memory is at least the budget; "cpu" simulates
    offloading (the "device" is the CPU, the host copies separate tensors). Clear errors, before any weight moves."""
    if device is None:
        if not torch.cuda.is_available():
            raise MemoryBudgetError("a memory budget was given but no CUDA GPU is available; pass device='cpu' to run the "
                                    "offloaded path on the CPU, or omit memory_budget")
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MemoryBudgetError(f"device {device!r} is not a device; use 'cuda' or 'cpu'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise MemoryBudgetError(f"a memory budget applies to a CUDA device (or 'cpu' to simulate), got {dev}")
    if not torch.cuda.is_available():
        raise MemoryBudgetError(f"memory_budget was given for {dev} but no CUDA GPU is available; pass device='cpu' to run "
                                "the offloaded path on the CPU, or omit memory_budget")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    if budget > total:
        raise MemoryBudgetError(f"memory budget {format_bytes(budget)} exceeds the GPU's {format_bytes(total)} "
                                f"({torch.cuda.get_device_name(index)}); give at most that, or omit memory_budget "
                                "to load the whole model on the GPU")
    return torch.device("cuda", index)
