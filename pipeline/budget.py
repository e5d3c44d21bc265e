"""Stage 3, budget: per-layer kept fractions that read the fewest FFN bytes per decoded token for a quality target.

One beta on a fixed layer range (the paper's setting) spends the budget badly: layers differ widely in what
they tolerate. This stage measures each layer's sensitivity and allocates per-layer core-set sizes.

Calibration prompts: a seeded sample of ``budget.prompts`` train-split prompts (the held-out split stays unseen,
for the evaluate stage). Each prompt's dense greedy continuation of ``budget.continuation`` tokens (end of
sequence suppressed) is the reference, scored by teacher forcing; the first continuation token is predicted by
the dense prefill, so every metric counts the tokens after it: mean KL(dense || sparse) per token and top-1
agreement of the argmax with dense. Selection is the runtime's (stability-guided from the prompt's prefill,
``profile.alpha`` and ``profile.score``).

1. Sensitivity: every covered layer alone at every ``budget.grid`` fraction, the other layers dense: curves
   (L, G) of KL and agreement. The runs of one prompt share its prefill and go through the model as one batch,
   each row masking its layer's non-core neurons (the same sum as the runtime's compact FFN).
2. Allocation (``greedy_path``): from all dense to every layer at the grid's smallest fraction, each step takes
   the move (one layer down to a lower grid fraction) with the smallest predicted KL increase per neuron saved;
   the predicted KL of a state is the sum of its layers' measured KL (each curve made monotone). A layer whose
   first step costs more than the target allows stays dense.
3. Joint verification (``choose``): states are measured with all their layers sparse at once, through the
   runtime's own path (``SparseLM.score_ids`` with ``layer_k``). ``{bytes: B}``: the first state at or under B.
   ``{agreement: A}`` / ``{kl: K}``: a binary search along the path for the sparsest state whose joint
   measurement meets the target (layer losses interact, so the additive prediction alone is not trusted).

Writes ``<model_dir>/budget.json`` (curves, path, the allocation and its joint measurement) and
``metrics/budget.json``. With ``budget.target: null`` both say ``allocation: null`` and coreset keeps
``coreset.beta`` on every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from coreinfer.runtime.selection import allocation_k, kept_count, stability_ranking
from coreinfer.runtime.session import Session

from .config import PipelineConfig
from .io import read_corpus, write_json
from .profile import load_lm

LOGITS_BYTES_PER_CHUNK = 256 * 2**20  # rows of one sensitivity batch: their logits stay under this


class BudgetError(ValueError):
    """The budget cannot be computed as asked; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------
# calibration items and measurements


@dataclass
class CalibrationItem:
    ids: torch.Tensor  # (1, T) prompt tokens
    cont: list[int]  # dense greedy continuation (C tokens)
    rankings: dict[int, torch.Tensor]  # layer -> all neurons in stability order (from the prompt's prefill)
    dense_logprobs: torch.Tensor  # (C-1, V): dense (runtime path), at the continuation positions after the first


@dataclass
class Quality:
    kl: float  # mean KL(dense || sparse) per scored token, nats
    agreement: float  # top-1 agreement with the dense argmax

    def meets(self, target: dict[str, float]) -> bool:
        (name, value), = target.items()
        return self.agreement >= value if name == "agreement" else self.kl <= value if name == "kl" else True


