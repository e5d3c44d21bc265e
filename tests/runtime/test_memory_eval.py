"""``coreinfer eval --memory-budget`` (issue 11): the flag reaches ``SparseLM.from_pretrained(memory_budget=...)``
through the eval's one loader, an evaluation of a tiny model under a budget that streams its sparse layers gives
the metrics of the same evaluation without one (float32, CPU: the eager offloaded path), and bad budgets give
generate's one-line errors before any weight reaches the device."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from coreinfer.pipeline.evaluate import cli, runner  # noqa: E402
from coreinfer.pipeline.evaluate import tasks as T  # noqa: E402
from coreinfer.runtime.memory import ModelShape, plan_memory  # noqa: E402
from coreinfer.runtime.offload import OffloadedSparseLM  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402
from tests.pipeline.eval_helpers import make_data_dir  # noqa: E402

KEPT = "0.25,0.5"
LAYERS = "0:4"
ARGS = ["--methods", "dense,stability,griffin,random,oracle-token,svd-predictor,static", "--static-source", "profile",
        "--svd-rank", "8", "--kept", KEPT, "--scores", "magnitude", "--tasks", "agreement,wikitext,truthfulqa_mc,gsm8k",
        "--limit", "2", "--layers", LAYERS, "--seed", "3", "--no-progress", "--json"]


@pytest.fixture()
def data(tmp_path, monkeypatch):
    d = make_data_dir(tmp_path)
    monkeypatch.setenv("COREINFER_DATA", str(d))
    # tasks small enough for CI: few tokens per item
    small = dict(T.DEFAULT_TASK_CONFIG, agreement=T.TaskConfig(continuation=6), wikitext=T.TaskConfig(prefix=12, window=40),
                 gsm8k=T.TaskConfig(shots=1, max_new_tokens=6), truthfulqa_mc=T.TaskConfig(shots=0))
    monkeypatch.setattr(T, "DEFAULT_TASK_CONFIG", small)
    return d


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    """A tiny random Llama saved as a Hugging Face folder (what --model takes)."""
    model, _ = build_tiny("llama", tokenizer, seed=5)
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.config


def _streaming_budget(config) -> int:
    """Bytes for what decoding needs at the largest --kept, the prefill workspace and two staging buffers: every
    sparse layer's dense FFN streams (the plan eval makes: kept max(--kept), --layers, the model's 256 positions)."""
    shape = ModelShape.from_config(config)
    big = plan_memory(shape, "1TiB", dtype=torch.float32, kept_fraction=0.5, sparse_layers=range(0, 4),
                      context_length=256)
    p = big.parts
    base = sum(p[k] for k in ("attention", "embeddings", "lm_head_norm", "kv_cache", "workspace", "core_ffn",
                              "dense_ffn_outside_sparse"))
    return base + 2 * big.dense_layer_bytes + 8


def test_cli_parses_the_budget_into_the_config():
    args = cli.build_parser().parse_args(["--memory-budget", "12GiB", "--kept", "0.2,0.4"])
    assert cli.config_from_args(args).memory_budget == "12GiB"
    assert cli.config_from_args(cli.build_parser().parse_args([])).memory_budget is None
    assert "--memory-budget BUDGET" in cli.build_parser().format_help()


def test_eval_under_a_budget_gives_the_metrics_without_one(model_dir, data, tmp_path, monkeypatch, capsys):
    folder, config = model_dir
    loaded = []
    real = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda cfg: loaded.append(real(cfg)) or loaded[-1])
    common = ["--model", str(folder), "--device", "cpu", "--dtype", "float32", *ARGS]
    assert cli.main([*common, "--out", str(tmp_path / "dense")]) == 0
    want = json.loads(capsys.readouterr().out)
    budget = _streaming_budget(config)
    assert cli.main([*common, "--out", str(tmp_path / "budget"), "--memory-budget", str(budget)]) == 0
    got = json.loads(capsys.readouterr().out)
    plain, offloaded = loaded
    assert not isinstance(plain, OffloadedSparseLM)
    assert isinstance(offloaded, OffloadedSparseLM) and offloaded.offload.fast is None
    plan = offloaded.offload.plan
    assert plan.budget == budget and plan.streamed == [0, 1, 2, 3] and plan.staging_buffers == 2
    assert set(plan.layer_k.values()) == {64}  # k at the largest --kept (0.5 of 128)
    assert offloaded.offload.total_bus_bytes > 0  # the sparse layers' dense FFN really streamed
    rows = {t: s["rows"] for t, s in want["tasks"].items()}
    assert set(rows) == {"agreement", "wikitext", "truthfulqa_mc", "gsm8k"}
    n = 0
    for task, want_rows in rows.items():
        got_rows = got["tasks"][task]["rows"]
        assert [(r["method"], r["kept"]) for r in got_rows] == [(r["method"], r["kept"]) for r in want_rows]
        for a, b in zip(want_rows, got_rows):
            for key, v in a.items():
                if isinstance(v, float) and key != "seconds" and "time" not in key:
                    assert b[key] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), (task, a["method"], key)
                    n += 1
                elif not isinstance(v, float):
                    assert b[key] == v, (task, a["method"], key)
    assert n > 50


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_malformed_budget_is_one_line_before_the_model_loads(data, tmp_path, capsys):
    # the model does not exist: the budget is refused before anything is loaded
    for bad in ("12 gigs", "-1", "0"):
        rc = cli.main(["--model", str(tmp_path / "no-such-model"), "--device", "cpu", "--memory-budget", bad, *ARGS,
                       "--out", str(tmp_path / "out")])
        assert rc == 2
        err = _error_line(capsys)
        assert err.startswith(f"coreinfer eval: error: memory budget '{bad}' is not ") and "12GiB" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_budget_without_a_gpu_is_one_line(data, tmp_path, capsys):
    rc = cli.main(["--model", str(tmp_path / "no-such-model"), "--memory-budget", "12GiB", *ARGS,
                   "--out", str(tmp_path / "out")])
    assert rc == 2
    err = _error_line(capsys)
    assert "coreinfer eval: error: a memory budget was given but no CUDA GPU is available; pass device='cpu'" in err


def test_too_small_budget_is_one_line_before_any_weight_moves(model_dir, data, tmp_path, monkeypatch, capsys):
    folder, _ = model_dir
    from coreinfer.runtime import offload

    placed = []
    monkeypatch.setattr(offload, "_place", lambda *a, **k: placed.append(1))
    rc = cli.main(["--model", str(folder), "--device", "cpu", "--memory-budget", "1MB", *ARGS,
                   "--out", str(tmp_path / "out")])
    assert rc == 2 and not placed
    err = _error_line(capsys)
    assert err.startswith("coreinfer eval: error: memory budget 1.00 MB (0.95 MiB) is below what must stay on the GPU")
    assert "raise the budget" in err
