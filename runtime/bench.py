"""`coreinfer bench`: dense vs sparse prefill and decode speed and memory, side by side in one run.

Every configuration decodes the same prompt for the same number of tokens (EOS ignored), after one
warm-up, and the median of ``repeats`` runs is reported. On CUDA the graph-captured fast path in
``coreinfer.runtime.cuda`` is benchmarked instead when it is available.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time

import torch

from .selection import kept_count
from .sparse_lm import DEFAULT_SCORE

BENCH_PROMPT = (
    "Summarise the following passage in two sentences. The history of the city begins with a small "
    "fishing settlement on the river delta, which grew into a trading port during the medieval period. "
    "Merchants from across the sea brought spices, textiles and new ideas, and the port's guilds built "
    "the great market hall that still stands in the old town. In the nineteenth century the railway "
    "arrived, factories rose along the canals, and the population tripled within fifty years."
)


def _one_run(lm, method: str, beta: float, layers, n_new: int) -> dict:
    """Prefill + decode exactly n_new tokens (no EOS stop) and time each part."""
    ids = lm.encode(BENCH_PROMPT)
    lay = lm.resolve_layers(layers)
    session, used, _ = lm.core_session(method, ids, BENCH_PROMPT, 0.4, beta, lay, DEFAULT_SCORE)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits, cache = lm._run_prefill(session, ids, last_only=True)
    token = int(logits[-1].argmax())
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    tok = lm._active.set(session)
    try:
        with torch.inference_mode():
            for _ in range(n_new - 1):
                step_logits, cache = lm._forward(torch.tensor([[token]], device=lm.device), cache, last_only=True)
                token = int(step_logits[-1].argmax())
    finally:
        lm._active.reset(tok)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    sel = (getattr(session, "select_s", 0.0) + getattr(session, "gather_s", 0.0)) * 1e3
    compact = getattr(session, "compact", {})
    ffn_bytes = sum((compact.get(i) or d).nbytes() for i, d in enumerate(lm.adapter.dense))
    compact_bytes = sum(w.nbytes() for w in compact.values())
    return {"prefill_ms": (t1 - t0) * 1e3, "select_gather_ms": sel, "decode_tok_s": (n_new - 1) / (t2 - t1),
            "ffn_bytes_per_token": ffn_bytes, "compact_ffn_mb": compact_bytes / 2**20, "prompt_tokens": ids.shape[1]}


def run_bench(lm, betas=(0.2, 0.4, 0.6), layers=None, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Dense and stability-guided sparse at each beta; medians over ``repeats`` after a warm-up."""
    configs = [("dense", 1.0)] + [("stability", b) for b in betas]
    rows = []
    for method, beta in configs:
        _one_run(lm, method, beta, layers, min(new_tokens, 4))  # warm-up
        runs = [_one_run(lm, method, beta, layers, new_tokens) for _ in range(repeats)]
        row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        lay = lm.resolve_layers(layers)
        row.update(method=method, beta=beta,
                   kept_fraction=1.0 if method == "dense" else lm.kept_fraction(lay, kept_count(beta, lm.adapter.n_neurons)))
        rows.append(row)
    dense = rows[0]
    for r in rows:
        r["decode_speedup_vs_dense"] = r["decode_tok_s"] / dense["decode_tok_s"]
        r["ffn_bytes_ratio_vs_dense"] = r["ffn_bytes_per_token"] / dense["ffn_bytes_per_token"]
    return {
        "model": lm.loaded.name,
        "device": str(lm.device),
        "device_name": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(lm.loaded.dtype).replace("torch.", ""),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "layers": f"{lm.resolve_layers(layers).start}:{lm.resolve_layers(layers).stop}",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    head = (f"model {result['model']} on {result['device']} ({result['device_name']}, {result['torch_threads']} threads), "
            f"{result['dtype']}, sparse layers {result['layers']}, {result['new_tokens']} new tokens, "
            f"median of {result['repeats']}; peak RSS {result['peak_rss_mb']:.0f} MB")
    cols = ["method", "beta", "kept_fraction", "prefill_ms", "select_gather_ms", "decode_tok_s",
            "decode_speedup_vs_dense", "ffn_bytes_ratio_vs_dense", "compact_ffn_mb"]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
