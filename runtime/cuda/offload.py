"""The graph-captured fast path under a memory budget (issue 11): ``BudgetFastLM``.

The decode is ``FastLM``'s own captured step, run over resident compact weights: every sparse layer's
``up_w``/``down`` in the ``FastWeights`` it decodes are fixed-address compact buffers (k core neurons, zero-padded
to ``memory.CORE_PAD``: gate rows, then up rows, as ``FastLM``'s gathered path lays them out), so the dense
step (``kept_fraction=None``) computes exactly the sparse FFN and never reads host memory. The dense layers (outside
the sparse range) are resident in full. What ``memory.plan_memory`` could not fit, the dense FFN of the streamed
sparse layers, stays in pinned host memory (``HostFFNStore``: one contiguous block per layer, one copy each, every
neuron's weights as rows: gate||up (or fc1) rows and the down projection transposed, (I, H) row-major).

The prefill (``_prefill_forward``, the one hook into ``FastLM``) runs the dense FFN of every sparse layer: resident
layers from the device, streamed ones through the plan's staging buffers, layer l+1's block copied on a side
stream while layer l computes (two buffers; events order copy -> compute -> reuse). As soon as a layer's core set
is known (selected from its activations, or given), its core rows/columns are gathered from the dense copy on
the device into the compact buffers. Similarity-guided prompts with ``sparse_prefill`` know their core sets
before the prefill: only core rows cross the bus, or none when that cluster's sets are already resident (the
decode buffers, plus an LRU of ``plan.cluster_slots - 1`` further sets). Core rows from host memory are k
contiguous row copies per part into one of two pinned buffers (``memory.HostRowGather``), then one host-to-device
copy per layer into a (then idle) streaming buffer: the CPU gathers layer l+1 while layer l's copy runs.

Measured on the H200 (docs/benchmarks.md, run h200-3): Llama-3.1-8B shape under 12 GiB at kept 0.4 decodes at
387 tok/s (1.04x the in-memory fast path, 345x Hugging Face + accelerate offloading), the stability-guided prefill
at the bus floor (167 ms for 9.16 GB). The in-memory fast path is unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..memory import HostRowGather, MemoryBudgetError, MemoryPlan, padded
from ..selection import DEFAULT_SCORE, stability_select_layers
from .fastlm import FastLM, FastPathError, FastWeights, LayerWeights

FFN_PARTS = ("up_w", "up_b", "down_t")  # a layer's dense FFN in the host store (down_b stays resident)
LAYER_FFN_FIELDS = ("up_w", "up_b", "down", "down_t")  # LayerWeights' FFN tensors (the others move to the device)


def _host_part(lw: LayerWeights, part: str) -> torch.Tensor | None:
    """``part`` of a layer as the store lays it out: ``down_t`` is the down projection (H, I) transposed."""
    if part != "down_t":
        return getattr(lw, part)
    return lw.down_t if lw.down_t is not None else lw.down.t()


class HostFFNStore:
    """Every layer's dense FFN in host memory, one contiguous block per layer, pinned where CUDA exists: streaming a
    layer is one copy. Every neuron's weights are rows (gate||up or fc1 rows, fc1's bias, and ``down_t``: the down
    projection transposed, (I, H) row-major, as the gather-free kernels read it), so gathering k core neurons in
    host memory is k contiguous row copies per part, not k strided columns of (H, I). Built once, shared by any
    number of ``BudgetFastLM`` (one per kept fraction)."""

    def __init__(self, weights: FastWeights, pin: bool | None = None):
        pin = torch.cuda.is_available() if pin is None else pin
        first = weights.layers[0]
        self.layout = []  # (part, shape, offset)
        offset = 0
        for part in FFN_PARTS:
            t = _host_part(first, part)
            if t is not None:
                self.layout.append((part, tuple(t.shape), offset))
                offset += t.numel()
        self.numel = offset
        self.dtype = weights.dtype
        self.blocks = []
        for li, lw in enumerate(weights.layers):
            block = torch.empty(self.numel, dtype=self.dtype, pin_memory=pin)
            for part, shape, off in self.layout:
                t = _host_part(lw, part)
                if t is None or tuple(t.shape) != shape:
                    raise FastPathError(f"layer {li}'s {part} has shape {None if t is None else tuple(t.shape)}, layer 0's "
                                        f"{shape}: the memory-budget path needs equal FFN shapes in every layer")
                block[off:off + t.numel()].view(shape).copy_(t)
            self.blocks.append(block)

    @property
    def block_bytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, block: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """{part: view} of a block laid out like this store's (a host block or a device copy of one)."""
        out = dict.fromkeys(FFN_PARTS)
        for part, shape, off in self.layout:
            n = 1
            for s in shape:
                n *= s
            out[part] = block[off:off + n].view(shape)
        return out

    @staticmethod
    def dense_fields(views: dict) -> dict:
        """LayerWeights' dense FFN fields over a block's views: ``down`` is the (H, I) transposed view of ``down_t``
        (``F.linear(a, down)`` reads it as it lies: the GEMM's transpose flag, no copy)."""
        return dict(up_w=views["up_w"], up_b=views["up_b"], down=views["down_t"].t())


