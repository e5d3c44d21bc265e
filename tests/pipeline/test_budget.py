"""The budget stage: allocation against hand-computed curves, the joint verification, the errors, and per-layer
core-set sizes end to end (sensitivity rows vs the runtime's own path, artifact, runtime, stats)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coreinfer.pipeline.budget import (
    BudgetError, PathStep, Quality, budget, calibration_items, choose, greedy_path, measure_joint, measure_sensitivity,
    monotone,
)
from coreinfer.pipeline.config import ConfigError

from ..conftest import tiny_lm
from .conftest import make_cfg, src, write_jsonl

GRID = [0.25, 0.5, 0.75]  # with I = 8: k = 2, 4, 6


def test_monotone_envelope_never_rewards_keeping_fewer():
    assert monotone(np.array([0.1, 0.2, 0.05])).tolist() == [0.2, 0.2, 0.05]
    assert monotone(np.array([[0.9, 0.3, 0.1]])).tolist() == [[0.9, 0.3, 0.1]]


def test_greedy_path_against_hand_computed_curves():
    # layer 0 is sensitive, layer 1 is not; one more model layer (uncovered) stays dense.
    # Loss per neuron saved from dense: layer 1 to 0.75 costs 0.01/2, to 0.5 then (0.05-0.01)/2, layer 0 to 0.75
    # 0.1/2, layer 1 to 0.25 (0.2-0.05)/2 = 0.075, layer 0 to 0.5 (0.3-0.1)/2 = 0.1, to 0.25 (0.9-0.3)/2 = 0.3.
    loss = np.array([[0.9, 0.3, 0.1], [0.2, 0.05, 0.01]])
    path = greedy_path(GRID, loss, n_neurons=8, n_layers=3)
    assert [s.kept for s in path] == [[1.0, 1.0], [1.0, 0.75], [1.0, 0.5], [0.75, 0.5], [0.75, 0.25], [0.5, 0.25],
                                      [0.25, 0.25]]
    assert [round(s.predicted_kl, 6) for s in path] == [0.0, 0.01, 0.05, 0.15, 0.3, 0.5, 1.1]
    assert [round(s.bytes_fraction * 24) for s in path] == [24, 22, 20, 18, 16, 14, 12]  # sum of k over 3 layers
    assert path[3].layer_k([4, 7], 8, 9) == {4: 6, 7: 4}  # covered layers 4 and 7 of a 9-layer model
    assert path[0].layer_k([4, 7], 8, 9) == {}  # all dense: no sparse layer


def test_greedy_path_jumps_over_a_non_convex_step():
    # 0.75 costs as much as 0.5: the best ratio from dense is the jump straight to 0.5 (0.1/4 < 0.1/2)
    path = greedy_path(GRID, np.array([[1.0, 0.1, 0.1]]), n_neurons=8, n_layers=1)
    assert [s.kept for s in path] == [[1.0], [0.5], [0.25]]


def _fake_path(n: int) -> list[PathStep]:
    return [PathStep([1.0 - i / n], i / 10, 1.0 - i / (2 * n)) for i in range(n + 1)]


def test_choose_agreement_finds_the_sparsest_state_meeting_it_jointly():
    path = _fake_path(20)
    calls = []

    def measure(i):  # joint agreement falls by 0.01 per step: 0.9 is met up to step 10 exactly
        calls.append(i)
        return Quality(kl=i / 50, agreement=1.0 - i / 100)

    i, measured = choose(path, {"agreement": 0.9}, measure)
    assert i == 10 and measured[10].agreement == pytest.approx(0.9)
    assert len(calls) <= 6 and len(set(calls)) == len(calls)  # binary search, each state measured once
    i, _ = choose(path, {"kl": 0.1}, measure)  # kl i/50 <= 0.1 up to step 5
    assert i == 5


def test_choose_corrects_an_optimistic_prediction():
    # the additive prediction says step 15 is fine, but measured jointly only steps <= 4 meet the target
    path = _fake_path(20)
    i, _ = choose(path, {"agreement": 0.9}, lambda i: Quality(0.0, 1.0 if i <= 4 else 0.5))
    assert i == 4


def test_choose_bytes_takes_the_first_state_under_the_target_and_measures_it():
    path = _fake_path(10)  # bytes 1.0, 0.95, ..., 0.5
    i, measured = choose(path, {"bytes": 0.72}, lambda i: Quality(0.01 * i, 1.0 - 0.01 * i))
    assert i == 6 and path[i].bytes_fraction == pytest.approx(0.7) and list(measured) == [6]


def test_unreachable_targets_say_so_with_the_best_reached():
    path = _fake_path(10)
    with pytest.raises(BudgetError, match=r"bytes=0.3 is out of reach.*reads 0.500"):
        choose(path, {"bytes": 0.3}, lambda i: Quality(0.0, 1.0))
    with pytest.raises(BudgetError, match=r"agreement=0.99 is out of reach.*reaches agreement 0.950"):
        choose(path, {"agreement": 0.99}, lambda i: Quality(0.1, 0.95))


def test_config_validates_the_target(tmp_path):
    with pytest.raises(ConfigError, match="budget.target"):
        make_cfg(tmp_path, [src(tmp_path / "x.jsonl")], budget={"target": {"agreement": 0.9, "kl": 0.1}})
    with pytest.raises(ConfigError, match=r"budget.target.agreement: must be \(0, 1\)"):
        make_cfg(tmp_path, [src(tmp_path / "x.jsonl")], budget={"target": {"agreement": 1.5}})
    with pytest.raises(ConfigError, match="budget.target"):
        make_cfg(tmp_path, [src(tmp_path / "x.jsonl")], budget={"target": {"perplexity": 20}})
    with pytest.raises(ConfigError, match="budget.grid"):
        make_cfg(tmp_path, [src(tmp_path / "x.jsonl")], budget={"grid": [0.5, 0.2]})


# ---------------------------------------------------------------------------------------------------
# on a tiny random model

PROMPTS = ["What is the capital of France?", "Two plus two equals four.", "Write a short poem about the sea.",
           "def add(a, b): return a + b"]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("llama", tokenizer, seed=3)[0]


@pytest.fixture(scope="module")
def measured(lm):
    items = calibration_items(lm, PROMPTS, range(4), 0.4, "magnitude", continuation=6, max_tokens=64)
    kl, agree = measure_sensitivity(lm, items, range(4), [0.25, 0.5, 0.75])
    return items, kl, agree


def test_sensitivity_rows_equal_the_runtime_path(lm, measured):
    """Each batched, masked sensitivity row is the runtime's own score_ids with that one layer sparse."""
    items, kl, agree = measured
    n = lm.adapter.n_neurons
    for layer in (0, 3):
        for g, frac in enumerate([0.25, 0.5, 0.75]):
            k = round(frac * n)
            q = measure_joint(lm, items, {layer: k}, 0.4, "magnitude")
            assert kl[layer, g] == pytest.approx(q.kl, rel=1e-4, abs=1e-7)
            assert agree[layer, g] == pytest.approx(q.agreement)
    assert np.all(kl[:, 0] >= kl[:, 2] - 1e-9)  # fewer neurons: no less loss (on average over the prompts)


