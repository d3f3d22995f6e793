"""`earlyexit eval`: every method on the same examples, prompts and batch size, side by side.

One request, for one task:
1. Calibration: `calibration` training prompts (demonstrations excluded) run once at full
   depth; their last-position states feed the task probes (out-of-fold traces), the
   AdaInfer stoppers and the RAEE database.
2. The test prompts run once at full depth; their states give every layer's readout,
   which the sweeps replay.
3. The full model and each method run live, timed in interleaved rounds (batch i of every
   method in turn, so drift in machine speed hits all alike; the order rotates every
   round, so no method always runs first or always right after the same one), each
   warmed up on its own first batch beforehand, rows leaving the batch as they exit;
   speedup = the full model's time / the method's time.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
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
)
from earlyexit.tasks.base import Task
from earlyexit.tasks.metrics import accuracy

REFERENCE = "(full reference)"


def round_orders(count: int, rounds: int) -> list[list[int]]:
    """Which runner (0..count-1) runs in which position of each timed round.

    Rows of a Williams design (a Latin square balanced for carry-over; for an odd count the
    square and its mirror), taken in turn from round 0: every `count` consecutive rounds
    from the start put every runner in every position once, so each runner holds each
    position as often as `rounds` allows (counts differ by one at most), and each runner
    follows each other one about equally often. A fixed order gives one runner every
    round's first slot and another always the slot right after it, so whatever makes a
    slot faster or slower (what the run before left in the allocator and the caches, drift
    within a round) lands on the same runners every round."""
    if count < 1:
        return [[] for _ in range(rounds)]
    first = [0] + [(k + 1) // 2 if k % 2 else count - k // 2 for k in range(1, count)]
    square = [[(symbol + shift) % count for symbol in first] for shift in range(count)]
    if count % 2:  # odd: the mirrored rows balance who follows whom
        square += [row[::-1] for row in square]
    return [square[index % len(square)] for index in range(rounds)]


@contextmanager
def collector_paused() -> Iterator[None]:
    """A full collection (untimed), then the cyclic garbage collector off until the block
    ends, as `timeit` does: else a collection is paid by whichever timed run happens to
    cross its threshold. Per round, so garbage cannot pile up over a long run."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def collector_frozen() -> Iterator[None]:
    """What exists before a run's rounds (models, tokenizers, the test harness: millions
    of objects) moved out of the collector's sight for the run (`gc.freeze`), so that each
    round's full collection scans only what the run made since: 0.6 s less per round in a
    process that holds a model and the test suite, and no change to what is timed."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_interleaved(runners: dict[str, PolicyRunner], warm_up: bool = True) -> dict[str, PolicyRun]:
    """Round i runs batch i of every runner, in an order that changes every round
    (`round_orders`); returns each runner's totals.

    With `warm_up`, every runner first runs its own first batch once, untimed and
    unrecorded, so that the first-call costs of its code path (a stopper's first call,
    lazy imports, buffers and allocator pools growing to size) fall in no timed round.
    Each round runs with the garbage collector paused (`collector_paused`)."""
    names = list(runners)
    rounds = max((len(runner.groups) for runner in runners.values()), default=0)
    if warm_up:
        for runner in runners.values():
            runner.warm_up()
    orders = round_orders(len(names), rounds)
    with collector_frozen():
        for index, order in enumerate(tqdm(orders, desc="timed runs", leave=False)):
            with collector_paused():
                for position in order:
                    runner = runners[names[position]]
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

    # the full model and every method timed in interleaved rounds, each warmed up first
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
