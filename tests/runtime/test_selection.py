"""Selection on hand-built activation matrices against hand-computed indices."""

import math

import pytest
import torch

from coreinfer.runtime.selection import (
    core_statistics, frequency_select, griffin_select, jaccard, kept_count, stability_select, token_core_mask,
)


def test_token_core_positive_hand_computed():
    # 3 tokens x 5 neurons; positives per token: 3, 2, 1 -> P = 2, alpha 0.5 -> k_token = ceil(1.0) = 1
    a = torch.tensor([[0.9, -1.0, 0.5, 0.2, -0.3],
                      [-0.1, 0.8, 0.0, 0.7, -2.0],
                      [-0.5, -0.4, -0.3, 0.6, -0.2]])
    mask = token_core_mask(a, alpha=0.5, score="positive")
    assert mask.tolist() == [[True, False, False, False, False],
                             [False, True, False, False, False],
                             [False, False, False, True, False]]


def test_token_core_magnitude_hand_computed():
    # magnitude: all 5 nonzero in tokens 0 and 2, 4 in token 1 -> P = 14/3, alpha 0.4 -> ceil(1.866) = 2
    a = torch.tensor([[0.9, -1.0, 0.5, 0.2, -0.3],
                      [-0.1, 0.8, 0.0, 0.7, -2.0],
                      [-0.5, -0.4, -0.3, 0.6, -0.2]])
    mask = token_core_mask(a, alpha=0.4, score="magnitude")
    assert mask.tolist() == [[True, True, False, False, False],
                             [False, True, False, False, True],
                             [True, False, False, True, False]]


def test_token_core_never_takes_non_positive():
    # token 1 has a single positive but k_token = 2: only the positive one may be core
    a = torch.tensor([[1.0, 2.0, 3.0, -1.0], [-1.0, -2.0, 0.5, -3.0]])
    mask = token_core_mask(a, alpha=1.0, score="positive")  # P = (3 + 1)/2 = 2 -> k_token = 2
    assert mask.tolist() == [[False, True, True, False], [False, False, True, False]]


def test_sentence_core_counts_then_sum_then_index():
    # token-core counts: n0 2, n1 2, n2 1, n3 0. beta 0.5 of 4 -> keep 2. n0 and n1 tie on count.
    a = torch.tensor([[3.0, 1.0, 0.0, 0.0],
                      [1.0, 3.0, 0.0, 0.0],
                      [0.5, 2.0, 1.0, 0.0]])
    # positives per token 2,2,3 -> P = 7/3, alpha 0.9 -> ceil(2.1) = 3, capped to actives
    counts, sums = core_statistics(a, alpha=0.9, score="positive")
    assert counts.tolist() == [3, 3, 1, 0]
    assert sums.tolist() == [4.5, 6.0, 1.0, 0.0]
    assert stability_select(a, alpha=0.9, beta=0.5).tolist() == [0, 1]
    assert stability_select(a, alpha=0.9, beta=0.25).tolist() == [1]  # tie on count -> larger sum wins


def test_full_ties_break_by_lower_index():
    a = torch.ones(4, 6)
    assert stability_select(a, alpha=0.5, beta=0.5).tolist() == [0, 1, 2]


def test_beta_one_keeps_everything_and_kept_count_rounding():
    a = torch.randn(7, 10)
    assert stability_select(a, beta=1.0).tolist() == list(range(10))
    assert kept_count(0.25, 10) == 3  # 2.5 rounds half up
    assert kept_count(0.24, 10) == 2
    assert kept_count(0.01, 10) == 1  # never empty
    assert kept_count(0.4, 1536) == 614


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan")])
def test_fraction_bounds(bad):
    a = torch.randn(3, 8)
    with pytest.raises(ValueError, match="beta must be in"):
        stability_select(a, beta=bad)
    with pytest.raises(ValueError, match="alpha must be in"):
        stability_select(a, alpha=bad)


def test_bad_shapes_and_score():
    with pytest.raises(ValueError, match="tokens>=1"):
        stability_select(torch.randn(0, 5))
    with pytest.raises(ValueError, match="score must be one of"):
        stability_select(torch.randn(2, 5), score="abs")


def test_alpha_one_all_active_all_core():
    a = torch.rand(5, 8) + 0.1  # all positive: P = 8, k_token = 8
    assert token_core_mask(a, alpha=1.0).all()


