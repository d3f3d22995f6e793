"""Generation metrics: ROUGE (rouge-score), BLEU (sacrebleu), SQuAD EM/F1, and agreement
with the full model's output (the quality measure that does not depend on how good the
small model is)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (stemmed); with several references, the best one."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = collections.Counter()
    for pred, refs in zip(predictions, references, strict=True):
        scores = [scorer.score(ref, pred) for ref in refs]
        for key in ("rouge1", "rouge2", "rougeL"):
            totals[key] += max(s[key].fmeasure for s in scores)
    n = max(1, len(predictions))
    return {key: totals[key] / n for key in ("rouge1", "rouge2", "rougeL")}


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults, 13a tokenisation), on a 0-100 scale."""
    import sacrebleu

    streams = [[refs[0] for refs in references]]
    return {"bleu": sacrebleu.corpus_bleu(list(predictions), streams).score}


def _normalize(text: str) -> str:
    # the official SQuAD v1.1 evaluation: lower case, drop punctuation, articles, spaces
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = _normalize(prediction).split(), _normalize(reference).split()
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and token F1 against the best reference answer (0-1 scale)."""
    em = f1 = 0.0
    for pred, refs in zip(predictions, references, strict=True):
        em += max(float(_normalize(pred) == _normalize(r)) for r in refs)
        f1 += max(_f1(pred, r) for r in refs)
    n = max(1, len(predictions))
    return {"em": em / n, "f1": f1 / n}


def task_scores(
    metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """All scores of a task's family; the main one is under the key `metric`."""
    if metric.startswith("rouge"):
        return rouge(predictions, references)
    if metric == "bleu":
        return bleu(predictions, references)
    if metric in ("f1", "em"):  # em: exact match after SQuAD's normalisation
        return squad(predictions, references)
    raise ValueError(f"unknown generation metric {metric}")


def token_agreement(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Fraction of positions (over the longer output) where the tokens are identical."""
    same = total = 0
    for out, ref in zip(outputs, reference, strict=True):
        same += sum(a == b for a, b in zip(out, ref, strict=False))
        total += max(len(out), len(ref))
    return same / max(1, total)
