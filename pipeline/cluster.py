"""Stage 4, cluster: semantic clusters of the train prompts (sentence-transformers -> UMAP -> HDBSCAN).

HDBSCAN straight on 384-d MiniLM embeddings labels most points noise, so the embeddings are reduced first
(UMAP, the topic-modelling recipe; PCA as the light option) and noise is handled on purpose: with
``prediction_data=True`` each noise point gets HDBSCAN's soft membership vector and joins its most
probable cluster when that membership reaches ``cluster.soft_threshold``; the rest stay noise, counted
and reported. Held-out prompts are assigned with the runtime's own ``nearest_cluster`` (centroid + radius).

Centroids and radii live in the original (unreduced, unit-norm) embedding space: the runtime embeds a
prompt and compares cosine similarities, and it never runs UMAP.

``<work_dir>/clusters.zarr``: labels (N,) i64 (final: -1 noise / outside every radius), hdbscan_labels (N,),
probabilities (N,) f32, centroids (C, D) f32, radii (C,) f32, sizes (C,) i64; attrs: exemplar ids and the
noise accounting, whose headline numbers also go to ``<work_dir>/metrics/cluster.json`` (``dvc metrics``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coreinfer.runtime.similarity import assign_all, normalize

from .config import ClusterConfig, PipelineConfig
from .io import read_corpus, read_zarr_arrays, write_json, write_zarr_arrays


def reduce_embeddings(x: np.ndarray, cfg: ClusterConfig, seed: int) -> np.ndarray:
    n = x.shape[0]
    if cfg.reduce == "none":
        return x.astype(np.float64)
    n_comp = max(1, min(cfg.n_components, x.shape[1], n - 2 if n > 3 else 1))
    if cfg.reduce == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=n_comp, random_state=seed).fit_transform(x).astype(np.float64)
    import umap

    # random_state fixes UMAP's stochastic layout (and makes it single-threaded): identical reruns.
    reducer = umap.UMAP(n_components=n_comp, n_neighbors=max(2, min(cfg.n_neighbors, n - 1)), min_dist=cfg.min_dist,
                        metric="cosine", random_state=seed, init="spectral" if n > n_comp + 1 else "random")
    return reducer.fit_transform(x).astype(np.float64)


def fit_clusters(x: np.ndarray, cfg: ClusterConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(final labels, hdbscan labels, probabilities) of the reduced points ``x`` (n, d)."""
    import hdbscan

    n = x.shape[0]
    if n < max(2, cfg.min_cluster_size):
        return np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, np.float32)
    model = hdbscan.HDBSCAN(min_cluster_size=cfg.min_cluster_size, min_samples=cfg.min_samples,
                            cluster_selection_method=cfg.selection_method,
                            cluster_selection_epsilon=float(cfg.selection_epsilon), prediction_data=True)
    hard = model.fit_predict(x).astype(np.int64)
    prob = np.asarray(model.probabilities_, dtype=np.float32)
    labels = hard.copy()
    n_clusters = int(hard.max()) + 1 if hard.size else 0
    noise = np.flatnonzero(hard < 0)
    if n_clusters > 0 and noise.size:
        import hdbscan.prediction as hp

        soft = np.asarray(hp.all_points_membership_vectors(model), dtype=np.float64).reshape(n, -1)
        if soft.shape[1] == n_clusters:
            best = soft[noise].argmax(axis=1)
            strength = soft[noise, best]
            ok = strength >= cfg.soft_threshold
            labels[noise[ok]] = best[ok]
            prob[noise[ok]] = strength[ok].astype(np.float32)
    return labels, hard, prob


