"""cluster and coreset on synthetic inputs, against hand-computed results."""

from __future__ import annotations

import numpy as np
import torch

from coreinfer.pipeline.cluster import cluster_summary, fit_clusters
from coreinfer.pipeline.config import ClusterConfig
from coreinfer.pipeline.coreset import cluster_core_set, member_counts
from coreinfer.pipeline.profile import min_stable_tokens
from coreinfer.runtime.artifact import pack_bits

FREQ = torch.tensor([0.9, 0.6, 0.5, 0.4, 0.1, 0.0])
GLOBAL = torch.tensor([0.2, 0.2, 0.2, 0.1, 0.7, 0.3])


def test_gamma_threshold_cap():
    # passing (>= 0.5): {0, 1, 2}; k = 2 -> the two most frequent in the cluster
    cs, n_pass = cluster_core_set(FREQ, GLOBAL, gamma=0.5, k=2)
    assert cs.tolist() == [0, 1] and n_pass == 3


def test_gamma_threshold_fill_by_global_frequency():
    # passing {0, 1, 2}; k = 4 -> fill one neuron from the rest by global frequency: neuron 4 (0.7)
    cs, n_pass = cluster_core_set(FREQ, GLOBAL, gamma=0.5, k=4)
    assert cs.tolist() == [0, 1, 2, 4] and n_pass == 3
    # k = 5 -> then neuron 5 (global 0.3) before neuron 3 (0.1), although 3 is more frequent in the cluster
    cs, _ = cluster_core_set(FREQ, GLOBAL, gamma=0.5, k=5)
    assert cs.tolist() == [0, 1, 2, 4, 5]


def test_gamma_is_inclusive_and_ties_break_by_global():
    freq = torch.tensor([0.6, 0.6, 0.6, 0.2])
    glob = torch.tensor([0.1, 0.5, 0.3, 0.9])
    cs, n_pass = cluster_core_set(freq, glob, gamma=0.6, k=2)
    assert n_pass == 3 and cs.tolist() == [1, 2]


def test_high_gamma_means_all_fill():
    cs, n_pass = cluster_core_set(FREQ, GLOBAL, gamma=1.0, k=3)
    # nothing passes: the k globally most frequent neurons (4: 0.7, 5: 0.3, then 0: 0.2 beats 1 and 2 by cluster frequency)
    assert n_pass == 0 and cs.tolist() == [0, 4, 5]


def test_member_counts_by_hand(tmp_path):
    import zarr

    rng = np.random.default_rng(0)
    member = rng.random((6, 2, 10)) < 0.5  # (N, L, I)
    z = zarr.open_array(str(tmp_path / "c.zarr"), mode="w", shape=(6, 2, 2), dtype=np.uint8, chunks=(4, 2, 2))
    z[...] = pack_bits(member)
    labels = np.array([0, 1, 0, -1, 1, 0])
    rows = np.array([0, 1, 2, 3, 4])  # row 5 is held out
    per, glob = member_counts(z, labels, rows, n_clusters=2, n_neurons=10, chunk=2)
    exp_per = np.zeros((2, 2, 10), int)
    exp_glob = np.zeros((2, 10), int)
    for r in rows:
        exp_glob += member[r]
        if labels[r] >= 0:
            exp_per[labels[r]] += member[r]
    np.testing.assert_array_equal(per, exp_per)
    np.testing.assert_array_equal(glob, exp_glob)
    np.testing.assert_array_equal(per[0], member[0].astype(int) + member[2])


def test_cluster_summary_by_hand():
    s = np.sqrt(0.5)
    emb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]], np.float32)
    labels = np.array([0, 0, 1, -1])
    cen, radii, sizes, ex = cluster_summary(emb, labels, ["a", "b", "c", "d"], ClusterConfig(radius_quantile=0.9, n_exemplars=1))
    np.testing.assert_allclose(cen, [[s, s, 0], [0, 0, 1]], atol=1e-6)
    np.testing.assert_allclose(radii, [1 - s, 0.0], atol=1e-6)
    assert sizes.tolist() == [2, 1] and ex == [["a"], ["c"]]


def _blobs():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    pts = np.concatenate([c + rng.normal(scale=0.5, size=(25, 2)) for c in centres])
    border = np.array([[2.2, 0.0], [40.0, 40.0]])  # near blob 0, far from everything
    return np.concatenate([pts, border]), np.repeat([0, 1, 2], 25)


def test_hdbscan_finds_blobs_and_soft_membership_rescues_near_noise():
    x, truth = _blobs()
    strict = ClusterConfig(min_cluster_size=8, min_samples=5, soft_threshold=1.0)
    labels, hard, _ = fit_clusters(x, strict)
    assert len(set(hard[hard >= 0])) == 3
    # each true blob maps to one cluster
    for b in range(3):
        found = labels[:75][truth == b]
        assert len(set(found[found >= 0])) == 1
    assert labels[-1] == -1
    loose = ClusterConfig(min_cluster_size=8, min_samples=5, soft_threshold=0.0)
    labels2, hard2, prob2 = fit_clusters(x, loose)
    np.testing.assert_array_equal(hard2, hard)
    noise = np.flatnonzero(hard < 0)
    assert noise.size and (labels2[noise] >= 0).all()  # threshold 0: every noise point joins its best cluster
    near = 75
    if hard[near] < 0:
        assert labels2[near] == labels[:75][truth == 0][0]


def test_too_few_points_gives_no_clusters():
    labels, hard, prob = fit_clusters(np.zeros((3, 2)), ClusterConfig(min_cluster_size=5))
    assert (labels == -1).all() and (hard == -1).all()


def test_min_stable_tokens_from_curve():
    nan = np.nan
    jac = np.array([[0.3, 0.6, 0.8], [0.4, 0.8, nan], [0.2, nan, nan]])
    mst, means = min_stable_tokens([1, 4, 16], jac, threshold=0.7)
    np.testing.assert_allclose(means, [0.3, 0.7, 0.8])
    assert mst == 4
    assert min_stable_tokens([1, 4, 16], jac, threshold=0.9)[0] == 17  # never reached: beyond the longest prefix
