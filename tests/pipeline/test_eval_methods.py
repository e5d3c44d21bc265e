"""Selection methods of the evaluation on a tiny random Llama (float32, no download)."""

from __future__ import annotations

import pytest
import torch

from coreinfer.pipeline.evaluate import methods as MM
from coreinfer.pipeline.evaluate.runner import EvalError, _check_not_dense
from coreinfer.runtime.selection import griffin_select, kept_count, token_topk_mask
from coreinfer.runtime.session import CoreSetSession

PROMPT = "Paris is the capital of France and Berlin is"
CONT = " the capital of Germany. Two plus two equals four."


@pytest.fixture(scope="module")
def lm_ref(tiny_llama):
    return tiny_llama


def _ctx(lm, **kw):
    return MM.MethodContext(lm, lm.resolve_layers("1:3"), 0.4, 0, **kw)


def _ids(lm):
    return lm.encode(PROMPT), lm.tokenizer(CONT, add_special_tokens=False)["input_ids"]


def test_dense_scores_match_plain_transformers_forward(lm_ref):
    lm, reference = lm_ref
    ids, cont = _ids(lm)
    run = MM.MethodRun("dense", 1.0, None, _ctx(lm))
    session, _ = run.session("x")
    out = lm.score_ids(ids, cont, run.runtime_method(), 0.4, 1.0, lm.resolve_layers("1:3"), session=session)
    full = torch.cat([ids, torch.tensor([cont])], dim=1)
    with torch.no_grad():
        logits = reference(input_ids=full).logits[0].float().log_softmax(-1)
    n = ids.shape[1]
    expected = logits[n - 1:n - 1 + len(cont)].gather(1, torch.tensor(cont)[:, None])[:, 0]
    torch.testing.assert_close(out.token_logprobs, expected, atol=1e-5, rtol=1e-5)
    assert out.greedy_ids == logits[n - 1:n - 1 + len(cont)].argmax(-1).tolist()


def test_oracle_token_at_kept_one_equals_dense(lm_ref):
    lm, _ = lm_ref
    ids, cont = _ids(lm)
    layers = lm.resolve_layers("1:3")
    dense = lm.score_ids(ids, cont, "dense", 0.4, 1.0, layers, keep_logprobs=True)
    run = MM.MethodRun("oracle-token", 1.0, None, _ctx(lm))
    session, tracker = run.session("x")
    out = lm.score_ids(ids, cont, "stability", 0.4, 1.0, layers, session=session, keep_logprobs=True)
    assert torch.equal(out.logprobs, dense.logprobs)
    assert tracker.fraction == 1.0
    g_dense = lm.generate(PROMPT, "dense", max_new_tokens=8)
    session, _ = run.session("x")
    g = lm.generate(PROMPT, "stability", beta=1.0, max_new_tokens=8, session=session, method_used="oracle-token")
    assert g.token_ids == g_dense.token_ids


def test_oracle_token_below_one_is_sparse_and_differs(lm_ref):
    lm, _ = lm_ref
    ids, cont = _ids(lm)
    layers = lm.resolve_layers("1:3")
    dense = lm.score_ids(ids, cont, "dense", 0.4, 1.0, layers)
    run = MM.MethodRun("oracle-token", 0.3, None, _ctx(lm))
    session, tracker = run.session("x")
    out = lm.score_ids(ids, cont, "stability", 0.4, 0.3, layers, session=session)
    n = lm.adapter.n_neurons
    assert tracker.fraction == pytest.approx(kept_count(0.3, n) / n)
    assert not torch.equal(out.token_logprobs, dense.token_logprobs)
    cost = run.cost(out.stats, tracker)
    assert cost["kept_sparse"] == pytest.approx(kept_count(0.3, n) / n)
    assert cost["ffn_bytes_per_token"] < dense.stats.ffn_bytes_per_token