def test_selection_is_deterministic_and_sorted():
    torch.manual_seed(0)
    a = torch.randn(50, 300)
    s1, s2 = stability_select(a, beta=0.3), stability_select(a.clone(), beta=0.3)
    assert torch.equal(s1, s2)
    assert s1.tolist() == sorted(s1.tolist()) and len(s1) == 90 and s1.dtype == torch.int64


def test_frequency_and_griffin_select():
    freq = torch.tensor([5, 1, 5, 3])
    assert frequency_select(freq, 2).tolist() == [0, 2]
    assert frequency_select(freq, 2, tiebreak=torch.tensor([0.0, 0, 1, 0])).tolist() == [0, 2]
    assert frequency_select(freq, 1, tiebreak=torch.tensor([0.0, 0, 1, 0])).tolist() == [2]
    # griffin: per-token unit norm, then column norms: neuron 1 dominates both tokens
    a = torch.tensor([[0.0, 3.0, 4.0], [1.0, 1.0, 0.0]])
    # token norms 5 and sqrt2 -> rows [0, .6, .8], [.707, .707, 0]; column norms .707, .927, .8
    assert griffin_select(a, beta=1 / 3).tolist() == [1]
    assert griffin_select(a, beta=2 / 3).tolist() == [1, 2]


def test_jaccard():
    assert jaccard(torch.tensor([1, 2, 3]), torch.tensor([2, 3, 4])) == 0.5
    assert math.isclose(jaccard(torch.tensor([1]), torch.tensor([1])), 1.0)


# ------------------------------------------------------------------------------------------------------
# the sync-free, batched implementation against the previous per-layer one (host sync, torch.sum), kept
# here as the reference: identical masks, counts and core sets on random inputs, with and without ties


def _reference_token_core_mask(acts, alpha, score):
    s = acts.float() if score == "positive" else acts.float().abs()
    active = s > 0
    mean_active = active.sum(dim=1, dtype=torch.float64).mean().item() if s.shape[0] else 0.0
    k_token = min(s.shape[1], math.ceil(alpha * mean_active))
    mask = torch.zeros_like(active)
    if k_token == 0:
        return mask
    top = s.sort(dim=1, descending=True, stable=True).indices[:, :k_token]
    mask.scatter_(1, top, True)
    return mask & active


def _reference_select(acts, alpha, beta, score):
    mask = _reference_token_core_mask(acts, alpha, score)
    counts = mask.sum(dim=0, dtype=torch.int64)
    sums = (acts.double() if score == "positive" else acts.double().abs()).sum(dim=0)
    order = torch.arange(acts.shape[1])
    order = order[torch.sort(sums[order], descending=True, stable=True).indices]
    order = order[torch.sort(counts.double()[order], descending=True, stable=True).indices]
    return counts, sums, order[:kept_count(beta, acts.shape[1])].sort().values


