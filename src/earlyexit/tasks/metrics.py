"""Task metrics over class indices (accuracy; Matthews correlation for CoLA, as GLUE reports).

Thin names over `sklearn.metrics`, so a task's metric is the one every other tool reports.
"""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from earlyexit.errors import EarlyExitError


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    return float(accuracy_score(list(labels), list(predictions)))


def mcc(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004); 0 when a side is constant."""
    if len(set(labels) | set(predictions)) < 2:
        return 0.0  # one class on both sides: sklearn also says 0, after a shape warning
    return float(matthews_corrcoef(list(labels), list(predictions)))


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Mean F1 over the classes present in the labels (a predicted-only class is not averaged)."""
    return float(
        f1_score(
            list(labels),
            list(predictions),
            labels=sorted(set(labels)),
            average="macro",
            zero_division=0.0,
        )
    )


METRICS = {"accuracy": accuracy, "mcc": mcc, "macro_f1": macro_f1}


def compute_metric(name: str, predictions: Sequence[int], labels: Sequence[int]) -> float:
    if name not in METRICS:
        raise EarlyExitError(f"unknown metric '{name}': use one of {', '.join(METRICS)}")
    if len(predictions) != len(labels) or not labels:
        raise EarlyExitError(
            f"metric needs as many predictions as labels (got {len(predictions)} and {len(labels)})"
        )
    return float(METRICS[name](predictions, labels))
