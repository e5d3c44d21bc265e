"""Memory-budget mode for ``SparseLM`` (``SparseLM.from_pretrained(..., memory_budget=...)``, issue 11).

The model loads into host memory first; ``memory.plan_memory`` decides from its config what stays on the device;
only then does any weight move. On CUDA, for the fast path's architectures, ``cuda.offload.BudgetFastLM`` holds
everything that is resident (the graph-captured decode over compact core-FFN buffers, the prefill streaming the
rest): ``generate`` serves one greedy str prompt per call there (stability- or similarity-guided), anything else
gets a clear error; ``stats.path`` says "fast-offload". Elsewhere (other architectures, ``device="cpu"``) the eager
offloaded path below serves every call (``stats.path`` "eager-offload").

Eager offloaded path: attention, embeddings, lm_head, norms and the dense FFN of the resident layers go to the
device; the dense FFN of each streamed layer stays in host memory (pinned where CUDA exists; its down projection
stored transposed, (I, H) row-major under its (H, I) shape, so each neuron's weights are rows) behind a
``HostFFN``, which behaves like the layer's ``FFNWeights`` but copies the layer into one of the plan's staging
buffers on the device (laid out as the host copy: one copy) when it is used:

* a dense prefill (stability-guided, or similarity-guided without ``sparse_prefill``) streams each streamed
  layer's dense FFN; the prompt's core rows/columns are gathered from the staged copy into device-resident
  compact FFNs as soon as the layer's core set is known (device to device: no extra bus traffic);
* similarity-guided prompts with ``sparse_prefill=True`` know their core sets before the prefill: only the core
  rows cross the bus (``memory.HostRowGather``: contiguous row copies, one copy), or none when that cluster's
  compact FFNs are still resident
  from an earlier prompt (an LRU of clusters, as many as the plan's ``cluster_slots``);
* decoding then reads the resident compact FFNs only; the host copies are not touched (``method="dense"``
  still streams every streamed layer for every token: that is what dense decoding under a budget costs).

One call runs at a time on an offloaded model (the staging buffers are shared): its public calls hold one lock.
``stats.path`` says "eager-offload" and ``stats.memory`` the bytes moved over the bus and the plan.

Not yet measured on a GPU: the copies are issued on the current stream (no copy/compute overlap on this path;
the CUDA fast path, ``cuda/offload.py``, overlaps them). ``memory_budget=None`` (the default) never loads this.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import adapters
from .ffn import FFNWeights
from .generation import GenerateOutput, Stats
from .loading import load_model, resolve_dtype
from .memory import (HostRowGather, MemoryBudgetError, MemoryPlan, ModelShape, check_budget_device, padded,
                     parse_budget, plan_memory)
from .selection import DEFAULT_SCORE, kept_count
from .session import CoreSetSession
from .sparse_lm import DEFAULT_BETA, SparseLM

FFN_TENSORS = ("gate", "up", "fc1", "fc1_bias", "down", "down_bias", "gate_up")
DEFAULT_CONTEXT = 1024  # planned prompt + new tokens when the budget does not say (capped by the model's window)


@dataclass(frozen=True)
class MemoryBudget:
    """A budget and what to plan it for: ``memory_budget=`` takes this, or just the size ("12GiB", bytes).

    kept_fraction: the largest kept fraction requests will use (default: the artifact's, else 0.4);
    context_length: the longest prompt + new tokens (default: the model's window, at most ``DEFAULT_CONTEXT``);
    layers: the sparse layers (as ``generate``'s ``layers=``; default the paper's range);
    fast_path: None runs the graph-captured path where it applies (CUDA, its architectures: one greedy prompt
    per call), False the eager offloaded path (every call: sampling, batches, scoring, evaluation; no graph).
    """

    size: object
    kept_fraction: float | None = None
    context_length: int | None = None
    layers: object = None
    fast_path: bool | None = None

    @classmethod
    def of(cls, value) -> "MemoryBudget":
        return value if isinstance(value, MemoryBudget) else cls(value)


def _tensors(w: FFNWeights) -> dict[str, torch.Tensor]:
    return {f: getattr(w, f) for f in FFN_TENSORS if getattr(w, f) is not None}


def ffn_bytes(w: FFNWeights) -> int:
    """All bytes of an FFNWeights' tensors (what one copy of the layer moves)."""
    return sum(t.numel() * t.element_size() for t in _tensors(w).values())


class Staging:
    """The plan's staging buffers on the device: each holds one streamed layer's dense FFN (LRU by layer)."""

    def __init__(self, template: FFNWeights, n_slots: int, device: torch.device):
        # the host copies' strides (down: (I, H) rows under its (H, I) shape): each tensor is one contiguous copy
        self.slots = [dataclasses.replace(template, **{f: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                                              device=device)
                                                       for f, t in _tensors(template).items()})
                      for _ in range(n_slots)]
        self.held: list[int | None] = [None] * n_slots  # layer each slot holds
        self.recent: list[int] = list(range(n_slots))  # slot indices, least recently used first

    def lookup(self, layer: int) -> FFNWeights | None:
        if layer in self.held:
            slot = self.held.index(layer)
            self.recent.remove(slot)
            self.recent.append(slot)
            return self.slots[slot]
        return None

    def load(self, layer: int, host: FFNWeights) -> FFNWeights:
        slot = self.recent.pop(0)
        self.recent.append(slot)
        dev = self.slots[slot]
        for f, t in _tensors(host).items():
            getattr(dev, f).copy_(t, non_blocking=True)
        self.held[slot] = layer
        return dev


class HostFFN:
    """A streamed layer's dense FFN, kept in host memory; stands in for its ``FFNWeights`` (same attributes,
    the host tensors), copying itself to a staging buffer whenever it computes."""

    def __init__(self, layer_idx: int, host: FFNWeights, offload: "Offload"):
        self.layer_idx = layer_idx
        self.host = host
        self.offload = offload

    def __getattr__(self, name):  # kind, act, n_neurons, gate, up, down, ...: the host weights'
        if name in ("host", "layer_idx", "offload"):
            raise AttributeError(name)
        return getattr(self.host, name)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        return self.offload.stage(self).intermediate(x)

    def output(self, a: torch.Tensor) -> torch.Tensor:
        staged = self.offload.stage(self)
        y = staged.output(a)
        self.offload.gather_selected(self, staged)  # a core set chosen from this layer's activations: gather now
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.offload.stage(self)(x)

    def gather(self, core_set: torch.Tensor) -> FFNWeights:
        return self.offload.core_ffn(self, core_set)

    def nbytes(self) -> int:
        return self.host.nbytes()


def _sessions(active) -> list:
    """The active session and, for a batch, the per-prompt sessions inside it."""
    if active is None:
        return []
    return [active] + list(getattr(active, "sessions", []) or [])


class Offload:
    """A SparseLM's memory-budget state: the plan, the host FFNs, the staging buffers, the LRU of clusters'
    compact FFNs, and the bytes each call moved over the bus. Instance state only."""

    def __init__(self, plan: MemoryPlan, device: torch.device, active):
        self.plan = plan
        self.device = device
        self.active = active  # the SparseLM's ContextVar of the running call's session
        self.lock = threading.RLock()  # one call at a time (shared staging buffers)
        self.staging: Staging | None = None
        self.rows: HostRowGather | None = None  # core rows of streamed layers from host memory (set by _place)
        self.cache: OrderedDict = OrderedDict()  # (layer, core-set bytes) -> compact FFNWeights on the device
        self.bus = weakref.WeakKeyDictionary()  # session -> bytes moved host -> device during its call
        self.total_bus_bytes = 0
        self.fast = None  # cuda.offload.BudgetFastLM: on CUDA for the fast path's architectures (then nothing is placed)
        self.fast_unsupported: str | None = None  # why the fast path does not serve this model (eager offloading runs)

    # ---- bookkeeping
    def _count(self, n: int) -> None:
        self.total_bus_bytes += n
        for s in _sessions(self.active.get()):
            self.bus[s] = self.bus.get(s, 0) + n

    def session_bytes(self, session) -> int:
        return 0 if session is None else self.bus.get(session, 0)

    # ---- streaming
    def stage(self, ffn: HostFFN) -> FFNWeights:
        """The device copy of ``ffn``'s dense weights (copied into the least recently used staging buffer)."""
        staged = self.staging.lookup(ffn.layer_idx)
        if staged is None:
            staged = self.staging.load(ffn.layer_idx, ffn.host)
            self._count(ffn_bytes(ffn.host))
        return staged

    def _cache_key(self, layer: int, core_set: torch.Tensor, cacheable: bool):
        if not cacheable:
            return None
        return layer, core_set.detach().to("cpu", torch.int64).numpy().tobytes()

    def _per_set(self) -> int:
        return max(1, len(self.plan.streamed))

    def core_ffn(self, ffn: HostFFN, core_set: torch.Tensor, staged: FFNWeights | None = None,
                 cacheable: bool | None = None) -> FFNWeights:
        """The compact FFN of ``core_set`` on the device: from the LRU of clusters, from the staged dense copy
        (device to device), or gathered in host memory and copied (only the core rows cross the bus)."""
        if cacheable is None:  # core sets given before the prefill (a cluster's) are worth keeping
            cacheable = any(isinstance(s, CoreSetSession) and s.select is None for s in _sessions(self.active.get()))
        key = self._cache_key(ffn.layer_idx, core_set, cacheable)
        if key is not None and key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        # the decode buffers' share of the LRU: a prompt whose sets are not kept leaves cluster_slots - 1 sets
        self._trim(self.plan.cluster_slots if key is not None else self.plan.cluster_slots - 1)
        if staged is None:
            staged = self.staging.lookup(ffn.layer_idx)
        if staged is not None:
            compact = staged.gather(core_set)
            shared = [t for t in _tensors(staged).values()]
            # gather passes some tensors through (the down bias): copy those out of the reusable buffer
            compact = dataclasses.replace(compact, **{f: t.clone() for f, t in _tensors(compact).items()
                                                      if any(t is s for s in shared)})
        else:
            compact = self._from_host(ffn.host, core_set)
            self._count(ffn_bytes(compact))
        if key is not None:
            self.cache[key] = compact
            self._trim(self.plan.cluster_slots)
        return compact

    def _from_host(self, host: FFNWeights, core_set: torch.Tensor) -> FFNWeights:
        """The compact FFN of ``core_set`` copied from a streamed layer's host copy: its rows of gate and up (or fc1
        and its bias), of down transposed, and fc2's bias, in one copy into one device tensor the compact FFN views."""
        idx = core_set.to("cpu", torch.long).view(-1)
        k, H = idx.numel(), host.down.shape[0]
        down_t = host.down.t()  # (I, H) rows: _place stores the host copy so
        rows = [host.gate, host.up, down_t] if host.kind != "mlp" else [host.fc1, down_t]
        parts = [(t, idx) for t in rows] + [(t, idx) for t in (host.fc1_bias,) if t is not None]
        parts += [(host.down_bias, None)] if host.down_bias is not None else []
        flat = torch.empty(sum(math.prod(s) for s in HostRowGather.shapes(parts)), dtype=host.down.dtype,
                           device=self.device)
        self.rows.copy(parts, flat)
        views = HostRowGather.views(parts, flat)
        if host.kind == "mlp":
            fc1, down = views[0], views[1].t()
            fc1_bias = views[2] if host.fc1_bias is not None else None
            return FFNWeights("mlp", host.act, down, fc1=fc1, fc1_bias=fc1_bias,
                              down_bias=views[-1] if host.down_bias is not None else None)
        return FFNWeights(host.kind, host.act, views[2].t(), gate_up=flat[:2 * k * H].view(2 * k, H),
                          down_bias=views[-1] if host.down_bias is not None else None)

    def _trim(self, sets: int) -> None:
        while len(self.cache) > max(0, sets) * self._per_set():
            self.cache.popitem(last=False)

    def gather_selected(self, ffn: HostFFN, staged: FFNWeights) -> None:
        """After a streamed layer's dense FFN ran: every running session that now knows its core set for the
        layer gets its compact FFN from the staged copy, before the buffer is reused."""
        i = ffn.layer_idx
        for s in _sessions(self.active.get()):
            if isinstance(s, CoreSetSession) and i in s.layers and i in s.core_sets and i not in s.compact:
                t0 = time.perf_counter()
                s.compact[i] = self.core_ffn(ffn, s.core_sets[i], staged, cacheable=s.select is None)
                s.gather_s += time.perf_counter() - t0

    def stats(self, session) -> dict:
        p = self.plan
        return {"bus_bytes": self.session_bytes(session), "streamed_layers": len(p.streamed),
                "resident_dense_layers": len(p.resident_dense), "staging_buffers": p.staging_buffers,
                "cluster_slots": p.cluster_slots, "cached_core_ffns": len(self.cache), "plan": p.to_dict()}


@dataclass
class OffloadStats(Stats):
    """``Stats`` plus what the memory-budget mode did: bytes moved over the bus in this call, and the plan."""

    memory: dict | None = None


class OffloadedSparseLM(SparseLM):
    """A SparseLM whose streamed layers' dense FFN lives in host memory (see the module doc)."""

    offload: Offload

    def generate(self, *args, **kwargs):
        if self.offload.fast is not None:
            with self.offload.lock:
                return self._generate_fast(*args, **kwargs)
        if kwargs.get("fast_path"):
            raise ValueError(f"fast_path=True: the graph-captured path does not serve this model under a memory budget "
                             f"({self.offload.fast_unsupported or 'it runs on CUDA only'}); leave fast_path out")
        kwargs["fast_path"] = False
        with self.offload.lock:
            return super().generate(*args, **kwargs)

    def _eager_only(self, what: str):
        if self.offload.fast is not None:
            raise ValueError(f"{what} under a memory budget on CUDA is not available on the graph-captured path (the "
                             "weights live in its buffers, not in the model's modules); load with "
                             "memory_budget=MemoryBudget(size, fast_path=False) for the eager offloaded path")

    def score_choices(self, *args, **kwargs):
        self._eager_only("scoring")
        with self.offload.lock:
            return super().score_choices(*args, **kwargs)

    def capture(self, *args, **kwargs):
        self._eager_only("capturing activations")
        with self.offload.lock:
            return super().capture(*args, **kwargs)

    def _generate_fast(self, prompt, method=None, alpha: float = 0.4, beta=None, layers=None, max_new_tokens: int = 64,
                       score: str = DEFAULT_SCORE, sparse_prefill: bool = False, *, chat: bool = False,
                       fast_path=None, **unsupported):
        """One greedy prompt on ``BudgetFastLM`` (CUDA): the core sets as ``generate`` chooses them (stability from the
        prefill, similarity from the artifact), decoded from the resident compact buffers."""
        extra_args = sorted(k for k, v in unsupported.items() if v not in (None, False))
        if fast_path is False or extra_args or not isinstance(prompt, str):
            what = ("fast_path=False" if fast_path is False else f"{extra_args}" if extra_args
                    else "a batch or token ids")
            raise ValueError(f"under a memory budget on CUDA, generate runs the graph-captured path: one str prompt, "
                             f"greedy; {what} needs the eager offloaded path: load with "
                             "memory_budget=MemoryBudget(size, fast_path=False)")
        method = method or ("auto" if self.artifact is not None else "stability")
        if method == "dense":
            raise ValueError("method='dense' under a memory budget would stream every streamed layer's dense FFN for "
                             "every token; use a sparse method, or load without memory_budget")
        artifact_k = getattr(self, "artifact_layer_k", None)
        layer_k = artifact_k(method, beta, layers) if artifact_k is not None else None
        beta = self.default_beta(method, beta)
        layers = self._validate(method, alpha, beta, score, layers, layer_k)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        fast, plan = self.offload.fast, self.offload.plan
        if list(layers) != sorted(plan.layer_k):
            raise ValueError(f"the memory plan's sparse layers are {_span(plan.layer_k)} but layers {_span(layers)} were "
                             "asked for; generate with the planned layers, or load with MemoryBudget(layers=...)")
        ids = self.encode(prompt, chat=chat)
        self._check_length(ids.shape[1], max_new_tokens)
        session, used, extra = self.core_session(method, ids, prompt, alpha, beta, layers, score, sparse_prefill,
                                                 layer_k=layer_k)
        given = dict(session.core_sets) if (isinstance(session, CoreSetSession) and session.select is None) else None
        sizes = {i: (layer_k or {}).get(i, kept_count(beta, self.adapter.n_neurons)) for i in layers}
        fast.alpha, fast.score = alpha, score
        eos = self._eos_ids()
        gen = fast.generate_budget(ids[0], max_new_tokens, core_sets=given, cluster=extra.get("cluster"),
                                   sparse_prefill=bool(sparse_prefill and given is not None), eos_token_id=sorted(eos),
                                   layer_k=None if given is not None else sizes)
        tokens, stop = list(gen.tokens), "length"
        if tokens and tokens[-1] in eos:
            tokens, stop = tokens[:-1], "eos"
        t = gen.timings
        steps = max(len(tokens) - 1, 0)
        kept = {i: int(c.numel()) for i, c in gen.core_sets.items()}
        n, width = self.adapter.n_layers, self.adapter.n_neurons
        values = dict(method_used=used, kept_fraction=(sum(kept.values()) + (n - len(kept)) * width) / (n * width),
                      prefill_ms=t.get("prefill_ms", 0.0), select_ms=t.get("select_ms", 0.0) + t.get("gather_ms", 0.0),
                      decode_tokens_per_s=steps / (t["decode_ms"] / 1e3) if steps and t.get("decode_ms") else 0.0,
                      prompt_tokens=int(ids.shape[1]), new_tokens=len(tokens), layers=list(layers),
                      neurons_per_layer=next(iter(kept.values())) if len(set(kept.values())) == 1 else None,
                      layer_k=kept, ffn_bytes_per_token=fast.w.ffn_bytes(layer_k={}), alpha=alpha,
                      beta=extra.get("beta", beta), score=score, cluster=extra.get("cluster"), stop_reason=stop,
                      path="fast-offload")
        names = {f.name for f in dataclasses.fields(Stats)}
        stats = OffloadStats(**{k: v for k, v in values.items() if k in names},
                             memory={"bus_bytes": gen.bus_bytes, "core_sets_from": gen.sets_from,
                                     **{k: v for k, v in self.offload.stats(None).items() if k != "bus_bytes"}})
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return GenerateOutput(text, tokens, stats, {i: c.to("cpu") for i, c in gen.core_sets.items()})

    def _check_length(self, n_prompt: int, n_more: int) -> None:
        super()._check_length(n_prompt, n_more)
        if n_prompt + n_more > self.offload.plan.context_length:
            self.offload.plan.check_request({}, n_prompt + n_more)

    def core_session(self, method, input_ids, prompt, alpha, beta, layers, score, sparse_prefill=False, **kwargs):
        session, used, extra = super().core_session(method, input_ids, prompt, alpha, beta, layers, score,
                                                    sparse_prefill, **kwargs)
        if isinstance(session, CoreSetSession):  # the compact FFNs must fit what the plan reserved
            n = self.adapter.n_neurons
            sizes = {i: int(c.numel()) for i, c in session.core_sets.items()}
            k = kept_count(extra.get("beta", beta), n)
            layer_k = kwargs.get("layer_k") or {}
            self.offload.plan.check_request({i: sizes.get(i, layer_k.get(i, k)) for i in session.layers}, 1)
        return session, used, extra

    def _stats(self, *args, **kwargs) -> Stats:
        stats = super()._stats(*args, **kwargs)
        session = kwargs["session"] if "session" in kwargs else args[1]
        fields = {f.name: getattr(stats, f.name) for f in dataclasses.fields(Stats)}
        fields["path"] = "eager-offload"
        return OffloadStats(**fields, memory=self.offload.stats(session))

    def describe_memory(self) -> str:
        return self.offload.plan.describe()


def _plan_for(lm: SparseLM, spec: MemoryBudget, budget: int, dtype: torch.dtype) -> MemoryPlan:
    shape = ModelShape.from_config(lm.model.config)
    layers = lm.resolve_layers(spec.layers)
    kept = spec.kept_fraction
    if kept is None:
        kept = float(lm.artifact.attrs["beta"]) if lm.artifact is not None else DEFAULT_BETA
    context = spec.context_length
    if context is None:
        context = min(lm.context_length, DEFAULT_CONTEXT)
    return plan_memory(shape, budget, dtype=dtype, kept_fraction=kept, sparse_layers=layers, context_length=context)


def _span(layers) -> str:
    xs = sorted(layers)
    return f"{xs[0]}:{xs[-1] + 1}" if xs and xs == list(range(xs[0], xs[-1] + 1)) else str(xs)


def _ffn_modules(layer, fam) -> list[torch.nn.Module]:
    """The modules holding a decoder layer's FFN parameters (the adapter patches the first one's forward)."""
    return [layer.fc1, layer.fc2] if fam.name == "opt" else [layer.mlp]


def _rows_layout(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """``t`` (H, I) with its storage transposed, (I, H) row-major (pinned on CUDA): the same shape and values, but
    each neuron's down weights are one contiguous row (a core set's are k row copies, not k strided columns)."""
    rows = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, pin_memory=pin)
    rows.copy_(t.t())
    return rows.t()


def _place(lm: OffloadedSparseLM, plan: MemoryPlan, device: torch.device) -> None:
    """Move every weight but the streamed layers' dense FFN to ``device``; pin those (CUDA), their down projection
    in rows layout (``_rows_layout``, replacing the parameter's storage: one host copy); rebuild the FFN views."""
    fam = lm.adapter.family
    streamed = set(plan.streamed)
    keep = set()
    for i in streamed:
        for m in _ffn_modules(lm.adapter.layers[i], fam):
            keep.update(id(p) for p in m.parameters())
    downs = {lm.adapter.dense[i].down.data_ptr() for i in streamed}
    pin = device.type == "cuda"
    seen = set()
    with torch.no_grad():
        for module in lm.model.modules():
            for p in module._parameters.values():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                if id(p) in keep:
                    if p.data.data_ptr() in downs:
                        p.data = _rows_layout(p.data, pin)
                    elif pin:
                        p.data = p.data.pin_memory()
                else:
                    p.data = p.data.to(device)
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.to(device)
    # the adapter's FFNWeights were views of the old tensors: rebuild them from the moved parameters
    for i, layer in enumerate(lm.adapter.layers):
        w = adapters._layer_weights(layer, fam, lm.adapter.kind, lm.adapter.act)
        if i in streamed:
            w = HostFFN(i, w, lm.offload)
        forward = _ffn_modules(layer, fam)[0].forward
        if not isinstance(forward, adapters.SessionForward):
            raise RuntimeError(f"layer {i}'s FFN is not session-aware (adapters.install did not run on this model)")
        forward.weights = w
        lm.adapter.dense[i] = w
    if streamed:
        template = lm.adapter.dense[plan.streamed[0]].host
        lm.offload.staging = Staging(template, plan.staging_buffers, device)
        widest = padded(max(plan.layer_k.get(i, template.n_neurons) for i in plan.streamed))
        # per neuron: its gate and up (or fc1 and fc1's bias) and down rows; plus fc2's bias
        per_neuron = sum(t.numel() // t.shape[0] for t in (template.gate, template.up, template.fc1, template.fc1_bias)
                         if t is not None) + template.down.shape[0]
        bias = 0 if template.down_bias is None else template.down_bias.numel()
        lm.offload.rows = HostRowGather(widest * per_neuron + bias, template.down.dtype, pin)
    lm.loaded.device = device


def from_pretrained_offloaded(spec, artifact=None, device=None, dtype=None, memory_budget=None,
                              verbose: bool = False) -> OffloadedSparseLM:
    """``SparseLM.from_pretrained(..., memory_budget=...)``: load into host memory, plan, then place the weights.

    Every check (budget syntax, GPU present and large enough, what fits) runs before a weight reaches the device.
    ``device="cpu"`` simulates the mode on the CPU: the "device" copies are separate CPU tensors. ``verbose``
    prints the plan (stderr) and shows the libraries' loading output.
    """
    budget_spec = MemoryBudget.of(memory_budget)
    budget = parse_budget(budget_spec.size)
    dev = check_budget_device(budget, device)
    dt = resolve_dtype(dtype, dev)
    loaded = load_model(spec, device="cpu", dtype=dt, verbose=verbose)  # host memory; nothing on the device yet
    lm = OffloadedSparseLM(loaded, artifact=artifact)
    offload_loaded(lm, budget_spec, dev)
    if verbose:
        print(lm.describe_memory(), file=sys.stderr)
    return lm


def offload_loaded(lm: OffloadedSparseLM, memory_budget, device, fast: bool | None = None) -> OffloadedSparseLM:
    """Plan and place an ``OffloadedSparseLM`` whose model is still entirely in host memory (CPU).

    ``fast`` (default: on CUDA): for the fast path's architectures the graph-captured ``BudgetFastLM`` holds the
    device copies and the model's modules stay in host memory; otherwise (and with ``fast=False``) the eager
    offloaded path places them. ``fast=True`` on the CPU runs ``BudgetFastLM`` eagerly (tests)."""
    spec = MemoryBudget.of(memory_budget)
    budget = parse_budget(spec.size)
    dev = check_budget_device(budget, device)
    fast = spec.fast_path if fast is None else fast
    if fast not in (None, True, False):
        raise MemoryBudgetError(f"fast_path must be None, True or False, got {fast!r}")
    if any(p.device.type != "cpu" for p in lm.model.parameters()):
        raise MemoryBudgetError("offload_loaded needs the model in host memory (load it on the CPU first)")
    plan = _plan_for(lm, spec, budget, lm.loaded.dtype)
    offload = Offload(plan, dev, lm._active)
    if fast or (fast is None and dev.type == "cuda"):
        from .cuda.fastlm import FastPathError, FastWeights
        from .cuda.offload import BudgetFastLM, model_rope

        try:
            weights = FastWeights.from_hf(lm.model, adapter=lm.adapter)  # host memory: the model stays there
        except FastPathError as err:
            offload.fast_unsupported = str(err)
        else:
            lm.offload = offload
            offload.fast = BudgetFastLM(weights, plan, dev, rope_fn=model_rope(lm.model, dev))
            lm.loaded.device = dev
            return lm
    lm.offload = offload
    _place(lm, plan, dev)
    return lm