def test_kept_everything_equals_dense_exactly(lm, measured):
    items, _, _ = measured
    n = lm.adapter.n_neurons
    q = measure_joint(lm, items, {layer: n for layer in range(4)}, 0.4, "magnitude")
    assert q.kl == 0.0 and q.agreement == 1.0
    full = lm.score_ids(items[0].ids, items[0].cont, "stability", 0.4, 1.0, list(range(4)), keep_logprobs=True,
                        layer_k={layer: n for layer in range(4)})
    dense = lm.score_ids(items[0].ids, items[0].cont, "dense", 0.4, 1.0, range(4), keep_logprobs=True)
    assert torch.equal(full.logprobs, dense.logprobs) and full.stats.kept_fraction == 1.0


def _corpus_cfg(tmp_path, n_prompts: int, **budget_cfg):
    from coreinfer.pipeline.prepare import prepare

    texts = [f"{p} Number {i}." for i in range(n_prompts) for p in PROMPTS[:1]]
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    cfg = make_cfg(tmp_path, [src(f)], budget={"prompts": 8, "min_prompts": 4, "continuation": 5,
                                              "grid": [0.25, 0.5, 0.75], **budget_cfg})
    prepare(cfg)
    return cfg


def test_budget_stage_meets_its_target_jointly(lm, tmp_path):
    cfg = _corpus_cfg(tmp_path, 10, target={"kl": 0.05})  # a random model's argmax ties make agreement jumpy
    written = budget(cfg, load=lambda c: lm, progress=False)
    rec = json.loads(cfg.budget_path.read_text())
    assert written[0] == cfg.budget_path and cfg.budget_path.is_file()
    alloc = rec["allocation"]
    assert alloc["joint"]["kl"] <= 0.05 and alloc["layer_k"] != [lm.adapter.n_neurons] * 4  # met, and sparse
    n = lm.adapter.n_neurons
    assert alloc["layer_k"] == [round(f * n) if f < 1 else n for f in alloc["kept"]]
    assert alloc["bytes_fraction"] == pytest.approx(sum(alloc["layer_k"]) / (4 * n), abs=1e-6)
    # an independent re-measurement of the recorded allocation through the runtime gives the recorded quality
    from coreinfer.pipeline.budget import calibration_prompts
    from coreinfer.pipeline.io import read_corpus

    table = read_corpus(cfg.corpus_path)
    prompts = calibration_prompts(table.column("text").to_pylist(), [s == "train" for s in table.column("split").to_pylist()],
                                  8, 4, cfg.seed)
    items = calibration_items(lm, prompts, range(4), cfg.profile.alpha, cfg.profile.score, 5, cfg.model.max_tokens)
    sparse = {l: k for l, k in zip(range(4), alloc["layer_k"]) if k < n}
    q = measure_joint(lm, items, sparse, cfg.profile.alpha, cfg.profile.score)
    assert q.agreement == pytest.approx(alloc["joint"]["agreement"], abs=1e-9)
    assert q.kl == pytest.approx(alloc["joint"]["kl"], abs=1e-6)


