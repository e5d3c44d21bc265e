"""Similarity-guided and auto selection in the runtime, on a tiny model with a hand-made artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from coreinfer.runtime.artifact import model_fingerprint, open_for_model, pack_bits, write_artifact
from coreinfer.runtime.similarity import assign_all, nearest_cluster

from ..conftest import tiny_lm


def test_nearest_cluster_by_hand():
    cent = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    radii = np.array([0.5, 0.1], np.float32)
    a = nearest_cluster(np.array([0.8, 0.6, 0.0]), cent, radii)  # cos 0.8 / 0.6 -> distances 0.2 / 0.4
    assert (a.cluster, a.nearest) == (0, 0) and a.similarity == pytest.approx(0.8) and a.distance == pytest.approx(0.2)
    b = nearest_cluster(np.array([0.6, 0.8, 0.0]), cent, radii)  # nearest is 1 (0.2 > radius 0.1); 0 contains it (0.4)
    assert (b.cluster, b.nearest) == (0, 1)
    c = nearest_cluster(np.array([0.0, 0.0, 1.0]), cent, radii)  # outside every radius
    assert c.cluster is None and c.nearest == 0
    d = nearest_cluster(np.array([3.0, 0.0, 0.0]), cent, radii)  # not normalised: cosine is scale-free
    assert d.cluster == 0 and d.distance == pytest.approx(0.0, abs=1e-6)
    assert nearest_cluster(np.ones(3), np.zeros((0, 3)), np.zeros(0)).cluster is None
    assert assign_all(np.array([[0.8, 0.6, 0], [0, 0, 1]]), cent, radii).tolist() == [0, -1]


class FakeEmbedder:
    """Maps a prompt to a fixed vector by a keyword (stands in for MiniLM)."""

    dim = 3

    def embed(self, texts, **_):
        table = {"capital": [1, 0, 0], "poem": [0, 1, 0]}
        out = []
        for t in texts:
            out.append(next((v for k, v in table.items() if k in t), [0, 0, 1]))
        return np.asarray(out, np.float32)


FAKE_EMBEDDER = Path(__file__).parent  # an existing folder: the artifact's embedding model passes the load check


def _artifact_for(lm, path, full=False, min_stable=6):
    n_l, n = lm.adapter.n_layers, lm.adapter.n_neurons
    k = n if full else round(0.25 * n)
    member = np.zeros((2, n_l, n), bool)
    member[0, :, :k] = True  # cluster 0: the first k neurons
    member[1, :, n - k:] = True  # cluster 1: the last k neurons
    arrays = {
        "centroids": np.array([[1, 0, 0], [0, 1, 0]], np.float32), "radii": np.array([0.2, 0.2], np.float32),
        "sizes": np.array([5, 5]), "core_sets": pack_bits(member), "n_passing": np.zeros((2, n_l), np.int32),
        "hot_set": pack_bits(member[0]), "frequency": np.zeros((n_l, n), np.float32),
        "core_frequency": np.zeros((n_l, n), np.float32),
    }
    attrs = {"model": model_fingerprint(lm.adapter, lm.model.config), "model_spec": "tiny", "alpha": 0.4,
             "beta": k / n, "k": k, "profile_beta": 0.4, "gamma": 0.5, "score": "magnitude", "layer_start": 0,
             "layer_end": n_l, "min_stable_tokens": min_stable,
             "embedding": {"model_id": str(FAKE_EMBEDDER), "dim": 3, "normalized": True}}
    return write_artifact(path, arrays, attrs), member


@pytest.fixture
def lm_art(tokenizer, tmp_path):
    lm = tiny_lm("llama", tokenizer, seed=5)[0]
    path, member = _artifact_for(lm, tmp_path / "a.zarr")
    lm.artifact = open_for_model(path, lm.adapter, lm.model.config)
    lm._prompt_embedders = {str(FAKE_EMBEDDER): FakeEmbedder()}
    return lm, member


def test_similarity_uses_the_nearest_clusters_core_sets(lm_art):
    lm, member = lm_art
    out = lm.generate("the capital", method="similarity", layers="0:4", max_new_tokens=3)
    assert out.stats.method_used == "similarity" and out.stats.cluster == 0
    for layer in range(4):
        assert out.core_sets[layer].tolist() == np.flatnonzero(member[0, layer]).tolist()
    assert out.stats.neurons_per_layer == member[0, 0].sum()
    out = lm.generate("a poem", method="similarity", layers="0:4", max_new_tokens=3)
    assert out.stats.cluster == 1 and out.core_sets[2].tolist() == np.flatnonzero(member[1, 2]).tolist()


def test_outside_every_radius_falls_back_to_stability(lm_art):
    lm, _ = lm_art
    out = lm.generate("the quick brown fox", method="similarity", layers="0:4", max_new_tokens=3)
    assert out.stats.method_used == "stability" and out.stats.cluster is None
    # the fallback keeps the artifact's kept fraction, so the call's cost does not depend on the path taken
    ref = lm.generate("the quick brown fox", method="stability", beta=lm.artifact.attrs["beta"], layers="0:4",
                      max_new_tokens=3)
    assert out.token_ids == ref.token_ids
    assert all(torch.equal(out.core_sets[i], ref.core_sets[i]) for i in range(4))


def test_similarity_refuses_a_kept_fraction_the_artifact_lacks(lm_art):
    lm, _ = lm_art
    with pytest.raises(ValueError, match="pass beta="):
        lm.generate("the capital", method="similarity", beta=0.9, layers="0:4", max_new_tokens=2)


def test_auto_picks_by_token_length(lm_art):
    lm, _ = lm_art
    short = "the capital"
    long = "the capital of France is Paris and the capital of Germany is Berlin"
    n_short, n_long = len(lm.tokenizer(short)["input_ids"]), len(lm.tokenizer(long)["input_ids"])
    assert n_short < 6 <= n_long  # the artifact's min_stable_tokens is 6
    assert lm.generate(short, layers="0:4", max_new_tokens=2).stats.method_used == "similarity"  # auto is the default
    out = lm.generate(long, layers="0:4", max_new_tokens=2)
    assert out.stats.method_used == "stability" and out.stats.cluster is None
    lm.min_stable_tokens = n_long + 1  # configurable per model
    assert lm.generate(long, layers="0:4", max_new_tokens=2).stats.method_used == "similarity"


def test_sparse_prefill_with_full_core_sets_equals_dense(tokenizer, tmp_path):
    lm = tiny_lm("llama", tokenizer, seed=6)[0]
    path, _ = _artifact_for(lm, tmp_path / "full.zarr", full=True)
    lm.artifact = open_for_model(path, lm.adapter, lm.model.config)
    lm._prompt_embedders = {str(FAKE_EMBEDDER): FakeEmbedder()}
    dense = lm.generate("the capital", method="dense", max_new_tokens=4, return_logits=True)
    sp = lm.generate("the capital", method="similarity", layers="0:4", sparse_prefill=True, max_new_tokens=4,
                     return_logits=True)
    assert sp.stats.method_used == "similarity" and sp.token_ids == dense.token_ids
    torch.testing.assert_close(torch.stack(sp.logits), torch.stack(dense.logits), rtol=1e-4, atol=1e-4)


def test_sparse_prefill_changes_the_prefill(lm_art):
    lm, _ = lm_art
    a = lm.generate("the capital", method="similarity", layers="0:4", max_new_tokens=1, return_logits=True)
    b = lm.generate("the capital", method="similarity", layers="0:4", max_new_tokens=1, return_logits=True,
                    sparse_prefill=True)
    assert not torch.allclose(a.logits[0], b.logits[0])


def test_similarity_needs_an_artifact(tokenizer):
    lm = tiny_lm("llama", tokenizer, seed=5)[0]
    with pytest.raises(ValueError, match="needs a calibration artifact"):
        lm.generate("hello", method="similarity", max_new_tokens=1)


def test_from_pretrained_style_loading_refuses_other_model(tokenizer, tmp_path):
    from coreinfer.runtime.artifact import ArtifactMismatch
    from coreinfer.runtime.loading import LoadedModel
    from coreinfer.runtime.sparse_lm import SparseLM

    from ..conftest import build_tiny

    lm = tiny_lm("llama", tokenizer, seed=5)[0]
    path, _ = _artifact_for(lm, tmp_path / "a.zarr")
    same, _ = build_tiny("llama", tokenizer, seed=5)
    ok = SparseLM(LoadedModel(same, tokenizer, "t", "m", torch.device("cpu"), torch.float32), artifact=str(path))
    assert ok.artifact.n_clusters == 2
    other, _ = build_tiny("llama", tokenizer, seed=7)
    with pytest.raises(ArtifactMismatch, match="different model"):
        SparseLM(LoadedModel(other, tokenizer, "t", "m", torch.device("cpu"), torch.float32), artifact=str(path))


def test_layers_outside_the_artifact_are_refused(tokenizer, tmp_path):
    lm = tiny_lm("llama", tokenizer, seed=5)[0]
    path, _ = _artifact_for(lm, tmp_path / "a.zarr")
    lm.artifact = open_for_model(path, lm.adapter, lm.model.config)
    lm._prompt_embedders = {str(FAKE_EMBEDDER): FakeEmbedder()}
    lm.artifact.attrs["layer_start"] = 1  # an artifact covering layers 1..3 only
    with pytest.raises(ValueError, match="outside the artifact's layer range"):
        lm.generate("the capital", method="similarity", layers="0:4", max_new_tokens=1)
