"""`earlyexit bench generate`: decoding methods side by side on a generation task.

Every method decodes the same prompts one request at a time through `EarlyExit.generate`,
the path a user's or a server's request takes (the scheduler at batch 1 for `full`,
`lossless` and `free`), with the same threads, after one untimed warm-up decode, prompt
by prompt in turn, the methods' order rotating from prompt to prompt. Two rates, both
over full's in the same run:
- `tokens_per_s` / `speedup`: the decode phase, tokens 2..n over the time after the first
  token. Prefill and the first token are full-depth work in every method (bar `static`),
  so this is the part early exit changes, and what per-token latency papers report;
- `e2e_tokens_per_s` / `e2e_speedup`: all tokens over the whole request, prefill
  included (tokenisation excluded): what a user waiting on one answer sees, diluted by
  the prompt's length.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from earlyexit.api import EarlyExit, Generation
from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.errors import EarlyExitError
from earlyexit.evaluation.runner import collector_frozen, collector_paused, round_orders
from earlyexit.risk import bootstrap_ci
from earlyexit.runtime.generation import GenConfig
from earlyexit.tasks.gen_metrics import rouge, task_scores, token_agreement
from earlyexit.tasks.generation import GenerationTask, render_prompt


def bench_generation(
    ee: EarlyExit,
    task: GenerationTask,
    methods: list[str],
    config: GenConfig,
    limit: int = 20,
    max_new_tokens: int | None = None,
    sampling: SamplingConfig | None = None,
) -> list[dict]:
    """Every method on the task's first `limit` items through `ee.generate`, the path a
    user's request takes (runtime/scheduler.py), with the decoder settings `config`;
    `max_new_tokens` None: the task's own."""
    items = task.items(limit)
    if not items:
        raise EarlyExitError(f"generation task '{task.name}' has no items")
    sampling = sampling or SamplingConfig()
    prompts = [render_prompt(ee.tokenizer, item.instruction) for item in items]
    references = [item.references for item in items]
    knobs: dict[str, Any] = asdict(config)
    request = {
        "max_new_tokens": max_new_tokens or task.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "chat": False,  # rendered above, as for the calibration prompts
        **knobs,
    }
    names = methods if "full" in methods else ["full", *methods]
    runs: dict[str, list[Generation]] = {spec: [] for spec in names}
    for spec in names:  # builds the decoder (calibration) and warms it up, untimed
        ee.generate(prompts[0], method=spec, **{**request, "max_new_tokens": 4})
    # prompt-major: every method decodes prompt i before any decodes prompt i+1, so that
    # drift in machine speed over the run hits all methods alike; in an order that rotates
    # from prompt to prompt (no method always first, or always right after full), with
    # the garbage collector paused within a prompt (evaluation.runner)
    orders = round_orders(len(names), len(prompts))
    with collector_frozen():
        for prompt, order in zip(
            tqdm(prompts, desc=f"{task.name}: decoding", leave=False), orders, strict=True
        ):
            with collector_paused():
                for position in order:
                    spec = names[position]
                    runs[spec].append(ee.generate(prompt, method=spec, **request))

    def texts(results: list[Generation]) -> list[str]:
        return [ee.tokenizer.decode(g.tokens, skip_special_tokens=True).strip() for g in results]

    full_texts = texts(runs["full"])
    full_rate = _decode_rate(runs["full"])
    full_e2e_rate = _tokens_per_s(runs["full"])
    full_scores = task_scores(task.metric, full_texts, references)
    records = []
    for spec in methods:
        results = runs[spec]
        reports = [g.report for g in results]
        outputs = texts(results)
        scores = task_scores(task.metric, outputs, references)
        generated = sum(len(g.tokens) for g in results)
        rate = _decode_rate(results)
        e2e_rate = _tokens_per_s(results)
        records.append(
            {
                "task": task.name,
                "method": spec,
                "n": len(items),
                "shallow_layer": config.shallow_layer_of(ee.num_layers),
                "exits": config.exits,  # free / calm: tried while they pay, or always
                # FREE's / CALM's threshold as Learn-then-Test certified it (--risk)
                "ltt": reports[-1].ltt,
                "metric": task.metric,
                "quality": scores[task.metric],
                "quality_ci": _quality_ci(task.metric, outputs, references),
                "scores": scores,
                "full_quality": full_scores[task.metric],
                "agreement": rouge(outputs, [(t,) for t in full_texts])["rougeL"],
                "token_agreement": token_agreement(
                    [g.tokens for g in results], [g.tokens for g in runs["full"]]
                ),
                # answers identical to full's: the sequence-level risk --risk bounds
                "same_answers": sum(
                    g.tokens == f.tokens for g, f in zip(results, runs["full"], strict=True)
                )
                / len(items),
                "shallow_fraction": sum(r.shallow_fraction * r.completion_tokens for r in reports)
                / max(1, generated),
                # per decode-phase token: each report's mean, weighted by its tokens 2..n
                "avg_layers": sum(r.avg_layers * max(0, r.completion_tokens - 1) for r in reports)
                / max(1, sum(r.completion_tokens - 1 for r in reports)),
                "tokens": generated,
                "tokens_per_s": rate,
                "speedup": rate / full_rate,
                "speedup_ci": _speedup_ci(results, runs["full"]),
                "e2e_tokens_per_s": e2e_rate,
                "e2e_speedup": e2e_rate / full_e2e_rate,
                "prefill_share": sum(r.prompt_seconds for r in reports)
                / max(1e-9, sum(_seconds(g) for g in results)),
                "rollbacks": sum(r.rollbacks for r in reports),
                "tokens_per_pass": _tokens_per_pass(results),
                "draft_acceptance": _acceptance(results),
                # seconds per drafted token, in decode-phase tokens of `full`
                "draft_cost": _draft_cost(results, full_rate),
                "seconds": sum(_seconds(g) for g in results),
                # which rows of a user's file were used (None for built-in tasks)
                "rows": [item.row for item in items] if items[0].row is not None else None,
            }
        )
    return records


