"""`earlyexit eval`: every method on the same examples, prompts and batch size, side by side."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.evaluation.classify import PolicyRun, run_policy, trace_layers
from earlyexit.policies import AdaInferPolicy, ConfidencePolicy, FullPolicy, StaticPolicy
from earlyexit.policies.adainfer import fit_adainfer
from earlyexit.policies.base import ExitPolicy
from earlyexit.readouts.readout import ExitReadout
from earlyexit.tasks.base import Task
from earlyexit.tasks.metrics import accuracy

METHODS = ("full", "static:K", "confidence:T", "adainfer")


@dataclass
class EvalConfig:
    shots: int = 4
    limit: int | None = 200
    seed: int = 0
    batch: int = 8
    calibration: int = 100  # train-split examples used to fit AdaInfer


class MethodBuilder:
    """Turns a method spec ("static:20", "confidence:0.9", "adainfer") into a policy."""

    def __init__(
        self,
        engine: LayerEngine,
        readout: ExitReadout,
        task: Task,
        config: EvalConfig,
        demos: list,
        candidates: torch.Tensor,
    ) -> None:
        self.engine, self.readout, self.task, self.config = engine, readout, task, config
        self.demos, self.candidates = demos, candidates

    def build(self, spec: str) -> ExitPolicy:
        name, _, arg = spec.partition(":")
        try:
            if name == "full":
                return FullPolicy()
            if name == "static":
                return StaticPolicy(int(arg) if arg else (2 * self.engine.num_layers) // 3)
            if name == "confidence":
                return ConfidencePolicy(float(arg) if arg else 0.9)
            if name == "adainfer":  # "adainfer" (calibrated, 1% tolerance) or "adainfer:0.05"
                return self.adainfer(float(arg) if arg else 0.01)
        except ValueError:
            raise EarlyExitError(f"bad argument in method '{spec}'") from None
        raise EarlyExitError(f"unknown method '{spec}': use {', '.join(METHODS)}")

    def adainfer(self, tolerance: float) -> AdaInferPolicy:
        pool = [ex for ex in self.task.examples("train") if ex not in self.demos]
        generator = torch.Generator().manual_seed(self.config.seed + 1)
        order = torch.randperm(len(pool), generator=generator)[: self.config.calibration]
        prompts = [self.task.prompt(pool[i], self.demos) for i in order.tolist()]
        traces = trace_layers(
            self.engine, self.readout, prompts, self.candidates, self.config.batch
        )
        return fit_adainfer(traces, tolerance=tolerance)


def evaluate_task(
    engine: LayerEngine, readout: ExitReadout, task: Task, methods: list[str], config: EvalConfig
) -> list[dict]:
    demos = task.demonstrations(config.shots, config.seed)
    examples = task.examples("test", config.limit)
    if not examples:
        raise EarlyExitError(f"task '{task.name}' has no test examples")
    prompts = [task.prompt(ex, demos) for ex in examples]
    gold = [ex.label for ex in examples]
    candidates = task.label_token_ids(engine.tokenizer)
    builder = MethodBuilder(engine, readout, task, config, demos, candidates)
    policies = {spec: builder.build(spec) for spec in methods}  # fit before timing anything

    def timed(policy: ExitPolicy) -> PolicyRun:
        return run_policy(engine, readout, prompts, candidates, policy, config.batch)

    run_policy(engine, readout, prompts[: config.batch], candidates, FullPolicy(), config.batch)
    # Each method is timed right after its own full-depth run, so that drift in machine load
    # hits both sides of every speedup ratio alike.
    runs: dict[str, tuple[PolicyRun, PolicyRun]] = {}
    for spec, policy in policies.items():
        reference = timed(FullPolicy())
        runs[spec] = (reference, timed(policy))
    full_quality = task.score(next(iter(runs.values()))[0].predictions, gold)
    records = []
    for spec, (reference, run) in runs.items():
        avg_exit = sum(run.exit_layers) / len(run.exit_layers)
        records.append(
            {
                "task": task.name,
                "method": spec,
                "policy": policies[spec].describe(),
                "n": len(examples),
                "shots": config.shots,
                "batch": config.batch,
                "metric": task.metric,
                "quality": task.score(run.predictions, gold),
                "full_quality": full_quality,
                "agreement_with_full": accuracy(run.predictions, reference.predictions),
                "avg_exit_layer": avg_exit,
                "num_layers": engine.num_layers,
                "layers_saved": 1 - avg_exit / engine.num_layers,
                "ideal_speedup": engine.num_layers / avg_exit,
                "speedup": reference.seconds / run.seconds,
                "decision_overhead": run.decision_seconds / run.seconds,
                "seconds": run.seconds,
                "full_seconds": reference.seconds,
            }
        )
    return records
