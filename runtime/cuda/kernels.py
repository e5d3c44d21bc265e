"""Triton kernels of the decode step: attention in one launch per layer, the matrix-vector products, and the
residual add + RMSNorm and the argmax as one launch each.

Attention, for one new token at position ``pos`` (read from device memory, so a captured CUDA graph replays
it for every position), split-KV ("flash-decoding"): ``_attn_kernel``, one program per (query head, block of
``BLOCK_S`` cache positions), splits the fused q||k||v projection, applies RoPE (Hugging Face rotate-half) to
q and the new k, and reduces its block of keys ``[lo, pos]`` to a partial softmax (max, sum, weighted values)
in float32. The new token's k/v come from registers; the program whose block holds ``pos`` (first query head
of each kv group) writes them into the static cache. Cache rows ``>= pos`` are never read, so that write
cannot race. The last program of each head to finish (an atomic counter) merges that head's partials.

With PDL (programmatic dependent launch, Hopper) each kernel starts while the previous one finishes, issues
the loads that do not depend on it (weights, earlier cache rows), and waits (``_gdc_enter``) before the rest.
The wrappers' ``pdl`` says where a kernel lets the next one launch: ``PDL_AFTER_WAIT`` (True; the product's) or
``PDL_AT_ENTRY`` (a benchmark choice, not yet measured: docs/benchmarks.md, "Built without a device").
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def pdl_supported(device=None) -> bool:
    """Programmatic dependent launch (PDL): Hopper (sm_90) and later, never under Triton's interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _launch(pdl: int) -> dict:
    return {"launch_pdl": True} if pdl else {}


# where a PDL kernel lets the next one launch (``pdl`` of the wrappers; the kernels' GDC == 1 / 2)
PDL_AFTER_WAIT, PDL_AT_ENTRY = 1, 2


