"""Neuron-selection methods compared by the evaluation, and the per-prompt session each one runs.

Every method is realised as a runtime session (``coreinfer.runtime.session``) handed to
``SparseLM.score_ids``/``SparseLM.generate``, so the prompt is always processed dense (the prefill) and
every scored or generated token after it goes through the method's sparse FFN. Selection itself is
always the shared code of ``coreinfer.runtime.selection``.

  dense          no sparsity (the reference)
  stability      CoreInfer, stability-guided: the prompt's own sentence-wise core neurons
  similarity     CoreInfer, similarity-guided: the semantic cluster's core neurons (needs an artifact)
  auto           similarity when the prompt is inside a cluster, else stability (needs an artifact)
  static         one global hot set, input independent (artifact frequency, or the evaluation's profile)
  griffin        GRIFFIN (arXiv 2404.01365): largest norm of the prompt's per-token-normalised activations
  random         a random core set of the same size (seeded per item)
  oracle-token   per-token top-k by |activation|: an upper bound for any per-token predictor, NOT a speed path
  svd-predictor  training-free per-token predictor: truncated SVD of the gate projection, per-layer
                 thresholds calibrated on the profile corpus to the target kept fraction
  budget         stability-guided with per-layer core-set sizes: the budget stage's allocation (budget.json's
                 greedy path) at the kept fraction, read as FFN bytes per decoded token over dense (model-wide)
  down-token     every neuron's gate/up (or fc1) row, then per token only the down columns of its top-k |a|
                 (k = kept * I): the exact intermediate activation chooses, no predictor; bytes count every
                 gate/up row and the k down columns
  stability-refresh
                 stability-guided from the prefill, then every ``refresh_every`` decoded tokens re-selected (the
                 same selection) from those tokens' dense activations; bytes count the refresh's own reads
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from coreinfer.runtime.selection import (
    DEFAULT_SCORE, SCORES, check_fraction, core_statistics, frequency_select, griffin_select, kept_count, token_topk_mask,
)
from coreinfer.runtime.ffn import FFNWeights
from coreinfer.runtime.session import CoreSetSession, Session, TokenMaskSession, stability_selector


@dataclass(frozen=True)
class MethodInfo:
    name: str
    uses_kept: bool  # swept over kept fractions (dense is not)
    uses_score: bool  # swept over selection scores (positive / magnitude)
    needs_artifact: bool
    needs_profile: bool  # needs the evaluation's calibration profile
    speed_path: bool  # False: a quality bound, not something that could run faster
    description: str
    needs_budget: bool = False  # needs a budget stage output (budget.json)
    needs_refresh: bool = False  # needs refresh_every (decoded tokens between re-selections)


METHODS: dict[str, MethodInfo] = {
    m.name: m
    for m in (
        MethodInfo("dense", False, False, False, False, True, "all neurons (reference)"),
        MethodInfo("stability", True, True, False, False, True, "CoreInfer stability-guided (prompt's own core set)"),
        MethodInfo("similarity", True, True, True, False, True, "CoreInfer similarity-guided (cluster core set)"),
        MethodInfo("auto", True, True, True, False, True, "similarity inside a cluster, else stability"),
        MethodInfo("static", True, False, False, True, True, "one global hot set (input independent)"),
        MethodInfo("griffin", True, False, False, False, True, "GRIFFIN: prompt's normalised-activation norm"),
        MethodInfo("random", True, False, False, False, True, "random neurons, same kept fraction"),
        MethodInfo("oracle-token", True, False, False, False, False,
                   "per-token top-k by |activation| (upper bound; not a speed path)"),
        MethodInfo("svd-predictor", True, False, False, True, True, "truncated-SVD gate predictor, calibrated thresholds"),
        MethodInfo("down-token", True, False, False, False, True,
                   "all gate/up rows, per token the down columns of the top-k |a| (exact activation chooses)"),
        MethodInfo("budget", True, False, False, False, True,
                   "per-layer budget (budget.json) at the kept fraction of FFN bytes, stability-guided", needs_budget=True),
        MethodInfo("stability-refresh", True, True, False, False, True,
                   "stability-guided, re-selected every --refresh-every decoded tokens from their dense activations",
                   needs_refresh=True),
    )
}


class MethodError(ValueError):
    pass


def check_methods(names: list[str], have_artifact: bool, static_source: str = "artifact",
                  have_budget: bool = False, refresh_every: int | None = None) -> list[str]:
    """Validate method names before anything is loaded; errors name the method and the fix."""
    check_refresh_every(refresh_every)
    if not names:
        raise MethodError(f"no methods given; choose from {', '.join(METHODS)}")
    for n in names:
        if n not in METHODS:
            raise MethodError(f"unknown method {n!r}; choose from {', '.join(METHODS)}")
        if METHODS[n].needs_artifact and not have_artifact:
            raise MethodError(f"method {n!r} needs --artifact (a calibration artifact, coreneurons.zarr); "
                              "build one with `dvc repro`")
        if METHODS[n].needs_budget and not have_budget:
            raise MethodError(f"method {n!r} needs --budget (the budget stage's budget.json); build one with "
                              "`python -m coreinfer.pipeline budget budget.target=...` or `dvc repro budget`")
        if METHODS[n].needs_refresh and refresh_every is None:
            raise MethodError(f"method {n!r} needs --refresh-every N (decoded tokens between re-selections, >= 1); "
                              "e.g. --refresh-every 16")
        if n == "static" and static_source == "artifact" and not have_artifact:
            raise MethodError("method 'static' needs --artifact (its global hot set); build one with `dvc repro`, "
                              "or use --static-source profile to take the hot set from the evaluation's profile corpus")
    if len(set(names)) != len(names):
        raise MethodError(f"method listed twice: {names}")
    return names


def check_refresh_every(n) -> int | None:
    """``refresh_every``: None (no refresh) or a whole number of decoded tokens >= 1."""
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MethodError(f"--refresh-every must be a whole number of decoded tokens >= 1, got {n!r}; "
                          "e.g. --refresh-every 16")
    return n


# ---------------------------------------------------------------------------------------------------
# calibration profile (static hot set from the profile corpus, SVD predictor thresholds)

QUANTILE_POINTS = 2049  # points of each layer's quantile sketch of predicted gate values


class _ProfileSession(Session):
    """Dense FFN that records, per sparse layer, the token-core statistics and the SVD-predicted gate values."""

    def __init__(self, layers: range, alpha: float, score: str, predictors: dict[int, "SVDPredictor"] | None):
        self.layers = layers
        self.alpha = alpha
        self.score = score
        self.predictors = predictors or {}
        self.counts: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.predicted: dict[int, list[torch.Tensor]] = {i: [] for i in layers}

    def ffn(self, layer_idx, x, dense):
        a = dense.intermediate(x)
        if layer_idx in self.layers:
            flat = a.reshape(-1, a.shape[-1])
            c, s = core_statistics(flat, self.alpha, self.score)
            self.counts[layer_idx] = self.counts.get(layer_idx, 0) + c
            self.sums[layer_idx] = self.sums.get(layer_idx, 0) + s
            if layer_idx in self.predictors:
                self.predicted[layer_idx].append(self.predictors[layer_idx].predict(x.reshape(-1, x.shape[-1])).float())
        return dense.output(a)


@dataclass
class SVDPredictor:
    """Rank-r factorisation of one layer's gate projection: predicted gate = (x @ A) @ B, A (H, r), B (r, I)."""

    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def from_gate(cls, gate: torch.Tensor, rank: int) -> "SVDPredictor":
        w = gate.detach().float()  # (I, H)
        r = min(rank, *w.shape)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        # gate(x) = x @ W^T = x @ V S U^T  ->  A = V_r (H, r), B = S_r U_r^T (r, I)
        return cls(vh[:r].t().contiguous().to(gate.dtype), (s[:r, None] * u[:, :r].t()).contiguous().to(gate.dtype))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.a.dtype) @ self.a) @ self.b

    def nbytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