@pytest.mark.parametrize("score", ["positive", "magnitude"])
@pytest.mark.parametrize("ties", [False, True])
def test_batched_sync_free_selection_equals_reference(score, ties):
    from coreinfer.runtime.selection import stability_select_layers

    g = torch.Generator().manual_seed(11 + ties)
    for L, T, I in [(3, 17, 64), (2, 40, 301), (1, 1, 9)]:
        acts = torch.randn(L, T, I, generator=g)
        if ties:  # coarse values: many equal scores, exact zeros, equal counts and sums
            acts = (acts * 2).round() / 2
            acts[:, :, : I // 4] = 0.5
        for alpha in (0.1, 0.4, 1.0):
            for beta in (0.1, 0.4, 0.9):
                sets = stability_select_layers(acts, alpha, beta, score)
                for li in range(L):
                    counts, sums, want = _reference_select(acts[li], alpha, beta, score)
                    assert torch.equal(token_core_mask(acts[li], alpha, score), _reference_token_core_mask(acts[li], alpha, score))
                    c, s = core_statistics(acts[li], alpha, score)
                    assert torch.equal(c, counts)
                    assert torch.allclose(s, sums, rtol=1e-12, atol=1e-12)
                    assert torch.equal(sets[li], want)
                    assert torch.equal(stability_select(acts[li], alpha, beta, score), want)


def test_ordered_token_sum_adds_tokens_in_order():
    from coreinfer.runtime.selection import ordered_token_sum

    x = torch.tensor([[1e16], [1.0], [-1e16], [1.0]], dtype=torch.float64)  # order-sensitive in float64
    want = ((1e16 + 1.0) - 1e16) + 1.0
    assert ordered_token_sum(x).tolist() == [want]


def test_statistics_in_layer_groups_then_select_equals_one_call():
    """Statistics written group by group into rows of one (L, I) buffer (as the GPU prefill does with
    select_every), then ranked: the same core sets as the one call; bad ``out`` buffers are refused."""
    from coreinfer.runtime.selection import layer_statistics, select_from_statistics, stability_select_layers

    g = torch.Generator().manual_seed(3)
    L, T, I = 5, 23, 70
    acts = (torch.randn(L, T, I, generator=g) * 2).round() / 2  # ties on scores, counts and sums
    for score in ("positive", "magnitude"):
        want_c, want_s = layer_statistics(acts, 0.4, score)
        for dtype in (torch.int32, torch.int64):
            counts, sums = torch.full((L, I), -7, dtype=dtype), torch.full((L, I), float("nan"), dtype=torch.float64)
            for j0, j1 in [(0, 2), (2, 3), (3, 5)]:
                got = layer_statistics(acts[j0:j1], 0.4, score, out=(counts[j0:j1], sums[j0:j1]))
                assert got[0].data_ptr() == counts[j0:j1].data_ptr()
            assert torch.equal(counts.long(), want_c) and torch.equal(sums, want_s)
            k = kept_count(0.3, I)
            assert torch.equal(select_from_statistics(counts, sums, k, T), stability_select_layers(acts, 0.4, 0.3, score))
    with pytest.raises(ValueError, match="out must be contiguous"):
        layer_statistics(acts, 0.4, out=(torch.zeros(L, I, dtype=torch.float32), torch.zeros(L, I, dtype=torch.float64)))
    with pytest.raises(ValueError, match="out must be contiguous"):
        layer_statistics(acts, 0.4, out=(torch.zeros(L, I + 1, dtype=torch.int32), torch.zeros(L, I, dtype=torch.float64)))
    with pytest.raises(ValueError, match="counts and sums"):
        select_from_statistics(torch.zeros(L, I), torch.zeros(L, I + 1), 3, T)


def test_allocation_k_turns_fractions_into_validated_sizes():
    from coreinfer.runtime.selection import allocation_k, check_layer_k

    # round half up per layer, at least 1, sorted by layer
    assert allocation_k({3: 0.5, 0: 0.25, 1: 1.0, 2: 0.001}, n_neurons=10, n_layers=4) == {0: 3, 1: 10, 2: 1, 3: 5}
    assert check_layer_k({1: 10, 0: 1}, 10, 2) == {0: 1, 1: 10}
    with pytest.raises(ValueError, match=r"per-layer k of layer 0 is 0, outside 1..10"):
        check_layer_k({0: 0}, 10, 2)
    with pytest.raises(ValueError, match=r"outside 1..10"):
        check_layer_k({1: 11}, 10, 2)
    with pytest.raises(ValueError, match=r"names layer 5, but the model's layers are 0..1"):
        check_layer_k({5: 3}, 10, 2)
    with pytest.raises(ValueError, match=r"kept fraction of layer 1 must be in \(0, 1\]"):
        allocation_k({1: 1.5}, 10, 2)
    with pytest.raises(TypeError, match="mapping"):
        allocation_k([0.5, 0.5], 10, 2)


def test_stability_select_with_k_is_a_prefix_of_the_ranking():
    from coreinfer.runtime.selection import stability_ranking

    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 20, generator=g)
    ranking = stability_ranking(a, alpha=0.4, score="magnitude")
    assert sorted(ranking.tolist()) == list(range(20))
    for k in (1, 5, 8, 20):
        got = stability_select(a, alpha=0.4, score="magnitude", k=k)
        assert got.tolist() == sorted(ranking[:k].tolist())
    assert stability_select(a, 0.4, beta=0.4, score="magnitude", k=8).tolist() == \
        stability_select(a, 0.4, beta=0.4, score="magnitude").tolist()  # round(0.4 * 20) = 8
    with pytest.raises(ValueError, match=r"k must be an int in 1..20"):
        stability_select(a, 0.4, k=0)
