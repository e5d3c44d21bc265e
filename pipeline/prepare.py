"""Stage 1, prepare: corpora -> one normalised, deduplicated, length-filtered table with a held-out split.

Sources are local jsonl/json/csv/parquet/txt files read through ``datasets`` (txt: one prompt per line),
or hub data set names when the machine is online. Output: ``<work_dir>/corpus.parquet`` with columns
id, text, source, task, split ("train" | "heldout").
"""

from __future__ import annotations

import hashlib
import re
import string
from pathlib import Path

from .config import PipelineConfig, SourceConfig
from .io import CORPUS_COLUMNS, atomic_output, corpus_hash, write_json


class CorpusError(ValueError):
    """The corpus cannot be read or is unusable; the message names the file/column and the fix."""


_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "txt", ".tsv": "csv"}
_LOADERS = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet", "txt": "text"}


def source_format(src: SourceConfig) -> str:
    if src.format:
        return src.format
    suffix = Path(src.path or "").suffix.lower()
    if suffix not in _FORMATS:
        raise CorpusError(f"source {src.name!r}: cannot infer the format of {src.path!r}; set format: jsonl|json|csv|parquet|txt")
    return _FORMATS[suffix]


def check_utf8(path: Path) -> None:
    """Raise CorpusError naming the first line that is not valid UTF-8."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"{path}: line {lineno} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}). "
                    f"Re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.{path.suffix.lstrip('.')}`"
                ) from None


def _load_rows(src: SourceConfig) -> tuple[list[dict], list[str]]:
    """Rows (dicts) and column names of one source."""
    import datasets

    datasets.disable_progress_bars()
    if src.path:
        path = Path(src.path)
        if not path.is_file():
            raise CorpusError(f"source {src.name!r}: corpus file {path} not found (path is relative to the repository root)")
        if path.stat().st_size == 0:
            raise CorpusError(f"source {src.name!r}: corpus file {path} is empty")
        fmt = source_format(src)
        if fmt != "parquet":
            check_utf8(path)
        try:
            ds = datasets.load_dataset(_LOADERS[fmt], data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - datasets/pyarrow raise many types for malformed files
            raise CorpusError(f"source {src.name!r}: cannot parse {path} as {fmt}: {type(e).__name__}: {e}") from e
    else:
        try:
            ds = datasets.load_dataset(src.hub, src.hub_config, split=src.split)
        except Exception as e:  # noqa: BLE001
            raise CorpusError(
                f"source {src.name!r}: cannot load hub data set {src.hub!r} (config {src.hub_config!r}, split {src.split!r}): "
                f"{type(e).__name__}: {e}. Hub data sets need network access; offline, point `path` at a local copy."
            ) from e
    columns = list(ds.column_names)
    return ds.to_list(), columns


def _row_text(src: SourceConfig, row: dict, columns: list[str]) -> str:
    if src.template:
        try:
            return string.Formatter().vformat(src.template, (), row)
        except (KeyError, IndexError, TypeError) as e:
            raise CorpusError(
                f"source {src.name!r}: template {src.template!r} refers to {e} which the rows do not have; columns: {columns}"
            ) from None
    value = row[src.text_field]
    return "" if value is None else str(value)


_WS = re.compile(r"\s+")
_SPACES = re.compile(r"[ \t\f\v]+")


def normalise_text(text: str) -> str:
    """Unix line ends, runs of spaces/tabs collapsed, lines stripped, no blank lines at the ends."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(_SPACES.sub(" ", line).strip() for line in lines).strip()


def dedupe_key(text: str) -> str:
    return _WS.sub(" ", text.casefold()).strip()


def is_heldout(row_id: str, fraction: float, seed: int) -> bool:
    """Deterministic, order-independent split: a row's fate depends only on its id and the seed."""
    if fraction <= 0:
        return False
    u = int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "big") / 2**64
    return u < fraction


def prepare(cfg: PipelineConfig) -> list[Path]:
    """Build ``corpus.parquet``; returns the written paths (table and summary JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    c = cfg.corpus
    out = {k: [] for k in CORPUS_COLUMNS}
    seen: set[str] = set()
    stats = {"read": 0, "empty": 0, "too_short": 0, "too_long": 0, "duplicates": 0}
    per_source = {}
    for src in c.sources:
        rows, columns = _load_rows(src)
        if not rows:
            raise CorpusError(f"source {src.name!r}: no rows in {src.path or src.hub}")
        if not src.template and src.text_field not in columns:
            raise CorpusError(
                f"source {src.name!r}: text column {src.text_field!r} not found in {src.path or src.hub}; "
                f"columns are {columns}. Set text_field (or a template) in the corpus config."
            )
        if src.task_field and not src.task and src.task_field not in columns:
            raise CorpusError(f"source {src.name!r}: task_field {src.task_field!r} not found; columns are {columns}")
        if src.id_field and src.id_field not in columns:
            raise CorpusError(f"source {src.name!r}: id_field {src.id_field!r} not found; columns are {columns}")
        kept = 0
        for idx, row in enumerate(rows):
            if src.limit is not None and kept >= src.limit:
                break
            stats["read"] += 1
            text = normalise_text(_row_text(src, row, columns))
            if not text:
                stats["empty"] += 1
                continue
            if len(text) < c.min_chars:
                stats["too_short"] += 1
                continue
            if len(text) > c.max_chars:
                stats["too_long"] += 1
                continue
            key = dedupe_key(text)
            if c.dedupe and key in seen:
                stats["duplicates"] += 1
                continue
            seen.add(key)
            raw_id = row.get(src.id_field) if src.id_field else None
            row_id = f"{src.name}/{raw_id if raw_id not in (None, '') else idx}"
            task = src.task if src.task else str(row.get(src.task_field) or "unknown")
            out["id"].append(row_id)
            out["text"].append(text)
            out["source"].append(src.name)
            out["task"].append(task)
            out["split"].append("heldout" if is_heldout(row_id, c.heldout_fraction, cfg.seed) else "train")
            kept += 1
        per_source[src.name] = kept
    if len(set(out["id"])) != len(out["id"]):
        dup = sorted({i for i in out["id"] if out["id"].count(i) > 1})[:5]
        raise CorpusError(f"duplicate prompt ids {dup}: make id_field unique within each source")
    n = len(out["id"])
    if n == 0:
        raise CorpusError(
            f"corpus {c.name!r} is empty after filtering ({stats}); check the files, text_field and "
            f"corpus.min_chars={c.min_chars}/max_chars={c.max_chars}"
        )
    n_train = out["split"].count("train")
    if n_train == 0:
        raise CorpusError(f"corpus {c.name!r}: all {n} prompts fell into the held-out split; lower corpus.heldout_fraction")
    h = corpus_hash(out["id"], out["text"], out["split"])
    table = pa.table({k: pa.array(out[k], type=pa.string()) for k in CORPUS_COLUMNS})
    table = table.replace_schema_metadata({"coreinfer.corpus_hash": h, "coreinfer.corpus_name": c.name})
    with atomic_output(cfg.corpus_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    summary = {
        "corpus": c.name, "prompts": n, "train": n_train, "heldout": n - n_train, "corpus_hash": h,
        "per_source": per_source, "tasks": {t: out["task"].count(t) for t in sorted(set(out["task"]))}, "filtered": stats,
    }
    summary_path = write_json(Path(cfg.work_dir) / "corpus.json", summary)
    print(f"prepare: {n} prompts ({n_train} train, {n - n_train} held out) from {len(c.sources)} source(s); filtered {stats}")
    return [cfg.corpus_path, summary_path]
