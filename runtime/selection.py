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
import numbers
from typing import Literal, Mapping

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


# The per-neuron score the runtime ranks by unless told otherwise: |activation| beat the paper's "positive"
# rule at every kept fraction on both real models here (docs/quality.md).
DEFAULT_SCORE = "magnitude"


def check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    return score


def kept_count(beta: float, n_neurons: int) -> int:
    """Number of neurons kept for kept fraction ``beta``: round-half-up of beta * I, at least 1."""
    check_fraction("beta", beta)
    return max(1, min(n_neurons, int(math.floor(beta * n_neurons + 0.5))))


def allocation_k(kept: Mapping[int, float], n_neurons: int, n_layers: int) -> dict[int, int]:
    """Per-layer core-set sizes {layer: k} of an allocation of kept fractions {layer: fraction in (0, 1]}.

    Each k is ``kept_count(fraction, I)``; the result is validated by ``check_layer_k``. This is how a calibrated
    budget (pipeline/budget.py) becomes the sizes the runtime, the artifact and the fast path use.
    """
    if not isinstance(kept, Mapping):
        raise TypeError(f"an allocation is a mapping {{layer: kept fraction}}, got {type(kept).__name__}")
    out = {}
    for layer, frac in kept.items():
        try:
            check_fraction(f"kept fraction of layer {layer}", frac)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (an allocation maps each layer to its kept fraction)") from None
        out[layer] = kept_count(float(frac), n_neurons)
    return check_layer_k(out, n_neurons, n_layers)


def check_layer_k(layer_k: Mapping[int, int], n_neurons: int, n_layers: int) -> dict[int, int]:
    """Validate per-layer core-set sizes {layer: k}: layers in [0, n_layers), 1 <= k <= I; returned sorted by layer."""
    if not isinstance(layer_k, Mapping):
        raise TypeError(f"per-layer sizes are a mapping {{layer: k}}, got {type(layer_k).__name__}")
    out = {}
    for layer, k in layer_k.items():
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < n_layers:
            raise ValueError(f"per-layer k names layer {layer!r}, but the model's layers are 0..{n_layers - 1}")
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= n_neurons:
            raise ValueError(f"per-layer k of layer {layer} is {k!r}, outside 1..{n_neurons} (the layer's FFN width); "
                             "every sparse layer keeps between 1 and all of its neurons")
        out[int(layer)] = int(k)
    return dict(sorted(out.items()))


def neuron_scores(acts: torch.Tensor, score: str = "positive") -> torch.Tensor:
    """Score each activation; only entries with score > 0 may become token-wise core."""
    check_score(score)
    return acts if score == "positive" else acts.abs()


def token_k(n_active: torch.Tensor, n_tokens: int, alpha: float, n_neurons: int) -> torch.Tensor:
    """Per-layer token-wise core size ``min(I, ceil(alpha * P))`` as an int64 device tensor (no host sync).

    ``n_active`` (..., T) holds each token's number of active neurons (score > 0); P = their sum / T, in
    float64 (the counts are exact integers, the division and the product by alpha are correctly rounded
    IEEE operations, so CPU and GPU agree bit for bit).
    """
    if n_tokens == 0:
        return torch.zeros(n_active.shape[:-1], dtype=torch.int64, device=n_active.device)
    mean = n_active.sum(dim=-1, dtype=torch.int64).to(torch.float64) / n_tokens
    return torch.ceil(mean * alpha).to(torch.int64).clamp_(max=n_neurons)


def _scores3(acts: torch.Tensor, score: str) -> torch.Tensor:
    if acts.dim() != 3:
        raise ValueError(f"activations must be (layers, tokens, neurons), got shape {tuple(acts.shape)}")
    return neuron_scores(acts.float(), score)


