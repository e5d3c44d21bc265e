"""SparseLM: load a model once, then generate or score with the prompt's core neurons.

One call = one session: prefill the prompt (dense FFN, core sets selected from its activations), gather
the compact FFN of each sparse layer once, then decode every token through it.
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from . import adapters
from .decode import DecodeResult, Sampling, decode_loop
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .selection import DEFAULT_SCORE, check_fraction, check_layer_k, check_score
from .session import CaptureSession, CoreSetSession, Session, stability_selector

METHODS = ("dense", "stability", "similarity", "auto")
DEFAULT_LAYERS = (5 / 32, 27 / 32)  # the paper keeps layers 5..26 of 32 sparse; first and last stay dense
DEFAULT_BETA = 0.4
GENERATION_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "seed", "stop", "streamer", "on_text", "chat",
                     "return_logits")


@dataclass
class Stats:
    method_used: str
    kept_fraction: float  # FFN neurons used per decoded token / all FFN neurons of the model
    prefill_ms: float
    select_ms: float  # core-set selection + compact gather
    decode_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int
    layers: list[int] = field(default_factory=list)  # the sparse layers
    neurons_per_layer: int | None = None  # k in each sparse layer when they all keep the same number, else None
    layer_k: dict[int, int] | None = None  # {sparse layer: k}: per-layer core-set sizes (a calibrated budget)
    ffn_bytes_per_token: int = 0  # FFN weight bytes read per decoded token
    alpha: float | None = None
    beta: float | None = None
    score: str | None = None
    cluster: int | None = None
    stop_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]
    stats: Stats
    core_sets: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sorted neuron indices
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) per generated token, with return_logits=True


@dataclass
class ScoreOutput:
    token_logprobs: torch.Tensor  # (N,) log p(continuation token i | prompt, continuation[:i])
    token_ids: list[int]
    greedy_ids: list[int]  # argmax at each continuation position (for top-1 agreement)
    stats: Stats
    core_sets: dict[int, torch.Tensor] = field(default_factory=dict)
    logprobs: torch.Tensor | None = None  # (N, V) full log-softmax, only with score_ids(keep_logprobs=True) (KL)

    @property
    def total(self) -> float:
        return float(self.token_logprobs.sum())


def _as_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty or whitespace; give some text to condition on")
    return prompt


class SparseLM:
    """A loaded model whose FFNs can run on per-prompt core neurons. Thread-safe across calls."""

    def __init__(self, loaded: LoadedModel, artifact=None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self._active: ContextVar[Session | None] = ContextVar(f"coreinfer_session_{id(self)}", default=None)
        self.adapter = adapters.install(self.model, self._active)
        self.artifact = None
        if artifact is not None:  # validated against this model (fingerprint, sizes, layer range) or refused
            from .artifact import open_for_model

            self.artifact = open_for_model(artifact, self.adapter, self.model.config)
        self.min_stable_tokens: int | None = None  # method="auto" threshold; None: the artifact's value
        self._takes_logits_to_keep = "logits_to_keep" in self.model.forward.__code__.co_varnames

    @classmethod
    def from_pretrained(cls, spec: str = DEFAULT_MODEL, artifact=None, device=None, dtype=None,
                        memory_budget=None) -> "SparseLM":
        """``memory_budget`` ("12GiB", bytes, or an ``offload.MemoryBudget``): weights that do not fit stay in host
        memory (runtime/offload.py, issue 11); None loads the whole model on the device."""
        if memory_budget is not None:
            from .offload import from_pretrained_offloaded

            return from_pretrained_offloaded(spec, artifact=artifact, device=device, dtype=dtype,
                                             memory_budget=memory_budget)
        loaded = load_model(spec, device=device, dtype=dtype)
        return cls(loaded, artifact=artifact)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def context_length(self) -> int:
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        return int(getattr(cfg, "max_position_embeddings", 2048))

    # ---- configuration helpers ------------------------------------------------------------------
    def resolve_layers(self, layers=None) -> range:
        """Sparse layer range: None (paper default), "a:b" (half-open), fractions "0.15:0.85", or a range."""
        n = self.adapter.n_layers
        if layers is None:
            lo, hi = DEFAULT_LAYERS
        elif isinstance(layers, range):
            lo, hi = layers.start, layers.stop
        elif isinstance(layers, str) and layers.count(":") == 1:
            a, b = (p.strip() for p in layers.split(":"))
            try:
                lo = float(a) if a else 0
                hi = float(b) if b else n
            except ValueError:
                raise ValueError(f"layers {layers!r} is not 'start:stop'; e.g. layers='5:27' or '0.15:0.85'") from None
            if "." not in a and "." not in b:
                lo, hi = int(lo), int(hi)
        else:
            raise ValueError(f"layers {layers!r} is not 'start:stop'; e.g. layers='5:27' or '0.15:0.85'")
        if isinstance(lo, float) or isinstance(hi, float):
            if not (0 <= lo < hi <= 1):
                raise ValueError(f"fractional layers {layers!r} must satisfy 0 <= start < stop <= 1")
            lo, hi = int(math.floor(lo * n + 0.5)), int(math.floor(hi * n + 0.5))
        if not (0 <= lo < hi <= n):
            raise ValueError(f"layers {layers!r} is outside the model's {n} layers; use a range within 0:{n}")
        return range(lo, hi)

    def kept_fraction(self, layers: range, k: int) -> float:
        n, i = self.adapter.n_layers, self.adapter.n_neurons
        return (len(layers) * k + (n - len(layers)) * i) / (n * i)

    def encode(self, prompt: str, chat: bool = False) -> torch.Tensor:
        prompt = _as_prompt(prompt)
        if chat:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("chat=True but this tokenizer has no chat template; use chat=False")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _check_length(self, n_prompt: int, n_more: int) -> None:
        if n_prompt + n_more > self.context_length:
            raise ValueError(
                f"prompt ({n_prompt} tokens) + {n_more} more tokens exceeds the model's context window of "
                f"{self.context_length}; shorten the prompt or lower max_new_tokens"
            )

    # ---- sessions ---------------------------------------------------------------------------------
    def core_session(self, method: str, input_ids: torch.Tensor, prompt: str, alpha: float, beta: float,
                     layers: range, score: str, sparse_prefill: bool = False,
                     layer_k: dict[int, int] | None = None) -> tuple[Session, str, dict]:
        """The session that realises ``method`` for this prompt, the method actually used, and extra stats.

        ``layer_k`` ({layer: k}, e.g. the artifact's calibrated budget) sets per-layer core-set sizes."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        if method == "dense":
            return Session(), "dense", {}
        if layer_k is not None:
            layer_k = check_layer_k(layer_k, self.adapter.n_neurons, self.adapter.n_layers)
        if method in ("similarity", "auto"):
            from .similarity import similarity_session  # needs a calibration artifact

            return similarity_session(self, method, input_ids, prompt, alpha, beta, layers, score, sparse_prefill,
                                      layer_k=layer_k)
        if sparse_prefill:
            raise ValueError("sparse_prefill=True needs core sets known before the prefill: use method='similarity'")
        return CoreSetSession(layers, stability_selector(alpha, beta, score, layer_k)), "stability", {}

    def _forward(self, ids: torch.Tensor, cache, last_only: bool):
        kwargs = {"logits_to_keep": 1} if last_only and self._takes_logits_to_keep else {}
        out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)
        return out.logits[0], out.past_key_values

    def _run_prefill(self, session: Session, ids: torch.Tensor, last_only: bool):
        token = self._active.set(session)
        try:
            with torch.inference_mode():
                logits, cache = self._forward(ids, None, last_only)
                if isinstance(session, CoreSetSession):
                    session.freeze(self.adapter.dense)
                if hasattr(session, "prefill_done"):  # per-token baselines switch on after the prompt
                    session.prefill_done = True
        finally:
            self._active.reset(token)
        return logits, cache

    def _stats(self, method_used, session, layers, beta, alpha, score, prefill_s, n_prompt, extra) -> Stats:
        sparse = isinstance(session, CoreSetSession)
        sizes = session.core_sizes() if sparse else {}  # what was really kept (artifact sets have its sizes)
        n_layers, n_neurons = self.adapter.n_layers, self.adapter.n_neurons
        uniform = len(set(sizes.values())) == 1
        beta = extra.get("beta", beta) if uniform else None
        ffn_bytes = sum(
            (session.compact[i] if sparse and i in session.compact else d).nbytes()
            for i, d in enumerate(self.adapter.dense)
        )
        return Stats(
            method_used=method_used,
            kept_fraction=(sum(sizes.values()) + (n_layers - len(sizes)) * n_neurons) / (n_layers * n_neurons),
            prefill_ms=1e3 * prefill_s,
            select_ms=1e3 * (session.select_s + session.gather_s) if sparse else 0.0,
            decode_tokens_per_s=0.0,
            prompt_tokens=n_prompt,
            new_tokens=0,
            layers=list(layers) if sparse else [],
            neurons_per_layer=next(iter(sizes.values())) if uniform else None,
            layer_k=sizes if sparse else None,
            ffn_bytes_per_token=ffn_bytes,
            alpha=alpha if sparse else None,
            beta=beta if sparse else None,
            score=score if sparse else None,
            cluster=extra.get("cluster"),
        )

    def default_beta(self, method: str, beta: float | None) -> float:
        """beta=None: the artifact's kept fraction for artifact methods (its core sets exist at that size), else 0.4.

        An artifact with per-layer sizes has no one beta: its mean kept fraction over its sparse layers."""
        if beta is not None:
            return beta
        if self.artifact is not None and method in ("similarity", "auto"):
            if self.artifact.per_layer:
                ks = [k for k in self.artifact.layer_k.values() if k < self.adapter.n_neurons] or [self.adapter.n_neurons]
                return sum(ks) / (len(ks) * self.adapter.n_neurons)
            return float(self.artifact.attrs["beta"])
        return DEFAULT_BETA

    def artifact_layer_k(self, method: str, beta: float | None, layers) -> dict[int, int] | None:
        """The artifact's per-layer sizes {layer: k < I} when they apply: an artifact method, an artifact with a
        calibrated budget, and neither beta nor layers given (those ask for one beta on a layer range instead).
        Layers the budget keeps whole stay dense."""
        art = self.artifact
        if art is None or method not in ("similarity", "auto") or beta is not None or layers is not None:
            return None
        if not art.per_layer:
            return None
        return {i: k for i, k in art.layer_k.items() if k < self.adapter.n_neurons}

    def _validate(self, method, alpha, beta, score, layers, layer_k: dict[int, int] | None = None):
        """The sparse layers: ``layers`` resolved, or those of ``layer_k`` (validated: 1 <= k <= I)."""
        if not isinstance(method, str) or method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
        check_fraction("alpha", alpha)
        check_fraction("beta", beta)
        check_score(score)
        if layer_k is not None:
            return list(check_layer_k(layer_k, self.adapter.n_neurons, self.adapter.n_layers))
        return self.resolve_layers(layers)

    # ---- public API -------------------------------------------------------------------------------
    def generate(self, prompt: str, method: str | None = None, alpha: float = 0.4, beta: float | None = None, layers=None,
                 max_new_tokens: int = 64, score: str = DEFAULT_SCORE, sparse_prefill: bool = False,
                 session: Session | None = None, method_used: str | None = None,
                 **generation_kwargs) -> GenerateOutput:
        """Generate from ``prompt`` decoding with the prompt's core neurons (``method="dense"`` for none).

        generation_kwargs: do_sample, temperature, top_k, top_p, seed, stop (list of strings),
        streamer (a transformers TextStreamer), on_text (callback receiving text chunks), chat (bool),
        return_logits (bool: keep each step's logits in the output).
        ``session`` overrides the method's own (evaluation baselines), as in ``score_ids``.
        """
        unknown = set(generation_kwargs) - set(GENERATION_KWARGS)
        if unknown:
            raise TypeError(f"unknown generation arguments {sorted(unknown)}; supported: {GENERATION_KWARGS}")
        method = method or ("auto" if self.artifact is not None else "stability")
        layer_k = self.artifact_layer_k(method, beta, layers)
        beta = self.default_beta(method, beta)
        layers = self._validate(method, alpha, beta, score, layers, layer_k)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        # graph-captured fast path (runtime/cuda/hook.py); per-layer sizes are not wired into it yet
        if session is None and self.device.type == "cuda" and layer_k is None:
            from .cuda.hook import fast_generate

            fast = fast_generate(self, prompt, method, alpha, beta, layers, max_new_tokens, score, sparse_prefill,
                                 generation_kwargs)
            if fast is not None:
                return fast
        gk = dict(generation_kwargs)
        stop = gk.pop("stop", None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        streamer, on_text, chat = gk.pop("streamer", None), gk.pop("on_text", None), gk.pop("chat", False)
        return_logits = gk.pop("return_logits", False)
        sampling = Sampling(**gk)

        ids = self.encode(prompt, chat=chat)
        n_prompt = ids.shape[1]
        self._check_length(n_prompt, max_new_tokens)
        extra: dict = {}
        if session is None:
            session, method_used, extra = self.core_session(method, ids, prompt, alpha, beta, layers, score, sparse_prefill,
                                                            layer_k=layer_k)

        t0 = time.perf_counter()
        logits, cache = self._run_prefill(session, ids, last_only=True)
        prefill_s = time.perf_counter() - t0
        if streamer is not None:
            streamer.put(ids[0].cpu())

        def step(token: int) -> torch.Tensor:
            nonlocal cache
            logits, cache = self._forward(torch.tensor([[token]], device=self.device), cache, last_only=True)
            return logits[-1]

        t1 = time.perf_counter()
        tok = self._active.set(session)
        try:
            with torch.inference_mode():
                result: DecodeResult = decode_loop(step, logits[-1], max_new_tokens, sampling, self._eos_ids(),
                                                   self.tokenizer, stop=stop, on_text=on_text, streamer=streamer,
                                                   keep_logits=return_logits)
        finally:
            self._active.reset(tok)
        decode_s = time.perf_counter() - t1

        stats = self._stats(method_used or method, session, layers, beta, alpha, score, prefill_s, n_prompt, extra)
        stats.new_tokens = len(result.token_ids)
        # the first new token comes from the prefill; the decode loop ran len-1 model steps
        stats.decode_tokens_per_s = (len(result.token_ids) - 1) / decode_s if len(result.token_ids) > 1 and decode_s > 0 else 0.0
        stats.stop_reason = result.stop_reason
        return GenerateOutput(result.text, result.token_ids, stats, dict(getattr(session, "core_sets", {})), result.logits)

    def score(self, prompt: str, continuation: str, method: str | None = None, alpha: float = 0.4, beta: float | None = None,
              layers=None, score: str = DEFAULT_SCORE, sparse_prefill: bool = False, chat: bool = False) -> ScoreOutput:
        """Per-token log-probs of ``continuation`` given ``prompt`` (teacher forcing).

        The core set is chosen from the prompt alone; the continuation runs through the sparse FFN,
        exactly as generated tokens would. The first continuation token is predicted by the prefill.
        """
        if not isinstance(continuation, str) or not continuation:
            raise ValueError("continuation must be a non-empty str")
        method = method or ("auto" if self.artifact is not None else "stability")
        layer_k = self.artifact_layer_k(method, beta, layers)
        beta = self.default_beta(method, beta)
        layers = self._validate(method, alpha, beta, score, layers, layer_k)
        ids = self.encode(prompt, chat=chat)
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ValueError("continuation tokenises to no tokens")
        return self.score_ids(ids, cont, method, alpha, beta, layers, score, sparse_prefill, prompt=prompt,
                              layer_k=layer_k)

    def score_ids(self, ids: torch.Tensor, cont: list[int], method: str, alpha: float, beta: float, layers: range,
                  score: str = DEFAULT_SCORE, sparse_prefill: bool = False, prompt: str = "",
                  session: Session | None = None, method_used: str | None = None,
                  keep_logprobs: bool = False, layer_k: dict[int, int] | None = None) -> ScoreOutput:
        """``score`` on token ids; ``session`` overrides the method's own (evaluation baselines).

        ``keep_logprobs=True`` also returns the full (N, V) log-softmax (for KL against another run).
        """
        return self.score_choices(ids, [cont], method, alpha, beta, layers, score, prompt, session, method_used,
                                  sparse_prefill=sparse_prefill, keep_logprobs=keep_logprobs, layer_k=layer_k)[0]

    def score_choices(self, ids: torch.Tensor, conts: list[list[int]], method: str, alpha: float, beta: float,
                      layers: range, score: str = DEFAULT_SCORE, prompt: str = "", session: Session | None = None,
                      method_used: str | None = None, sparse_prefill: bool = False,
                      keep_logprobs: bool = False, layer_k: dict[int, int] | None = None) -> list[ScoreOutput]:
        """``score_ids`` for several continuations of one prompt (multiple choice): one prefill, so one core set,
        then each continuation is scored sparse from its own copy of the prompt's KV cache. Same numbers as one
        ``score_ids`` call per continuation, without re-running the prompt."""
        import copy

        if not conts or any(not c for c in conts):
            raise ValueError("scoring needs at least one continuation, each of at least one token")
        self._check_length(ids.shape[1], max(len(c) for c in conts))
        extra: dict = {}
        if session is None:
            session, method_used, extra = self.core_session(method, ids, prompt, alpha, beta, layers, score, sparse_prefill,
                                                            layer_k=layer_k)
        t0 = time.perf_counter()
        logits, cache = self._run_prefill(session, ids, last_only=True)
        prefill_s = time.perf_counter() - t0
        first = logits[-1:].float().log_softmax(-1)
        outs = []
        for cont in conts:
            logp = [first]
            if len(cont) > 1:
                own_cache = cache if len(conts) == 1 else copy.deepcopy(cache)
                tok = self._active.set(session)
                try:
                    with torch.inference_mode():
                        rest, _ = self._forward(torch.tensor([cont[:-1]], device=self.device), own_cache, last_only=False)
                finally:
                    self._active.reset(tok)
                logp.append(rest.float().log_softmax(-1))
            lp = torch.cat(logp)
            target = torch.tensor(cont, device=lp.device)
            stats = self._stats(method_used or method, session, layers, beta, alpha, score, prefill_s, ids.shape[1], extra)
            stats.new_tokens = len(cont)
            outs.append(ScoreOutput(lp.gather(1, target[:, None])[:, 0].cpu(), list(cont), lp.argmax(-1).tolist(), stats,
                                    dict(getattr(session, "core_sets", {})), logprobs=lp.cpu() if keep_logprobs else None))
        return outs

    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                hook: Callable[[int, torch.Tensor], None]) -> torch.Tensor:
        """Dense forward of a (padded) batch calling ``hook(layer, acts (B, T, I))`` per layer; returns logits."""
        session = CaptureSession(hook, tuple(input_ids.shape))
        token = self._active.set(session)
        try:
            with torch.inference_mode():
                return self.model(input_ids=input_ids.to(self.device),
                                  attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                                  use_cache=False).logits
        finally:
            self._active.reset(token)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for src in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        return ids
