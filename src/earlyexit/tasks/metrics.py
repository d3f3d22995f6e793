"""Task metrics over class indices (accuracy; Matthews correlation for CoLA, as GLUE reports)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from earlyexit.errors import EarlyExitError


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p == y) for p, y in zip(predictions, labels, strict=True)) / len(labels)


def mcc(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when a side is constant."""
    classes = sorted(set(labels) | set(predictions))
    n = len(labels)
    correct = sum(int(p == y) for p, y in zip(predictions, labels, strict=True))
    pred_counts = [sum(int(p == c) for p in predictions) for c in classes]
    true_counts = [sum(int(y == c) for y in labels) for c in classes]
    cov_py = correct * n - sum(p * t for p, t in zip(pred_counts, true_counts, strict=True))
    cov_pp = n * n - sum(p * p for p in pred_counts)
    cov_yy = n * n - sum(t * t for t in true_counts)
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return cov_py / math.sqrt(cov_pp * cov_yy)


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    scores = []
    for c in sorted(set(labels)):
        tp = sum(int(p == c and y == c) for p, y in zip(predictions, labels, strict=True))
        fp = sum(int(p == c and y != c) for p, y in zip(predictions, labels, strict=True))
        fn = sum(int(p != c and y == c) for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


METRICS = {"accuracy": accuracy, "mcc": mcc, "macro_f1": macro_f1}


def compute_metric(name: str, predictions: Sequence[int], labels: Sequence[int]) -> float:
    if name not in METRICS:
        raise EarlyExitError(f"unknown metric '{name}': use one of {', '.join(METRICS)}")
    if len(predictions) != len(labels) or not labels:
        raise EarlyExitError(
            f"metric needs as many predictions as labels (got {len(predictions)} and {len(labels)})"
        )
    return float(METRICS[name](predictions, labels))
