"""Triton kernels of the decode step's attention block: two launches per layer instead of ~7.

For one new token at position ``pos`` (read from device memory, so a captured CUDA graph replays it
for every position), split-KV ("flash-decoding") attention:

* ``_attn_partial_kernel``, one program per (query head, block of ``BLOCK_S`` cache positions): split the
  fused q||k||v projection, apply RoPE (Hugging Face rotate-half) to q and the new k, and reduce its block
  of keys ``[lo, pos]`` to a partial softmax (max, sum, weighted values) in float32. The new token's k/v
  come from registers; the program whose block holds ``pos`` (first query head of each kv group) writes
  them into the static cache. Cache rows ``>= pos`` are never read, so that write cannot race.
* ``_attn_combine_kernel``, one program per query head: merges the partials of the blocks up to ``pos``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_partial_kernel(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr,
                         scale, window, cache_len, n_blocks,
                         N_KV: tl.constexpr, GROUP: tl.constexpr, HD: tl.constexpr, ROPE: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    start = b * BLOCK_S
    if start <= pos:
        kvh = h // GROUP
        d = tl.arange(0, HD)
        half: tl.constexpr = HD // 2
        partner = (d + half) % HD
        nq = N_KV * GROUP * HD
        q = tl.load(qkv_ptr + h * HD + d).to(tl.float32)
        k = tl.load(qkv_ptr + nq + kvh * HD + d).to(tl.float32)
        v = tl.load(qkv_ptr + nq + N_KV * HD + kvh * HD + d)
        if ROPE:
            cos = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
            sin = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
            sign = tl.where(d < half, -1.0, 1.0)
            q2 = tl.load(qkv_ptr + h * HD + partner).to(tl.float32)
            k2 = tl.load(qkv_ptr + nq + kvh * HD + partner).to(tl.float32)
            q = q * cos + sign * q2 * sin
            k = k * cos + sign * k2 * sin
        k_store = k.to(kc_ptr.dtype.element_ty)
        row = kvh * cache_len * HD
        if (h % GROUP == 0) & (pos < start + BLOCK_S):
            tl.store(kc_ptr + row + pos * HD + d, k_store)
            tl.store(vc_ptr + row + pos * HD + d, v)
        k = k_store.to(tl.float32)  # attend with the value the cache holds
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)  # sliding window (Mistral): keys > pos - window
        s_idx = start + tl.arange(0, BLOCK_S)
        in_cache = (s_idx < pos) & (s_idx >= lo)
        is_new = s_idx == pos
        kb = tl.load(kc_ptr + row + s_idx[:, None] * HD + d[None, :], mask=in_cache[:, None], other=0.0).to(tl.float32)
        vb = tl.load(vc_ptr + row + s_idx[:, None] * HD + d[None, :], mask=in_cache[:, None], other=0.0).to(tl.float32)
        kb = tl.where(is_new[:, None], k[None, :], kb)
        vb = tl.where(is_new[:, None], v.to(tl.float32)[None, :], vb)
        scores = tl.sum(kb * q[None, :], axis=1) * scale
        scores = tl.where(in_cache | is_new, scores, float("-inf"))
        m_b = tl.max(scores, axis=0)
        m_safe = tl.where(m_b == float("-inf"), 0.0, m_b)  # a block wholly outside the window: l = 0
        p = tl.exp(scores - m_safe)
        slot = h * n_blocks + b
        tl.store(m_ptr + slot, m_b)
        tl.store(l_ptr + slot, tl.sum(p, axis=0))
        tl.store(acc_ptr + slot * HD + d, tl.sum(p[:, None] * vb, axis=0))


@triton.jit
def _attn_combine_kernel(pos_ptr, m_ptr, l_ptr, acc_ptr, out_ptr, n_blocks,
                         HD: tl.constexpr, BLOCK_S: tl.constexpr, NB: tl.constexpr):
    h = tl.program_id(0)
    pos = tl.load(pos_ptr).to(tl.int32)
    used = pos // BLOCK_S + 1
    bi = tl.arange(0, NB)
    ok = bi < used
    d = tl.arange(0, HD)
    slot = h * n_blocks + bi
    mb = tl.load(m_ptr + slot, mask=ok, other=float("-inf"))
    m = tl.max(mb, axis=0)  # finite: the block holding pos scores the new token
    w = tl.where(ok, tl.exp(mb - m), 0.0)
    lb = tl.load(l_ptr + slot, mask=ok, other=0.0)
    accb = tl.load(acc_ptr + slot[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0)
    out = tl.sum(w[:, None] * accb, axis=0) / tl.sum(w * lb, axis=0)
    tl.store(out_ptr + h * HD + d, out.to(out_ptr.dtype.element_ty))


MAX_BLOCKS = 256


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def block_size(cache_len: int) -> int:
    """Keys per program: 64, more for long caches so that at most ``MAX_BLOCKS`` partials are merged."""
    bs = 64
    while triton.cdiv(cache_len, bs) > MAX_BLOCKS:
        bs *= 2
    return bs


class DecodeAttention:
    """Scratch for the partials (fixed addresses: graph-capturable), sized for one FastLM's cache."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, cache_len: int, device, window: int | None):
        if not supported(head_dim):
            raise ValueError(f"head_dim {head_dim} is not a power of two >= 16")
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = n_heads, n_kv_heads, head_dim, int(window or 0)
        self.block = block_size(cache_len)
        self.n_blocks = triton.cdiv(cache_len, self.block)
        self.m = torch.empty(n_heads * self.n_blocks, device=device, dtype=torch.float32)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_heads * self.n_blocks * head_dim, device=device, dtype=torch.float32)

    def __call__(self, qkv, cos, sin, k_cache, v_cache, pos, out, scale: float):
        """qkv (nh*hd + 2*nkv*hd,) contiguous; caches (1, nkv, S, hd) contiguous; pos (1,) int64; out (nh*hd,)."""
        rope = cos is not None
        warps = 4 if self.block * self.head_dim <= 8192 else 8
        _attn_partial_kernel[(self.n_heads, self.n_blocks)](
            qkv, cos if rope else qkv, sin if rope else qkv, k_cache, v_cache, pos, self.m, self.l, self.acc,
            scale, self.window, k_cache.shape[2], self.n_blocks,
            N_KV=self.n_kv_heads, GROUP=self.n_heads // self.n_kv_heads, HD=self.head_dim, ROPE=rope,
            BLOCK_S=self.block, num_warps=warps)
        _attn_combine_kernel[(self.n_heads,)](
            pos, self.m, self.l, self.acc, out, self.n_blocks,
            HD=self.head_dim, BLOCK_S=self.block, NB=max(2, triton.next_power_of_2(self.n_blocks)), num_warps=4)
        return out


