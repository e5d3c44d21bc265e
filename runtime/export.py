"""A prompt's sparse model as a plain transformers model, and the folder it is saved to.

``build_sparse_model`` gives the model's own class whose sparse layers hold their compact FFN as the
family's own MLP module with ``intermediate_size`` k (OPT: ``fc1``/``fc2`` with k neurons), so transformers'
``generate``, ``pipeline`` and ``save_pretrained`` work on it as on any model. Its logits are SparseLM's
with the same core sets known before the prefill (``sparse_prefill``): every token, the prompt's included,
runs the compact FFN.

A transformers config holds one ``intermediate_size`` for all layers, so the per-layer sizes are saved in
``config.json`` under ``coreinfer_intermediate_sizes`` ({layer: k}), and plain ``from_pretrained`` refuses
the folder (a size mismatch). ``load_sparse_model(folder)`` reads it with transformers alone: the model
loads with ``ignore_mismatched_sizes=True`` (the sparse layers' MLPs come out full-size and random), then
each sparse layer's MLP is rebuilt at its size from the saved tensors. ``SparseLM.from_pretrained`` uses it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .adapters import _decoder_layers, _family, _text_config

SIZES_KEY = "coreinfer_intermediate_sizes"


def _check_family(config) -> str:
    """The family name of a model whose compact FFN transformers can hold, or a clear error."""
    fam = _family(_text_config(config))
    act = getattr(_text_config(config), "hidden_act", None)
    if str(act).lower() in ("drelu", "d_relu", "dual_relu"):
        raise ValueError("a dReLU model has no transformers MLP class to hold its compact FFN; use SparseLM to run it sparse")
    return fam.name


def _compact_module(layer, fam: str, config, k: int) -> None:
    """Replace ``layer``'s FFN by an empty (meta) one of the family's own classes with k neurons."""
    with torch.device("meta"):
        if fam == "opt":
            layer.fc1 = nn.Linear(layer.fc1.in_features, k, bias=layer.fc1.bias is not None)
            layer.fc2 = nn.Linear(k, layer.fc2.out_features, bias=layer.fc2.bias is not None)
        else:
            sub = copy.copy(_text_config(config))
            sub.intermediate_size = k
            layer.mlp = type(layer.mlp)(sub)


def _compact_tensors(prefix: str, fam: str, state: dict, core: torch.Tensor) -> dict:
    """The state-dict entries of one layer's FFN gathered to ``core`` (rows of fc1/gate/up, columns of down)."""
    def rows(name):
        return state[name].index_select(0, core.to(state[name].device)).contiguous()

    def cols(name):
        return state[name].index_select(1, core.to(state[name].device)).contiguous()

    if fam == "opt":
        out = {f"{prefix}fc1.weight": rows(f"{prefix}fc1.weight"), f"{prefix}fc2.weight": cols(f"{prefix}fc2.weight")}
        if f"{prefix}fc1.bias" in state:
            out[f"{prefix}fc1.bias"] = rows(f"{prefix}fc1.bias")
        if f"{prefix}fc2.bias" in state:
            out[f"{prefix}fc2.bias"] = state[f"{prefix}fc2.bias"]
        return out
    mlp = f"{prefix}mlp."
    out = {f"{mlp}down_proj.weight": cols(f"{mlp}down_proj.weight")}
    if f"{mlp}gate_up_proj.weight" in state:  # fused (Phi-3): gate rows, then up rows
        gate, up = state[f"{mlp}gate_up_proj.weight"].chunk(2, dim=0)
        idx = core.to(gate.device)
        out[f"{mlp}gate_up_proj.weight"] = torch.cat([gate.index_select(0, idx), up.index_select(0, idx)]).contiguous()
    else:
        out[f"{mlp}gate_proj.weight"] = rows(f"{mlp}gate_proj.weight")
        out[f"{mlp}up_proj.weight"] = rows(f"{mlp}up_proj.weight")
    return out


def _layer_prefixes(model) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] + "." for layer in _decoder_layers(model, _model_family(model))]


def _model_family(model):
    return _family(_text_config(model.config))


