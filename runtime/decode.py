"""What the eager path adds to transformers' ``generate``; transformers itself decodes (sampling, beams,
logits processors, stopping criteria, streamers).

- ``BatchSession``: one session per prompt of a left-padded batch, so each prompt decodes with its own core set.
- ``PrefillEnd``: a logits processor that ends the prefill (gathers the compact FFNs) after the first forward.
- ``TextCallbackStreamer``: a transformers streamer handing ``on_text`` the generated text in final chunks.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from transformers import LogitsProcessor
from transformers.generation.streamers import BaseStreamer

from .ffn import FFNWeights
from .generation import TextWatcher
from .session import CoreSetSession, Session


class BatchSession(Session):
    """The sessions of a batch's prompts, row by row.

    The prefill hands each prompt's session only that prompt's own positions (left padding dropped), so its
    core sets are selected from its tokens alone; pad positions run dense. ``generate`` may repeat each
    prompt's row (beams, several sequences): rows ``p * g .. (p + 1) * g - 1`` belong to prompt ``p``, and in
    the prefill, where those copies are identical, the session runs once per prompt.
    """

    def __init__(self, sessions: list[Session], lengths: list[int]):
        if len(sessions) != len(lengths):
            raise ValueError("a BatchSession needs one prompt length per session")
        self.sessions = sessions
        self.lengths = lengths
        self.prefilling = True

    def ffn(self, layer_idx: int, x: torch.Tensor, dense: FFNWeights) -> torch.Tensor:
        if x.dim() == 2:  # families that flatten (rows * positions, H) around the FFN (OPT)
            positions = max(self.lengths) if self.prefilling else 1
            return self.ffn(layer_idx, x.view(-1, positions, x.shape[-1]), dense).reshape(x.shape[0], -1)
        n = len(self.sessions)
        group = x.shape[0] // n
        if group * n != x.shape[0]:
            raise RuntimeError(f"batch of {x.shape[0]} rows for {n} prompts")
        if n == 1 and not self.prefilling:
            return self.sessions[0].ffn(layer_idx, x, dense)
        outs = []
        for p, session in enumerate(self.sessions):
            rows = x[p * group:(p + 1) * group]
            if not self.prefilling:
                outs.append(session.ffn(layer_idx, rows, dense))
                continue
            pad = x.shape[1] - self.lengths[p]
            own = session.ffn(layer_idx, rows[:1, pad:], dense).expand(group, -1, -1)
            outs.append(torch.cat([dense(rows[:, :pad]), own], dim=1) if pad else own)
        return outs[0] if n == 1 else torch.cat(outs, dim=0)

    def end_prefill(self, dense: list[FFNWeights]) -> None:
        """Freeze every prompt's core sets: each later token runs its compact FFNs."""
        self.prefilling = False
        for session in self.sessions:
            if isinstance(session, CoreSetSession):
                session.freeze(dense)
            if hasattr(session, "prefill_done"):  # per-token baselines switch on after the prompt
                session.prefill_done = True


class PrefillEnd(LogitsProcessor):
    """Ends the batch's prefill at the first logits ``generate`` processes, and notes when (the prefill time).

    Changes no score. ``generate`` calls its logits processors after every forward and before the next one.
    """

    def __init__(self, session: BatchSession, dense: list[FFNWeights]):
        self.session = session
        self.dense = dense
        self.ended_at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.ended_at is None:
            self.session.end_prefill(self.dense)
            self.ended_at = time.perf_counter()
        return scores


class TextCallbackStreamer(BaseStreamer):
    """Calls ``on_text(chunk)`` with each piece of generated text once it is final (``generation.TextWatcher``,
    as the fast path does): text that could still turn into a stop string or an unfinished multi-byte character
    is held back, and the chunks join to the call's final text. ``inner``, a user's streamer, receives every
    token as well.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_strings: list[str] | None = None,
                 inner: BaseStreamer | None = None):
        self.watcher = TextWatcher(tokenizer, stop_strings, on_text)
        self.inner = inner
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.put(value)
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] != 1:
            raise ValueError("on_text follows one sequence; it takes no batch")
        self.watcher.feed(value.reshape(-1).tolist())

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()
        self.watcher.finish(self.watcher.ids)
