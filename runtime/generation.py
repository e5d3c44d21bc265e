"""One validated generate request: what both decode paths (the eager transformers path and the CUDA fast
path) consume, so argument handling lives in one place (``SparseLM.generate``) and neither path re-parses it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig


@dataclass
class GenerationRequest:
    """A single prompt's call after validation (a batch is one request per prompt on the eager path)."""

    input_ids: torch.Tensor  # (1, T) on the model's device, chat template already applied
    prompt: str  # the user's text (similarity-guided selection embeds it)
    method: str  # as asked: dense | stability | similarity | auto
    alpha: float
    beta: float
    layers: range
    score: str
    sparse_prefill: bool
    max_new_tokens: int
    config: GenerationConfig  # the model's defaults, then generation_config=, then keyword arguments
    eos_ids: set[int] = field(default_factory=set)
    stop_strings: list[str] = field(default_factory=list)
    streamer: object | None = None  # transformers streamer: put(ids), end()
    on_text: Callable[[str], None] | None = None  # receives text chunks as they are final
    return_logits: bool = False  # keep each step's (V,) logits in the output
    seed: int | None = None  # sampling seed (reproducible sampling for a seed)
    layer_k: dict[int, int] | None = None  # per-layer core-set sizes (calibrated budgets); None: round(beta * I) on layers


@dataclass
class Stats:
    method_used: str
    kept_fraction: float  # FFN neurons used per decoded token / all FFN neurons of the model
    prefill_ms: float
    select_ms: float  # core-set selection + compact gather after the prefill (select_in_prefill: ~0, in prefill_ms)
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
    path: str = "eager"  # which decode path answered: "fast" (CUDA graph) or "eager" (transformers)
    fallback_reason: str | None = None  # why the fast path did not answer this call (None when it did)
    select_in_prefill: bool = False  # the selection ran inside the captured prefill's graph (its time is in prefill_ms)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]
    stats: Stats
    core_sets: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> sorted neuron indices
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) per generated token, with return_logits=True


def text_before_stop(text: str, stop_strings: list[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string (excluded), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class TextWatcher:
    """Stop strings and ``on_text`` over the text of the new tokens, fed a chunk of tokens at a time.

    Text reaches ``on_text`` only once no stop string can still begin in it (the last ``len(longest) - 1``
    characters wait) and no multi-byte character is still incomplete; a stop string ends the text before it,
    and the tokens after the one that completed it are dropped."""

    def __init__(self, tokenizer, stop_strings=None, on_text=None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop_strings or []) if s]
        self.on_text = on_text
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    @property
    def active(self) -> bool:
        return bool(self.stop) or self.on_text is not None

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def feed(self, new: list[int]) -> bool:
        """Take the next tokens; True once a stop string has appeared."""
        if self.stopped or not new:
            return self.stopped
        self.ids.extend(new)
        if not self.active:
            return False
        self.text, self.stopped = text_before_stop(self._decode(self.ids), self.stop)
        if self.stopped:
            base = len(self.ids) - len(new)
            for n in range(1, len(new) + 1):  # the token that completed it: the shortest prefix holding it
                if text_before_stop(self._decode(self.ids[:base + n]), self.stop)[1]:
                    del self.ids[base + n:]
                    break
        self._emit(final=self.stopped)
        return self.stopped

    def _emit(self, final: bool) -> None:
        if self.on_text is None:
            return
        end = len(self.text) if final else min(len(self.text) - self.hold, len(self.text.rstrip("\ufffd")))
        if end > self.emitted:
            self.on_text(self.text[self.emitted:end])
            self.emitted = end

    def finish(self, tokens: list[int]) -> str:
        """The final text (``tokens``: every new token but EOS, when no stop string ended the call)."""
        if not self.stopped:
            self.ids = list(tokens)
            self.text = self._decode(self.ids)
        self._emit(final=True)
        return self.text
