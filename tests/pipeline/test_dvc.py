"""DVC: the artifact round-trips through a remote byte-identical; in a `coreinfer init` project the smoke experiment
runs every stage, a rejected value keeps every output, and repro is incremental."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coreinfer.runtime.artifact import read_artifact, write_artifact

from .synthetic import synthetic_artifact_inputs

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


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def _env() -> dict:
    """The stages run `python -m coreinfer.pipeline`: this interpreter's folder first on PATH; a git identity."""
    return dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="test",
                GIT_COMMITTER_EMAIL="t@example.com")


def _outputs(proj: Path) -> dict:
    """Every stage output (and the committed config slices), by content."""
    return {k: v for k, v in digest(proj / "artifacts").items() if ".tmp-" not in k}


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
            yield from (k for k in obj if isinstance(k, str))
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


@pytest.mark.slow
def test_init_project_smoke_experiment_rejected_values_and_incremental_repro(tmp_path):
    """`coreinfer init` makes a project outside this repository; in it, `dvc exp run -S corpus=smoke` runs every
    stage, with several clusters and held-out prompts inside a radius. A rejected value (`-S coreset.beta=2`) or a
    corpus that is not UTF-8 fails in one line and leaves every output in place; nothing reruns unchanged; beta
    reruns only validate, coreset and report. (The duration is measured in docs/pipeline.md, not asserted here.)"""
    env = _env()
    proj = tmp_path / "calib"
    sh([sys.executable, "-m", "coreinfer.runtime.cli", "init", str(proj)], tmp_path, env=env)
    assert sh(["git", "status", "--porcelain"], proj) == "" and (proj / ".dvc" / "config").is_file()
    assert not any(d.startswith(("pipeline/", "runtime/")) for st in yaml.safe_load((proj / "dvc.yaml").read_text())["stages"].values()
                   for d in st.get("deps", []) if isinstance(d, str))

    out = sh(DVC + ["exp", "run", "-S", "corpus=smoke"], proj, env=env)
    assert {"validate", "prepare", "embed", "profile", "cluster", "coreset", "report", "evaluate"} <= _ran(out), out
    art = read_artifact(proj / "artifacts" / "smollm2-135m" / "coreneurons.zarr")
    assert art.attrs["corpus"]["name"] == "smoke"
    clusters = json.loads((proj / "artifacts" / "work" / "metrics" / "cluster.json").read_text())
    assert clusters["n_clusters"] >= 3 and clusters["heldout_inside_radius"] >= 1, clusters
    headline = json.loads((proj / "artifacts" / "smollm2-135m" / "eval" / "headline.json").read_text())
    assert headline["kept"] == pytest.approx(art.attrs["beta"]) and "similarity" in headline["top1_agreement"]
    meta = json.loads((proj / "artifacts" / "smollm2-135m" / "eval" / "results.jsonl").read_text().splitlines()[0])
    assert not [s for s in _strings(meta) if s.startswith("/") or str(tmp_path) in s], meta  # paths relative to the project
    assert _ran(sh(DVC + ["repro"], proj, env=env)) == set()

    before = _outputs(proj)
    r = subprocess.run(DVC + ["exp", "run", "-S", "corpus=smoke", "-S", "coreset.beta=2"], cwd=proj, env=env,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "coreset.beta: must be in (0, 1], got 2.0" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout and _ran(r.stdout + r.stderr) == {"validate"}
    assert _outputs(proj) == before  # every artifact in place

    corpus = proj / "corpora" / "smoke.jsonl"
    good = corpus.read_bytes()
    corpus.write_bytes(good + b'{"id": "bad", "task": "qa", "text": "caf\xe9 au lait"}\n')  # latin-1, not UTF-8
    r = subprocess.run(DVC + ["exp", "run", "-S", "corpus=smoke"], cwd=proj, env=env, capture_output=True, text=True)
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: [prepare]")]
    assert r.returncode != 0 and len(errors) == 1 and "line 41 is not valid UTF-8" in errors[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout and _outputs(proj) == before
    corpus.write_bytes(good)

    out = sh(DVC + ["exp", "run", "-S", "corpus=smoke", "-S", "coreset.beta=0.3", "report"], proj, env=env)
    assert _ran(out) == {"validate", "coreset", "report"}, out
    art = read_artifact(proj / "artifacts" / "smollm2-135m" / "coreneurons.zarr")
    assert art.attrs["beta"] == 0.3 and art.attrs["k"] == round(0.3 * 1536)
