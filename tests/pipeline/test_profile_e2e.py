"""profile on a tiny random Llama (padding excluded), and the whole pipeline end to end, twice."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from coreinfer.pipeline.profile import profile_corpus
from coreinfer.runtime.artifact import open_for_model, unpack_bits
from coreinfer.runtime.selection import stability_select

from ..conftest import tiny_lm
from .conftest import make_cfg, src, write_jsonl

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Two plus two equals four.",
    "Three times five is fifteen; seven minus two is five; eight divided by two is four.",
    "Write a short poem about the sea.",
    "Write a short poem about the wind in the evening and the quick brown fox.",
    "def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_lm("llama", tokenizer, seed=3)[0]


def _profile(lm, tmp_path, batch_size, name, texts=TEXTS, **profile):
    cfg = make_cfg(tmp_path, [src(tmp_path / "unused.jsonl")], model={"batch_size": batch_size},
                   profile={"stability_prefixes": [1, 2, 4], **profile})
    out = profile_corpus(lm, texts, [True] * len(texts), cfg, tmp_path / name, stab_rows={1, 3}, progress=False)
    return zarr.open_group(str(out), mode="r")


def test_padded_batches_equal_one_at_a_time(lm, tmp_path):
    batched = _profile(lm, tmp_path, 4, "b.zarr", chunk_prompts=5)  # lengths differ: real padding, 2 chunks
    single = _profile(lm, tmp_path, 1, "s.zarr")
    np.testing.assert_array_equal(batched["core_sets"][...], single["core_sets"][...])
    np.testing.assert_array_equal(batched["n_tokens"][...], single["n_tokens"][...])
    np.testing.assert_array_equal(batched["active_count"][...], single["active_count"][...])
    np.testing.assert_allclose(batched["stability_jaccard"][...], single["stability_jaccard"][...])


def test_core_sets_are_the_runtime_selection_on_real_tokens(lm, tmp_path):
    prof = _profile(lm, tmp_path, 3, "p.zarr")
    n_neurons = lm.adapter.n_neurons
    core = unpack_bits(prof["core_sets"][...], n_neurons)
    active = np.zeros((lm.adapter.n_layers, n_neurons), np.int64)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        acts = {}
        lm.capture(ids, None, lambda layer, a: acts.__setitem__(layer, a[0].clone()))
        assert int(prof["n_tokens"][i]) == ids.shape[1]
        for layer, a in acts.items():
            expect = stability_select(a, 0.4, 0.4, prof.attrs["score"])
            assert np.flatnonzero(core[i, layer]).tolist() == expect.tolist()
            active[layer] += (a > 0).sum(0).numpy()
    np.testing.assert_array_equal(prof["active_count"][...], active)  # padding never counted
    assert prof.attrs["train_tokens"] == sum(int(x) for x in prof["n_tokens"][...])
    jac = prof["stability_jaccard"][...]
    assert jac.shape == (2, 3) and np.all((jac >= 0) & (jac <= 1))


def test_layer_range_outside_model_is_refused(lm, tmp_path):
    with pytest.raises(ValueError, match="do not fit the model"):
        _profile(lm, tmp_path, 2, "x.zarr", layer_start=2, layer_end=9)


CORPUS_E2E = [
    *(f"What is the capital of country number {i}?" for i in range(8)),
    *(f"Compute {i} plus {i + 3} and then multiply by two." for i in range(8)),
    *(f"Write a short poem about the colour of the sea on day {i}." for i in range(8)),
]


def run_pipeline(tmp_path: Path, lm, tag: str):
    from coreinfer.pipeline.cluster import cluster
    from coreinfer.pipeline.coreset import coreset
    from coreinfer.pipeline.embed import embed
    from coreinfer.pipeline.prepare import prepare
    from coreinfer.pipeline.profile import profile
    from coreinfer.pipeline.report import report

    root = tmp_path / tag
    root.mkdir()
    f = write_jsonl(root / "c.jsonl", [{"text": t} for t in CORPUS_E2E])
    cfg = make_cfg(root, [src(f)], corpus={"heldout_fraction": 0.15},
                   cluster={"reduce": "pca", "n_components": 3, "min_cluster_size": 3, "min_samples": 2},
                   profile={"stability_sample": 6, "stability_prefixes": [1, 2, 4, 8]},
                   coreset={"beta": 0.3, "gamma": 0.5}, report={"pair_sample": 50})
    written = []
    written += prepare(cfg)
    written += profile(cfg, load=lambda c: lm)
    written += embed(cfg)
    written += cluster(cfg)
    written += coreset(cfg)
    written += report(cfg)
    assert all(Path(p).exists() for p in written)
    return cfg


def digest(path: Path) -> dict:
    path = Path(path)
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_pipeline_end_to_end_is_deterministic(lm, tmp_path):
    a = run_pipeline(tmp_path, lm, "a")
    b = run_pipeline(tmp_path, lm, "b")
    art = open_for_model(a.artifact_path, lm.adapter, lm.model.config)  # validates against the model
    k = art.attrs["k"]
    assert k == round(0.3 * lm.adapter.n_neurons)
    assert art.n_clusters >= 1
    for c in range(art.n_clusters):
        for layer in art.layers:
            assert len(art.core_set(c, layer)) == k
    assert len(art.hot_set(0)) == k
    assert art.attrs["embedding"]["dim"] == 384 and art.attrs["corpus"]["train_prompts"] > 10
    for p in (a.artifact_path, a.profile_path, a.clusters_path, a.embeddings_path, a.corpus_path,
              a.plots_dir / "stability.csv", a.plots_dir / "stability.png", a.metrics_dir / "report.json"):
        rel = Path(p).relative_to(tmp_path / "a")
        assert digest(p) == digest(tmp_path / "b" / rel), f"{rel} differs between two identical runs"


def test_artifact_of_another_model_is_refused(lm, tokenizer, tmp_path):
    from coreinfer.runtime.artifact import ArtifactMismatch

    cfg = run_pipeline(tmp_path, lm, "a")
    other = tiny_lm("llama", tokenizer, seed=4)[0]  # same architecture and sizes, other weights
    with pytest.raises(ArtifactMismatch, match="ffn_hash"):
        open_for_model(cfg.artifact_path, other.adapter, other.model.config)
    qwen = tiny_lm("qwen2", tokenizer, seed=3)[0]
    with pytest.raises(ArtifactMismatch, match="model_type"):
        open_for_model(cfg.artifact_path, qwen.adapter, qwen.model.config)
