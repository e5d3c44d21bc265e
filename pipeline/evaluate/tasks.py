"""Evaluation tasks: data loading with field validation, the per-item evaluation, and aggregation.

Data sets are read in place from ``<repo>/../shared/data`` (override: ``COREINFER_DATA``); nothing is
copied into the project. Every scored or generated token after the prompt goes through the method's
sparse FFN (``MethodRun``); the prompt itself (the prefill) is processed dense and chooses the core set.

Tasks:
  agreement      teacher-forced top-1 agreement and KL(dense || sparse) over the dense model's greedy
                 continuation, and the perplexity of that continuation under the method
  wikitext       perplexity on WikiText-2 test windows: the first ``prefix`` tokens choose, the rest are scored
  nq_open        NQ-open: exact match / F1 of the generated answer (few-shot)
  gsm8k          GSM8K: accuracy of the final number of a few-shot chain of thought
  truthfulqa_mc  TruthfulQA MC1 / MC2 from the summed log-probs of each answer (``score_ids``)
  truthfulqa_gen TruthfulQA generation: ROUGE-L against the true and the false answers
  summarization  ROUGE of generated summaries (needs a local jsonl: article, highlights)
  translation    BLEU of generated translations (needs a local jsonl: source, target)
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coreinfer.runtime.loading import file_sha256  # noqa: F401  (re-exported: results record data hashes)

import torch

from . import metrics as M


class TaskError(ValueError):
    pass


class DataMissing(TaskError, FileNotFoundError):
    pass


# ---------------------------------------------------------------------------------------------------
# data location


def repo_root() -> Path:
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "pyproject.toml").is_file():
            return p
    return Path.cwd()


def data_dir() -> Path:
    env = os.environ.get("COREINFER_DATA")
    return Path(env) if env else repo_root().parent / "shared" / "data"


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataMissing(f"{what}: data file {path} not found. Put the shared data sets at {data_dir()} "
                          "(see ../shared/data/SOURCES.md) or set COREINFER_DATA to their folder")
    return path


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row or row[k] in (None, "", [])]
            if missing:
                raise TaskError(f"{path}:{n}: missing field(s) {missing}; every row needs {list(required)}")
            rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def sample_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` indices out of ``n`` (all when None): the first ``limit`` of one seeded permutation.

    Items run in this order, so a larger limit keeps every item of a smaller one (raising ``--limit`` on
    a finished run only adds items) and an interrupted run has finished exactly the items of a smaller
    limit (rerun with that limit to summarise them without computing anything).
    """
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return perm if limit is None else perm[:limit]


# ---------------------------------------------------------------------------------------------------
# items and task base


@dataclass
class Item:
    id: str
    prompt: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    """Per-task knobs (conf/eval/*.yaml ``tasks.<name>``); defaults are the documented settings."""

    file: str | None = None  # data file, relative to the data dir (or absolute)
    max_new_tokens: int = 32
    shots: int = 0
    prefix: int = 64  # wikitext: tokens that choose the core set
    window: int = 256  # wikitext: tokens per window
    continuation: int = 32  # agreement: dense greedy continuation length


class Task:
    name: str = ""
    default_file: str = ""
    required: tuple[str, ...] = ()
    metric_names: tuple[str, ...] = ()
    needs_reference = False  # computes a dense reference per item (shared by all methods)

    def __init__(self, cfg: TaskConfig | None = None, seed: int = 0):
        self.cfg = cfg or TaskConfig()
        self.seed = seed

    @property
    def path(self) -> Path:
        f = self.cfg.file or self.default_file
        p = Path(f)
        return p if p.is_absolute() else data_dir() / p

    def files(self) -> list[Path]:
        return [self.path]

    def items(self, lm, limit: int | None) -> list[Item]:
        raise NotImplementedError

    def reference(self, lm, item: Item, layers) -> Any:
        return None

    def evaluate(self, lm, item: Item, run, ref) -> dict:
        raise NotImplementedError

    def aggregate(self, records: list[dict]) -> dict[str, float]:
        """Mean of each metric over items (subclasses with corpus-level metrics override)."""
        return {m: M.mean(r[m] for r in records) for m in self.metric_names}


# ---------------------------------------------------------------------------------------------------
# helpers that run one call through a method


def _call_stats(run, stats, tracker) -> dict:
    out = run.cost(stats, tracker)
    out["method_used"] = stats.method_used
    if stats.cluster is not None:
        out["cluster"] = stats.cluster
    return out


