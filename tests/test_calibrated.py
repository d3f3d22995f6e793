"""Calibrated exits on real data: task probes, AdaInfer (SVM, CRF, vocab features) and RAEE.

Live runs must equal replays on recorded traces, whatever the batch size (the CRF keeps
per-row history while rows leave the batch; RAEE regroups rows by planned exit layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.policies.adainfer import AdaInferPolicy, fit_adainfer, simulate_exits
from earlyexit.policies.raee import RAEEPolicy
from earlyexit.readouts.probe import TaskProbe, fit_task_probe
from earlyexit.readouts.readout import ExitReadout
from earlyexit.retrieval.database import ExitDatabase, build_database, exit_information
from earlyexit.retrieval.embedders import make_embedder
from earlyexit.runtime.classification import (
    collect_states,
    readout_traces,
    run_policy,
    vocab_traces,
)
from earlyexit.tasks.builtin import get_task


@dataclass
class Calibrated:
    engine: LayerEngine
    base: ExitReadout
    probe: TaskProbe
    oof: torch.Tensor  # out-of-fold calibration traces
    cal_texts: list[str]
    cal_labels: list[int]
    cal_states: torch.Tensor
    prompts: list[str]
    texts: list[str]
    candidates: torch.Tensor
    states: torch.Tensor
    traces: torch.Tensor


# Calibrating takes ~30 s on 2 cores: the tests that use it are marked slow.
@pytest.fixture(scope="module")
def cal(smol: LayerEngine) -> Calibrated:
    task = get_task("sst2")
    demos = task.demonstrations(2, seed=0)
    train = [ex for ex in task.examples("train")[:200] if ex not in demos][:40]
    test = task.examples("test", 10)
    candidates = task.label_token_ids(smol.tokenizer)
    base = ExitReadout(smol)
    cal_states = collect_states(smol, [task.prompt(ex, demos) for ex in train], batch=8)
    fit = fit_task_probe(base, cal_states, candidates, folds=4)
    prompts = [task.prompt(ex, demos) for ex in test]
    states = collect_states(smol, prompts, batch=5)
    return Calibrated(
        smol,
        base,
        fit.probe,
        fit.traces,
        [ex.text for ex in train],
        [ex.label for ex in train],
        cal_states,
        prompts,
        [ex.text for ex in test],
        candidates,
        states,
        readout_traces(fit.probe, states, candidates),
    )


@pytest.mark.slow
def test_probe_distils_the_final_layer(cal: Calibrated) -> None:
    teacher = cal.oof[:, -1].argmax(-1)
    # the last layer is the model's own head, untouched by the probe
    own = cal.base.logits(cal.states[:, -1], cal.engine.num_layers, cal.candidates)
    assert torch.allclose(cal.traces[:, -1], own.float())
    # in-sample, the deep probes reproduce the final answers; out of fold they are honest
    fitted = readout_traces(cal.probe, cal.cal_states, cal.candidates)
    assert (fitted[:, 20].argmax(-1) == teacher).float().mean() >= 0.95
    assert not torch.equal(fitted[:, :-1], cal.oof[:, :-1])


@pytest.mark.slow
def test_probe_round_trip_and_model_check(
    cal: Calibrated, gemma: LayerEngine, tmp_path: Path
) -> None:
    cal.probe.save(tmp_path / "probe")
    loaded = TaskProbe.load(cal.base, tmp_path / "probe")
    assert torch.equal(readout_traces(loaded, cal.states, cal.candidates), cal.traces)
    with pytest.raises(EarlyExitError, match="fitted for model 'smollm2-135m'"):
        TaskProbe.load(ExitReadout(gemma), tmp_path / "probe")
    with pytest.raises(EarlyExitError, match="no task probe"):
        TaskProbe.load(cal.base, tmp_path / "absent")
    with pytest.raises(ValueError, match="only the candidates"):
        cal.probe.logits(cal.states[:, 3], 4, cal.candidates.flip(0))


def _live_equals_replay(cal: Calibrated, policy, vocab=None) -> None:
    exits, preds = simulate_exits(policy, cal.traces, vocab)
    for batch in (1, 4):
        run = run_policy(
            cal.engine, cal.probe, cal.prompts, cal.candidates, policy, batch, cal.texts, cal.base
        )
        assert run.exit_layers == exits.tolist()
        assert run.predictions == preds.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("stopper", ["svm", "crf"])
def test_adainfer_stoppers_live_equal_replay_and_round_trip(
    cal: Calibrated, stopper: str, tmp_path: Path
) -> None:
    policy = fit_adainfer(cal.oof, tolerance=0.1, stopper=stopper)
    _, preds = simulate_exits(policy, cal.oof)
    final = cal.oof[:, -1].argmax(-1)
    assert (preds == final).float().mean() >= 0.9  # the calibrated tolerance holds
    _live_equals_replay(cal, policy)
    policy.save(tmp_path / "stopper.json")
    loaded = AdaInferPolicy.load(tmp_path / "stopper.json")
    assert type(loaded) is type(policy) and loaded.margin == policy.margin
    assert (
        simulate_exits(loaded, cal.traces)[0].tolist()
        == simulate_exits(policy, cal.traces)[0].tolist()
    )


@pytest.mark.slow
def test_adainfer_with_full_vocabulary_features(cal: Calibrated) -> None:
    vocab = vocab_traces(cal.base, cal.cal_states)
    assert vocab.shape == (40, cal.engine.num_layers, 2) and (vocab[..., 1] <= vocab[..., 0]).all()
    policy = fit_adainfer(cal.oof, tolerance=0.1, vocab=vocab)
    assert policy.vocab_features
    _live_equals_replay(cal, policy, vocab_traces(cal.base, cal.states))


def test_exit_information_marks_correct_layers() -> None:
    traces = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]]])  # predicts 0, 1, 1
    info = exit_information(traces, torch.tensor([1]))
    assert info[0, 0] == 0 and info[0, 1] == pytest.approx(torch.sigmoid(torch.tensor(1.0)))
    assert info[0, 2] > info[0, 1]


def _toy_database(probs: list[list[float]], labels: list[int]) -> ExitDatabase:
    n = len(labels)
    return ExitDatabase(np.eye(n, dtype=np.float32), np.array(probs, np.float32), np.array(labels))


def test_raee_paper_rule_by_hand() -> None:
    db = _toy_database(
        [
            [0.0, 0.95, 0.97, 0.0],  # sure at layers 2 and 3
            [0.6, 0.7, 0.0, 0.8],  # never >= 0.9: its top three count
            [0.0, 0.0, 0.0, 0.0],  # never correct
        ],
        [0, 1, 0],
    )
    policy = RAEEPolicy(db, embedder=None, k=3, rule="paper")
    distances = np.array([[1.0, 2.0, 4.0]])
    # weights 1, 0.5, 0.25: layer scores 0.3, 0.95 + 0.35, 0.97, 0.4
    assert policy.exits_from_neighbours(distances, np.array([[0, 1, 2]])).tolist() == [2]
    # with slack, the earliest layer within that fraction of the best score
    early = RAEEPolicy(db, embedder=None, k=3, rule="paper", slack=0.8)
    assert early.exits_from_neighbours(distances, np.array([[0, 1, 2]])).tolist() == [1]
    # only the never-correct neighbour: exit at the last layer
    assert policy.exits_from_neighbours(np.array([[1.0]]), np.array([[2]])).tolist() == [4]


def test_raee_reliability_ignores_one_class_layers() -> None:
    # layer 1 answers class 0 for everyone: right for class-0 examples only, very surely
    probs = [[0.99, 0.0, 0.8], [0.99, 0.7, 0.8], [0.0, 0.7, 0.8], [0.0, 0.0, 0.8]]
    db = _toy_database(probs, [0, 0, 1, 1])
    reliability = db.layer_reliability(2)
    assert reliability[0] == 0 and reliability[2] == 1
    queries, ids = np.array([[1.0, 1.0]]), np.array([[0, 1]])
    assert RAEEPolicy(db, None, k=2, rule="paper").exits_from_neighbours(queries, ids).tolist() == [
        1
    ]
    assert RAEEPolicy(db, None, k=2).exits_from_neighbours(queries, ids).tolist() == [3]
    with pytest.raises(EarlyExitError, match="unknown RAEE rule"):
        RAEEPolicy(db, None, rule="magic")


@pytest.fixture(scope="module")
def database(cal: Calibrated) -> tuple[ExitDatabase, object]:
    embedder = make_embedder("minilm-l6", cal.engine)
    embeddings = embedder.embed(cal.cal_texts)
    meta = {"model": "smollm2-135m", "fingerprint": cal.engine.fingerprint, "embedder": "minilm-l6"}
    return build_database(embeddings, cal.oof, cal.cal_labels, meta), embedder


@pytest.mark.slow
def test_raee_database_round_trip_and_refusals(
    cal: Calibrated, database, gemma: LayerEngine, tmp_path: Path
) -> None:
    db, embedder = database
    assert np.allclose(np.linalg.norm(db.embeddings, axis=1), 1, atol=1e-5)
    db.save(tmp_path / "db")
    loaded = ExitDatabase.load(tmp_path / "db", cal.engine.fingerprint)
    assert np.array_equal(loaded.layer_probs, db.layer_probs) and loaded.meta == db.meta
    queries = embedder.embed(cal.texts)
    for a, b in zip(loaded.search(queries, 12), db.search(queries, 12), strict=True):
        assert np.array_equal(a, b)
    # an example's nearest neighbour is itself
    assert db.search(db.embeddings[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    with pytest.raises(EarlyExitError, match="built for model 'smollm2-135m'"):
        ExitDatabase.load(tmp_path / "db", gemma.fingerprint)
    with pytest.raises(EarlyExitError, match="no RAEE database"):
        ExitDatabase.load(tmp_path / "nothing")
    (tmp_path / "db" / "database.safetensors").write_bytes(b"garbage")
    with pytest.raises(EarlyExitError, match="damaged"):
        ExitDatabase.load(tmp_path / "db")


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["reliable", "paper"])
def test_raee_live_equals_replay_in_any_batch(cal: Calibrated, database, rule: str) -> None:
    db, embedder = database
    policy = RAEEPolicy(db, embedder, k=6, rule=rule)
    plan = policy.plan(cal.texts)
    assert plan.shape == (len(cal.texts),) and 1 <= int(plan.min()) <= int(plan.max()) <= 30
    preds = cal.traces[torch.arange(len(plan)), plan - 1].argmax(-1)
    for batch in (1, 3):
        run = run_policy(
            cal.engine, cal.probe, cal.prompts, cal.candidates, policy, batch, cal.texts
        )
        assert run.exit_layers == plan.tolist()
        assert run.predictions == preds.tolist()
        assert run.decision_seconds > 0


@pytest.mark.slow
def test_backbone_embedder(cal: Calibrated) -> None:
    embedder = make_embedder("backbone:3", cal.engine)
    vectors = embedder.embed(cal.texts[:4])
    assert vectors.shape == (4, cal.engine.hidden_size) and embedder.spec == "backbone:3"
    # padding must not change a text's embedding
    alone = embedder.embed(cal.texts[:1])
    assert np.allclose(alone[0], vectors[0], atol=1e-4)
    with pytest.raises(EarlyExitError, match="must lie in 1..30"):
        make_embedder("backbone:99", cal.engine)


@pytest.mark.weights  # the command loads smollm2-135m and minilm-l6
def test_raee_build_and_inspect_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from earlyexit.cli import app

    runner = CliRunner()
    out = tmp_path / "db"
    args = ["raee", "build", "--task", "sst2", "--examples", "12", "--shots", "0"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "index.faiss").exists() and (out / "probe" / "probe.json").exists()
    assert not list(tmp_path.glob(".db.*"))  # no half-written temporary left behind
    result = runner.invoke(app, ["raee", "inspect", str(out)])
    assert (
        result.exit_code == 0 and "reliability" in result.output and "task: sst2" in result.output
    )


def test_adainfer_with_one_stop_label_is_constant() -> None:
    agree = torch.tensor([[[0.0, 1.0]] * 4] * 3)  # every layer answers class 1
    for stopper in ("svm", "crf"):
        policy = fit_adainfer(agree, stopper=stopper)
        assert simulate_exits(policy, agree)[0].tolist() == [1, 1, 1]
    flips = torch.tensor([[[1.0, 0.0]] * 3 + [[0.0, 1.0]]] * 3)  # only the last layer differs
    assert simulate_exits(fit_adainfer(flips), flips)[0].tolist() == [4, 4, 4]
