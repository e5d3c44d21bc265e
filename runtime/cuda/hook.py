"""``SparseLM.generate`` on a GPU: the same call answered by the graph-captured fast path.

Every single-prompt call of a supported family takes it: dense, stability-guided (the prompt's own core sets)
and similarity-guided / auto (the artifact's core sets, known before the prefill, so ``sparse_prefill`` too);
greedy or sampled (temperature, top-k, top-p, seeded: drawn on the device inside the captured step); stop
strings, a streamer and ``on_text`` callbacks (new tokens read back a chunk at a time into pinned memory while
the device decodes the next chunk); ``return_logits``; EOS; chat templates (already applied to the request).
What it does not implement (beam search, logits processors such as a repetition penalty, per-layer core-set
sizes, ...) is named in the reason it returns, which ``SparseLM.generate`` reports in ``stats`` or raises
with ``fast_path=True``; it never answers silently with other numbers. ``COREINFER_FAST=0`` turns it off.

The ``FastWeights`` (one decode-layout copy of the model's attention and FFN weights) and one ``FastLM``
per (kept fraction, sparse layers, alpha, score) live on the ``SparseLM`` instance they belong to; each
``FastLM`` serves one call at a time (its own lock).
"""

from __future__ import annotations

import os
import secrets
import threading

import torch

from ..generation import GenerateOutput, GenerationRequest, Stats, TextWatcher
from ..selection import kept_count
from ..session import CoreSetSession, Session
from .fastlm import FastLM, FastPathError, FastWeights, Sampling

_MAX_INSTANCES = 4
_SLOT = "_coreinfer_cuda_fast"
# GenerationConfig fields the fast path implements or that do not change what it computes
_IMPLEMENTED = {"do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "eos_token_id",
                "pad_token_id", "bos_token_id", "stop_strings", "use_cache", "transformers_version",
                "_from_model_config", "return_dict_in_generate"}


def _state(lm) -> dict:
    return lm.__dict__.setdefault(_SLOT, {"lock": threading.Lock(), "weights": None, "unsupported": None, "lms": {}})


def _instance(lm, layer_k: dict[int, int] | None, alpha: float, score: str, need: int) -> FastLM | str:
    """The ``FastLM`` for these core-set sizes ({sparse layer: k}; None: dense), built once per SparseLM and
    configuration, or why there is none."""
    st = _state(lm)
    with st["lock"]:
        if st["unsupported"] is not None:
            return st["unsupported"]
        if st["weights"] is None:
            try:
                st["weights"] = FastWeights.from_hf(lm.model, adapter=lm.adapter)
            except FastPathError as err:  # an architecture the fast path does not cover: eager path
                st["unsupported"] = str(err)
                return st["unsupported"]
        key = (None if layer_k is None else tuple(sorted(layer_k.items())), alpha, score)
        fast = st["lms"].get(key)
        if fast is None or fast.max_seq_len < need:
            size = min(max(1024, 1 << (need - 1).bit_length()), max(need, lm.context_length))
            if len(st["lms"]) >= _MAX_INSTANCES and key not in st["lms"]:
                st["lms"].pop(next(iter(st["lms"])))
            fast = FastLM(st["weights"], max_seq_len=size, alpha=alpha, score=score, layer_k=layer_k)
            st["lms"][key] = fast
        return fast


def _defaults(config) -> dict:
    """transformers' global generation defaults, which fill the fields a GenerationConfig leaves unset (None)."""
    return getattr(type(config), "_get_default_generation_params", lambda: {})()


def _effective(config) -> dict:
    """``config``'s values with transformers' global defaults where it leaves a field unset (None)."""
    defaults = _defaults(config)
    return {k: (defaults.get(k) if v is None else v) for k, v in config.to_dict().items()}


def unsupported_generation(config) -> str | None:
    """Why ``config`` (a GenerationConfig) needs the eager path, or None when the fast path implements it: every
    field it sets to something other than transformers' default, outside what the fast path implements."""
    defaults = _defaults(config)

    def changes(k, v) -> bool:  # False for a flag transformers leaves unset (None) is no change either
        d = defaults.get(k)
        return not (v is None or v == d or (v is False and not d))

    diff = {k: v for k, v in config.to_diff_dict().items() if k not in _IMPLEMENTED and changes(k, v)}
    if not diff:
        return None
    named = ", ".join(f"{k}={v!r}" for k, v in sorted(diff.items())[:4])
    return f"{named} {'is' if len(diff) == 1 else 'are'} not implemented on the fast path"