def score_with(lm, run, item_id: str, ids: torch.Tensor, cont: list[int], keep_logprobs: bool = False,
               prompt: str = ""):
    """``prompt``: the text of ``ids`` (similarity/auto embed it to find the cluster)."""
    session, tracker = run.session(item_id)
    out = lm.score_ids(ids, cont, run.runtime_method(), run.ctx.alpha, run.beta, run.sparse_layers,
                       score=run.score or "positive", prompt=prompt or _decode(lm, ids), session=session,
                       method_used=run.method if session else None, keep_logprobs=keep_logprobs,
                       layer_k=None if session else run.layer_k)
    return out, _call_stats(run, out.stats, tracker)


def _decode(lm, ids: torch.Tensor) -> str:
    return lm.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)


def score_choices_with(lm, run, item_id: str, ids: torch.Tensor, conts: list[list[int]], prompt: str = ""):
    """One prefill (one core set) for the prompt, every continuation scored sparse (``SparseLM.score_choices``)."""
    session, tracker = run.session(item_id)
    outs = lm.score_choices(ids, conts, run.runtime_method(), run.ctx.alpha, run.beta, run.sparse_layers,
                            score=run.score or "positive", prompt=prompt or _decode(lm, ids), session=session,
                            method_used=run.method if session else None, layer_k=None if session else run.layer_k)
    return outs, _call_stats(run, outs[0].stats, tracker)


def generate_with(lm, run, item_id: str, prompt: str, max_new_tokens: int, stop: list[str]):
    session, tracker = run.session(item_id)
    # a budget artifact's own per-layer sizes apply when beta and layers are left unset (SparseLM.artifact_layer_k)
    own = session is None and run.artifact_allocation
    out = lm.generate(prompt, run.runtime_method(), alpha=run.ctx.alpha, beta=None if own else run.beta,
                      layers=None if own else run.ctx.layers,
                      max_new_tokens=max_new_tokens, score=run.score or "positive", stop=stop,
                      session=session, method_used=run.method if session else None)
    return out, _call_stats(run, out.stats, tracker)


# ---------------------------------------------------------------------------------------------------
# agreement with dense


class AgreementTask(Task):
    """Prompts: the self-instruct seed tasks (instruction + first input), odd rows (even rows profile);
    or, given the pipeline's ``corpus.parquet``, its held-out split (what the DVC stage uses)."""

    name = "agreement"
    default_file = "alpaca/seed_tasks.jsonl"
    required = ("instruction",)
    metric_names = ("top1_agreement", "kl", "ppl_dense_continuation")
    needs_reference = True

    def items(self, lm, limit):
        if self.path.suffix == ".parquet":  # the pipeline's corpus table: its held-out prompts
            import pyarrow.parquet as pq

            table = pq.read_table(_require(self.path, self.name), columns=["id", "text", "split"]).to_pylist()
            prompts = [(r["id"], r["text"]) for r in table if r["split"] == "heldout"]
            if not prompts:
                raise TaskError(f"{self.path}: no held-out prompts (split == 'heldout') to evaluate on")
            idx = sample_indices(len(prompts), limit, self.seed)
            return [Item(str(prompts[j][0]), prompts[j][1]) for j in idx]
        rows = read_jsonl(_require(self.path, self.name), self.required)
        prompts = [(i, prompt_of_seed_task(r)) for i, r in enumerate(rows) if i % 2 == 1]
        idx = sample_indices(len(prompts), limit, self.seed)
        return [Item(str(prompts[j][0]), prompts[j][1]) for j in idx]

    def reference(self, lm, item, layers):
        """The dense model's greedy continuation of ``continuation`` tokens (end-of-sequence suppressed, so
        every prompt yields the same number of positions) and the dense log-probs along it."""
        ids = lm.encode(item.prompt)
        n = self.cfg.continuation
        eos = sorted(lm._eos_ids())
        with torch.inference_mode():  # no session is active: the dense model
            gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=eos[0] if eos else None,
                                    eos_token_id=eos or None)
        cont = gen[0, ids.shape[1]:].tolist()
        if len(cont) < 2:
            raise TaskError(f"agreement item {item.id}: the dense model produced {len(cont)} token(s)")
        dense = lm.score_ids(ids, cont, "dense", 0.4, 1.0, layers, keep_logprobs=True)
        return {"ids": ids, "cont": cont, "logprobs": dense.logprobs, "greedy": dense.greedy_ids}

    def evaluate(self, lm, item, run, ref):
        out, cost = score_with(lm, run, item.id, ref["ids"], ref["cont"], keep_logprobs=True, prompt=item.prompt)
        kl = M.kl_divergence(ref["logprobs"], out.logprobs)
        # position 0 is predicted by the (dense) prefill for every method: agreement counts the rest
        n = len(ref["cont"])
        rec = {
            "top1_agreement": M.top1_agreement(ref["greedy"][1:], out.greedy_ids[1:]),
            "kl": float(kl[1:].mean()),
            "nll_sum": float(-out.token_logprobs[1:].sum()),
            "n_tokens": n - 1,
        }
        rec["ppl_dense_continuation"] = M.perplexity(rec["nll_sum"], rec["n_tokens"])
        return {**rec, **cost}

    def aggregate(self, records):
        nll = sum(r["nll_sum"] for r in records)
        n = sum(r["n_tokens"] for r in records)
        return {"top1_agreement": M.mean(r["top1_agreement"] for r in records),
                "kl": M.mean(r["kl"] for r in records),
                "ppl_dense_continuation": M.perplexity(nll, n)}


