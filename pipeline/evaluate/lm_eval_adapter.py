"""lm-evaluation-harness adapter (optional extra: ``pip install coreinfer[lm-eval]``).

Registers the model ``coreinfer`` with lm-eval's registry when this module is imported. lm-eval has no
plugin discovery, so run it through this module, which imports the adapter and then hands over to
lm-eval's own command line::

    python -m coreinfer.pipeline.evaluate.lm_eval_adapter --model coreinfer \\
        --model_args model=smollm2-135m,method=stability,beta=0.4 \\
        --tasks coreinfer_truthfulqa_mc2 --include_path <dir from `tasks` below> --limit 20

    python -m coreinfer.pipeline.evaluate.lm_eval_adapter tasks --out lm_eval_tasks
        # writes lm-eval task configs for the shared data sets (absolute paths to ../shared/data)

How each request type is served (the sparse FFN is applied to every scored or generated token):
  loglikelihood        ``SparseLM.score_ids``: the context selects the core set (dense prefill), the
                       continuation is scored through the compact FFN
  generate_until       ``SparseLM.generate``: the context selects, every generated token is sparse
  loglikelihood_rolling the first ``rolling_prefix`` tokens of each document select the core set; they
                       have no earlier context, so their own log-probs come from that dense prefill,
                       every later token is scored sparse (``rolling_prefix=0`` refuses rolling requests)

model_args: model, method (dense, stability, similarity, auto, static, griffin, random, oracle-token),
alpha, beta (the kept fraction), layers, score (magnitude (default) | positive), artifact, seed, dtype, device,
max_gen_toks, rolling_prefix.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    HAVE_LM_EVAL = True
except ImportError:  # lm-eval is an optional extra
    HAVE_LM_EVAL = False
    LM = object

    def register_model(*names):
        return lambda cls: cls


from coreinfer.runtime.sparse_lm import DEFAULT_SCORE

from . import methods as MM

ADAPTER_METHODS = ("dense", "stability", "similarity", "auto", "static", "griffin", "random", "oracle-token")


def _require_lm_eval() -> None:
    if not HAVE_LM_EVAL:
        raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'coreinfer[lm-eval]'")


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")


@register_model("coreinfer")
class CoreInferLM(LM):
    """A ``SparseLM`` behind lm-eval's LM interface; one request at a time (batch size 1)."""

    def __init__(self, model: str = "smollm2-135m", method: str = "stability", alpha: float = 0.4, beta: float = 0.4,
                 layers: str | None = None, score: str = DEFAULT_SCORE, artifact: str | None = None, seed: int = 0,
                 dtype: str | None = None, device: str | None = None, max_gen_toks: int = 256,
                 rolling_prefix: int = 64, lm=None, **_harness_kwargs):
        _require_lm_eval()
        super().__init__()
        if method not in ADAPTER_METHODS:
            hint = " (it needs the evaluation profile: use `coreinfer eval`)" if method in MM.METHODS else ""
            raise ValueError(f"lm-eval adapter: unknown method {method!r}{hint}; choose from {', '.join(ADAPTER_METHODS)}")
        MM.check_methods([method], artifact is not None or (lm is not None and lm.artifact is not None))
        if lm is None:
            from .runner import EvalConfig, load_model

            if device in ("cuda", "cuda:0") and not torch.cuda.is_available():
                # lm-eval passes its own default device ("cuda:0") whether or not the user chose it
                print("coreinfer lm-eval adapter: no CUDA GPU, running on cpu", file=sys.stderr)
                device = "cpu"
            lm = load_model(EvalConfig(model=model, artifact=artifact, dtype=dtype, device=device or None))
        self.lm = lm
        self.layers = lm.resolve_layers(layers)
        self.ctx = MM.MethodContext(lm, self.layers, float(alpha), int(seed), artifact=lm.artifact)
        kept = 1.0 if method == "dense" else float(beta)
        self.run = MM.MethodRun(method, kept, score if MM.METHODS[method].uses_score else None, self.ctx)
        self.max_gen_toks = int(max_gen_toks)
        self.rolling_prefix = int(rolling_prefix)
        self._n = 0

    # ---- helpers ---------------------------------------------------------------------------------
    def _item_id(self) -> str:
        self._n += 1
        return f"lm-eval-{self._n}"

    def _context_ids(self, context: str) -> torch.Tensor:
        tok = self.lm.tokenizer
        if context:
            return self.lm.encode(context)
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError("empty context and the tokenizer has neither BOS nor EOS to start from")
        return torch.tensor([[start]], dtype=torch.long, device=self.lm.device)

    def _score(self, ids: torch.Tensor, cont: list[int]):
        from .tasks import score_with

        return score_with(self.lm, self.run, self._item_id(), ids, cont)[0]

    # ---- lm-eval interface -----------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="coreinfer loglikelihood"):
            context, continuation = req.args
            ids = self._context_ids(context)
            cont = self.lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not cont:
                out.append((0.0, True))
                continue
            res = self._score(ids, cont)
            out.append((float(res.token_logprobs.sum()), list(res.greedy_ids) == list(cont)))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        if self.rolling_prefix < 1:
            raise ValueError("loglikelihood_rolling needs rolling_prefix >= 1 (tokens that choose the core set)")
        from tqdm.auto import tqdm

        out = []
        tok = self.lm.tokenizer
        for req in tqdm(requests, disable=disable_tqdm, desc="coreinfer rolling"):
            (text,) = req.args[:1]
            toks = tok(text, add_special_tokens=False)["input_ids"]
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            seq = ([start] if start is not None else []) + toks
            if len(seq) < 2:
                out.append(0.0)
                continue
            p = min(self.rolling_prefix, len(seq) - 1)
            total = 0.0
            if p > 1:  # the selecting prefix: no earlier context, scored by the dense model itself
                dense = self.lm.score_ids(torch.tensor([seq[:1]], device=self.lm.device), seq[1:p], "dense", 0.4, 1.0,
                                          self.layers)
                total += float(dense.token_logprobs.sum())
            res = self._score(torch.tensor([seq[:p]], device=self.lm.device), seq[p:])
            total += float(res.token_logprobs.sum())
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        from tqdm.auto import tqdm

        from .tasks import generate_with

        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="coreinfer generate"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            if _bool(kwargs.get("do_sample", False)):
                raise ValueError("coreinfer lm-eval adapter: sampling is not supported; use greedy tasks (do_sample: false)")
            gen, _ = generate_with(self.lm, self.run, self._item_id(), context, max_new, until)
            out.append(gen.text)
        return out