@dataclass
class _Request:
    core_sets: dict | None = None
    cluster: object = None
    sparse_prefill: bool = False
    timeline: bool = False
    layer_k: dict | None = None  # stability-guided sizes (default: the plan's)


@dataclass
class BudgetGeneration:
    """One call's result: new tokens, the core sets used, FastLM's timings (ms), bytes moved host -> device, and
    where the core sets came from ("prefill": gathered from the dense copies, "resident": already in the decode
    buffers, "lru": a device-to-device copy from the cluster LRU, "gathered": from the resident dense copies, or
    core rows copied from host memory for the streamed layers; ``bus_bytes`` says how much)."""

    tokens: list[int]
    core_sets: dict[int, torch.Tensor]
    timings: dict
    bus_bytes: int
    sets_from: str
    path: str = "fast-offload"
    timeline: list[dict] = field(default_factory=list)  # per layer: copy/compute start and end (ms from prefill start)
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) per new token, with keep_logits=True


def _device_rope(rope_fn, device: torch.device):
    """A host copy's RoPE tables, computed in host memory and copied (``model_rope`` computes them on the device)."""
    def fn(positions: torch.Tensor):
        cos, sin = rope_fn(positions.to("cpu"))
        return cos.to(device), sin.to(device)
    return fn


def model_rope(model, device):
    """RoPE tables computed on ``device`` by a device copy of ``model``'s rotary embedding, as ``FastWeights``' own
    ``rope_fn`` computes them for a model on the device (the device's cos/sin can differ from the CPU's in the last
    bit); None for models without one (OPT)."""
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None:
        return None
    rotary = copy.deepcopy(rotary).to(device)
    dtype = model.get_input_embeddings().weight.dtype
    probe = torch.zeros(1, 1, dtype=dtype, device=device)  # the rotary module reads only its dtype and device

    def fn(positions: torch.Tensor):
        with torch.no_grad():
            cos, sin = rotary(probe, positions.to(device).view(1, -1))
        return cos[0].to(dtype).contiguous(), sin[0].to(dtype).contiguous()
    return fn


