"""earlyexit inside lm-evaluation-harness (earlyexit.harness) on real weights: the three
request types against independent references, and the local ee_* task configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance

from earlyexit.api import EarlyExit
from earlyexit.engine import LayerEngine
from earlyexit.harness.lm import EarlyExitLM
from earlyexit.harness.run import LOCAL_TASKS, run_harness
from earlyexit.tasks.builtin import get_task


@pytest.fixture(scope="module")
def lm(smol: LayerEngine) -> EarlyExitLM:
    return EarlyExitLM(ee=EarlyExit.from_engine(smol), method="full", batch_size=3)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_models_own_forward(lm: EarlyExitLM, smol: LayerEngine) -> None:
    """Batched, left-padded engine scoring against transformers' forward of each text alone."""
    pairs = [
        ("Review: a gripping film\nSentiment:", " positive"),
        ("The capital of France is", " Paris, of course"),
        ("Water boils at", " 100 degrees"),
        ("", "Hello world"),
    ]
    ours = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (score, greedy) in zip(pairs, ours, strict=True):
        ctx, cont = lm._pair(context, continuation)
        ids = torch.tensor([ctx + cont])
        with torch.inference_mode():
            logits = smol.model(input_ids=ids).logits.float()
        logprobs = torch.log_softmax(logits[0, len(ctx) - 1 : -1], -1)
        expected = float(logprobs.gather(-1, torch.tensor(cont)[:, None]).sum())
        assert score == pytest.approx(expected, abs=1e-3)  # fp32, padded vs alone: ~1e-5
        assert greedy == bool((logprobs.argmax(-1) == torch.tensor(cont)).all())
    assert ours[1][0] < 0 and len({round(s, 3) for s, _ in ours}) == len(ours)


def test_rolling_loglikelihood_sums_windows(lm: EarlyExitLM, smol: LayerEngine) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 3
    (whole,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    eos = smol.tokenizer.eos_token_id
    tokens = [eos, *lm._encode(text)]
    with torch.inference_mode():
        logits = smol.model(input_ids=torch.tensor([tokens])).logits.float()
    logprobs = torch.log_softmax(logits[0, :-1], -1)
    expected = float(logprobs.gather(-1, torch.tensor(tokens[1:])[:, None]).sum())
    assert whole == pytest.approx(expected, abs=1e-3)
    lm.max_length = 8  # several windows, each conditioned on the tokens before it
    try:
        (windowed,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    finally:
        lm.max_length = lm.ee.context_length
    assert windowed < 0 and windowed != pytest.approx(whole, abs=1e-3)


def test_generate_until_is_earlyexit_generate(smol: LayerEngine) -> None:
    ee = EarlyExit.from_engine(smol)
    context = "Question: What colour is the sky on a clear day?\nAnswer:"
    for method in ("full", "lossless"):
        lm = EarlyExitLM(ee=ee, method=method)
        (text,) = lm.generate_until(
            _requests("generate_until", [(context, {"until": ["\n"], "max_gen_toks": 24})]), True
        )
        alone = ee.generate(context, method=method, max_new_tokens=24, stop=["\n"], chat=False)
        assert text == alone.text and "\n" not in text


@pytest.mark.slow
def test_local_sst2_config_scores_what_earlyexit_scores(lm: EarlyExitLM, tmp_path: Path) -> None:
    """ee_sst2 zero-shot through the harness = the full model's label-word argmax on the
    same dev reviews with the same prompt (the two label words are single tokens)."""
    out = tmp_path / "sst2.json"
    results = run_harness("smollm2-135m", "full", ["ee_sst2"], limit=16, output=out, lm=lm)
    acc = results["results"]["ee_sst2"]["acc,none"]
    assert json.loads(out.read_text())["results"]["ee_sst2"]["acc,none"] == acc
    task = get_task("sst2")
    examples = task.test()[:16]
    prompts = [task.prompt(example) for example in examples]
    words = [lm._encode(word) for word in task.label_words]
    assert all(len(w) == 1 for w in words)
    engine = lm.engine
    correct = 0
    for prompt, example in zip(prompts, examples, strict=True):
        ids, pad = engine.encode([prompt])
        with torch.inference_mode():
            logits = engine.logits(engine.prefill(ids, pad).hidden[:, -1])
        correct += int(int(logits[0, [w[0] for w in words]].argmax()) == example.label)
    assert acc == pytest.approx(correct / 16)


@pytest.mark.slow
def test_every_local_task_runs(lm: EarlyExitLM) -> None:
    main = {"ee_sst2": "acc", "ee_boolq": "acc", "ee_arc_easy": "acc", "ee_piqa": "acc"}
    main |= {"ee_mmlu": "acc", "ee_samsum": "rougeL", "ee_squad": "f1"}
    assert set(LOCAL_TASKS) == set(main)
    results = run_harness("smollm2-135m", "full", list(LOCAL_TASKS), limit=2, lm=lm)
    for task, metric in main.items():
        metrics = results["results"][task]
        assert 0.0 <= metrics[f"{metric},none"] <= 1.0, (task, metrics)
    assert results["earlyexit"]["method"] == "full"
    summary = results["earlyexit"]["generation"]  # ee_samsum's and ee_squad's requests
    assert summary["requests"] == 4 and summary["avg_layers"] == 30.0


def test_unknown_task_is_one_line(lm: EarlyExitLM) -> None:
    from earlyexit.errors import EarlyExitError

    with pytest.raises(EarlyExitError, match="unknown harness task 'ee_nope'"):
        run_harness("smollm2-135m", "full", ["ee_nope"], limit=1, lm=lm)


def test_scoring_at_the_confidence_exit(smol: LayerEngine) -> None:
    """score_exit=confidence:T scores each request at the first layer whose readout gap at
    the context's end reaches T: T = 1 never exits (the full model's scores), a
    low T exits early and changes the scores; each request's layer is recorded."""
    ee = EarlyExit.from_engine(smol)
    pairs = [("Review: a gripping film\nSentiment:", " positive"), ("Water boils at", " 100")]
    requests = _requests("loglikelihood", pairs)
    full = EarlyExitLM(ee=ee).loglikelihood(requests, True)
    never = EarlyExitLM(ee=ee, score_exit="confidence:1.0")
    last = never.loglikelihood(requests, True)
    assert never.exit_layers == [30, 30]
    for (score, greedy), (expected, expected_greedy) in zip(last, full, strict=True):
        # the head runs per row here, over the batch there: 2.6e-6 apart (fp32)
        assert score == pytest.approx(expected, abs=1e-4) and greedy == expected_greedy
    early = EarlyExitLM(ee=ee, score_exit="confidence:0.01")
    scores = early.loglikelihood(requests, True)
    assert all(layer < 30 for layer in early.exit_layers) and len(early.exit_layers) == 2
    assert all(abs(a[0] - b[0]) > 1e-3 for a, b in zip(scores, full, strict=True))
    from earlyexit.errors import EarlyExitError

    with pytest.raises(EarlyExitError, match="confidence:T"):
        EarlyExitLM(ee=ee, score_exit="adainfer")
