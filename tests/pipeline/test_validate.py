"""The validate stage (the resolved config and one slice per stage of dvc.yaml) and how stages report errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coreinfer.pipeline import cli
from coreinfer.pipeline.config import ConfigError, load_config
from coreinfer.pipeline.validate import stage_params, validate

REPO = Path(__file__).resolve().parents[2]

DVC_YAML = """
stages:
  validate:
    cmd: python -m coreinfer.pipeline validate
    params: [{params.yaml: null}]
  prepare:
    params: [corpus, seed]
  coreset:
    params: [coreset, profile.stability_threshold]
"""


def _project(tmp_path: Path, **overrides) -> tuple[Path, Path]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["work_dir"] = str(tmp_path / "work")
    for src in params["corpus"]["sources"]:
        src["path"] = str(REPO / src["path"])
    for key, value in overrides.items():
        section, name = key.split(".")
        params[section][name] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    return tmp_path / "params.yaml", tmp_path / "dvc.yaml"


def test_stage_params_read_from_dvc_yaml(tmp_path):
    _, dvc_yaml = _project(tmp_path)
    assert stage_params(dvc_yaml) == {"validate": [], "prepare": ["corpus", "seed"],
                                      "coreset": ["coreset", "profile.stability_threshold"]}


def test_slices_hold_each_stages_params_and_change_only_with_them(tmp_path):
    params, dvc_yaml = _project(tmp_path)
    written = validate(load_config(params), dvc_yaml)
    work = tmp_path / "work" / "config"
    assert sorted(p.name for p in written) == ["coreset.yaml", "prepare.yaml", "resolved.yaml"]
    coreset = yaml.safe_load((work / "coreset.yaml").read_text())
    assert coreset == {"coreset": {"beta": 0.4, "gamma": 0.5, "min_stable_tokens": None},
                       "profile.stability_threshold": 0.7}
    resolved = yaml.safe_load((work / "resolved.yaml").read_text())
    assert resolved["cluster"]["n_exemplars"] == 3 and resolved["eval"]["limit"] == 12  # defaults filled in
    prepare_before = (work / "prepare.yaml").read_bytes()
    params, _ = _project(tmp_path, **{"coreset.beta": 0.3})
    validate(load_config(params), dvc_yaml)
    assert yaml.safe_load((work / "coreset.yaml").read_text())["coreset"]["beta"] == 0.3
    assert (work / "prepare.yaml").read_bytes() == prepare_before  # prepare's slice untouched: it does not rerun


def test_validate_refuses_what_no_model_is_needed_to_check(tmp_path):
    params, dvc_yaml = _project(tmp_path)
    data = yaml.safe_load(params.read_text())
    data["corpus"]["sources"][0]["path"] = "missing.jsonl"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"corpus.sources\[0\].path: missing.jsonl not found"):
        validate(cfg, dvc_yaml)
    with pytest.raises(ConfigError, match="eval: unknown selection score 'loud'"):
        validate(load_config(params, ["eval.scores=[loud]"]), dvc_yaml)
    assert not (tmp_path / "work" / "config").exists()


def test_stage_error_is_one_line_with_the_fix(tmp_path, capsys):
    params, _ = _project(tmp_path)
    assert cli.main(["validate", "coreset.beta=2", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "coreset.beta: must be in (0, 1], got 2.0" in err and "dvc exp run -S" in err


def test_unexpected_error_traceback_only_with_verbose(tmp_path, capsys, monkeypatch):
    params, _ = _project(tmp_path)

    def broken(cfg):
        raise KeyError("centroids")

    monkeypatch.setattr("coreinfer.pipeline.cluster.cluster", broken)
    assert cli.main(["cluster", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KeyError: 'centroids'" in err and "--verbose" in err and "Traceback" not in err
    assert cli.main(["cluster", "--params", str(params), "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_lm_eval_help_without_the_extra_is_one_line():
    pytest.importorskip("coreinfer.pipeline.evaluate.lm_eval_adapter")
    from coreinfer.pipeline.evaluate import lm_eval_adapter

    if lm_eval_adapter.HAVE_LM_EVAL:
        pytest.skip("lm-eval is installed here; the message is for installs without it")
    r = subprocess.run([sys.executable, "-m", "coreinfer.runtime.cli", "lm-eval", "--help"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "coreinfer lm-eval: error: needs lm-evaluation-harness: pip install 'coreinfer[lm-eval]'\n"