@dataclass
class Profile:
    """What the evaluation learns from its profile corpus (never from evaluation items)."""

    layers: range
    counts: dict[int, torch.Tensor]  # token-core counts per neuron
    sums: dict[int, torch.Tensor]  # summed scores (tie-break)
    quantiles: dict[int, torch.Tensor]  # (QUANTILE_POINTS,) quantile sketch of SVD-predicted gate values
    corpus_hash: str
    n_prompts: int
    n_tokens: int

    def hot_set(self, layer: int, k: int) -> torch.Tensor:
        return frequency_select(self.counts[layer], k, self.sums[layer])

    def threshold(self, layer: int, kept: float) -> float:
        """Gate threshold above which a fraction ``kept`` of (token, neuron) pairs fell on the corpus."""
        q = self.quantiles[layer].double()
        pos = (1.0 - kept) * (q.shape[0] - 1)
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        return float(q[lo] + (q[hi] - q[lo]) * (pos - lo))

    def save(self, path) -> None:
        arrays = {}
        for i in self.layers:
            arrays[f"counts_{i}"] = self.counts[i].numpy()
            arrays[f"sums_{i}"] = self.sums[i].numpy()
            if i in self.quantiles:
                arrays[f"quantiles_{i}"] = self.quantiles[i].numpy()
        meta = np.array([self.layers.start, self.layers.stop, self.n_prompts, self.n_tokens], dtype=np.int64)
        np.savez(path, meta=meta, corpus_hash=np.array(self.corpus_hash), **arrays)

    @classmethod
    def load(cls, path) -> "Profile":
        with np.load(path, allow_pickle=False) as z:
            start, stop, n_prompts, n_tokens = (int(v) for v in z["meta"])
            layers = range(start, stop)
            counts = {i: torch.from_numpy(z[f"counts_{i}"]) for i in layers}
            sums = {i: torch.from_numpy(z[f"sums_{i}"]) for i in layers}
            quantiles = {i: torch.from_numpy(z[f"quantiles_{i}"]) for i in layers if f"quantiles_{i}" in z}
            return cls(layers, counts, sums, quantiles, str(z["corpus_hash"]), n_prompts, n_tokens)