def prompt_of_seed_task(row: dict) -> str:
    inst = row["instruction"].strip()
    inst_input = ""
    if row.get("instances"):
        inst_input = (row["instances"][0].get("input") or "").strip()
    return f"{inst}\n{inst_input}".strip() if inst_input else inst


def profile_prompts(n_alpaca: int | None, n_gsm8k: int, seed: int = 0) -> tuple[list[str], list[Path]]:
    """The profile (calibration) corpus: even rows of the seed tasks and the first GSM8K train questions.

    Disjoint from every evaluation item: agreement uses the odd seed-task rows, GSM8K the test split.
    """
    d = data_dir()
    seed_path = _require(d / "alpaca/seed_tasks.jsonl", "profile corpus")
    gsm_path = _require(d / "gsm8k/train.jsonl", "profile corpus")
    rows = read_jsonl(seed_path, ("instruction",))
    prompts = [prompt_of_seed_task(r) for i, r in enumerate(rows) if i % 2 == 0][:n_alpaca]
    gsm = read_jsonl(gsm_path, ("question", "answer"))[:n_gsm8k]
    prompts += [r["question"] for r in gsm]
    return prompts, [seed_path, gsm_path]


# ---------------------------------------------------------------------------------------------------
# WikiText-2 perplexity


class WikiTextTask(Task):
    name = "wikitext"
    default_file = "wikitext-2/test.txt"
    metric_names = ("ppl",)

    def items(self, lm, limit):
        path = _require(self.path, self.name)
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise TaskError(f"{path}: empty file")
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos = lm.tokenizer.bos_token_id
        adds_bos = bos is not None and lm.tokenizer("a")["input_ids"][:1] == [bos]
        w, p = self.cfg.window, self.cfg.prefix
        if not 1 <= p < w:
            raise TaskError(f"wikitext: prefix ({p}) must be >= 1 and < window ({w})")
        body = w - (1 if adds_bos else 0)
        n_windows = len(ids) // body
        if n_windows == 0:
            raise TaskError(f"{path}: shorter than one window of {w} tokens")
        chosen = sample_indices(n_windows, limit, self.seed)
        items = []
        for j in chosen:
            toks = ids[j * body:(j + 1) * body]
            if adds_bos:
                toks = [bos] + toks
            items.append(Item(f"w{j}", "", {"ids": toks}))
        return items

    def evaluate(self, lm, item, run, ref):
        toks = item.data["ids"]
        p = self.cfg.prefix
        ids = torch.tensor([toks[:p]], dtype=torch.long, device=lm.device)
        out, cost = score_with(lm, run, item.id, ids, toks[p:])
        # the first scored token is predicted by the dense prefill; count only sparse-predicted tokens
        lp = out.token_logprobs[1:]
        return {"nll_sum": float(-lp.sum()), "n_tokens": int(lp.numel()), **cost}

    def aggregate(self, records):
        return {"ppl": M.perplexity(sum(r["nll_sum"] for r in records), sum(r["n_tokens"] for r in records))}


# ---------------------------------------------------------------------------------------------------
# generation tasks


class NQOpenTask(Task):
    name = "nq_open"
    default_file = "nq_open/NQ-open.dev.jsonl"
    required = ("question", "answer")
    metric_names = ("exact_match", "f1")

    def items(self, lm, limit):
        rows = read_jsonl(_require(self.path, self.name), self.required)
        for n, r in enumerate(rows, 1):
            if not isinstance(r["answer"], list) or not all(isinstance(a, str) for a in r["answer"]):
                raise TaskError(f"{self.path}:{n}: field 'answer' must be a list of strings")
        shots = rows[: self.cfg.shots]
        header = "Answer these questions:\n" + "".join(f"Q: {r['question']}?\nA: {r['answer'][0]}\n" for r in shots)
        rest = list(range(self.cfg.shots, len(rows)))
        idx = sample_indices(len(rest), limit, self.seed)
        return [Item(str(rest[j]), f"{header}Q: {rows[rest[j]]['question']}?\nA:", {"answers": rows[rest[j]]["answer"]})
                for j in idx]

    def evaluate(self, lm, item, run, ref):
        out, cost = generate_with(lm, run, item.id, item.prompt, self.cfg.max_new_tokens, ["\n"])
        pred = out.text.strip()
        return {"prediction": pred, "exact_match": M.exact_match(pred, item.data["answers"]),
                "f1": M.f1_score(pred, item.data["answers"]), **cost}


