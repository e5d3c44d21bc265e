"""Core-neuron statistics of all sparse layers of one prompt in three Triton launches, no host sync.

``selection.layer_statistics`` calls this for CUDA tensors; it computes exactly what the PyTorch
definition there computes (``tests/runtime`` check both on random inputs with ties, on CPU through
Triton's interpreter). For activations ``acts`` (L, T, I) (any float dtype) and score ``s`` (the value, or
its magnitude):

1. ``_active_kernel``, one program per (layer, token): the token's number of active neurons (s > 0);
   then ``_token_k_kernel``, one program per layer: k_token = ``selection.token_k`` (ceil(alpha * mean)).
2. ``_threshold_kernel``, one program per (layer, token): the token's k_token-th largest score as an
   integer key (the bits of a positive float order like its value), by bisection on the key bits
   (15 steps for bf16, 18 for fp16, 31 for fp32), and where several neurons share that score, the index of
   the last one still taken (a stable sort takes equal scores lowest index first). Stored: (key, last index).
   A token with at most k_token active neurons takes all of them.
3. ``_column_kernel``, one program per (layer, block of neurons): walks the tokens in order 0..T-1, adds
   ``s`` in float64 (the same order as ``selection.ordered_token_sum``, so the sums are bit-identical) and
   counts the tokens whose mask holds the neuron: key > threshold, or key == threshold and index <= last.

Each launch reads the activations once: ~3 x L x T x I x 2 bytes in all (bf16). Then ``_top_kernel``, one
program per layer, picks the kept neurons by (count desc, sum desc, index asc) without sorting and writes
them in ascending order (``select``: the whole ``stability_select_layers`` on the device).

The activations may be a padded buffer (L, N, I) whose first T rows are the prompt, T read on the device
(``n_tokens``): the captured prefill's graph selects the core sets after its last layer for a prompt of any
length in its bucket, and ``_top_kernel`` writes them straight into the decode's index buffer (``out``).
"""

from __future__ import annotations

import os
import struct

import torch
import triton
import triton.language as tl

SCORE_POSITIVE, SCORE_MAGNITUDE = 0, 1
_SHIFT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}  # zero low bits of a widened key


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(acts: torch.Tensor) -> bool:
    return acts.dtype in _SHIFT and acts.shape[-1] < 2 ** 20


@triton.jit
def _key(v, SCORE: tl.constexpr):
    """Integer key of a score: its float32 bits where the score is > 0 (monotone in the value), else 0."""
    s = v.to(tl.float32)
    if SCORE == 1:
        s = tl.abs(s)
    return tl.where(s > 0, s.to(tl.int32, bitcast=True), 0)


