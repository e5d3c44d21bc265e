"""The whole decode step as ONE persistent Triton launch (a "megakernel"), for the RMSNorm models.

Why: the multi-launch step (``kernels.py``, 7 launches per layer) loses about 3 us per launch boundary to
ramp-up and tail, even with PDL: at kept 0.4 that is a quarter of the step. Here every piece of the step is
a *task* of one kernel: per layer the q||k||v rows, the attention blocks, the o-projection rows, the gate||up
core slots, the down product; then the lm_head rows and the next token. Tasks are numbered in dependency
order and handed out by an atomic ticket counter, so a program that draws a task of the next phase issues
its weight loads at once (weights depend on nothing) and only then waits, spinning on the counter of the
phase it reads; the loads of the next phase overlap the tail of the previous one on every SM.

Deadlock-free without any assumption on how many programs are resident: a program draws a ticket only
while it runs, tasks only wait on tasks with smaller tickets, so the smallest unfinished task can always
proceed. Under Triton's interpreter (programs run one after another) the first program draws every ticket.

Data produced inside the launch is read with ``.cg`` loads (from L2) after an acquire of its counter; a
producer's stores precede its release (``debug_barrier``, then the atomic). The norms are HF's RMSNorm,
recomputed by every consumer task from the residual (8 KB from L2) — exact rounding as ``fastlm.rms_norm``.
Sums are in a fixed order (split down rows are summed by the last split of each column block, in split
order), so replays are bit-identical. The last program to leave zeroes the counters for the next launch.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .kernels import ACT_CODES, _act

N_FIELDS = 9  # per-layer weight offsets: qkv, o, gate||up, down, norm1, norm2, k cache, v cache, qkv bias
F_QKV, F_O, F_UP, F_DOWN, F_N1, F_N2, F_KC, F_VC, F_QB = range(N_FIELDS)
N_PARAMS = 5  # per-layer ints: index-buffer row (-1 dense), core slots, down splits, rows per split, x producers
P_ROW, P_K, P_SPLIT, P_PER, P_XPROD = range(N_PARAMS)
N_PHASES = 5  # per layer: q||k||v, attention, o, gate||up, down
C_TICKET, C_EXIT, C_LM, C_LAYER = 0, 1, 2, 3  # counters; per layer 5 from C_LAYER, then per head, per column
INT64_MIN = -(2 ** 63)


@triton.jit
def _wait(ptr, target):
    """Spin until the counter at ``ptr`` reaches ``target`` (acquire: what its producers wrote is visible)."""
    while tl.atomic_add(ptr, 0, sem="acquire") < target:
        pass


@triton.jit
def _release(ptr):
    """This program's stores, then +1 on the counter at ``ptr`` (release)."""
    tl.debug_barrier()
    tl.atomic_add(ptr, 1, sem="release")


@triton.jit
def _rms(x_ptr, nw, eps, H: tl.constexpr, H_P2: tl.constexpr):
    """HF RMSNorm of the residual at ``x_ptr`` (written in this launch: read from L2) with weight ``nw``
    (H_P2,) in the model dtype: float32 (H_P2,), rounded as ``fastlm.rms_norm`` rounds it."""
    c = tl.arange(0, H_P2)
    x = tl.load(x_ptr + c, mask=c < H, other=0.0, cache_modifier=".cg").to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    hn = (x * rstd).to(nw.dtype).to(tl.float32)
    return (nw.to(tl.float32) * hn).to(nw.dtype).to(tl.float32)


@triton.jit
def _qkv_task(j, l, base, woff, x_in, qkv_buf, cnt, n_wait, eps, ALIGN: tl.constexpr,
              H: tl.constexpr, H_P2: tl.constexpr, NQKV: tl.constexpr, BQ: tl.constexpr, HAS_QB: tl.constexpr):
    rows = (j * BQ + tl.arange(0, BQ)).to(tl.int64)
    rok = rows < NQKV
    c = tl.arange(0, H_P2)
    cok = c < H
    w_ptr = base + tl.multiple_of(tl.load(woff + l * 9 + 0), ALIGN)
    w = tl.load(w_ptr + rows[:, None] * H + c[None, :], mask=rok[:, None] & cok[None, :], other=0.0)
    nw = tl.load(base + tl.multiple_of(tl.load(woff + l * 9 + 4), ALIGN) + c, mask=cok, other=0.0)
    if l > 0:
        _wait(cnt + 3 + (l - 1) * 5 + 4, n_wait)
    h = _rms(x_in, nw, eps, H, H_P2)
    y = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    if HAS_QB:
        y += tl.load(base + tl.load(woff + l * 9 + 8) + rows, mask=rok, other=0.0).to(tl.float32)
    tl.store(qkv_buf + rows, y.to(qkv_buf.dtype.element_ty), mask=rok)
    _release(cnt + 3 + l * 5 + 0)