def test_token_topk_mask_counts():
    acts = torch.tensor([[1.0, -5.0, 2.0, 0.5], [0.0, 0.1, -0.2, 3.0]])
    m = token_topk_mask(acts, 2, "magnitude")
    assert m.tolist() == [[False, True, True, False], [False, False, True, True]]
    assert token_topk_mask(acts, 4).all()
    with pytest.raises(ValueError):
        token_topk_mask(acts, 0)


def test_griffin_and_random_sessions(lm_ref):
    lm, _ = lm_ref
    ids, cont = _ids(lm)
    ctx = _ctx(lm)
    layers = ctx.layers
    n = lm.adapter.n_neurons
    k = kept_count(0.5, n)
    # griffin: the session's core sets are griffin_select of the prompt's own activations
    run = MM.MethodRun("griffin", 0.5, None, ctx)
    session, _ = run.session("a")
    out = lm.score_ids(ids, cont, "stability", 0.4, 0.5, layers, session=session)
    captured = {}
    lm.capture(ids, None, lambda i, a: captured.__setitem__(i, a[0]))
    for i in layers:
        assert torch.equal(session.core_sets[i], griffin_select(captured[i], 0.5))
    assert out.stats.neurons_per_layer == k
    # random: seeded per item, same size
    r1, _ = MM.MethodRun("random", 0.5, None, ctx).session("item-1")
    r2, _ = MM.MethodRun("random", 0.5, None, ctx).session("item-1")
    r3, _ = MM.MethodRun("random", 0.5, None, ctx).session("item-2")
    assert all(torch.equal(r1.core_sets[i], r2.core_sets[i]) for i in layers)
    assert any(not torch.equal(r1.core_sets[i], r3.core_sets[i]) for i in layers)
    assert all(len(r1.core_sets[i]) == k for i in layers)


def test_svd_predictor_full_rank_is_exact_and_calibration_hits_target(lm_ref):
    lm, _ = lm_ref
    ctx = _ctx(lm)
    w = lm.adapter.dense[1]
    full = MM.SVDPredictor.from_gate(w.gate, rank=10_000)
    x = torch.randn(5, w.gate.shape[1])
    torch.testing.assert_close(full.predict(x), x @ w.gate.t(), atol=1e-4, rtol=1e-4)
    predictors = MM.build_predictors(lm, ctx.layers, rank=8)
    prompts = ["The quick brown fox jumps over the lazy dog.", "Two plus two equals four; three times five is fifteen.",
               "Write a short poem about the sea and the wind in the evening."]
    profile = MM.compute_profile(lm, prompts, ctx.layers, 0.4, predictors)
    ctx.profile, ctx.predictors = profile, predictors
    # on the calibration prompts themselves the thresholds keep the target fraction
    run = MM.MethodRun("svd-predictor", 0.3, None, ctx)
    session, tracker = run.session("x")
    session.prefill_done = True
    token = lm._active.set(session)
    try:
        with torch.inference_mode():
            for p in prompts:
                lm.model(input_ids=lm.encode(p), use_cache=False)
    finally:
        lm._active.reset(token)
    assert tracker.fraction == pytest.approx(0.3, abs=0.03)
    # static hot set from the profile: the most frequent token-core neurons
    sets = MM.MethodContext(lm, ctx.layers, 0.4, 0, static_source="profile", profile=profile).static_core_sets(0.25)
    n = lm.adapter.n_neurons
    for i in ctx.layers:
        assert len(sets[i]) == kept_count(0.25, n)
        top = profile.counts[i][sets[i]].min()
        rest = torch.ones(n, dtype=torch.bool)
        rest[sets[i]] = False
        assert top >= profile.counts[i][rest].max()
    # the profile round-trips through its cache file
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.npz")
        profile.save(path)
        back = MM.Profile.load(path)
        assert back.threshold(1, 0.3) == pytest.approx(profile.threshold(1, 0.3))
        assert torch.equal(back.counts[2], profile.counts[2])


