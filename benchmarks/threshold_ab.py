"""The per-token threshold of the core-set selection: bisection on the key bits (``select_kernels.
_threshold_kernel``, one block reduction per bit) against a search by thirds that counts two candidates per
reduction, packed in one int32 sum (``_threshold_thirds_kernel`` below: 10 reductions instead of 15 for bf16),
and the bisection compiled with at most 64 registers a thread (two 16-warp programs an SM instead of one; the
product's kernel since run h200-38, ``select_kernels._threshold_regs``; "bisection" here is uncapped).

    python -m benchmarks.threshold_ab --out DIR      (GPU machine, repo root; DIR/threshold_ab.json)
    TRITON_INTERPRET=1 python -m benchmarks.threshold_ab --check   (CPU: the two give the same thresholds)

The selection profile's activations (32 layers x 256 tokens x 14336 neurons, bf16, magnitude score): the
thresholds and tie indices of both kernels compared, then each kernel timed alone in a CUDA graph, A B A B.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl

from coreinfer.runtime.cuda import select_kernels as sk


def thirds_steps(nbits: int) -> int:
    """Reductions until the search by thirds has narrowed [0, 2**nbits) to one key (worst case)."""
    span, steps = 1 << nbits, 0
    while span > 1:
        a, b = max(span // 3, 1), max(2 * span // 3, 1)
        span, steps = max(a, b - a, span - b), steps + 1
    return steps


@triton.jit
def _threshold_thirds_kernel(a_ptr, n_ptr, k_ptr, thr_ptr, last_ptr, T, I, stride_l,
                             BLOCK: tl.constexpr, SCORE: tl.constexpr, SHIFT: tl.constexpr, NBITS: tl.constexpr,
                             STEPS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    layer = row // T
    cols = tl.arange(0, BLOCK)
    v = tl.load(sk._row_start(a_ptr, row, T, I, stride_l) + cols, mask=cols < I, other=0.0)
    key = sk._key(v, SCORE) >> SHIFT
    k = tl.load(k_ptr + layer).to(tl.int32)
    n_active = tl.load(n_ptr + row)
    # the largest t with #(key >= t) >= k lies in [lo, hi): #(key >= lo) >= k > #(key >= hi)
    lo = 0
    hi = 1 << NBITS
    for _ in tl.static_range(STEPS):
        span = hi - lo
        c1 = lo + tl.maximum(span // 3, 1)
        c2 = lo + tl.maximum((2 * span) // 3, 1)
        packed = tl.sum(tl.where(key >= c2, 65537, tl.where(key >= c1, 1, 0)), axis=0)  # BLOCK < 2**16
        n1 = packed & 0xFFFF
        n2 = packed >> 16
        new_lo = tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, lo))
        hi = tl.where(n2 >= k, hi, tl.where(n1 >= k, c2, c1))
        lo = new_lo
    thr, last = sk._threshold_ties(key, cols, lo, k, n_active)
    tl.store(thr_ptr + row, thr)
    tl.store(last_ptr + row, last)


def thresholds(acts: torch.Tensor, alpha: float, score: str, thirds: bool, maxnreg: int | None = None):
    """(thr, last) of every (layer, token) row by one of the two kernels, after the two launches before it;
    ``maxnreg``: the bisection's register cap (Triton launch option)."""
    L, T, I = acts.shape
    code = sk.SCORE_MAGNITUDE if score == "magnitude" else sk.SCORE_POSITIVE
    shift, block = sk._SHIFT[acts.dtype], triton.next_power_of_2(I)
    warps = sk._row_warps(block)
    n_active, k_tok = sk._token_budgets(acts, alpha, code, acts, False)
    thr = torch.empty(L * T, dtype=torch.int32, device=acts.device)
    last = torch.empty_like(thr)

    def launch():
        if thirds:
            _threshold_thirds_kernel[(L * T,)](acts, n_active, k_tok, thr, last, T, I, T * I, BLOCK=block, SCORE=code,
                                               SHIFT=shift, NBITS=31 - shift, STEPS=thirds_steps(31 - shift),
                                               num_warps=warps)
        else:
            cap = {} if maxnreg is None else {"maxnreg": maxnreg}
            sk._threshold_kernel[(L * T,)](acts, n_active, k_tok, thr, last, acts, T, I, T * I, BLOCK=block,
                                           SCORE=code, SHIFT=shift, NBITS=31 - shift, DEVICE_T=False,
                                           num_warps=warps, **cap)

    launch()
    return thr, last, launch


def check() -> None:
    """Same thresholds and tie indices on adversarial inputs (ties, zeros, all-equal rows), bf16 and fp16."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float16):
        for L, T, I in [(3, 9, 50), (2, 5, 33), (1, 1, 8), (2, 6, 130), (1, 4, 1000)]:
            a = torch.randn(L, T, I, generator=g).to(dtype)
            a[0] = (a[0] * 2).round() / 2
            a[-1, :, : I // 3] = 0.5
            a[-1, -1] = 0.0
            for score in ("positive", "magnitude"):
                for alpha in (0.05, 0.4, 1.0):
                    want = thresholds(a, alpha, score, False)[:2]
                    got = thresholds(a, alpha, score, True)[:2]
                    assert all(torch.equal(x, y) for x, y in zip(want, got)), (dtype, L, T, I, score, alpha)
    print("threshold thirds = bisection: passed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-out")
    ap.add_argument("--check", action="store_true", help="only compare the two kernels (CPU under the interpreter)")
    args = ap.parse_args(argv)
    if args.check:
        check()
        return 0
    from .gpu_suite import _graph_time_us

    torch.manual_seed(0)
    acts = torch.randn(32, 256, 14336, device="cuda").to(torch.bfloat16)
    res = {"shape": [32, 256, 14336], "dtype": "bfloat16", "score": "magnitude", "alpha": 0.4,
           "steps": {"bisection": 15, "thirds": thirds_steps(15)},
           "us": {"bisection": [], "thirds": [], "bisection_maxnreg64": []}}
    a = thresholds(acts, 0.4, "magnitude", False)
    b = thresholds(acts, 0.4, "magnitude", True)
    c = thresholds(acts, 0.4, "magnitude", False, maxnreg=64)
    res["equal"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    res["equal_maxnreg64"] = bool(torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    for _ in range(3):
        for name, (_, _, launch) in (("bisection", a), ("thirds", b), ("bisection_maxnreg64", c)):
            res["us"][name].append(_graph_time_us(lambda i, f=launch: f(), 1))
    res["median_us"] = {k: statistics.median(v) for k, v in res["us"].items()}
    print(json.dumps(res))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "threshold_ab.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
