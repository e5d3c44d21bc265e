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


def _layer_rows(result):
    """The step's launches of layer 0 and of layer 1 (the first RMSNorm comes before them, lm_head and argmax
    after)."""
    rows = result["step"][1:-2]
    half = len(rows) // 2
    return rows[:half], rows[half:]


# per layer: qkv GEMV, attention, o GEMV, residual+norm, then the FFN: gate||up GEMV + down product (two
# launches), then residual+norm
@pytest.mark.slow
@pytest.mark.parametrize("options, per_layer, ffn_kernels", [
    ({}, 7, ["_gemv_kernel", "_gemv_rows_kernel"]),
])
def test_step_kernels_build_for_hopper_without_spills(weights, options, per_layer, ffn_kernels):
    result = aot.step_kernels("llama-3.1-8b", 0.4, options, weights=weights)
    layer0, layer1 = _layer_rows(result)
    assert len(layer0) == len(layer1) == per_layer
    # embedding + first norm + the layers + lm_head + argmax
    assert aot.launches_per_step(result, 32) == 1 + 1 + 32 * per_layer + 2
    names = [r["kernel"] for r in layer0]
    assert names[:3] == ["_gemv_kernel", "_attn_kernel", "_gemv_kernel"] and names[-1] == "_residual_rms_kernel"
    assert [n for n in names[3:-1] if n != "_residual_rms_kernel"] == ffn_kernels
    assert [r["cubin_sha1"] for r in layer0] == [r["cubin_sha1"] for r in layer1]  # one binary for every layer
    for r in result["step"] + result["selection"]:
        assert r["local"] == 0, r  # no register spills
        assert r["blocks_per_sm"] >= 1, r
    core = [r for r in layer0 if r["kernel"] == "_gemv_rows_kernel"][0]
    assert core["programs"] <= core["blocks_per_sm"] * aot.SM90["sms"]  # the core rows in one wave
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
