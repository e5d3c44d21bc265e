"""The compact down buffer's gather (``FastLM._gather_compact``, the product's: the core columns of the (H, I) down
projection by ``index_select`` along dim 1, then a copy into the padded (H, kp) buffer) against three other forms:
the core rows of the row-major (I, H) copy transposed into it; one Triton pass gathering the columns directly
into it ("direct"); one Triton pass reading the rows whole (coalesced) and storing each kept column at its rank
("ranked"). The gate||up rows' gather beside them for scale.

    python -m benchmarks.gather_ab --out DIR [--forms columns,transposed_rows,direct,ranked]
        (GPU machine, repo root, after scripts/gpu_run.sh's setup; DIR/gather_ab.json)
    TRITON_INTERPRET=1 python -m benchmarks.gather_ab --check   (CPU: every form gives the same buffer)

One Llama-3.1-8B layer (H 4096, I 14336, bf16), kept 0.2 / 0.4 / 0.6 (sorted random core sets), each form timed
alone with CUDA events, A B A B, median of 20 (after two warm-ups); the forms' buffers compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import triton
import triton.language as tl


@triton.jit
def _direct_kernel(src_ptr, idx_ptr, out_ptr, H, I, K, out_stride, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok_c = cols < K
    idx = tl.load(idx_ptr + cols, mask=ok_c, other=0)
    ok = (rows[:, None] < H) & ok_c[None, :]
    r = rows[:, None].to(tl.int64)
    v = tl.load(src_ptr + r * I + idx[None, :], mask=ok)
    tl.store(out_ptr + r * out_stride + cols[None, :], v, mask=ok)


@triton.jit
def _ranked_kernel(src_ptr, pos_ptr, out_ptr, H, I, out_stride, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_r = rows[:, None] < H
    ok_c = cols < I
    p = tl.load(pos_ptr + cols, mask=ok_c, other=-1)
    r = rows[:, None].to(tl.int64)
    v = tl.load(src_ptr + r * I + cols[None, :], mask=ok_r & ok_c[None, :])
    tl.store(out_ptr + r * out_stride + p[None, :], v, mask=ok_r & (p >= 0)[None, :])


def forms(down: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> dict:
    """{name: a function filling out[:, :k] with down[:, idx]}."""
    H, I = down.shape
    k = idx.numel()
    down_t = down.t().contiguous()
    pos = torch.full((I,), -1, dtype=torch.int32, device=down.device)

    def columns():
        out[:, :k].copy_(down.index_select(1, idx))

    def transposed_rows():
        out[:, :k].copy_(down_t.index_select(0, idx).t())

    def direct():
        _direct_kernel[(triton.cdiv(H, 16), triton.cdiv(k, 256))](down, idx, out, H, I, k, out.stride(0), BLOCK_H=16,
                                                                  BLOCK_K=256, num_warps=4)

    def ranked():
        pos.fill_(-1)
        pos.scatter_(0, idx, torch.arange(k, dtype=torch.int32, device=down.device))
        _ranked_kernel[(triton.cdiv(H, 16), triton.cdiv(I, 256))](down, pos, out, H, I, out.stride(0), BLOCK_H=16,
                                                                  BLOCK_C=256, num_warps=4)

    return {"columns": columns, "transposed_rows": transposed_rows, "direct": direct, "ranked": ranked}


def check() -> None:
    g = torch.Generator().manual_seed(4)
    for H, I, k in [(5, 37, 11), (33, 300, 257), (16, 1000, 513), (3, 600, 600)]:
        down = torch.randn(H, I, generator=g).to(torch.bfloat16)
        idx = torch.randperm(I, generator=g)[:k].sort().values
        for name in ("columns", "transposed_rows", "direct", "ranked"):
            out = torch.full((H, k + 7), 9.0, dtype=torch.bfloat16)
            forms(down, idx, out)[name]()
            assert torch.equal(out[:, :k], down[:, idx]) and bool((out[:, k:] == 9).all()), (name, H, I, k)
    print("gather forms equal: passed")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu-out")
    ap.add_argument("--forms", default="columns,transposed_rows,direct,ranked")
    ap.add_argument("--check", action="store_true", help="only compare the forms (CPU under the interpreter)")
    args = ap.parse_args(argv)
    if args.check:
        check()
        return 0
    from .gpu_suite import _event_ms

    names = [n for n in args.forms.split(",") if n]
    H, I = 4096, 14336
    g = torch.Generator(device="cuda").manual_seed(0)
    down = torch.randn(H, I, device="cuda", generator=g).to(torch.bfloat16)
    up = torch.randn(2 * I, H, device="cuda", generator=g).to(torch.bfloat16)
    rows = []
    for beta in (0.2, 0.4, 0.6):
        k = round(beta * I)
        idx = torch.randperm(I, device="cuda", generator=g)[:k].sort().values
        kp = -(-k // 64) * 64
        outs = {n: torch.zeros(H, kp, device="cuda", dtype=down.dtype) for n in names}
        fns = {n: forms(down, idx, outs[n])[n] for n in names}
        c_up = torch.zeros(2 * kp, H, device="cuda", dtype=up.dtype)

        def up_rows():
            torch.index_select(up, 0, idx, out=c_up[:k])
            torch.index_select(up, 0, idx + I, out=c_up[kp:kp + k])

        fns["up_rows"] = up_rows
        times = {n: [] for n in fns}
        for _ in range(2):
            for name, fn in fns.items():
                times[name].append(_event_ms(fn, reps=20))
        first = outs[names[0]]
        row = {"beta": beta, "k": k, "equal": all(torch.equal(first, o) for o in outs.values()),
               "ms": {n: statistics.median(v) for n, v in times.items()}, "runs_ms": times,
               "down_mb": H * k * 2 / 1e6, "up_mb": 2 * k * H * 2 / 1e6}
        rows.append(row)
        print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gather_ab.json").write_text(json.dumps({"shape": [H, I], "dtype": "bfloat16", "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
