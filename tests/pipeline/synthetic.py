"""Synthetic artifact inputs (imports only numpy and the runtime: usable from a runtime-only process)."""

from __future__ import annotations

import numpy as np


def synthetic_artifact_inputs(n_clusters=2, n_layers=3, n_neurons=52, dim=4, seed=0):
    """Arrays and attrs of a valid artifact for a model with the given sizes (no model needed)."""
    from coreinfer.runtime.artifact import pack_bits
    from coreinfer.runtime.selection import kept_count

    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    k = kept_count(0.4, n_neurons)

    def sets(*shape):  # exactly k random neurons in every set
        order = np.argsort(rng.random(shape + (n_neurons,)), axis=-1)
        return order < k

    member = sets(n_clusters, n_layers)
    arrays = {
        "centroids": cent, "radii": np.full(n_clusters, 0.3, np.float32), "sizes": np.arange(1, n_clusters + 1),
        "core_sets": pack_bits(member), "n_passing": np.zeros((n_clusters, n_layers), np.int32),
        "hot_set": pack_bits(sets(n_layers)),
        "frequency": rng.random((n_layers, n_neurons)).astype(np.float32),
        "core_frequency": rng.random((n_layers, n_neurons)).astype(np.float32),
    }
    attrs = {
        "model": {"family": "llama", "model_type": "llama", "ffn_kind": "gated", "ffn_act": "silu",
                  "n_layers": n_layers, "n_neurons": n_neurons, "hidden_size": 16, "ffn_hash": "ab" * 32},
        "model_spec": "synthetic", "alpha": 0.4, "beta": 0.4, "k": k, "profile_beta": 0.4, "gamma": 0.5,
        "score": "magnitude",
        "layer_start": 0, "layer_end": n_layers, "min_stable_tokens": 8,
        "embedding": {"model_id": "fake", "dim": dim, "normalized": True},
    }
    return arrays, attrs, member