def test_too_small_a_corpus_is_refused_and_nothing_is_written(lm, tmp_path):
    cfg = _corpus_cfg(tmp_path, 3, target={"kl": 0.1})
    with pytest.raises(BudgetError, match="3 train prompt.*budget.min_prompts=4"):
        budget(cfg, load=lambda c: lm, progress=False)
    assert not cfg.budget_path.exists() and not (cfg.metrics_dir / "budget.json").exists()


def test_unreachable_target_writes_nothing(lm, tmp_path):
    cfg = _corpus_cfg(tmp_path, 8, target={"bytes": 0.1})
    with pytest.raises(BudgetError, match="out of reach"):
        budget(cfg, load=lambda c: lm, progress=False)
    assert not cfg.budget_path.exists()


def test_no_target_writes_no_allocation(lm, tmp_path):
    cfg = _corpus_cfg(tmp_path, 8)
    budget(cfg, load=lambda c: (_ for _ in ()).throw(AssertionError("no model is needed")), progress=False)
    assert json.loads(cfg.budget_path.read_text())["allocation"] is None


def test_per_layer_sizes_in_the_runtime_stats(lm):
    layer_k = {0: 40, 2: 100}
    out = lm.score("the quick brown fox", " jumps over the lazy dog", method="stability", layers="0:4")
    n = lm.adapter.n_neurons
    ids = lm.encode("the quick brown fox")
    cont = lm.tokenizer(" jumps over", add_special_tokens=False)["input_ids"]
    got = lm.score_ids(ids, cont, "stability", 0.4, 0.5, list(layer_k), layer_k=layer_k)
    assert {i: int(c.numel()) for i, c in got.core_sets.items()} == layer_k
    assert got.stats.layer_k == layer_k and got.stats.neurons_per_layer is None
    assert got.stats.kept_fraction == pytest.approx((40 + 100 + 2 * n) / (4 * n))
    per_neuron = lm.adapter.dense[0].nbytes() / n
    assert got.stats.ffn_bytes_per_token == pytest.approx((40 + 100 + 2 * n) * per_neuron)
    assert out.stats.neurons_per_layer == round(0.4 * n) and out.stats.layer_k == {i: round(0.4 * n) for i in range(4)}
    with pytest.raises(ValueError, match="outside 1..128"):
        lm.score_ids(ids, cont, "stability", 0.4, 0.5, [0], layer_k={0: 0})
    # the runtime's selection with per-layer k is each layer's own stability_select at that k
    from coreinfer.runtime.selection import stability_select

    acts = {}
    lm.capture(ids, None, lambda layer, a: acts.__setitem__(layer, a[0].clone()))
    for layer, k in layer_k.items():
        assert torch.equal(got.core_sets[layer], stability_select(acts[layer], 0.4, score="magnitude", k=k))


