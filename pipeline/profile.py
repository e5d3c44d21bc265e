"""Stage 2, profile: the model over the corpus; per prompt and per layer its sentence-wise core set.

The model runs in right-padded batches through ``SparseLM.capture`` (dense forward, one hook call per layer
with the (B, T, I) FFN activations). Each prompt's real tokens ``acts[b, :len_b]`` go through the runtime's
``stability_select``; padding never enters a statistic. Results stream into a zarr store chunk by chunk
(``profile.chunk_prompts`` prompts at a time), so memory stays bounded whatever the corpus size.

``<artifacts>/<model>/profile.zarr``:
  core_sets (N, L, ceil(I/8)) u8   bit-packed sentence-wise core set of each prompt (corpus order)
  n_tokens  (N,) i32               tokens profiled per prompt (after truncation to model.max_tokens)
  active_count (L, I) i64          train-split tokens on which each neuron is active (> 0)
  stability_jaccard (S, P) f32     Jaccard(core set of the first p tokens, core set of the whole prompt),
                                   mean over layers; NaN where the prompt has <= p tokens
  stability_tokens (S,) i32, stability_index (S,) i64 (corpus row of each sampled prompt)
attrs: model fingerprint, alpha/beta/score, layer range, corpus hash, train token count, prefixes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from coreinfer.runtime.artifact import model_fingerprint, pack_bits, packed_width
from coreinfer.runtime.selection import jaccard, kept_count, stability_select

from .config import PipelineConfig
from .io import atomic_output, read_corpus


def stability_sample(n_train_rows: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Corpus rows whose prefix stability is measured: a seeded sample of the train split, sorted."""
    rng = np.random.default_rng(seed)
    if size >= len(n_train_rows):
        return np.sort(n_train_rows)
    return np.sort(rng.choice(n_train_rows, size=size, replace=False))


class _LayerHook:
    """Collects, per prompt of the current batch, its core set at every profiled layer."""

    def __init__(self, lengths: list[int], layers: range, alpha: float, beta: float, score: str,
                 train: list[bool], stab_rows: list[bool], prefixes: list[int], n_neurons: int):
        self.lengths, self.layers, self.alpha, self.beta, self.score = lengths, layers, alpha, beta, score
        self.train, self.stab_rows, self.prefixes = train, stab_rows, prefixes
        self.core = np.zeros((len(lengths), len(layers), packed_width(n_neurons)), dtype=np.uint8)
        self.active = np.zeros((len(layers), n_neurons), dtype=np.int64)
        # jaccard sums over layers per (prompt, prefix)
        self.jac = np.zeros((len(lengths), len(prefixes)), dtype=np.float64)

    def __call__(self, layer_idx: int, acts: torch.Tensor) -> None:
        if layer_idx not in self.layers:
            return
        pos = layer_idx - self.layers.start
        n = acts.shape[-1]
        for b, length in enumerate(self.lengths):
            a = acts[b, :length].float().cpu()  # real tokens only: padding is excluded here
            core = stability_select(a, self.alpha, self.beta, self.score)
            member = torch.zeros(n, dtype=torch.bool)
            member[core] = True
            self.core[b, pos] = pack_bits(member)
            if self.train[b]:
                self.active[pos] += (a > 0).sum(dim=0).numpy()
            if self.stab_rows[b]:
                for j, p in enumerate(self.prefixes):
                    if p < length:
                        self.jac[b, j] += jaccard(stability_select(a[:p], self.alpha, self.beta, self.score), core)


