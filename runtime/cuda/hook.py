"""``SparseLM.generate`` on a GPU: the same call answered by the graph-captured fast path.

Used where it computes exactly what the eager path computes: a CUDA model of a supported family, greedy
decoding, ``method`` "dense" or "stability" (the prompt's own core sets), no stop strings, streamer,
text callback or per-step logits. Anything else returns ``None`` and the eager path runs. Set
``COREINFER_FAST=0`` to always use the eager path.

The ``FastWeights`` (one decode-layout copy of the model's attention and FFN weights) and one ``FastLM``
per (kept fraction, sparse layers, alpha, score) are kept on the ``SparseLM`` instance they belong to;
each ``FastLM`` serves one call at a time (its own lock).
"""

from __future__ import annotations

import os
import threading

from .fastlm import FastLM, FastPathError, FastWeights

_MAX_INSTANCES = 4
_SLOT = "_coreinfer_cuda_fast"


def _state(lm) -> dict:
    return lm.__dict__.setdefault(_SLOT, {"lock": threading.Lock(), "weights": None, "unsupported": None, "lms": {}})


def _instance(lm, beta, layers: range, alpha: float, score: str, need: int) -> FastLM | None:
    st = _state(lm)
    with st["lock"]:
        if st["unsupported"] is not None:
            return None
        if st["weights"] is None:
            try:
                st["weights"] = FastWeights.from_hf(lm.model, adapter=lm.adapter)
            except FastPathError as err:  # an architecture the fast path does not cover: eager path
                st["unsupported"] = str(err)
                return None
        key = (beta, layers.start, layers.stop, alpha, score)
        fast = st["lms"].get(key)
        if fast is None or fast.max_seq_len < need:
            size = min(max(1024, 1 << (need - 1).bit_length()), max(need, lm.context_length))
            if len(st["lms"]) >= _MAX_INSTANCES and key not in st["lms"]:
                st["lms"].pop(next(iter(st["lms"])))
            fast = FastLM(st["weights"], max_seq_len=size, kept_fraction=beta, alpha=alpha, score=score,
                          sparse_layers=layers if beta is not None else None)
            st["lms"][key] = fast
        return fast


def fast_generate(lm, prompt: str, method: str, alpha: float, beta: float, layers: range, max_new_tokens: int,
                  score: str, sparse_prefill: bool, generation_kwargs: dict, force: bool = False):
    """A ``GenerateOutput`` from the fast path, or ``None`` where the eager path must answer.

    ``force`` also runs it off CUDA (eagerly: no graph), which is how the tests compare the two on CPU.
    """
    from ..sparse_lm import GenerateOutput, Stats

    if os.environ.get("COREINFER_FAST", "1") == "0" or (lm.device.type != "cuda" and not force):
        return None
    gk = dict(generation_kwargs)
    if method not in ("dense", "stability") or sparse_prefill or gk.get("do_sample") or gk.get("stop") \
            or gk.get("streamer") is not None or gk.get("on_text") is not None or gk.get("return_logits"):
        return None
    ids = lm.encode(prompt, chat=gk.get("chat", False))
    n_prompt = ids.shape[1]
    lm._check_length(n_prompt, max_new_tokens)
    sparse = method == "stability"
    fast = _instance(lm, beta if sparse else None, layers, alpha, score, n_prompt + max_new_tokens)
    if fast is None:
        return None
    eos = lm._eos_ids()
    gen = fast.generate(ids[0], max_new_tokens, eos_token_id=sorted(eos), timing=True)
    tokens, stop_reason = list(gen.tokens), "length"
    if tokens and tokens[-1] in eos:
        tokens, stop_reason = tokens[:-1], "eos"
    t = gen.timings
    steps = max(len(tokens) - 1, 0)
    stats = Stats(
        method_used=method, kept_fraction=fast.kept_fraction_overall(), prefill_ms=t["prefill_ms"],
        select_ms=t["select_ms"] + t["gather_ms"],
        decode_tokens_per_s=steps / (t["decode_ms"] / 1e3) if steps and t["decode_ms"] > 0 else 0.0,
        prompt_tokens=n_prompt, new_tokens=len(tokens), layers=list(layers) if sparse else [],
        neurons_per_layer=fast.k, ffn_bytes_per_token=fast.w.ffn_bytes(fast.k, fast.sparse_layers),
        alpha=alpha if sparse else None, beta=beta if sparse else None, score=score if sparse else None,
        stop_reason=stop_reason)
    return GenerateOutput(lm.tokenizer.decode(tokens, skip_special_tokens=True), tokens, stats, gen.core_sets)
