"""The decode-attention kernels vs plain PyTorch on CPU, through Triton's interpreter.

    TRITON_INTERPRET=1 python -m benchmarks.interpreter_check     (from the repo root; run by tests/benchmarks/test_interpreter_check.py)
"""

import os

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from coreinfer.runtime.cuda import kernels  # noqa: E402  (import after the interpreter switch)


def rot(x):
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], -1)


torch.manual_seed(0)
S = 80
for nh, nkv, hd, window, rope, pos, block in [
        (4, 2, 16, None, True, 70, 16), (4, 4, 32, None, False, 63, 32), (6, 2, 16, 5, True, 64, 16),
        (4, 2, 16, None, True, 0, 16), (4, 1, 16, 100, True, 79, 128), (4, 2, 16, None, True, 70, 128)]:
    qkv = torch.randn(nh * hd + 2 * nkv * hd)
    kc, vc = torch.randn(1, nkv, S, hd), torch.randn(1, nkv, S, hd)
    cos, sin = torch.randn(S, hd), torch.randn(S, hd)
    kc0, vc0 = kc.clone(), vc.clone()
    out = torch.full((nh * hd,), float("nan"))
    attn = kernels.DecodeAttention(nh, nkv, hd, S, "cpu", window, block=block)  # several blocks, or one
    attn(qkv, cos if rope else None, sin if rope else None, kc, vc, torch.tensor([pos]), out, hd ** -0.5)
    q = qkv[:nh * hd].view(nh, hd)
    k = qkv[nh * hd:(nh + nkv) * hd].view(nkv, hd)
    v = qkv[(nh + nkv) * hd:].view(nkv, hd)
    if rope:
        q, k = q * cos[pos] + rot(q) * sin[pos], k * cos[pos] + rot(k) * sin[pos]
    kc0[0, :, pos], vc0[0, :, pos] = k, v
    g = nh // nkv
    lo = 0 if window is None else max(0, pos - window + 1)
    ref = torch.cat([((kc0[0, h // g, lo:pos + 1] @ q[h]) * hd ** -0.5).softmax(0) @ vc0[0, h // g, lo:pos + 1]
                     for h in range(nh)])
    assert (out - ref).abs().max().item() < 1e-5, (out - ref).abs().max()
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)  # wrote exactly the new row, nothing else
    print("ok")

# the decode GEMV: plain, bias + ReLU (OPT fc1), gated SiLU (gate||up), dReLU; K a multiple of the block or not
import torch.nn.functional as F  # noqa: E402

for n, k in [(20, 64), (7, 576), (9, 2100)]:
    w, x, b = torch.randn(2 * n, k), torch.randn(k), torch.randn(2 * n)
    top = w[:n].contiguous()
    for got_fn, want in [
        (lambda o: kernels.gemv(top, x, o), top @ x),
        (lambda o: kernels.gemv(top, x, o, b[:n], act=kernels.ACT_RELU), F.relu(top @ x + b[:n])),
        (lambda o: kernels.gemv(w, x, o, gated=True, act=kernels.ACT_SILU), F.silu(w[:n] @ x) * (w[n:] @ x)),
        (lambda o: kernels.gemv(w, x, o, gated=True, act=kernels.ACT_RELU, act_up=True), F.relu(w[:n] @ x) * F.relu(w[n:] @ x)),
    ]:
        out = torch.full((n,), float("nan"))
        got_fn(out)
        assert ((out - want).norm() / want.norm()).item() < 1e-5, ((out - want).norm() / want.norm())
print("gemv ok")

# the persistent GEMV (a fifth config entry, programs per SM): 132 programs off CUDA (kernels.sm_count), so 300
# outputs give some programs three blocks and the rest two; the same outputs as the one-program-per-block kernel,
# for every epilogue (checked against PyTorch above): plain, bias + ReLU, gated by index, dReLU, the folded norm and
# the residual; a row of more than one tile (K > BLOCK_K) takes the one-program-per-block kernel
n, k, n_all = 300, 96, 400
gu, x, b, res = torch.randn(2 * n_all, k), torch.randn(k), torch.randn(2 * n_all), torch.randn(n)
idx = torch.randperm(n_all)[:n].sort().values.to(torch.int32)
top = gu[:n].contiguous()
for kw in [dict(w=top), dict(w=top, bias=b[:n], act=kernels.ACT_RELU), dict(w=gu, gated=True, act=kernels.ACT_SILU, idx=idx),
           dict(w=gu, gated=True, act=kernels.ACT_RELU, act_up=True, idx=idx), dict(w=top, norm_eps=1e-5, residual=res),
           dict(w=gu, gated=True, act=kernels.ACT_SILU, idx=idx, norm_eps=1e-6)]:
    wt = kw.pop("w")
    got, want = torch.full((n,), float("nan")), torch.full((n,), float("nan"))
    kernels.gemv(wt, x, got, config=(1, 128, 4, 3, 1), **kw)
    kernels.gemv(wt, x, want, config=(1, 128, 4, 3), **kw)
    assert torch.equal(got, want), (kw, (got - want).abs().max())  # every output written (NaN != NaN)
wide = torch.randn(n, 200)
got, want = torch.full((n,), float("nan")), wide @ torch.ones(200)
kernels.gemv(wide, torch.ones(200), got, config=(1, 128, 4, 3, 1))
assert ((got - want).norm() / want.norm()).item() < 1e-5
try:
    kernels.gemv(top, x, got, config=(1, 128, 4, 0, 1))
    raise AssertionError("a persistent GEMV without a pipeline stage was accepted")
except ValueError as err:
    assert "programs per SM must be >= 0 and its loop's num_stages >= 1, got 1, 0" in str(err), err
print("persistent gemv ok")

# the gather-free sparse decode's GEMVs: core rows read in place by index (gate||up, fc1 + bias), and the
# vector times indexed rows of the transposed down projection (one launch, or split + ordered sum)
for n_all, k, h in [(50, 13, 64), (40, 7, 576), (300, 130, 96)]:
    gu, x = torch.randn(2 * n_all, h), torch.randn(h)
    idx = torch.randperm(n_all)[:k].sort().values.to(torch.int32)
    il = idx.long()
    out = torch.full((k,), float("nan"))
    kernels.gemv(gu, x, out, gated=True, act=kernels.ACT_SILU, idx=idx)
    want = F.silu(gu[il] @ x) * (gu[n_all + il] @ x)
    assert ((out - want).norm() / want.norm()).item() < 1e-5
    fc1, b = gu[:n_all].contiguous(), torch.randn(n_all)
    kernels.gemv(fc1, x, out, b, act=kernels.ACT_RELU, idx=idx)
    want = F.relu(fc1[il] @ x + b[il])
    assert ((out - want).norm() / want.norm()).item() < 1e-5
    down_t, a, bias = torch.randn(n_all, h), torch.randn(k), torch.randn(h)
    for config in [(32, 16, 1, 4, 2), (64, 8, 3, 4, 2), (16, 4, 8, 4, 2), (4096, 2, 16, 4, 2), (16, 4, 8, 4, 2, 3),
                   (64, 2, 3, 4, 2, 2)]:
        split = kernels.gemv_rows_split(h, k, config)
        part = torch.full((split, h), float("nan"))
        for bb in (None, bias):
            out = torch.full((h,), float("nan"))
            kernels.gemv_rows(down_t, a, out, idx, bb, part, config=config)
            want = a @ down_t[il] + (0 if bb is None else bb)
            assert ((out - want).norm() / want.norm()).item() < 1e-5, (config, split)
            if len(config) == 6:  # the pipelined loop: the same products in the same order as the plain one
                plain = torch.full((h,), float("nan"))
                kernels.gemv_rows(down_t, a, plain, idx, bb, part.clone(), config=config[:5])
                assert torch.equal(out, plain), config
    try:
        kernels.gemv_rows(down_t, a, out, idx, None, part, config=(16, 4, 8, 4, 2, 1))
        raise AssertionError("loop_stages 1 was accepted")
    except ValueError as err:
        assert "loop_stages must be 0 (no pipelining) or >= 2, got 1" in str(err), err
    out = torch.full((h,), float("nan"))
    kernels.gemv_rows(down_t[:k].contiguous(), a, out, None, None, torch.empty(8, h), config=(32, 4, 2, 4, 2))
    assert ((out - a @ down_t[:k]).norm() / (a @ down_t[:k]).norm()).item() < 1e-5
print("gemv_rows passed")

# residual add + RMSNorm in one launch (y: none, a vector, or split partial rows + bias; several programs, the
# last one normalising) and argmax + step counters, each launched twice (the atomic counters reset themselves)
from benchmarks import partial_sum_ab  # noqa: E402
from coreinfer.runtime.cuda.fastlm import rms_norm  # noqa: E402

for hid, dtype in [(64, torch.float32), (576, torch.float32), (300, torch.bfloat16), (2048, torch.bfloat16)]:
    scratch = kernels.StepScratch(hid, 1000, "cpu")
    wn = (1 + 0.1 * torch.randn(hid)).to(dtype)
    for _ in range(2):
        x, y, part, b = torch.randn(hid).to(dtype), torch.randn(hid).to(dtype), torch.randn(3, hid), torch.randn(hid).to(dtype)
        for yy, bias, s_ref in [(None, None, x), (y, None, x + y),
                                (part, b, x + (part[0] + part[1] + part[2] + b.float()).to(dtype))]:
            xo, ho = kernels.residual_rms_norm(x, yy, wn, 1e-5, scratch, bias)
            ref = rms_norm(s_ref, wn, 1e-5).float()
            if dtype == torch.float32:
                assert torch.equal(xo, s_ref), (hid, dtype)
                assert (ho - ref).abs().max().item() < 1e-5, (hid, dtype)
            else:  # the interpreter rounds float32 -> bf16 by truncation (the GPU rounds to nearest): a few ulps
                assert ((xo.float() - s_ref.float()).norm() / s_ref.float().norm()).item() < 1e-2, (hid, dtype)
                assert ((ho.float() - ref).norm() / ref.norm()).item() < 1e-2, (hid, dtype)
        xo, ho = kernels.residual_rms_norm(x, y, None, 1e-5, scratch)  # no weight (folded into the next product)
        ref = rms_norm(x + y, None, 1e-5).float()
        assert ((ho.float() - ref).norm() / ref.norm()).item() < (1e-5 if dtype == torch.float32 else 1e-2)
        for rows in (part, torch.randn(130, hid)):  # the sum alone (fold_norm): every partial row in one tile
            xo, none = kernels.residual_rms_norm(x, rows, None, 1e-5, scratch, b, norm=False)
            s_ref = x + (rows.sum(0) + b.float()).to(dtype)
            assert none is None
            assert ((xo.float() - s_ref.float()).norm() / s_ref.float().norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)
            xl, _ = partial_sum_ab.loop_sum(x, rows, None, 1e-5, scratch, b, norm=False)  # the A/B's other form
            assert ((xl.float() - s_ref.float()).norm() / s_ref.float().norm()).item() < (1e-6 if dtype == torch.float32 else 1e-2)
    assert int(scratch.counts.abs().sum()) == 0
# the GEMV normalising its own input (norm_eps: the norm weight folded into W) and adding a residual
for n, k in [(40, 300), (7, 64)]:
    w, x, r = torch.randn(n, k), torch.randn(k) * 3, torch.randn(n)
    out = torch.full((n,), float("nan"))
    kernels.gemv(w, x, out, norm_eps=1e-6, residual=r, config=(2, 128, 4, 2))
    want = r + w @ (x * torch.rsqrt(x.pow(2).mean() + 1e-6))
    assert ((out - want).norm() / want.norm()).item() < 1e-5, (n, k)
for v in (7, 5000, 128256):
    scratch = kernels.StepScratch(64, v, "cpu")
    tok, pos, step, out = torch.zeros(1, dtype=torch.long), torch.tensor([9]), torch.tensor([2]), torch.zeros(8, dtype=torch.long)
    logits = torch.randn(v).to(torch.bfloat16)
    logits[v // 3] = logits[v - 1] = logits.max() + 1  # a tie: the first index wins, as torch.argmax
    kernels.argmax_step(logits, tok, pos, step, out, scratch)
    assert int(tok) == int(out[2]) == int(torch.argmax(logits)) == v // 3 and int(pos) == 10 and int(step) == 3
    logits[v - 1] = float("nan")
    kernels.argmax_step(logits, tok, pos, step, out, scratch)
    assert int(out[3]) == v - 1 and int(pos) == 11 and int(step) == 4 and int(scratch.counts.abs().sum()) == 0
print("residual norm + argmax passed")

# the same launch drawing the token (Gumbel-max): frequencies follow softmax(logits / t) over the logits >= the
# cutoff, a draw is a function of (seed, step) alone, and the counters advance as in the greedy launch
v = 6
scratch = kernels.StepScratch(64, v, "cpu")
logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
for t, cutoff in ((1.0, None), (0.5, None), (2.0, 0.5)):
    temp, seed = torch.tensor([t]), torch.tensor([1234], dtype=torch.long)
    cut = None if cutoff is None else torch.tensor([cutoff])
    n = 500
    tok, pos, step, out = torch.zeros(1, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        kernels.argmax_step(logits, tok, pos, step, out, scratch, sample=(cut, temp, seed))
    assert int(step) == n and int(pos) == n and int(scratch.counts.abs().sum()) == 0
    counts = torch.bincount(out, minlength=v).float() / n
    allowed = torch.ones(v, dtype=torch.bool) if cutoff is None else logits >= cutoff
    want = torch.softmax((logits / t).masked_fill(~allowed, float("-inf")), 0)
    assert counts[~allowed].sum() == 0, (t, cutoff, counts)
    assert (counts - want).abs().max().item() < 0.09, (t, cutoff, counts, want)  # 500 draws: ~4 sigma
    again = torch.zeros(n, dtype=torch.long)
    step.zero_()
    for i in (0, 1, 2, 3):
        kernels.argmax_step(logits, tok, pos, step, again, scratch, sample=(cut, temp, seed))
    assert torch.equal(again[:4], out[:4]), (again[:4], out[:4])
print("sampling draw passed")

# the core-set statistics kernels vs selection.py's PyTorch definition on adversarial inputs: counts and float64
# sums bit-identical, the same kept neurons
from coreinfer.runtime import selection  # noqa: E402
from coreinfer.runtime.cuda import select_kernels  # noqa: E402


def adversarial_acts(L, T, I, dtype, g):
    a = torch.randn(L, T, I, generator=g).to(dtype)
    a[0] = (a[0] * 2).round() / 2  # many exact ties, zeros
    a[-1, :, : I // 3] = 0.5  # a block of equal scores: ties at the threshold
    a[-1, -1] = -1.0  # no active neuron (positive score); all active, all tied (magnitude)
    if T > 2:
        a[-1, 1] = 0.0  # an all-zero token
    if T > 3:
        a[-1, 2, 2:] = 0.0  # 2 active neurons: fewer than k, all taken
    fi = torch.finfo(dtype)
    extremes = [fi.max, -fi.max, fi.tiny, -fi.tiny]
    if dtype != torch.bfloat16:  # the interpreter's bf16 -> fp32 conversion flushes subnormals (a GPU does not)
        extremes += [fi.tiny * fi.eps, -fi.tiny * fi.eps, fi.tiny * fi.eps * 3, fi.tiny / 2]  # subnormals
    extremes = torch.tensor(extremes, dtype=torch.float64).to(dtype)
    n = min(I, len(extremes))
    a[0, -1, :n] = extremes[:n]
    a[0, 0, -n:] = extremes[:n].flip(0)
    return a


g = torch.Generator().manual_seed(1)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for score in ("positive", "magnitude"):
        for L, T, I in [(3, 9, 50), (2, 5, 33), (1, 1, 8), (1, 1, 37), (2, 6, 130)]:
            a = adversarial_acts(L, T, I, dtype, g)
            s = selection.neuron_scores(a.float(), score)
            sums = selection.ordered_token_sum(s)
            for alpha in (0.05, 0.4, 1.0):
                c2 = selection._token_core_mask3(s, alpha).sum(1)
                c1, s1 = select_kernels.layer_statistics(a, alpha, score)
                assert torch.equal(c1, c2), (dtype, score, L, T, I, alpha)
                assert torch.equal(s1, sums), (dtype, score, L, T, I, alpha)
            k = max(1, I // 3)
            want = selection.top_neurons(selection.layer_statistics(a, 0.4, score)[0], k, sums)
            assert torch.equal(select_kernels.select(a, 0.4, score, k), want), (dtype, score)
            # written into rows of a larger buffer (layer_statistics(out=...))
            if L > 1:
                for cdt in (torch.int32, torch.int64):
                    cb, sb = torch.full((L, I), -3, dtype=cdt), torch.full((L, I), float("nan"), dtype=torch.float64)
                    for j0, j1 in ((0, 1), (1, L)):
                        select_kernels.layer_statistics(a[j0:j1], 0.4, score, out=(cb[j0:j1], sb[j0:j1]))
                    c_ref = selection._token_core_mask3(s, 0.4).sum(1)
                    assert torch.equal(cb.long(), c_ref) and torch.equal(sb, sums), (dtype, score, cdt)
            # the first T token rows of a longer buffer (the captured prefill's), read in place
            buf = torch.full((L, T + 3, I), 7.0, dtype=dtype)
            buf[:, :T] = a
            view = buf[:, :T]
            c3, s3 = select_kernels.layer_statistics(view, 0.4, score)
            assert torch.equal(c3, selection._token_core_mask3(s, 0.4).sum(1)) and torch.equal(s3, sums), (dtype, score)
            assert torch.equal(select_kernels.select(view, 0.4, score, k), want), (dtype, score)
            # the whole padded buffer (the captured prefill's), its prompt length read on the device, each layer into
            # its row of a wider index buffer (as with per-layer k), int32 and int64: the padding rows are active
            # (7.0) and would change every count if read
            for n_dt, out_dt in ((torch.int64, torch.int32), (torch.int32, torch.int64)):
                n_tok = torch.tensor([T], dtype=n_dt)
                c4, s4 = select_kernels.layer_statistics(buf, 0.4, score, n_tokens=n_tok)
                assert torch.equal(c4, c3) and torch.equal(s4, sums), (dtype, score, n_dt)
                idx = torch.full((L, k + 5), -9, dtype=out_dt)
                for j in range(L):
                    got = select_kernels.select(buf[j:j + 1], 0.4, score, k, n_tokens=n_tok, out=idx[j:j + 1])
                    assert got.data_ptr() == idx[j].data_ptr() and got.shape == (1, k)
                assert torch.equal(idx[:, :k].long(), want) and bool((idx[:, k:] == -9).all()), (dtype, score, out_dt)
g = torch.Generator().manual_seed(2)
for L, I, T in [(3, 40, 6), (2, 300, 100), (1, 9, 1), (5, 70, 256)]:
    counts = torch.randint(0, T + 1, (L, I), generator=g)
    sums = torch.randn(L, I, generator=g, dtype=torch.float64)
    sums[0] = (sums[0] * 2).round() / 2  # ties on the sum (and on the count): the index decides
    sums[-1, : I // 2] = 0.0
    if L > 2:
        sums[1] = -sums[1].abs()
    if L > 3:
        counts[2] = T  # every count the largest possible: the sums decide
        sums[2, :8] = torch.tensor([1.7e308, -1.7e308, 5e-324, -5e-324, 2.2e-308, -2.2e-308, 1e-300, 5e-324])
        counts[3] = 0
        sums[3] = sums[3].abs() * 1e-310  # subnormal sums
        counts[4] = counts[4] % 3  # a few counts, many tied
    for k in sorted({1, I // 3, I // 2, I - 1, I}):
        if k >= 1:
            want = selection.top_neurons(counts, k, sums)
            assert torch.equal(select_kernels.top_neurons(counts, sums, k, T), want), (L, I, T, k)
    a = torch.randn(L, T, I).to(torch.bfloat16)
    want = selection.stability_select_layers(a, 0.4, max(1, I // 3) / I)
    assert torch.equal(select_kernels.select(a, 0.4, "positive", max(1, I // 3)), want)
print("select_kernels passed")

# the gather-free decode end to end (tiny models, float32, CPU): gemv="triton" reads the core rows in place
# (the Llama step with its fused residual + RMSNorm launches, or unfused), gemv="torch" (and the Triton
# GEMVs with gather_free=False) decode from gathered compact buffers; same core sets -> same logits
import transformers  # noqa: E402

from coreinfer.runtime.cuda.bench import step_variant  # noqa: E402
from coreinfer.runtime.cuda.fastlm import FastLM, FastWeights  # noqa: E402

for family in ("llama", "opt"):
    torch.manual_seed(3)
    common = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=97, max_position_embeddings=128)
    cfg = (transformers.LlamaConfig(intermediate_size=160, num_key_value_heads=2, **common) if family == "llama"
           else transformers.OPTConfig(ffn_dim=160, word_embed_proj_dim=64, do_layer_norm_before=True, **common))
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    w = FastWeights.from_hf(model)
    g = torch.Generator().manual_seed(5)
    prompt, cont = torch.randint(0, 97, (15,), generator=g), torch.randint(0, 97, (5,), generator=g)
    ref, core_ref = FastLM(w, max_seq_len=32, kept_fraction=0.3, sparse_layers=range(1, 3)).forced_logits(prompt, cont)
    for fused in ((True, False) if family == "llama" else (False,)):
        idx_lm = step_variant(w, {"gemv": "triton", "fused_norm": fused}, max_seq_len=32, kept_fraction=0.3,
                              sparse_layers=range(1, 3))
        assert idx_lm.indexed and idx_lm.c_up[1] is None and idx_lm.fused_norm == fused and idx_lm.fold_norm == fused
        got, core = idx_lm.forced_logits(prompt, cont)
        assert all(torch.equal(core[i], core_ref[i]) for i in core)
        err = (got - ref).abs().max().item()
        assert err < 1e-4, (family, fused, err)
    # the benchmark variant gather_free=False: the gathered compact buffers through the Triton GEMVs
    compact = step_variant(w, {"gemv": "triton", "gather_free": False}, max_seq_len=32, kept_fraction=0.3,
                           sparse_layers=range(1, 3))
    assert not compact.indexed and compact.c_up[1] is not None and compact.c_up[0] is None
    got, core = compact.forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) for i in core)
    assert (got - ref).abs().max().item() < 1e-4, (family, "compact")
    if family == "llama":  # the step with its norm launches (fold_norm=False) and the default (folded), dense
        for step, kw in (({"fold_norm": False}, {}), ({"fold_norm": False, "gather_free": False}, {}),
                         ({"fold_norm": False}, {"kept_fraction": None}), ({}, {"kept_fraction": None})):
            kw = {"kept_fraction": 0.3, "sparse_layers": range(1, 3), **kw}
            lm = step_variant(w, {"gemv": "triton", **step}, max_seq_len=32, **kw)
            got, core = lm.forced_logits(prompt, cont)
            want, core_want = FastLM(w, max_seq_len=32, **kw).forced_logits(prompt, cont)
            assert lm.fold_norm == (step.get("fold_norm") is not False)
            assert all(torch.equal(core[i], core_want[i]) for i in core)
            assert (got - want).abs().max().item() < 1e-4, (family, step, kw)
    # per-layer core-set sizes (a calibrated budget): rows of different lengths in the one index buffer
    lk = {0: 20, 2: 57}
    got, core = step_variant(w, {"gemv": "triton"}, max_seq_len=32, layer_k=lk).forced_logits(prompt, cont)
    ref, core_ref = FastLM(w, max_seq_len=32, layer_k=lk).forced_logits(prompt, cont)
    assert all(torch.equal(core[i], core_ref[i]) and core[i].numel() == lk[i] for i in lk)
    assert (got - ref).abs().max().item() < 1e-4, (family, "layer_k")
print("indexed decode passed")