# ---------------------------------------------------------------------------------------------------
# an artifact with per-layer sizes, read by the runtime

LAYER_K = [40, 128, 64, 20]  # layer 1 keeps everything: it stays dense


@pytest.fixture
def lm_budget_art(tokenizer, tmp_path):
    from coreinfer.runtime.artifact import model_fingerprint, open_for_model, pack_bits, write_artifact

    from .test_similarity import FAKE_EMBEDDER, FakeEmbedder

    lm = tiny_lm("llama", tokenizer, seed=5)[0]
    n = lm.adapter.n_neurons
    member = np.zeros((2, 4, n), bool)
    for layer, k in enumerate(LAYER_K):
        member[0, layer, :k] = True  # cluster 0: the first k neurons of each layer
        member[1, layer, n - k:] = True  # cluster 1: the last k
    arrays = {"centroids": np.array([[1, 0, 0], [0, 1, 0]], np.float32), "radii": np.array([0.2, 0.2], np.float32),
              "sizes": np.array([5, 5]), "core_sets": pack_bits(member), "n_passing": np.zeros((2, 4), np.int32),
              "hot_set": pack_bits(member[0]), "frequency": np.zeros((4, n), np.float32),
              "core_frequency": np.zeros((4, n), np.float32)}
    attrs = {"model": model_fingerprint(lm.adapter, lm.model.config), "model_spec": "tiny", "alpha": 0.4,
             "beta": None, "k": None, "layer_k": LAYER_K, "profile_beta": 0.4, "gamma": 0.5, "score": "magnitude",
             "layer_start": 0, "layer_end": 4, "min_stable_tokens": 6,
             "embedding": {"model_id": str(FAKE_EMBEDDER), "dim": 3, "normalized": True}}
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    lm.artifact = open_for_model(path, lm.adapter, lm.model.config)
    lm._prompt_embedders = {str(FAKE_EMBEDDER): FakeEmbedder()}
    return lm, member, path, arrays, attrs


