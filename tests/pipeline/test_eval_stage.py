"""The DVC `evaluate` stage: its settings from params.yaml (the eval section), the headline metric, the plot CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from coreinfer.pipeline.config import ConfigError, check_eval, load_config
from coreinfer.pipeline.evaluate import stage

REPO = Path(__file__).resolve().parents[2]


def test_eval_settings_come_from_params_with_model_and_artifact(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(spec="some-model", slug="some-slug", dtype="float32", device="cpu")
    params["artifacts_dir"] = str(tmp_path / "arts")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = check_eval(load_config(tmp_path / "params.yaml"))
    assert cfg.model == "some-model"
    assert cfg.artifact == str(tmp_path / "arts" / "some-slug" / "coreneurons.zarr")
    assert cfg.out == str(tmp_path / "arts" / "some-slug" / "eval")
    assert cfg.methods == params["eval"]["methods"] and cfg.kept == params["eval"]["kept"]
    params["eval"]["kept"] = [0.4, 1.5]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"eval: kept fraction .*1.5"):
        check_eval(load_config(tmp_path / "params.yaml"))


def test_headline_is_agreement_at_the_artifacts_kept_fraction():
    rows = [
        {"method": "dense", "kept": 1.0, "score": "-", "top1_agreement": 1.0},
        {"method": "stability", "kept": 0.2, "score": "magnitude", "top1_agreement": 0.3},
        {"method": "stability", "kept": 0.4, "score": "magnitude", "top1_agreement": 0.61234},
        {"method": "stability", "kept": 0.4, "score": "positive", "top1_agreement": 0.5},
        {"method": "similarity", "kept": 0.4, "score": "magnitude", "top1_agreement": 0.55},
        {"method": "random", "kept": 0.4, "score": "-", "top1_agreement": 0.1},
    ]
    summary = {"tasks": {"agreement": {"n_items": 4, "rows": rows}}}
    assert stage.headline(summary, "magnitude") == {
        "kept": 0.4, "score": "magnitude", "items": 4,
        "top1_agreement": {"stability": 0.6123, "similarity": 0.55, "random": 0.1}}


def test_wide_csvs_one_column_per_method(tmp_path):
    summary = {"tasks": {"wikitext": {"metrics": ["ppl"], "rows": [
        {"method": "dense", "kept": 1.0, "score": "-", "ppl": 20.0},
        {"method": "stability", "kept": 0.2, "score": "positive", "ppl": 90.0},
        {"method": "stability", "kept": 0.4, "score": "positive", "ppl": 40.0},
        {"method": "griffin", "kept": 0.4, "score": "-", "ppl": 30.0},
    ]}}}
    (path,) = stage.write_wide_csvs(summary, tmp_path, ["positive"])
    rows = list(csv.reader(open(path)))
    assert rows[0] == ["kept", "dense", "stability", "griffin"]
    assert rows[1] == ["0.2", "20.0", "90.0", ""]
    assert rows[2] == ["0.4", "20.0", "40.0", "30.0"]
    assert stage.series_name("stability", "magnitude", ["positive", "magnitude"]) == "stability-magnitude"