def sampling_of(req: GenerationRequest) -> Sampling | None:
    """The request's draw (transformers' semantics: do_sample=False is greedy whatever the temperature)."""
    c = _effective(req.config)
    if not c["do_sample"]:
        return None
    top_k = c["top_k"] or None  # 0 turns it off, as in transformers
    top_p = c["top_p"] if c["top_p"] != 1.0 else None  # out of range: Sampling says so
    seed = req.seed if req.seed is not None else secrets.randbits(62)
    try:
        return Sampling(temperature=c["temperature"], top_k=top_k, top_p=top_p, seed=seed)
    except FastPathError as err:  # out-of-range sampling parameters are the caller's error, on every path
        raise ValueError(str(err)) from None


def fast_generate(lm, req: GenerationRequest, session: Session, method_used: str, extra: dict,
                  force: bool = False) -> tuple[GenerateOutput | None, str | None]:
    """(output, None) from the fast path, or (None, the reason it cannot answer this call).

    ``force`` also runs it off CUDA (eagerly: no graph), which is how the tests compare it with the eager path.
    """
    if os.environ.get("COREINFER_FAST", "1") == "0":
        return None, "COREINFER_FAST=0 turns the fast path off"
    if lm.device.type != "cuda" and not force:
        return None, f"the model is on {lm.device.type}; the fast path runs on CUDA"
    why = unsupported_generation(req.config)
    if why is not None:
        return None, why
    sampling = sampling_of(req)
    given, layer_k, beta = None, None, None
    if type(session) is Session:
        sparse = False
    elif type(session) is CoreSetSession:
        sparse = True
        beta = float(extra.get("beta", req.beta))
        if session.select is None:  # similarity-guided: the artifact's sets (their own sizes), before the prefill
            given = dict(session.core_sets)
            layer_k = {li: int(s.numel()) for li, s in given.items()}
        elif req.layer_k is not None:  # a calibrated per-layer budget
            layer_k = dict(req.layer_k)
        else:
            layer_k = {li: kept_count(beta, lm.adapter.n_neurons) for li in session.layers}
    else:
        return None, f"{type(session).__name__} (an evaluation baseline) runs on the eager path"
    ids = req.input_ids
    n_prompt = ids.shape[-1]
    fast = _instance(lm, layer_k, req.alpha, req.score, n_prompt + req.max_new_tokens)
    if isinstance(fast, str):
        return None, fast

    eos = req.eos_ids
    watcher = TextWatcher(lm.tokenizer, req.stop_strings, req.on_text)
    streamer = req.streamer
    if streamer is not None:
        streamer.put(ids[0].cpu())

    def on_tokens(new: list[int]) -> bool:
        new = [t for t in new if t not in eos]
        before = len(watcher.ids)
        stopped = watcher.feed(new)
        if streamer is not None:  # up to the token that completed a stop string, as transformers streams
            for t in new[:len(watcher.ids) - before]:
                streamer.put(torch.tensor([t]))
        return stopped

    watched = streamer is not None or watcher.active
    gen = fast.generate(ids[0], req.max_new_tokens, eos_token_id=sorted(eos), timing=True, core_sets=given,
                        sampling=sampling, on_tokens=on_tokens if watched else None, keep_logits=req.return_logits,
                        sparse_prefill=req.sparse_prefill)
    tokens, stop_reason = list(gen.tokens), "length"
    if tokens and tokens[-1] in eos:
        tokens, stop_reason = tokens[:-1], "eos"
    text = watcher.finish(tokens)
    if watcher.stopped:
        stop_reason = "stop_string"
        tokens = tokens[:len(watcher.ids)]
    if streamer is not None:
        streamer.end()
    t = gen.timings
    steps = max(len(tokens) - 1, 0)
    stats = Stats(
        method_used=method_used, kept_fraction=fast.kept_fraction_overall(), prefill_ms=t["prefill_ms"],
        select_ms=t["select_ms"] + t["gather_ms"],
        decode_tokens_per_s=steps / (t["decode_ms"] / 1e3) if steps and t["decode_ms"] > 0 else 0.0,
        prompt_tokens=n_prompt, new_tokens=len(tokens), layers=list(fast.sparse_layers),
        neurons_per_layer=fast.uniform_k, layer_k=dict(fast.layer_k) if sparse else None,
        ffn_bytes_per_token=fast.ffn_bytes(),
        alpha=req.alpha if sparse else None, beta=beta if sparse else None, score=req.score if sparse else None,
        cluster=extra.get("cluster"), stop_reason=stop_reason, path="fast",
        select_in_prefill=t.get("select_in_prefill", False))
    logits = gen.logits[:len(tokens)] if req.return_logits else []
    return GenerateOutput(text, tokens, stats, gen.core_sets, logits), None