def _token_core_mask3(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """(L, T, I) boolean token-core mask of scores ``s`` (L, T, I): per token the ``k_token`` of its layer top
    scores (stable sort: equal scores go to the lower index), and only scores > 0. Sync-free."""
    L, T, I = s.shape
    active = s > 0
    k_tok = token_k(active.sum(dim=-1, dtype=torch.int64), T, alpha, I)  # (L,)
    order = s.sort(dim=-1, descending=True, stable=True).indices
    keep = torch.arange(I, device=s.device).view(1, 1, I) < k_tok.view(L, 1, 1)  # rank < k_token
    mask = torch.zeros_like(active).scatter_(-1, order, keep.expand(L, T, I))
    return mask & active


def ordered_token_sum(s: torch.Tensor) -> torch.Tensor:
    """Float64 sum over the token axis (dim -2) of ``s`` (..., T, I), adding the tokens strictly in order
    0, 1, ..., T-1. A fixed order makes the sums (the tie-break of the ranking) bit-identical on every device
    and in the fused GPU kernel (``cuda.select_kernels``), which adds in the same order."""
    acc = torch.zeros(s.shape[:-2] + s.shape[-1:], dtype=torch.float64, device=s.device)
    for t in range(s.shape[-2]):
        acc += s[..., t, :].double()
    return acc


def layer_statistics(acts: torch.Tensor, alpha: float, score: str = "positive",
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer, per-neuron (token-core count (L, I) int64, summed score (L, I) float64) of ``acts`` (L, T, I).

    No host synchronisation. On a CUDA device with Triton, three fused kernels (``cuda.select_kernels``);
    elsewhere the same function from PyTorch ops. Both give identical results (tested). Each layer's
    statistics depend on that layer's activations alone, so layers can be done in groups. ``out`` = (counts
    (L, I) int32 or int64, sums (L, I) float64), contiguous: written in place and returned (e.g. rows of one
    buffer of all layers, filled group by group while a prefill is still running).
    """
    check_fraction("alpha", alpha)
    check_score(score)
    if acts.dim() != 3:
        raise ValueError(f"activations must be (layers, tokens, neurons), got shape {tuple(acts.shape)}")
    if out is not None:
        c_out, s_out = out
        want = (acts.shape[0], acts.shape[2])
        if (tuple(c_out.shape) != want or tuple(s_out.shape) != want or c_out.dtype not in (torch.int32, torch.int64)
                or s_out.dtype != torch.float64 or not (c_out.is_contiguous() and s_out.is_contiguous())
                or c_out.device != acts.device or s_out.device != acts.device):
            raise ValueError(f"out must be contiguous (counts int32/int64, sums float64) of shape {want} on "
                             f"{acts.device}, got {c_out.dtype} {tuple(c_out.shape)} and {s_out.dtype} "
                             f"{tuple(s_out.shape)}")
    if acts.is_cuda and acts.shape[1] > 0:
        from .cuda import select_kernels

        if select_kernels.available(acts):
            return select_kernels.layer_statistics(acts, alpha, score, out=out)
    s = _scores3(acts, score)
    counts = _token_core_mask3(s, alpha).sum(dim=1, dtype=torch.int64)
    sums = ordered_token_sum(s)
    if out is None:
        return counts, sums
    out[0].copy_(counts)
    out[1].copy_(sums)
    return out


def token_core_mask(acts: torch.Tensor, alpha: float, score: str = "positive") -> torch.Tensor:
    """Boolean (T, I) mask of token-wise core neurons for one layer's activations ``acts`` (T, I)."""
    check_fraction("alpha", alpha)
    if acts.dim() != 2:
        raise ValueError(f"activations must be (tokens, neurons), got shape {tuple(acts.shape)}")
    return _token_core_mask3(_scores3(acts[None], score), alpha)[0]


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
    """Neuron indices ordered by ``primary`` desc, then ``secondary`` desc, then index asc.

    Batched over leading dimensions: ``primary`` (..., I) ranks each row on its own.
    """
    shape = primary.shape
    n = shape[-1]
    order = torch.arange(n, device=primary.device).expand(shape).contiguous()
    if secondary is not None:
        order = order.gather(-1, torch.sort(secondary.double(), dim=-1, descending=True, stable=True).indices)
    return order.gather(-1, torch.sort(primary.double().gather(-1, order), dim=-1, descending=True, stable=True).indices)


def top_neurons(primary: torch.Tensor, k: int, secondary: torch.Tensor | None = None) -> torch.Tensor:
    """The ``k`` best-ranked neurons (see ``rank_neurons``), returned sorted ascending as int64 (per row)."""
    if not 1 <= k <= primary.shape[-1]:
        raise ValueError(f"k must be in [1, {primary.shape[-1]}], got {k}")
    return rank_neurons(primary, secondary)[..., :k].sort(dim=-1).values.to(torch.int64)


def core_statistics(acts: torch.Tensor, alpha: float, score: str = "positive") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-neuron (token-core count, summed score) over the T tokens of ``acts`` (T, I).

    Both are additive over tokens, so a prompt's statistics can be accumulated chunk by chunk.
    """
    if acts.dim() != 2:
        raise ValueError(f"activations must be (tokens, neurons), got shape {tuple(acts.shape)}")
    counts, sums = layer_statistics(acts[None], alpha, score)
    return counts[0], sums[0]


def stability_select_layers(acts: torch.Tensor, alpha: float = 0.4, beta: float = 0.4,
                            score: str = "positive", k: int | None = None) -> torch.Tensor:
    """Sentence-wise core sets of L layers at once from ``acts`` (L, T, I) (one prompt's activations of L
    layers, stacked): (L, round(beta * I)) sorted int64 indices, row l = ``stability_select(acts[l])``.
    ``k`` (1..I) sets the size directly instead of ``beta`` (per-layer sizes: ``allocation_k``).

    Sync-free (the result stays on the device, no ``.item()``): the statistics of all layers in one pass,
    then one batched ranking by (count desc, summed score desc, index asc).
    """
    if acts.dim() != 3 or acts.shape[1] == 0:
        raise ValueError(f"activations must be (layers, tokens>=1, neurons), got shape {tuple(acts.shape)}")
    if k is None:
        k = kept_count(beta, acts.shape[2])
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= acts.shape[2]:
        raise ValueError(f"k must be an int in 1..{acts.shape[2]} (neurons of the layer), got {k!r}")
    k = int(k)
    if acts.is_cuda:
        check_fraction("alpha", alpha)
        check_score(score)
        from .cuda import select_kernels

        if select_kernels.available(acts):
            return select_kernels.select(acts, alpha, score, k)
    counts, sums = layer_statistics(acts, alpha, score)
    return select_from_statistics(counts, sums, k, acts.shape[1])


def stability_ranking(acts: torch.Tensor, alpha: float = 0.4, score: str = "positive") -> torch.Tensor:
    """All I neurons of one layer in stability order (count desc, summed score desc, index asc) from ``acts`` (T, I).

    ``stability_select(acts, k=k)`` is ``ranking[:k]`` sorted, for every k: the sensitivity sweep of the budget
    stage ranks once and slices.
    """
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"activations must be (tokens>=1, neurons), got shape {tuple(acts.shape)}")
    counts, sums = layer_statistics(acts[None], alpha, score)
    return rank_neurons(counts[0], sums[0])


def select_from_statistics(counts: torch.Tensor, sums: torch.Tensor, k: int, n_tokens: int) -> torch.Tensor:
    """The ``k`` neurons of each layer by (count desc, summed score desc, index asc) from ``layer_statistics``
    (counts (L, I), every count in [0, n_tokens]): (L, k) sorted int64, the last step of
    ``stability_select_layers``. One kernel on a CUDA device with Triton (``cuda.select_kernels``), else
    ``top_neurons``; both identical (tested)."""
    if counts.shape != sums.shape or counts.dim() != 2:
        raise ValueError(f"counts and sums must both be (layers, neurons), got {tuple(counts.shape)} and "
                         f"{tuple(sums.shape)}")
    if counts.is_cuda:
        from .cuda import select_kernels

        return select_kernels.top_neurons(counts, sums, k, n_tokens)
    return top_neurons(counts, k, sums)


def stability_select(acts: torch.Tensor, alpha: float = 0.4, beta: float = 0.4, score: str = "positive",
                     k: int | None = None) -> torch.Tensor:
    """Sentence-wise core set of one layer from the prompt's own activations ``acts`` (T, I).

    Returns the sorted int64 indices of the ``round(beta * I)`` (or ``k``) most frequent token-wise core neurons.
    """
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ValueError(f"activations must be (tokens>=1, neurons), got shape {tuple(acts.shape)}")
    check_fraction("beta", beta)
    check_score(score)
    return stability_select_layers(acts[None], alpha, beta, score, k=k)[0]


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