def build_sparse_model(model, core_sets: dict[int, torch.Tensor]):
    """``model``'s class with the FFN of each layer in ``core_sets`` cut to its core neurons.

    Every other weight is shared with ``model`` (no copy: an in-place edit of one reaches the other).
    """
    fam = _check_family(model.config)
    n_layers = len(_decoder_layers(model, _model_family(model)))
    bad = [i for i in core_sets if not (isinstance(i, int) and 0 <= i < n_layers)]
    if bad:
        raise ValueError(f"core sets for layers {bad} but the model has layers 0..{n_layers - 1}")
    config = copy.deepcopy(model.config)
    sizes = {int(i): int(len(c)) for i, c in sorted(core_sets.items())}
    setattr(config, SIZES_KEY, {str(i): k for i, k in sizes.items()})
    with torch.device("meta"):
        new = type(model)(config)
    state = model.state_dict()
    prefixes = _layer_prefixes(model)
    new_layers = _decoder_layers(new, _model_family(new))
    for i, core in sorted(core_sets.items()):
        core = torch.as_tensor(core, dtype=torch.long)
        n = state[f"{prefixes[i]}mlp.down_proj.weight" if fam != "opt" else f"{prefixes[i]}fc2.weight"].shape[1]
        if core.dim() != 1 or len(core) == 0 or int(core.min()) < 0 or int(core.max()) >= n or len(core.unique()) != len(core):
            raise ValueError(f"layer {i}'s core set must be distinct neuron indices in 0..{n - 1}")
        _compact_module(new_layers[i], fam, config, len(core))
        state.update(_compact_tensors(prefixes[i], fam, state, core.sort().values))
    new.load_state_dict(state, assign=True, strict=True)
    for name, buf in model.named_buffers():  # non-persistent buffers (rotary frequencies) are not in the state dict
        owner, _, leaf = name.rpartition(".")
        new.get_submodule(owner).register_buffer(leaf, buf.clone(), persistent=leaf not in
                                                 model.get_submodule(owner)._non_persistent_buffers_set)
    new.tie_weights()
    new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def save_folder(model, tokenizer, folder) -> Path:
    """``save_pretrained`` of ``model`` and ``tokenizer`` into ``folder``, which must not exist or be empty.

    Written to a temporary folder beside it and renamed, so a failed export leaves nothing behind.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"{folder} exists and is not an empty folder; export to a new folder (nothing was written)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            folder.rmdir()  # empty, checked above
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def intermediate_sizes(folder) -> dict[int, int] | None:
    """The per-layer FFN sizes a folder's config.json records, or None for a plain model folder."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    sizes = json.loads(path.read_text()).get(SIZES_KEY)
    return None if sizes is None else {int(i): int(k) for i, k in sizes.items()}


def load_sparse_model(folder, **from_pretrained_kwargs):
    """Load an exported sparse model with transformers (``from_pretrained`` keywords pass through, e.g. dtype)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    sizes = intermediate_sizes(folder)
    if sizes is None:
        raise ValueError(f"{folder} has no {SIZES_KEY} in its config.json: a plain model folder, load it with from_pretrained")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the mismatch report lists exactly the layers rebuilt below
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=True, **from_pretrained_kwargs)
    finally:
        hf_logging.set_verbosity(level)
    fam = _check_family(model.config)
    prefixes = _layer_prefixes(model)
    layers = _decoder_layers(model, _model_family(model))
    files = sorted(Path(folder).glob("*.safetensors"))
    param = next(model.parameters())
    for i, k in sizes.items():
        _compact_module(layers[i], fam, model.config, k)
        modules = {"fc1": layers[i].fc1, "fc2": layers[i].fc2} if fam == "opt" else {"mlp": layers[i].mlp}
        state = {name: {} for name in modules}
        for f in files:
            with safe_open(str(f), framework="pt", device=str(param.device)) as handle:
                for key in handle.keys():
                    name, _, leaf = key[len(prefixes[i]):].partition(".")
                    if key.startswith(prefixes[i]) and name in modules:
                        state[name][leaf] = handle.get_tensor(key).to(param.dtype)
        for name, module in modules.items():
            missing = {n for n, _ in module.named_parameters()} - set(state[name])
            if missing:
                raise ValueError(f"{folder} lacks layer {i}'s {name} {sorted(missing)}: not a complete coreinfer export")
            module.load_state_dict(state[name], assign=True, strict=True)
    return model.eval()
