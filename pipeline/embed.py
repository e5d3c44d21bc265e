"""Stage 3, embed: unit-norm sentence embeddings of every prepared prompt.

Uses the runtime's ``PromptEmbedder`` (the same model and normalisation the runtime applies to a prompt
at generation time). Output: ``<work_dir>/embeddings.zarr`` with ``embeddings`` (N, D) float32 in corpus
order, attrs: model id, dimension, corpus hash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coreinfer.runtime.similarity import PromptEmbedder

from .config import PipelineConfig
from .io import read_corpus, write_zarr_arrays


def embed(cfg: PipelineConfig) -> list[Path]:
    table = read_corpus(cfg.corpus_path)
    texts = table.column("text").to_pylist()
    embedder = PromptEmbedder(cfg.embed.model_id)
    emb = embedder.embed(texts, batch_size=cfg.embed.batch_size, progress=True)
    if emb.shape != (len(texts), embedder.dim) or not np.all(np.isfinite(emb)):
        raise RuntimeError(f"embedding model {cfg.embed.model_id!r} returned bad embeddings of shape {emb.shape}")
    meta = table.schema.metadata or {}
    attrs = {
        "model_id": cfg.embed.model_id,
        "dim": int(embedder.dim),
        "normalized": True,
        "corpus_hash": meta.get(b"coreinfer.corpus_hash", b"").decode(),
    }
    path = write_zarr_arrays(cfg.embeddings_path, {"embeddings": emb.astype(np.float32)}, attrs)
    print(f"embed: {emb.shape[0]} prompts -> {emb.shape[1]}-d unit vectors with {cfg.embed.model_id}")
    return [path]
