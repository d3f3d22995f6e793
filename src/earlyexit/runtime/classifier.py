"""Classification requests on one engine (`EarlyExit.classify`): the task resolved (a
built-in name, a user's labelled file, a Task, or bare labels), its demonstrations and
label words, and the artifacts a method needs, built on first use and kept per task and
setting (the calibration's task probes, AdaInfer's stoppers, RAEE's database, or the
database `earlyexit raee build` saved); then `run_policy` (runtime/classification.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.readout import ExitReadout
from earlyexit.runtime.calibration import (
    EvalConfig,
    MethodBuilder,
    calibrate,
    method_args,
    needs_calibration,
)
from earlyexit.runtime.kept import Kept
from earlyexit.runtime.results import Classification, ClassificationReport
from earlyexit.tasks.base import Example, Task

DATASET_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")  # earlyexit.tasks.custom.FORMATS
KEPT_TASKS = 8  # classification tasks' calibrations kept per object


@dataclass
class ClassifyRequest:
    """A checked classify request."""

    texts: list[str]
    method: str
    name: str  # the method's family (method_args)
    key: tuple  # the task's cache key
    task: Task
    config: EvalConfig


@dataclass
class TaskState:
    """Per task and setting: demonstrations, candidates and the artifacts built so far."""

    task: Task
    config: EvalConfig
    demos: list[Example]
    candidates: torch.Tensor
    builder: MethodBuilder | None = None  # with the calibration, once run
    readout: Any = None  # the calibrated task readout (probe or general)
    calibrated: str = ""  # what the calibration was, for reports
    policies: dict[str, tuple[Any, Any, dict[str, str]]] = field(default_factory=dict)
    saved: tuple[MethodBuilder, Any, dict[str, str]] | None = None  # a saved RAEE database
    saved_checked: bool = False


class Classifier:
    """Classification with early exit on one engine; what it builds is kept (bounded: the
    least recently used task goes). Not thread-safe: the scheduler's loop runs it."""

    def __init__(self, engine: LayerEngine, kept_tasks: int = KEPT_TASKS) -> None:
        self.engine = engine
        self._general: ExitReadout | None = None
        self._lens: ExitReadout | None = None
        self.tasks: Kept[TaskState] = Kept(kept_tasks)

    @property
    def general_readout(self) -> ExitReadout:
        """The saved `default` readout (`earlyexit heads train`) if any, else the logit lens."""
        if self._general is None:
            from earlyexit.readouts.store import default_readout

            self._general = default_readout(self.engine)
        return self._general

    def base_readout(self, config: EvalConfig) -> ExitReadout:
        """The readout under the task probes and the RAEE traces: the saved general one,
        or with readout='lens' the model's own norm and head (RAEE's paper protocol)."""
        if config.readout != "lens":
            return self.general_readout
        if self._lens is None:
            self._lens = ExitReadout(self.engine)
        return self._lens

    def general_line(self, config: EvalConfig | None = None) -> str:
        from earlyexit.readouts.store import readout_dir

        if config is not None and config.readout == "lens":
            return "logit lens: the model's own norm and head (readout='lens')"
        if self.general_readout.trained_layers:
            return f"trained readout 'default' ({readout_dir(self.engine)})"
        return "logit lens (untrained; `earlyexit heads train` trains readouts)"

    def request(
        self,
        texts: str | Sequence[str],
        task: str | Path | Task | None,
        method: str,
        labels: Mapping[str, str] | str | Path | None,
        text_column: str,
        label_column: str,
        shots: int,
        seed: int,
        batch: int,
        calibration: int,
        readout: str,
        embedder: str,
    ) -> ClassifyRequest:
        """`EarlyExit.classify`'s arguments checked (cheap: no model work; see there)."""
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise EarlyExitError("texts must be a non-empty list of strings")
        name, _ = method_args(method)  # unknown methods fail before any work
        if batch < 1 or shots < 0 or calibration < 10:
            raise EarlyExitError("batch must be >= 1, shots >= 0 and calibration >= 10")
        self._check_embedder(embedder)
        key, task_obj = self._resolve_task(task, labels, text_column, label_column)
        config = EvalConfig(
            shots=shots,
            seed=seed,
            batch=batch,
            calibration=calibration,
            readout=readout,
            embedder=embedder,
        )
        return ClassifyRequest(items, method, name, key, task_obj, config)

    def run(self, request: ClassifyRequest) -> Classification:
        """The request's work on the engine: calibration on first use, then the policy run."""
        from earlyexit.runtime.classification import run_policy

        task, config, method = request.task, request.config, request.method
        # `full` reads the last layer only: the model's own head, whatever the readout
        needs = request.name != "full" and needs_calibration([method], config)
        began = time.perf_counter()
        state = self._task_state(request.key, task, config)
        run_readout, policy, artifacts = self._policy(state, method, needs)
        setup = time.perf_counter() - began
        prompts = [task.prompt(Example(text, 0), state.demos) for text in request.texts]
        run = run_policy(
            self.engine,
            run_readout,
            prompts,
            state.candidates,
            policy,
            config.batch,
            request.texts,
            self.base_readout(config),
        )
        layers = self.engine.num_layers
        avg = sum(run.exit_layers) / len(run.exit_layers)
        report = ClassificationReport(
            method=method,
            task=task.name,
            num_layers=layers,
            avg_layers=avg,
            layers_saved=1 - avg / layers,
            seconds=run.seconds,
            decision_seconds=run.decision_seconds,
            setup_seconds=setup,
            shots=len(state.demos),
            readout=config.readout,
            policy=policy.describe(),
            artifacts=artifacts,
        )
        words = [w.strip() for w in task.label_words]
        return Classification(
            [words[c] for c in run.predictions],
            list(run.predictions),
            list(run.exit_layers),
            report,
        )

    def _check_embedder(self, spec: str) -> None:
        """RAEE's embedder, checked before any work: a registry embedder or backbone:K."""
        from earlyexit.models.registry import REGISTRY

        name, _, arg = spec.partition(":")
        if name == "backbone":
            if not arg or (arg.isdigit() and 1 <= int(arg) <= self.engine.num_layers):
                return
        elif spec in REGISTRY and REGISTRY[spec].kind == "embedder":
            return
        embedders = [n for n, m in REGISTRY.items() if m.kind == "embedder"]
        raise EarlyExitError(
            f"unknown embedder '{spec}': use {', '.join(embedders)} or backbone:K "
            f"(K in 1..{self.engine.num_layers})"
        )

    def _resolve_task(
        self,
        task: str | Path | Task | None,
        labels: Mapping[str, str] | str | Path | None,
        text_column: str,
        label_column: str,
    ) -> tuple[tuple, Task]:
        """(cache key, task): cheap, and every problem is an EarlyExitError."""
        from earlyexit.tasks.builtin import TASKS, get_task
        from earlyexit.tasks.custom import DEFAULT_TEMPLATE, load_custom_task

        if isinstance(task, Task):
            return ("object", id(task)), task
        if task is None:
            if not isinstance(labels, Mapping) or not labels:
                raise EarlyExitError(
                    "task=None needs labels={'label': 'word', ...} (one word per class)"
                )
            words = [w if w.startswith(" ") else " " + w for w in map(str, labels.values())]
            zero_shot = Task(
                name="labels",
                label_words=words,
                template=DEFAULT_TEMPLATE,
                train=lambda: [],
                test=lambda: [],
            )
            return ("labels", tuple(words)), zero_shot
        text = str(task)
        if text in TASKS and not isinstance(task, Path):
            return ("builtin", text), get_task(text)
        if isinstance(task, Path) or text.lower().endswith(DATASET_SUFFIXES) or Path(text).exists():
            if labels is None:
                raise EarlyExitError(
                    f"task file {text} needs labels={{'<label value>': '<word>', ...}} "
                    "(or a YAML/JSON file of that map)"
                )
            path = Path(text).expanduser().resolve()
            loaded = load_custom_task(path, text_column, label_column, labels)
            stamp = path.stat().st_mtime_ns
            label_key = tuple(labels.items()) if isinstance(labels, Mapping) else str(labels)
            return ("file", str(path), stamp, text_column, label_column, label_key), loaded
        return ("builtin", text), get_task(text)  # raises: unknown task, listing the names

    def _task_state(self, key: tuple, task: Task, config: EvalConfig) -> TaskState:
        full_key = (*key, config.shots, config.seed, config.calibration, config.readout)
        full_key += (config.embedder,)
        state = self.tasks.get(full_key)
        if state is None:
            pool = task.examples("train")
            shots = config.shots if pool else 0  # a task without a train split: zero-shot
            demos = task.demonstrations(shots, config.seed)
            state = TaskState(task, config, demos, task.label_token_ids(self.engine.tokenizer))
            self.tasks.put(full_key, state)
        return state

    def _calibrated(self, state: TaskState, method: str) -> MethodBuilder:
        """The task's calibration (probes fitted, traces for stoppers and databases), run on
        first use and kept."""
        if state.builder is None:
            task, config = state.task, state.config
            pool = [ex for ex in task.examples("train") if ex not in state.demos]
            if len(pool) < 10:
                raise EarlyExitError(
                    f"method '{method}' calibrates on labelled training examples and task "
                    f"'{task.name}' has {len(pool)}: pass a labelled file (task='data.csv', "
                    "labels={...}) or a Task with a train split, or use method 'full' (or "
                    "static / confidence with readout='general')"
                )
            base = self.base_readout(config)
            readout, calibration = calibrate(
                self.engine, base, task, state.demos, state.candidates, config
            )
            state.builder = MethodBuilder(self.engine, base, task, config, calibration)
            state.readout = readout
            count = len(calibration.examples)
            if config.readout == "probe":
                state.calibrated = f"task probe fitted on {count} train prompts (in memory)"
            else:
                state.calibrated = f"general readout, traced on {count} train prompts"
        return state.builder

    def _saved_raee(self, state: TaskState) -> tuple[MethodBuilder, Any, dict[str, str]] | None:
        """The RAEE database `earlyexit raee build` saved for this model and task (and its
        task probe), if its settings match this request's; else None."""
        if state.saved_checked:
            return state.saved
        state.saved_checked = True
        from earlyexit.paths import home
        from earlyexit.readouts.probe import TaskProbe
        from earlyexit.retrieval.database import ExitDatabase

        path = home() / "raee" / self.engine.loaded.name / state.task.name
        if not (path / "database.json").exists():
            return None
        database = ExitDatabase.load(path, self.engine.fingerprint)
        config = state.config
        wanted = {
            "task": state.task.name,
            "embedder": config.embedder,
            "readout": config.readout,
            "shots": config.shots,
            "seed": config.seed,
        }
        if any(database.meta.get(k) != v for k, v in wanted.items()):
            return None
        readout: Any = self.base_readout(config)
        lines = {"database": f"RAEE database loaded from {path} ({database.size} examples)"}
        if config.readout == "probe":
            readout = TaskProbe.load(self.general_readout, path / "probe")
            if not torch.equal(readout.candidates, state.candidates):
                return None
            lines["readout"] = f"task probe loaded from {path / 'probe'}"
        else:
            lines["readout"] = self.general_line(config)
        builder = MethodBuilder(
            self.engine, self.base_readout(config), state.task, config, None, database=database
        )
        state.saved = (builder, readout, lines)
        return state.saved

    def _policy(self, state: TaskState, method: str, needs: bool) -> tuple[Any, Any, dict]:
        """(readout, policy, artifact lines) for a method on a task, built once and kept."""
        if method in state.policies:
            return state.policies[method]
        name, _ = method_args(method)
        general = self.base_readout(state.config)
        artifacts = {"general_readout": self.general_line(state.config)}
        saved = self._saved_raee(state) if name in ("raee", "raee-paper") else None
        if saved is not None:
            builder, readout, lines = saved
            artifacts.update(lines)
        elif needs:
            builder = self._calibrated(state, method)
            readout = state.readout
            artifacts["readout"] = state.calibrated
        else:
            builder = MethodBuilder(self.engine, general, state.task, state.config, None)
            readout = general
            artifacts["readout"] = self.general_line(state.config)
        policy = builder.build(method)
        if name.startswith("adainfer"):
            stopper = "CRF" if name == "adainfer-crf" else "SVM"
            count = len(builder.calibration.examples) if builder.calibration else 0
            artifacts["stopper"] = f"{stopper} stopper fitted on {count} calibration traces"
        if name.startswith("raee") and saved is None:
            artifacts["database"] = (
                f"RAEE database built from {builder.built_database.size} labelled train "
                "examples (in memory)"
            )
        if name.startswith("raee"):
            artifacts["embedder"] = builder.embedder.spec
        state.policies[method] = (readout, policy, artifacts)
        return state.policies[method]