# metrics that are a mean over items: their interval resamples per-item scores
_ITEM_MEANS = ("rouge1", "rouge2", "rougeL", "f1", "em")


def _quality_ci(metric: str, outputs: list[str], references: list) -> list[float]:
    """95% bootstrap interval of the task metric over the prompts."""
    if metric in _ITEM_MEANS:
        items = [
            task_scores(metric, [o], [r])[metric] for o, r in zip(outputs, references, strict=True)
        ]
        return bootstrap_ci(items)

    def corpus(rows: np.ndarray) -> float:  # BLEU: recomputed on each resample (slower)
        return task_scores(metric, [outputs[i] for i in rows], [references[i] for i in rows])[
            metric
        ]

    return bootstrap_ci(np.arange(len(outputs)), corpus, rounds=200)


def _speedup_ci(results: list[Generation], full: list[Generation]) -> list[float]:
    """95% interval of the decode-phase speedup over full, prompts resampled in pairs."""
    tokens = np.array(
        [[len(g.tokens) - 1, len(f.tokens) - 1] for g, f in zip(results, full, strict=True)]
    )
    seconds = np.array(
        [
            [g.report.decode_seconds, f.report.decode_seconds]
            for g, f in zip(results, full, strict=True)
        ]
    )

    def speedup(rows: np.ndarray) -> float:
        rate = tokens[rows].sum(0) / np.maximum(seconds[rows].sum(0), 1e-9)
        return float(rate[0] / max(rate[1], 1e-9))

    return bootstrap_ci(np.arange(len(results)), speedup)


def _seconds(g: Generation) -> float:
    """The whole request: arrival to the last token (tokenisation excluded)."""
    return g.report.prompt_seconds + g.report.decode_seconds


def _tokens_per_s(results: list[Generation]) -> float:
    return sum(len(g.tokens) for g in results) / max(1e-9, sum(_seconds(g) for g in results))


def _decode_rate(results: list[Generation]) -> float:
    tokens = sum(len(g.tokens) - 1 for g in results)
    return tokens / max(1e-9, sum(g.report.decode_seconds for g in results))


def _tokens_per_pass(results: list[Generation]) -> float | None:
    """Decode-phase tokens per full-model pass (verify or catch-up); None when unknown."""
    passes = sum(g.report.passes or g.report.catchups for g in results)
    return sum(len(g.tokens) - 1 for g in results) / passes if passes else None


def _draft_cost(results: list[Generation], full_rate: float) -> float | None:
    """Seconds per drafted token, as a fraction of a full-depth decoded token."""
    drafted = sum(g.report.draft_proposed for g in results)
    seconds = sum(g.report.draft_seconds for g in results)
    return seconds / drafted * full_rate if drafted else None


def _acceptance(results: list[Generation]) -> float | None:
    drafted = sum(g.report.draft_proposed for g in results)
    return sum(g.report.draft_accepted for g in results) / drafted if drafted else None
