"""benchmarks/memory_budget.py end to end on the CPU (the tiny shape): every step runs, ours decodes the in-memory
fast path's tokens, the bus bytes are the plan's, and a kept fraction that does not fit becomes an error row
followed by a row at the largest one that does. No timing is asserted."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from benchmarks import memory_budget  # noqa: E402


def test_dry_run_on_cpu(tmp_path):
    result = memory_budget.run(shape="tiny", budget="287MB", kept=(0.4, 0.9), prompt_len=16, new_tokens=8, repeats=1,
                               device="cpu", log=lambda m: None)
    ours = {r["kept_fraction"]: r for r in result["ours"]}
    assert not ours[0.9]["fits"] and "largest kept fraction that fits" in ours[0.9]["error"]
    largest = result["largest_kept_fraction_that_fits"]
    assert 0.4 < largest < 0.9 and ours[largest]["fits"]
    mem = {r["kept_fraction"]: r for r in result["in_memory"]}
    assert sorted(mem) == sorted([0.4, largest])
    for kf in (0.4, largest):
        row = ours[kf]
        assert row["tokens"] == mem[kf]["tokens"]  # float32 on the CPU: the same greedy tokens
        assert row["stability"]["bus_bytes"] == row["plan"]["streamed_bytes_per_dense_prefill"] > 0
        assert row["similarity_resident"]["bus_bytes"] == 0 and row["similarity_resident"]["sets_from"] == "resident"
        # a cluster never seen: the streamed layers' core rows (gate, up, down; H = 256, float32) from host memory
        host = row["similarity_from_host"]
        assert host["sets_from"] == "gathered" and host["bus_bytes"] == len(row["plan"]["streamed"]) * 3 * 256 * row["k"] * 4
        assert 0 < host["bus_bytes"] < row["stability"]["bus_bytes"]
        dense = row["similarity_dense_prefill"]
        assert dense["sets_from"] == "prefill" and dense["bus_bytes"] == row["stability"]["bus_bytes"]
    assert result["baseline"]["decode_tok_s"] > 0 and len(result["baseline"]["tokens"]) == 5
    assert [r["kept_fraction"] for r in result["ratios"]] == [0.4, largest]
    for r in result["ratios"]:  # what main prints: every TTFT of the row, the non-resident similarity one included
        assert set(r["ttft_ms"]) == {"stability", "similarity_resident", "similarity_from_host", "similarity_dense_prefill"}
        assert r["ttft_ms"]["similarity_from_host"] == ours[r["kept_fraction"]]["similarity_from_host"]["ttft_ms"] > 0
        assert r["ttft_similarity_from_host_vs_baseline"] > 0
    json.dumps(result, default=str)  # what main writes


def test_main_rejects_a_malformed_budget(tmp_path, capsys):
    assert memory_budget.main(["--out", str(tmp_path), "--budget", "12 gigs"]) == 2
    assert "is not a size" in capsys.readouterr().err


def test_a_failing_row_keeps_the_others(monkeypatch, tmp_path):
    real = memory_budget.in_memory

    def flaky(weights, kept, *args, **kwargs):
        if kept == 0.2:
            raise RuntimeError("boom")
        return real(weights, kept, *args, **kwargs)

    monkeypatch.setattr(memory_budget, "in_memory", flaky)
    steps = []
    result = memory_budget.run(shape="tiny", budget="287MB", kept=(0.2, 0.4), prompt_len=16, new_tokens=8, repeats=1,
                               device="cpu", baseline=False, log=lambda m: None, on_step=lambda r: steps.append(1))
    rows = {r["kept_fraction"]: r for r in result["in_memory"]}
    assert rows[0.2]["failed"] and "RuntimeError: boom" in rows[0.2]["error"]
    assert rows[0.4]["decode_tok_s"] > 0 and len(steps) == 4  # two rows of ours, two in-memory rows
    assert [r["kept_fraction"] for r in result["ratios"]] == [0.2, 0.4]
    assert "decode_vs_in_memory" not in result["ratios"][0] and "decode_vs_in_memory" in result["ratios"][1]