# ---------------------------------------------------------------------------------------------------
# local task configs for the shared data


def task_configs(data_dir: Path) -> dict[str, str]:
    """lm-eval task YAML texts for the shared data files (absolute paths)."""
    tqa = data_dir / "truthfulqa" / "TruthfulQA.csv"
    nq = data_dir / "nq_open" / "NQ-open.dev.jsonl"
    gsm = data_dir / "gsm8k" / "test.jsonl"
    return {
        "coreinfer_truthfulqa_mc1.yaml": f"""task: coreinfer_truthfulqa_mc1
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {tqa}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{Question}}}}\\nA:"
doc_to_choice: !function utils.mc1_choices
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
        "coreinfer_nq_open.yaml": f"""task: coreinfer_nq_open
dataset_path: json
dataset_kwargs:
  data_files:
    test: {nq}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}?\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 16
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: !function utils.nq_exact_match
    aggregation: mean
    higher_is_better: true
""",
        "coreinfer_gsm8k.yaml": f"""task: coreinfer_gsm8k
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gsm}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:", "\\n\\n"]
  do_sample: false
  max_gen_toks: 160
metric_list:
  - metric: !function utils.gsm8k_accuracy
    aggregation: mean
    higher_is_better: true
""",
        "utils.py": '''"""Helpers of the coreinfer lm-eval task configs (written by coreinfer's lm_eval_adapter)."""
from coreinfer.pipeline.evaluate import metrics as M


def _split(s):
    return [a.strip() for a in s.split(";") if a.strip()]


def mc1_choices(doc):
    best = doc["Best Answer"].strip()
    return [" " + best] + [" " + a for a in _split(doc["Incorrect Answers"])]


def nq_exact_match(references, predictions):
    golds = references[0] if isinstance(references[0], list) else references
    return M.exact_match(predictions[0], golds)


def gsm8k_accuracy(references, predictions):
    return M.gsm8k_correct(predictions[0], references[0])
''',
    }


def write_task_configs(out: str | Path, data_dir: Path | None = None) -> list[Path]:
    from .tasks import data_dir as default_data_dir

    d = Path(data_dir) if data_dir else default_data_dir()
    if not d.is_dir():
        raise FileNotFoundError(f"data folder {d} not found; set COREINFER_DATA or put the shared data there")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in task_configs(d).items():
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tasks"]:
        import argparse

        p = argparse.ArgumentParser(prog="python -m coreinfer.pipeline.evaluate.lm_eval_adapter tasks")
        p.add_argument("--out", required=True, help="folder for the task YAMLs (pass it to lm-eval's --include_path)")
        p.add_argument("--data", help="data folder (default ../shared/data or $COREINFER_DATA)")
        a = p.parse_args(argv[1:])
        for path in write_task_configs(a.out, Path(a.data) if a.data else None):
            print(path)
        return 0
    if not HAVE_LM_EVAL:  # --help included: lm-eval's own options come from lm-eval
        print("coreinfer lm-eval: error: needs lm-evaluation-harness: pip install 'coreinfer[lm-eval]'", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval"] + argv
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
