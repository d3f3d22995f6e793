"""`earlyexit eval`: every method on the same examples, prompts and batch size, side by side.

One request, for one task:
1. Calibration: `calibration` training prompts (demonstrations excluded) run once at full
   depth; their last-position states feed the task probes (out-of-fold traces), the
   AdaInfer stoppers and the RAEE database.
2. The test prompts run once at full depth; their states give every layer's readout,
   which the sweeps replay.
3. The full model and each method run live, timed in interleaved rounds (batch i of every
   method in turn, so drift in machine speed hits all alike), rows leaving the batch as
   they exit; speedup = the full model's time / the method's time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.policies import FullPolicy
from earlyexit.policies.base import ExitPolicy
from earlyexit.readouts.probe import TaskProbe
from earlyexit.readouts.readout import ExitReadout
from earlyexit.risk import bootstrap_ci, speedup_ci
from earlyexit.runtime.calibration import (
    EvalConfig,
    MethodBuilder,
    calibrate,
    check_methods,
    needs_calibration,
)
from earlyexit.runtime.classification import (
    PolicyRun,
    PolicyRunner,
    Readout,
    collect_states,
    readout_traces,
    run_policy,
)
from earlyexit.tasks.base import Task
from earlyexit.tasks.metrics import accuracy

REFERENCE = "(full reference)"


def run_interleaved(runners: dict[str, PolicyRunner]) -> dict[str, PolicyRun]:
    """Round i runs batch i of every runner in turn; returns each runner's totals."""
    rounds = max(len(r.groups) for r in runners.values())
    for index in tqdm(range(rounds), desc="timed runs", leave=False):
        for runner in runners.values():
            if index < len(runner.groups):
                runner.run_group(index)
    return {name: runner.result() for name, runner in runners.items()}


def quality_ci(task: Task, predictions: list[int], gold: list[int]) -> list[float]:
    """95% bootstrap interval of the task's metric over the test examples."""
    preds, labels = np.asarray(predictions), np.asarray(gold)
    return bootstrap_ci(
        np.arange(len(labels)),
        lambda rows: task.score(preds[rows].tolist(), labels[rows].tolist()),
    )


@dataclass
class TaskEvaluation:
    records: list[dict]
    test_traces: torch.Tensor  # [N, L, C] per-layer readout of every test prompt
    gold: list[int]
    builder: MethodBuilder
    texts: list[str] = field(default_factory=list)
    readout: Readout | None = None
    policies: dict[str, ExitPolicy] = field(default_factory=dict)

    def save_artifacts(self, directory: Path) -> list[Path]:
        """Save what was fitted here, to be loaded without recalibrating: the task probe,
        each AdaInfer stopper (JSON) and the RAEE database (FAISS index included)."""
        task_dir = Path(directory) / self.builder.task.name
        written = []
        if isinstance(self.readout, TaskProbe):
            written.append(self.readout.save(task_dir / "probe"))
        for spec, policy in self.policies.items():
            if hasattr(policy, "save"):
                path = task_dir / f"{spec.replace(':', '_')}.json"
                policy.save(path)
                written.append(path)
        if self.builder.built_database is not None:
            written.append(self.builder.built_database.save(task_dir / "raee-database"))
        return written


def evaluate_task(
    engine: LayerEngine,
    general: ExitReadout,
    task: Task,
    methods: list[str],
    config: EvalConfig,
) -> TaskEvaluation:
    check_methods(methods)
    demos = task.demonstrations(config.shots, config.seed)
    examples = task.test_sample(config.limit, config.seed, config.sample)
    if not examples:
        raise EarlyExitError(f"task '{task.name}' has no test examples")
    prompts = [task.prompt(ex, demos) for ex in examples]
    texts = [ex.text for ex in examples]
    gold = [ex.label for ex in examples]
    candidates = task.label_token_ids(engine.tokenizer)
    readout: Readout = general
    calibration = None
    if needs_calibration(methods, config):
        readout, calibration = calibrate(engine, general, task, demos, candidates, config)
    builder = MethodBuilder(engine, general, task, config, calibration)
    policies = {spec: builder.build(spec) for spec in methods}  # fit before timing anything

    # the test prompts' states: the full model's answers and every layer's readout
    states = collect_states(engine, prompts, config.batch)
    test_traces = readout_traces(readout, states, candidates)

    # warm-up, then the full model and every method timed in interleaved rounds
    run_policy(engine, readout, prompts[: config.batch], candidates, FullPolicy(), config.batch)
    runners = {
        REFERENCE: PolicyRunner(
            engine, readout, prompts, candidates, FullPolicy(), config.batch, texts
        )
    }
    for spec, policy in policies.items():
        runners[spec] = PolicyRunner(
            engine, readout, prompts, candidates, policy, config.batch, texts, general
        )
    runs = run_interleaved(runners)
    reference = runs[REFERENCE]
    full_predictions = reference.predictions
    full_quality = task.score(full_predictions, gold)
    records = []
    for spec, policy in policies.items():
        run = runs[spec]
        avg_exit = float(np.mean(run.exit_layers))
        records.append(
            {
                "task": task.name,
                "method": spec,
                "policy": policy.describe(),
                # Learn-then-Test's choice of the knob, when --risk chose it
                "ltt": builder.ltt[spec].to_dict() if spec in builder.ltt else None,
                "readout": config.readout,
                "n": len(examples),
                # which rows of the test file were scored, in sample order
                "sample": config.sample,
                "rows": [ex.row for ex in examples],
                "shots": config.shots,
                "batch": config.batch,
                "calibration": len(calibration.examples) if calibration else 0,
                "metric": task.metric,
                "quality": task.score(run.predictions, gold),
                "quality_ci": quality_ci(task, run.predictions, gold),
                "full_quality": full_quality,
                "agreement_with_full": accuracy(run.predictions, full_predictions),
                "avg_exit_layer": avg_exit,
                "num_layers": engine.num_layers,
                "layers_saved": 1 - avg_exit / engine.num_layers,
                "ideal_speedup": engine.num_layers / avg_exit,
                "speedup": reference.seconds / run.seconds,
                "speedup_ci": speedup_ci(
                    reference.round_seconds,
                    run.round_seconds,
                    run.seconds - sum(run.round_seconds),  # planning (RAEE's retrieval)
                ),
                "decision_overhead": run.decision_seconds / run.seconds,
                "seconds": run.seconds,
                "full_seconds": reference.seconds,
            }
        )
    return TaskEvaluation(records, test_traces, gold, builder, texts, readout, policies)
