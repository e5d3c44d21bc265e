"""Per-call sessions: what each layer's FFN does during one ``generate``/``score`` call.

A session is created per call and made active through the SparseLM's ContextVar, so concurrent calls
on one loaded model (threads) never see each other's core sets. Nothing here is module-level state.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .ffn import FFNWeights
from .selection import stability_select


class Session:
    """Dense FFN everywhere."""

    def ffn(self, layer_idx: int, x: torch.Tensor, dense: FFNWeights) -> torch.Tensor:
        return dense(x)


class CaptureSession(Session):
    """Dense FFN that hands each layer's intermediate activations to ``hook(layer_idx, acts)``.

    ``acts`` is shaped (B, T, I) whatever the architecture's internal layout.
    """

    def __init__(self, hook: Callable[[int, torch.Tensor], None], batch_shape: tuple[int, int]):
        self.hook = hook
        self.batch_shape = batch_shape

    def ffn(self, layer_idx, x, dense):
        a = dense.intermediate(x)
        self.hook(layer_idx, a.reshape(*self.batch_shape, a.shape[-1]))
        return dense.output(a)


class CoreSetSession(Session):
    """Prompt-driven core sets: the prefill runs dense (optionally selecting core sets from its own
    activations), then ``freeze`` gathers compact FFNs once and every later token runs them.
    """

    def __init__(self, layers, select: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                 core_sets: dict[int, torch.Tensor] | None = None, sparse_prefill: bool = False):
        self.layers = layers  # the sparse layers (a range, or any sorted collection of layer indices)
        self.select = select  # (layer, acts (T, I)) -> core set; None when core sets are given up front
        self.core_sets: dict[int, torch.Tensor] = dict(core_sets or {})
        self.compact: dict[int, FFNWeights] = {}
        self.select_s = 0.0
        self.gather_s = 0.0
        if sparse_prefill and not self.core_sets:
            raise ValueError("sparse_prefill needs core sets known before the prefill (method='similarity')")
        self.sparse_prefill = sparse_prefill

    def ffn(self, layer_idx, x, dense):
        compact = self.compact.get(layer_idx)
        if compact is not None:
            return compact(x)
        if layer_idx not in self.layers:
            return dense(x)
        if self.sparse_prefill:
            self._gather(layer_idx, dense)
            return self.compact[layer_idx](x)
        a = dense.intermediate(x)
        if self.select is not None:
            t0 = time.perf_counter()
            self.core_sets[layer_idx] = self.select(layer_idx, a.reshape(-1, a.shape[-1]))
            self.select_s += time.perf_counter() - t0
        return dense.output(a)

    def _gather(self, layer_idx: int, dense: FFNWeights) -> None:
        t0 = time.perf_counter()
        self.compact[layer_idx] = dense.gather(self.core_sets[layer_idx])
        self.gather_s += time.perf_counter() - t0

    def freeze(self, dense: list[FFNWeights]) -> None:
        """Gather the compact FFN of every sparse layer: from now on each token costs k neurons."""
        missing = [i for i in self.layers if i not in self.core_sets]
        if missing:
            raise RuntimeError(f"no core set was selected for layers {missing}; the prefill did not reach them")
        for i in self.layers:
            if i not in self.compact:
                self._gather(i, dense[i])


    def core_sizes(self) -> dict[int, int]:
        """{layer: k} of the core sets chosen so far (after ``freeze``: every sparse layer)."""
        return {i: int(c.numel()) for i, c in sorted(self.core_sets.items())}


def stability_selector(alpha: float, beta: float, score: str,
                       layer_k: dict[int, int] | None = None) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Stability-guided selection per layer: ``layer_k[layer]`` neurons where given, else round(beta * I)."""
    sizes = dict(layer_k or {})
    return lambda layer, acts: stability_select(acts, alpha=alpha, beta=beta, score=score, k=sizes.get(layer))


class TokenMaskSession(Session):
    """Per-token neuron masks (oracle / predictor baselines for evaluation): not a speed path.

    ``mask_fn(layer_idx, x, acts) -> bool mask`` with the shape of ``acts``; masked neurons contribute 0.
    """

    def __init__(self, layers: range, mask_fn: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.layers = layers
        self.mask_fn = mask_fn
        self.prefill_done = False

    def ffn(self, layer_idx, x, dense):
        if layer_idx not in self.layers or not self.prefill_done:
            return dense(x)
        a = dense.intermediate(x)
        return dense.output(a * self.mask_fn(layer_idx, x, a).to(a.dtype))
