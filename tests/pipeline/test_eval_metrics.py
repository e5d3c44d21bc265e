"""Evaluation metric functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from coreinfer.pipeline.evaluate import metrics as M


def test_normalize_answer_squad_rules():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.normalize_answer("An apple a day") == "apple day"


def test_exact_match_any_gold():
    assert M.exact_match("the Eiffel Tower.", ["eiffel tower", "paris"]) == 1.0
    assert M.exact_match("Eiffel", ["eiffel tower"]) == 0.0
    with pytest.raises(ValueError):
        M.exact_match("x", [])


def test_f1_hand_computed():
    # pred tokens {a1, b, c} vs gold {b, c, d}: precision 2/3, recall 2/3 -> F1 2/3
    assert M.f1_score("a1 b c", "b c d") == pytest.approx(2 / 3)
    # best over golds; articles are dropped before counting
    assert M.f1_score("the blue whale", ["whale", "blue whale"]) == pytest.approx(1.0)
    # "red blue whale" vs "blue whale": p = 2/3, r = 1 -> 0.8
    assert M.f1_score("red blue whale", "blue whale") == pytest.approx(0.8)
    assert M.f1_score("", "x") == 0.0


def test_gsm8k_extraction():
    assert M.extract_gsm8k_answer("so she has 3 + 4 = 7 apples.\n#### 1,234") == "1234"
    assert M.extract_gsm8k_answer("Thus the answer is $5.") == "5"
    assert M.extract_gsm8k_answer("3 apples and 7 pears") == "7"
    assert M.extract_gsm8k_answer("-2.50 dollars") == "-2.5"
    assert M.extract_gsm8k_answer("no digits here") is None
    assert M.gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 72") == "72"
    assert M.gsm8k_correct("... so 72 in total", "#### 72") == 1.0
    assert M.gsm8k_correct("#### 71", "#### 72") == 0.0
    with pytest.raises(ValueError, match="####"):
        M.gsm8k_gold("72")


def test_mc1_mc2_hand_computed():
    assert M.mc1(-1.0, [-2.0, -3.0]) == 1.0
    assert M.mc1(-2.0, [-1.0, -3.0]) == 0.0
    assert M.mc1(-1.0, [-1.0]) == 0.0  # a tie is not a win
    # p(correct) = 0.2 + 0.3, p(incorrect) = 0.5 -> 0.5
    assert M.mc2([math.log(0.2), math.log(0.3)], [math.log(0.5)]) == pytest.approx(0.5)
    # 0.6 vs 0.2 + 0.1 + 0.1 -> 0.6
    assert M.mc2([math.log(0.6)], [math.log(0.2), math.log(0.1), math.log(0.1)]) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        M.mc2([], [0.0])


def test_rouge_and_bleu():
    assert M.rouge("the cat sat", "the cat sat")["rougeL"] == pytest.approx(1.0)
    # unigrams {cat, dog} vs {cat, bird}: P = R = 1/2
    assert M.rouge("cat dog", "cat bird", ["rouge1"])["rouge1"] == pytest.approx(0.5)
    r = M.rouge_truthful("cats have four legs", ["cats have four legs"], ["cats have three legs"], "rougeL")
    assert r["rougeL_max"] == pytest.approx(1.0)
    assert r["rougeL_acc"] == 1.0
    # 'cats have three legs' vs 'cats have four legs': LCS 3 of 4 -> 0.75
    assert r["rougeL_diff"] == pytest.approx(1.0 - 0.75)
    assert M.bleu(["the quick brown fox jumps"], ["the quick brown fox jumps"]) == pytest.approx(100.0)
    assert M.bleu(["zzz yyy xxx www"], ["the quick brown fox"]) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        M.bleu(["a"], [])


def test_perplexity_agreement_kl():
    assert M.perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        M.perplexity(1.0, 0)
    assert M.top1_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        M.top1_agreement([1, 2], [1])
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(M.kl_divergence(p, q)[0]) == pytest.approx(expected)
    assert float(M.kl_divergence(p, p)[0]) == pytest.approx(0.0)
    # a zero-probability reference entry contributes nothing (no nan)
    p0 = torch.tensor([[1.0, 0.0]]).log()
    assert float(M.kl_divergence(p0, q)[0]) == pytest.approx(math.log(1 / 0.25))
