"""Does an L2 prefetch of weight rows pay on this GPU? The probe behind docs/benchmarks.md's "L2 prefetch" section.

    python -m benchmarks.l2_prefetch_probe [--mb 32] [--out probe.json]

A buffer of ``--mb`` MB of 8 KB rows (bf16, 4096 columns: the decode step's row) is read by a GEMV-like kernel
(one program per row). Timed with CUDA events after an L2 flush (a 512 MB read), median of 10:

* the read alone, from DRAM (cold) and again straight after a first read (warm: what L2 can give);
* the prefetch kernel alone, bulk (``cp.async.bulk.prefetch.L2``) and per line (``prefetch.global.L2``), with
  32 or 4 rows per program: if its time grows with the bytes, its programs wait for their prefetches;
* prefetch, a 50 us pause, then the read: how much of the prefetched data the read finds in L2;
* prefetch then read back to back: the pair against the cold read alone.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl

K = 4096


@triton.jit
def _read_rows(w_ptr, out_ptr, K: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    x = tl.load(w_ptr + r * K + tl.arange(0, K)).to(tl.float32)
    tl.store(out_ptr + r, tl.sum(x, axis=0))


@triton.jit
def _prefetch(w_ptr, n_rows, K: tl.constexpr, PER: tl.constexpr, LINES: tl.constexpr):
    """Rows [pid * PER, pid * PER + PER) into L2, one row per thread: Hopper's bulk prefetch (one instruction per
    row) or, with LINES, one ``prefetch.global.L2`` per 128-byte line. A hint: no data comes back. (The step's
    form of this, which took the next GEMV's core rows, is in commit cda9073.)"""
    t = tl.arange(0, 128)
    rows = tl.program_id(0) * PER + t
    ok = ((t < PER) & (rows < n_rows)).to(tl.int32)
    ptrs = w_ptr + rows.to(tl.int64) * K
    if LINES:
        for j in tl.static_range(0, K * 2 // 128):
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [ptrs + j * 64, ok], dtype=tl.int32, is_pure=False, pack=1)
    else:
        nbytes = tl.full(ptrs.shape, K * 2, tl.int32)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [ptrs, ok, nbytes], dtype=tl.int32, is_pure=False, pack=1)


def _time(fn, flush, repeats=10, pause_cycles=0, before=None):
    times = []
    for _ in range(repeats):
        flush()
        if before is not None:
            before()
            if pause_cycles:
                torch.cuda._sleep(pause_cycles)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def probe(mb: int = 32) -> dict:
    rows = mb * 2 ** 20 // (K * 2)
    w = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(rows, device="cuda", dtype=torch.float32)
    junk = torch.empty(512 * 2 ** 20 // 4, device="cuda", dtype=torch.float32)

    def flush():
        junk.add_(1.0)  # 512 MB read and written: nothing of w stays in L2

    def read():
        _read_rows[(rows,)](w, out, K=K, num_warps=4)

    def prefetch(per, lines):
        return lambda: _prefetch[(triton.cdiv(rows, per),)](w, rows, K=K, PER=per, LINES=lines, num_warps=4)

    read()
    torch.cuda.synchronize()
    res = {"mb": mb, "rows": rows, "read_cold_us": _time(read, flush)}
    res["read_warm_us"] = _time(read, lambda: (flush(), read()))
    for lines in (False, True):
        for per in (32, 4):
            name = f"{'lines' if lines else 'bulk'}_per{per}"
            pf = prefetch(per, lines)
            pf()
            torch.cuda.synchronize()
            res[f"{name}_prefetch_alone_us"] = _time(pf, flush)
            res[f"{name}_read_after_pause_us"] = _time(read, flush, pause_cycles=100_000, before=pf)
            res[f"{name}_prefetch_then_read_us"] = _time(lambda: (pf(), read()), flush)
    gb = rows * K * 2 / 1e9
    res["read_cold_gb_s"] = gb / res["read_cold_us"] * 1e6
    res["read_warm_gb_s"] = gb / res["read_warm_us"] * 1e6
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = probe(args.mb)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
