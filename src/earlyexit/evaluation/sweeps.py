"""Quality against layers saved as each method's knob turns, replayed on recorded traces.

Replaying is exact: a policy's exits depend only on the per-layer readouts, which the
reference pass recorded for every test prompt (the live runs are checked against replays
in the tests). So a sweep costs no model passes beyond the reference.
"""

from __future__ import annotations

import torch

from earlyexit.evaluation.runner import TaskEvaluation
from earlyexit.policies.adainfer import (
    calibrate_margin,
    first_exits,
    fit_adainfer,
    trace_features,
)
from earlyexit.policies.base import readout_features
from earlyexit.policies.raee import RAEEPolicy
from earlyexit.runtime.calibration import RAEE_SLACK

TOLERANCES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2)
THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
NEIGHBOURS = (1, 2, 4, 8, 12, 16, 24, 32, 48)
SLACKS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)


def _point(ev: TaskEvaluation, family: str, param: float, exits: torch.Tensor) -> dict:
    traces = ev.test_traces
    preds = traces[torch.arange(len(traces)), exits - 1].argmax(-1).tolist()
    task = ev.builder.task
    return {
        "task": task.name,
        "family": family,
        "param": param,
        "quality": task.score(preds, ev.gold),
        "avg_exit_layer": float(exits.float().mean()),
        "layers_saved": 1 - float(exits.float().mean()) / traces.shape[1],
    }


def sweep_task(ev: TaskEvaluation, families: tuple[str, ...] | None = None) -> list[dict]:
    """Points for static, confidence, AdaInfer (SVM, CRF tolerance), RAEE (k for both rules,
    slack for the reliable one)."""
    traces = ev.test_traces
    num, num_layers, _ = traces.shape
    families = families or (
        "static",
        "confidence",
        "adainfer",
        "adainfer-crf",
        "raee",
        "raee-paper",
        "raee-slack",
    )
    points = []
    if "static" in families:
        for layer in range(1, num_layers + 1):
            points.append(_point(ev, "static", layer, torch.full((num,), layer)))
    if "confidence" in families:
        gaps = torch.stack(
            [
                readout_features(traces[:, i], i + 1, num_layers)[:, 1]
                for i in range(num_layers - 1)
            ],
            dim=1,
        )
        for threshold in THRESHOLDS:
            points.append(_point(ev, "confidence", threshold, first_exits(gaps, threshold - 1e-9)))
    cal = ev.builder.calibration
    for family, stopper in (("adainfer", "svm"), ("adainfer-crf", "crf")):
        if family not in families or cal is None:
            continue
        policy = fit_adainfer(cal.traces, tolerance=None, stopper=stopper)
        cal_scores = policy.online_scores(trace_features(cal.traces))
        test_scores = policy.online_scores(trace_features(traces))
        for tolerance in TOLERANCES:
            margin = calibrate_margin(cal_scores, cal.traces, tolerance)
            points.append(_point(ev, family, tolerance, first_exits(test_scores, margin)))
    if cal is None or not any(f.startswith("raee") for f in families):
        return points
    database = ev.builder.database()
    queries = ev.builder.embedder.embed(ev.texts)

    def raee_exits(k: int, rule: str, slack: float) -> torch.Tensor:
        policy = RAEEPolicy(
            database, ev.builder.embedder, k, rule, num_classes=traces.shape[2], slack=slack
        )
        distances, ids = database.search(queries, k)
        return torch.from_numpy(policy.exits_from_neighbours(distances, ids))

    for family, rule, slack in (("raee", "reliable", RAEE_SLACK), ("raee-paper", "paper", 0.0)):
        if family in families:
            for k in (k for k in NEIGHBOURS if k <= database.size):
                points.append(_point(ev, family, k, raee_exits(k, rule, slack)))
    if "raee-slack" in families:  # the reliable rule at k=12, slack turned
        for slack in SLACKS:
            points.append(_point(ev, "raee-slack", slack, raee_exits(12, "reliable", slack)))
    return points
