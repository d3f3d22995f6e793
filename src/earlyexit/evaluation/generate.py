"""`earlyexit bench generate`: decoding methods side by side on a generation task.

Every method decodes the same prompts at batch 1 with the same threads, after one untimed
warm-up decode, prompt by prompt in turn, the methods' order rotating from prompt to
prompt. Two rates, both over full's in the same run:
- `tokens_per_s` / `speedup`: the decode phase, tokens 2..n over the time after the first
  token. Prefill and the first token are full-depth work in every method (bar `static`),
  so this is the part early exit changes, and what per-token latency papers report;
- `e2e_tokens_per_s` / `e2e_speedup`: all tokens over the whole request, prefill
  included (tokenisation excluded): what a user waiting on one answer sees, diluted by
  the prompt's length.
"""

from __future__ import annotations

import numpy as np
from tqdm.auto import tqdm

from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult, ShallowExit
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.evaluation.runner import collector_frozen, collector_paused, round_orders
from earlyexit.risk import bootstrap_ci
from earlyexit.runtime.generation import GenConfig, build_decoder
from earlyexit.tasks.gen_metrics import rouge, task_scores, token_agreement
from earlyexit.tasks.generation import GenerationTask, render_prompt


def bench_generation(
    engine: LayerEngine,
    shallow: ShallowExit,
    task: GenerationTask,
    methods: list[str],
    config: GenConfig,
) -> list[dict]:
    items = task.items(config.limit)
    if not items:
        raise EarlyExitError(f"generation task '{task.name}' has no items")
    prompts = [render_prompt(engine.tokenizer, item.instruction) for item in items]
    references = [item.references for item in items]
    decode_config = DecodeConfig(
        max_new_tokens=config.max_new_tokens or task.max_new_tokens, sampling=config.sampling
    )
    decoders = {spec: build_decoder(spec, engine, shallow, config) for spec in methods}
    if "full" not in decoders:
        decoders = {"full": build_decoder("full", engine, shallow, config), **decoders}
    runs: dict[str, list[DecodeResult]] = {spec: [] for spec in decoders}
    for decoder in decoders.values():
        decoder(prompts[0], DecodeConfig(max_new_tokens=4))  # warm-up
    # prompt-major: every method decodes prompt i before any decodes prompt i+1, so that
    # drift in machine speed over the run hits all methods alike; in an order that rotates
    # from prompt to prompt (no method always first, or always right after full), with
    # the garbage collector paused within a prompt (evaluation.runner)
    names = list(decoders)
    orders = round_orders(len(names), len(prompts))
    with collector_frozen():
        for prompt, order in zip(
            tqdm(prompts, desc=f"{task.name}: decoding", leave=False), orders, strict=True
        ):
            with collector_paused():
                for position in order:
                    spec = names[position]
                    runs[spec].append(decoders[spec](prompt, decode_config))

    def texts(results: list[DecodeResult]) -> list[str]:
        return [
            engine.tokenizer.decode(r.tokens, skip_special_tokens=True).strip() for r in results
        ]

    full_texts = texts(runs["full"])
    full_rate = _decode_rate(runs["full"])
    full_e2e_rate = _tokens_per_s(runs["full"])
    full_scores = task_scores(task.metric, full_texts, references)
    records = []
    for spec in methods:
        results = runs[spec]
        outputs = texts(results)
        scores = task_scores(task.metric, outputs, references)
        generated = sum(len(r.tokens) for r in results)
        rate = _decode_rate(results)
        e2e_rate = _tokens_per_s(results)
        records.append(
            {
                "task": task.name,
                "method": spec,
                "n": len(items),
                "shallow_layer": shallow.layer,
                # FREE's threshold as Learn-then-Test certified it, when --risk set it
                "ltt": ltt.to_dict() if (ltt := getattr(decoders[spec], "ltt", None)) else None,
                "metric": task.metric,
                "quality": scores[task.metric],
                "quality_ci": _quality_ci(task.metric, outputs, references),
                "scores": scores,
                "full_quality": full_scores[task.metric],
                "agreement": rouge(outputs, [(t,) for t in full_texts])["rougeL"],
                "token_agreement": token_agreement(
                    [r.tokens for r in results], [r.tokens for r in runs["full"]]
                ),
                # answers identical to full's: the sequence-level risk --risk bounds
                "same_answers": sum(
                    r.tokens == f.tokens for r, f in zip(results, runs["full"], strict=True)
                )
                / len(items),
                "shallow_fraction": sum(r.shallow_fraction * len(r.tokens) for r in results)
                / max(1, generated),
                "avg_layers": sum(r.layer_tokens for r in results)
                / max(1, sum(len(r.tokens) - 1 for r in results)),
                "tokens": generated,
                "tokens_per_s": rate,
                "speedup": rate / full_rate,
                "speedup_ci": _speedup_ci(results, runs["full"]),
                "e2e_tokens_per_s": e2e_rate,
                "e2e_speedup": e2e_rate / full_e2e_rate,
                "prefill_share": sum(r.prefill_seconds for r in results)
                / max(1e-9, sum(r.seconds for r in results)),
                "rollbacks": sum(r.rollbacks for r in results),
                "tokens_per_pass": _tokens_per_pass(results),
                "draft_acceptance": _acceptance(results),
                # seconds per drafted token, in decode-phase tokens of `full`
                "draft_cost": _draft_cost(results, full_rate),
                "seconds": sum(r.seconds for r in results),
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


def _speedup_ci(results: list[DecodeResult], full: list[DecodeResult]) -> list[float]:
    """95% interval of the decode-phase speedup over full, prompts resampled in pairs."""
    tokens = np.array(
        [[len(r.tokens) - 1, len(f.tokens) - 1] for r, f in zip(results, full, strict=True)]
    )
    seconds = np.array(
        [[r.decode_seconds, f.decode_seconds] for r, f in zip(results, full, strict=True)]
    )

    def speedup(rows: np.ndarray) -> float:
        rate = tokens[rows].sum(0) / np.maximum(seconds[rows].sum(0), 1e-9)
        return float(rate[0] / max(rate[1], 1e-9))

    return bootstrap_ci(np.arange(len(results)), speedup)


def _tokens_per_s(results: list[DecodeResult]) -> float:
    return sum(len(r.tokens) for r in results) / max(1e-9, sum(r.seconds for r in results))


def _decode_rate(results: list[DecodeResult]) -> float:
    tokens = sum(len(r.tokens) - 1 for r in results)
    return tokens / max(1e-9, sum(r.decode_seconds for r in results))


def _tokens_per_pass(results: list[DecodeResult]) -> float | None:
    """Decode-phase tokens per full-model pass (verify or catch-up); None when unknown."""
    passes = sum(r.passes or r.catchups for r in results)
    return sum(len(r.tokens) - 1 for r in results) / passes if passes else None


def _draft_cost(results: list[DecodeResult], full_rate: float) -> float | None:
    """Seconds per drafted token, as a fraction of a full-depth decoded token."""
    drafted = sum(r.drafted for r in results)
    return sum(r.draft_seconds for r in results) / drafted * full_rate if drafted else None


def _acceptance(results: list[DecodeResult]) -> float | None:
    drafted = sum(r.drafted for r in results)
    return sum(r.accepted for r in results) / drafted if drafted else None
