"""Stage 5, coreset: per-cluster, per-layer core sets and the global "hot" set, written into the artifact.

For cluster c with n_c train members, and layer l:
  freq_c[n]  = fraction of members whose sentence-wise core set (profile stage) holds neuron n
  passing    = { n : freq_c[n] >= gamma }
  k          = round(coreset.beta * I), or layer l's size in the budget stage's allocation (budget.json)
  |passing| >= k  (cap):  the k passing neurons with the highest freq_c (ties: global core frequency, index)
  |passing| <  k  (fill): every passing neuron, plus the k - |passing| others with the highest *global* core
                          frequency (ties: freq_c, index): below gamma a small cluster's own counts are noise,
                          the corpus-wide frequency is the better prior.
The hot set (static baseline) is the k neurons with the highest global core frequency (ties: activation
frequency). Global statistics use the train split only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from coreinfer.runtime.artifact import library_versions, pack_bits, unpack_bits, write_artifact
from coreinfer.runtime.selection import frequency_select, kept_count, pack_core_set, top_neurons

from .config import PipelineConfig
from .budget import read_allocation
from .io import read_corpus, read_json, read_zarr_arrays, write_json
from .profile import min_stable_tokens


def cluster_core_set(freq_c: torch.Tensor, global_freq: torch.Tensor, gamma: float, k: int) -> tuple[torch.Tensor, int]:
    """(sorted core set, number of neurons passing gamma) for one cluster and layer; see module docstring."""
    passing = freq_c >= gamma - 1e-12
    n_pass = int(passing.sum())
    freq_c, global_freq = freq_c.double(), global_freq.double()
    if n_pass >= k:
        primary = torch.where(passing, freq_c, torch.full_like(freq_c, -1.0))
        return top_neurons(primary, k, global_freq), n_pass
    primary = torch.where(passing, torch.full_like(global_freq, 2.0), global_freq)  # passing ranks above any frequency
    return top_neurons(primary, k, freq_c), n_pass


def member_counts(core_sets, labels: np.ndarray, rows: np.ndarray, n_clusters: int, n_neurons: int,
                  chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster (C, L, I) and global (L, I) counts of prompts holding each neuron, over ``rows``.

    ``core_sets`` is the (N, L, W) bit-packed zarr array; it is read ``chunk`` prompts at a time.
    """
    n_l = core_sets.shape[1]
    per = np.zeros((n_clusters, n_l, n_neurons), np.int64)
    glob = np.zeros((n_l, n_neurons), np.int64)
    rows = np.sort(rows)
    for s in range(0, rows.size, chunk):
        r = rows[s:s + chunk]
        lo, hi = int(r[0]), int(r[-1]) + 1
        block = unpack_bits(np.asarray(core_sets[lo:hi]), n_neurons)[r - lo]  # (b, L, I) bool
        glob += block.sum(axis=0)
        lab = labels[r]
        for c in np.unique(lab[lab >= 0]):
            per[c] += block[lab == c].sum(axis=0)
    return per, glob


