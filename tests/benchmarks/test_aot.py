"""The decode step's Triton kernels compiled for Hopper (sm_90) on this CPU (benchmarks/aot.py): they
build at Llama-3.1-8B's widths without spilling, the step launches the hand-counted number of kernels per
configuration, and every sparse layer runs the same binary. Skips where triton is not installed."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from benchmarks import aot  # noqa: E402


@pytest.fixture(scope="module")
def weights():
    return aot.shape_weights("llama-3.1-8b", 2, aot.torch.bfloat16)


def _layer_rows(result, lead: int, tail: int):
    """The step's launches of layer 0 and of layer 1 (``lead`` launches come before them: the first RMSNorm of
    the step with norm launches; ``tail`` after: the final norm where it has its own launch, lm_head, argmax)."""
    rows = result["step"][lead:-tail]
    half = len(rows) // 2
    return rows[:half], rows[half:]


# per layer, the default (norms folded into the GEMVs): qkv GEMV (normalising its input), attention, o GEMV
# (+ residual), gate||up GEMV (normalising), the split down product and the sum of its partial rows + residual;
# then the final norm, lm_head and argmax. With fold_norm=False: a residual + norm launch after o and after the
# down product, and the first norm before layer 0.
@pytest.mark.slow
@pytest.mark.parametrize("options, lead, tail, names", [
    ({}, 0, 3, ["_gemv_kernel", "_attn_kernel", "_gemv_kernel", "_gemv_kernel", "_gemv_rows_kernel",
                "_partial_sum_residual_kernel"]),
    ({"fold_norm": False}, 1, 2, ["_gemv_kernel", "_attn_kernel", "_gemv_kernel", "_residual_rms_kernel",
                                  "_gemv_kernel", "_gemv_rows_kernel", "_residual_rms_kernel"]),
    ({"pdl_trigger": "entry"}, 0, 3, ["_gemv_kernel", "_attn_kernel", "_gemv_kernel", "_gemv_kernel",
                                      "_gemv_rows_kernel", "_partial_sum_residual_kernel"]),
    ({"rows_config": (2048, 4, 128, 8, 3, 3)}, 0, 3, ["_gemv_kernel", "_attn_kernel", "_gemv_kernel", "_gemv_kernel",
                                                      "_gemv_rows_kernel", "_partial_sum_residual_kernel"]),
    ({"gemv_config": (1, 4096, 4, 3, 4), "gemv_config_up": (1, 4096, 4, 3, 4)}, 0, 3,
     ["_gemv_persistent_kernel", "_attn_kernel", "_gemv_persistent_kernel", "_gemv_persistent_kernel",
      "_gemv_rows_kernel", "_partial_sum_residual_kernel"]),
])
def test_step_kernels_build_for_hopper_without_spills(weights, options, lead, tail, names):
    result = aot.step_kernels("llama-3.1-8b", 0.4, options, weights=weights)
    layer0, layer1 = _layer_rows(result, lead, tail)
    assert [r["kernel"] for r in layer0] == [r["kernel"] for r in layer1] == names
    # the embedding (a PyTorch op) + the Triton launches
    assert aot.launches_per_step(result, 32) == 1 + lead + 32 * len(names) + tail
    # one binary for every layer (with norm launches, the last layer's closing norm is the final norm, which
    # keeps its weight: the others' are folded into the next layer's products)
    same = len(names) if lead == 0 else len(names) - 1
    assert [r["cubin_sha1"] for r in layer0[:same]] == [r["cubin_sha1"] for r in layer1[:same]]
    for r in result["step"] + result["selection"]:
        assert r["local"] == 0, r  # no register spills
        assert r["blocks_per_sm"] >= 1, r
    # PDL in the machine code: each kernel waits for the previous one (ACQBULK) and lets the next one launch
    # (PREEXIT) where its pdl_trigger says; the products' weights (and attention's earlier cache rows) are
    # requested before the wait, so they stream while the previous kernel runs
    trigger = "entry" if options.get("pdl_trigger") == "entry" else "after wait"
    for r in result["step"]:
        assert r["trigger"] == trigger, r
        if r["kernel"] in ("_gemv_kernel", "_attn_kernel", "_gemv_rows_kernel", "_gemv_persistent_kernel"):
            assert r["loads_before_wait"] >= 4, r
        # the persistent GEMV: 4 programs per SM of 132 (kernels.sm_count off CUDA: an H100 / H200 SXM), each
        # issuing its later blocks' rows ahead as cp.async, with room left on the SM for a program of the next kernel
        if r["kernel"] == "_gemv_persistent_kernel":
            assert r["programs"] == 4 * aot.SM90["sms"] and r["async_copies"] > 0 and r["blocks_per_sm"] > 4, r
    core = [r for r in layer0 if r["kernel"] == "_gemv_rows_kernel"][0]
    assert core["programs"] <= core["blocks_per_sm"] * aot.SM90["sms"]  # the core rows in one wave
    # the down product's row loop: plain, no load of a later block is issued ahead (one block in flight per
    # program); with loop_stages, Triton's pipeliner issues them ahead as cp.async into shared memory, two
    # 16 KB blocks (4 rows x 2048 columns, bf16) at 3 stages
    if len(options.get("rows_config", ())) == 6:
        assert core["async_copies"] > 0 and core["shared"] >= 2 * 4 * 2048 * 2, core
    else:
        assert core["async_copies"] == 0, core
    assert [r["kernel"] for r in result["selection"]] == ["_active_kernel", "_token_k_kernel", "_threshold_kernel",
                                                          "_column_kernel", "_top_kernel"]


def test_blocks_per_sm_by_hand():
    # registers are allocated per warp in units of 256: 127 regs x 32 lanes -> 4096 per warp
    assert aot.blocks_per_sm(127, 1024, 16) == 1  # 16 warps x 4096 = all 65536 registers
    assert aot.blocks_per_sm(40, 1024, 8) == 6  # 40 x 32 = 1280 per warp, 10240 per block
    assert aot.blocks_per_sm(32, 0, 4) == 16  # 64 warps / 4
    assert aot.blocks_per_sm(16, 0, 1) == 32  # the block limit
    assert aot.blocks_per_sm(32, 100 * 1024, 4) == 2  # shared memory: 227 KB / 100 KB
    assert aot.blocks_per_sm(255, 0, 16) == 0  # does not fit at all