def build_predictors(lm, layers: range, rank: int) -> dict[int, SVDPredictor]:
    if rank < 1:
        raise MethodError(f"svd rank must be >= 1, got {rank}")
    return {i: SVDPredictor.from_gate(_gate_weight(lm.adapter.dense[i]), rank) for i in layers}


def _gate_weight(w) -> torch.Tensor:
    if w.gate is not None:
        return w.gate
    if w.fc1 is not None:
        return w.fc1
    raise MethodError("svd-predictor needs a gate (or fc1) projection")


def compute_profile(lm, prompts: list[str], layers: range, alpha: float, predictors: dict[int, SVDPredictor],
                    max_tokens: int = 256, progress: bool = False) -> Profile:
    """Dense passes over the profile prompts: token-core frequencies and predicted-gate quantiles per layer."""
    if not prompts:
        raise MethodError("the profile corpus is empty")
    from tqdm.auto import tqdm

    session = _ProfileSession(layers, alpha, "positive", predictors)
    n_tokens = 0
    token = lm._active.set(session)
    try:
        with torch.inference_mode():
            for p in tqdm(prompts, desc="profile", disable=not progress, leave=False):
                ids = lm.encode(p)[:, :max_tokens]
                n_tokens += ids.shape[1]
                lm.model(input_ids=ids, use_cache=False)
    finally:
        lm._active.reset(token)
    quantiles = {}
    probs = torch.linspace(0, 1, QUANTILE_POINTS, dtype=torch.float64)
    for i, chunks in session.predicted.items():
        if chunks:
            v = torch.cat([c.reshape(-1) for c in chunks]).double().sort().values
            idx = (probs * (v.numel() - 1)).round().long()
            quantiles[i] = v[idx]
    h = hashlib.sha256("\n\x00".join(prompts).encode()).hexdigest()
    return Profile(layers, {i: session.counts[i] for i in layers}, {i: session.sums[i] for i in layers}, quantiles,
                   h, len(prompts), n_tokens)