@triton.jit
def _gdc_trigger(GDC: tl.constexpr):
    """``PDL_AT_ENTRY``: let the next kernel launch as soon as every program of this one has started. Only its
    scheduling moves: its wait (``_gdc_enter``) still returns after this kernel has finished and its writes are
    visible, so the next kernel's weight loads can overlap this one's whole run, not only its tail."""
    if GDC == 2:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _gdc_enter(GDC: tl.constexpr):
    """With PDL (``GDC``) a kernel may start while the previous one still runs: wait here for it to finish (and
    its writes to be visible), then (``PDL_AFTER_WAIT``) let the next kernel start. Everything before this call
    may read only data no kernel of the step writes (weights, core indices); every write comes after it."""
    if GDC:
        tl.extra.cuda.gdc_wait()
        if GDC == 1:
            tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _attn_combine(h, pos, m_ptr, l_ptr, acc_ptr, out_ptr, n_blocks,
                  HD: tl.constexpr, BLOCK_S: tl.constexpr, NB: tl.constexpr):
    """Merge head h's partials of the blocks up to ``pos`` into its output (.cg: written by other programs)."""
    used = pos // BLOCK_S + 1
    bi = tl.arange(0, NB)
    ok = bi < used
    d = tl.arange(0, HD)
    slot = h * n_blocks + bi
    mb = tl.load(m_ptr + slot, mask=ok, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(mb, axis=0)  # finite: the block holding pos scores the new token
    w = tl.where(ok, tl.exp(mb - m), 0.0)
    lb = tl.load(l_ptr + slot, mask=ok, other=0.0, cache_modifier=".cg")
    accb = tl.load(acc_ptr + slot[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
    out = tl.sum(w[:, None] * accb, axis=0) / tl.sum(w * lb, axis=0)
    tl.store(out_ptr + h * HD + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _attn_kernel(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, m_ptr, l_ptr, acc_ptr, count_ptr, out_ptr,
                 scale, window, cache_len, n_blocks,
                 N_KV: tl.constexpr, GROUP: tl.constexpr, HD: tl.constexpr, ROPE: tl.constexpr,
                 BLOCK_S: tl.constexpr, NB: tl.constexpr, GDC: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1)
    _gdc_trigger(GDC)
    # pos and the cache rows < pos were written by earlier steps (and the prefill), never by the kernel this one
    # may overlap (PDL): they are read before waiting for it
    pos = tl.load(pos_ptr).to(tl.int32)
    start = b * BLOCK_S
    if start <= pos:
        kvh = h // GROUP
        d = tl.arange(0, HD)
        row = kvh * cache_len * HD
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)  # sliding window (Mistral): keys > pos - window
        s_idx = start + tl.arange(0, BLOCK_S)
        in_cache = (s_idx < pos) & (s_idx >= lo)
        is_new = s_idx == pos
        kb = tl.load(kc_ptr + row + s_idx[:, None] * HD + d[None, :], mask=in_cache[:, None], other=0.0).to(tl.float32)
        vb = tl.load(vc_ptr + row + s_idx[:, None] * HD + d[None, :], mask=in_cache[:, None], other=0.0).to(tl.float32)
        _gdc_enter(GDC)
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
        if (h % GROUP == 0) & (pos < start + BLOCK_S):
            tl.store(kc_ptr + row + pos * HD + d, k_store)
            tl.store(vc_ptr + row + pos * HD + d, v)
        k = k_store.to(tl.float32)  # attend with the value the cache holds
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
        # the last of head h's programs (an atomic counter, reset for the next launch) merges its partials
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + h, 1, sem="acq_rel")
        if done == pos // BLOCK_S:
            _attn_combine(h, pos, m_ptr, l_ptr, acc_ptr, out_ptr, n_blocks, HD, BLOCK_S, NB)
            tl.atomic_xchg(count_ptr + h, 0)


MAX_BLOCKS = 256
# keys per program of the decode attention: 128 decoded 0.8% faster than 64 at kept 0.4 and 0.2% dense (16 / 32:
# 1-4% slower), Llama-3.1-8B shape, 256 + 128 tokens, run h200-35 (docs/benchmarks.md)
ATTENTION_BLOCK = 128


def supported(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def block_size(cache_len: int, base: int = ATTENTION_BLOCK) -> int:
    """Keys per program: ``base``, more for long caches so that at most ``MAX_BLOCKS`` partials are merged."""
    bs = base
    while triton.cdiv(cache_len, bs) > MAX_BLOCKS:
        bs *= 2
    return bs


class DecodeAttention:
    """Scratch for the partials (fixed addresses: graph-capturable), sized for one FastLM's cache."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, cache_len: int, device, window: int | None,
                 pdl: bool = False, block: int = ATTENTION_BLOCK):
        if not supported(head_dim):
            raise ValueError(f"head_dim {head_dim} is not a power of two >= 16")
        self.n_heads, self.n_kv_heads, self.head_dim, self.window = n_heads, n_kv_heads, head_dim, int(window or 0)
        self.pdl = pdl
        self.block = block_size(cache_len, block)
        self.n_blocks = triton.cdiv(cache_len, self.block)
        self.m = torch.empty(n_heads * self.n_blocks, device=device, dtype=torch.float32)
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(n_heads * self.n_blocks * head_dim, device=device, dtype=torch.float32)
        self.count = torch.zeros(n_heads, device=device, dtype=torch.int32)  # per head, zero between launches

    def __call__(self, qkv, cos, sin, k_cache, v_cache, pos, out, scale: float):
        """qkv (nh*hd + 2*nkv*hd,) contiguous; caches (1, nkv, S, hd) contiguous; pos (1,) int64; out (nh*hd,)."""
        rope = cos is not None
        warps = 4 if self.block * self.head_dim <= 8192 else 8
        _attn_kernel[(self.n_heads, self.n_blocks)](
            qkv, cos if rope else qkv, sin if rope else qkv, k_cache, v_cache, pos, self.m, self.l, self.acc,
            self.count, out, scale, self.window, k_cache.shape[2], self.n_blocks,
            N_KV=self.n_kv_heads, GROUP=self.n_heads // self.n_kv_heads, HD=self.head_dim, ROPE=rope,
            BLOCK_S=self.block, NB=max(2, triton.next_power_of_2(self.n_blocks)), GDC=self.pdl, num_warps=warps,
            **_launch(self.pdl))
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
def _gemv_kernel(w_ptr, x_ptr, b_ptr, y_ptr, idx_ptr, res_ptr, N, up_off, eps,
                 K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                 GATED: tl.constexpr, ACT: tl.constexpr, ACT_UP: tl.constexpr, HAS_IDX: tl.constexpr,
                 NORM_IN: tl.constexpr, RES: tl.constexpr, GDC: tl.constexpr):
    """y (N,) = act(W[r] @ x + b[r]) for output slot i reading row r = i, or r = idx[i] with HAS_IDX (the core
    rows of the full matrix, read in place: no gathered copy); with GATED: act(W[r] @ x) * (W[r + up_off] @ x)
    (act on both with ACT_UP: dReLU). W row-major with K columns; float32 accumulation; BLOCK_N slots per program.

    NORM_IN: x is the raw residual and W has the RMSNorm's weight folded into its columns, so the products are
    scaled by rsqrt(mean(x^2) + eps) before the bias and the activation (the norm without a launch of its own).
    RES: y = res + W @ x, the product rounded to y's dtype before the add (as the unfused step adds)."""
    pid = tl.program_id(0)
    _gdc_trigger(GDC)
    # the weights do not depend on the previous kernel: the first block's loads go out before waiting for it
    slots, rows, row_ok, cols, col_ok, w, wu = _gemv_tile(w_ptr, idx_ptr, pid, N, up_off, K, BLOCK_N, BLOCK_K, GATED,
                                                          HAS_IDX)
    _gdc_enter(GDC)
    xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * xv[None, :]
    acc_u = wu.to(tl.float32) * xv[None, :]
    sq = xv * xv
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        if NORM_IN:
            sq += xv * xv
        ok = row_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
        if GATED:
            wu = tl.load(w_ptr + (rows[:, None] + up_off) * K + cols[None, :], mask=ok, other=0.0)
            acc_u += wu.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps) if NORM_IN else 1.0
    _gemv_store(y, acc_u, rstd, slots, rows, row_ok, b_ptr, res_ptr, y_ptr, HAS_BIAS, GATED, ACT, ACT_UP, NORM_IN,
                RES)


@triton.jit
def _gemv_store(y, acc_u, rstd, slots, rows, row_ok, b_ptr, res_ptr, y_ptr, HAS_BIAS: tl.constexpr,
                GATED: tl.constexpr, ACT: tl.constexpr, ACT_UP: tl.constexpr, NORM_IN: tl.constexpr,
                RES: tl.constexpr):
    """The GEMV's outputs from the sums ``y`` of its gate (or only) rows and the (BLOCK_N, BLOCK_K) float32
    products ``acc_u`` of its up rows: normalised, + bias, activated, gated, + residual, stored at ``slots``."""
    if NORM_IN:
        y = y * rstd
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    y = _act(y, ACT)
    if GATED:
        u = tl.sum(acc_u, axis=1)
        if NORM_IN:
            u = u * rstd
        if ACT_UP:
            u = _act(u, ACT)
        y = y * u
    if RES:
        r = tl.load(res_ptr + slots, mask=row_ok, other=0.0).to(tl.float32)
        y = r + y.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + slots, y.to(y_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _gemv_persistent_kernel(w_ptr, x_ptr, b_ptr, y_ptr, idx_ptr, res_ptr, N, up_off, eps, nprog,
                            K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                            GATED: tl.constexpr, ACT: tl.constexpr, ACT_UP: tl.constexpr, HAS_IDX: tl.constexpr,
                            NORM_IN: tl.constexpr, RES: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr,
                            GDC: tl.constexpr):
    """``_gemv_kernel`` for rows of one tile (K <= BLOCK_K) from a fixed grid: program p computes output blocks
    p, p + P, p + 2P, ... (P programs). The first block's rows are requested before the PDL wait; x is read once
    after it (``nprog``: the grid's size, ITERS: blocks of the busiest program; a program's blocks past N are
    masked off); the later blocks run under Triton's pipeliner, their indices and rows STAGES - 1 blocks ahead in
    shared memory (cp.async), so each program keeps loads in flight from its first block to its last instead of
    a new wave of programs starting with none. The same products as ``_gemv_kernel``."""
    pid = tl.program_id(0)
    _gdc_trigger(GDC)
    slots, rows, row_ok, cols, col_ok, w, wu = _gemv_tile(w_ptr, idx_ptr, pid, N, up_off, K, BLOCK_N, BLOCK_K, GATED,
                                                          HAS_IDX)
    _gdc_enter(GDC)
    xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xv * xv, axis=0) / K + eps) if NORM_IN else 1.0
    _gemv_store(tl.sum(w.to(tl.float32) * xv[None, :], axis=1), wu.to(tl.float32) * xv[None, :], rstd, slots, rows,
                row_ok, b_ptr, res_ptr, y_ptr, HAS_BIAS, GATED, ACT, ACT_UP, NORM_IN, RES)
    for i in tl.range(1, ITERS, num_stages=STAGES):
        slots, rows, row_ok, cols, col_ok, w, wu = _gemv_tile(w_ptr, idx_ptr, pid + i * nprog, N, up_off, K, BLOCK_N,
                                                              BLOCK_K, GATED, HAS_IDX)
        _gemv_store(tl.sum(w.to(tl.float32) * xv[None, :], axis=1), wu.to(tl.float32) * xv[None, :], rstd, slots,
                    rows, row_ok, b_ptr, res_ptr, y_ptr, HAS_BIAS, GATED, ACT, ACT_UP, NORM_IN, RES)


@triton.jit
def _gemv_tile(w_ptr, idx_ptr, blk, N, up_off, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GATED: tl.constexpr, HAS_IDX: tl.constexpr):
    """Output block ``blk``'s first tile: its slots, weight rows and their mask, the tile's columns and their mask,
    and the (BLOCK_N, BLOCK_K) tiles of its gate (or only) rows and of its up rows (the gate tile again without
    GATED)."""
    slots = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = slots < N
    if HAS_IDX:
        rows = tl.load(idx_ptr + slots, mask=row_ok, other=0).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    ok = row_ok[:, None] & col_ok[None, :]
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=ok, other=0.0)
    wu = w
    if GATED:
        wu = tl.load(w_ptr + (rows[:, None] + up_off) * K + cols[None, :], mask=ok, other=0.0)
    return slots, rows, row_ok, cols, col_ok, w, wu


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of ``gemv``: the fastest in the whole decode step (Llama-3.1-8B
# shape, PDL on) of the tilings ``benchmarks/gpu_suite.py`` (``tune_tilings``) times on the H200 (run "h200-1",
# docs/benchmarks.md): one output's whole 8 KB row(s) per program, 4 warps, for qkv / o / lm_head and for the
# gate||up product (the gate and up rows of one neuron) - every program's weights requested before it waits for
# the previous kernel: +3% dense, +1% at kept 0.4 over the H100's choice (2 x 2048 columns; gate||up 2 outputs).
# A fifth entry, programs per SM (default 0: one program per BLOCK_N outputs, the measured form), launches
# ``_gemv_persistent_kernel`` on that many programs per SM where a row fits one tile (K <= BLOCK_K), with a
# num_stages-deep pipelined loop: a benchmark choice, not yet measured (docs/benchmarks.md, "Built without a device").
GEMV_CONFIG = (1, 4096, 4, 2)
GEMV_CONFIG_UP = (1, 4096, 4, 2)  # gate||up (two rows per output) and fc1


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (the persistent GEMV's grid); off CUDA (Triton's interpreter, the
    sm_90 build of benchmarks/aot.py) the 132 of an H100 / H200 SXM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None, *,
         gated: bool = False, act: int = ACT_NONE, act_up: bool = False, idx: torch.Tensor | None = None,
         pdl: bool = False, config=None, norm_eps: float | None = None,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-1 matrix-vector product for the decode step (measured faster than cuBLAS on these shapes, see
    docs/benchmarks.md). ``w`` (R, K) contiguous, ``x`` (K,), ``out`` (N,). Output i reads row i, or row
    ``idx[i]`` when ``idx`` (N,) is given (and ``bias[idx[i]]``). With ``gated`` the rows are gate||up:
    R = 2 * (rows of one part) and out = act(gate x) * up x, the up row ``R/2`` after its gate row.
    ``norm_eps``: x is un-normalised and ``w`` holds the RMSNorm weight folded into its columns
    (``fold_norm``): the products are scaled by rsqrt(mean(x^2) + norm_eps). ``residual`` (N,): out =
    residual + the product. ``pdl``: launched as a programmatic dependent launch (``pdl_supported``; True or
    ``PDL_AFTER_WAIT``, or ``PDL_AT_ENTRY``: where it lets the next kernel launch). ``config``: (BLOCK_N,
    BLOCK_K, num_warps, num_stages[, programs per SM]), ``GEMV_CONFIG`` when None; with programs per SM > 0 and
    K <= BLOCK_K, the persistent kernel (``_gemv_persistent_kernel``) computes the same outputs."""
    bn, bk, warps, stages, *persist = config or GEMV_CONFIG
    per_sm = persist[0] if persist else 0
    n = out.numel()
    k = w.shape[1]
    if idx is not None and idx.numel() != n:
        raise ValueError(f"idx has {idx.numel()} entries for {n} outputs")
    if residual is not None and residual.numel() != n:
        raise ValueError(f"residual has {residual.numel()} entries for {n} outputs")
    if per_sm < 0 or (per_sm and stages < 1):
        raise ValueError(f"gemv: programs per SM must be >= 0 and its loop's num_stages >= 1, got {per_sm}, {stages}")
    block_k = bk if k >= bk else max(16, triton.next_power_of_2(k))
    args = (w, x, bias if bias is not None else w, out, idx if idx is not None else out,
            residual if residual is not None else out, n, w.shape[0] // 2 if gated else 0, float(norm_eps or 0.0))
    meta = dict(K=k, BLOCK_N=bn, BLOCK_K=block_k, HAS_BIAS=bias is not None, GATED=gated, ACT=act, ACT_UP=act_up,
                HAS_IDX=idx is not None, NORM_IN=norm_eps is not None, RES=residual is not None, GDC=pdl,
                num_warps=warps, **_launch(pdl))
    if per_sm and k <= block_k:
        grid = min(triton.cdiv(n, bn), per_sm * sm_count(w.device))
        _gemv_persistent_kernel[(grid,)](*args, grid, ITERS=triton.cdiv(triton.cdiv(n, bn), grid), STAGES=stages,
                                         **meta)
    else:
        _gemv_kernel[(triton.cdiv(n, bn),)](*args, num_stages=stages, **meta)
    return out


@triton.jit
def _rows_block(w_ptr, idx_ptr, x_ptr, first, cols, col_ok, N: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
                HAS_IDX: tl.constexpr):
    """x[j] * W[r_j, cols] for the BLOCK_R slots j from ``first`` (float32; zero past R)."""
    slots = first + tl.arange(0, BLOCK_R)
    ok = slots < R
    if HAS_IDX:
        rows = tl.load(idx_ptr + slots, mask=ok, other=0).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    xv = tl.load(x_ptr + slots, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    return w.to(tl.float32) * xv[:, None]


@triton.jit
def _gemv_rows_kernel(w_ptr, idx_ptr, x_ptr, b_ptr, y_ptr, part_ptr,
                      N: tl.constexpr, R: tl.constexpr, PER: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IDX: tl.constexpr,
                      GDC: tl.constexpr, LOOP_STAGES: tl.constexpr):
    """y (N,) = sum_j x[j] * W[r_j, :] (+ b) over the R slots j, r_j = idx[j] (or j): a vector times the
    (indexed) rows of a row-major (., N) matrix, e.g. the compact activation times the core rows of the
    transposed down projection. Program (n, s) owns BLOCK_N columns and the s-th of SPLIT runs of PER slots;
    with SPLIT > 1 it writes a float32 partial row, summed in order by ``_split_sum_kernel`` (or by
    ``_residual_rms_kernel``, fused with the residual add and the next RMSNorm).

    LOOP_STAGES 0: each later block's index and row loads are issued when the loop reaches it, so a program has
    one block in flight (the sm_90 build shows no load of the next block before this one's products).
    LOOP_STAGES >= 2: Triton's pipeliner keeps LOOP_STAGES - 1 blocks ahead in flight through shared memory
    (cp.async); the same products in the same order, so the same result."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    _gdc_trigger(GDC)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    start = pid_s * PER
    # the first rows' loads go out before waiting for the previous kernel (the indices are written per prompt,
    # before the step runs)
    slots = start + tl.arange(0, BLOCK_R)
    ok = slots < R
    if HAS_IDX:
        rows = tl.load(idx_ptr + slots, mask=ok, other=0).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    w = tl.load(w_ptr + rows[:, None] * N + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
    _gdc_enter(GDC)
    xv = tl.load(x_ptr + slots, mask=ok, other=0.0).to(tl.float32)
    acc = w.to(tl.float32) * xv[:, None]
    if LOOP_STAGES:
        for r0 in tl.range(BLOCK_R, PER, BLOCK_R, num_stages=LOOP_STAGES):
            acc += _rows_block(w_ptr, idx_ptr, x_ptr, start + r0, cols, col_ok, N, R, BLOCK_R, HAS_IDX)
    else:
        for r0 in range(BLOCK_R, PER, BLOCK_R):
            acc += _rows_block(w_ptr, idx_ptr, x_ptr, start + r0, cols, col_ok, N, R, BLOCK_R, HAS_IDX)
    y = tl.sum(acc, axis=0)
    if SPLIT == 1:
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=col_ok)
    else:
        tl.store(part_ptr + pid_s * N + cols, y, mask=col_ok)


@triton.jit
def _split_sum_kernel(part_ptr, b_ptr, y_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
                      GDC: tl.constexpr):
    _gdc_trigger(GDC)
    _gdc_enter(GDC)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    y = tl.load(part_ptr + cols, mask=ok, other=0.0)
    for s in range(1, SPLIT):  # fixed order: deterministic, graph replays bit-identical
        y += tl.load(part_ptr + s * N + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


# (BLOCK_N, BLOCK_R, SPLIT, num_warps, num_stages[, loop_stages]) of ``gemv_rows``; loop_stages (default 0: the
# loop's loads issued as it reaches them, the measured form) pipelines the row loop, a benchmark choice not yet
# measured (docs/benchmarks.md, "Built without a device"). BLOCK_N is capped at N's next power
# of two, so BLOCK_N = 4096 is "whole rows": each program streams whole 8 KB rows (H = 4096) of its share
# of the core rows and writes one float32 partial row. Alone (``benchmarks.gpu_suite.tune_gemv_rows``, which the
# GPU suite can run first) split 96 was fastest; inside the PDL step, where the split rows are summed by the next
# launch, split 128 (the whole-step tuning of the H100 sessions; run h200-21 found 192 / 256 within noise).
GEMV_ROWS_CONFIG = (2048, 4, 128, 8, 3)  # the fastest in the whole step, run "tune-3" (docs/benchmarks.md)
GEMV_ROWS_CANDIDATES = ((2048, 4, 64, 8, 3), (1024, 4, 128, 4, 3), (2048, 4, 32, 8, 3), (2048, 8, 64, 16, 3),
                        (2048, 2, 128, 4, 3), (1024, 8, 64, 8, 3), (1024, 4, 64, 4, 4), (2048, 4, 48, 8, 4),
                        (4096, 4, 64, 16, 3), (1024, 2, 256, 4, 3), (512, 8, 64, 4, 3), (2048, 4, 96, 8, 3))


def gemv_rows(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, idx: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, partial: torch.Tensor | None = None, config=None, *,
              reduce: bool = True, pdl: bool = False) -> torch.Tensor:
    """out (N,) = x (R,) @ W[idx] (R, N) (+ bias): ``w`` (M, N) row-major (e.g. the down projection stored
    transposed, (I, H)), rows ``idx`` (R,) (all of its first R rows without). ``partial`` (SPLIT, N) float32
    scratch is needed when the config splits the rows (fixed address for graph capture). With
    ``reduce=False`` a split product returns the partial rows (SPLIT, N) unsummed and without the bias (for
    ``residual_rms_norm``); an unsplit one returns ``out`` as usual."""
    bn, br, split, warps, stages, *loop = config or GEMV_ROWS_CONFIG
    loop_stages = loop[0] if loop else 0
    if loop_stages == 1 or loop_stages < 0:
        raise ValueError(f"gemv_rows: loop_stages must be 0 (no pipelining) or >= 2, got {loop_stages}")
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
        GDC=pdl, LOOP_STAGES=loop_stages, num_warps=warps, num_stages=stages, **_launch(pdl))
    if split > 1:
        if not reduce:
            return partial.view(-1)[:split * n].view(split, n)
        _split_sum_kernel[(triton.cdiv(n, 128),)](partial, bias if bias is not None else partial, out, n, SPLIT=split,
                                                  BLOCK=128, HAS_BIAS=bias is not None, GDC=pdl, num_warps=4,
                                                  **_launch(pdl))
    return out


def gemv_rows_split(n: int, r: int, config=None) -> int:
    """How many float32 partial rows ``gemv_rows`` needs for an (r slots, n columns) product (1: none)."""
    bn, br, split = (config or GEMV_ROWS_CONFIG)[:3]
    split = max(1, min(split, triton.cdiv(r, br)))
    per = triton.cdiv(triton.cdiv(r, split), br) * br
    return triton.cdiv(r, per)


# --------------------------------------------------------------------------------------------------
# residual add + RMSNorm, and the step's argmax, as last-program reductions (one launch each, deterministic)


@triton.jit
def _residual_rms_kernel(x_ptr, y_ptr, b_ptr, w_ptr, x_out_ptr, h_out_ptr, ss_ptr, count_ptr, eps,
                         H: tl.constexpr, H_P2: tl.constexpr, BLOCK: tl.constexpr, NPROG: tl.constexpr,
                         NP2: tl.constexpr, SPLIT: tl.constexpr, Y_MODE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         NORM: tl.constexpr, HAS_W: tl.constexpr, GDC: tl.constexpr):
    """s = x + y in the model dtype (as PyTorch adds), written to x_out; h_out = w * (s * rsqrt(mean(s^2) + eps))
    exactly as ``fastlm.rms_norm`` rounds it. y: none (Y_MODE 0), a model-dtype vector (1), or SPLIT float32
    partial rows of ``gemv_rows`` summed in order (+ bias) and rounded to the model dtype (2), which is what
    the unfused step stores. Each program owns BLOCK columns and leaves its sum of squares; the last program
    to finish (an atomic counter, reset for the next launch) adds them in program order and normalises (w = 1
    without HAS_W: the weight folded into the next product's). Without NORM only the sum s is written (the next
    GEMV normalises its input itself: ``fold_norm``)."""
    pid = tl.program_id(0)
    _gdc_trigger(GDC)
    _gdc_enter(GDC)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    if Y_MODE == 0:
        s = x.to(x_out_ptr.dtype.element_ty)
    else:
        if Y_MODE == 1:
            y = tl.load(y_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        else:
            y = tl.load(y_ptr + cols, mask=ok, other=0.0)
            for i in range(1, SPLIT):  # fixed order: deterministic
                y += tl.load(y_ptr + i * H + cols, mask=ok, other=0.0)
            if HAS_BIAS:
                y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            y = y.to(x_out_ptr.dtype.element_ty).to(tl.float32)
        s = (x.to(tl.float32) + y).to(x_out_ptr.dtype.element_ty)
    tl.store(x_out_ptr + cols, s, mask=ok)
    if NORM:
        _rms_last_program(x_out_ptr, h_out_ptr, w_ptr, ss_ptr, count_ptr, s, pid, eps, H, H_P2, NPROG, NP2, HAS_W)


@triton.jit
def _rms_last_program(x_out_ptr, h_out_ptr, w_ptr, ss_ptr, count_ptr, s, pid, eps,
                      H: tl.constexpr, H_P2: tl.constexpr, NPROG: tl.constexpr, NP2: tl.constexpr,
                      HAS_W: tl.constexpr):
    sf = s.to(tl.float32)
    tl.store(ss_ptr + pid, tl.sum(sf * sf, axis=0))
    tl.debug_barrier()  # every thread's stores before the (one-thread) release below
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel")  # releases this program's stores, acquires the others'
    if done == NPROG - 1:
        p = tl.arange(0, NP2)
        total = tl.sum(tl.load(ss_ptr + p, mask=p < NPROG, other=0.0, cache_modifier=".cg"), axis=0)
        rstd = tl.rsqrt(total / H + eps)
        c = tl.arange(0, H_P2)
        okc = c < H
        v = tl.load(x_out_ptr + c, mask=okc, other=0.0, cache_modifier=".cg").to(tl.float32)
        hn = (v * rstd).to(h_out_ptr.dtype.element_ty)
        if HAS_W:
            hn = (tl.load(w_ptr + c, mask=okc, other=0.0).to(tl.float32) * hn.to(tl.float32)).to(h_out_ptr.dtype.element_ty)
        tl.store(h_out_ptr + c, hn, mask=okc)
        tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _partial_sum_residual_kernel(x_ptr, part_ptr, b_ptr, x_out_ptr, H, SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr,
                                 BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, GDC: tl.constexpr):
    """x_out = x + (the SPLIT float32 partial rows of ``gemv_rows`` summed, + bias, rounded to x's dtype), as the
    unfused step adds: every partial row of a program's BLOCK columns loaded at once (one tile, summed by a fixed
    tree: deterministic), for the step whose next GEMV normalises its own input (``fold_norm``)."""
    pid = tl.program_id(0)
    _gdc_trigger(GDC)
    _gdc_enter(GDC)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    r = tl.arange(0, SPLIT_P2)
    parts = tl.load(part_ptr + r[:, None] * H + cols[None, :], mask=(r[:, None] < SPLIT) & ok[None, :], other=0.0)
    y = tl.sum(parts, axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    y = y.to(x_out_ptr.dtype.element_ty).to(tl.float32)
    x = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(x_out_ptr + cols, (x + y).to(x_out_ptr.dtype.element_ty), mask=ok)


PARTIAL_SUM_BLOCK = 32  # columns per program of ``_partial_sum_residual_kernel`` (128-byte rows): 128 programs at H = 4096


class StepScratch:
    """Fixed-address scratch of the last-program reductions of one ``FastLM`` (graph-capturable): per-program
    partial results and the atomic counters (left at zero by every launch)."""

    def __init__(self, hidden: int, vocab: int, device):
        self.n_ss = triton.next_power_of_2(max(2, triton.cdiv(hidden, RESIDUAL_BLOCK_SPLIT)))
        self.ss = torch.zeros(self.n_ss, dtype=torch.float32, device=device)
        self.n_arg = triton.next_power_of_2(max(2, triton.cdiv(vocab, ARGMAX_BLOCK)))
        self.arg_v = torch.zeros(self.n_arg, dtype=torch.float32, device=device)
        self.arg_i = torch.zeros(self.n_arg, dtype=torch.int32, device=device)
        self.counts = torch.zeros(2, dtype=torch.int32, device=device)


RESIDUAL_BLOCK, RESIDUAL_BLOCK_SPLIT = 1024, 128  # columns per program: a vector y / partial rows (more parallel)
ARGMAX_BLOCK = 4096


def residual_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                      scratch: StepScratch, bias: torch.Tensor | None = None, pdl: bool = False,
                      norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x + y, RMSNorm(x + y) * weight) in one launch: ``y`` None, an (H,) vector of x's dtype, or (SPLIT, H)
    float32 partial rows from ``gemv_rows(reduce=False)`` (summed in a fixed order, + ``bias``); ``weight`` None:
    no weight (folded into the next product's). ``norm=False``: (x + y, None), the sum alone (partial rows: one
    tile per program, ``_partial_sum_residual_kernel``)."""
    h = x.numel()
    x_out = torch.empty_like(x)
    h_out = torch.empty_like(x)
    if y is None:
        mode, split, block = 0, 1, RESIDUAL_BLOCK
    elif y.dim() == 2:  # partial rows
        mode, split, block = 2, y.shape[0], RESIDUAL_BLOCK_SPLIT
        if y.dtype != torch.float32 or y.shape[1] != h:
            raise ValueError(f"residual_rms_norm: partial rows must be float32 (SPLIT, {h}), got {y.dtype} {tuple(y.shape)}")
    else:
        mode, split, block = 1, 1, RESIDUAL_BLOCK
        if y.numel() != h or y.dtype != x.dtype:
            raise ValueError(f"residual_rms_norm: x is {x.dtype} ({h},), y is {y.dtype} {tuple(y.shape)}")
    if bias is not None and mode != 2:
        raise ValueError("residual_rms_norm: a bias is added only to partial rows (add it in the GEMV otherwise)")
    nprog = triton.cdiv(h, block)
    if nprog > scratch.n_ss:
        raise ValueError(f"residual_rms_norm: {nprog} programs, scratch for {scratch.n_ss}")
    if not norm and mode == 0:
        raise ValueError("residual_rms_norm: nothing to add and no norm")
    if not norm and mode == 2:
        _partial_sum_residual_kernel[(triton.cdiv(h, PARTIAL_SUM_BLOCK),)](
            x, y, bias if bias is not None else x, x_out, h, SPLIT=split, SPLIT_P2=triton.next_power_of_2(split),
            BLOCK=PARTIAL_SUM_BLOCK, HAS_BIAS=bias is not None, GDC=pdl, num_warps=4, **_launch(pdl))
        return x_out, None
    _residual_rms_kernel[(nprog,)](x, y if y is not None else x, bias if bias is not None else x,
                                   weight if weight is not None else x, x_out, h_out if norm else x_out, scratch.ss,
                                   scratch.counts, float(eps), H=h, H_P2=triton.next_power_of_2(h), BLOCK=block,
                                   NPROG=nprog, NP2=triton.next_power_of_2(max(2, nprog)), SPLIT=split, Y_MODE=mode,
                                   HAS_BIAS=bias is not None, NORM=norm, HAS_W=weight is not None, GDC=pdl,
                                   num_warps=4, **_launch(pdl))
    return x_out, (h_out if norm else None)


@triton.jit
def _argmax_step_kernel(logits_ptr, v_ptr, i_ptr, count_ptr, tok_ptr, pos_ptr, step_ptr, out_ptr, V,
                        cut_ptr, temp_ptr, seed_ptr,
                        BLOCK: tl.constexpr, NPROG: tl.constexpr, NP2: tl.constexpr, GDC: tl.constexpr,
                        SAMPLE: tl.constexpr, HAS_CUT: tl.constexpr):
    """The next token of ``logits`` (V,), then the step's bookkeeping: out[step] = tok = it, pos += 1, step += 1.

    Greedy: the first index of the largest value (NaN counting as largest, as ``torch.argmax``). ``SAMPLE``: a
    draw from softmax(logits / temperature) over the logits >= cutoff (``HAS_CUT``: top-k / top-p), by the
    Gumbel-max trick: argmax(logits / t + g), g = -log(-log(u)), u uniform from Philox keyed by seed + step and
    counted by the vocabulary index, so a seed fixes every draw whatever runs around it."""
    pid = tl.program_id(0)
    _gdc_trigger(GDC)
    _gdc_enter(GDC)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(logits_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    if SAMPLE:
        key = tl.load(seed_ptr) + tl.load(step_ptr)
        u = tl.rand(key, offs)
        g = -tl.log(-tl.log(u))
        keep = offs < V
        if HAS_CUT:
            keep = keep & (v >= tl.load(cut_ptr))
        v = tl.where(keep, v / tl.load(temp_ptr) + g, float("-inf"))
    else:
        v = tl.where(v != v, float("inf"), v)
    m = tl.max(v, axis=0)
    big = 2147483647
    tl.store(v_ptr + pid, m)
    tl.store(i_ptr + pid, tl.min(tl.where((v == m) & (offs < V), offs, big), axis=0))
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if done == NPROG - 1:
        p = tl.arange(0, NP2)
        pv = tl.load(v_ptr + p, mask=p < NPROG, other=float("-inf"), cache_modifier=".cg")
        pi = tl.load(i_ptr + p, mask=p < NPROG, other=big, cache_modifier=".cg")
        best = tl.max(pv, axis=0)
        tok = tl.min(tl.where(pv == best, pi, big), axis=0).to(tl.int64)
        step = tl.load(step_ptr)
        tl.store(out_ptr + step, tok)
        tl.store(tok_ptr, tok)
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        tl.store(step_ptr, step + 1)
        tl.atomic_xchg(count_ptr, 0)


def argmax_step(logits: torch.Tensor, tok: torch.Tensor, pos: torch.Tensor, step: torch.Tensor, out: torch.Tensor,
                scratch: StepScratch, pdl: bool = False, sample: tuple | None = None) -> None:
    """out[step] = tok = argmax(logits); pos += 1; step += 1 (all int64 device scalars): one launch.

    ``sample = (cutoff or None, temperature, seed)`` (device scalars: float32, float32, int64) draws the token
    instead (see the kernel)."""
    v = logits.numel()
    nprog = triton.cdiv(v, ARGMAX_BLOCK)
    if nprog > scratch.n_arg:
        raise ValueError(f"argmax_step: {nprog} programs, scratch for {scratch.n_arg}")
    cut, temp, seed = sample if sample is not None else (None, logits, step)
    _argmax_step_kernel[(nprog,)](logits, scratch.arg_v, scratch.arg_i, scratch.counts[1:], tok, pos, step, out, v,
                                  cut if cut is not None else logits, temp, seed,
                                  BLOCK=ARGMAX_BLOCK, NPROG=nprog, NP2=triton.next_power_of_2(max(2, nprog)), GDC=pdl,
                                  SAMPLE=sample is not None, HAS_CUT=cut is not None, num_warps=8, **_launch(pdl))
