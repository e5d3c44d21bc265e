"""Sampling and the decode loop: one token per step, stop on EOS, stop strings or the token budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generator(self, device) -> torch.Generator | None:
        if not self.do_sample:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g

    def pick(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """Next token from the last position's logits (V,)."""
        if not self.do_sample:
            return int(logits.argmax())
        logits = logits.float() / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = logits.sort(descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) >= self.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@dataclass
class DecodeResult:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stop_reason: str = "length"
    logits: list[torch.Tensor] = field(default_factory=list)  # per step, when asked for


def decode_loop(step: Callable[[int], torch.Tensor], first_logits: torch.Tensor, max_new_tokens: int,
                sampling: Sampling, eos_ids: set[int], tokenizer, stop: list[str] | None = None,
                on_text: Callable[[str], None] | None = None, streamer=None, keep_logits: bool = False) -> DecodeResult:
    """Greedy or sampled decoding. ``step(token) -> logits (V,)`` runs the model on one token."""
    generator = sampling.generator(first_logits.device)
    out = DecodeResult()
    stop = [s for s in (stop or []) if s]
    hold = max((len(s) for s in stop), default=1) - 1  # never stream text that may start a stop string
    emitted = 0
    logits = first_logits
    for i in range(max_new_tokens):
        if keep_logits:
            out.logits.append(logits.float().cpu())
        token = sampling.pick(logits, generator)
        if token in eos_ids:
            out.stop_reason = "eos"
            break
        out.token_ids.append(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        if not stop and on_text is None:  # nothing looks at the text mid-stream: decode once at the end
            if i + 1 < max_new_tokens:
                logits = step(token)
            continue
        text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
        hit = min((text.find(s) for s in stop if s in text), default=-1)
        if hit >= 0:
            out.text, out.stop_reason = text[:hit], "stop_string"
            break
        out.text = text
        if on_text is not None and len(text) - hold > emitted:
            on_text(text[emitted:len(text) - hold])
            emitted = len(text) - hold
        if i + 1 < max_new_tokens:
            logits = step(token)
    if not stop and on_text is None:
        out.text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    if on_text is not None and len(out.text) > emitted:
        on_text(out.text[emitted:])
    if streamer is not None:
        streamer.end()
    return out
