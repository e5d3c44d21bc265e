"""The eager reference the fast path is checked against: the Hugging Face model itself, with the runtime's
FFN adapter and per-call ``CoreSetSession`` (dense prefill, core sets from ``stability_select``, compact FFN
gathered once by ``FFNWeights.gather``, Hugging Face attention and cache for every token).
"""

from __future__ import annotations

import inspect

from contextvars import ContextVar

import torch

from .. import adapters
from ..selection import DEFAULT_SCORE
from ..session import CoreSetSession, stability_selector


class EagerReference:
    """Installs the FFN adapter on ``model`` once (it changes the model's FFN modules, not its function)."""

    def __init__(self, model):
        self.model = model
        self.active: ContextVar = ContextVar(f"coreinfer_cuda_reference_{id(self)}", default=None)
        self.adapter = adapters.install(model, self.active)

    def forced_logits(self, input_ids, continuation, *, kept_fraction: float | None = None, alpha: float = 0.4,
                      score: str = DEFAULT_SCORE, sparse_layers: range | None = None,
                      core_sets: dict[int, torch.Tensor] | None = None):
        """Logits (float32, (1+n, V)) of the prompt's last position and after each continuation token, and the
        core sets used (selected here from the prompt's activations unless ``core_sets`` is given)."""
        dev = self.model.get_input_embeddings().weight.device
        ids = torch.as_tensor(input_ids, device=dev).view(1, -1)
        cont = torch.as_tensor(continuation, device=dev).view(1, -1)
        layers = range(self.adapter.n_layers) if sparse_layers is None else sparse_layers
        if kept_fraction is None:
            session = CoreSetSession(range(0))
        elif core_sets is None:
            session = CoreSetSession(layers, stability_selector(alpha, kept_fraction, score))
        else:
            session = CoreSetSession(layers, None, core_sets={i: c.to(dev) for i, c in core_sets.items()})
        token = self.active.set(session)
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids, use_cache=True)
                session.freeze(self.adapter.dense)
                rows = [out.logits[0, -1:].float()]
                if cont.shape[1]:
                    name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
                    rest = self.model(input_ids=cont, use_cache=True, **{name: getattr(out, name)})
                    rows.append(rest.logits[0].float())
        finally:
            self.active.reset(token)
        return torch.cat(rows), dict(session.core_sets)
