"""`earlyexit generate` and `earlyexit bench generate` end to end on real weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from earlyexit.api import EarlyExit
from earlyexit.cli import app
from earlyexit.decoding.shallow_deep import prompt_ids
from earlyexit.tasks.generation import render_prompt

pytestmark = [pytest.mark.weights, pytest.mark.slow]  # each command loads smollm2-135m

runner = CliRunner()
PROMPT = "Summarize: Anna wants to meet Tom at the station at five, but her train is late."
# the lossy methods are checked token by token against one forward pass of the same weights
# (teacher forcing): fp32 and eager, where the two differ by fp32 rounding only
EAGER_FP32 = ("--dtype", "float32", "--compiled", "off")
TOLERANCE = 1e-3  # logits: fp32 rounding between the decode loop and one forward is ~1e-5


@dataclass
class Generated:
    """One `earlyexit generate`: what it printed, and what EarlyExit.generate returned."""

    text: str
    tokens: list[int]
    exit_layers: list[int]
    engine: Any  # the LayerEngine the command loaded
    layer: int  # the shallow exit layer it printed
    prompt: str  # the rendered prompt (the user's message through the chat template)


def _generate(*args: str) -> Generated:
    seen: dict[str, Any] = {}
    real = EarlyExit.generate

    def spied(self, prompt, **kwargs):  # noqa: ANN001, ANN003, ANN202 - generate's
        out = real(self, prompt, **kwargs)
        seen.update(out=out, engine=self.engine)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(EarlyExit, "generate", spied)
        result = runner.invoke(app, ["generate", PROMPT, "--max-new-tokens", "8", *args])
    assert result.exit_code == 0, result.output
    *text, stats = result.stdout.strip().splitlines()  # the text, then a stats line
    assert "tokens/s" in stats
    # which decode steps ran, and why, on stderr (unless --compiled off)
    assert ("decode steps: " in result.stderr) == ("off" not in args)
    generation, engine = seen["out"], seen["engine"]
    tokens, layers = generation.tokens, generation.report.exit_layers
    layer = int(stats.split(" at layer ")[1].split(",")[0])
    out = Generated(
        "\n".join(text).strip(),
        tokens,
        layers,
        engine,
        layer,
        render_prompt(engine.tokenizer, PROMPT),
    )
    # what it printed is what it decoded: the tokens' text, their count, the share that
    # exited at the shallow layer (every exit layer lies in 1..30; the default exit is 24)
    tokenizer = engine.tokenizer
    assert out.text == tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert 1 <= len(tokens) == len(layers) <= 8 and all(1 <= e <= 30 for e in layers)
    early = sum(e < 30 for e in layers) / len(layers)
    assert stats.startswith(f"{len(tokens)} tokens, {early:.0%} at layer 24,"), stats
    return out


def _teacher_forced(out: Generated) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own logits for each emitted token given the prompt and the tokens before
    it, read at the shallow layer through the model's final norm and head (the logit lens:
    the run's home is fresh, so no trained readout exists) and at full depth: [n, vocab] each.
    One forward of the model's own modules, not the engine's decode loops."""
    engine = out.engine
    ids = prompt_ids(engine, out.prompt)
    tokens = torch.tensor(out.tokens[:-1], dtype=ids.dtype)
    with torch.no_grad():
        forward = engine.model(
            input_ids=torch.cat([ids[0], tokens])[None], output_hidden_states=True
        )
    start = ids.shape[1] - 1
    # hidden_states[k]: the output of layer k (0: the embeddings)
    shallow = engine.logits(forward.hidden_states[out.layer][:, start:])[0].float()
    return shallow, forward.logits[0, start:].float()


def _is_argmax(logits: torch.Tensor, token: int) -> bool:
    return bool(logits[token] >= logits.max() - TOLERANCE)


def _gaps(logits: torch.Tensor) -> list[float]:
    """Per row, the top-1 minus top-2 probability: the exit confidence (`--measure gap`)."""
    top = logits.softmax(-1).topk(2).values
    return (top[:, 0] - top[:, 1]).tolist()


