"""prepare: normalised, deduplicated, length-filtered corpora with a held-out split; clear errors."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coreinfer.pipeline.prepare import CorpusError, is_heldout, prepare
from coreinfer.pipeline.io import read_corpus

from .conftest import make_cfg, src, write_jsonl


def _rows(cfg):
    return read_corpus(cfg.corpus_path).to_pylist()


def test_dedupe_length_filter_and_normalisation(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"text": "What is  the capital of France?"},
        {"text": "what is the capital   of france?"},  # duplicate after case/space folding
        {"text": "Hi"},  # too short (min_chars=3 -> 2 chars)
        {"text": "x" * 50},  # too long
        {"text": "  Line one\r\nLine\ttwo  "},
        {"text": ""},
    ])
    cfg = make_cfg(tmp_path, [src(f)], corpus={"max_chars": 40})
    prepare(cfg)
    rows = _rows(cfg)
    assert [r["text"] for r in rows] == ["What is the capital of France?", "Line one\nLine two"]
    assert [r["id"] for r in rows] == ["s/0", "s/4"]
    assert {r["task"] for r in rows} == {"t"} and {r["source"] for r in rows} == {"s"}
    summary = (cfg.corpus_path.parent / "corpus.json").read_text()
    assert '"duplicates": 1' in summary and '"too_long": 1' in summary and '"too_short": 1' in summary


def test_heldout_split_is_deterministic_and_sized(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": f"prompt number {i}", "id": i} for i in range(400)])
    cfg = make_cfg(tmp_path, [src(f, id_field="id")], corpus={"heldout_fraction": 0.25})
    prepare(cfg)
    rows = _rows(cfg)
    held = [r["id"] for r in rows if r["split"] == "heldout"]
    assert 60 <= len(held) <= 140
    assert held == [r["id"] for r in rows if is_heldout(r["id"], 0.25, 0)]
    # order-independent: reversing the file keeps every row's split
    write_jsonl(f, [{"text": f"prompt number {i}", "id": i} for i in reversed(range(400))])
    prepare(cfg)
    assert sorted(r["id"] for r in _rows(cfg) if r["split"] == "heldout") == sorted(held)


def test_formats_csv_txt_parquet_and_template(tmp_path):
    (tmp_path / "a.csv").write_text("Question,Kind\nWhy is the sky blue?,qa\nHow do magnets work?,qa\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("first line of text\n\nsecond line of text\n", encoding="utf-8")
    pq.write_table(pa.table({"instruction": ["Sort these", "Add these"], "input": ["3 1 2", "4 5"]}), tmp_path / "c.parquet")
    cfg = make_cfg(tmp_path, [
        src(tmp_path / "a.csv", name="a", text_field="Question", task=None, task_field="Kind"),
        src(tmp_path / "b.txt", name="b"),
        {"name": "c", "path": str(tmp_path / "c.parquet"), "template": "{instruction}: {input}", "task": "inst"},
    ])
    prepare(cfg)
    rows = _rows(cfg)
    assert [(r["source"], r["text"], r["task"]) for r in rows] == [
        ("a", "Why is the sky blue?", "qa"), ("a", "How do magnets work?", "qa"),
        ("b", "first line of text", "t"), ("b", "second line of text", "t"),
        ("c", "Sort these: 3 1 2", "inst"), ("c", "Add these: 4 5", "inst"),
    ]


def test_non_utf8_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "fine line here"}\n{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(CorpusError, match=r"line 2 is not valid UTF-8.*iconv"):
        prepare(make_cfg(tmp_path, [src(f)]))
    assert not (tmp_path / "work" / "corpus.parquet").exists()


def test_missing_text_column_is_named(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"question": "What is up?"}])
    with pytest.raises(CorpusError, match=r"text column 'text' not found.*\['question'\].*text_field"):
        prepare(make_cfg(tmp_path, [src(f)]))


def test_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        prepare(make_cfg(tmp_path, [src(tmp_path / "nope.jsonl")]))


def test_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        prepare(make_cfg(tmp_path, [src(tmp_path / "e.jsonl")]))


def test_empty_after_filtering(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "ab"}, {"text": "cd"}])
    with pytest.raises(CorpusError, match="empty after filtering.*min_chars"):
        prepare(make_cfg(tmp_path, [src(f)]))


def test_template_with_unknown_column(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "hello there"}])
    with pytest.raises(CorpusError, match="template"):
        prepare(make_cfg(tmp_path, [{"name": "s", "path": str(f), "template": "{prompt}", "task": "t"}]))


def test_project_corpora_meet_the_spec():
    """The default corpus: >= 400 prompts over >= 8 task kinds; smoke: about 40."""
    import json
    from collections import Counter
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipeline" / "corpora"
    default = [json.loads(l) for l in (root / "default.jsonl").read_text(encoding="utf-8").splitlines()]
    smoke = [json.loads(l) for l in (root / "smoke.jsonl").read_text(encoding="utf-8").splitlines()]
    tasks = Counter(r["task"] for r in default)
    assert len(default) >= 400 and len(tasks) >= 8 and min(tasks.values()) >= 40
    assert {"factual_qa", "open_qa", "summarisation", "translation", "code", "math", "chat", "creative_writing"} <= set(tasks)
    assert 30 <= len(smoke) <= 50 and len({r["task"] for r in smoke}) >= 8
    assert len({r["text"].casefold() for r in default}) == len(default)


@pytest.mark.data
@pytest.mark.parametrize("corpus", ["truthfulqa", "gsm8k", "nq_open", "alpaca", "wikitext2", "shared-mix"])
def test_shared_data_corpora(tmp_path, corpus, monkeypatch):
    from pathlib import Path

    from dvc.utils.hydra import compose_and_dump

    from coreinfer.pipeline.config import load_config

    repo = Path(__file__).resolve().parents[2]
    if not (repo.parent / "shared" / "data" / "SOURCES.md").is_file():
        pytest.skip("../shared/data is absent: the shared data sets are not on this machine")
    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(repo / "conf"), None, "config", "", [f"corpus={corpus}", f"work_dir={tmp_path / 'work'}"])
    monkeypatch.chdir(repo)  # source paths are relative to the repository root
    cfg = load_config(out)
    prepare(cfg)
    rows = _rows(cfg)
    assert len(rows) >= 100
    assert all(cfg.corpus.min_chars <= len(r["text"]) <= cfg.corpus.max_chars for r in rows)
