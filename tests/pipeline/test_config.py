"""Typed config: bad values fail before any model is loaded, and the error names the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from coreinfer.pipeline import cli
from coreinfer.pipeline.config import ConfigError, PipelineConfig, from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def _params(**over):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in over.items():
        node = data
        *head, last = dotted.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    return data


def test_committed_params_are_valid():
    cfg = load_config(REPO / "params.yaml")
    assert isinstance(cfg, PipelineConfig)
    assert cfg.model.slug == "smollm2-135m" and cfg.corpus.name == "default"
    assert str(cfg.artifact_path) == "artifacts/smollm2-135m/coreneurons.zarr"


@pytest.mark.parametrize("key,value,message", [
    ("coreset.beta", 1.5, "coreset.beta: must be in (0, 1]"),
    ("coreset.gamma", 0.0, "coreset.gamma: must be in (0, 1]"),
    ("profile.alpha", -0.1, "profile.alpha"),
    ("profile.score", "squared", "profile.score: must be one of"),
    ("cluster.reduce", "tsne", "cluster.reduce: must be umap, pca or none"),
    ("cluster.min_cluster_size", 1, "cluster.min_cluster_size"),
    ("model.dtype", "int3", "model.dtype"),
    ("model.slug", "../escape", "model.slug"),
    ("corpus.heldout_fraction", 1.0, "corpus.heldout_fraction"),
    ("profile.layer_end", 0, "profile.layer_end"),
])
def test_range_errors_name_the_key(key, value, message):
    with pytest.raises(ConfigError) as e:
        from_dict(_params(**{key: value}))
    assert message in str(e.value)


@pytest.mark.parametrize("key,value", [("coreset.beta", "lots"), ("model.batch_size", "eight"), ("profile.chunk_prompts", 1.5)])
def test_type_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict(_params(**{key: value}))


def test_unknown_key_named():
    data = _params()
    data["coreset"]["betta"] = 0.3
    with pytest.raises(ConfigError, match="betta"):
        from_dict(data)


def test_missing_value_named():
    data = _params()
    del data["model"]["spec"]
    with pytest.raises(ConfigError, match="model.spec"):
        from_dict(data)


def test_several_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        from_dict(_params(**{"coreset.beta": 2.0, "cluster.n_neighbors": 1}))
    assert "coreset.beta" in str(e.value) and "cluster.n_neighbors" in str(e.value)


def test_cli_fails_before_loading_a_model(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_params(**{"coreset.beta": 3})))

    def no_model(*a, **k):
        raise AssertionError("a model was loaded despite a bad config")

    monkeypatch.setattr("coreinfer.pipeline.profile.load_lm", no_model)
    assert cli.main(["profile", "--params", str(bad)]) == 2
    assert "coreset.beta" in capsys.readouterr().err


def test_cli_overrides(tmp_path):
    cfg = load_config(REPO / "params.yaml", ["coreset.beta=0.3", "cluster.reduce=pca"])
    assert cfg.coreset.beta == 0.3 and cfg.cluster.reduce == "pca"


def test_hydra_composition_matches_committed_params(tmp_path):
    """conf/ composed by DVC's Hydra integration gives exactly the committed params.yaml."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(REPO / "conf"), None, "config", "", [])
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())
    compose_and_dump(out, str(REPO / "conf"), None, "config", "", ["model=gemma3-270m", "coreset.beta=0.3", "corpus=smoke"])
    cfg = load_config(out)
    assert (cfg.model.slug, cfg.coreset.beta, cfg.corpus.name) == ("gemma3-270m", 0.3, "smoke")


@pytest.mark.parametrize("group", ["model", "corpus", "cluster"])
def test_every_group_option_is_valid(tmp_path, group):
    from dvc.utils.hydra import compose_and_dump

    for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
        out = tmp_path / f"{group}-{option}.yaml"
        compose_and_dump(out, str(REPO / "conf"), None, "config", "", [f"{group}={option}"])
        load_config(out)  # raises ConfigError on any bad value
