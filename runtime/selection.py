"""Core-neuron selection: the one implementation shared by the runtime and the pipeline.

CoreInfer (arXiv 2410.18311), stability-guided:
  1. token-wise core neurons: per token, the top ``ceil(alpha * P)`` neurons by score, where P is the
     mean number of active neurons per token in the layer (score > 0);
  2. sentence-wise core neurons: the ``round(beta * I)`` neurons that are token-wise core most often;
     ties broken by summed score, then by lower index, so the result is deterministic.

Scores: ``"positive"`` uses the activation value itself (the paper's rule: only positive activations
can be core), ``"magnitude"`` uses ``|a|`` (a gated activation's negative lobe carries signal too).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Score = Literal["positive", "magnitude"]
SCORES: tuple[str, ...] = ("positive", "magnitude")


def check_fraction(name: str, value: float) -> float:
    """Validate a fraction in (0, 1]; the error names the parameter and the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not (0.0 < float(value) <= 1.0) or math.isnan(float(value)):
        raise ValueError(f"{name} must be in (0, 1] (a fraction of neurons), got {value!r}; e.g. {name}=0.4")
    return float(value)


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


def kept_count(beta: float, n_neurons: int) -> int:
    """Number of neurons kept for kept fraction ``beta``: round-half-up of beta * I, at least 1."""
    check_fraction("beta", beta)
    return max(1, min(n_neurons, int(math.floor(beta * n_neurons + 0.5))))


def neuron_scores(acts: torch.Tensor, score: str = "positive") -> torch.Tensor:
    """Score each activation; only entries with score > 0 may become token-wise core."""
    check_score(score)
    return acts if score == "positive" else acts.abs()


def token_core_mask(acts: torch.Tensor, alpha: float, score: str = "positive") -> torch.Tensor:
    """Boolean (T, I) mask of token-wise core neurons for one layer's activations ``acts`` (T, I)."""
    check_fraction("alpha", alpha)
    if acts.dim() != 2:
        raise ValueError(f"activations must be (tokens, neurons), got shape {tuple(acts.shape)}")
    s = neuron_scores(acts.float(), score)
    active = s > 0
    mean_active = active.sum(dim=1, dtype=torch.float64).mean().item() if s.shape[0] else 0.0
    k_token = min(s.shape[1], math.ceil(alpha * mean_active))
    mask = torch.zeros_like(active)
    if k_token == 0:
        return mask
    # stable sort, not topk: equal scores go to the lower index, so ties are deterministic
    top = s.sort(dim=1, descending=True, stable=True).indices[:, :k_token]
    mask.scatter_(1, top, True)
    return mask & active


def token_topk_mask(acts: torch.Tensor, k: int, score: str = "magnitude") -> torch.Tensor:
    """Boolean mask (same shape as ``acts`` (..., I)) of each token's own ``k`` top-scored neurons.

    The per-token oracle baseline of the evaluation (an upper bound for any per-token predictor).
    """
    n = acts.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    s = neuron_scores(acts.float(), score)
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    return mask.scatter_(-1, s.topk(k, dim=-1, sorted=False).indices, True)


def rank_neurons(primary: torch.Tensor, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """Neuron indices ordered by ``primary`` desc, then ``secondary`` desc, then index asc."""
    order = torch.arange(primary.shape[0], device=primary.device)
    if secondary is not None:
        order = order[torch.sort(secondary.double()[order], descending=True, stable=True).indices]
    return order[torch.sort(primary.double()[order], descending=True, stable=True).indices]


def top_neurons(primary: torch.Tensor, k: int, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` best-ranked neurons (see ``rank_neurons``), returned sorted ascending as int64."""
    if not 1 <= k <= primary.shape[0]:
        raise ValueError(f"k must be in [1, {primary.shape[0]}], got {k}")
    return rank_neurons(primary, secondary)[:k].sort().values.to(torch.int64)


def core_statistics(acts: torch.Tensor, alpha: float, score: str = "positive") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron (token-core count, summed score) over the T tokens of ``acts`` (T, I).

    Both are additive over tokens, so a prompt's statistics can be accumulated chunk by chunk.
    """
    mask = token_core_mask(acts, alpha, score)
    counts = mask.sum(dim=0, dtype=torch.int64)
    sums = neuron_scores(acts.double(), score).sum(dim=0)
    return counts, sums


def stability_select(acts: torch.Tensor, alpha: float = 0.4, beta: float = 0.4, score: str = "positive") -> torch.Tensor:
    """Sentence-wise core set of one layer from the prompt's own activations ``acts`` (T, I).

    Returns the sorted int64 indices of the ``round(beta * I)`` most frequent token-wise core neurons.
    """
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"activations must be (tokens>=1, neurons), got shape {tuple(acts.shape)}")
    counts, sums = core_statistics(acts, alpha, score)
    return top_neurons(counts, kept_count(beta, acts.shape[1]), sums)


def frequency_select(frequency: torch.Tensor, k: int, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Core set of the ``k`` most frequent neurons (static/global sets, per-cluster sets)."""
    return top_neurons(frequency, k, tiebreak)


def griffin_select(acts: torch.Tensor, beta: float) -> torch.Tensor:
    """GRIFFIN (arXiv 2404.01365): neurons with the largest L2 norm of per-token-normalised activations."""
    a = acts.double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return top_neurons(a.norm(dim=0), kept_count(beta, acts.shape[1]))


def pack_core_set(core_set: torch.Tensor, n_neurons: int) -> torch.Tensor:
    """Boolean membership vector (I,) of a core set."""
    member = torch.zeros(n_neurons, dtype=torch.bool, device=core_set.device)
    member[core_set] = True
    return member


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard index of two core sets given as index tensors."""
    sa, sb = set(a.tolist()), set(b.tolist())
    union = len(sa | sb)
    return len(sa & sb) / union if union else 1.0
