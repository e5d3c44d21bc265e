"""SparseLM: load a model once, then generate or score with the prompt's core neurons.

One call = one session: prefill the prompt (dense FFN, core sets selected from its activations), gather
the compact FFN of each sparse layer once, then decode every token through it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import inspect
import math
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig, LogitsProcessorList

from . import adapters
from .decode import BatchSession, PrefillEnd, TextCallbackStreamer
from .export import SIZES_KEY
from .generation import GenerateOutput, GenerationRequest, Stats, TextWatcher, text_before_stop
from .loading import DEFAULT_MODEL, LoadedModel, load_model
from .selection import DEFAULT_SCORE, check_fraction, check_layer_k, check_score
from .session import CaptureSession, CoreSetSession, Session, stability_selector

METHODS = ("dense", "stability", "similarity", "auto")
DEFAULT_LAYERS = (5 / 32, 27 / 32)  # the paper keeps layers 5..26 of 32 sparse; first and last stay dense
DEFAULT_BETA = 0.4
logger = logging.getLogger("coreinfer")


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


def _as_list(ids) -> list:
    """A token id (or stop string), a list of them or None, as GenerationConfig holds them, as a list."""
    if ids is None:
        return []
    return [ids] if isinstance(ids, (int, str)) else list(ids)


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
        # transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` is deprecated there); earlier 5.x
        # (e.g. a GPU image's 5.17) only knows ``past_key_values``
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @classmethod
    def from_pretrained(cls, spec: str = DEFAULT_MODEL, artifact=None, device=None, dtype=None,
                        memory_budget=None, verbose: bool = False) -> "SparseLM":
        """``memory_budget`` ("12GiB", bytes, or an ``offload.MemoryBudget``): weights that do not fit stay in host
        memory (runtime/offload.py, issue 11); None loads the whole model on the device. ``verbose`` shows the
        libraries' loading progress bars and warnings. ``spec`` may be a ``coreinfer export`` folder."""
        if memory_budget is not None:
            from .offload import from_pretrained_offloaded

            return from_pretrained_offloaded(spec, artifact=artifact, device=device, dtype=dtype,
                                             memory_budget=memory_budget, verbose=verbose)
        loaded = load_model(spec, device=device, dtype=dtype, verbose=verbose)
        return cls(loaded, artifact=artifact)

    @property
    def device(self) -> torch.device:
        return self.loaded.device

    @property
    def context_length(self) -> int:
        cfg = adapters._text_config(self.model.config)
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
        out = self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache}, **kwargs)
        return out.logits[0], getattr(out, self._cache_arg)

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
        n_layers = self.adapter.n_layers
        uniform = len(set(sizes.values())) == 1
        beta = extra.get("beta", beta) if uniform else None
        ffn_bytes = sum(
            (session.compact[i] if sparse and i in session.compact else d).nbytes()
            for i, d in enumerate(self.adapter.dense)
        )
        return Stats(
            method_used=method_used,
            kept_fraction=sum(sizes.get(i, d.n_neurons) for i, d in enumerate(self.adapter.dense))
            / (n_layers * self.ffn_width),
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

    @property
    def ffn_width(self) -> int:
        """FFN neurons per layer of the original model (an exported sparse model's config keeps that size)."""
        cfg = adapters._text_config(self.model.config)
        return int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "ffn_dim", None) or self.adapter.n_neurons)

    def default_method(self) -> str:
        """auto with an artifact; dense on an exported sparse model (its core FFNs are already cut); else stability."""
        if self.artifact is not None:
            return "auto"
        return "dense" if getattr(self.model.config, SIZES_KEY, None) else "stability"

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
    def generate(self, prompt, method: str | None = None, alpha: float = 0.4, beta: float | None = None, layers=None,
                 max_new_tokens: int = 64, score: str = DEFAULT_SCORE, sparse_prefill: bool = False,
                 session: Session | None = None, method_used: str | None = None, *, chat: bool = False,
                 generation_config: GenerationConfig | None = None, stop=None, on_text: Callable[[str], None] | None = None,
                 streamer=None, return_logits: bool = False, seed: int | None = None, fast_path: bool | None = None,
                 **generation_kwargs):
        """Generate from ``prompt`` decoding with the prompt's core neurons (``method="dense"`` for none).

        ``prompt``: a str or a 1-D tensor of token ids (one ``GenerateOutput``), or a list of str or a 2-D
        tensor (a list of outputs, one per prompt; a batch runs left-padded, each prompt with its own core
        sets, and gives what each prompt run alone gives). ``num_return_sequences > 1`` also returns a list.

        Decoding is transformers' own ``generate`` with this call's sessions active, greedy unless ``do_sample``
        is given (then the checkpoint's sampling defaults apply where the call sets none): ``generation_config``
        and any keyword that ``GenerationConfig`` takes (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``num_beams``, ``min_new_tokens``, ``stop_strings``, ...) or ``generate`` takes
        (``logits_processor``, ``stopping_criteria``) reach it, over the model's generation defaults; an
        unknown keyword gets transformers' own error. Ours: ``chat`` (apply the chat template), ``stop``
        (stop strings, as ``stop_strings``: ``text`` ends before the stop string, ``token_ids`` keep its
        tokens), ``on_text`` (callback receiving the generated text in final chunks), ``streamer`` (a
        transformers streamer), ``return_logits`` (each step's (V,) logits), ``session``/``method_used``
        (an evaluation baseline's session, for one prompt).

        ``seed``: torch's generator is seeded with it for the call and restored afterwards, so a sampled call
        with a seed gives the same tokens every time on the same device and library versions, provided no other
        sampled call runs in the process at the same time (transformers samples from torch's global generator).
        ``fast_path``: None uses the CUDA fast path where it applies (else ``stats.fallback_reason`` says why),
        True raises where it cannot apply, False always decodes on the eager path.
        """
        if fast_path not in (None, True, False):
            raise ValueError(f"fast_path must be None, True or False, got {fast_path!r}")
        method = method or self.default_method()
        layer_k = self.artifact_layer_k(method, beta, layers)
        beta = self.default_beta(method, beta)
        layers = self._validate(method, alpha, beta, score, layers, layer_k)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        prompts, single = self._prompts(prompt, chat)
        config, model_kwargs, stop_strings = self._generation_config(generation_config, max_new_tokens, stop,
                                                                     generation_kwargs)
        single = single and (config.num_return_sequences or 1) == 1
        if len(prompts) > 1 and (on_text is not None or streamer is not None):
            raise ValueError("on_text and streamer follow one prompt; generate a batch without them, or one prompt at a time")
        if len(prompts) > 1 and session is not None:
            raise ValueError("session= is one prompt's session; pass a single prompt with it")
        for _, ids in prompts:
            self._check_length(ids.shape[1], max_new_tokens)

        sessions = None if session is None else [(session, method_used or method, {})]
        reason = None
        if fast_path is not False:
            if len(prompts) > 1:
                reason = "the fast path decodes one prompt at a time"
            elif session is not None:
                reason = "an explicit session= runs on the eager path"
            elif self.device.type != "cuda":
                reason = f"the fast path runs on CUDA and this model is on {self.device.type}"
            elif model_kwargs:
                reason = f"{sorted(model_kwargs)} are not generation settings the fast path takes"
            else:
                text, ids = prompts[0]
                sessions = [self.core_session(method, ids, text, alpha, beta, layers, score, sparse_prefill,
                                              layer_k=layer_k)]
                request = GenerationRequest(
                    input_ids=ids, prompt=text, method=method, alpha=alpha, beta=beta, layers=layers, score=score,
                    sparse_prefill=sparse_prefill, max_new_tokens=max_new_tokens, config=config,
                    eos_ids=set(_as_list(config.eos_token_id)), stop_strings=stop_strings, streamer=streamer,
                    on_text=on_text, return_logits=return_logits, seed=seed, layer_k=layer_k)
                from .cuda.hook import fast_generate

                out, reason = fast_generate(self, request, *sessions[0])
                if out is not None:
                    out.stats.path = "fast"
                    return out
            if fast_path:
                raise ValueError(f"{reason}; pass fast_path=None to fall back to the eager path, or leave out what "
                                 "the fast path does not implement")
            logger.info("generate: eager path (%s)", reason)
        if sessions is None:
            sessions = [self.core_session(method, ids, text, alpha, beta, layers, score, sparse_prefill, layer_k=layer_k)
                        for text, ids in prompts]
        outs = self._generate_eager(prompts, sessions, (method, alpha, beta, layers, score), config, model_kwargs,
                                    stop_strings, on_text, streamer, return_logits, seed)
        for out in outs:
            out.stats.fallback_reason = reason
        return outs[0] if single else outs

    def _prompts(self, prompt, chat: bool) -> tuple[list[tuple[str, torch.Tensor]], bool]:
        """[(prompt text, ids (1, T) on the device)] and whether one prompt (not a list) was given."""
        if isinstance(prompt, torch.Tensor):
            if chat:
                raise ValueError("chat=True applies the chat template to text: pass the prompt as a str, or ids without chat")
            if prompt.dim() not in (1, 2) or prompt.shape[-1] == 0 or prompt.shape[0] == 0:
                raise ValueError(f"token ids must be a non-empty 1-D (one prompt) or 2-D (a batch) tensor, "
                                 f"got shape {tuple(prompt.shape)}")
            if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, got {prompt.dtype}")
            rows = [prompt] if prompt.dim() == 1 else list(prompt)
            return [(self.tokenizer.decode(r, skip_special_tokens=True), r.to(self.device, torch.long).view(1, -1))
                    for r in rows], prompt.dim() == 1
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValueError("the list of prompts is empty; pass at least one prompt")
            bad = next((i for i, p in enumerate(prompt) if not isinstance(p, str)), None)
            if bad is not None:
                raise TypeError(f"a list of prompts holds str only, but item {bad} is {type(prompt[bad]).__name__}; "
                                "pass token ids as one tensor")
            return [(p, self.encode(p, chat=chat)) for p in prompt], False
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, a list of str or a tensor of token ids, got {type(prompt).__name__}")
        return [(prompt, self.encode(prompt, chat=chat))], True

    def _generation_config(self, generation_config, max_new_tokens: int, stop, kwargs: dict):
        """(GenerationConfig: the model's defaults, then ``generation_config``, then ``kwargs``; the keywords it
        does not take, for ``generate`` itself; the stop strings)."""
        config = copy.deepcopy(self.model.generation_config)
        if generation_config is not None:
            if not isinstance(generation_config, GenerationConfig):
                raise TypeError(f"generation_config must be a transformers GenerationConfig, got "
                                f"{type(generation_config).__name__}")
            config.update(**generation_config.to_diff_dict())
        model_kwargs = config.update(**kwargs)
        if "do_sample" not in kwargs and (generation_config is None or generation_config.do_sample is None) \
                and config.do_sample:
            # greedy unless the call asks to sample: a checkpoint's own sampling defaults (Llama-3.1-Instruct's
            # do_sample=True, temperature 0.6) would make every call, evaluations included, random
            config.do_sample = False
            for name in ("temperature", "top_k", "top_p", "min_p", "typical_p"):
                if name not in kwargs and (generation_config is None or getattr(generation_config, name, None) is None):
                    setattr(config, name, None)
        config.max_new_tokens = max_new_tokens
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stops += [s for s in _as_list(config.stop_strings) if s not in stops]
        config.stop_strings = stops or None
        user_eos = "eos_token_id" in kwargs or (generation_config is not None and generation_config.eos_token_id is not None)
        if not user_eos:
            config.eos_token_id = sorted(self._eos_ids()) or None
        if config.pad_token_id is None:
            pad = self.tokenizer.pad_token_id
            config.pad_token_id = pad if pad is not None else (_as_list(config.eos_token_id) or [0])[0]
        config.validate()
        return config, model_kwargs, stops

    def _generate_eager(self, prompts, sessions, request: tuple, config: GenerationConfig, model_kwargs: dict,
                        stop_strings: list[str], on_text, streamer, return_logits: bool, seed: int | None):
        """transformers' ``generate`` on the left-padded batch, each prompt's session active on its rows."""
        method, alpha, beta, layers, score = request
        lengths = [ids.shape[1] for _, ids in prompts]
        width = max(lengths)
        input_ids = torch.full((len(prompts), width), int(config.pad_token_id), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(input_ids)
        for row, (_, ids) in enumerate(prompts):
            input_ids[row, width - ids.shape[1]:] = ids[0]
            mask[row, width - ids.shape[1]:] = 1
        batch = BatchSession([s for s, _, _ in sessions], lengths)
        prefill_end = PrefillEnd(batch, self.adapter.dense)
        processors = LogitsProcessorList(model_kwargs.pop("logits_processor", None) or [])
        processors.append(prefill_end)
        if on_text is not None:
            streamer = TextCallbackStreamer(self.tokenizer, on_text, stop_strings, inner=streamer)
        if stop_strings:
            model_kwargs["tokenizer"] = self.tokenizer  # transformers matches stop strings on tokens through it
        config.return_dict_in_generate = True
        config.output_logits = bool(return_logits)
        cuda = [self.device] if self.device.type == "cuda" else []
        rng = torch.random.fork_rng(devices=cuda) if seed is not None else contextlib.nullcontext()
        token = self._active.set(batch)
        t0 = time.perf_counter()
        try:
            with rng, torch.inference_mode():
                if seed is not None:
                    torch.manual_seed(seed)
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                          logits_processor=processors, streamer=streamer, **model_kwargs)
        finally:
            self._active.reset(token)
        t_end = time.perf_counter()
        t_prefill = prefill_end.ended_at or t_end
        eos = set(_as_list(config.eos_token_id))
        group = out.sequences.shape[0] // len(prompts)
        outs = []
        for row in range(out.sequences.shape[0]):
            p = row // group
            tokens, stop_reason, steps = self._trim(out.sequences[row, width:].tolist(), eos, stop_strings)
            text, _ = text_before_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), stop_strings)
            session, used, extra = sessions[p]
            stats = self._stats(used or method, session, layers, beta, alpha, score, t_prefill - t0, lengths[p], extra)
            stats.new_tokens = len(tokens)
            # the first new token comes from the prefill: len - 1 decode steps
            stats.decode_tokens_per_s = (len(tokens) - 1) / (t_end - t_prefill) if len(tokens) > 1 and t_end > t_prefill else 0.0
            stats.stop_reason = stop_reason
            logits = [step[row].float().cpu() for step in out.logits[:steps]] if return_logits else []
            outs.append(GenerateOutput(text, tokens, stats, dict(getattr(session, "core_sets", {})), logits))
        return outs

    def _trim(self, tokens: list[int], eos: set[int], stop_strings: list[str]) -> tuple[list[int], str, int]:
        """(one row's generated tokens up to where it stopped, why, how many tokens it generated). The rows of a
        batch that stop early are filled up with padding; an end-of-sequence token is not kept."""
        for i, t in enumerate(tokens):
            if t in eos:
                return tokens[:i], "eos", i + 1
        watcher = TextWatcher(self.tokenizer, stop_strings)
        if watcher.feed(tokens):  # keeps the tokens up to the one that completed the stop string
            return watcher.ids, "stop_string", len(watcher.ids)
        return tokens, "length", len(tokens)

    def sparse_model(self, prompt_or_core_sets, method: str | None = None, alpha: float = 0.4, beta: float | None = None,
                     layers=None, score: str = DEFAULT_SCORE, chat: bool = False):
        """A plain transformers model (this model's own class) whose sparse layers hold the compact FFN, as the
        family's own MLP module with k neurons: for a prompt's core sets (chosen as ``generate`` chooses them)
        or for ``{layer: sorted neuron indices}``. ``generate``, ``pipeline`` and ``save_pretrained`` work on
        it; its logits are this SparseLM's with the same core sets and ``sparse_prefill`` (every token, the
        prompt's too, runs the compact FFN). Other weights are shared with ``self.model``. Saving and loading
        it back: ``coreinfer export`` and ``runtime/export.py``."""
        from .export import build_sparse_model

        if isinstance(prompt_or_core_sets, dict):
            core_sets = prompt_or_core_sets
        else:
            method = method or self.default_method()
            if method == "dense":
                raise ValueError("method='dense' keeps every neuron: there is no sparse model to build; pick a sparse method")
            layer_k = self.artifact_layer_k(method, beta, layers)
            beta = self.default_beta(method, beta)
            layers = self._validate(method, alpha, beta, score, layers, layer_k)
            (text, ids), = self._prompts(_as_prompt(prompt_or_core_sets), chat)[0]
            session, _, _ = self.core_session(method, ids, text, alpha, beta, layers, score, layer_k=layer_k)
            self._run_prefill(session, ids, last_only=True)
            core_sets = dict(session.core_sets)
        return build_sparse_model(self.model, core_sets)

    def score(self, prompt: str, continuation: str, method: str | None = None, alpha: float = 0.4, beta: float | None = None,
              layers=None, score: str = DEFAULT_SCORE, sparse_prefill: bool = False, chat: bool = False) -> ScoreOutput:
        """Per-token log-probs of ``continuation`` given ``prompt`` (teacher forcing).

        The core set is chosen from the prompt alone; the continuation runs through the sparse FFN,
        exactly as generated tokens would. The first continuation token is predicted by the prefill.
        """
        if not isinstance(continuation, str) or not continuation:
            raise ValueError("continuation must be a non-empty str")
        method = method or self.default_method()
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