def test_similarity_uses_the_artifacts_per_layer_sets(lm_budget_art):
    from coreinfer.runtime.session import CoreSetSession

    lm, member, *_ = lm_budget_art
    n = lm.adapter.n_neurons
    out = lm.generate("capital", method="similarity", max_new_tokens=5)
    sparse = {0: 40, 2: 64, 3: 20}
    assert out.stats.method_used == "similarity" and out.stats.cluster == 0
    assert out.stats.layer_k == sparse and out.stats.layers == [0, 2, 3] and out.stats.neurons_per_layer is None
    for layer in sparse:
        assert out.core_sets[layer].tolist() == np.flatnonzero(member[0, layer]).tolist()
    assert out.stats.kept_fraction == pytest.approx(sum(LAYER_K) / (4 * n))
    per_neuron = lm.adapter.dense[0].nbytes() / n
    assert out.stats.ffn_bytes_per_token == pytest.approx(sum(LAYER_K) * per_neuron)
    # the same tokens as a hand-made session holding those sets
    session = CoreSetSession([0, 2, 3], core_sets={l: torch.from_numpy(np.flatnonzero(member[0, l])) for l in sparse})
    ref = lm.generate("capital", method="stability", layers="0:4", max_new_tokens=5, session=session,
                      method_used="reference")
    assert out.token_ids == ref.token_ids


def test_auto_long_prompt_selects_per_layer_sizes(lm_budget_art):
    from coreinfer.runtime.selection import stability_select

    lm, *_ = lm_budget_art
    prompt = "the quick brown fox jumps over the lazy dog and runs far away"
    out = lm.generate(prompt, method="auto", max_new_tokens=3)
    assert out.stats.method_used == "stability" and out.stats.layer_k == {0: 40, 2: 64, 3: 20}
    acts = {}
    lm.capture(lm.encode(prompt), None, lambda layer, a: acts.__setitem__(layer, a[0].clone()))
    for layer, k in out.stats.layer_k.items():
        assert torch.equal(out.core_sets[layer], stability_select(acts[layer], 0.4, score="magnitude", k=k))


def test_per_layer_artifact_refuses_one_beta_and_bad_sizes(lm_budget_art, tmp_path):
    from coreinfer.runtime.artifact import ArtifactSchemaError, read_artifact, write_artifact

    lm, _, path, arrays, attrs = lm_budget_art
    with pytest.raises(ValueError, match="per-layer core-set sizes.*leave beta and layers unset"):
        lm.generate("capital", method="similarity", beta=0.3, max_new_tokens=2)
    with pytest.raises(ValueError, match="outside 1..128"):
        write_artifact(tmp_path / "bad.zarr", arrays, {**attrs, "layer_k": [0, 128, 64, 20]})
    with pytest.raises(ValueError, match="layer_k"):
        write_artifact(tmp_path / "bad2.zarr", arrays, {**attrs, "layer_k": [41, 128, 64, 20]})  # sets hold 40
    assert not (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad2.zarr").exists()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99  # a schema this runtime does not know
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactSchemaError, match="schema version 99, newer than this runtime supports"):
        read_artifact(path)


def test_eval_runs_a_budget_artifact_at_its_own_sizes(lm_budget_art):
    from coreinfer.pipeline.evaluate import methods as MM
    from coreinfer.pipeline.evaluate.tasks import generate_with, score_with

    lm, *_ = lm_budget_art
    n = lm.adapter.n_neurons
    kept = sum(LAYER_K) / (4 * n)
    assert MM.method_configs(["dense", "similarity"], [0.4], ["magnitude"], None, kept) == \
        [("dense", 1.0, None), ("similarity", round(kept, 6), "magnitude")]
    run = MM.MethodRun("similarity", round(kept, 6), "magnitude", MM.MethodContext(lm, range(1, 3), 0.4, 0,
                                                                                 artifact=lm.artifact))
    assert run.layer_k == {0: 40, 2: 64, 3: 20} and run.sparse_layers == [0, 2, 3]
    cont = lm.tokenizer(" of France is Paris", add_special_tokens=False)["input_ids"]
    out, cost = score_with(lm, run, "x", lm.encode("capital"), cont, prompt="capital")
    assert out.stats.layer_k == {0: 40, 2: 64, 3: 20} and cost["kept_model"] == pytest.approx(kept)
    gen, cost = generate_with(lm, run, "x", "capital", 3, [])
    assert gen.stats.method_used == "similarity" and gen.stats.layer_k == {0: 40, 2: 64, 3: 20}