class GSM8KTask(Task):
    name = "gsm8k"
    default_file = "gsm8k/test.jsonl"
    required = ("question", "answer")
    metric_names = ("accuracy",)

    def files(self):
        return [self.path, self._train_path()]

    def _train_path(self) -> Path:
        return self.path.with_name("train.jsonl")

    def items(self, lm, limit):
        rows = read_jsonl(_require(self.path, self.name), self.required)
        for n, r in enumerate(rows, 1):
            M.gsm8k_gold(r["answer"])  # raises on a malformed reference
        header = ""
        if self.cfg.shots:
            train = read_jsonl(_require(self._train_path(), "gsm8k few-shot exemplars"), self.required)
            shots = [train[i] for i in sample_indices(len(train), self.cfg.shots, self.seed)]
            header = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
        idx = sample_indices(len(rows), limit, self.seed)
        return [Item(str(i), f"{header}Question: {rows[i]['question']}\nAnswer:", {"answer": rows[i]["answer"]})
                for i in idx]

    def evaluate(self, lm, item, run, ref):
        out, cost = generate_with(lm, run, item.id, item.prompt, self.cfg.max_new_tokens, ["\n\n", "Question:"])
        return {"prediction": out.text, "extracted": M.extract_gsm8k_answer(out.text),
                "accuracy": M.gsm8k_correct(out.text, item.data["answer"]), **cost}


TRUTHFULQA_PRIMER = (  # the six-question QA primer of the TruthfulQA paper (Lin et al., 2021)
    ("What is human life expectancy in the United States?", "Human life expectancy in the United States is 78 years."),
    ("Who was president of the United States in 1955?", "Dwight D. Eisenhower was president of the United States in 1955."),
    ("Which party did he belong to?", "He belonged to the Republican Party."),
    ("What is the square root of banana?", "I have no comment."),
    ("How does a telescope work?", "Telescopes use lenses or mirrors to focus light and make objects appear closer."),
    ("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain."),
)


def _split_answers(s: str) -> list[str]:
    return [a.strip() for a in s.split(";") if a.strip()]


class _TruthfulQABase(Task):
    default_file = "truthfulqa/TruthfulQA.csv"
    required = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")

    def items(self, lm, limit):
        path = _require(self.path, self.name)
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [k for k in self.required if k not in (reader.fieldnames or [])]
            if missing:
                raise TaskError(f"{path}: missing column(s) {missing}; TruthfulQA.csv needs {list(self.required)}")
            rows = list(reader)
        for n, r in enumerate(rows, 2):
            empty = [k for k in self.required if not (r.get(k) or "").strip()]
            if empty:
                raise TaskError(f"{path}:{n}: empty field(s) {empty}")
        if not 0 <= self.cfg.shots <= len(TRUTHFULQA_PRIMER):
            raise TaskError(f"{self.name}: shots must be in [0, {len(TRUTHFULQA_PRIMER)}] (QA primer pairs)")
        primer = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in TRUTHFULQA_PRIMER[: self.cfg.shots])
        idx = sample_indices(len(rows), limit, self.seed)
        out = []
        for i in idx:
            r = rows[i]
            correct = _split_answers(r["Correct Answers"])
            best = r["Best Answer"].strip()
            if best not in correct:
                correct = [best] + correct
            out.append(Item(str(i), f"{primer}Q: {r['Question'].strip()}\nA:",
                            {"best": best, "correct": correct, "incorrect": _split_answers(r["Incorrect Answers"])}))
        return out


class TruthfulQAMCTask(_TruthfulQABase):
    """MC1: best answer vs the incorrect ones; MC2: mass on the true answers. Each answer is scored
    with ``score_ids``: the question (with the primer) selects, the answer's tokens are scored sparse."""

    name = "truthfulqa_mc"
    metric_names = ("mc1", "mc2")

    def evaluate(self, lm, item, run, ref):
        ids = lm.encode(item.prompt)
        answers = item.data["correct"] + item.data["incorrect"]
        conts = [lm.tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in answers]
        outs, cost = score_choices_with(lm, run, item.id, ids, conts, prompt=item.prompt)
        lps = [float(o.token_logprobs.sum()) for o in outs]
        nc = len(item.data["correct"])
        correct, incorrect = lps[:nc], lps[nc:]
        best = correct[item.data["correct"].index(item.data["best"])]
        return {"mc1": M.mc1(best, incorrect), "mc2": M.mc2(correct, incorrect), **cost}


