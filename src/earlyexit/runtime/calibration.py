"""Classification methods in the runtime: method specs checked before any model pass
(`check_methods`, `method_args`), the calibration prompts run once at full depth
(`calibrate`) and the policies built from them (`MethodBuilder`). The API's classify,
`earlyexit eval` and `raee build` share them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.methods import EVAL_METHODS as METHODS
from earlyexit.policies import ConfidencePolicy, FullPolicy, StaticPolicy
from earlyexit.policies.adainfer import (
    first_exits,
    fit_adainfer,
    load_stopper,
    trace_features,
)
from earlyexit.policies.base import ExitPolicy, readout_features
from earlyexit.policies.raee import RAEEPolicy
from earlyexit.readouts.probe import fit_task_probe
from earlyexit.readouts.readout import ExitReadout
from earlyexit.retrieval.database import ExitDatabase, build_database
from earlyexit.risk import CONFIDENCE_GRID, NEVER_EXIT, LTTChoice, check_risk, learn_then_test
from earlyexit.runtime.classification import (
    Readout,
    collect_states,
    readout_traces,
    vocab_traces,
)
from earlyexit.tasks.base import SAMPLES, Example, Task

# The `raee` method's default slack, chosen by leave-one-out on an SST-2 *training* database
# (240 examples, k=12): accuracy 0.842 / 0.842 / 0.846 / 0.850 at slack 0 / .05 / .1 / .2
# with 20% / 28% / 34% / 42% of layers saved; 0.1 sits inside the flat region. The paper
# rule (`raee-paper`) keeps its argmax (slack 0). The leave-one-out was a one-off script,
# not part of the package.
RAEE_SLACK = 0.1
# Learn-then-Test over RAEE's slack walks up from the argmax (slack 0); when not even that
# is certified, every input runs full depth, recorded as this setting
RAEE_SLACK_GRID = [round(0.02 * i, 2) for i in range(50)]
RAEE_FULL_DEPTH = -1.0
# probe: task probes over the general readout; general: the saved readouts (`heads
# train`), else the logit lens; lens: always the model's own norm and head (RAEE's paper)
READOUTS = ("probe", "general", "lens")
METHOD_NAMES = {m.split("[")[0] for m in METHODS}
NO_ARGUMENT = ("full", "adainfer-saved")


def check_methods(methods: list[str], config: EvalConfig | None = None) -> None:
    """Fail on an unknown method, a bad argument or a missing input (`adainfer-saved`
    without a stopper file) before any model pass is spent."""
    if not methods:
        raise EarlyExitError(f"no method given: use {', '.join(METHODS)}")
    for spec in methods:
        method_args(spec)
    if config is not None and "adainfer-saved" in methods:
        if config.stopper is None:
            raise EarlyExitError(
                "adainfer-saved needs --stopper FILE: a stopper saved by `eval --save DIR` "
                "(DIR/<task>/adainfer.json)"
            )
        load_stopper(config.stopper)  # a bad file fails here, in one line


def method_args(spec: str) -> tuple[str, list[float]]:
    """(name, numeric arguments) of `name[:a[:b]]`; integers where the method counts."""
    name, _, arg = spec.partition(":")
    if name not in METHOD_NAMES:
        raise EarlyExitError(f"unknown method '{spec}': use {', '.join(METHODS)}")
    parts = arg.split(":") if arg else []
    most = 2 if name in ("raee", "raee-paper") else (0 if name in NO_ARGUMENT else 1)
    try:
        if len(parts) > most:
            raise ValueError
        values: list[float] = [float(p) for p in parts]
        if not all(math.isfinite(v) for v in values):
            raise ValueError
        counts = name in ("static", "raee", "raee-paper")  # a layer / neighbour count
        if counts and values and (not values[0].is_integer() or values[0] < 1):
            raise ValueError
        if name == "static-cal" and values and not 0 <= values[0] < 1:  # a tolerance
            raise ValueError
    except ValueError:
        raise EarlyExitError(f"bad argument in method '{spec}': use {', '.join(METHODS)}") from None
    return name, values


@dataclass
class EvalConfig:
    shots: int = 4
    limit: int | None = 200
    seed: int = 0
    batch: int = 8
    # train-split prompts for probes, stoppers and the RAEE database (None: all of them)
    calibration: int | None = 200
    readout: str = "probe"  # "probe": task probes fitted here; "general": the saved readouts
    embedder: str = "minilm-l6"  # RAEE's: a registry embedder or backbone:K
    # Learn-then-Test (risk.py): `confidence`, `static-cal` and the `adainfer` stoppers given
    # without an argument, and `raee`'s slack when not given, take the most aggressive
    # setting whose disagreement with the full model is at most `risk` with probability at
    # least 1 - `delta` (None: their defaults)
    risk: float | None = None
    delta: float = 0.1
    # the test examples: a seeded random sample (`seed`), or the first `limit` in file order
    sample: str = "seeded"
    # `adainfer-saved`: a stopper fitted elsewhere (another task: AdaInfer's generality claim)
    stopper: Path | None = None

    def __post_init__(self) -> None:
        if self.sample not in SAMPLES:
            raise EarlyExitError(f"unknown --sample '{self.sample}': use seeded or first")
        if self.readout not in READOUTS:
            raise EarlyExitError(f"unknown readout '{self.readout}': use probe, general or lens")
        check_risk(self.risk, self.delta)


@dataclass
class Calibration:
    """Training-split prompts with their per-layer readout traces, shared by all methods."""

    examples: list[Example]
    states: torch.Tensor  # [N, L, H]
    traces: torch.Tensor  # [N, L, C] out-of-fold for probes
    vocab: torch.Tensor | None = None  # [N, L, 2], computed on first use


def disagreement(traces: torch.Tensor, exits: torch.Tensor) -> torch.Tensor:
    """[N, S] 0/1 losses: does the answer at exit layer exits[n, s] (1-based) differ from
    the final layer's, on traces [N, L, C] (Learn-then-Test's risk for classification)."""
    answers = traces.argmax(-1)  # [N, L]
    return (answers.gather(1, exits - 1) != answers[:, -1:]).float()


def base_readout(engine: LayerEngine, readout: str) -> ExitReadout:
    """The readout a config's methods read through (under the probes when `probe`)."""
    if readout == "lens":
        return ExitReadout(engine)
    from earlyexit.readouts.store import default_readout

    return default_readout(engine)


