"""lm-evaluation-harness adapter (skips when lm-eval is not installed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from coreinfer.pipeline.evaluate import lm_eval_adapter as A

from .eval_helpers import make_data_dir

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'coreinfer[lm-eval]'")


def _req(*args):
    return SimpleNamespace(args=args)


def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    assert get_model("coreinfer") is A.CoreInferLM


def test_loglikelihood_goes_through_score_ids(tiny_llama):
    lm, reference = tiny_llama
    dense = A.CoreInferLM(method="dense", layers="1:3", lm=lm)
    ctx, cont = "Paris is the capital of", " France and Berlin"
    (ll, greedy), = dense.loglikelihood([_req(ctx, cont)], disable_tqdm=True)
    ids = lm.encode(ctx)
    cids = lm.tokenizer(cont, add_special_tokens=False)["input_ids"]
    full = torch.cat([ids, torch.tensor([cids])], dim=1)
    with torch.no_grad():
        lp = reference(input_ids=full).logits[0].float().log_softmax(-1)
    n = ids.shape[1]
    expected = float(lp[n - 1:n - 1 + len(cids)].gather(1, torch.tensor(cids)[:, None]).sum())
    assert ll == pytest.approx(expected, abs=1e-4)
    assert greedy == (lp[n - 1:n - 1 + len(cids)].argmax(-1).tolist() == cids)
    # the sparse method: context selects, continuation scored sparse -> a different number
    sparse = A.CoreInferLM(method="stability", beta=0.3, layers="1:3", lm=lm)
    (ll_s, _), = sparse.loglikelihood([_req(ctx, cont)], disable_tqdm=True)
    expected_s = float(lm.score(ctx, cont, method="stability", beta=0.3, layers="1:3").token_logprobs.sum())
    assert ll_s == pytest.approx(expected_s, abs=1e-5)
    assert ll_s != pytest.approx(ll, abs=1e-6)


def test_generate_until_and_rolling(tiny_llama):
    lm, _ = tiny_llama
    a = A.CoreInferLM(method="griffin", beta=0.5, layers="1:3", lm=lm, max_gen_toks=5)
    (text,) = a.generate_until([_req("The quick brown fox", {"until": ["\n"], "max_gen_toks": 4})], disable_tqdm=True)
    assert isinstance(text, str) and "\n" not in text
    (total,) = a.loglikelihood_rolling([_req("The quick brown fox jumps over the lazy dog.")], disable_tqdm=True)
    assert math.isfinite(total) and total < 0
    with pytest.raises(ValueError, match="sampling"):
        a.generate_until([_req("x", {"until": [], "do_sample": True})], disable_tqdm=True)


def test_bad_method_is_refused(tiny_llama):
    lm, _ = tiny_llama
    with pytest.raises(ValueError, match="svd-predictor.*coreinfer eval"):
        A.CoreInferLM(method="svd-predictor", lm=lm)
    with pytest.raises(ValueError, match="needs --artifact"):
        A.CoreInferLM(method="similarity", lm=lm)


def test_task_configs_are_written_with_absolute_paths(tmp_path):
    data = make_data_dir(tmp_path)
    written = A.write_task_configs(tmp_path / "tasks", data)
    names = {p.name for p in written}
    assert {"coreinfer_truthfulqa_mc1.yaml", "coreinfer_nq_open.yaml", "coreinfer_gsm8k.yaml", "utils.py"} <= names
    text = (tmp_path / "tasks" / "coreinfer_nq_open.yaml").read_text()
    assert str(data / "nq_open" / "NQ-open.dev.jsonl") in text
