"""``coreinfer init DIR``: a calibration project of the user's own, from the installed package alone.

    coreinfer init my-calibration --model /models/Llama-3.1-8B-Instruct --corpus prompts.jsonl
    cd my-calibration && dvc exp run -S corpus=smoke     # or: dvc repro (the composed params.yaml)

The project gets this package's Hydra config groups (``conf/``), its corpora (``corpora/``), the pipeline's
``dvc.yaml`` (the repository's, less the dependencies on the repository's source files: the stages run the
installed ``coreinfer``), a ``params.yaml`` composed from ``conf/``, and git + DVC initialised with Hydra
composition on. ``--model`` and ``--corpus`` add ``conf/model/custom.yaml`` / ``conf/corpus/custom.yaml`` and
select them. Nothing is written into a folder that already holds files.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

REPO_CORPORA = "pipeline/corpora"  # where the repository's corpus configs point; a project has corpora/
CODE_DEPS = ("pipeline/", "runtime/")  # the repository's sources: not part of a project
PROJECT_GITIGNORE = "# temporaries and commit locks of atomic writes (never outputs)\n.*.tmp-*\n/dvc_plots/\n"


class InitError(ValueError):
    """The project cannot be created; the message says why and what to do."""


def template() -> Path:
    """The packaged project template (``coreinfer/pipeline/project``: conf/ and dvc.yaml)."""
    return Path(str(resources.files("coreinfer.pipeline") / "project"))


def corpora() -> Path:
    return Path(str(resources.files("coreinfer.pipeline") / "corpora"))


def project_dvc_yaml(text: str) -> str:
    """The repository's dvc.yaml for a project: source-file dependencies dropped, corpora from ``corpora``."""
    data = yaml.safe_load(text)
    for stage in data["stages"].values():
        deps = [d for d in stage.get("deps", []) if not (isinstance(d, str) and d.startswith(CODE_DEPS))]
        if any(d == REPO_CORPORA for d in stage.get("deps", [])):
            deps.append("corpora")
        stage["deps"] = deps
    header = "# Made by `coreinfer init` from the installed coreinfer's pipeline (docs/pipeline.md of coreinfer).\n"
    return header + yaml.safe_dump(data, sort_keys=False, width=110)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.rstrip("/").split("/")[-1]).strip("-.") or "model"


def _select(config_yaml: Path, group: str, option: str) -> None:
    text = config_yaml.read_text(encoding="utf-8")
    new, n = re.subn(rf"^(\s*- {group}: )\S+", rf"\g<1>{option}", text, count=1, flags=re.M)
    if n != 1:
        raise InitError(f"{config_yaml} has no `- {group}: ...` default to replace")
    config_yaml.write_text(new, encoding="utf-8")


def init_project(dest: str | Path, model: str | None = None, corpus: str | None = None,
                 text_field: str = "text") -> list[Path]:
    """Create the project in ``dest`` (new or empty); returns the paths it wrote."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise InitError(f"{dest} already exists and is not an empty folder; choose a new folder name")
    for tool in ("git", "dvc"):
        if shutil.which(tool) is None:
            raise InitError(f"`{tool}` is not on PATH; install the pipeline extra (pip install 'coreinfer[pipeline]') "
                            "and git, or activate the environment that has them")
    src = template()
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "conf", dest / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(corpora(), dest / "corpora", ignore=shutil.ignore_patterns("__pycache__"))
    for cfg in (dest / "conf" / "corpus").glob("*.yaml"):
        cfg.write_text(cfg.read_text(encoding="utf-8").replace(f"{REPO_CORPORA}/", "corpora/"), encoding="utf-8")
    (dest / "dvc.yaml").write_text(project_dvc_yaml((src / "dvc.yaml").read_text(encoding="utf-8")), encoding="utf-8")
    if model:
        (dest / "conf" / "model" / "custom.yaml").write_text(
            "# Written by coreinfer init: a local Hugging Face folder, a .gguf file or a hub id (needs network).\n"
            + yaml.safe_dump({"name": "custom", "slug": _slug(model), "spec": model, "dtype": "auto", "device": "auto",
                              "batch_size": 8, "max_tokens": 256}, sort_keys=False), encoding="utf-8")
        _select(dest / "conf" / "config.yaml", "model", "custom")
    if corpus:
        path = Path(corpus).expanduser().resolve()
        if not path.is_file():
            raise InitError(f"corpus file {corpus} not found; give a jsonl/json/csv/parquet/txt file of prompts")
        (dest / "conf" / "corpus" / "custom.yaml").write_text(
            "# Written by coreinfer init: your prompts (text_field names the column; a txt file is one prompt a line).\n"
            + yaml.safe_dump({"name": "custom", "sources": [{"name": "custom", "path": str(path), "text_field": text_field,
                                                             "task": "custom"}],
                              "min_chars": 8, "max_chars": 4000, "heldout_fraction": 0.1, "dedupe": True},
                             sort_keys=False), encoding="utf-8")
        _select(dest / "conf" / "config.yaml", "corpus", "custom")
    (dest / ".gitignore").write_text(PROJECT_GITIGNORE, encoding="utf-8")

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=dest, capture_output=True, text=True)

    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("dvc", "config", "hydra.enabled", "true")):
        r = run(*cmd)
        if r.returncode:
            raise InitError(f"`{' '.join(cmd)}` failed in {dest}: {r.stderr.strip().splitlines()[-1:]}")
    with open(dest / ".dvcignore", "a", encoding="utf-8") as f:
        f.write(PROJECT_GITIGNORE.splitlines()[0] + "\n.*.tmp-*\n")
    from dvc.utils.hydra import compose_and_dump  # the composition `dvc exp run` performs

    compose_and_dump(str(dest / "params.yaml"), str((dest / "conf").resolve()), None, "config",
                     str(dest / ".dvc" / "hydra_plugins"), [])
    run("git", "add", "-A")
    commit = run("git", "commit", "-q", "-m", "coreinfer calibration project (coreinfer init)")
    written = sorted(p for p in dest.rglob("*") if p.is_file() and ".git" not in p.relative_to(dest).parts[:1])
    if commit.returncode:
        print(f"init: created {dest}, but git could not commit ({commit.stderr.strip().splitlines()[-1:]}); "
              "commit it yourself (git commit -m init) before `dvc exp run`", file=sys.stderr)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coreinfer init", description="A calibration project (dvc.yaml, conf/, params.yaml, "
                                 "git and DVC) for your own model and corpus, in a folder of your own.",
                                 epilog="then: cd DIR && dvc exp run -S corpus=smoke (a quick check), or dvc repro")
    ap.add_argument("dir", help="the new project folder (must not exist or be empty)")
    ap.add_argument("--model", help="your model: a local Hugging Face folder, a .gguf file or a hub id")
    ap.add_argument("--corpus", help="your prompts: a jsonl/json/csv/parquet/txt file")
    ap.add_argument("--text-field", default="text", help="the corpus column that holds the prompt (default: text)")
    ap.add_argument("--json", action="store_true", help="print the written paths as JSON")
    a = ap.parse_args(argv)
    try:
        written = init_project(a.dir, a.model, a.corpus, a.text_field)
    except (InitError, OSError) as e:
        print(f"coreinfer init: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps([str(p) for p in written]))
    else:
        print(f"init: calibration project in {a.dir} ({len(written)} files). Next: cd {a.dir} && dvc exp run -S corpus=smoke")
    return 0


if __name__ == "__main__":
    sys.exit(main())