def test_methods_needing_an_artifact_or_unknown_fail_clearly():
    with pytest.raises(MM.MethodError, match="needs --artifact"):
        MM.check_methods(["similarity"], have_artifact=False)
    with pytest.raises(MM.MethodError, match="static.*--artifact"):
        MM.check_methods(["static"], have_artifact=False)
    MM.check_methods(["static"], have_artifact=False, static_source="profile")
    with pytest.raises(MM.MethodError, match="unknown method 'bogus'"):
        MM.check_methods(["dense", "bogus"], have_artifact=False)


def test_never_silently_dense(lm_ref):
    lm, _ = lm_ref
    run = MM.MethodRun("stability", 0.4, "positive", _ctx(lm))
    with pytest.raises(EvalError, match="dense"):
        _check_not_dense(run, {"kept_sparse": 1.0, "method_used": "stability"})
    with pytest.raises(EvalError, match="fell back to dense"):
        _check_not_dense(run, {"kept_sparse": 0.4, "method_used": "dense"})
    # a stats object without core sets is refused when costed as sparse
    ids, cont = _ids(lm)
    dense = lm.score_ids(ids, cont, "dense", 0.4, 1.0, lm.resolve_layers("1:3"))
    with pytest.raises(RuntimeError, match="without core sets"):
        run.cost(dense.stats, None)


def test_method_grid():
    grid = MM.method_configs(["dense", "stability", "griffin"], [0.2, 0.5], ["positive", "magnitude"])
    assert grid == [("dense", 1.0, None), ("stability", 0.2, "positive"), ("stability", 0.2, "magnitude"),
                    ("stability", 0.5, "positive"), ("stability", 0.5, "magnitude"), ("griffin", 0.2, None),
                    ("griffin", 0.5, None)]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        MM.MethodRun("griffin", 1.5, None, None)


def test_core_set_session_for_static_from_artifact_layers_mismatch(lm_ref):
    lm, _ = lm_ref

    class FakeArtifact:
        layer_range = (2, 3)
        arrays = {}

    ctx = MM.MethodContext(lm, lm.resolve_layers("1:3"), 0.4, 0, artifact=FakeArtifact())
    with pytest.raises(MM.MethodError, match="covers layers"):
        ctx.static_core_sets(0.4)
    assert isinstance(MM.MethodRun("griffin", 0.4, None, ctx).session("x")[0], CoreSetSession)


def test_static_from_artifact_follows_the_pipeline_hot_set_rule(lm_ref):
    lm, _ = lm_ref
    import numpy as np

    n = lm.adapter.n_neurons
    rng = np.random.default_rng(0)
    core = np.round(rng.random((2, n)), 1).astype(np.float32)  # many ties
    freq = rng.random((2, n)).astype(np.float32)

    class Art:
        layer_range = (1, 3)
        arrays = {"core_frequency": core, "frequency": freq}

    ctx = MM.MethodContext(lm, lm.resolve_layers("1:3"), 0.4, 0, artifact=Art())
    sets = ctx.static_core_sets(0.25)
    k = kept_count(0.25, n)
    for i in (1, 2):
        order = sorted(range(n), key=lambda j: (-core[i - 1, j], -freq[i - 1, j], j))
        assert sets[i].tolist() == sorted(order[:k])


def _budget_file(tmp_path, n_layers=4):
    import json

    path = [{"kept": [1.0, 1.0, 1.0, 1.0], "predicted_kl": 0.0, "bytes_fraction": 1.0},
            {"kept": [1.0, 0.5, 1.0, 1.0], "predicted_kl": 0.01, "bytes_fraction": 0.875},
            {"kept": [0.25, 0.5, 1.0, 1.0], "predicted_kl": 0.05, "bytes_fraction": 0.6875}]
    f = tmp_path / "budget.json"
    f.write_text(json.dumps({"layers": [0, 1, 2, 3], "n_layers": n_layers, "n_neurons": 128, "path": path,
                             "allocation": {"kept": path[1]["kept"]}}))
    return str(f)