def profile_corpus(lm, texts: list[str], train: list[bool], cfg: PipelineConfig, out_path: Path,
                   stab_rows: set[int] | None = None, progress: bool = True,
                   extra_attrs: dict | None = None) -> Path:
    """Profile ``texts`` with a ``SparseLM``-like ``lm`` (``tokenizer``, ``adapter``, ``capture``) into ``out_path``."""
    import zarr
    from tqdm import tqdm

    p = cfg.profile
    n_layers, n_neurons = lm.adapter.n_layers, lm.adapter.n_neurons
    end = n_layers if p.layer_end is None else p.layer_end
    if end > n_layers or p.layer_start >= end:
        raise ValueError(
            f"profile.layer_start/layer_end = {p.layer_start}/{p.layer_end} do not fit the model's {n_layers} layers"
        )
    layers = range(p.layer_start, end)
    prefixes = sorted(set(int(x) for x in p.stability_prefixes))
    stab_rows = stab_rows or set()
    tok = lm.tokenizer
    if tok.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token (and no eos token to use as one); set tokenizer.pad_token")
    n = len(texts)
    w = packed_width(n_neurons)
    chunk = p.chunk_prompts
    stab_list = sorted(stab_rows)
    stab_pos = {r: i for i, r in enumerate(stab_list)}
    stab_jac = np.full((len(stab_list), len(prefixes)), np.nan, dtype=np.float32)
    stab_tok = np.zeros(len(stab_list), dtype=np.int32)
    active_total = np.zeros((len(layers), n_neurons), dtype=np.int64)
    train_tokens = 0

    with atomic_output(out_path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        z_core = root.create_array("core_sets", shape=(n, len(layers), w), dtype=np.uint8,
                                   chunks=(max(1, min(chunk, n)), len(layers), w), fill_value=0)
        z_ntok = root.create_array("n_tokens", shape=(n,), dtype=np.int32, chunks=(max(1, n),), fill_value=0)
        n_tokens_all = np.zeros(n, dtype=np.int32)
        bar = tqdm(total=n, desc="profile", unit="prompt", disable=not progress)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            enc = [tok(texts[i], truncation=True, max_length=cfg.model.max_tokens)["input_ids"] for i in range(c0, c1)]
            for i, ids in enumerate(enc):
                if len(ids) == 0:
                    raise ValueError(f"prompt {c0 + i} tokenises to no tokens: {texts[c0 + i]!r}")
            order = sorted(range(c1 - c0), key=lambda i: (len(enc[i]), i))  # length buckets: little padding
            core_chunk = np.zeros((c1 - c0, len(layers), w), dtype=np.uint8)
            for b0 in range(0, len(order), cfg.model.batch_size):
                members = order[b0:b0 + cfg.model.batch_size]
                lengths = [len(enc[i]) for i in members]
                t_max = max(lengths)
                input_ids = torch.full((len(members), t_max), tok.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(members), t_max), dtype=torch.long)
                for r, i in enumerate(members):  # right padding: real tokens keep positions 0..len-1
                    input_ids[r, :lengths[r]] = torch.tensor(enc[i])
                    mask[r, :lengths[r]] = 1
                hook = _LayerHook(lengths, layers, p.alpha, p.beta, p.score,
                                  [train[c0 + i] for i in members], [(c0 + i) in stab_pos for i in members],
                                  prefixes, n_neurons)
                lm.capture(input_ids, mask, hook)
                active_total += hook.active
                for r, i in enumerate(members):
                    core_chunk[i] = hook.core[r]
                    row = c0 + i
                    n_tokens_all[row] = lengths[r]
                    if train[row]:
                        train_tokens += lengths[r]
                    if row in stab_pos:
                        s = stab_pos[row]
                        stab_tok[s] = lengths[r]
                        for j, pre in enumerate(prefixes):
                            if pre < lengths[r]:
                                stab_jac[s, j] = hook.jac[r, j] / len(layers)
                bar.update(len(members))
            z_core[c0:c1] = core_chunk
        bar.close()
        z_ntok[...] = n_tokens_all
        for name, arr in (("active_count", active_total), ("stability_jaccard", stab_jac),
                          ("stability_tokens", stab_tok), ("stability_index", np.asarray(stab_list, dtype=np.int64))):
            z = root.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=tuple(max(1, s) for s in arr.shape),
                                  fill_value=0)
            if arr.size:
                z[...] = arr
        attrs = {
            "n_prompts": n, "n_layers": n_layers, "n_neurons": n_neurons, "layer_start": layers.start,
            "layer_end": layers.stop, "alpha": p.alpha, "beta": p.beta, "score": p.score,
            "k": kept_count(p.beta, n_neurons), "train_tokens": int(train_tokens), "prefixes": prefixes,
            "max_tokens": cfg.model.max_tokens,
        }
        attrs.update(extra_attrs or {})
        root.attrs.update(attrs)
    return out_path


def load_lm(cfg: PipelineConfig):
    """The runtime's SparseLM for ``cfg.model`` (imported lazily: config errors come before any model load)."""
    from coreinfer.runtime.sparse_lm import SparseLM

    device = None if cfg.model.device == "auto" else cfg.model.device
    dtype = None if cfg.model.dtype == "auto" else cfg.model.dtype
    return SparseLM.from_pretrained(cfg.model.spec, device=device, dtype=dtype)


def profile(cfg: PipelineConfig, load: Callable[[PipelineConfig], object] = load_lm) -> list[Path]:
    table = read_corpus(cfg.corpus_path)
    texts = table.column("text").to_pylist()
    train = [s == "train" for s in table.column("split").to_pylist()]
    meta = table.schema.metadata or {}
    train_rows = np.flatnonzero(np.asarray(train))
    sample = stability_sample(train_rows, cfg.profile.stability_sample, cfg.seed)
    lm = load(cfg)
    torch.manual_seed(cfg.seed)
    fp = model_fingerprint(lm.adapter, lm.model.config)
    extra = {
        "model": fp, "model_spec": cfg.model.spec, "model_name": cfg.model.name,
        "corpus_hash": meta.get(b"coreinfer.corpus_hash", b"").decode(), "dtype": cfg.model.dtype,
    }
    out = profile_corpus(lm, texts, train, cfg, cfg.profile_path, stab_rows=set(int(x) for x in sample), extra_attrs=extra)
    print(f"profile: {len(texts)} prompts x {lm.adapter.n_layers} layers of {lm.adapter.n_neurons} neurons "
          f"({lm.adapter.describe()}), k={kept_count(cfg.profile.beta, lm.adapter.n_neurons)}")
    return [out]


def min_stable_tokens(prefixes: list[int], jac: np.ndarray, threshold: float) -> tuple[int, list[float]]:
    """Smallest prefix length whose mean Jaccard (over prompts long enough) reaches ``threshold``.

    When no prefix does, one more than the longest prefix measured.
    """
    means = []
    for j in range(len(prefixes)):
        col = jac[:, j] if jac.size else np.zeros(0)
        col = col[~np.isnan(col)]
        means.append(float(col.mean()) if col.size else math.nan)
    for pre, m in zip(prefixes, means):
        if not math.isnan(m) and m >= threshold:
            return int(pre), means
    return int(max(prefixes)) + 1, means