@triton.jit
def _attn_task(j, l, base, woff, cos_ptr, sin_ptr, pos, qkv_buf, m_ptr, l_ptr, acc_ptr, out_ptr, cnt, c_head,
               n_qkv, scale, window, ALIGN: tl.constexpr, NH: tl.constexpr, N_KV: tl.constexpr,
               GROUP: tl.constexpr, HD: tl.constexpr, CACHE: tl.constexpr, BLOCK_S: tl.constexpr,
               NB: tl.constexpr, NB_P2: tl.constexpr):
    """One (query head, block of cache positions) of split-KV attention, as ``kernels._attn_kernel``: RoPE,
    the new k/v into the cache, a partial softmax; the head's last block merges the partials."""
    h = j % NH
    b = j // NH
    start = b * BLOCK_S
    if start <= pos:
        kvh = h // GROUP
        d = tl.arange(0, HD)
        kc = base + tl.multiple_of(tl.load(woff + l * 9 + 6), ALIGN)
        vc = base + tl.multiple_of(tl.load(woff + l * 9 + 7), ALIGN)
        row = kvh * CACHE * HD
        lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)
        s_idx = start + tl.arange(0, BLOCK_S)
        in_cache = (s_idx < pos) & (s_idx >= lo)
        is_new = s_idx == pos
        # cache rows < pos were written by earlier steps: loaded before waiting for this layer's q||k||v
        kb = tl.load(kc + row + s_idx[:, None] * HD + d[None, :], mask=in_cache[:, None], other=0.0)
        vb = tl.load(vc + row + s_idx[:, None] * HD + d[None, :], mask=in_cache[:, None], other=0.0)
        half: tl.constexpr = HD // 2
        partner = (d + half) % HD
        cos = tl.load(cos_ptr + pos * HD + d).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HD + d).to(tl.float32)
        _wait(cnt + 3 + l * 5 + 0, n_qkv)
        nq = NH * HD
        q = tl.load(qkv_buf + h * HD + d, cache_modifier=".cg").to(tl.float32)
        k = tl.load(qkv_buf + nq + kvh * HD + d, cache_modifier=".cg").to(tl.float32)
        v = tl.load(qkv_buf + nq + N_KV * HD + kvh * HD + d, cache_modifier=".cg")
        sign = tl.where(d < half, -1.0, 1.0)
        q2 = tl.load(qkv_buf + h * HD + partner, cache_modifier=".cg").to(tl.float32)
        k2 = tl.load(qkv_buf + nq + kvh * HD + partner, cache_modifier=".cg").to(tl.float32)
        q = q * cos + sign * q2 * sin
        k = k * cos + sign * k2 * sin
        k_store = k.to(qkv_buf.dtype.element_ty)
        if (h % GROUP == 0) & (pos < start + BLOCK_S):
            tl.store(kc + row + pos * HD + d, k_store)
            tl.store(vc + row + pos * HD + d, v)
        k = k_store.to(tl.float32)
        kb = tl.where(is_new[:, None], k[None, :], kb.to(tl.float32))
        vb = tl.where(is_new[:, None], v.to(tl.float32)[None, :], vb.to(tl.float32))
        scores = tl.sum(kb * q[None, :], axis=1) * scale
        scores = tl.where(in_cache | is_new, scores, float("-inf"))
        m_b = tl.max(scores, axis=0)
        m_safe = tl.where(m_b == float("-inf"), 0.0, m_b)
        p = tl.exp(scores - m_safe)
        slot = h * NB + b
        tl.store(m_ptr + slot, m_b)
        tl.store(l_ptr + slot, tl.sum(p, axis=0))
        tl.store(acc_ptr + slot * HD + d, tl.sum(p[:, None] * vb, axis=0))
        tl.debug_barrier()
        done = tl.atomic_add(cnt + c_head + l * NH + h, 1, sem="acq_rel")
        if done == pos // BLOCK_S:
            used = pos // BLOCK_S + 1
            bi = tl.arange(0, NB_P2)
            ok = bi < used
            sl = h * NB + bi
            mb = tl.load(m_ptr + sl, mask=ok, other=float("-inf"), cache_modifier=".cg")
            m = tl.max(mb, axis=0)
            wgt = tl.where(ok, tl.exp(mb - m), 0.0)
            lb = tl.load(l_ptr + sl, mask=ok, other=0.0, cache_modifier=".cg")
            accb = tl.load(acc_ptr + sl[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0, cache_modifier=".cg")
            o = tl.sum(wgt[:, None] * accb, axis=0) / tl.sum(wgt * lb, axis=0)
            tl.store(out_ptr + h * HD + d, o.to(out_ptr.dtype.element_ty))
            _release(cnt + 3 + l * 5 + 1)


@triton.jit
def _o_task(j, l, base, woff, x_in, attn_out, xb, cnt, ALIGN: tl.constexpr, H: tl.constexpr,
            NQ: tl.constexpr, NQ_P2: tl.constexpr, BO: tl.constexpr, NH: tl.constexpr):
    """Rows of the o-projection, plus the residual: xb[rows] = x[rows] + o[rows] (model dtype, as PyTorch)."""
    rows = (j * BO + tl.arange(0, BO)).to(tl.int64)
    rok = rows < H
    c = tl.arange(0, NQ_P2)
    cok = c < NQ
    w_ptr = base + tl.multiple_of(tl.load(woff + l * 9 + 1), ALIGN)
    w = tl.load(w_ptr + rows[:, None] * NQ + c[None, :], mask=rok[:, None] & cok[None, :], other=0.0)
    _wait(cnt + 3 + l * 5 + 1, NH)
    a = tl.load(attn_out + c, mask=cok, other=0.0, cache_modifier=".cg").to(tl.float32)
    y = tl.sum(w.to(tl.float32) * a[None, :], axis=1).to(xb.dtype.element_ty).to(tl.float32)
    r = tl.load(x_in + rows, mask=rok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(xb + rows, (r + y).to(xb.dtype.element_ty), mask=rok)
    _release(cnt + 3 + l * 5 + 2)


@triton.jit
def _up_task(j, l, base, woff, lpar, idx_ptr, xb, a_buf, cnt, n_o, eps, ALIGN: tl.constexpr, H: tl.constexpr,
             H_P2: tl.constexpr, I: tl.constexpr, KSTRIDE: tl.constexpr, BU: tl.constexpr, ACT: tl.constexpr,
             ACT_UP: tl.constexpr):
    """Core slots (or neurons) of gate||up with the activation: a[s] = act(gate_r . h) * (up_r . h)."""
    k = tl.load(lpar + l * 5 + 1)
    irow = tl.load(lpar + l * 5 + 0)
    slots = j * BU + tl.arange(0, BU)
    sok = slots < k
    if irow >= 0:
        rows = tl.load(idx_ptr + irow * KSTRIDE + slots, mask=sok, other=0).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    c = tl.arange(0, H_P2)
    cok = c < H
    w_ptr = base + tl.multiple_of(tl.load(woff + l * 9 + 2), ALIGN)
    ok = sok[:, None] & cok[None, :]
    wg = tl.load(w_ptr + rows[:, None] * H + c[None, :], mask=ok, other=0.0)
    wu = tl.load(w_ptr + (rows[:, None] + I) * H + c[None, :], mask=ok, other=0.0)
    nw = tl.load(base + tl.multiple_of(tl.load(woff + l * 9 + 5), ALIGN) + c, mask=cok, other=0.0)
    _wait(cnt + 3 + l * 5 + 2, n_o)
    h = _rms(xb, nw, eps, H, H_P2)
    g = _act(tl.sum(wg.to(tl.float32) * h[None, :], axis=1), ACT)
    u = tl.sum(wu.to(tl.float32) * h[None, :], axis=1)
    if ACT_UP:
        u = _act(u, ACT)
    tl.store(a_buf + slots, (g * u).to(a_buf.dtype.element_ty), mask=sok)
    _release(cnt + 3 + l * 5 + 3)


@triton.jit
def _down_dense_task(j, l, base, woff, xb, a_buf, xa, cnt, n_gu, ALIGN: tl.constexpr, H: tl.constexpr,
                     I: tl.constexpr, I_P2: tl.constexpr, BD: tl.constexpr):
    """Rows of the model's (H, I) down projection over all neurons, plus the residual: xa = xb + down a."""
    rows = (j * BD + tl.arange(0, BD)).to(tl.int64)
    rok = rows < H
    c = tl.arange(0, I_P2)
    cok = c < I
    w_ptr = base + tl.multiple_of(tl.load(woff + l * 9 + 3), ALIGN)
    w = tl.load(w_ptr + rows[:, None] * I + c[None, :], mask=rok[:, None] & cok[None, :], other=0.0)
    _wait(cnt + 3 + l * 5 + 3, n_gu)
    a = tl.load(a_buf + c, mask=cok, other=0.0, cache_modifier=".cg").to(tl.float32)
    y = tl.sum(w.to(tl.float32) * a[None, :], axis=1).to(xa.dtype.element_ty).to(tl.float32)
    r = tl.load(xb + rows, mask=rok, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(xa + rows, (r + y).to(xa.dtype.element_ty), mask=rok)
    _release(cnt + 3 + l * 5 + 4)


@triton.jit
def _down_core_task(j, l, base, woff, lpar, idx_ptr, xb, a_buf, xa, part, cnt, c_col, n_gu, ALIGN: tl.constexpr,
                    H: tl.constexpr, KSTRIDE: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr,
                    NCOL: tl.constexpr, PER: tl.constexpr, NSPLIT_P2: tl.constexpr):
    """A run of core rows of the (I, H) down copy times their activations, for DN columns: a float32 partial
    row; the last run of the column block sums the runs in order and adds the residual: xa = xb + down a."""
    col = j % NCOL
    sp = j // NCOL
    k = tl.load(lpar + l * 5 + 1)
    irow = tl.load(lpar + l * 5 + 0)
    n_split = tl.load(lpar + l * 5 + 2)
    cols = col * DN + tl.arange(0, DN)
    cok = cols < H
    w_ptr = base + tl.multiple_of(tl.load(woff + l * 9 + 3), ALIGN)
    lo = sp * PER
    hi = tl.minimum(lo + PER, k)
    slots = lo + tl.arange(0, DR)
    sok = slots < hi
    rows = tl.load(idx_ptr + irow * KSTRIDE + slots, mask=sok, other=0).to(tl.int64)
    w = tl.load(w_ptr + rows[:, None] * H + cols[None, :], mask=sok[:, None] & cok[None, :], other=0.0)
    _wait(cnt + 3 + l * 5 + 3, n_gu)
    a = tl.load(a_buf + slots, mask=sok, other=0.0, cache_modifier=".cg").to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * a[:, None], axis=0)
    for r0 in range(DR, PER, DR):
        slots = lo + r0 + tl.arange(0, DR)
        sok = slots < hi
        rows = tl.load(idx_ptr + irow * KSTRIDE + slots, mask=sok, other=0).to(tl.int64)
        w = tl.load(w_ptr + rows[:, None] * H + cols[None, :], mask=sok[:, None] & cok[None, :], other=0.0)
        a = tl.load(a_buf + slots, mask=sok, other=0.0, cache_modifier=".cg").to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * a[:, None], axis=0)
    tl.store(part + sp * H + cols, acc, mask=cok)
    tl.debug_barrier()
    done = tl.atomic_add(cnt + c_col + l * NCOL + col, 1, sem="acq_rel")
    if done == n_split - 1:
        si = tl.arange(0, NSPLIT_P2)
        runs = tl.load(part + si[:, None] * H + cols[None, :], mask=(si < n_split)[:, None] & cok[None, :], other=0.0,
                       cache_modifier=".cg")
        y = tl.sum(runs, axis=0).to(xa.dtype.element_ty).to(tl.float32)  # one fixed reduction order
        r = tl.load(xb + cols, mask=cok, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(xa + cols, (r + y).to(xa.dtype.element_ty), mask=cok)
        _release(cnt + 3 + l * 5 + 4)


@triton.jit
def _lm_task(j, base, lm_off, final_off, xa, logits, cnt, n_x, eps, tok_ptr, pos_ptr, step_ptr, out_ptr, temp_ptr,
             seed_ptr, best_ptr, n_lm, ALIGN: tl.constexpr, H: tl.constexpr, H_P2: tl.constexpr, V: tl.constexpr,
             BL: tl.constexpr, L: tl.constexpr, SAMPLE: tl.constexpr, FINISH: tl.constexpr):
    """Rows of lm_head over the final norm; with FINISH also the next token: each task's best (value, index)
    packed into one int64 (order-independent atomic max: the largest value, then the smallest index, as
    ``torch.argmax``; NaN counts as largest), and the last task writes out[step] = tok, pos += 1, step += 1.
    SAMPLE draws instead: argmax(logits / temperature + Gumbel noise), the noise of ``kernels.argmax_step``."""
    rows = (j * BL + tl.arange(0, BL)).to(tl.int64)
    rok = rows < V
    c = tl.arange(0, H_P2)
    cok = c < H
    w = tl.load(base + tl.multiple_of(lm_off, ALIGN) + rows[:, None] * H + c[None, :],
                mask=rok[:, None] & cok[None, :], other=0.0)
    nw = tl.load(base + tl.multiple_of(final_off, ALIGN) + c, mask=cok, other=0.0)
    _wait(cnt + 3 + (L - 1) * 5 + 4, n_x)
    h = _rms(xa, nw, eps, H, H_P2)
    y = tl.sum(w.to(tl.float32) * h[None, :], axis=1).to(logits.dtype.element_ty)
    tl.store(logits + rows, y, mask=rok)
    if FINISH:
        v = y.to(tl.float32)
        if SAMPLE:
            u = tl.rand(tl.load(seed_ptr) + tl.load(step_ptr), rows.to(tl.int32))
            v = v / tl.load(temp_ptr) - tl.log(-tl.log(u))
        else:
            v = tl.where(v != v, float("inf"), v)
        v = tl.where(rok, v, float("-inf"))
        m = tl.max(v, axis=0)
        i = tl.min(tl.where((v == m) & rok, rows, V), axis=0)
        bits = m.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        order = tl.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)  # float order as unsigned
        tl.atomic_max(best_ptr, (order - 0x80000000) * 4294967296 + (4294967295 - i))
        tl.debug_barrier()
        done = tl.atomic_add(cnt + 2, 1, sem="acq_rel")
        if done == n_lm - 1:
            best = tl.atomic_add(best_ptr, 0)
            tok = 4294967295 - (best & 0xFFFFFFFF)
            step = tl.load(step_ptr)
            tl.store(out_ptr + step, tok)
            tl.store(tok_ptr, tok)
            tl.store(pos_ptr, tl.load(pos_ptr) + 1)
            tl.store(step_ptr, step + 1)


@triton.jit
def _step_kernel(base, woff, lpar, bounds, cnt, idx_ptr, cos_ptr, sin_ptr, qkv_buf, attn_out, xa, xb, a_buf, part,
                 m_ptr, l_ptr, acc_ptr, logits, best_ptr, tok_ptr, pos_ptr, step_ptr, out_ptr, temp_ptr, seed_ptr,
                 embed_off, lm_off, final_off, eps, scale, window, total, c_head, c_col, n_qkv, n_o, n_lm,
                 ALIGN: tl.constexpr, N_CNT: tl.constexpr, L: tl.constexpr, H: tl.constexpr, H_P2: tl.constexpr,
                 NQKV: tl.constexpr, NQ_P2: tl.constexpr, NH: tl.constexpr, N_KV: tl.constexpr, HD: tl.constexpr, I: tl.constexpr, I_P2: tl.constexpr,
                 V: tl.constexpr, CACHE: tl.constexpr, BLOCK_S: tl.constexpr, NB: tl.constexpr, NB_P2: tl.constexpr,
                 KSTRIDE: tl.constexpr, BQ: tl.constexpr, BO: tl.constexpr, BU: tl.constexpr,
                 BD: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, NCOL: tl.constexpr, PER: tl.constexpr,
                 NSPLIT_P2: tl.constexpr, BL: tl.constexpr,
                 ACT: tl.constexpr, ACT_UP: tl.constexpr, HAS_QB: tl.constexpr, SAMPLE: tl.constexpr,
                 FINISH: tl.constexpr):
    pos = tl.load(pos_ptr).to(tl.int32)
    embed_row = base + embed_off + tl.load(tok_ptr) * H  # the layer-0 residual: the token's embedding row
    t = tl.atomic_add(cnt + 0, 1, sem="relaxed")
    ph = 0  # the phase of ticket t: a program's tickets only grow
    while t < total:
        nxt = tl.atomic_add(cnt + 0, 1, sem="relaxed")  # drawn now: its latency hides behind this task
        while t >= tl.load(bounds + ph + 1):
            ph += 1
        j = t - tl.load(bounds + ph)
        if ph == 5 * L:
            _lm_task(j, base, lm_off, final_off, xa, logits, cnt, tl.load(lpar + (L - 1) * 5 + 4), eps, tok_ptr,
                     pos_ptr, step_ptr, out_ptr, temp_ptr, seed_ptr, best_ptr, n_lm, ALIGN, H, H_P2, V, BL, L,
                     SAMPLE, FINISH)
        else:
            l = ph // 5
            kind = ph % 5
            x_in = xa
            if l == 0:
                x_in = embed_row
            if kind == 0:
                n_wait = 0
                if l > 0:
                    n_wait = tl.load(lpar + (l - 1) * 5 + 4)
                _qkv_task(j, l, base, woff, x_in, qkv_buf, cnt, n_wait, eps, ALIGN, H, H_P2, NQKV, BQ, HAS_QB)
            elif kind == 1:
                _attn_task(j, l, base, woff, cos_ptr, sin_ptr, pos, qkv_buf, m_ptr, l_ptr, acc_ptr, attn_out, cnt,
                           c_head, n_qkv, scale, window, ALIGN, NH, N_KV, NH // N_KV, HD, CACHE, BLOCK_S, NB, NB_P2)
            elif kind == 2:
                _o_task(j, l, base, woff, x_in, attn_out, xb, cnt, ALIGN, H, NH * HD, NQ_P2, BO, NH)
            elif kind == 3:
                _up_task(j, l, base, woff, lpar, idx_ptr, xb, a_buf, cnt, n_o, eps, ALIGN, H, H_P2, I, KSTRIDE, BU,
                         ACT, ACT_UP)
            else:
                n_gu = tl.cdiv(tl.load(lpar + l * 5 + 1), BU)
                if tl.load(lpar + l * 5 + 0) >= 0:
                    _down_core_task(j, l, base, woff, lpar, idx_ptr, xb, a_buf, xa, part, cnt, c_col, n_gu, ALIGN, H,
                                    KSTRIDE, DN, DR, NCOL, PER, NSPLIT_P2)
                else:
                    _down_dense_task(j, l, base, woff, xb, a_buf, xa, cnt, n_gu, ALIGN, H, I, I_P2, BD)
        t = nxt
    # every program draws exactly one ticket past the end; the last to leave resets the counters
    if tl.atomic_add(cnt + 1, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        z = tl.arange(0, 1024)
        for o in range(0, N_CNT, 1024):
            tl.store(cnt + o + z, tl.zeros([1024], dtype=tl.int32), mask=o + z < N_CNT)
        tl.store(best_ptr, -9223372036854775807 - 1)


# (weight elements per task, warps per program, split down: columns per block, rows per load, rows per split,
# register cap per thread: 0 none)
CONFIG = (16384, 4, 256, 64, 256, 128)


def supported(weights, fast) -> str | None:
    """Why the megakernel cannot run ``fast``'s step (None: it can)."""
    w = weights
    if w.family != "llama" or w.rope_fn is None:
        return "it covers the RMSNorm + RoPE models (llama / mistral / qwen2) only"
    if fast.gemv != "triton":
        return "it needs the Triton GEMVs' gather-free layout"
    if not (w.head_dim >= 16 and w.head_dim & (w.head_dim - 1) == 0):
        return f"head_dim {w.head_dim} is not a power of two >= 16"
    if fast.k is not None and not fast.indexed:
        return "sparse layers need the gather-free (indexed) layout"
    for lw in w.layers:
        if lw.o_b is not None or lw.down_b is not None or lw.up_b is not None or lw.ffn_kind == "mlp":
            return "o / down / fc biases and the non-gated FFN are not in the megakernel"
        if tuple(lw.up_w.shape) != (2 * w.n_neurons, w.hidden) or tuple(lw.down.shape) != (w.hidden, w.n_neurons):
            return "it reads the model's whole gate||up and down matrices (not compact copies)"
    if fast._kernel_act(w.layers[0]) is None:
        return f"no kernel for activation {w.act!r}"
    return None


class MegaStep:
    """The tables, scratch and counters of one ``FastLM``'s megakernel (fixed addresses: graph-capturable);
    calling it runs one decode step and returns the logits (V,)."""

    def __init__(self, fast, config=None):
        w = fast.w
        self.config = tuple(config or CONFIG)
        tile, self.num_warps, down_cols, down_rows, down_per, self.maxnreg = (self.config + (0,))[:6]
        dev, dt = w.device, w.dtype
        self.fast = fast
        L, H, I = len(w.layers), w.hidden, w.n_neurons
        self.L, self.H, self.I = L, H, I
        self.H_P2, self.I_P2 = triton.next_power_of_2(H), triton.next_power_of_2(I)
        self.nq = w.n_heads * w.head_dim
        self.nqkv = self.nq + 2 * w.n_kv_heads * w.head_dim
        self.bq = max(1, tile // self.H_P2)
        self.bo = max(1, tile // triton.next_power_of_2(self.nq))
        self.bu = max(1, tile // (2 * self.H_P2))
        self.bd = max(1, tile // self.I_P2)
        self.bl = max(1, tile // self.H_P2)
        self.dn = min(down_cols, self.H_P2)
        self.dr = down_rows
        self.ncol = triton.cdiv(H, self.dn)
        self.base = w.embed
        elt = w.embed.element_size()

        def off(t):
            if t is None:
                return 0
            if t.dtype != dt or t.device != dev:
                raise ValueError(f"megakernel: a tensor of {t.dtype} on {t.device}, the model is {dt} on {dev}")
            d = t.data_ptr() - self.base.data_ptr()
            if d % elt:
                raise ValueError("megakernel: a weight is not aligned to its element size")
            return d // elt

        offs, params, bounds = [], [], []
        self.n_qkv = triton.cdiv(self.nqkv, self.bq)
        from .kernels import block_size

        self.block_s = block_size(fast.cache_len)
        self.nb = triton.cdiv(fast.cache_len, self.block_s)
        self.n_attn = w.n_heads * self.nb
        self.n_o = triton.cdiv(H, self.bo)
        n_split_max = 1
        widest = max((fast.layer_k[li] for li in fast.layer_k), default=0) if fast.indexed else 0
        self.per = min(down_per, triton.cdiv(max(widest, 1), self.dr) * self.dr)  # core rows per split
        t = 0
        for li, lw in enumerate(w.layers):
            sparse = fast.indexed and li in fast.layer_k
            k = fast.layer_k[li] if sparse else I
            down = lw.down_t if sparse else lw.down
            offs.append([off(lw.qkv_w), off(lw.o_w), off(lw.up_w), off(down), off(lw.norm1_w), off(lw.norm2_w),
                         off(fast.k_cache[li]), off(fast.v_cache[li]), off(lw.qkv_b)])
            if sparse:
                per = self.per
                n_split = triton.cdiv(k, per)
                n_split_max = max(n_split_max, n_split)
                n_down, n_x = self.ncol * n_split, self.ncol
                params.append([fast._row[li], k, n_split, per, n_x])
            else:
                n_down = n_x = triton.cdiv(H, self.bd)
                params.append([-1, k, 1, 0, n_x])
            for n in (self.n_qkv, self.n_attn, self.n_o, triton.cdiv(k, self.bu), n_down):
                bounds.append(t)
                t += n
        self.n_lm = triton.cdiv(w.vocab, self.bl)
        bounds.append(t)
        t += self.n_lm
        bounds.append(t)
        self.total = t
        vals = [o for row in offs for o in row] + [off(w.embed), off(w.lm_head), off(w.final_w),
                                                   off(fast.cos), off(fast.sin)]
        align = 16
        while align > 1 and any(v % align for v in vals):
            align //= 2
        self.align = align
        self.woff = torch.tensor(offs, dtype=torch.int64, device=dev)
        self.lpar = torch.tensor(params, dtype=torch.int32, device=dev)
        self.nph_p2 = triton.next_power_of_2(len(bounds))
        self.bounds = torch.full((self.nph_p2,), 2 ** 31 - 1, dtype=torch.int32, device=dev)
        self.bounds[:len(bounds)] = torch.tensor(bounds, dtype=torch.int32)
        self.c_head = C_LAYER + N_PHASES * L
        self.c_col = self.c_head + L * w.n_heads
        self.n_cnt = self.c_col + L * self.ncol
        self.cnt = torch.zeros(self.n_cnt, dtype=torch.int32, device=dev)
        self.best = torch.full((1,), INT64_MIN, dtype=torch.int64, device=dev)
        self.qkv = torch.empty(self.nqkv, device=dev, dtype=dt)
        self.attn_out = torch.empty(self.nq, device=dev, dtype=dt)
        self.xa = torch.empty(H, device=dev, dtype=dt)
        self.xb = torch.empty(H, device=dev, dtype=dt)
        self.a = torch.empty(I, device=dev, dtype=dt)
        self.n_split_max = n_split_max
        self.part = torch.empty(n_split_max, H, device=dev, dtype=torch.float32)
        self.logits = torch.empty(w.vocab, device=dev, dtype=dt)
        self.m = torch.empty(w.n_heads * self.nb, device=dev, dtype=torch.float32)  # attention partials
        self.l = torch.empty_like(self.m)
        self.acc = torch.empty(w.n_heads * self.nb * w.head_dim, device=dev, dtype=torch.float32)
        self.kstride = fast._idx.shape[1] if fast._idx is not None else 1
        self.idx = fast._idx if fast._idx is not None else self.cnt
        self.act = fast._kernel_act(w.layers[0])
        self.act_up = w.layers[0].ffn_kind == "drelu"
        self.grid = None

    def _programs(self, kernel) -> int:
        """Programs of the launch: as many as the device keeps resident (``kernel``'s registers and shared
        memory), so none waits to start; 2 under the interpreter."""
        if self.base.device.type != "cuda":
            return 2
        props = torch.cuda.get_device_properties(self.base.device)
        threads = 32 * self.num_warps
        regs = max(1, kernel.n_regs) * threads
        per_sm = min(getattr(props, "regs_per_multiprocessor", 65536) // regs,
                     props.max_threads_per_multi_processor // threads)
        shared = getattr(kernel.metadata, "shared", 0) or 0
        if shared:
            per_sm = min(per_sm, getattr(props, "shared_memory_per_multiprocessor", 228 * 1024) // shared)
        return props.multi_processor_count * max(1, per_sm)

    def __call__(self, sample: bool, finish: bool) -> torch.Tensor:
        fast, w = self.fast, self.fast.w
        args = (self.base, self.woff, self.lpar, self.bounds, self.cnt, self.idx, fast.cos, fast.sin, self.qkv,
                self.attn_out, self.xa, self.xb, self.a, self.part, self.m, self.l, self.acc,
                self.logits, self.best, fast._tok, fast._pos, fast._step, fast._out, fast._temp, fast._seed,
                self._off(w.embed), self._off(w.lm_head), self._off(w.final_w), float(w.eps), w.head_dim ** -0.5,
                int(w.sliding_window or 0), self.total, self.c_head, self.c_col, self.n_qkv, self.n_o,
                self.n_lm)
        meta = dict(ALIGN=self.align, N_CNT=self.n_cnt, L=self.L, H=self.H, H_P2=self.H_P2, NQKV=self.nqkv,
                    NQ_P2=triton.next_power_of_2(self.nq), NH=w.n_heads,
                    N_KV=w.n_kv_heads, HD=w.head_dim, I=self.I, I_P2=self.I_P2, V=w.vocab, CACHE=fast.cache_len,
                    BLOCK_S=self.block_s, NB=self.nb, NB_P2=max(2, triton.next_power_of_2(self.nb)),
                    KSTRIDE=self.kstride, BQ=self.bq, BO=self.bo, BU=self.bu, BD=self.bd,
                    DN=self.dn, DR=self.dr, NCOL=self.ncol, PER=self.per, NSPLIT_P2=max(2, triton.next_power_of_2(self.n_split_max)), BL=self.bl, ACT=self.act, ACT_UP=self.act_up,
                    HAS_QB=w.layers[0].qkv_b is not None, SAMPLE=sample, FINISH=finish, num_warps=self.num_warps)
        if self.maxnreg:
            meta["maxnreg"] = self.maxnreg
        grid = self.grid
        if grid is None and self.base.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            kernel = _step_kernel.warmup(*args, grid=(1,), **meta)
            getattr(kernel, "_init_handles", lambda: None)()  # loads it: n_regs is known from here
            grid = self.grid = self._programs(kernel)
        _step_kernel[(grid or 2,)](*args, **meta)
        return self.logits

    def _off(self, t) -> int:
        return (t.data_ptr() - self.base.data_ptr()) // t.element_size()