# ---------------------------------------------------------------------------------------------------
# per-call sessions


@dataclass
class MaskTracker:
    """Counts kept/total neurons over the sparse tokens of one call (token-mask methods)."""

    kept: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.kept / self.total if self.total else float("nan")


def _neuron_bytes(w: FFNWeights) -> tuple[float, float]:
    """(bytes of one neuron's gate/up rows (or fc1 row and bias), bytes of one neuron in all: those rows plus its
    down column) of a dense layer."""
    rows = sum(t.numel() * t.element_size() for t in (w.gate, w.up, w.fc1, w.fc1_bias) if t is not None)
    down = w.down.numel() * w.down.element_size()
    return rows / w.n_neurons, (rows + down) / w.n_neurons


@dataclass
class RefreshTracker:
    """What one stability-refresh call read: each layer's FFN bytes per token between refreshes, and what the
    refreshes read on top (two counts: the least a refresh must read, and a plain full re-gather)."""

    tokens: int = 0  # sparse tokens run (after the prefill)
    layer_bytes: dict[int, int] = field(default_factory=dict)  # sparse layer -> its compact FFN's bytes per token
    layer_k: dict[int, int] = field(default_factory=dict)
    refreshes: int = 0  # re-selections, summed over the sparse layers
    jaccard_sum: float = 0.0  # Jaccard(old, new core set), summed over refreshes
    refresh_bytes: float = 0.0  # least: the non-core gate/up rows (to complete the window's activations), plus
    #                             reading and writing the entering neurons into the compact FFN
    refresh_bytes_full: float = 0.0  # plain: every gate/up row, plus re-gathering the whole compact FFN (read, write)


class RefreshSession(Session):
    """Stability core sets from the prompt's dense prefill, re-selected every ``every`` decoded tokens from the
    dense intermediate activations of those ``every`` tokens, with the runtime's own selection (``select``).

    A sparse decode does not have those dense activations: the refresh computes them from the tokens' FFN inputs
    (as they were in the sparse run), which is what ``RefreshTracker`` charges. Each token's FFN output is the
    compact FFN of the core set in effect for it (``FFNWeights.gather``, as the runtime decodes); its dense
    activations are computed alongside for the next refresh. Causal: a core set depends only on earlier tokens.
    """

    def __init__(self, layers, select: Callable[[int, torch.Tensor], torch.Tensor], every: int,
                 tracker: RefreshTracker):
        check_refresh_every(every)
        self.layers = layers
        self.select = select
        self.every = every
        self.tracker = tracker
        self.prefill_done = False
        self.core_sets: dict[int, torch.Tensor] = {}
        self.compact: dict[int, FFNWeights] = {}
        self.window: dict[int, list[torch.Tensor]] = {}  # dense activations of the tokens since the last selection
        self.first = min(layers)

    def ffn(self, layer_idx, x, dense):
        if layer_idx not in self.layers:
            return dense(x)
        if not self.prefill_done:  # the prefill: dense, and the first selection (as CoreSetSession does)
            a = dense.intermediate(x)
            self._install(layer_idx, self.select(layer_idx, a.reshape(-1, a.shape[-1])), dense)
            self.tracker.layer_bytes[layer_idx] = self.compact[layer_idx].nbytes()
            self.tracker.layer_k[layer_idx] = int(self.core_sets[layer_idx].numel())
            return dense.output(a)
        if x.dim() == 3 and x.shape[0] != 1:
            raise ValueError("stability-refresh follows one sequence; score or generate one prompt at a time")
        rows = x.reshape(-1, x.shape[-1])
        acts = dense.intermediate(rows)
        outs, t = [], 0
        while t < rows.shape[0]:
            n_window = sum(w.shape[0] for w in self.window[layer_idx])
            if n_window == self.every:
                self._refresh(layer_idx, dense)
                n_window = 0
            take = min(rows.shape[0] - t, self.every - n_window)
            outs.append(self.compact[layer_idx](rows[t:t + take]))
            self.window[layer_idx].append(acts[t:t + take])
            t += take
        if layer_idx == self.first:
            self.tracker.tokens += rows.shape[0]
        return torch.cat(outs).reshape(x.shape)

    def _install(self, layer_idx: int, core: torch.Tensor, dense: FFNWeights) -> None:
        self.core_sets[layer_idx] = core
        self.compact[layer_idx] = dense.gather(core)
        self.window[layer_idx] = []

    def _refresh(self, layer_idx: int, dense: FFNWeights) -> None:
        old = self.core_sets[layer_idx]
        new = self.select(layer_idx, torch.cat(self.window[layer_idx]))
        kept = int(torch.isin(new, old).sum())
        entered = new.numel() - kept
        row_b, neuron_b = _neuron_bytes(dense)
        tr = self.tracker
        tr.refreshes += 1
        tr.jaccard_sum += kept / (old.numel() + new.numel() - kept)
        tr.refresh_bytes += (dense.n_neurons - old.numel()) * row_b + 2 * entered * neuron_b
        tr.refresh_bytes_full += dense.n_neurons * row_b + 2 * new.numel() * neuron_b
        self._install(layer_idx, new, dense)