@triton.jit
def _row_start(a_ptr, row, N, I, stride_l):
    """Row ``row`` (= layer * N + token) of activations with N rows per layer, the layers ``stride_l`` elements
    apart."""
    return a_ptr + (row // N) * stride_l + (row % N) * I


@triton.jit
def _token_count(t_ptr, N, DEVICE_T: tl.constexpr):
    """The prompt's number of tokens: all ``N`` rows, or (``DEVICE_T``) the int at ``t_ptr``, read on the device."""
    n = N
    if DEVICE_T:
        n = tl.load(t_ptr).to(tl.int32)
    return n


@triton.jit
def _active_kernel(a_ptr, n_ptr, t_ptr, N, I, stride_l, BLOCK: tl.constexpr, SCORE: tl.constexpr,
                   DEVICE_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if row % N < _token_count(t_ptr, N, DEVICE_T):  # rows past the prompt (a padded bucket) are never read
        cols = tl.arange(0, BLOCK)
        v = tl.load(_row_start(a_ptr, row, N, I, stride_l) + cols, mask=cols < I, other=0.0)
        tl.store(n_ptr + row, tl.sum((_key(v, SCORE) > 0).to(tl.int32), axis=0))


@triton.jit
def _token_k_kernel(n_ptr, k_ptr, t_ptr, alpha_bits, N, I, TB: tl.constexpr, INTERPRET: tl.constexpr,
                    DEVICE_T: tl.constexpr):
    """Per layer (one program each): k_token = min(I, ceil(alpha * (sum of the T active counts) / T)) in float64
    with correctly rounded operations: ``selection.token_k``, bit for bit, in one launch. alpha arrives as the
    int64 bits of its float64 (a float argument would be rounded to float32)."""
    layer = tl.program_id(0).to(tl.int64)
    n_tok = _token_count(t_ptr, N, DEVICE_T)
    total = tl.zeros([TB], dtype=tl.int64)
    if INTERPRET:
        t0 = 0
        while t0 < n_tok:
            t = t0 + tl.arange(0, TB)
            total += tl.load(n_ptr + layer * N + t, mask=t < n_tok, other=0).to(tl.int64)
            t0 += TB
    else:
        for t0 in range(0, n_tok, TB):
            t = t0 + tl.arange(0, TB)
            total += tl.load(n_ptr + layer * N + t, mask=t < n_tok, other=0).to(tl.int64)
    mean = tl.sum(total, axis=0).to(tl.float64) / n_tok  # float64 division is IEEE (correctly rounded)
    k = tl.math.ceil(mean * alpha_bits.to(tl.float64, bitcast=True)).to(tl.int64)
    tl.store(k_ptr + layer, tl.minimum(k, I))


@triton.jit
def _threshold_kernel(a_ptr, n_ptr, k_ptr, thr_ptr, last_ptr, t_ptr, N, I, stride_l,
                      BLOCK: tl.constexpr, SCORE: tl.constexpr, SHIFT: tl.constexpr, NBITS: tl.constexpr,
                      DEVICE_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if row % N < _token_count(t_ptr, N, DEVICE_T):
        layer = row // N
        cols = tl.arange(0, BLOCK)
        v = tl.load(_row_start(a_ptr, row, N, I, stride_l) + cols, mask=cols < I, other=0.0)
        key = _key(v, SCORE) >> SHIFT  # exact: the low SHIFT bits of a widened bf16/fp16 value are zero
        k = tl.load(k_ptr + layer).to(tl.int32)
        n_active = tl.load(n_ptr + row)
        # largest t with #(key >= t) >= k, built bit by bit from the top (one block reduction per bit: most of
        # this kernel's time; two bits per step packed in one int64 sum, and 8 or 32 warps, measured slower:
        # run "tune-1")
        thr = 0
        for b in tl.static_range(NBITS):
            cand = thr | (1 << (NBITS - 1 - b))
            c = tl.sum((key >= cand).to(tl.int32), axis=0)
            thr = tl.where(c >= k, cand, thr)
        thr, last = _threshold_ties(key, cols, thr, k, n_active)
        tl.store(thr_ptr + row, thr)
        tl.store(last_ptr + row, last)


@triton.jit
def _threshold_ties(key, cols, thr, k, n_active):
    """(threshold, index of the last neuron taken among those equal to it) for a row whose k-th largest key is
    ``thr``; (0, -1) where the row has at most k active neurons."""
    n_gt = tl.sum((key > thr).to(tl.int32), axis=0)
    eq = (key == thr).to(tl.int32)
    rank_eq = tl.cumsum(eq, axis=0)  # 1-based rank among the equal keys, by index (cheaper than bisection on it)
    last = tl.max(tl.where((eq > 0) & (rank_eq <= k - n_gt), cols, -1), axis=0)
    take_all = n_active <= k  # every active neuron is core (this covers k == 0: no active neuron)
    return tl.where(take_all, 0, thr), tl.where(take_all, -1, last)


@triton.jit
def _column_step(a_row, thr_ptr, last_ptr, cols, ok, cnt, acc, SCORE: tl.constexpr, SHIFT: tl.constexpr):
    v = tl.load(a_row, mask=ok, other=0.0).to(tl.float32)
    s = v
    if SCORE == 1:
        s = tl.abs(v)
    acc += s.to(tl.float64)
    key = tl.where(s > 0, s.to(tl.int32, bitcast=True), 0) >> SHIFT
    thr = tl.load(thr_ptr)
    last = tl.load(last_ptr)
    core = (key > thr) | ((key == thr) & (cols <= last) & (key > 0))
    return cnt + core.to(tl.int32), acc


@triton.jit
def _column_kernel(a_ptr, thr_ptr, last_ptr, cnt_ptr, sum_ptr, t_ptr, N, I, stride_l,
                   BLOCK_C: tl.constexpr, SCORE: tl.constexpr, SHIFT: tl.constexpr, INTERPRET: tl.constexpr,
                   DEVICE_T: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < I
    cnt = tl.zeros([BLOCK_C], dtype=tl.int32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float64)
    base = a_ptr + layer * stride_l + cols
    row0 = layer * N
    n_tok = _token_count(t_ptr, N, DEVICE_T)
    if INTERPRET:  # Triton's interpreter cannot bound a for loop by a run-time int (numpy 2); same steps
        t = 0
        while t < n_tok:
            cnt, acc = _column_step(base + t * I, thr_ptr + row0 + t, last_ptr + row0 + t, cols, ok, cnt, acc,
                                    SCORE, SHIFT)
            t += 1
    else:  # tokens strictly in order (the float64 sum's order is part of the definition)
        for t in range(0, n_tok):
            cnt, acc = _column_step(base + t * I, thr_ptr + row0 + t, last_ptr + row0 + t, cols, ok, cnt, acc,
                                    SCORE, SHIFT)
    tl.store(cnt_ptr + layer * I + cols, cnt, mask=ok)
    tl.store(sum_ptr + layer * I + cols, acc, mask=ok)


def _row_warps(block: int) -> int:
    return max(4, min(16, block // 1024))


def _threshold_regs(block: int, warps: int) -> dict:
    """The threshold kernel's launch options: at 16 warps and 32 keys a thread (I in (8192, 16384]), at most 64
    registers a thread, two programs an SM instead of one (127 registers uncapped): 586 vs 729 us for 32 layers
    x 256 tokens x 14336 neurons, the same thresholds (benchmarks/threshold_ab.py, run h200-38). Elsewhere not
    measured: uncapped."""
    return {"maxnreg": 64} if (warps == 16 and block == 16384 and not _interpreting()) else {}


def _check_n_tokens(n_tokens: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """The pointer the kernels read the token count from: ``n_tokens``, or (unused) any tensor of the device."""
    if n_tokens is None:
        return a
    if n_tokens.numel() != 1 or n_tokens.dtype not in (torch.int32, torch.int64) or n_tokens.device != a.device:
        raise ValueError(f"n_tokens must be one int32/int64 on {a.device}, got {n_tokens.numel()} x {n_tokens.dtype} "
                         f"on {n_tokens.device}")
    return n_tokens


def _token_budgets(a: torch.Tensor, alpha: float, code: int, t_ptr: torch.Tensor, device_t: bool,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(active neurons per (layer, row) (L*N,) int32, k_token per layer (L,) int64) of ``a`` (L, N, I), each
    layer's (N, I) block contiguous: the two launches before the threshold search."""
    L, N, I = a.shape
    block = triton.next_power_of_2(I)
    n_active = torch.empty(L * N, dtype=torch.int32, device=a.device)
    _active_kernel[(L * N,)](a, n_active, t_ptr, N, I, a.stride(0), BLOCK=block, SCORE=code, DEVICE_T=device_t,
                             num_warps=_row_warps(block))
    k_tok = torch.empty(L, dtype=torch.int64, device=a.device)
    alpha_bits = struct.unpack("<q", struct.pack("<d", float(alpha)))[0]  # no host-to-device copy: no sync
    _token_k_kernel[(L,)](n_active, k_tok, t_ptr, alpha_bits, N, I, TB=min(1024, triton.next_power_of_2(N)),
                          INTERPRET=_interpreting(), DEVICE_T=device_t, num_warps=4)
    return n_active, k_tok


def layer_statistics(acts: torch.Tensor, alpha: float, score: str, block_c: int = 128,
                     col_warps: int = 4, as_int64: bool = True,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None,
                     n_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts (L, I) int64, sums (L, I) float64) of ``acts`` (L, T, I); see the module doc. ``out``: contiguous
    (counts int32, sums float64) written in place (int64 counts are computed in int32 and copied). Each
    layer's (T, I) block must be contiguous, the layers may lie apart (the first T rows of a longer buffer).
    ``n_tokens`` (one int on the device, in [1, T]): only that many leading rows of each layer are the prompt,
    the rest padding, never read."""
    L, N, I = acts.shape
    a = acts if (acts.stride(2) == 1 and acts.stride(1) == I) else acts.contiguous()
    stride_l = a.stride(0)
    code = SCORE_MAGNITUDE if score == "magnitude" else SCORE_POSITIVE
    shift = _SHIFT[a.dtype]
    block = triton.next_power_of_2(I)
    warps = _row_warps(block)
    dev = a.device
    t_ptr, device_t = _check_n_tokens(n_tokens, a), n_tokens is not None
    n_active, k_tok = _token_budgets(a, alpha, code, t_ptr, device_t)
    thr = torch.empty(L * N, dtype=torch.int32, device=dev)
    last = torch.empty(L * N, dtype=torch.int32, device=dev)
    _threshold_kernel[(L * N,)](a, n_active, k_tok, thr, last, t_ptr, N, I, stride_l, BLOCK=block, SCORE=code,
                                SHIFT=shift, NBITS=31 - shift, DEVICE_T=device_t, num_warps=warps,
                                **_threshold_regs(block, warps))
    given = out is not None and out[0].dtype == torch.int32
    counts = out[0] if given else torch.empty(L, I, dtype=torch.int32, device=dev)
    sums = out[1] if out is not None else torch.empty(L, I, dtype=torch.float64, device=dev)
    _column_kernel[(L, triton.cdiv(I, block_c))](a, thr, last, counts, sums, t_ptr, N, I, stride_l,
                                                 BLOCK_C=block_c, SCORE=code, SHIFT=shift,
                                                 INTERPRET=_interpreting(), DEVICE_T=device_t, num_warps=col_warps)
    if out is not None:
        if not given:
            out[0].copy_(counts)
        return out
    return (counts.to(torch.int64) if as_int64 else counts), sums


@triton.jit
def _top_kernel(cnt_ptr, sum_ptr, out_ptr, out_stride, I, K, BLOCK: tl.constexpr, CBITS: tl.constexpr):
    """One program per layer: the K best neurons by (count desc, float64 sum desc, index asc), written in
    ascending index order; = ``selection.top_neurons(counts, K, sums)`` without sorting: the K-th best count
    by bisection, then among the neurons with that count the R-th best sum (bisection on its order-preserving
    int64 key), then the lowest indices among full ties; the output positions come from a prefix sum."""
    layer = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < I
    c = tl.load(cnt_ptr + layer * I + cols, mask=ok, other=-1)  # padding never selected (counts >= 0)
    thr_c = 0
    for b in tl.static_range(CBITS):
        cand = thr_c | (1 << (CBITS - 1 - b))
        thr_c = tl.where(tl.sum((c >= cand).to(tl.int32), axis=0) >= K, cand, thr_c)
    above = c > thr_c
    r = K - tl.sum(above.to(tl.int32), axis=0)  # >= 1 neurons still to take among count == thr_c
    eq = c == thr_c
    bits = tl.load(sum_ptr + layer * I + cols, mask=ok, other=0.0).to(tl.int64, bitcast=True)
    key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)  # signed int64, same order as the float64 (no -0.0, NaN)
    neg_min = -9223372036854775807 - 1
    base = tl.where(tl.sum((eq & (key >= 0)).to(tl.int32), axis=0) >= r, 0, neg_min)
    for b in tl.static_range(63):
        cand = base | (1 << (62 - b))
        base = tl.where(tl.sum((eq & (key >= cand)).to(tl.int32), axis=0) >= r, cand, base)
    better = eq & (key > base)
    r2 = r - tl.sum(better.to(tl.int32), axis=0)
    tie = eq & (key == base)
    sel = above | better | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= r2))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + layer * out_stride + pos, cols.to(out_ptr.dtype.element_ty), mask=sel)


def top_neurons(counts: torch.Tensor, sums: torch.Tensor, k: int, max_count: int,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """(L, k) int64 ascending: per row the k best neurons by (count desc, sum desc, index asc); the counts
    lie in [0, max_count] (the number of tokens). ``out`` (L, >= k) int32 or int64, rows contiguous: written
    in its first k columns (the decode's index buffer), which are returned."""
    L, I = counts.shape
    if not 1 <= k <= I:
        raise ValueError(f"k must be in [1, {I}], got {k}")
    if out is None:
        out = torch.empty(L, k, dtype=torch.int64, device=counts.device)
    elif (out.dim() != 2 or out.shape[0] != L or out.shape[1] < k or out.stride(1) != 1
          or out.dtype not in (torch.int32, torch.int64) or out.device != counts.device):
        raise ValueError(f"out must be ({L}, >= {k}) int32/int64 with contiguous rows on {counts.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    block = triton.next_power_of_2(I)
    _top_kernel[(L,)](counts.to(torch.int32).contiguous(), sums.to(torch.float64).contiguous(), out, out.stride(0),
                      I, k, BLOCK=block, CBITS=max(1, int(max_count).bit_length()), num_warps=_row_warps(block))
    return out[:, :k]


def select(acts: torch.Tensor, alpha: float, score: str, k: int, n_tokens: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``selection.stability_select_layers`` of ``acts`` (L, T, I): five launches, no host synchronisation.
    ``n_tokens``: of the first n_tokens rows only (``layer_statistics``); ``out``: into it (``top_neurons``)."""
    counts, sums = layer_statistics(acts, alpha, score, as_int64=False, n_tokens=n_tokens)
    return top_neurons(counts, sums, k, acts.shape[1], out=out)
