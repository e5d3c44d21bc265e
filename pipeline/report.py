"""Stage 6, report: the paper's evidence on this model and corpus, as DVC plots (PNG + CSV) and metrics.

  stability.csv/png         Jaccard(core set of the first p tokens, core set of the whole prompt) by p
  similarity_jaccard.csv/png semantic (cosine) similarity vs core-set Jaccard for sampled prompt pairs,
                            within vs across clusters
  cluster_sizes.csv/png     members per cluster (plus noise)
  details.json              every number behind them, plus held-out prompts: Jaccard of their own core set
                            with their cluster's core set vs with the static hot set
  metrics/report.json       the headline numbers of details.json (``dvc metrics``)
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from coreinfer.runtime.artifact import read_artifact, unpack_bits

from .config import PipelineConfig
from .io import atomic_output, read_corpus, read_zarr_arrays, write_json


def _jaccard_bool(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with atomic_output(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
    return path


def _save_fig(fig, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})  # no version/date: identical reruns
    return path


def report(cfg: PipelineConfig) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    out_dir = cfg.plots_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    art = read_artifact(cfg.artifact_path)
    prof = zarr.open_group(str(cfg.profile_path), mode="r")
    n_neurons = int(prof.attrs["n_neurons"])
    table = read_corpus(cfg.corpus_path)
    split = np.asarray(table.column("split").to_pylist())
    carrs, _ = read_zarr_arrays(cfg.clusters_path)
    labels = carrs["labels"]
    emb = read_zarr_arrays(cfg.embeddings_path)[0]["embeddings"].astype(np.float64)

    # 1. stability curve ----------------------------------------------------------------------------
    prefixes = list(art.attrs["stability"]["prefixes"])
    jac = np.asarray(prof["stability_jaccard"][...], np.float64)
    rows = []
    for j, p in enumerate(prefixes):
        col = jac[:, j][~np.isnan(jac[:, j])] if jac.size else np.zeros(0)
        rows.append([p, round(float(col.mean()), 6) if col.size else "", int(col.size)])
    written.append(_write_csv(out_dir / "stability.csv", ["prefix_tokens", "mean_jaccard", "prompts"], rows))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r[0] for r in rows if r[1] != ""]
    ax.plot(xs, [r[1] for r in rows if r[1] != ""], marker="o")
    ax.axhline(art.attrs["stability"]["threshold"], ls="--", c="grey", lw=1, label="threshold")
    ax.axvline(art.min_stable_tokens, ls=":", c="red", lw=1, label=f"min_stable_tokens={art.min_stable_tokens}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="prefix length (tokens)", ylabel="Jaccard(prefix core set, whole)", ylim=(0, 1),
           title=f"Core-set stability ({cfg.model.name})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save_fig(fig, out_dir / "stability.png"))
    plt.close(fig)

    # 2. semantic similarity vs core-set Jaccard ------------------------------------------------------
    rng = np.random.default_rng(cfg.seed)
    tr = np.flatnonzero(split == "train")
    core = prof["core_sets"]
    pairs = []
    if tr.size >= 2:
        n_pairs = min(cfg.report.pair_sample, tr.size * (tr.size - 1) // 2)
        seen = set()
        while len(pairs) < n_pairs:
            a, b = (int(x) for x in rng.choice(tr, size=2, replace=False))
            key = (min(a, b), max(a, b))
            if key not in seen:
                seen.add(key)
                pairs.append(key)
    need = sorted({i for p in pairs for i in p})
    sets = {i: unpack_bits(np.asarray(core[i]), n_neurons) for i in need}  # (L, I) bool
    prow = []
    within, across = [], []
    for a, b in pairs:
        sim = float(emb[a] @ emb[b])
        j = float(np.mean([_jaccard_bool(sets[a][l], sets[b][l]) for l in range(sets[a].shape[0])]))
        if labels[a] >= 0 and labels[b] >= 0:
            kind = "within" if labels[a] == labels[b] else "across"
        else:
            kind = "noise"
        (within if kind == "within" else across if kind == "across" else []).append(j)
        prow.append([round(sim, 6), round(j, 6), kind])
    written.append(_write_csv(out_dir / "similarity_jaccard.csv", ["cosine_similarity", "core_jaccard", "pair"], prow))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, colour in (("across", "tab:blue"), ("within", "tab:orange"), ("noise", "tab:grey")):
        pts = np.asarray([(r[0], r[1]) for r in prow if r[2] == kind]).reshape(-1, 2)
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], s=5, alpha=0.5, c=colour, label=f"{kind} ({len(pts)})")
    corr = float(np.corrcoef(np.asarray([r[0] for r in prow]), np.asarray([r[1] for r in prow]))[0, 1]) if len(prow) > 2 else math.nan
    ax.set(xlabel="cosine similarity of prompts", ylabel="mean core-set Jaccard", title=f"Similar prompts, similar core sets (r={corr:.2f})")
    ax.legend(fontsize=8, markerscale=3)
    fig.tight_layout()
    written.append(_save_fig(fig, out_dir / "similarity_jaccard.png"))
    plt.close(fig)

    # 3. cluster sizes --------------------------------------------------------------------------------
    sizes = [int(s) for s in art.arrays["sizes"]]
    n_noise = int(((labels < 0) & (split == "train")).sum())
    srows = [[c, s] for c, s in enumerate(sizes)] + [["noise", n_noise]]
    written.append(_write_csv(out_dir / "cluster_sizes.csv", ["cluster", "prompts"], srows))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(r[0]) for r in srows], [r[1] for r in srows], color=["tab:blue"] * len(sizes) + ["tab:grey"])
    ax.set(xlabel="cluster", ylabel="train prompts", title=f"{len(sizes)} clusters, {n_noise} noise")
    fig.tight_layout()
    written.append(_save_fig(fig, out_dir / "cluster_sizes.png"))
    plt.close(fig)

    # 4. held-out prompts: cluster core set vs static hot set, against the prompt's own core set ------
    ho = np.flatnonzero(split == "heldout")
    j_cluster, j_hot_assigned, j_hot_all = [], [], []
    hot = unpack_bits(art.arrays["hot_set"], n_neurons)  # (L, I) over the artifact's layers
    clusters = unpack_bits(art.arrays["core_sets"], n_neurons)  # (C, L, I)
    offset = art.layer_range[0] - int(prof.attrs["layer_start"])
    for i in ho:
        own = unpack_bits(np.asarray(core[int(i)]), n_neurons)[offset:offset + hot.shape[0]]
        jh = float(np.mean([_jaccard_bool(own[l], hot[l]) for l in range(hot.shape[0])]))
        j_hot_all.append(jh)
        c = int(labels[i])
        if c >= 0:
            j_cluster.append(float(np.mean([_jaccard_bool(own[l], clusters[c, l]) for l in range(hot.shape[0])])))
            j_hot_assigned.append(jh)

    def _mean(v):
        return round(float(np.mean(v)), 6) if v else None

    within_m, across_m = _mean(within), _mean(across)
    summary = {
        "min_stable_tokens": art.min_stable_tokens,
        "stability": {str(r[0]): r[1] for r in rows},
        "pairs": len(prow), "pairs_within": len(within), "pairs_across": len(across),
        "jaccard_within_clusters": within_m, "jaccard_across_clusters": across_m,
        "similarity_jaccard_correlation": None if math.isnan(corr) else round(corr, 6),
        "heldout_prompts": int(ho.size), "heldout_assigned": len(j_cluster),
        "heldout_jaccard_own_vs_cluster": _mean(j_cluster),
        "heldout_jaccard_own_vs_hot_same_prompts": _mean(j_hot_assigned),
        "heldout_jaccard_own_vs_hot": _mean(j_hot_all),
        "n_clusters": len(sizes), "noise_prompts": n_noise,
    }
    written.append(write_json(out_dir / "details.json", summary))
    headline = {
        "stability_at_16_tokens": summary["stability"].get("16") or None,
        "similarity_jaccard_correlation": summary["similarity_jaccard_correlation"],
        "heldout_jaccard_own_vs_cluster": summary["heldout_jaccard_own_vs_cluster"],
        "heldout_jaccard_own_vs_hot": summary["heldout_jaccard_own_vs_hot_same_prompts"],
    }
    written.append(write_json(cfg.metrics_dir / "report.json", headline))
    print(f"report: stability {summary['stability']}; core-set Jaccard within clusters {within_m} vs across "
          f"{across_m}; held-out own-vs-cluster {summary['heldout_jaccard_own_vs_cluster']} vs own-vs-hot "
          f"{summary['heldout_jaccard_own_vs_hot_same_prompts']} ({len(j_cluster)}/{ho.size} assigned)")
    return written