def test_budget_method_runs_the_paths_allocation_at_equal_bytes(lm_ref, tmp_path):
    from coreinfer.pipeline.budget import BudgetError
    from coreinfer.runtime.selection import stability_select

    lm, _ = lm_ref
    ids, cont = _ids(lm)
    ctx = _ctx(lm, budget=_budget_file(tmp_path))
    assert MM.MethodRun("budget", 0.9, None, ctx).layer_k == {1: 64}  # first path state at or under 0.9
    run = MM.MethodRun("budget", 0.7, None, ctx)
    assert run.layer_k == {0: 32, 1: 64} and run.sparse_layers == [0, 1]
    session, tracker = run.session("x")
    out = lm.score_ids(ids, cont, run.runtime_method(), 0.4, run.beta, run.sparse_layers, session=session,
                       method_used="budget")
    acts = {}
    lm.capture(ids, None, lambda layer, a: acts.__setitem__(layer, a[0].clone()))
    for layer, k in run.layer_k.items():  # the runtime's own selection at each layer's size
        assert torch.equal(out.core_sets[layer], stability_select(acts[layer], 0.4, score="magnitude", k=k))
    cost = run.cost(out.stats, tracker)
    assert cost["kept_model"] == pytest.approx(0.6875) and cost["kept_sparse"] == pytest.approx(96 / 256)
    per_neuron = lm.adapter.dense[0].nbytes() / 128
    assert cost["ffn_bytes_per_token"] == pytest.approx(0.6875 * 512 * per_neuron, rel=1e-6)
    with pytest.raises(BudgetError, match="no allocation on its path reads <= 0.5"):
        MM.MethodRun("budget", 0.5, None, ctx).session("x")
    with pytest.raises(MM.MethodError, match="needs --budget"):
        MM.check_methods(["budget"], have_artifact=False)
    with pytest.raises(BudgetError, match="computed for a model with 8 layers"):
        MM.MethodRun("budget", 0.9, None, _ctx(lm, budget=_budget_file(tmp_path, n_layers=8))).layer_k


def test_frontier_series_puts_runs_on_one_bytes_axis(tmp_path):
    from coreinfer.pipeline.evaluate.plots import draw_frontier, frontier_series

    def summary(rows):
        return {"model": "m", "tasks": {"agreement": {"metrics": ["top1_agreement"], "n_items": 2, "rows": [
            {"method": m, "kept": k, "score": "-", "top1_agreement": a, "ffn_bytes_per_token": b} for m, k, a, b in rows]}}}

    runs = {"all": summary([("dense", 1.0, 1.0, 200), ("budget", 0.8, 0.9, 160), ("stability", 0.8, 0.7, 160)]),
            "paper": summary([("dense", 1.0, 1.0, 200), ("stability", 0.7, 0.8, 170)])}
    got = frontier_series(runs, "agreement", "top1_agreement")
    assert got == {"dense": [(1.0, 1.0)], "budget (all)": [(0.8, 0.9)], "stability (all)": [(0.8, 0.7)],
                   "stability (paper)": [(0.85, 0.8)]}
    assert draw_frontier(runs, tmp_path / "f.png").stat().st_size > 0