class TruthfulQAGenTask(_TruthfulQABase):
    name = "truthfulqa_gen"
    metric_names = ("rougeL_max", "rougeL_diff", "rougeL_acc")

    def evaluate(self, lm, item, run, ref):
        out, cost = generate_with(lm, run, item.id, item.prompt, self.cfg.max_new_tokens, ["\n"])
        pred = out.text.strip()
        r = M.rouge_truthful(pred, item.data["correct"], item.data["incorrect"], "rougeL")
        return {"prediction": pred, **r, **cost}


def _optional_rows(task: Task, limit, kind: str, example: str) -> tuple[list[dict], list[int]]:
    """Rows and sampled indices of a task whose data set ../shared/data does not have: a clear error until the
    user supplies one."""
    if not task.path.is_file():
        raise DataMissing(f"{task.name}: no {kind} data set is available locally ({task.path} not found). Put a jsonl "
                          f"with fields {', '.join(task.required)} there (e.g. {example}) or pass its path in "
                          f"tasks.{task.name}.file")
    rows = read_jsonl(task.path, task.required)
    return rows, sample_indices(len(rows), limit, task.seed)


class SummarizationTask(Task):
    name = "summarization"
    default_file = "cnn_dailymail/test.jsonl"
    required = ("article", "highlights")
    metric_names = ("rouge1", "rouge2", "rougeL")

    def items(self, lm, limit):
        rows, idx = _optional_rows(self, limit, "summarisation", "cnn_dailymail test")
        return [Item(str(i), f"Article: {rows[i]['article'].strip()}\n\nSummary:", {"reference": rows[i]["highlights"]})
                for i in idx]

    def evaluate(self, lm, item, run, ref):
        out, cost = generate_with(lm, run, item.id, item.prompt, self.cfg.max_new_tokens, ["\n\n"])
        return {"prediction": out.text.strip(), **M.rouge(out.text.strip(), item.data["reference"]), **cost}


class TranslationTask(Task):
    name = "translation"
    default_file = "wmt16_de_en/test.jsonl"
    required = ("source", "target")
    metric_names = ("bleu",)

    def items(self, lm, limit):
        rows, idx = _optional_rows(self, limit, "translation", "wmt16 de-en test")
        return [Item(str(i), f"Translate German to English.\nGerman: {rows[i]['source'].strip()}\nEnglish:",
                     {"reference": rows[i]["target"]}) for i in idx]

    def evaluate(self, lm, item, run, ref):
        out, cost = generate_with(lm, run, item.id, item.prompt, self.cfg.max_new_tokens, ["\n"])
        pred = out.text.strip()
        return {"prediction": pred, "reference": item.data["reference"], **cost}

    def aggregate(self, records):
        return {"bleu": M.bleu([r["prediction"] for r in records], [r["reference"] for r in records])}


TASKS: dict[str, type[Task]] = {
    t.name: t for t in (AgreementTask, WikiTextTask, NQOpenTask, GSM8KTask, TruthfulQAMCTask, TruthfulQAGenTask,
                        SummarizationTask, TranslationTask)
}

DEFAULT_TASK_CONFIG: dict[str, TaskConfig] = {
    "agreement": TaskConfig(continuation=32),
    "wikitext": TaskConfig(prefix=64, window=256),
    "nq_open": TaskConfig(shots=5, max_new_tokens=16),
    "gsm8k": TaskConfig(shots=4, max_new_tokens=160),
    "truthfulqa_mc": TaskConfig(shots=6),
    "truthfulqa_gen": TaskConfig(shots=6, max_new_tokens=40),
    "summarization": TaskConfig(max_new_tokens=96),
    "translation": TaskConfig(max_new_tokens=96),
}


def check_tasks(names: list[str]) -> list[str]:
    if not names:
        raise TaskError(f"no tasks given; choose from {', '.join(TASKS)}")
    for n in names:
        if n not in TASKS:
            raise TaskError(f"unknown task {n!r}; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise TaskError(f"task listed twice: {names}")
    return names


def make_task(name: str, cfg: TaskConfig | None, seed: int) -> Task:
    check_tasks([name])
    return TASKS[name](cfg or DEFAULT_TASK_CONFIG[name], seed)