def calibration_examples(
    task: Task, demos: list[Example], count: int | None, seed: int
) -> list[Example]:
    pool = [ex for ex in task.examples("train") if ex not in demos]
    if len(pool) < 10:
        raise EarlyExitError(
            f"task '{task.name}' has {len(pool)} training examples besides the demonstrations; "
            "early-exit calibration needs at least 10"
        )
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed + 1))
    return [pool[i] for i in order[:count].tolist()]


def calibrate(
    engine: LayerEngine,
    general: ExitReadout,
    task: Task,
    demos: list[Example],
    candidates: torch.Tensor,
    config: EvalConfig,
) -> tuple[Readout, Calibration]:
    """Run the calibration prompts and build the task's exit readout from them."""
    examples = calibration_examples(task, demos, config.calibration, config.seed)
    states = collect_states(engine, [task.prompt(ex, demos) for ex in examples], config.batch)
    if config.readout == "probe":
        fit = fit_task_probe(general, states, candidates, seed=config.seed)
        return fit.probe, Calibration(examples, states, fit.traces)
    return general, Calibration(examples, states, readout_traces(general, states, candidates))


class MethodBuilder:
    """Turns a method spec ("static:20", "adainfer-crf", "raee:12") into a policy."""

    def __init__(
        self,
        engine: LayerEngine,
        general: ExitReadout,
        task: Task,
        config: EvalConfig,
        calibration: Calibration | None,
        database: ExitDatabase | None = None,
    ) -> None:
        """`database`: a RAEE database built before (e.g. loaded from `raee build`'s
        directory); without one, RAEE methods build it from the calibration."""
        self.engine, self.general, self.task, self.config = engine, general, task, config
        self.calibration = calibration
        self._embedder = None
        self._database: ExitDatabase | None = database
        self._cal_embeddings: np.ndarray | None = None
        self._certified_database: ExitDatabase | None = None  # half of it, under --risk
        self.ltt: dict[str, LTTChoice] = {}  # per spec whose knob Learn-then-Test chose

    def build(self, spec: str) -> ExitPolicy:
        name, args = method_args(spec)
        if name == "full":
            return FullPolicy()
        if name == "static":
            return StaticPolicy(int(args[0]) if args else (2 * self.engine.num_layers) // 3)
        risk = self.config.risk if self.config is not None and not args else None
        if name == "static-cal":
            if risk is not None:
                self.ltt[spec] = self.static_risk_controlled(risk, self.config.delta)
                return StaticPolicy(int(self.ltt[spec].setting))
            return self.static_calibrated(args[0] if args else 0.01)
        if name == "confidence":
            if risk is not None:
                self.ltt[spec] = self.confidence_risk_controlled(risk, self.config.delta)
                return ConfidencePolicy(self.ltt[spec].setting)
            return ConfidencePolicy(args[0] if args else 0.9)
        if name == "adainfer-saved":
            if self.config is None or self.config.stopper is None:
                raise EarlyExitError("adainfer-saved needs --stopper FILE")
            return load_stopper(self.config.stopper)
        if name in ("adainfer", "adainfer-crf", "adainfer-vocab"):
            stopper = "crf" if name == "adainfer-crf" else "svm"
            vocab = name == "adainfer-vocab"
            if risk is not None:
                policy, self.ltt[spec] = self.adainfer_risk_controlled(
                    risk, self.config.delta, stopper, vocab
                )
                return policy
            tolerance = args[0] if args else 0.01
            return self.adainfer(tolerance, stopper, vocab=vocab)
        # raee[:k[:slack]]
        rule = "paper" if name == "raee-paper" else "reliable"
        default_slack = RAEE_SLACK if rule == "reliable" else 0.0
        k = int(args[0]) if args else 12
        if len(args) > 1:
            return self.raee(k, rule, args[1])
        if self.config is not None and self.config.risk is not None:
            policy, self.ltt[spec] = self.raee_risk_controlled(
                k, rule, self.config.risk, self.config.delta
            )
            return policy
        return self.raee(k, rule, default_slack)

    def _calibration(self) -> Calibration:
        if self.calibration is None:
            raise AssertionError("calibration is run before building calibrated methods")
        return self.calibration

    def vocab(self) -> torch.Tensor:
        cal = self._calibration()
        if cal.vocab is None:
            cal.vocab = vocab_traces(self.general, cal.states)
        return cal.vocab

    def static_calibrated(self, tolerance: float) -> ExitPolicy:
        """The shallowest layer whose calibration readouts (out-of-fold for probes) agree
        with the final layer's answer on at least 1 - tolerance of the prompts: a static
        exit chosen without test labels, as AdaInfer's margin is."""
        traces = self._calibration().traces
        final = traces[:, -1].argmax(-1)
        agree = (traces.argmax(-1) == final[:, None]).float().mean(0)
        layer = next(i + 1 for i, a in enumerate(agree.tolist()) if a >= 1 - tolerance)
        return StaticPolicy(layer)

    def static_risk_controlled(self, risk: float, delta: float) -> LTTChoice:
        """Learn-then-Test over static layers, deepest first."""
        layers = self._calibration().traces.shape[1]
        grid = list(range(layers - 1, 0, -1))
        exits = torch.tensor(grid).expand(self._calibration().traces.shape[0], -1)
        losses = disagreement(self._calibration().traces, exits).numpy()
        return learn_then_test(grid, losses, risk, delta, safe=layers)

    def confidence_risk_controlled(self, risk: float, delta: float) -> LTTChoice:
        """Learn-then-Test over confidence (gap) thresholds, 0.99 down to 0.01; the safe
        setting NEVER_EXIT lies above any gap."""
        traces = self._calibration().traces
        n, layers = traces.shape[:2]
        gaps = torch.stack(
            [readout_features(traces[:, i], i + 1, layers)[:, 1] for i in range(layers)], dim=1
        )
        grid = CONFIDENCE_GRID
        exits = torch.full((n, len(grid)), layers, dtype=torch.long)
        for j, threshold in enumerate(grid):
            hit = gaps[:, :-1] >= threshold  # the runner exits every row at the last layer
            first = hit.float().argmax(1) + 1
            exits[:, j] = torch.where(hit.any(1), first, torch.full_like(first, layers))
        losses = disagreement(traces, exits).numpy()
        return learn_then_test(grid, losses, risk, delta, safe=NEVER_EXIT)

    def _halves(self, salt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded split of the calibration prompts (seed + salt, one per method): the
        half that fits a policy and the half that certifies its knob."""
        generator = torch.Generator().manual_seed(self.config.seed + salt)
        order = torch.randperm(len(self._calibration().traces), generator=generator)
        return order[: len(order) // 2], order[len(order) // 2 :]

    def adainfer_risk_controlled(
        self, risk: float, delta: float, stopper: str = "svm", vocab: bool = False
    ) -> tuple[ExitPolicy, LTTChoice]:
        """AdaInfer's stopper fitted on a seeded half of the calibration traces, its margin
        certified by Learn-then-Test on the other half (the half that fitted the stopper
        would flatter it): margins from above every score (never exit) downwards."""
        traces = self._calibration().traces
        stats = self.vocab() if vocab else None
        fit, held = self._halves(salt=2)
        policy = fit_adainfer(
            traces[fit],
            tolerance=None,
            stopper=stopper,
            vocab=None if stats is None else stats[fit],
        )
        features = trace_features(traces[held], None if stats is None else stats[held])
        scores = policy.online_scores(features)
        levels = torch.linspace(1.0, 0.0, 101, dtype=scores.dtype)
        grid = sorted({float(m) for m in torch.quantile(scores.flatten(), levels)}, reverse=True)
        exits = torch.stack([first_exits(scores, margin) for margin in grid], dim=1)
        losses = disagreement(traces[held], exits).numpy()
        safe = float(scores.max()) + 1.0  # above every score: full depth
        choice = learn_then_test(grid, losses, risk, delta, safe=safe)
        policy.margin = choice.setting
        return policy, choice

    def adainfer(self, tolerance: float, stopper: str = "svm", vocab: bool = False) -> ExitPolicy:
        cal = self._calibration()
        return fit_adainfer(
            cal.traces, tolerance=tolerance, stopper=stopper, vocab=self.vocab() if vocab else None
        )

    @property
    def embedder(self):  # noqa: ANN201 - an Embedder
        if self._embedder is None:
            from earlyexit.retrieval.embedders import make_embedder

            self._embedder = make_embedder(self.config.embedder, self.engine)
        return self._embedder

    @property
    def built_database(self) -> ExitDatabase | None:
        """The RAEE database if a method asked for one (under --risk alone: the half
        database Learn-then-Test certified)."""
        return self._database if self._database is not None else self._certified_database

    def _embeddings(self) -> np.ndarray:
        """The calibration examples' embeddings (RAEE's keys), computed once."""
        cal = self._calibration()
        if self._cal_embeddings is None:
            self._cal_embeddings = self.embedder.embed([ex.text for ex in cal.examples])
        return self._cal_embeddings

    def _build_database(self, rows: torch.Tensor | None = None) -> ExitDatabase:
        """A database over the calibration examples (`rows` of them, default all)."""
        cal = self._calibration()
        picked = torch.arange(len(cal.examples)) if rows is None else rows
        meta = {
            "model": self.engine.loaded.name,
            "fingerprint": self.engine.fingerprint,
            "task": self.task.name,
            "embedder": self.embedder.spec,
            "readout": self.config.readout,
            "shots": self.config.shots,
            "seed": self.config.seed,
        }
        labels = [cal.examples[i].label for i in picked.tolist()]
        return build_database(self._embeddings()[picked.numpy()], cal.traces[picked], labels, meta)

    def database(self) -> ExitDatabase:
        if self._database is None:
            self._database = self._build_database()
        return self._database

    def raee(self, k: int, rule: str, slack: float = 0.0) -> RAEEPolicy:
        return RAEEPolicy(
            self.database(),
            self.embedder,
            k=k,
            rule=rule,
            num_classes=self.task.num_classes,
            slack=slack,
        )

    def raee_risk_controlled(
        self, k: int, rule: str, risk: float, delta: float
    ) -> tuple[ExitPolicy, LTTChoice]:
        """RAEE's database built from a seeded half of the calibration prompts, its slack
        certified by Learn-then-Test on the other half, from the argmax (slack 0) upwards.
        The policy served is the certified one (half a database); when nothing is
        certified, full depth. A database over every prompt would be another policy than
        the one tested, and its own prompts would find themselves as nearest neighbours."""
        traces = self._calibration().traces
        fit, held = self._halves(salt=3)
        database = self._build_database(fit)
        policy = RAEEPolicy(
            database, self.embedder, k=k, rule=rule, num_classes=self.task.num_classes
        )
        distances, ids = database.search(self._embeddings()[held.numpy()], k)
        exits = []
        for slack in RAEE_SLACK_GRID:
            policy.slack = slack
            exits.append(torch.from_numpy(policy.exits_from_neighbours(distances, ids)))
        losses = disagreement(traces[held], torch.stack(exits, dim=1)).numpy()
        choice = learn_then_test(RAEE_SLACK_GRID, losses, risk, delta, safe=RAEE_FULL_DEPTH)
        if not choice.certified:
            return FullPolicy(), choice
        policy.slack = choice.setting
        self._certified_database = database
        return policy, choice


def needs_calibration(methods: list[str], config: EvalConfig) -> bool:
    calibrated = ("adainfer", "raee", "static-cal")
    risk_controlled = config.risk is not None and "confidence" in methods
    return (
        config.readout == "probe"
        or risk_controlled
        or any(m.startswith(calibrated) and m != "adainfer-saved" for m in methods)
    )