def _kl_and_agreement(ref: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``other`` (..., N, V) log-probs against ``ref`` (N, V): (mean KL(ref || other), agreement)."""
    p = ref.double()
    kl = (p.exp() * (p - other.double())).sum(-1).clamp_min(0.0).mean(-1)
    agree = (other.argmax(-1) == ref.argmax(-1)).double().mean(-1)
    return kl, agree


class _RankSession(Session):
    """Dense FFN that ranks every covered layer's neurons from the prompt's own activations (the runtime's order)."""

    def __init__(self, layers, alpha: float, score: str):
        self.layers, self.alpha, self.score = layers, alpha, score
        self.rankings: dict[int, torch.Tensor] = {}

    def ffn(self, layer_idx, x, dense):
        a = dense.intermediate(x)
        if layer_idx in self.layers:
            self.rankings[layer_idx] = stability_ranking(a.reshape(-1, a.shape[-1]), self.alpha, self.score)
        return dense.output(a)


class _RowMaskSession(Session):
    """A batch of B runs of one continuation: row b keeps, at each layer of ``masks``, only ``masks[layer][b]``."""

    def __init__(self, masks: dict[int, torch.Tensor], n_rows: int):
        self.masks, self.n_rows = masks, n_rows

    def ffn(self, layer_idx, x, dense):
        mask = self.masks.get(layer_idx)
        if mask is None:
            return dense(x)
        a = dense.intermediate(x)
        rows = a.reshape(self.n_rows, -1, a.shape[-1]) * mask[:, None, :].to(a.dtype)
        return dense.output(rows.reshape(a.shape))


def _with_session(lm, session: Session, fn):
    token = lm._active.set(session)
    try:
        with torch.inference_mode():
            return fn()
    finally:
        lm._active.reset(token)


def calibration_items(lm, prompts: list[str], layers, alpha: float, score: str, continuation: int,
                      max_tokens: int) -> list[CalibrationItem]:
    """Per prompt: its tokens, the dense greedy continuation and every covered layer's stability ranking."""
    eos = sorted(lm._eos_ids())
    items = []
    for text in prompts:
        ids = lm.encode(text)[:, :max_tokens]
        with torch.inference_mode():  # no session active: the dense model
            gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=continuation,
                                    min_new_tokens=continuation, do_sample=False,
                                    pad_token_id=eos[0] if eos else None, eos_token_id=eos or None)
        cont = gen[0, ids.shape[1]:].tolist()
        if len(cont) < 2:
            raise BudgetError(f"budget: the dense model continued a calibration prompt with {len(cont)} token(s); "
                              "budget.continuation must be >= 2 and the model must generate")
        rank = _RankSession(layers, alpha, score)
        _with_session(lm, rank, lambda: lm.model(input_ids=ids, use_cache=False))
        dense = lm.score_ids(ids, cont, "dense", alpha, 1.0, range(0), keep_logprobs=True)
        items.append(CalibrationItem(ids, cont, rank.rankings, dense.logprobs[1:]))
    return items


def _row_batches(n_rows: int, n_positions: int, vocab: int) -> int:
    return max(1, min(n_rows, LOGITS_BYTES_PER_CHUNK // max(1, n_positions * vocab * 4)))


def measure_sensitivity(lm, items: list[CalibrationItem], layers, grid: list[float],
                        progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(kl, agreement), each (L, G): layer l alone at kept ``grid[g]``, every other layer dense, averaged over
    the items. The reference is the batch's own dense row (same batch shape, so the same rounding)."""
    import copy

    from tqdm import tqdm

    layers = list(layers)
    n = lm.adapter.n_neurons
    ks = [kept_count(g, n) for g in grid]
    configs = [(None, None)] + [(l, k) for l in layers for k in ks]  # row 0: dense (the reference)
    kl = np.zeros((len(layers), len(grid)))
    agree = np.zeros((len(layers), len(grid)))
    pos = {l: i for i, l in enumerate(layers)}
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    bar = tqdm(total=len(items) * len(configs), desc="budget: sensitivity", unit="run", disable=not progress)
    for item in items:
        prefill = _with_session(lm, Session(), lambda: lm.model(input_ids=item.ids, use_cache=True))
        cont = torch.tensor([item.cont[:-1]], dtype=torch.long, device=lm.device)
        step = _row_batches(len(configs), cont.shape[1], vocab)
        for c0 in range(0, len(configs), step):
            chunk = configs[c0:c0 + step]
            b = len(chunk)
            masks: dict[int, torch.Tensor] = {}
            for r, (layer, k) in enumerate(chunk):
                if layer is None:
                    continue
                m = masks.setdefault(layer, torch.ones(b, n, dtype=torch.bool, device=lm.device))
                m[r] = False
                m[r, item.rankings[layer][:k]] = True

            def run_rows():
                cache = copy.deepcopy(prefill.past_key_values)
                cache.batch_repeat_interleave(b)
                return lm.model(input_ids=cont.expand(b, -1), past_key_values=cache, use_cache=True)

            out = _with_session(lm, _RowMaskSession(masks, b), run_rows)
            lp = out.logits.float().log_softmax(-1).cpu()
            if c0 == 0:
                reference = lp[0]
            row_kl, row_agree = _kl_and_agreement(reference, lp)
            for r, (layer, k) in enumerate(chunk):
                if layer is not None:
                    g = ks.index(k)
                    kl[pos[layer], g] += float(row_kl[r]) / len(items)
                    agree[pos[layer], g] += float(row_agree[r]) / len(items)
            bar.update(b)
    bar.close()
    return kl, agree


def measure_joint(lm, items: list[CalibrationItem], layer_k: dict[int, int], alpha: float, score: str) -> Quality:
    """Quality of one allocation with all its layers sparse at once, through the runtime's own path."""
    if not layer_k:
        return Quality(0.0, 1.0)
    kls, agrees = [], []
    nominal_beta = sum(layer_k.values()) / (len(layer_k) * lm.adapter.n_neurons)
    for item in items:
        out = lm.score_ids(item.ids, item.cont, "stability", alpha, nominal_beta, list(layer_k), score=score,
                           keep_logprobs=True, layer_k=layer_k)
        kl, agree = _kl_and_agreement(item.dense_logprobs, out.logprobs[1:])
        kls.append(float(kl))
        agrees.append(float(agree))
    return Quality(float(np.mean(kls)), float(np.mean(agrees)))


# ---------------------------------------------------------------------------------------------------
# allocation over the measured curves


@dataclass
class PathStep:
    kept: list[float]  # per covered layer: a grid fraction, or 1.0 (dense)
    predicted_kl: float  # sum of the layers' (monotone) measured KL
    bytes_fraction: float  # FFN bytes per decoded token over dense, model-wide

    def layer_k(self, layers, n_neurons: int, n_layers: int) -> dict[int, int]:
        """{layer: k} of the sparse layers (the dense ones are left out: they run the full FFN)."""
        sizes = allocation_k(dict(zip(layers, self.kept)), n_neurons, n_layers)
        return {l: k for l, k in sizes.items() if k < n_neurons}


def monotone(curve: np.ndarray) -> np.ndarray:
    """Loss per grid point (increasing kept fractions) made non-increasing: a point's loss is at least that of
    every larger kept fraction (measurement noise must not make keeping fewer neurons look better)."""
    return np.maximum.accumulate(np.asarray(curve, np.float64)[..., ::-1], axis=-1)[..., ::-1]


def greedy_path(grid: list[float], loss: np.ndarray, n_neurons: int, n_layers: int) -> list[PathStep]:
    """States from all dense to every layer at ``grid[0]``; see the module docstring (step 2).

    ``loss`` (L, G): each covered layer's loss alone at each grid fraction (dense: 0). ``n_layers``: the model's
    layers (those not covered stay dense and count in the bytes).
    """
    loss = np.asarray(loss, np.float64)
    if loss.ndim != 2 or loss.shape[1] != len(grid):
        raise ValueError(f"loss must be (layers, {len(grid)} grid points), got shape {loss.shape}")
    n_cov = loss.shape[0]
    env = np.concatenate([monotone(np.clip(loss, 0.0, None)), np.zeros((n_cov, 1))], axis=1)  # column G: dense
    ks = [kept_count(g, n_neurons) for g in grid] + [n_neurons]
    fracs = list(grid) + [1.0]
    idx = [len(grid)] * n_cov

    def step() -> PathStep:
        total = sum(ks[i] for i in idx) + (n_layers - n_cov) * n_neurons
        return PathStep([fracs[i] for i in idx], float(sum(env[l, i] for l, i in enumerate(idx))),
                        total / (n_layers * n_neurons))

    path = [step()]
    while any(i > 0 for i in idx):
        best = None
        for l, c in enumerate(idx):
            for j in range(c):
                saved = ks[c] - ks[j]
                if saved <= 0:
                    continue
                key = ((env[l, j] - env[l, c]) / saved, -saved, l)
                if best is None or key < best[0]:
                    best = (key, l, j)
        if best is None:  # every remaining move saves nothing (grid fractions that round to the same k)
            break
        idx[best[1]] = best[2]
        path.append(step())
    return path


def choose(path: list[PathStep], target: dict[str, float], measure: Callable[[int], Quality]) -> tuple[int, dict]:
    """Index of the chosen state on ``path`` and the joint measurements made (index -> Quality).

    bytes: the first state at or under the target. agreement / kl: binary search for the sparsest state whose
    joint measurement meets the target. Raises ``BudgetError`` when no sparse state reaches the target.
    """
    (name, value), = target.items()
    measured: dict[int, Quality] = {}

    def q(i: int) -> Quality:
        if i not in measured:
            measured[i] = measure(i)
        return measured[i]

    if name == "bytes":
        fits = [i for i, s in enumerate(path) if s.bytes_fraction <= value + 1e-12]
        if not fits:
            raise BudgetError(f"budget.target.bytes={value:g} is out of reach: the sparsest allocation on the grid "
                              f"(every covered layer at kept {path[-1].kept[0]:g}) reads {path[-1].bytes_fraction:.3f} "
                              "of the dense FFN bytes; raise the target or add smaller fractions to budget.grid")
        q(fits[0])
        return fits[0], measured
    if len(path) < 2:
        raise BudgetError("budget: the grid allows no sparse allocation; give budget.grid fractions below 1")
    lo, hi = 0, len(path) - 1  # path[0] (dense) meets any target
    if q(hi).meets(target):
        return hi, measured
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if q(mid).meets(target):
            lo = mid
        else:
            hi = mid
    if lo == 0:
        best = q(1)
        raise BudgetError(
            f"budget.target {name}={value:g} is out of reach on the calibration prompts: the least sparse allocation "
            f"(one layer at kept {min(path[1].kept):g}, {path[1].bytes_fraction:.3f} of the dense FFN bytes) reaches "
            f"agreement {best.agreement:.3f} / KL {best.kl:.4f}; relax the target")
    return lo, measured


# ---------------------------------------------------------------------------------------------------
# the stage


def calibration_prompts(texts: list[str], train: list[bool], n: int, min_prompts: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` train prompts (all of them when fewer), refusing fewer than ``min_prompts``."""
    rows = np.flatnonzero(np.asarray(train, dtype=bool))
    if rows.size < min_prompts:
        raise BudgetError(f"budget: the corpus has {rows.size} train prompt(s), fewer than budget.min_prompts="
                          f"{min_prompts} needed to measure layer sensitivity; use a larger corpus, or "
                          "budget.target: null for one beta on every layer")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(rows, size=min(n, rows.size), replace=False))
    return [texts[i] for i in pick]


def budget(cfg: PipelineConfig, load: Callable[[PipelineConfig], object] = load_lm, progress: bool = True) -> list[Path]:
    b, p = cfg.budget, cfg.profile
    metrics_path = cfg.metrics_dir / "budget.json"
    if b.target is None:
        record = {"target": None, "allocation": None}
        return [write_json(cfg.budget_path, record), write_json(metrics_path, record)]
    target = {str(k): float(v) for k, v in b.target.items()}
    table = read_corpus(cfg.corpus_path)
    texts = table.column("text").to_pylist()
    train = [s == "train" for s in table.column("split").to_pylist()]
    prompts = calibration_prompts(texts, train, b.prompts, b.min_prompts, cfg.seed)
    lm = load(cfg)
    torch.manual_seed(cfg.seed)
    n_layers, n_neurons = lm.adapter.n_layers, lm.adapter.n_neurons
    end = n_layers if p.layer_end is None else p.layer_end
    if end > n_layers or p.layer_start >= end:
        raise BudgetError(f"profile.layer_start/layer_end = {p.layer_start}/{p.layer_end} do not fit the model's "
                          f"{n_layers} layers")
    layers = list(range(p.layer_start, end))
    items = calibration_items(lm, prompts, layers, p.alpha, p.score, b.continuation, cfg.model.max_tokens)
    kl, agree = measure_sensitivity(lm, items, layers, list(b.grid), progress=progress)
    path = greedy_path(list(b.grid), kl, n_neurons, n_layers)

    def joint(i: int) -> Quality:
        return measure_joint(lm, items, path[i].layer_k(layers, n_neurons, n_layers), p.alpha, p.score)

    chosen, measured = choose(path, target, joint)
    step = path[chosen]
    quality = measured[chosen]
    layer_k = allocation_k(dict(zip(layers, step.kept)), n_neurons, n_layers)
    record = {
        "target": target,
        "layers": layers, "n_layers": n_layers, "n_neurons": n_neurons,
        "alpha": p.alpha, "score": p.score, "grid": list(b.grid),
        "calibration": {"prompts": len(items), "continuation": b.continuation,
                        "scored_tokens": sum(len(it.cont) - 1 for it in items),
                        "corpus_hash": (table.schema.metadata or {}).get(b"coreinfer.corpus_hash", b"").decode()},
        "sensitivity": {"kl": np.round(kl, 6).tolist(), "agreement": np.round(agree, 6).tolist()},
        "path": [{"kept": s.kept, "predicted_kl": round(s.predicted_kl, 6), "bytes_fraction": round(s.bytes_fraction, 6)}
                 for s in path],
        "joint": {str(i): {"kl": round(m.kl, 6), "agreement": round(m.agreement, 6)} for i, m in sorted(measured.items())},
        "allocation": {"step": chosen, "kept": step.kept, "layer_k": [layer_k[l] for l in layers],
                       "bytes_fraction": round(step.bytes_fraction, 6),
                       "dense_layers": [l for l in layers if layer_k[l] == n_neurons],
                       "joint": {"kl": round(quality.kl, 6), "agreement": round(quality.agreement, 6)}},
    }
    metrics = {"target": target, "bytes_fraction": record["allocation"]["bytes_fraction"],
               "joint_agreement": record["allocation"]["joint"]["agreement"],
               "joint_kl": record["allocation"]["joint"]["kl"],
               "dense_layers": len(record["allocation"]["dense_layers"]), "joint_measurements": len(measured)}
    out = [write_json(cfg.budget_path, record), write_json(metrics_path, metrics)]
    print(f"budget: {target} -> {step.bytes_fraction:.3f} of the dense FFN bytes per token, joint agreement "
          f"{quality.agreement:.3f}, KL {quality.kl:.4f} on {len(items)} calibration prompts; "
          f"{len(record['allocation']['dense_layers'])} of {len(layers)} covered layers dense")
    return out


def read_allocation(path: str | Path, n_neurons: int, n_layers: int) -> dict[int, int] | None:
    """{layer: k} over the covered layers of a budget.json (None when it holds no allocation), validated."""
    import json

    rec = json.loads(Path(path).read_text(encoding="utf-8"))
    alloc = rec.get("allocation")
    if alloc is None:
        return None
    if rec.get("n_neurons") != n_neurons or rec.get("n_layers") != n_layers:
        raise BudgetError(f"{path} was computed for a model with {rec.get('n_layers')} layers of {rec.get('n_neurons')} "
                          f"neurons, not {n_layers} of {n_neurons}: rerun the budget stage (dvc repro budget)")
    return allocation_k(dict(zip(rec["layers"], alloc["kept"])), n_neurons, n_layers)


def path_allocation(path: str | Path, bytes_fraction: float, n_neurons: int, n_layers: int) -> dict[int, int]:
    """The sparse layers' {layer: k} of the first state of a budget.json's greedy path at or under ``bytes_fraction``
    of the dense FFN bytes (the evaluation's per-layer budgets at equal bytes)."""
    import json

    rec = json.loads(Path(path).read_text(encoding="utf-8"))
    if not rec.get("path"):
        raise BudgetError(f"{path} holds no greedy path (budget.target was null); rerun the budget stage with a target")
    if rec.get("n_neurons") != n_neurons or rec.get("n_layers") != n_layers:
        raise BudgetError(f"{path} was computed for a model with {rec.get('n_layers')} layers of {rec.get('n_neurons')} "
                          f"neurons, not {n_layers} of {n_neurons}")
    for s in rec["path"]:
        if s["bytes_fraction"] <= bytes_fraction + 1e-12:
            sizes = allocation_k(dict(zip(rec["layers"], s["kept"])), n_neurons, n_layers)
            return {l: k for l, k in sizes.items() if k < n_neurons}
    raise BudgetError(f"{path}: no allocation on its path reads <= {bytes_fraction:g} of the dense FFN bytes (the "
                      f"sparsest reads {rec['path'][-1]['bytes_fraction']:.3f})")