def coreset(cfg: PipelineConfig) -> list[Path]:
    import zarr

    table = read_corpus(cfg.corpus_path)
    train = np.asarray([s == "train" for s in table.column("split").to_pylist()])
    prof = zarr.open_group(str(cfg.profile_path), mode="r")
    pattrs = dict(prof.attrs)
    carrs, cattrs = read_zarr_arrays(cfg.clusters_path)
    corpus_hash = (table.schema.metadata or {}).get(b"coreinfer.corpus_hash", b"").decode()
    for name, h in (("profile", pattrs.get("corpus_hash")), ("clusters", cattrs.get("corpus_hash"))):
        if h != corpus_hash:
            raise ValueError(f"the {name} stage output was built from another corpus ({h} != {corpus_hash}): rerun `dvc repro`")
    n_neurons, layer_start, layer_end = int(pattrs["n_neurons"]), int(pattrs["layer_start"]), int(pattrs["layer_end"])
    labels = carrs["labels"]
    n_clusters = int(carrs["centroids"].shape[0])
    train_rows = np.flatnonzero(train)
    per, glob = member_counts(prof["core_sets"], np.where(train, labels, -1), train_rows, n_clusters, n_neurons)
    n_members = np.asarray([(labels[train_rows] == c).sum() for c in range(n_clusters)], np.int64)
    core_frequency = glob / max(1, train_rows.size)
    activation_frequency = np.asarray(prof["active_count"][...], np.float64) / max(1, int(pattrs["train_tokens"]))
    k = kept_count(cfg.coreset.beta, n_neurons)
    n_l = layer_end - layer_start
    layer_k, budget_attrs = [k] * n_l, None
    if cfg.budget.target is not None:  # per-layer sizes: the budget stage's allocation
        rec = read_json(cfg.budget_path)
        if rec.get("target") != {str(a): float(v) for a, v in cfg.budget.target.items()}:
            raise ValueError(f"{cfg.budget_path} was computed for target {rec.get('target')}, not {dict(cfg.budget.target)}: "
                             "rerun the budget stage (dvc repro)")
        alloc = read_allocation(cfg.budget_path, n_neurons, int(pattrs["n_layers"]))
        missing = [l for l in range(layer_start, layer_end) if l not in alloc]
        if missing:
            raise ValueError(f"{cfg.budget_path} has no size for layers {missing} of the profile's range: rerun `dvc repro`")
        layer_k = [alloc[l] for l in range(layer_start, layer_end)]
        a = rec["allocation"]
        budget_attrs = {"target": rec["target"], "bytes_fraction": a["bytes_fraction"], "joint": a["joint"],
                        "dense_layers": a["dense_layers"], "calibration_prompts": rec["calibration"]["prompts"]}
    core_sets = np.zeros((n_clusters, n_l, (n_neurons + 7) // 8), np.uint8)
    n_passing = np.zeros((n_clusters, n_l), np.int32)
    for c in range(n_clusters):
        for pos in range(n_l):
            freq_c = torch.from_numpy(per[c, pos] / max(1, n_members[c]))
            cs, n_pass = cluster_core_set(freq_c, torch.from_numpy(core_frequency[pos]), cfg.coreset.gamma, layer_k[pos])
            core_sets[c, pos] = pack_bits(pack_core_set(cs, n_neurons))
            n_passing[c, pos] = n_pass
    hot = np.zeros((n_l, (n_neurons + 7) // 8), np.uint8)
    for pos in range(n_l):
        hs = frequency_select(torch.from_numpy(core_frequency[pos]), layer_k[pos],
                              torch.from_numpy(activation_frequency[pos]))
        hot[pos] = pack_bits(pack_core_set(hs, n_neurons))

    prefixes = [int(x) for x in pattrs["prefixes"]]
    jac = np.asarray(prof["stability_jaccard"][...], np.float64)
    mst, curve = min_stable_tokens(prefixes, jac, cfg.profile.stability_threshold)
    if cfg.coreset.min_stable_tokens is not None:
        mst = int(cfg.coreset.min_stable_tokens)
    m = cattrs["metrics"]
    attrs = {
        "model": pattrs["model"], "model_spec": pattrs["model_spec"], "model_name": pattrs["model_name"],
        "alpha": float(pattrs["alpha"]), "profile_beta": float(pattrs["beta"]), "beta": float(cfg.coreset.beta),
        "gamma": float(cfg.coreset.gamma), "score": pattrs["score"], "k": int(k),
        "layer_start": layer_start, "layer_end": layer_end,
        "embedding": {"model_id": cattrs["embedding_model"], "dim": int(cattrs["embedding_dim"]), "normalized": True},
        "corpus": {"name": cfg.corpus.name, "hash": corpus_hash, "train_prompts": int(train_rows.size),
                   "profiled_tokens": int(pattrs["train_tokens"])},
        "clusters": {"n_clusters": n_clusters, "noise_fraction": m["noise_fraction"],
                     "noise_fraction_hdbscan": m["noise_fraction_hdbscan"], "reduce": cattrs["reduce"],
                     "exemplars": cattrs["exemplars"]},
        "min_stable_tokens": int(mst),
        "stability": {"prefixes": prefixes, "mean_jaccard": [None if np.isnan(v) else round(v, 6) for v in curve],
                      "threshold": cfg.profile.stability_threshold},
        "seed": cfg.seed,
        "library_versions": library_versions(),
    }
    if budget_attrs is not None:  # sizes differ per layer: no one beta or k (schema 2, docs/artifact-format.md)
        attrs.update(beta=None, k=None, layer_k=[int(x) for x in layer_k], budget=budget_attrs)
    arrays = {
        "centroids": carrs["centroids"], "radii": carrs["radii"], "sizes": carrs["sizes"], "core_sets": core_sets,
        "n_passing": n_passing, "hot_set": hot, "frequency": activation_frequency.astype(np.float32),
        "core_frequency": core_frequency.astype(np.float32),
    }
    path = write_artifact(cfg.artifact_path, arrays, attrs)
    fill = float((n_passing < np.asarray(layer_k)[None, :]).mean()) if n_passing.size else 0.0
    k_text = f"k={k}" if budget_attrs is None else f"per-layer k {min(layer_k)}..{max(layer_k)}"
    # headline numbers for dvc metrics (the per-layer sizes themselves are in the artifact's layer_k)
    metrics = {"k": int(k) if budget_attrs is None else None, "k_min": int(min(layer_k)), "k_max": int(max(layer_k)),
               "min_stable_tokens": int(mst), "filled_fraction": fill}
    mpath = write_json(cfg.metrics_dir / "coreset.json", metrics)
    print(f"coreset: {n_clusters} clusters x {n_l} layers, {k_text} of {n_neurons}; gamma={cfg.coreset.gamma}: "
          f"{fill:.0%} of cluster/layer sets needed filling; min_stable_tokens={mst} -> {path}")
    return [path, mpath]