def cluster_summary(emb: np.ndarray, labels: np.ndarray, ids: list[str], cfg: ClusterConfig):
    """Centroids (unit-norm mean of members), radii (quantile of member cosine distances + margin),
    sizes and exemplar ids (members nearest the centroid), for clusters 0..C-1."""
    n_clusters = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else 0
    d = emb.shape[1]
    centroids = np.zeros((n_clusters, d), np.float32)
    radii = np.zeros(n_clusters, np.float32)
    sizes = np.zeros(n_clusters, np.int64)
    exemplars = []
    for c in range(n_clusters):
        members = np.flatnonzero(labels == c)
        cen = normalize(emb[members].astype(np.float64).mean(axis=0, keepdims=True))[0]
        dist = 1.0 - emb[members].astype(np.float64) @ cen.astype(np.float64)
        centroids[c] = cen
        radii[c] = float(np.quantile(dist, cfg.radius_quantile)) + cfg.radius_margin
        sizes[c] = members.size
        order = members[np.argsort(dist, kind="stable")][: cfg.n_exemplars]
        exemplars.append([ids[i] for i in order])
    return centroids, radii, sizes, exemplars


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Clusters renumbered by size (largest 0), ties by first member: stable ids for reports."""
    out = labels.copy()
    ks = [k for k in np.unique(labels) if k >= 0]
    order = sorted(ks, key=lambda k: (-(labels == k).sum(), int(np.flatnonzero(labels == k)[0])))
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def cluster(cfg: PipelineConfig) -> list[Path]:
    table = read_corpus(cfg.corpus_path)
    ids = table.column("id").to_pylist()
    train = np.asarray([s == "train" for s in table.column("split").to_pylist()])
    arrays, eattrs = read_zarr_arrays(cfg.embeddings_path)
    emb = arrays["embeddings"].astype(np.float32)
    if emb.shape[0] != len(ids):
        raise ValueError(f"embeddings ({emb.shape[0]} rows) do not match the corpus ({len(ids)} rows): rerun embed")
    tr = np.flatnonzero(train)
    x = reduce_embeddings(emb[tr], cfg.cluster, cfg.seed)
    lab_tr, hard_tr, prob_tr = fit_clusters(x, cfg.cluster)
    # relabel consistently for the hard labels as well
    final_tr = _relabel_by_size(lab_tr)
    mapping = {int(o): int(n) for o, n in zip(lab_tr, final_tr) if o >= 0}
    hard_tr = np.asarray([mapping.get(int(h), -1) if h >= 0 else -1 for h in hard_tr], np.int64)
    labels = np.full(len(ids), -1, np.int64)
    hard = np.full(len(ids), -1, np.int64)
    prob = np.zeros(len(ids), np.float32)
    labels[tr], hard[tr], prob[tr] = final_tr, hard_tr, prob_tr
    centroids, radii, sizes, exemplars = cluster_summary(emb[tr], final_tr, [ids[i] for i in tr], cfg.cluster)
    ho = np.flatnonzero(~train)
    if ho.size:
        labels[ho] = assign_all(emb[ho], centroids, radii)
    n_tr = int(tr.size)
    n_noise_hdb = int((hard_tr < 0).sum())
    n_noise = int((final_tr < 0).sum())
    metrics = {
        "n_clusters": int(len(sizes)),
        "train_prompts": n_tr,
        "noise_fraction_hdbscan": n_noise_hdb / n_tr if n_tr else 0.0,
        "soft_assigned": n_noise_hdb - n_noise,
        "noise_fraction": n_noise / n_tr if n_tr else 0.0,
        "noise_prompts": n_noise,
        "largest_cluster": int(sizes.max()) if sizes.size else 0,
        "smallest_cluster": int(sizes.min()) if sizes.size else 0,
        "heldout_prompts": int(ho.size),
        "heldout_inside_radius": int((labels[ho] >= 0).sum()),
    }
    attrs = {
        "metrics": metrics, "exemplars": exemplars, "reduce": cfg.cluster.reduce,
        "embedding_model": eattrs.get("model_id"), "embedding_dim": int(emb.shape[1]),
        "corpus_hash": eattrs.get("corpus_hash"),
    }
    path = write_zarr_arrays(cfg.clusters_path, {
        "labels": labels, "hdbscan_labels": hard, "probabilities": prob,
        "centroids": centroids, "radii": radii, "sizes": sizes,
    }, attrs)
    headline = {k: metrics[k] for k in ("n_clusters", "noise_fraction", "heldout_prompts", "heldout_inside_radius")}
    # (dvc metrics; every number is in clusters.zarr's attrs)
    mpath = write_json(Path(cfg.work_dir) / "metrics" / "cluster.json", headline)
    print(f"cluster: {metrics['n_clusters']} clusters over {n_tr} train prompts; HDBSCAN noise "
          f"{metrics['noise_fraction_hdbscan']:.0%}, {metrics['soft_assigned']} joined a cluster by soft membership, "
          f"{n_noise} ({metrics['noise_fraction']:.0%}) left as noise; held out inside a radius: "
          f"{metrics['heldout_inside_radius']}/{metrics['heldout_prompts']}")
    return [path, mpath]