@dataclass
class MethodContext:
    """Everything a method needs beyond the prompt: the model, the sparse layers and calibration data."""

    lm: object
    layers: range
    alpha: float
    seed: int
    artifact: object | None = None  # CoreArtifact
    static_source: str = "artifact"
    profile: Profile | None = None
    predictors: dict[int, SVDPredictor] = field(default_factory=dict)
    budget: str | None = None  # path of a budget stage output (method "budget")
    refresh_every: int | None = None  # method "stability-refresh": decoded tokens between re-selections

    def static_core_sets(self, kept: float) -> dict[int, torch.Tensor]:
        n = self.lm.adapter.n_neurons
        k = kept_count(kept, n)
        if self.static_source == "artifact":
            art = self.artifact
            if art is None:
                raise MethodError("method 'static' needs --artifact; build one with `dvc repro`")
            start, end = art.layer_range
            if self.layers.start < start or self.layers.stop > end:
                raise MethodError(f"the artifact covers layers [{start}, {end}) but the evaluation sparsifies "
                                  f"[{self.layers.start}, {self.layers.stop}); pass --layers {start}:{end}")
            # the pipeline's own hot-set rule (pipeline/coreset.py), at this kept fraction: neurons ranked by
            # how many profiled prompts hold them in their sentence-wise core set, ties by activation frequency
            core = art.arrays["core_frequency"]
            freq = art.arrays["frequency"]
            return {i: frequency_select(torch.from_numpy(np.asarray(core[i - start], dtype=np.float64)), k,
                                        torch.from_numpy(np.asarray(freq[i - start], dtype=np.float64)))
                    for i in self.layers}
        if self.profile is None:
            raise MethodError("method 'static' with --static-source profile needs the evaluation profile")
        return {i: self.profile.hot_set(i, k) for i in self.layers}


