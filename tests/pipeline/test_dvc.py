"""DVC: the artifact round-trips through a remote byte-identical; repro is incremental; the smoke experiment
runs every stage."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coreinfer.runtime.artifact import read_artifact, write_artifact

from .synthetic import synthetic_artifact_inputs

REPO = Path(__file__).resolve().parents[2]
DVC = [sys.executable, "-m", "dvc"]


def sh(cmd, cwd, check=True, env=None):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout + r.stderr


def git_repo(path: Path) -> None:
    sh(["git", "init", "-q"], path)
    sh(["git", "config", "user.email", "t@example.com"], path)
    sh(["git", "config", "user.name", "test"], path)
    sh(["git", "config", "commit.gpgsign", "false"], path)


def digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def test_push_pull_round_trip_is_byte_identical(tmp_path):
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    git_repo(repo)
    sh(DVC + ["init", "-q"], repo)
    arrays, attrs, _ = synthetic_artifact_inputs(n_clusters=3, n_layers=4, n_neurons=100)
    art = write_artifact(repo / "artifacts" / "m" / "coreneurons.zarr", arrays, attrs)
    before = digest(art)
    sh(DVC + ["add", "-q", "artifacts/m/coreneurons.zarr"], repo)
    sh(DVC + ["remote", "add", "-d", "team", str(remote)], repo)
    sh(DVC + ["push", "-q"], repo)
    # a teammate's fresh clone: no workspace copy, no cache
    shutil.rmtree(art)
    shutil.rmtree(repo / ".dvc" / "cache")
    sh(DVC + ["pull", "-q"], repo)
    assert digest(art) == before
    assert read_artifact(art).n_clusters == 3


def _project_copy(dst: Path) -> Path:
    for rel in ("conf", "pipeline", "runtime", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore"):
        s = REPO / rel
        if s.is_dir():
            shutil.copytree(s, dst / rel, ignore=shutil.ignore_patterns("__pycache__"))
        elif s.exists():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, dst / rel)
    git_repo(dst)
    sh(DVC + ["init", "-q", "--force"], dst)
    shutil.copy2(REPO / ".dvc" / "config", dst / ".dvc" / "config")
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-q", "-m", "project"], dst)
    return dst


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_smoke_experiment_and_incremental_repro(tmp_path):
    """`dvc exp run -S corpus=smoke` runs every stage, nothing reruns unchanged, beta reruns coreset+report.
    (How long it takes is a measurement for docs/pipeline.md, not an assertion: a timed test fails on a busy
    or cold machine without anything being wrong.)"""
    proj = _project_copy(tmp_path / "proj")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = sh(DVC + ["exp", "run", "-S", "corpus=smoke"], proj, env=env)  # every stage, evaluation included
    assert _ran(out) == {"prepare", "embed", "profile", "cluster", "coreset", "report", "evaluate"}, out
    art = read_artifact(proj / "artifacts" / "smollm2-135m" / "coreneurons.zarr")
    assert art.attrs["corpus"]["name"] == "smoke"
    out = sh(DVC + ["repro", "report"], proj, env=env)
    assert _ran(out) == set(), out
    out = sh(DVC + ["exp", "run", "-S", "corpus=smoke", "-S", "coreset.beta=0.3", "report"], proj, env=env)
    assert _ran(out) == {"coreset", "report"}, out
    art = read_artifact(proj / "artifacts" / "smollm2-135m" / "coreneurons.zarr")
    assert art.attrs["beta"] == 0.3 and art.attrs["k"] == round(0.3 * 1536)
