"""ROUGE-L and exact match as in the published protocol.

* ROUGE-L: the LCS F-measure of ``rouge_score`` with the Porter stemmer and its default tokenizer
  (lower-case, non-alphanumerics become spaces), ``score(target=reference, prediction=response)``.
* Exact match: SQuAD-style normalisation (lower-case, strip punctuation, collapse whitespace;
  articles are kept, as in the published code).
* Per example: max over references. Corpus: mean x 100.
"""
from __future__ import annotations

import string
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(text.split())


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Max over references of the ROUGE-L F-measure, in [0, 1]."""
    if isinstance(references, str):
        references = [references]
    scorer = _scorer()
    return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference."""
    if isinstance(references, str):
        references = [references]
    pred = _normalize_answer(prediction)
    return float(any(pred == _normalize_answer(ref) for ref in references))


def compute_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus scores x 100: ``{"rougeL": .., "exact_match": ..}``.

    Raises:
        ValueError: if the two lists differ in length (the published code silently truncated).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        return {"rougeL": 0.0, "exact_match": 0.0}
    n = len(predictions)
    rl = sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) / n
    return {"rougeL": round(100 * rl, 4), "exact_match": round(100 * em, 4)}


def token_nll(logits, labels, ignore_index: int = -100):
    """Teacher-forced loss of each label token: the (B, T) cross-entropy of ``labels`` under
    ``logits`` (B, T, V), computed in fp32, 0 where the label is ``ignore_index``. The dev
    evaluation during training and the reference loss of ``code/evaluate.py`` both use it."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                           reduction="none").view_as(labels)
