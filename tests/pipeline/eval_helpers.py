"""Helpers of the evaluation tests: a miniature data folder in the shared-data layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and Berlin is the capital of Germany.",
    "Two plus two equals four; three times five is fifteen.",
    "Write a short poem about the sea and the wind in the evening.",
]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_data_dir(root: Path) -> Path:
    """A data folder with every file the evaluation tasks read, a few rows each."""
    d = root / "data"
    write_jsonl(d / "alpaca" / "seed_tasks.jsonl", [
        {"id": f"seed_{i}", "instruction": s, "instances": [{"input": "", "output": "ok"}]}
        for i, s in enumerate(SENTENCES * 2)
    ])
    (d / "wikitext-2").mkdir(parents=True)
    (d / "wikitext-2" / "test.txt").write_text(" = Heading = \n" + " ".join(SENTENCES * 12) + "\n", encoding="utf-8")
    write_jsonl(d / "nq_open" / "NQ-open.dev.jsonl", [
        {"question": "what is the capital of france", "answer": ["Paris"]},
        {"question": "what is two plus two", "answer": ["four", "4"]},
        {"question": "who jumps over the lazy dog", "answer": ["the quick brown fox"]},
        {"question": "what is three times five", "answer": ["fifteen"]},
    ])
    gsm = [{"question": "Two plus two equals what?", "answer": "2 + 2 = 4\n#### 4"},
           {"question": "Three times five is what?", "answer": "3 * 5 = 15\n#### 15"},
           {"question": "What is one plus one?", "answer": "1 + 1 = 2\n#### 2"}]
    write_jsonl(d / "gsm8k" / "test.jsonl", gsm)
    write_jsonl(d / "gsm8k" / "train.jsonl", gsm)
    (d / "truthfulqa").mkdir(parents=True)
    with open(d / "truthfulqa" / "TruthfulQA.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"])
        w.writerow(["Adversarial", "Geo", "What is the capital of France?", "Paris",
                    "Paris; The capital is Paris", "Berlin; London", "x"])
        w.writerow(["Adversarial", "Math", "What is two plus two?", "Four", "Four; 4", "Five; Fifteen", "x"])
        w.writerow(["Adversarial", "Animals", "What jumps over the lazy dog?", "The quick brown fox",
                    "A fox", "The sea; The wind", "x"])
    return d