def test_generate_methods_from_the_cli() -> None:
    full = _generate("--method", "full")
    assert full.text and full.exit_layers == [30] * len(full.tokens)
    for exact in ("lossless:shallow:0.0", "lossless"):  # drafts all / n-gram drafts
        out = _generate("--method", exact)
        assert out.tokens == full.tokens and out.text == full.text, exact
    # transformers' own generate: the eager engine's arithmetic (the default `--compiled
    # auto` may run compiled steps, which round differently: tests/test_compiled.py)
    hf = _generate("--method", "hf")
    assert hf.tokens == _generate("--method", "full", "--compiled", "off").tokens

    # full: each token is the model's own argmax after the prompt and the tokens before it
    reference = _generate("--method", "full", *EAGER_FP32)
    _, deep = _teacher_forced(reference)
    assert all(_is_argmax(deep[i], t) for i, t in enumerate(reference.tokens))

    # static: every token read out at layer 24, the prompt run through 24 layers only (on
    # this prompt that is not the full model's text: the check tells the two apart)
    static = _generate("--method", "static", *EAGER_FP32)
    shallow, deep = _teacher_forced(static)
    assert static.exit_layers == [24] * len(static.tokens)
    assert all(_is_argmax(shallow[i], t) for i, t in enumerate(static.tokens))
    assert not all(_is_argmax(deep[i], t) for i, t in enumerate(static.tokens))

    # free: a token exits at 24 (the lens's argmax there, confident enough) or is the full
    # model's (a catch-up or a verified draft); catch-ups fill the stacked tokens' deep KV
    # exactly, so both hold against one forward over the emitted text. Its own calibrated
    # threshold keeps every token deep on this prompt; at 0.3, tokens 2, 4 and 6 exit (lens
    # gaps 0.48, 0.48, 0.96, measured on an AMD EPYC) and token 2 is not the full model's
    for spec, threshold in (("free", 0.0), ("free:0.3", 0.3)):
        free = _generate("--method", spec, *EAGER_FP32)
        shallow, deep = _teacher_forced(free)
        gaps = _gaps(shallow)
        emitted = zip(free.tokens, free.exit_layers, strict=True)
        for i, (token, layer) in enumerate(emitted):
            assert layer in (24, 30), (spec, i)
            if layer == 24:
                assert _is_argmax(shallow[i], token) and gaps[i] >= threshold - TOLERANCE
            else:
                assert _is_argmax(deep[i], token), (spec, i)
    assert {24, 30} <= set(free.exit_layers)

    # calm:0.5 with its exit tried at every step (--exits always, CALM's own loop; the
    # default tries it only while that pays): exits at 24 exactly where the lens's top-1
    # minus top-2 probability reaches 0.5 (layers 1..24 are always run, so that gap is the
    # forward's); deep tokens are the full model's until the first exit (after it, deep
    # layers read copied states)
    calm = _generate("--method", "calm:0.5", "--exits", "always", *EAGER_FP32)
    shallow, deep = _teacher_forced(calm)
    gaps = _gaps(shallow)
    layers = calm.exit_layers
    assert layers[0] == 30  # the first token comes from the full-depth prefill
    assert {24, 30} <= set(layers[1:])  # on this prompt: some exit, some do not
    for i, (token, layer) in enumerate(zip(calm.tokens, layers, strict=True)):
        assert layer in (24, 30)
        if layer == 24:
            assert _is_argmax(shallow[i], token) and gaps[i] >= 0.5 - TOLERANCE, i
        else:
            assert i == 0 or gaps[i] < 0.5 + TOLERANCE, i
            assert 24 in layers[:i] or _is_argmax(deep[i], token), i

    sampled = ["--method", "free:0.3", "--temperature", "0.8", "--top-p", "0.9", "--seed", "4"]
    assert _generate(*sampled).tokens == _generate(*sampled).tokens
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
