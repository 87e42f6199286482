"""ROUGE-L / exact match on hand-checked cases, and corpus aggregation (the published protocol)."""
from __future__ import annotations

import re

import pytest

from mckd.evaluation.metrics import compute_metrics, exact_match, rouge_l
from mckd.evaluation.runner import summarize


def _lcs(a: list[str], b: list[str]) -> int:
    """Plain dynamic-programming LCS length (oracle)."""
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def _f1_no_stem(pred: str, ref: str) -> float:
    """ROUGE-L F1 with rouge-score's tokenisation but no stemming (valid for stem-invariant words)."""
    tok = lambda s: re.sub(r"[^a-z0-9]+", " ", s.lower()).split()  # noqa: E731
    p, r = tok(pred), tok(ref)
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def test_identical_is_one_and_hand_computed_overlap():
    assert rouge_l("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0)
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" = 5 of 6 words each.
    assert rouge_l("the cat sat on the mat", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # 2 of 3 prediction words, 2 of 5 reference words: F = 2PR/(P+R) = 2*(2/3)*(2/5)/(2/3+2/5) = 0.5.
    assert rouge_l("red green blue", ["red and green or yellow"]) == pytest.approx(0.5)
    assert rouge_l("red green blue", ["red and green or yellow"]) == pytest.approx(
        _f1_no_stem("red green blue", "red and green or yellow"))


def test_order_matters_for_lcs():
    # LCS of "a b c d" and "d c b a" is 1 word: P = R = 1/4.
    assert rouge_l("alpha beta gamma delta", ["delta gamma beta alpha"]) == pytest.approx(0.25)


def test_stemming_is_applied():
    # Porter: running -> run, dogs -> dog; without stemming the overlap would be 0.
    assert rouge_l("running dogs", ["run dog"]) == pytest.approx(1.0)
    assert _f1_no_stem("running dogs", "run dog") == 0.0


def test_punctuation_and_case_are_ignored():
    assert rouge_l("Hello, World!!!", ["hello world"]) == pytest.approx(1.0)
    assert rouge_l("e-mail: test@x.org", ["e mail test x org"]) == pytest.approx(1.0)
    assert rouge_l("?!...", ["hello"]) == 0.0


def test_empty_prediction_and_non_latin_score_zero():
    assert rouge_l("", ["a reference answer"]) == 0.0
    assert rouge_l("   ", ["a reference answer"]) == 0.0
    # The default rouge-score tokenizer keeps only [a-z0-9]: non-Latin text scores 0.
    assert rouge_l("你好世界", ["你好世界"]) == 0.0


def test_max_over_references():
    refs = ["completely unrelated words here", "the cat is on the mat", "cat"]
    scores = [rouge_l("the cat sat on the mat", [r]) for r in refs]
    assert rouge_l("the cat sat on the mat", refs) == pytest.approx(max(scores))
    assert max(scores) == pytest.approx(5 / 6)
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)  # bare string


def test_exact_match_normalisation_keeps_articles():
    assert exact_match("The Cat.", ["the cat"]) == 1.0
    assert exact_match("  the   cat ", ["The cat!"]) == 1.0
    assert exact_match("the cat", ["cat"]) == 0.0  # articles are not removed (published behaviour)
    assert exact_match("dog", ["cat", "Dog"]) == 1.0


def test_corpus_mean_times_100_rounded():
    preds = ["the cat sat on the mat", "", "red green blue"]
    refs = [["the cat is on the mat"], ["x"], ["red and green or yellow", "red green blue"]]
    m = compute_metrics(preds, refs)
    assert m["rougeL"] == round(100 * (5 / 6 + 0 + 1) / 3, 4)
    assert m["exact_match"] == round(100 * (0 + 0 + 1) / 3, 4)
    with pytest.raises(ValueError):
        compute_metrics(preds, refs[:2])


def test_runner_summary_matches_compute_metrics():
    preds = ["the cat sat on the mat", "hello", "Dog!", "running dogs"]
    refs = [["the cat is on the mat"], ["bye"], ["cat", "dog"], ["run dog", "z"]]
    records = [{"rougeL": rouge_l(p, r), "exact_match": exact_match(p, r), "gen_len": n, "lm_loss": 1.0 + n}
               for n, (p, r) in enumerate(zip(preds, refs))]
    s = summarize(records)
    m = compute_metrics(preds, refs)
    assert s["rougeL"] == m["rougeL"] and s["exact_match"] == m["exact_match"]
    assert s["avg_gen_len"] == pytest.approx(1.5) and s["n"] == 4
    assert s["lm_loss"] == pytest.approx(2.5)
