"""Where the one-launch decode step's time goes: each kind of task alone (its inputs marked ready, so no task
waits), against the whole step, on the Llama-3.1-8B shape (bf16, random weights).

    python -m benchmarks.megakernel_phases --out DIR      (GPU; writes DIR/megakernel_phases.json)

A kind alone runs at the rate the task machinery streams its weights; the whole step minus the sum of the
kinds alone is what the waits between phases cost.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from coreinfer.runtime.cuda import bench
from coreinfer.runtime.cuda.fastlm import GREEDY, FastWeights

KINDS = ("qkv", "attention", "o", "gate_up", "down", "lm_head")


def _time_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        total += a.elapsed_time(b)
    return total / reps


def phases(weights, ids, beta, config=None) -> dict:
    step = {"megakernel": True, **({"megakernel_config": config} if config else {})}
    fast = bench.step_variant(weights, step, max_seq_len=ids.numel() + 64, kept_fraction=beta)
    fast.generate(ids, 4)
    mega, w = fast._mega, fast.w
    T = ids.numel()
    graph = fast._graphs[GREEDY][0]

    def whole():
        fast._pos.fill_(T)
        graph.replay()

    rows = {"beta": beta, "config": mega.config, "programs": mega.grid, "tasks": mega.total,
            "whole_step_ms": _time_ms(whole) - _time_ms(lambda: fast._pos.fill_(T))}
    L, H, esz = mega.L, mega.H, w.dtype.itemsize
    n_ph = 5 * L + 1
    saved = mega.bounds.clone(), mega.total
    counts = (saved[0][1:n_ph + 1] - saved[0][:n_ph]).tolist()
    ks = [fast.layer_k.get(li, mega.I) if fast.indexed else mega.I for li in range(L)]
    nbytes = {"qkv": L * mega.nqkv * H * esz, "attention": 0, "o": L * H * mega.nq * esz,
              "gate_up": sum(2 * k * H * esz for k in ks), "down": sum(k * H * esz for k in ks),
              "lm_head": w.vocab * H * esz}
    kinds = []
    for kind, name in enumerate(KINDS):
        keep = [c if (p == n_ph - 1 if kind == 5 else (p < n_ph - 1 and p % 5 == kind)) else 0
                for p, c in enumerate(counts)]
        b = torch.tensor([0] + keep, dtype=torch.int64).cumsum(0)
        mega.bounds.fill_(2 ** 31 - 1)
        mega.bounds[:n_ph + 1] = b.to(torch.int32).to(mega.bounds.device)
        mega.total = int(b[-1])

        def alone():
            mega.cnt.fill_(2 ** 30)  # every input counted ready; the launch's last program zeroes them again
            mega.cnt[:2] = 0  # tickets, exits
            fast._pos.fill_(T)
            mega(False, True)

        ms = _time_ms(alone) - _time_ms(lambda: (mega.cnt.fill_(2 ** 30), mega.cnt[:2].zero_(), fast._pos.fill_(T)))
        kinds.append({"kind": name, "tasks": mega.total, "ms": ms, "weight_bytes": nbytes[name],
                      "gb_s": nbytes[name] / ms / 1e6 if nbytes[name] else None})
    mega.bounds.copy_(saved[0])
    mega.total = saved[1]
    rows["kinds"] = kinds
    rows["sum_kinds_ms"] = sum(k["ms"] for k in kinds)
    rows["waits_ms"] = rows["whole_step_ms"] - rows["sum_kinds_ms"]
    rows["bytes_per_token"] = fast.bytes_per_token()
    del fast
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="[null]", help="JSON list of megakernel configs (null: the default)")
    args = ap.parse_args(argv)
    model, tok = bench.build_shape_model("llama-3.1-8b", torch.bfloat16)
    ids = bench.bench_prompt(tok, model.get_input_embeddings().weight.shape[0]).cuda()
    weights = FastWeights.from_hf(model)
    del model
    result = {"copy_bandwidth_gb_s": bench.copy_bandwidth() / 1e9, "rows": []}
    for config in json.loads(args.configs):
        for beta in (0.4, None):
            row = phases(weights, ids, beta, tuple(config) if config else None)
            print(json.dumps(row), flush=True)
            result["rows"].append(row)
            torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "megakernel_phases.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
