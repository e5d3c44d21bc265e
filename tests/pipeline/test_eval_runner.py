"""The evaluation runner end to end on a tiny random Llama and a miniature data folder: the CI smoke
evaluation, resumability, outputs, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from coreinfer.pipeline.evaluate import cli, runner
from coreinfer.pipeline.evaluate import tasks as T
from coreinfer.pipeline.evaluate.methods import MethodError
from coreinfer.pipeline.evaluate.runner import EvalConfig, EvalError

from .eval_helpers import make_data_dir, write_jsonl

SMALL_TASKS = {
    "agreement": T.TaskConfig(continuation=6),
    "wikitext": T.TaskConfig(prefix=12, window=40),
    "nq_open": T.TaskConfig(shots=1, max_new_tokens=4),
    "gsm8k": T.TaskConfig(shots=1, max_new_tokens=6),
    "truthfulqa_mc": T.TaskConfig(shots=0),
    "truthfulqa_gen": T.TaskConfig(shots=1, max_new_tokens=6),
}


@pytest.fixture()
def data(tmp_path, monkeypatch):
    d = make_data_dir(tmp_path)
    monkeypatch.setenv("COREINFER_DATA", str(d))
    return d


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", methods=["dense", "stability", "griffin", "random", "oracle-token", "svd-predictor",
                                       "static"],
                kept=[0.5, 1.0], scores=["positive"], tasks=["agreement", "wikitext"], limit=2, layers="1:3",
                out=str(tmp_path / "out"), static_source="profile", svd_rank=8, profile_gsm8k=2, progress=False,
                task_config=dict(SMALL_TASKS))
    base.update(kw)
    return EvalConfig(**base)


def test_smoke_evaluation_every_task(tiny_llama, data, tmp_path):
    lm, _ = tiny_llama
    cfg = _cfg(tmp_path, tasks=["agreement", "wikitext", "nq_open", "gsm8k", "truthfulqa_mc", "truthfulqa_gen"],
               kept=[0.5])
    summary = runner.run(cfg, lm=lm)
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    for task in cfg.tasks:
        assert (out / f"{task}.json").is_file() and (out / "plots" / f"{task}.json").is_file()
        rows = summary["tasks"][task]["rows"]
        assert {r["method"] for r in rows} == set(cfg.methods)
    agree = metrics["agreement"]
    assert agree["dense"]["-"]["1"]["top1_agreement"] == 1.0
    assert agree["dense"]["-"]["1"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert agree["oracle-token"]["-"]["0.5"]["kl"] > 0
    n = lm.adapter.n_neurons
    for r in summary["tasks"]["wikitext"]["rows"]:
        if r["method"] in ("stability", "griffin", "random", "static", "oracle-token"):
            assert r["kept_sparse"] == pytest.approx(round(0.5 * n) / n)
            assert r["ffn_bytes_per_token"] < metrics["wikitext"]["dense"]["-"]["1"]["ffn_bytes_per_token"]
    # results name model, parameters and data hashes
    meta = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    ident = meta["identity"]
    assert ident["model"] == "tiny" and ident["alpha"] == 0.4 and ident["layers"] == [1, 3]
    assert set(ident["data_sha256"]) >= {"alpaca/seed_tasks.jsonl", "wikitext-2/test.txt", "truthfulqa/TruthfulQA.csv"}
    table = runner.markdown_table(summary["tasks"]["agreement"], "agreement")
    assert "| dense |" in table and "kept 0.5" in table


def test_stability_at_kept_one_matches_dense(tiny_llama, data, tmp_path):
    lm, _ = tiny_llama
    summary = runner.run(_cfg(tmp_path, methods=["dense", "stability"], kept=[1.0], scores=["positive", "magnitude"],
                              tasks=["agreement"]), lm=lm)
    for r in summary["tasks"]["agreement"]["rows"]:
        assert r["top1_agreement"] == 1.0 and r["kl"] == pytest.approx(0.0, abs=1e-9)


def test_resume_after_kill_finishes_only_the_rest(tiny_llama, data, tmp_path, monkeypatch):
    lm, _ = tiny_llama
    cfg = _cfg(tmp_path, methods=["dense", "stability", "griffin"], kept=[0.5], tasks=["wikitext"], limit=3)
    total = 3 * 3
    calls = {"n": 0}
    original = T.WikiTextTask.evaluate

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # killed mid-run
        return original(self, *a, **kw)

    monkeypatch.setattr(T.WikiTextTask, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, lm=lm)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 4  # meta + the four finished runs
    # a torn last line (killed while writing) is dropped on restart
    with open(tmp_path / "out" / "results.jsonl", "a") as f:
        f.write('{"task": "wikitext", "meth')
    calls["n"] = -10**9
    counted = {"n": 0}

    def counting(self, *a, **kw):
        counted["n"] += 1
        return original(self, *a, **kw)

    monkeypatch.setattr(T.WikiTextTask, "evaluate", counting)
    resumed = runner.run(cfg, lm=lm)
    assert counted["n"] == total - 4
    # identical to a run from scratch
    monkeypatch.setattr(T.WikiTextTask, "evaluate", original)
    fresh = runner.run(_cfg(tmp_path, methods=["dense", "stability", "griffin"], kept=[0.5], tasks=["wikitext"],
                            limit=3, out=str(tmp_path / "fresh")), lm=lm)
    a = {(r["method"], r["kept"]): r["ppl"] for r in resumed["tasks"]["wikitext"]["rows"]}
    b = {(r["method"], r["kept"]): r["ppl"] for r in fresh["tasks"]["wikitext"]["rows"]}
    assert a == pytest.approx(b)
    # raising the limit only adds items
    counted["n"] = 0
    monkeypatch.setattr(T.WikiTextTask, "evaluate", counting)
    runner.run(_cfg(tmp_path, methods=["dense", "stability", "griffin"], kept=[0.5], tasks=["wikitext"], limit=4), lm=lm)
    assert counted["n"] == 3


def test_restart_with_other_settings_is_refused(tiny_llama, data, tmp_path):
    lm, _ = tiny_llama
    runner.run(_cfg(tmp_path, methods=["dense"], tasks=["wikitext"], limit=1), lm=lm)
    with pytest.raises(EvalError, match="alpha.*--fresh"):
        runner.run(_cfg(tmp_path, methods=["dense"], tasks=["wikitext"], limit=1, alpha=0.3), lm=lm)
    runner.run(_cfg(tmp_path, methods=["dense"], tasks=["wikitext"], limit=1, alpha=0.3, fresh=True), lm=lm)


@pytest.mark.parametrize("kw, err, match", [
    (dict(methods=["dense", "magic"]), MethodError, "unknown method 'magic'"),
    (dict(tasks=["agreement", "hellaswag"]), T.TaskError, "unknown task 'hellaswag'"),
    (dict(kept=[0.0]), EvalError, r"\(0, 1\]"),
    (dict(kept=[1.5]), EvalError, r"\(0, 1\]"),
    (dict(limit=0), EvalError, "limit must be a positive number"),
    (dict(scores=["loud"]), EvalError, "unknown selection score"),
    (dict(methods=["similarity"]), MethodError, "needs --artifact"),
    (dict(methods=["static"], static_source="artifact"), MethodError, "needs --artifact"),
    (dict(methods=["dense", "stability-refresh"]), MethodError, "needs --refresh-every N"),
    (dict(methods=["stability-refresh"], refresh_every=0), MethodError, "--refresh-every must be a whole number"),
])
def test_bad_config_fails_before_loading(kw, err, match, tmp_path):
    with pytest.raises(err, match=match):
        runner.validate(_cfg(tmp_path, **kw))


def test_data_file_with_missing_fields(tiny_llama, tmp_path, monkeypatch):
    lm, _ = tiny_llama
    d = make_data_dir(tmp_path)
    monkeypatch.setenv("COREINFER_DATA", str(d))
    write_jsonl(d / "nq_open" / "NQ-open.dev.jsonl", [{"question": "q1", "answer": ["a"]}, {"question": "q2"}])
    with pytest.raises(T.TaskError, match=r"NQ-open.dev.jsonl:2: missing field\(s\) \['answer'\]"):
        T.make_task("nq_open", None, 0).items(lm, None)
    (d / "truthfulqa" / "TruthfulQA.csv").write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(T.TaskError, match="missing column"):
        T.make_task("truthfulqa_mc", None, 0).items(lm, None)
    write_jsonl(d / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "no final answer"}])
    with pytest.raises(ValueError, match="####"):
        T.make_task("gsm8k", T.TaskConfig(shots=0), 0).items(lm, None)


def test_missing_data_sets_say_so(tiny_llama, tmp_path, monkeypatch):
    lm, _ = tiny_llama
    monkeypatch.setenv("COREINFER_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(T.DataMissing, match="COREINFER_DATA"):
        T.make_task("wikitext", None, 0).items(lm, 1)
    with pytest.raises(T.DataMissing, match="no summarisation data set is available locally"):
        T.make_task("summarization", None, 0).items(lm, 1)
    with pytest.raises(T.DataMissing, match="no translation data set is available locally"):
        T.make_task("translation", None, 0).items(lm, 1)


def test_summarization_and_translation_run_when_data_exists(tiny_llama, data, tmp_path):
    lm, _ = tiny_llama
    write_jsonl(data / "cnn_dailymail" / "test.jsonl",
                [{"article": "The quick brown fox jumps over the lazy dog.", "highlights": "A fox jumps."}])
    write_jsonl(data / "wmt16_de_en" / "test.jsonl", [{"source": "Guten Morgen", "target": "Good morning"}])
    cfg = _cfg(tmp_path, methods=["dense", "stability"], kept=[0.5], tasks=["summarization", "translation"],
               task_config={"summarization": T.TaskConfig(max_new_tokens=5), "translation": T.TaskConfig(max_new_tokens=5)})
    summary = runner.run(cfg, lm=lm)
    rows = summary["tasks"]["translation"]["rows"]
    assert {r["method"] for r in rows} == {"dense", "stability"}
    assert all(0.0 <= r["bleu"] <= 100.0 for r in rows)
    assert all(0.0 <= r["rougeL"] <= 1.0 for r in summary["tasks"]["summarization"]["rows"])


def test_cli_errors_are_clear(capsys, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--limit", "0", "--out", str(tmp_path)])
    assert "--limit must be >= 1" in capsys.readouterr().err
    assert cli.main(["--methods", "dense,nope", "--out", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli.main(["--tasks", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert cli.main(["--kept", "0.2,1.2", "--out", str(tmp_path)]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert cli.main(["--methods", "dense,stability-refresh", "--refresh-every", "0", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--refresh-every must be a whole number of decoded tokens >= 1, got 0" in err


def test_stability_refresh_runs_scoring_and_generation_and_pays_for_its_refreshes(tiny_llama, data, tmp_path):
    lm, _ = tiny_llama
    tc = {**SMALL_TASKS, "agreement": T.TaskConfig(continuation=12), "truthfulqa_gen": T.TaskConfig(shots=1, max_new_tokens=8)}
    cfg = _cfg(tmp_path, methods=["dense", "stability", "stability-refresh"], kept=[0.5], scores=["magnitude"],
               tasks=["agreement", "truthfulqa_gen"], refresh_every=3, task_config=tc)
    summary = runner.run(cfg, lm=lm)
    rows = {r["method"]: r for r in summary["tasks"]["agreement"]["rows"]}
    refresh, plain = rows["stability-refresh"], rows["stability"]
    assert refresh["refreshes"] == (12 - 1 - 1) // 3 and 0 < refresh["core_jaccard"] < 1
    assert refresh["kept_model"] == pytest.approx(plain["kept_model"])
    assert plain["ffn_bytes_per_token"] < refresh["ffn_bytes_per_token"] < refresh["ffn_bytes_per_token_full_refresh"]
    assert "ffn_bytes_per_token_full_refresh" not in plain
    gen = {r["method"]: r for r in summary["tasks"]["truthfulqa_gen"]["rows"]}
    assert gen["stability-refresh"]["n"] == 2 and 0 <= gen["stability-refresh"]["rougeL_max"] <= 1
    meta = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert meta["identity"]["refresh_every"] == 3
    with pytest.raises(EvalError, match="refresh_every"):  # another N is another evaluation
        runner.run(_cfg(tmp_path, methods=["dense", "stability-refresh"], kept=[0.5], scores=["magnitude"],
                        tasks=["agreement"], refresh_every=4, task_config=tc), lm=lm)


def test_cli_end_to_end_on_a_saved_tiny_model(tiny_llama, data, tmp_path, capsys):
    lm, _ = tiny_llama
    model_dir = tmp_path / "tiny-model"
    lm.model.config.save_pretrained(model_dir)
    # save the original (un-patched) weights and the tokenizer: a plain HF folder
    import torch
    from safetensors.torch import save_file

    state = {k.replace(".mlp.original.", ".mlp."): v.contiguous() for k, v in lm.model.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"))
    lm.tokenizer.save_pretrained(model_dir)
    out = tmp_path / "cli-out"
    rc = cli.main(["--model", str(model_dir), "--methods", "dense,stability,oracle-token", "--kept", "0.5",
                   "--tasks", "agreement", "--limit", "2", "--layers", "1:3", "--out", str(out), "--no-progress",
                   "--json", "--plots"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["kept"]): r for r in summary["tasks"]["agreement"]["rows"]}
    assert rows[("dense", 1.0)]["top1_agreement"] == 1.0
    assert (out / "plots" / "agreement.png").stat().st_size > 1000
    _ = torch


def test_yaml_config(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("model: smollm2-135m\nmethods: [dense, griffin]\nkept: [0.3]\nlimit: 5\n"
                 "task_config:\n  agreement: {continuation: 16}\n")
    cfg = cli.load_yaml_config(str(p))
    assert cfg.methods == ["dense", "griffin"] and cfg.task_cfg("agreement").continuation == 16
    assert cfg.task_cfg("wikitext").window == T.DEFAULT_TASK_CONFIG["wikitext"].window
    p.write_text("modle: x\n")
    with pytest.raises(EvalError, match="unknown key"):
        cli.load_yaml_config(str(p))


def test_sample_order_is_a_prefix_of_one_permutation():
    a = T.sample_indices(100, 10, seed=3)
    b = T.sample_indices(100, 25, seed=3)
    assert b[:10] == a and len(set(b)) == 25
    assert T.sample_indices(5, None, seed=3) == T.sample_indices(5, 5, seed=3)
    assert sorted(T.sample_indices(5, None, seed=3)) == list(range(5))
    assert T.sample_indices(100, 10, seed=4) != a


def test_results_record_portable_paths(tmp_path, monkeypatch):
    """results.jsonl names files relative to the repository (or ~/), so a clone elsewhere keeps its results."""
    from coreinfer.pipeline.evaluate.runner import portable_path

    repo, home = tmp_path / "repo", tmp_path / "home"
    (repo / "artifacts").mkdir(parents=True)
    (home / ".cache" / "m").mkdir(parents=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("HOME", str(home))
    assert portable_path(repo / "artifacts") == "artifacts"
    assert portable_path("artifacts") == "artifacts"
    assert portable_path(home / ".cache" / "m") == "~/.cache/m"
    assert portable_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id, no path
    assert portable_path(tmp_path) == str(tmp_path)  # outside both: absolute