ACT_NONE, ACT_SILU, ACT_RELU = 0, 1, 2
ACT_CODES = {"silu": ACT_SILU, "swish": ACT_SILU, "relu": ACT_RELU}


@triton.jit
def _act(y, ACT: tl.constexpr):
    if ACT == 1:
        y = y / (1.0 + tl.exp(-y))
    elif ACT == 2:
        y = tl.maximum(y, 0.0)
    return y


@triton.jit
def _gemv_kernel(w_ptr, x_ptr, b_ptr, y_ptr, idx_ptr, N, up_off,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GATED: tl.constexpr, ACT: tl.constexpr, ACT_UP: tl.constexpr, HAS_IDX: tl.constexpr):
    """y (N,) = act(W[r] @ x + b[r]) for output slot i reading row r = i, or r = idx[i] with HAS_IDX (the core
    rows of the full matrix, read in place: no gathered copy); with GATED: act(W[r] @ x) * (W[r + up_off] @ x)
    (act on both with ACT_UP: dReLU). W row-major with K columns; float32 accumulation; BLOCK_N slots per program."""
    pid = tl.program_id(0)
    slots = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = slots < N
    if HAS_IDX:
        rows = tl.load(idx_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
        if GATED:
            wu = tl.load(w_ptr + (rows[:, None] + up_off) * K + cols[None, :], mask=ok, other=0.0)
            acc_u += wu.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = _act(y, ACT)
    if GATED:
        u = tl.sum(acc_u, axis=1)
        if ACT_UP:
            u = _act(u, ACT)
        y = y * u
    tl.store(y_ptr + slots, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None, *,
         gated: bool = False, act: int = ACT_NONE, act_up: bool = False, idx: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-1 matrix-vector product for the decode step (measured faster than cuBLAS on these shapes, see
    docs/benchmarks.md). ``w`` (R, K) contiguous, ``x`` (K,), ``out`` (N,). Output i reads row i, or row
    ``idx[i]`` when ``idx`` (N,) is given (and ``bias[idx[i]]``). With ``gated`` the rows are gate||up:
    R = 2 * (rows of one part) and out = act(gate x) * up x, the up row ``R/2`` after its gate row."""
    n = out.numel()
    k = w.shape[1]
    if idx is not None and idx.numel() != n:
        raise ValueError(f"idx has {idx.numel()} entries for {n} outputs")
    block_k = 1024 if k >= 1024 else max(16, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, 4),)](w, x, bias if bias is not None else w, out, idx if idx is not None else out,
                                       n, w.shape[0] // 2 if gated else 0,
                                       K=k, BLOCK_N=4, BLOCK_K=block_k, HAS_BIAS=bias is not None, GATED=gated,
                                       ACT=act, ACT_UP=act_up, HAS_IDX=idx is not None, num_warps=8, num_stages=3)
    return out


@triton.jit
def _gemv_rows_kernel(w_ptr, idx_ptr, x_ptr, b_ptr, y_ptr, part_ptr,
                      N: tl.constexpr, R: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr):
    """y (N,) = sum_j x[j] * W[r_j, :] (+ b) over the R slots j, r_j = idx[j] (or j): a vector times the
    (indexed) rows of a row-major (., N) matrix, e.g. the compact activation times the core rows of the
    transposed down projection. Program (n, s) owns BLOCK_N columns and the s-th of SPLIT runs of PER slots;
    with SPLIT > 1 it writes a float32 partial row, summed in order by ``_split_sum_kernel``."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    start = pid_s * PER
    for r0 in range(0, PER, BLOCK_R):
        slots = start + r0 + tl.arange(0, BLOCK_R)
        ok = slots < R
        if HAS_IDX:
            rows = tl.load(idx_ptr + slots, mask=ok, other=0).to(tl.int64)
        else:
            rows = slots.to(tl.int64)
        xv = tl.load(x_ptr + slots, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[:, None]
    y = tl.sum(acc, axis=0)
    if SPLIT == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(part_ptr + pid_s * N + cols, y, mask=col_ok)


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, y_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    y = tl.load(part_ptr + cols, mask=ok, other=0.0)
    for s in range(1, SPLIT):  # fixed order: deterministic, graph replays bit-identical
        y += tl.load(part_ptr + s * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


# (BLOCK_N, BLOCK_R, SPLIT, num_warps, num_stages) of ``gemv_rows``. BLOCK_N is capped at N's next power
# of two, so BLOCK_N = 4096 is "whole rows": each program streams whole 8 KB rows (H = 4096) of its share
# of the core rows and writes one float32 partial row. The default is the fastest of ``GEMV_ROWS_CANDIDATES``
# measured on the H100 (Llama-3.1-8B's down projection, kept fraction 0.4; device_check.tune_gemv_rows, which
# the GPU benchmark runs first and whose pick it uses).
GEMV_ROWS_CONFIG = (2048, 4, 96, 8, 3)  # 23.4 µs = 2.0 TB/s, the fastest in run "suite-3" (docs/benchmarks.md)
GEMV_ROWS_CANDIDATES = ((2048, 4, 64, 8, 3), (1024, 4, 128, 4, 3), (2048, 4, 32, 8, 3), (2048, 8, 64, 16, 3),
                        (2048, 2, 128, 4, 3), (1024, 8, 64, 8, 3), (1024, 4, 64, 4, 4), (2048, 4, 48, 8, 4),
                        (4096, 4, 64, 16, 3), (1024, 2, 256, 4, 3), (512, 8, 64, 4, 3), (2048, 4, 96, 8, 3))


def gemv_rows(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, partial: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """out (N,) = x (R,) @ W[idx] (R, N) (+ bias): ``w`` (M, N) row-major (e.g. the down projection stored
    transposed, (I, H)), rows ``idx`` (R,) (all of its first R rows without). ``partial`` (SPLIT, N) float32
    scratch is needed when the config splits the rows (fixed address for graph capture)."""
    bn, br, split, warps, stages = config or GEMV_ROWS_CONFIG
    n = out.numel()
    r = x.numel()
    bn = min(bn, max(16, triton.next_power_of_2(n)))
    if w.shape[1] != n or (idx is not None and idx.numel() != r):
        raise ValueError(f"gemv_rows: w {tuple(w.shape)}, x ({r},), idx {None if idx is None else idx.numel()}, out ({n},)")
    split = max(1, min(split, triton.cdiv(r, br)))
    per = triton.cdiv(triton.cdiv(r, split), br) * br
    split = triton.cdiv(r, per)
    if split > 1 and (partial is None or partial.numel() < split * n or partial.dtype != torch.float32):
        raise ValueError(f"gemv_rows needs a float32 partial buffer of >= {split} x {n}")
    _gemv_rows_kernel[(triton.cdiv(n, bn), split)](
        w, idx if idx is not None else x, x, bias if bias is not None else w, out, partial if split > 1 else out,
        N=n, R=r, PER=per, BLOCK_N=bn, BLOCK_R=br, SPLIT=split, HAS_BIAS=bias is not None, HAS_IDX=idx is not None,
        num_warps=warps, num_stages=stages)
    if split > 1:
        _split_sum_kernel[(triton.cdiv(n, 128),)](partial, bias if bias is not None else partial, out, n, SPLIT=split,
                                                  BLOCK=128, HAS_BIAS=bias is not None, num_warps=4)
    return out


def gemv_rows_split(n: int, r: int, config=None) -> int:
    """How many float32 partial rows ``gemv_rows`` needs for an (r slots, n columns) product (1: none)."""
    bn, br, split, _, _ = config or GEMV_ROWS_CONFIG
    split = max(1, min(split, triton.cdiv(r, br)))
    per = triton.cdiv(triton.cdiv(r, split), br) * br
    return triton.cdiv(r, per)
