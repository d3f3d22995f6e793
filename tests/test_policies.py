"""Exit policies on real data: replay on traces equals live runs, batching changes nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.policies import AdaInferPolicy, ConfidencePolicy, FullPolicy, StaticPolicy
from earlyexit.policies.adainfer import (
    fit_adainfer,
    load_stopper,
    save_stopper,
    simulate_exits,
    stop_labels,
)
from earlyexit.readouts.readout import ExitReadout
from earlyexit.runtime.calibration import RAEE_FULL_DEPTH
from earlyexit.runtime.classification import run_policy, trace_layers
from earlyexit.tasks.builtin import get_task


@dataclass
class Setup:
    engine: LayerEngine
    readout: ExitReadout
    prompts: list[str]
    candidates: torch.Tensor
    traces: torch.Tensor


@pytest.fixture(scope="module")
def sst2(smol: LayerEngine) -> Setup:
    task = get_task("sst2")
    demos = task.demonstrations(2, seed=0)
    prompts = [task.prompt(ex, demos) for ex in task.examples("test", 12)]
    candidates = task.label_token_ids(smol.tokenizer)
    readout = ExitReadout(smol)  # the plain lens: these tests are about the policies
    traces = trace_layers(smol, readout, prompts, candidates, batch=4)
    return Setup(smol, readout, prompts, candidates, traces)


def test_stop_labels_require_agreement_to_the_end() -> None:
    # per-layer predictions 1, 0, 1, 1 -> "stop" is right from layer 3 on
    logits = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]]])
    assert stop_labels(logits).tolist() == [[False, False, True, True]]


def test_full_policy_equals_the_models_own_prediction(sst2: Setup) -> None:
    run = run_policy(sst2.engine, sst2.readout, sst2.prompts, sst2.candidates, FullPolicy(), 4)
    assert run.exit_layers == [sst2.engine.num_layers] * len(sst2.prompts)
    ids, pad = sst2.engine.encode(sst2.prompts[:1])
    mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    with torch.no_grad():
        own = sst2.engine.model(input_ids=ids, attention_mask=mask).logits[0, -1, sst2.candidates]
    assert run.predictions[0] == int(own.argmax())
    assert run.predictions == sst2.traces[:, -1].argmax(-1).tolist()


@pytest.mark.parametrize(
    "policy",
    [StaticPolicy(12), ConfidencePolicy(0.3), ConfidencePolicy(0.6, "top1")],
    ids=["static", "confidence-gap", "confidence-top1"],
)
def test_live_runs_match_replay_and_batching_changes_nothing(sst2: Setup, policy) -> None:
    exits, preds = simulate_exits(policy, sst2.traces)
    for batch in (1, 5):
        run = run_policy(sst2.engine, sst2.readout, sst2.prompts, sst2.candidates, policy, batch)
        assert run.exit_layers == exits.tolist()
        assert run.predictions == preds.tolist()
        assert 0 <= run.decision_seconds <= run.seconds


def test_adainfer_calibrated_margin_and_round_trip(sst2: Setup, tmp_path: Path) -> None:
    policy = fit_adainfer(sst2.traces, tolerance=0.0)
    _, preds = simulate_exits(policy, sst2.traces)
    # with zero tolerance, every calibration exit agrees with the final layer
    assert preds.tolist() == sst2.traces[:, -1].argmax(-1).tolist()
    path = tmp_path / "adainfer.json"
    policy.save(path)
    loaded = AdaInferPolicy.load(path)
    assert loaded == policy
    assert (
        simulate_exits(loaded, sst2.traces)[0].tolist()
        == simulate_exits(policy, sst2.traces)[0].tolist()
    )


@pytest.mark.slow
def test_adainfer_saved_applies_another_tasks_stopper(sst2: Setup, tmp_path: Path) -> None:
    """`adainfer-saved` runs the stopper in --stopper unchanged (fitted on SST-2 here, as
    `eval --save` writes it) and needs no calibration of its own; without the file, or
    with a bad one, eval stops before any model pass."""
    from earlyexit.runtime.calibration import (
        EvalConfig,
        MethodBuilder,
        check_methods,
        needs_calibration,
    )

    path = tmp_path / "sst2" / "adainfer.json"
    fitted = fit_adainfer(sst2.traces, tolerance=0.0)
    fitted.save(path)
    config = EvalConfig(readout="general", stopper=path)
    check_methods(["full", "adainfer-saved"], config)
    assert not needs_calibration(["adainfer-saved"], config)
    builder = MethodBuilder(sst2.engine, sst2.readout, get_task("mr"), config, None)
    assert builder.build("adainfer-saved") == fitted
    with pytest.raises(EarlyExitError, match="adainfer-saved needs --stopper FILE"):
        check_methods(["adainfer-saved"], EvalConfig())
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(EarlyExitError, match="bad.json"):
        check_methods(["adainfer-saved"], EvalConfig(stopper=tmp_path / "bad.json"))
    from typer.testing import CliRunner

    from earlyexit.cli import app

    out = tmp_path / "mr.json"
    args = ["eval", "--task", "mr", "--limit", "8", "--readout", "general", "--shots", "2"]
    args += ["--method", "full,adainfer-saved", "--stopper", str(path), "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["config"]["stopper"] == str(path)
    saved = payload["records"][1]
    assert saved["method"] == "adainfer-saved" and saved["policy"]["margin"] == fitted.margin


def test_adainfer_bad_files(tmp_path: Path) -> None:
    with pytest.raises(EarlyExitError, match="train one first"):
        AdaInferPolicy.load(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"format_version": 2}')
    with pytest.raises(EarlyExitError, match="not an AdaInfer stopper"):
        AdaInferPolicy.load(tmp_path / "bad.json")


def _synthetic_traces(num: int = 24, layers: int = 5) -> torch.Tensor:
    """[N, L, 2] candidate logits that settle on the final answer at varying depths."""
    gen = torch.Generator().manual_seed(0)
    final = torch.randint(0, 2, (num,), generator=gen)
    settle = torch.randint(1, layers + 1, (num,), generator=gen)
    traces = torch.randn(num, layers, 2, generator=gen)
    for n in range(num):
        traces[n, settle[n] - 1 :, final[n]] += 3.0
    return traces


@pytest.mark.parametrize("stopper", ["svm", "crf"])
def test_adainfer_stopper_files_round_trip(stopper: str, tmp_path: Path) -> None:
    """Both stopper kinds: one JSON file, written atomically, read back to an equal policy."""
    traces = _synthetic_traces()
    labels = stop_labels(traces)[:, :-1]
    assert labels.any() and not labels.all()  # a real (not constant) stopper is fitted
    policy = fit_adainfer(traces, tolerance=0.1, stopper=stopper)
    assert policy.describe()["stopper"] == stopper and "constant" not in policy.meta
    path = tmp_path / "stoppers" / "adainfer.json"
    policy.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["adainfer.json"]  # no temp files left
    payload = json.loads(path.read_text())
    assert (payload["format_version"], payload["stopper"]) == (2, stopper)
    assert payload["features"] == ["top1", "gap", "depth"]
    for loaded in (load_stopper(path), AdaInferPolicy.load(path)):
        assert type(loaded) is type(policy) and loaded == policy
        assert (
            simulate_exits(loaded, traces)[0].tolist() == simulate_exits(policy, traces)[0].tolist()
        )
    save_stopper(loaded, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == path.read_text()


def test_adainfer_stopper_file_errors(tmp_path: Path) -> None:
    policy = fit_adainfer(_synthetic_traces(), stopper="crf")
    path = tmp_path / "crf.json"
    policy.save(path)
    payload = json.loads(path.read_text())
    bad = tmp_path / "bad.json"
    for change, message in [
        ({"stopper": "forest"}, "unknown kind 'forest'"),
        ({"format_version": 1}, "old stopper format"),
        ({"features": ["top1"]}, "trained on other features"),
        ({"model": "not base64!"}, "not an AdaInfer stopper"),
    ]:
        bad.write_text(json.dumps({**payload, **change}))
        with pytest.raises(EarlyExitError, match=message) as caught:
            load_stopper(bad)
        assert "\n" not in str(caught.value)


def test_static_layer_out_of_range() -> None:
    with pytest.raises(EarlyExitError, match="must lie in 1..30"):
        StaticPolicy(31).readout_layers(30)


def test_evaluate_task_records(sst2: Setup) -> None:
    from earlyexit.evaluation.runner import evaluate_task
    from earlyexit.runtime.calibration import EvalConfig

    config = EvalConfig(shots=2, limit=8, batch=4, readout="general")
    records = evaluate_task(
        sst2.engine, sst2.readout, get_task("sst2"), ["full", "static:12"], config
    ).records
    drawn = [ex.row for ex in get_task("sst2").test_sample(8, seed=0)]
    assert all(r["rows"] == drawn and r["sample"] == "seeded" for r in records)
    assert [r["method"] for r in records] == ["full", "static:12"]
    full, static = records
    assert full["avg_exit_layer"] == 30 and full["agreement_with_full"] == 1.0
    assert static["avg_exit_layer"] == 12 and static["layers_saved"] == pytest.approx(0.6)
    assert static["full_quality"] == full["quality"] and static["metric"] == "accuracy"
    for r in records:
        assert r["n"] == 8 and r["speedup"] > 0 and 0 <= r["decision_overhead"] < 1
        low, high = r["quality_ci"]  # 95% bootstrap over the 8 examples
        assert 0 <= low <= r["quality"] <= high <= 1
        low, high = r["speedup_ci"]  # over the 2 interleaved rounds (batch 4)
        assert 0 < low <= high and r["ltt"] is None
    with pytest.raises(EarlyExitError, match="unknown method 'magic'"):
        evaluate_task(sst2.engine, sst2.readout, get_task("sst2"), ["magic"], config)


@pytest.mark.slow
def test_eval_cli_risk_control(tmp_path: Path) -> None:
    """`eval --risk`: confidence, static-cal and RAEE's slack without arguments are chosen
    by Learn-then-Test and say so; with explicit arguments they are left alone."""
    from typer.testing import CliRunner

    from earlyexit.cli import app

    out = tmp_path / "eval.json"
    args = ["eval", "--task", "sst2", "--shots", "2", "--limit", "8", "--calibration", "40"]
    methods = "confidence,static-cal,confidence:0.5,raee,raee:8:0.2"
    args += ["--method", methods, "--risk", "0.2", "--delta", "0.2"]
    result = CliRunner().invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert "LTT" in result.output
    for spec in ("confidence", "static-cal"):
        ltt = records[spec]["ltt"]
        assert ltt["risk"] == 0.2 and ltt["delta"] == 0.2 and ltt["n"] == 40
        assert ltt["certified"] == (ltt["p_value"] is not None)
    assert records["confidence"]["policy"]["threshold"] == records["confidence"]["ltt"]["setting"]
    assert records["static-cal"]["policy"]["layer"] == records["static-cal"]["ltt"]["setting"]
    assert records["confidence:0.5"]["ltt"] is None
    assert records["confidence:0.5"]["policy"]["threshold"] == 0.5
    # RAEE: the database on 20 of the 40 prompts, the slack certified on the other 20
    ltt = records["raee"]["ltt"]
    assert ltt["n"] == 20 and ltt["certified"] == (ltt["p_value"] is not None)
    assert records["raee"]["policy"].get("slack", RAEE_FULL_DEPTH) == ltt["setting"]
    assert records["raee:8:0.2"]["ltt"] is None and records["raee:8:0.2"]["policy"]["slack"] == 0.2


def test_eval_raee_paper_protocol(tmp_path: Path) -> None:
    """`--protocol raee-paper`: zero shots, the model's own head (lens), the database over
    the whole training split (a custom file's demonstration pool here: 12 rows), and the
    paper's rule at k = 12, from one flag."""
    from typer.testing import CliRunner

    from earlyexit.cli import app

    data = tmp_path / "reviews.jsonl"
    reviews = [("a wonderful, moving film", 1), ("dull and far too long", 0)] * 30
    lines = [json.dumps({"text": f"{t}, take {i}", "label": y}) for i, (t, y) in enumerate(reviews)]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "paper.json"
    args = ["eval", "--data", str(data), "--labels", "0=negative,1=positive", "--limit", "8"]
    result = CliRunner().invoke(app, [*args, "--protocol", "raee-paper", "--json", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["config"]["shots"] == 0 and payload["config"]["readout"] == "lens"
    assert payload["config"]["calibration"] is None  # the whole training split
    records = {r["method"]: r for r in payload["records"]}
    assert list(records) == ["full", "raee-paper:12"]
    policy = records["raee-paper:12"]["policy"]
    assert policy["k"] == 12 and policy["rule"] == "paper" and policy["database_size"] == 12
    assert records["raee-paper:12"]["calibration"] == 12
    bad = CliRunner().invoke(app, ["eval", "--model", "no-such-model", "--protocol", "calm"])
    assert bad.exit_code == 2 and "unknown protocol 'calm': use raee-paper" in bad.output


@pytest.mark.slow
def test_calibrated_methods_sweeps_and_plot(sst2: Setup, tmp_path: Path) -> None:
    from earlyexit.evaluation.plots import plot_sweep
    from earlyexit.evaluation.runner import evaluate_task
    from earlyexit.evaluation.sweeps import sweep_task
    from earlyexit.runtime.calibration import EvalConfig

    config = EvalConfig(shots=2, limit=6, batch=4, calibration=24)
    methods = ["full", "adainfer:0.1", "adainfer-crf:0.1", "raee:4", "raee-paper:4"]
    ev = evaluate_task(sst2.engine, sst2.readout, get_task("sst2"), methods, config)
    by_method = {r["method"]: r for r in ev.records}
    assert by_method["full"]["quality"] == by_method["full"]["full_quality"]
    assert by_method["raee:4"]["policy"]["database_size"] == 24
    assert all(r["readout"] == "probe" and r["calibration"] == 24 for r in ev.records)
    points = sweep_task(ev)
    families = {p["family"] for p in points}
    assert families == {
        "static",
        "confidence",
        "adainfer",
        "adainfer-crf",
        "raee",
        "raee-paper",
        "raee-slack",
    }
    static_full = [p for p in points if p["family"] == "static" and p["param"] == 30][0]
    assert static_full["quality"] == by_method["full"]["quality"]
    png = plot_sweep(points, by_method["full"]["quality"], "test", tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    # what was fitted is saved and loads back for the same model
    from earlyexit.readouts.probe import TaskProbe
    from earlyexit.retrieval.database import ExitDatabase

    ev.save_artifacts(tmp_path / "fitted")
    saved = tmp_path / "fitted" / "sst2"
    crf = AdaInferPolicy.load(saved / "adainfer-crf_0.1.json")
    assert crf.margin == ev.policies["adainfer-crf:0.1"].margin
    database = ExitDatabase.load(saved / "raee-database", sst2.engine.fingerprint)
    assert database.size == 24 and database.meta["task"] == "sst2"
    probe = TaskProbe.load(sst2.readout, saved / "probe")
    assert torch.equal(probe.weight, ev.readout.weight)


def test_static_cal_picks_the_shallowest_layer_within_tolerance() -> None:
    """static-cal on calibration traces whose layers agree with the final answer on a rising
    share of prompts: the first layer reaching 1 - tol, chosen without test labels."""
    import torch

    from earlyexit.runtime.calibration import Calibration, MethodBuilder, method_args

    prompts, layers = 100, 6
    final = torch.arange(prompts) % 2
    traces = torch.zeros(prompts, layers, 2)
    agree_upto = [0.5, 0.7, 0.95, 0.985, 1.0, 1.0]  # share of prompts agreeing per layer
    for layer, share in enumerate(agree_upto):
        answer = final.clone()
        answer[int(share * prompts) :] = 1 - final[int(share * prompts) :]
        traces[torch.arange(prompts), layer, answer] = 1.0
    cal = Calibration([], torch.zeros(prompts, layers, 4), traces)
    builder = MethodBuilder(None, None, None, None, cal)  # type: ignore[arg-type]
    assert builder.build("static-cal").describe()["layer"] == 5  # 1% tolerance
    assert builder.build("static-cal:0.02").describe()["layer"] == 4
    assert builder.build("static-cal:0.1").describe()["layer"] == 3
    assert builder.build("static-cal:0.6").describe()["layer"] == 1
    for bad in ("static-cal:1", "static-cal:-0.1", "static-cal:0.1:2"):
        with pytest.raises(EarlyExitError, match="bad argument"):
            method_args(bad)
