"""The DVC `evaluate` stage: configuration from params.yaml + conf/eval, and the plot CSVs."""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from coreinfer.pipeline.evaluate import stage

REPO = Path(__file__).resolve().parents[2]


def test_stage_config_takes_model_and_artifact_from_params(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["model"].update(spec="some-model", slug="some-slug", dtype="float32", device="cpu")
    params["artifacts_dir"] = str(tmp_path / "arts")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cfg = stage.stage_config(stage.StageArgs(str(tmp_path / "params.yaml"), str(REPO / "conf/eval/default.yaml")))
    assert cfg.model == "some-model"
    assert cfg.artifact == str(tmp_path / "arts" / "some-slug" / "coreneurons.zarr")
    assert cfg.out == str(tmp_path / "arts" / "some-slug" / "eval")
    assert "similarity" in cfg.methods and cfg.kept


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
