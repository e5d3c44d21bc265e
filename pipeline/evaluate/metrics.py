"""Metric functions of the quality evaluation (pure functions: strings, floats and tensors in, floats out).

Conventions follow the usual references so numbers are comparable:
  * exact match / F1: SQuAD normalisation (lower case, no punctuation, no articles, single spaces),
    best score over all gold answers;
  * GSM8K: the number after ``####`` (or "The answer is N"), else the last number in the text;
  * TruthfulQA MC1: the best answer must out-score every incorrect answer; MC2: normalised probability
    mass on the true answers (log-probs summed over each answer's tokens, as in the TruthfulQA paper);
  * ROUGE via ``rouge-score`` (with stemming), BLEU via ``sacrebleu``.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# open-domain QA


_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("at least one gold answer is needed")
    return golds


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in _golds(golds)))


def _token_f1(prediction: str, gold: str) -> float:
    p, g = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: str | Sequence[str]) -> float:
    """Best SQuAD token F1 of the prediction against any gold answer."""
    return max(_token_f1(prediction, g) for g in _golds(golds))


# ---------------------------------------------------------------------------------------------------
# GSM8K


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _clean_number(s: str) -> str | None:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def gsm8k_gold(answer: str) -> str:
    """The reference number of a GSM8K solution (text after ``####``)."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' final answer: {answer[-80:]!r}")
    num = _clean_number(answer.split("####")[-1])
    if num is None:
        raise ValueError(f"GSM8K final answer is not a number: {answer.split('####')[-1]!r}")
    return num


def extract_gsm8k_answer(text: str) -> str | None:
    """The model's final number: after ``####``, else after "answer is", else the last number; None if none."""
    for pat in (r"####\s*(" + _NUMBER + ")", r"answer is[:\s]*(" + _NUMBER + ")"):
        m = re.search(pat, text, flags=re.IGNORECASE)
        if m:
            return _clean_number(m.group(1))
    nums = re.findall(_NUMBER, text)
    return _clean_number(nums[-1]) if nums else None


def gsm8k_correct(generated: str, gold_answer: str) -> float:
    pred = extract_gsm8k_answer(generated)
    return float(pred is not None and pred == gsm8k_gold(gold_answer))


# ---------------------------------------------------------------------------------------------------
# multiple choice (TruthfulQA)


def mc1(best_logprob: float, incorrect_logprobs: Sequence[float]) -> float:
    """1.0 if the best answer scores strictly higher than every incorrect answer."""
    if not incorrect_logprobs:
        raise ValueError("MC1 needs at least one incorrect answer")
    return float(best_logprob > max(incorrect_logprobs))


def mc2(correct_logprobs: Sequence[float], incorrect_logprobs: Sequence[float]) -> float:
    """Probability mass on the true answers, normalised over true + false answers."""
    if not correct_logprobs or not incorrect_logprobs:
        raise ValueError("MC2 needs at least one correct and one incorrect answer")
    c = torch.logsumexp(torch.tensor(list(correct_logprobs), dtype=torch.float64), 0)
    i = torch.logsumexp(torch.tensor(list(incorrect_logprobs), dtype=torch.float64), 0)
    return float(torch.exp(c - torch.logaddexp(c, i)))


# ---------------------------------------------------------------------------------------------------
# ROUGE / BLEU


def rouge(prediction: str, reference: str, kinds: Iterable[str] = ("rouge1", "rouge2", "rougeL")) -> dict[str, float]:
    """ROUGE F-measures (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    kinds = list(kinds)
    scores = rouge_scorer.RougeScorer(kinds, use_stemmer=True).score(reference, prediction)
    return {k: float(scores[k].fmeasure) for k in kinds}


def rouge_truthful(prediction: str, correct: Sequence[str], incorrect: Sequence[str], kind: str = "rougeL") -> dict[str, float]:
    """TruthfulQA generation: best ROUGE against the true answers, minus the best against the false ones."""
    if not correct or not incorrect:
        raise ValueError("need at least one correct and one incorrect reference")
    best_c = max(rouge(prediction, r, [kind])[kind] for r in correct)
    best_i = max(rouge(prediction, r, [kind])[kind] for r in incorrect)
    return {f"{kind}_max": best_c, f"{kind}_diff": best_c - best_i, f"{kind}_acc": float(best_c > best_i)}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing off)."""
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


# ---------------------------------------------------------------------------------------------------
# language modelling / agreement with dense


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / tokens)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / n_tokens)


def top1_agreement(reference_ids: Sequence[int], other_ids: Sequence[int]) -> float:
    """Fraction of positions where two argmax sequences agree."""
    if len(reference_ids) != len(other_ids) or not reference_ids:
        raise ValueError(f"need two equally long, non-empty sequences, got {len(reference_ids)} and {len(other_ids)}")
    return sum(int(a == b) for a, b in zip(reference_ids, other_ids)) / len(reference_ids)


def kl_divergence(ref_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || other) in nats from two (N, V) log-softmax tensors; returns (N,)."""
    if ref_logprobs.shape != other_logprobs.shape or ref_logprobs.dim() != 2:
        raise ValueError(f"need two (N, V) tensors of one shape, got {tuple(ref_logprobs.shape)} and {tuple(other_logprobs.shape)}")
    p = ref_logprobs.double()
    q = other_logprobs.double()
    term = torch.where(torch.isneginf(p), torch.zeros_like(p), p.exp() * (p - q))
    return term.sum(-1).clamp_min(0.0)


def mean(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean of no values")
    return sum(vals) / len(vals)
