"""`coreinfer init`: a calibration project from the installed package (the smoke run in it: test_dvc.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coreinfer.pipeline.init import InitError, init_project, project_dvc_yaml, template

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def git_identity(monkeypatch):
    for k, v in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@e"), ("GIT_COMMITTER_NAME", "t"),
                 ("GIT_COMMITTER_EMAIL", "t@e")):
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


def test_template_is_the_repositorys_own_pipeline():
    assert (template() / "dvc.yaml").read_text() == (REPO / "dvc.yaml").read_text()
    assert (template() / "conf" / "config.yaml").read_text() == (REPO / "conf" / "config.yaml").read_text()


def test_project_dvc_yaml_drops_source_dependencies():
    text = """
stages:
  prepare:
    cmd: python -m coreinfer.pipeline prepare
    deps: [artifacts/work/config/prepare.yaml, pipeline/prepare.py, pipeline/io.py, pipeline/corpora]
  profile:
    cmd: python -m coreinfer.pipeline profile
    deps: [runtime/selection.py, artifacts/work/corpus.parquet]
"""
    stages = yaml.safe_load(project_dvc_yaml(text))["stages"]
    assert stages["prepare"]["deps"] == ["artifacts/work/config/prepare.yaml", "corpora"]
    assert stages["profile"]["deps"] == ["artifacts/work/corpus.parquet"]
    assert stages["profile"]["cmd"] == "python -m coreinfer.pipeline profile"


def test_init_makes_a_committed_project_for_your_model_and_corpus(tmp_path, git_identity):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is the capital of Peru?"}\n')
    proj = tmp_path / "calib"
    init_project(proj, model="/models/My-Model-7B", corpus=str(prompts), text_field="prompt")
    params = yaml.safe_load((proj / "params.yaml").read_text())
    assert params["model"] == {"name": "custom", "slug": "My-Model-7B", "spec": "/models/My-Model-7B", "dtype": "auto",
                               "device": "auto", "batch_size": 8, "max_tokens": 256}
    assert params["corpus"]["sources"] == [{"name": "custom", "path": str(prompts), "text_field": "prompt",
                                            "task": "custom"}]
    smoke = yaml.safe_load((proj / "conf" / "corpus" / "smoke.yaml").read_text())
    assert smoke["corpus"]["sources"][0]["path"] == "corpora/smoke.jsonl" and (proj / "corpora" / "smoke.jsonl").is_file()
    assert "hydra" in (proj / ".dvc" / "config").read_text()
    git = lambda *a: subprocess.run(["git", *a], cwd=proj, capture_output=True, text=True).stdout  # noqa: E731
    assert git("status", "--porcelain") == "" and "params.yaml" in git("ls-files")
    r = subprocess.run([sys.executable, "-m", "coreinfer.pipeline", "validate"], cwd=proj, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # the composed config is valid as written


def test_init_refuses_a_folder_with_files(tmp_path, git_identity):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(InitError, match="not an empty folder"):
        init_project(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_the_repository_has_one_pipeline():
    """The packaged template links to dvc.yaml; .dvcignore keeps DVC from reading it as a second pipeline."""
    r = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--all"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stages = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    assert stages[0] == "validate" and "evaluate" in stages and not any("/" in st for st in stages)