def item_seed(seed: int, item_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class MethodRun:
    """One (method, kept, score) configuration; ``session(item_id)`` builds a fresh per-call session."""

    method: str
    kept: float
    score: str | None
    ctx: MethodContext

    def __post_init__(self):
        if self.method not in METHODS:
            raise MethodError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        check_fraction("kept fraction", self.kept)
        if self.score is not None and self.score not in SCORES:
            raise MethodError(f"unknown score {self.score!r}; choose from {SCORES}")

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.method]

    @property
    def beta(self) -> float:
        return self.kept

    @property
    def layer_k(self) -> dict[int, int] | None:
        """Per-layer core-set sizes of the sparse layers, where they apply: the budget's allocation at this kept
        fraction of the FFN bytes, or a budget artifact's own sizes (similarity/auto); else None (one beta)."""
        lm = self.ctx.lm
        if self.method == "budget":
            from coreinfer.pipeline.budget import path_allocation

            return path_allocation(self.ctx.budget, self.kept, lm.adapter.n_neurons, lm.adapter.n_layers)
        if self.method in ("similarity", "auto") and self.artifact_allocation:
            return lm.artifact_layer_k(self.method, None, None)
        return None

    @property
    def artifact_allocation(self) -> bool:
        """True when the artifact holds per-layer sizes (a budget): its methods run at those sizes."""
        art = self.ctx.artifact
        return bool(art is not None and getattr(art, "per_layer", False))

    @property
    def sparse_layers(self):
        layer_k = self.layer_k
        return self.ctx.layers if layer_k is None else list(layer_k)

    def runtime_method(self) -> str:
        """The SparseLM method name used for the call (baselines pass their own session)."""
        return self.method if self.method in ("dense", "stability", "similarity", "auto") else "stability"

    def session(self, item_id: str) -> tuple[Session | None, MaskTracker | None]:
        """A fresh session for one call, or None when SparseLM realises the method itself."""
        m, ctx = self.method, self.ctx
        if m in ("dense", "stability", "similarity", "auto"):
            return None, None
        n = ctx.lm.adapter.n_neurons
        k = kept_count(self.kept, n)
        if m == "budget":
            layer_k = self.layer_k
            return CoreSetSession(list(layer_k), stability_selector(ctx.alpha, self.kept, DEFAULT_SCORE, layer_k)), None
        if m == "stability-refresh":
            tracker = RefreshTracker()
            select = stability_selector(ctx.alpha, self.kept, self.score or DEFAULT_SCORE)
            return RefreshSession(ctx.layers, select, ctx.refresh_every, tracker), tracker
        if m == "static":
            return CoreSetSession(ctx.layers, core_sets=ctx.static_core_sets(self.kept)), None
        if m == "griffin":
            beta = self.kept
            return CoreSetSession(ctx.layers, select=lambda layer, acts: griffin_select(acts, beta)), None
        if m == "random":
            g = torch.Generator().manual_seed(item_seed(ctx.seed, item_id))
            sets = {i: torch.randperm(n, generator=g)[:k].sort().values for i in ctx.layers}
            return CoreSetSession(ctx.layers, core_sets=sets), None
        tracker = MaskTracker()
        if m in ("oracle-token", "down-token"):  # the same mask; down-token pays for every gate/up row
            def mask_fn(layer, x, acts):
                mask = token_topk_mask(acts, k, "magnitude")
                tracker.kept += int(mask.sum())
                tracker.total += mask.numel()
                return mask
            return TokenMaskSession(ctx.layers, mask_fn), tracker
        if m == "svd-predictor":
            if ctx.profile is None or not ctx.predictors:
                raise MethodError("svd-predictor needs the calibration profile and predictors")
            thresholds = {i: ctx.profile.threshold(i, self.kept) for i in ctx.layers}
            predictors = ctx.predictors

            def mask_fn(layer, x, acts):
                mask = predictors[layer].predict(x) > thresholds[layer]
                tracker.kept += int(mask.sum())
                tracker.total += mask.numel()
                return mask
            return TokenMaskSession(ctx.layers, mask_fn), tracker
        raise MethodError(f"method {m!r} has no session builder")  # unreachable: METHODS is checked above

    def cost(self, stats, tracker: MaskTracker | None) -> dict:
        """Kept fractions and FFN bytes read per decoded token for one call's stats.

        kept_sparse: fraction of neurons used inside the sparse layers; kept_model: over all FFN neurons.
        For token-mask methods these are measured over the call's sparse tokens, and the bytes are those
        of the neurons kept (plus, for svd-predictor, the predictor's own weights).
        """
        lm = self.ctx.lm
        n_layers, n = lm.adapter.n_layers, lm.adapter.n_neurons
        if self.method == "dense":
            return {"kept_sparse": 1.0, "kept_model": 1.0, "ffn_bytes_per_token": int(stats.ffn_bytes_per_token)}
        if isinstance(tracker, RefreshTracker):
            return self._refresh_cost(tracker)
        if tracker is None:
            sizes = stats.layer_k or {}
            if not sizes:
                raise RuntimeError(f"method {self.method!r} ran without core sets (dense): refusing to report it as sparse")
            return {"kept_sparse": sum(sizes.values()) / (len(sizes) * n), "kept_model": float(stats.kept_fraction),
                    "ffn_bytes_per_token": int(stats.ffn_bytes_per_token)}
        if tracker.total == 0:
            # nothing ran after the prefill (one scored token, or generation ended on its first token):
            # no sparse token to measure, so no kept fraction and no bytes are reported for this call
            return {"kept_sparse": float("nan"), "kept_model": float("nan"), "ffn_bytes_per_token": None}
        frac = tracker.fraction
        dense = lm.adapter.dense
        nb = 0.0
        for i, w in enumerate(dense):
            if i in self.ctx.layers and self.method == "down-token":
                down = w.down.numel() * w.down.element_size()
                nb += w.nbytes() - down + down * frac
            elif i in self.ctx.layers:
                nb += w.nbytes() * frac
                if self.method == "svd-predictor":
                    nb += self.ctx.predictors[i].nbytes()
            else:
                nb += w.nbytes()
        n_sparse = len(self.ctx.layers)
        kept_model = (n_sparse * frac + (n_layers - n_sparse)) / n_layers
        return {"kept_sparse": frac, "kept_model": kept_model, "ffn_bytes_per_token": int(round(nb))}

    def _refresh_cost(self, tr: RefreshTracker) -> dict:
        """FFN bytes per decoded token of stability-refresh: the compact FFNs every token reads, plus the refreshes'
        reads spread over the call's sparse tokens (the least a refresh must read; ``..._full_refresh``: a plain
        full re-gather). Activation traffic (the window's stored inputs) is not counted: N x (H + k) values per
        layer, under 2% of a layer's weights at N = 32 on these models."""
        lm = self.ctx.lm
        n_layers, n = lm.adapter.n_layers, lm.adapter.n_neurons
        kept_sparse = sum(tr.layer_k.values()) / (len(tr.layer_k) * n)
        kept_model = (sum(tr.layer_k.values()) + (n_layers - len(tr.layer_k)) * n) / (n_layers * n)
        out = {"kept_sparse": kept_sparse, "kept_model": kept_model, "refreshes": tr.refreshes // len(tr.layer_k),
               "core_jaccard": tr.jaccard_sum / tr.refreshes if tr.refreshes else None}
        if tr.tokens == 0:  # nothing ran after the prefill: no bytes per decoded token to report
            return {**out, "ffn_bytes_per_token": None, "ffn_bytes_per_token_full_refresh": None}
        token = sum(tr.layer_bytes.get(i, w.nbytes()) for i, w in enumerate(lm.adapter.dense))
        out["ffn_bytes_per_token"] = int(round(token + tr.refresh_bytes / tr.tokens))
        out["ffn_bytes_per_token_full_refresh"] = int(round(token + tr.refresh_bytes_full / tr.tokens))
        return out


def method_configs(methods: list[str], kept: list[float], scores: list[str],
                   artifact_beta: float | None = None, artifact_kept: float | None = None) -> list[tuple[str, float, str | None]]:
    """The (method, kept, score) grid: dense once; score-free methods once per kept fraction.

    Artifact core sets exist at the artifact's kept fraction only, so ``similarity``/``auto`` run there alone.
    An artifact with per-layer sizes (``artifact_kept``: its FFN bytes over dense) runs them once, at its sizes.
    """
    out = []
    for m in methods:
        info = METHODS[m]
        ks = kept if info.uses_kept else [1.0]
        if info.needs_artifact and artifact_kept is not None:
            ks = [round(float(artifact_kept), 6)]
        elif info.needs_artifact and artifact_beta is not None:
            ks = [k for k in ks if abs(float(k) - artifact_beta) < 1e-9]
            if not ks:
                raise ValueError(f"method {m!r} uses the artifact's core sets, built at kept {artifact_beta:g}; "
                                 f"add {artifact_beta:g} to --kept or rebuild the artifact at the kept fraction you need")
        ss = scores if info.uses_score else [None]
        out += [(m, float(k), s) for k in ks for s in ss]
    return out