def test_down_token_scores_like_the_oracle_and_pays_for_every_gate_up_row(lm_ref):
    lm, _ = lm_ref
    ids, cont = _ids(lm)
    layers = lm.resolve_layers("1:3")
    outs = {}
    for m in ("oracle-token", "down-token"):
        run = MM.MethodRun(m, 0.5, None, _ctx(lm))
        session, tracker = run.session("x")
        out = lm.score_ids(ids, cont, "stability", 0.4, 0.5, layers, session=session, keep_logprobs=True)
        outs[m] = (out, run.cost(out.stats, tracker))
    assert torch.equal(outs["down-token"][0].logprobs, outs["oracle-token"][0].logprobs)  # the same per-token mask
    w = lm.adapter.dense[0]
    down = w.down.numel() * w.down.element_size()
    # 4 layers: 2 dense, 2 with every gate/up row and half of the down columns (hand count)
    assert outs["down-token"][1]["ffn_bytes_per_token"] == 2 * w.nbytes() + 2 * (w.nbytes() - down + down // 2)
    assert outs["oracle-token"][1]["ffn_bytes_per_token"] == 2 * w.nbytes() + 2 * (w.nbytes() // 2)
    dense = lm.score_ids(ids, cont, "dense", 0.4, 1.0, layers, keep_logprobs=True)
    run = MM.MethodRun("down-token", 1.0, None, _ctx(lm))
    session, _ = run.session("x")
    full = lm.score_ids(ids, cont, "stability", 0.4, 1.0, layers, session=session, keep_logprobs=True)
    assert torch.equal(full.logprobs, dense.logprobs)  # kept 1.0 equals dense exactly


class _Recording(MM.RefreshSession):
    """The refresh session, also recording each sparse layer's FFN inputs after the prefill and every core set it
    installs (the test recomputes both from the runtime's own functions)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.history: dict[int, list[torch.Tensor]] = {}

    def ffn(self, layer_idx, x, dense):
        if layer_idx in self.layers and self.prefill_done:
            self.inputs.setdefault(layer_idx, []).append(x.reshape(-1, x.shape[-1]).clone())
        return super().ffn(layer_idx, x, dense)

    def _install(self, layer_idx, core, dense):
        self.history.setdefault(layer_idx, []).append(core.clone())
        super()._install(layer_idx, core, dense)


def _refresh_run(lm, kept, every, score="magnitude"):
    ctx = _ctx(lm, refresh_every=every)
    return MM.MethodRun("stability-refresh", kept, score, ctx)


def test_stability_refresh_without_a_refresh_is_stability_exactly(lm_ref):
    lm, _ = lm_ref
    ids, cont = _ids(lm)
    layers = lm.resolve_layers("1:3")
    plain = lm.score_ids(ids, cont, "stability", 0.4, 0.5, layers, score="magnitude", keep_logprobs=True)
    run = _refresh_run(lm, 0.5, every=len(cont))  # len(cont) - 1 tokens run sparse: never a full window
    session, tracker = run.session("x")
    out = lm.score_ids(ids, cont, run.runtime_method(), 0.4, 0.5, layers, score="magnitude", session=session,
                       keep_logprobs=True)
    assert torch.equal(out.logprobs, plain.logprobs)
    assert all(torch.equal(session.core_sets[i], plain.core_sets[i]) for i in layers)
    cost = run.cost(out.stats, tracker)
    assert cost["refreshes"] == 0 and cost["core_jaccard"] is None
    assert cost["ffn_bytes_per_token"] == plain.stats.ffn_bytes_per_token == cost["ffn_bytes_per_token_full_refresh"]
    assert cost["kept_model"] == pytest.approx(plain.stats.kept_fraction)


def test_stability_refresh_reselects_from_the_last_window_and_counts_its_bytes(lm_ref):
    from coreinfer.runtime.selection import stability_select

    lm, _ = lm_ref
    ids, cont = _ids(lm)
    layers = lm.resolve_layers("1:3")
    every, kept = 4, 0.5
    run = _refresh_run(lm, kept, every)
    tracker = MM.RefreshTracker()
    session = _Recording(layers, run.session("x")[0].select, every, tracker)
    out = lm.score_ids(ids, cont, "stability", 0.4, kept, layers, session=session, keep_logprobs=True)
    n_sparse = len(cont) - 1
    n_refresh = (n_sparse - 1) // every  # a refresh before tokens 4, 8, ... that exist
    assert n_refresh >= 2
    acts = {}
    lm.capture(ids, None, lambda layer, a: acts.__setitem__(layer, a[0].clone()))
    w = lm.adapter.dense[1]
    n, h = lm.adapter.n_neurons, w.gate.shape[1]
    k = kept_count(kept, n)
    row_b, neuron_b = 2 * h * 4, 3 * h * 4  # float32 gate + up rows; plus the down column
    least = full = 0
    for i in layers:
        x = torch.cat(session.inputs[i])
        hist = session.history[i]
        assert len(hist) == 1 + n_refresh
        # the first set is the prompt's own; each later one the runtime's selection over the previous window,
        # from the dense activations of those tokens' FFN inputs in this (sparse) run
        assert torch.equal(hist[0], stability_select(acts[i], 0.4, kept, "magnitude"))
        for b in range(1, len(hist)):
            window = lm.adapter.dense[i].intermediate(x[(b - 1) * every:b * every])
            assert torch.equal(hist[b], stability_select(window, 0.4, kept, "magnitude"))
            entered = len(set(hist[b].tolist()) - set(hist[b - 1].tolist()))
            least += (n - k) * row_b + 2 * entered * neuron_b
            full += n * row_b + 2 * k * neuron_b
        assert any(not torch.equal(hist[b], hist[0]) for b in range(1, len(hist)))  # it did change something
    cost = run.cost(out.stats, tracker)
    token = 2 * w.nbytes() + 2 * k * neuron_b  # 2 dense layers, 2 compact ones, between refreshes
    assert cost["refreshes"] == n_refresh
    assert cost["ffn_bytes_per_token"] == round(token + least / n_sparse)
    assert cost["ffn_bytes_per_token_full_refresh"] == round(token + full / n_sparse)
    assert 0 < cost["core_jaccard"] < 1
    # causal: generating one token at a time refreshes at the same positions as scoring the whole continuation
    g_session, _ = run.session("x")
    g = lm.generate(PROMPT, "stability", beta=kept, layers=layers, max_new_tokens=12, session=g_session,
                    method_used="stability-refresh", eos_token_id=[lm.tokenizer.pad_token_id])
    s_session, _ = run.session("x")
    scored = lm.score_ids(ids, g.token_ids, "stability", 0.4, kept, layers, session=s_session)
    assert len(g.token_ids) == 12 and scored.greedy_ids == g.token_ids


def test_stability_refresh_needs_a_valid_refresh_every(lm_ref):
    with pytest.raises(MM.MethodError, match="needs --refresh-every N"):
        MM.check_methods(["dense", "stability-refresh"], have_artifact=False)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(MM.MethodError, match="--refresh-every must be a whole number of decoded tokens >= 1"):
            MM.check_methods(["stability-refresh"], have_artifact=False, refresh_every=bad)
    assert MM.check_methods(["stability-refresh"], have_artifact=False, refresh_every=1) == ["stability-refresh"]


def test_frontier_gives_each_run_of_a_method_its_own_colour(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from coreinfer.pipeline.evaluate.plots import draw_frontier

    colours: dict[str, str] = {}
    plot = Axes.plot

    def recording_plot(self, *a, **kw):  # each series' colour, by label
        colours[kw["label"]] = kw["color"]
        return plot(self, *a, **kw)

    monkeypatch.setattr(Axes, "plot", recording_plot)

    def summary(v):
        return {"model": "m", "tasks": {"agreement": {"metrics": ["top1_agreement"], "n_items": 1, "rows": [
            {"method": "dense", "kept": 1.0, "score": "-", "top1_agreement": 1.0, "ffn_bytes_per_token": 100},
            {"method": "stability-refresh", "kept": 0.5, "score": "-", "top1_agreement": v, "ffn_bytes_per_token": 60}]}}}

    draw_frontier({"N=8": summary(0.7), "N=16": summary(0.8), "N=32": summary(0.9)}, tmp_path / "f.png")
    assert set(colours) == {"stability-refresh (N=8)", "stability-refresh (N=16)", "stability-refresh (N=32)"}
    assert len(set(colours.values())) == 3
