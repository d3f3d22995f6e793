"""`earlyexit generate` and `earlyexit bench generate` end to end on real weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from earlyexit.cli import app

pytestmark = [pytest.mark.weights, pytest.mark.slow]  # each command loads smollm2-135m

runner = CliRunner()
PROMPT = "Summarize: Anna wants to meet Tom at the station at five, but her train is late."


def _generate(*args: str) -> str:
    result = runner.invoke(app, ["generate", PROMPT, "--max-new-tokens", "8", *args])
    assert result.exit_code == 0, result.output
    *text, stats = result.stdout.strip().splitlines()  # the text, then a stats line
    assert "tokens/s" in stats
    # which decode steps ran, and why, on stderr (unless --compiled off)
    assert ("decode steps: " in result.stderr) == ("off" not in args)
    return "\n".join(text).strip()


def test_generate_methods_from_the_cli() -> None:
    full = _generate("--method", "full")
    assert full
    assert _generate("--method", "lossless:shallow:0.0") == full  # drafts all, still exact
    assert _generate("--method", "lossless") == full  # n-gram drafts
    # transformers' own generate: the eager engine's arithmetic (the default `--compiled
    # auto` may run compiled steps, which round differently: tests/test_compiled.py)
    assert _generate("--method", "hf") == _generate("--method", "full", "--compiled", "off")
    for method in ("free", "calm:0.5", "static"):
        _generate("--method", method)
    sampled = ["--method", "free:0.3", "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]
    assert _generate(*sampled) == _generate(*sampled)
    bad = runner.invoke(app, ["generate", PROMPT, "--method", "fastest"])
    assert bad.exit_code != 0 and "unknown generation method 'fastest'" in bad.output
    for method, message in [
        ("lossless:ngram:9", "N: 1..7"),
        ("lossless:ngram:0.5", "N: 1..7"),
        ("lossless:fast", "use lossless[:ngram[:N]"),
        ("hf:3", "`hf` takes no argument"),
        ("hf-pld:x", "use hf-pld[:N]"),
    ]:
        bad = runner.invoke(app, ["generate", PROMPT, "--method", method])
        assert bad.exit_code == 2 and message in bad.output, (method, bad.output)


def test_bench_generate_writes_the_issue_records(tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    args = ["bench", "generate", "--task", "squad", "--limit", "2", "--max-new-tokens", "6"]
    args += ["--compiled", "off"]  # `hf` below is exact against the eager engine
    methods = "full,static,calm:0.5,calm,free,lossless,lossless:ngram:3,hf,hf-pld"
    risk = ["--risk", "0.5", "--delta", "0.5"]  # Learn-then-Test picks free's and calm's
    result = runner.invoke(app, [*args, "--method", methods, *risk, "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in json.loads(out.read_text())["records"]}
    assert list(records) == methods.split(",")
    for spec in ("free", "calm"):
        ltt = records[spec]["ltt"]
        assert ltt["n"] == 8 and ltt["risk"] == 0.5 and ltt["tested"] >= 1
    assert "LTT" in result.output
    assert all(r["ltt"] is None for spec, r in records.items() if spec not in ("free", "calm"))
    for r in records.values():
        assert r["quality_ci"][0] <= r["quality"] <= r["quality_ci"][1]
        assert r["speedup_ci"][0] <= r["speedup_ci"][1]
    keys = {"task", "method", "n", "quality", "full_quality", "agreement", "shallow_fraction"}
    assert all(keys | {"avg_layers", "tokens_per_s", "speedup"} <= set(r) for r in records.values())
    for exact in ("lossless", "lossless:ngram:3", "hf", "hf-pld"):
        assert records[exact]["token_agreement"] == 1.0, exact
        assert records[exact]["same_answers"] == 1.0, exact
    assert records["full"]["tokens_per_pass"] == 1.0
    assert records["lossless:ngram:3"]["draft_acceptance"] is not None
    assert 0 <= records["lossless:ngram:3"]["draft_cost"] < 0.1  # a dictionary look-up
    assert (
        records["hf"]["draft_acceptance"] is None and records["static"]["tokens_per_pass"] is None
    )
    assert records["static"]["shallow_fraction"] == 1.0 and records["full"]["avg_layers"] == 30
    assert all(r["n"] == 2 and r["task"] == "squad" for r in records.values())
    assert all(r["shallow_layer"] == 24 for r in records.values())  # default: 4/5 of 30


def test_bench_generate_on_a_users_file(tmp_path: Path) -> None:
    """--data with fields, a template and a metric: the built-in record keys, plus the rows
    of the file that were used (a seeded sample, not the first rows)."""
    data = tmp_path / "notes.csv"
    lines = ["text,summary"] + [
        f'"Tom meets Ann at {h} at the station.",Tom meets Ann at {h}.' for h in range(1, 9)
    ]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "gen.json"
    args = ["bench", "generate", "--data", str(data), "--prompt-field", "text"]
    args += ["--reference-field", "summary", "--template", "Summarize: {prompt}"]
    args += [
        "--metric",
        "rougeL",
        "--limit",
        "3",
        "--max-new-tokens",
        "6",
        "--method",
        "full,lossless",
    ]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())["records"]
    assert [r["method"] for r in records] == ["full", "lossless"]
    for record in records:
        assert record["task"] == "notes" and record["metric"] == "rougeL" and record["n"] == 3
        assert len(record["rows"]) == 3 and set(record["rows"]) <= set(range(8))
    assert records[0]["rows"] == records[1]["rows"] != [0, 1, 2]
    bad = runner.invoke(app, [*args[:-2], "--method", "full", "--prompt-field", "body"])
    assert bad.exit_code == 2 and "no field 'body'" in bad.output