class BudgetFastLM(FastLM):
    """``FastLM`` decoding from resident compact buffers, its prefill streaming the plan's non-resident layers.

    ``weights``: the model's ``FastWeights`` in host memory (``FastWeights.from_hf`` of a model on the CPU); only
    what ``plan`` makes resident is copied to ``device``. ``store``: a ``HostFFNStore`` of the same weights to
    share between instances. ``rope_fn``: RoPE on the device (``model_rope``; default: the host copy's, copied). ``generate_budget`` is the call with core sets, clusters and ``sparse_prefill``;
    ``generate``/``forced_logits`` (FastLM's) run stability-guided prompts.
    """

    _prefill_capturable = False  # its prefill waits on the copies of streamed layers

    def __init__(self, weights: FastWeights, plan: MemoryPlan, device="cuda", *, store: HostFFNStore | None = None,
                 rope_fn=None, alpha: float = 0.4, score: str = DEFAULT_SCORE):
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        n_layers = len(weights.layers)
        if any(not 0 <= li < n_layers for li in plan.layer_k) or len(plan.resident_dense) + len(plan.streamed) != n_layers:
            raise MemoryBudgetError(f"the memory plan is for another model ({len(plan.resident_dense) + len(plan.streamed)} "
                                    f"layers, this one has {n_layers}); plan it from this model's shape")
        if weights.device.type != "cpu":
            raise MemoryBudgetError("BudgetFastLM takes the weights in host memory (FastWeights.from_hf of a model on the CPU)")
        self.plan = plan
        self.store = store if store is not None else HostFFNStore(weights, pin=dev.type == "cuda")
        self.budget_device = dev
        self._on_cuda = dev.type == "cuda"
        H = weights.hidden
        layers: list[LayerWeights] = []
        self._core_buffers: dict[int, tuple] = {}  # sparse layer -> (c_up, c_up_b, c_down), the decode's FFN
        self._dense_dev: dict[int, dict] = {}  # resident sparse layer -> its dense FFN on the device
        with torch.no_grad():
            for li, lw in enumerate(weights.layers):
                moved = {f.name: getattr(lw, f.name).to(dev) for f in dataclasses.fields(lw)
                         if isinstance(getattr(lw, f.name), torch.Tensor) and f.name not in LAYER_FFN_FIELDS}
                if li not in plan.layer_k:  # decodes dense: its whole FFN is resident, down (H, I) as the step reads it
                    ffn = {f: None if t is None else t.to(dev).contiguous()
                           for f, t in HostFFNStore.dense_fields(self.store.views(self.store.blocks[li])).items()}
                    layers.append(dataclasses.replace(lw, **moved, **ffn, down_t=None))
                    continue
                kp = padded(plan.layer_k[li])
                rows = kp if lw.ffn_kind == "mlp" else 2 * kp
                c_up = torch.zeros(rows, H, device=dev, dtype=weights.dtype)
                c_up_b = None if lw.up_b is None else torch.zeros(kp, device=dev, dtype=weights.dtype)
                c_down = torch.zeros(H, kp, device=dev, dtype=weights.dtype)
                self._core_buffers[li] = (c_up, c_up_b, c_down)
                if li in plan.resident_dense:
                    self._dense_dev[li] = self.store.views(self.store.blocks[li].to(dev))
                layers.append(dataclasses.replace(lw, **moved, up_w=c_up, up_b=c_up_b, down=c_down, down_t=None))
            tied = weights.lm_head.data_ptr() == weights.embed.data_ptr()
            embed = weights.embed.to(dev)
            compact = dataclasses.replace(
                weights, layers=layers, embed=embed, lm_head=embed if tied else weights.lm_head.to(dev),
                pos_embed=None if weights.pos_embed is None else weights.pos_embed.to(dev),
                final_w=weights.final_w.to(dev), final_b=None if weights.final_b is None else weights.final_b.to(dev),
                rope_fn=rope_fn or (None if weights.rope_fn is None else _device_rope(weights.rope_fn, dev)))
            n_slots = plan.staging_buffers if plan.streamed else 0
            self._staging = [torch.empty(self.store.numel, dtype=weights.dtype, device=dev) for _ in range(n_slots)]
        # a streamed layer's core rows from host memory, for its widest planned core set: gate||up (or fc1) rows,
        # down_t rows, fc1's bias
        rows_k = max((padded(plan.layer_k[li]) for li in plan.streamed if li in plan.layer_k), default=0)
        per_neuron = (H if weights.layers[0].ffn_kind == "mlp" else 2 * H) + H + (weights.layers[0].up_b is not None)
        self._host_rows = HostRowGather(rows_k * per_neuron if n_slots else 0, weights.dtype, self._on_cuda)
        self._staging_free: list = [None] * n_slots  # event: the last compute reading the slot is done
        self._copy_stream = torch.cuda.Stream(dev) if (self._on_cuda and n_slots) else None
        self._spare: OrderedDict = OrderedDict()  # cluster -> {layer: (c_up, c_up_b, c_down)} copies (LRU)
        self._active_key = None  # the cluster whose core sets the decode buffers hold (None: a stability prompt's)
        self._budget_request = _Request()
        self._budget_lock = threading.Lock()
        self.bytes_moved = 0  # host -> device, over the life of the instance
        self._last_core_sets: dict[int, torch.Tensor] = {}
        self._sets_from = "prefill"
        self._timeline: list[dict] = []
        super().__init__(compact, max_seq_len=plan.context_length, kept_fraction=None, alpha=alpha, score=score)

    # ---- accounting
    def kept_fraction_overall(self) -> float:
        n, i = len(self.w.layers), self.w.n_neurons
        return (sum(self.plan.layer_k.values()) + (n - len(self.plan.layer_k)) * i) / (n * i)

    def resident_bytes(self) -> int:
        """Device bytes this instance holds (weights, buffers, KV cache), for checks against the plan."""
        seen, total = set(), 0
        ts = [t for lw in self.w.layers for t in lw.tensors()] + [self.w.embed, self.w.lm_head, self.w.final_w,
                                                                   self.w.final_b, self.w.pos_embed]
        ts += [t for d in self._dense_dev.values() for t in d.values()] + self._staging + self.k_cache + self.v_cache
        ts += [t for sets in self._spare.values() for parts in sets.values() for t in parts]
        for t in ts:
            if t is None or t.device.type == "cpu":
                continue
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    # ---- the public call
    def generate_budget(self, input_ids, max_new_tokens: int, *, core_sets: dict[int, torch.Tensor] | None = None,
                        cluster=None, sparse_prefill: bool = False, eos_token_id=None, timing: bool = True,
                        timeline: bool = False, keep_logits: bool = False,
                        layer_k: dict[int, int] | None = None) -> BudgetGeneration:
        """Greedy decoding of one prompt. ``core_sets`` (every sparse layer -> sorted indices; a cluster's) skip the
        selection; ``cluster`` (any hashable) names them for the LRU; ``sparse_prefill`` runs the prompt's FFN on
        them too (then only core rows cross the bus). ``timeline`` records CUDA events per layer of the prefill (it
        synchronises: not for timed runs). ``keep_logits`` returns each new token's (V,) logits. ``layer_k``: the
        stability-guided core-set sizes, at most the plan's (default: the plan's)."""
        with self._budget_lock:
            if sparse_prefill and core_sets is None:
                raise FastPathError("sparse_prefill needs core sets known before the prefill (similarity-guided prompts)")
            if cluster is not None and core_sets is None:
                raise FastPathError("cluster= names given core sets; pass core_sets with it")
            if core_sets is not None:
                if sorted(core_sets) != sorted(self.plan.layer_k):
                    raise FastPathError(f"need one core set per sparse layer {sorted(self.plan.layer_k)}, got layers "
                                        f"{sorted(core_sets)}")
                self.plan.check_request({li: int(c.numel()) for li, c in core_sets.items()}, 1)
            if layer_k is not None:
                if sorted(layer_k) != sorted(self.plan.layer_k):
                    raise FastPathError(f"layer_k must name the plan's sparse layers {sorted(self.plan.layer_k)}, got "
                                        f"{sorted(layer_k)}")
                self.plan.check_request(layer_k, 1)
            n = torch.as_tensor(input_ids).numel()
            self.plan.check_request({}, n + max_new_tokens)
            before = self.bytes_moved
            self._budget_request = _Request(core_sets, cluster, sparse_prefill, timeline, layer_k)
            try:
                gen = self.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, timing=timing,
                                    keep_logits=keep_logits)
            finally:
                self._budget_request = _Request()
            return BudgetGeneration(gen.tokens, dict(self._last_core_sets), gen.timings, self.bytes_moved - before,
                                    self._sets_from, timeline=list(self._timeline),
                                    logits=[t.clone() for t in gen.logits])  # FastLM's may alias its buffer (CPU)

    # ---- core sets into the decode buffers
    def _gather_into(self, li: int, idx: torch.Tensor, src: dict) -> None:
        """Core rows of gate||up (or fc1, its bias) and columns of down from a dense copy on the device."""
        c_up, c_up_b, c_down = self._core_buffers[li]
        k, I = idx.numel(), self.w.n_neurons
        kp = c_down.shape[1]
        if self.w.layers[li].ffn_kind == "mlp":
            torch.index_select(src["up_w"], 0, idx, out=c_up[:k])
            if c_up_b is not None:
                torch.index_select(src["up_b"], 0, idx, out=c_up_b[:k])
                c_up_b[k:].zero_()
            c_up[k:].zero_()
        else:
            torch.index_select(src["up_w"], 0, idx, out=c_up[:k])
            torch.index_select(src["up_w"], 0, idx + I, out=c_up[kp:kp + k])
            c_up[k:kp].zero_()
            c_up[kp + k:].zero_()
        c_down[:, :k].copy_(torch.index_select(src["down_t"], 0, idx).t())  # k rows of (I, H): down's columns
        c_down[:, k:].zero_()

    def _copy_from_host(self, li: int, idx: torch.Tensor) -> None:
        """Layer ``li``'s core neurons from host memory: their rows of gate||up (or fc1), down_t and fc1's bias
        (``HostRowGather``: contiguous row copies, one copy) land in a streaming buffer (idle: a sparse prefill
        streams no dense FFN; each layer's placement runs before the next copy on the stream) and are placed into
        the decode buffers: only k neurons' weights cross the bus."""
        host = self.store.views(self.store.blocks[li])
        c_up, c_up_b, c_down = self._core_buffers[li]
        idx = idx.to("cpu", torch.long).view(-1)
        k, I = idx.numel(), self.w.n_neurons
        kp = c_down.shape[1]
        gated = self.w.layers[li].ffn_kind != "mlp"
        parts = [(host["up_w"], torch.cat([idx, idx + I]) if gated else idx), (host["down_t"], idx)]
        if c_up_b is not None:
            parts.append((host["up_b"], idx))
        landed = self._staging[0]
        n = self._host_rows.copy(parts, landed)
        up, down, *bias = HostRowGather.views(parts, landed)
        if gated:
            c_up[:k].copy_(up[:k])
            c_up[kp:kp + k].copy_(up[k:])
            c_up[k:kp].zero_()
            c_up[kp + k:].zero_()
        else:
            c_up[:k].copy_(up)
            c_up[k:].zero_()
        c_down[:, :k].copy_(down.t())
        c_down[:, k:].zero_()
        if c_up_b is not None:
            c_up_b[:k].copy_(bias[0])
            c_up_b[k:].zero_()
        self.bytes_moved += n * landed.element_size()

    def _save_active(self) -> None:
        """Before the decode buffers are overwritten: keep their cluster's sets in the LRU if it has room."""
        cap = self.plan.cluster_slots - 1
        key = self._active_key
        self._active_key = None
        if key is None or cap < 1 or key in self._spare:
            return
        if len(self._spare) >= cap:  # evict the least recently used; its tensors receive the copy
            _, dst = self._spare.popitem(last=False)
        else:
            dst = {li: tuple(None if t is None else torch.empty_like(t) for t in parts)
                   for li, parts in self._core_buffers.items()}
        for li, parts in self._core_buffers.items():
            for d, s in zip(dst[li], parts):
                if s is not None:
                    d.copy_(s)
        self._spare[key] = dst

    def _load_known_sets(self, req: _Request) -> str:
        """Core sets known before the prefill into the decode buffers; returns where they came from."""
        key = req.cluster
        if key is not None and key == self._active_key:
            return "resident"
        if key is not None and key in self._spare:
            src = self._spare.pop(key)
            old = self._active_key
            swap = old is not None and old not in self._spare  # keep the outgoing cluster: swap, one layer at a time
            for li, parts in self._core_buffers.items():
                for d, s in zip(parts, src[li]):
                    if d is None:
                        continue
                    if swap:
                        tmp = d.clone()
                        d.copy_(s)
                        s.copy_(tmp)
                    else:
                        d.copy_(s)
            self._spare[old if swap else key] = src
            self._active_key = key
            return "lru"
        self._save_active()
        for li in self._core_buffers:
            if li in self._dense_dev:
                self._gather_into(li, req.core_sets[li].to(self.budget_device, torch.long).view(-1), self._dense_dev[li])
            else:
                self._copy_from_host(li, req.core_sets[li])
        self._active_key = key
        return "gathered"

    # ---- streaming
    def _stream_begin(self, order: list[int]) -> None:
        self._stream_order = order
        self._staging_of = {li: j % max(1, len(self._staging)) for j, li in enumerate(order)}
        self._stream_ready: dict = {}
        if self._copy_stream is not None:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.budget_device))
        for j in range(min(len(self._staging), len(order))):
            self._issue(j)

    def _issue(self, j: int) -> None:
        li = self._stream_order[j]
        slot = self._staging_of[li]
        block = self.store.blocks[li]
        if self._copy_stream is None:
            self._staging[slot].copy_(block)
        else:
            with torch.cuda.stream(self._copy_stream):
                if self._staging_free[slot] is not None:
                    self._copy_stream.wait_event(self._staging_free[slot])
                start = self._event() if self._budget_request.timeline else None
                self._staging[slot].copy_(block, non_blocking=True)
                ready = torch.cuda.Event(enable_timing=self._budget_request.timeline)
                ready.record(self._copy_stream)
                self._stream_ready[li] = ready
                if start is not None:
                    self._timeline_marks.setdefault(li, {}).update(copy_start=start, copy_end=ready)
        self.bytes_moved += self.store.block_bytes

    def _dense_source(self, li: int) -> dict:
        if li in self._dense_dev:
            return self._dense_dev[li]
        if li in self._stream_ready:
            torch.cuda.current_stream(self.budget_device).wait_event(self._stream_ready[li])
        return self.store.views(self._staging[self._staging_of[li]])

    def _stream_release(self, li: int) -> None:
        if li not in self._staging_of:
            return
        slot = self._staging_of[li]
        if self._copy_stream is not None:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.budget_device))
            self._staging_free[slot] = ev
        j = self._stream_order.index(li) + len(self._staging)
        if j < len(self._stream_order):
            self._issue(j)

    def _event(self):
        """A timing event on the current stream (the copy stream inside ``_issue``)."""
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.budget_device))
        return ev

    # ---- the prefill (FastLM's hook)
    def _prefill_forward(self, ids: torch.Tensor, *args, **kwargs):
        """Dense prefill at positions 0..T-1 streaming what is not resident; fills the KV cache and the compact
        decode buffers (see the module doc). Returns (last position's logits, None)."""
        req = self._budget_request
        w = self.w
        T = ids.numel()
        timeline = req.timeline and self._on_cuda
        self._timeline_marks: dict = {}
        t_start = self._event() if timeline else None
        chosen: dict[int, torch.Tensor] = {}
        if req.sparse_prefill:
            self._sets_from = self._load_known_sets(req)
            chosen = {li: req.core_sets[li].to(self.budget_device, torch.long).view(-1) for li in self._core_buffers}
            order = []
        else:
            self._save_active()
            self._sets_from = "prefill"
            order = [li for li in self.plan.streamed if li in self._core_buffers]
        self._stream_begin(order)
        x, rope, mask = self._prefill_setup(ids)
        select = req.core_sets is None
        acts = torch.empty(1, T, w.n_neurons, device=w.device, dtype=w.dtype) if (select and self._core_buffers) else None
        for li, lw in enumerate(w.layers):
            start = self._event() if timeline else None
            x, h = self._prefill_attention(li, lw, x, rope, mask)
            if li in self._core_buffers and not req.sparse_prefill:
                attn_end = self._event() if timeline else None
                src = self._dense_source(li)  # waits for a streamed layer's copy
                if timeline:
                    self._timeline_marks.setdefault(li, {}).update(attention_end=attn_end, ffn_start=self._event())
                dense_lw = dataclasses.replace(lw, **HostFFNStore.dense_fields(src))
                y = self._ffn_dense(dense_lw, h, acts)
                if select:
                    k_li = (req.layer_k or self.plan.layer_k)[li]
                    idx = stability_select_layers(acts, self.alpha, score=self.score, k=k_li)[0]
                else:
                    idx = req.core_sets[li].to(w.device, torch.long).view(-1)
                self._gather_into(li, idx, src)
                chosen[li] = idx
                self._stream_release(li)
            else:
                y = self._ffn_dense(lw, h)  # resident dense layer, or the compact FFN of known core sets
            x = x + y
            if timeline:
                self._timeline_marks.setdefault(li, {}).update(compute_start=start, compute_end=self._event())
        if req.core_sets is not None and not req.sparse_prefill:
            self._active_key = req.cluster
        self._last_core_sets = chosen
        h = self._norm(x[:, -1:], w.final_w, w.final_b)
        logits = F.linear(h, w.lm_head)[0, -1]
        self._timeline = self._read_timeline(t_start) if timeline else []
        return logits, None

    def _read_timeline(self, t0) -> list[dict]:
        torch.cuda.synchronize(self.budget_device)
        out = []
        for li in sorted(self._timeline_marks):
            row = {"layer": li, "streamed": li in self._staging_of}
            for name, ev in self._timeline_marks[li].items():
                row[name + "_ms"] = t0.elapsed_time(ev)
            out.append(row)
        return out
