"""`earlyexit bench generate`: decoding methods side by side on a generation task.

Every method decodes the same prompts at batch 1 with the same threads, after one untimed
warm-up decode, prompt by prompt in turn. Two rates, both over full's in the same run:
- `tokens_per_s` / `speedup`: the decode phase, tokens 2..n over the time after the first
  token. Prefill and the first token are full-depth work in every method (bar `static`),
  so this is the part early exit changes, and what per-token latency papers report;
- `e2e_tokens_per_s` / `e2e_speedup`: all tokens over the whole request, prefill
  included (tokenisation excluded): what a user waiting on one answer sees, diluted by
  the prompt's length.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from earlyexit.decoding.calm import decode_calm
from earlyexit.decoding.draft_length import MAX_DRAFT, draft_lengths, measure_pass_costs
from earlyexit.decoding.drafters import CompositeDrafter, Drafter, NgramDrafter, ShallowDrafter
from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.decoding.shallow_deep import (
    DecodeConfig,
    DecodeResult,
    ShallowExit,
    Threshold,
    decode_full,
    decode_shallow_deep,
    decode_static,
)
from earlyexit.decoding.speculative import decode_speculative
from earlyexit.decoding.threshold import BetaMixtureThreshold
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.evaluation.peers import decode_hf
from earlyexit.methods import GEN_METHODS
from earlyexit.readouts.draft_block import saved_block
from earlyexit.tasks.gen_metrics import rouge, task_scores, token_agreement
from earlyexit.tasks.generation import GenerationTask, render_prompt

DRAFTERS = ("ngram", "shallow", "composite", "adapter")
# the draft block's confidence (top-1 minus top-2) above which it keeps drafting
ADAPTER_THRESHOLD = 0.5
DEFAULT_DRAFTER = "ngram"  # measured best on SAMSum/XSum/SQuAD (BENCHMARKS.md)


@dataclass
class GenConfig:
    limit: int = 20
    max_new_tokens: int | None = None  # None: the task's own
    target: float = 0.9  # FREE's adaptive threshold: posterior agreement to reach
    initial_threshold: float = 0.9
    calm_tolerance: float = 0.1  # `calm`: token disagreement allowed on calibration prompts
    # held-out instructions (tasks/generation.py) that calibrate `calm` and warm-start `free`
    calibration_prompts: int = 8
    # n-gram drafts per verify pass; None: chosen per match length from measured pass costs
    draft_tokens: int | None = None
    # `lossless:adapter`: the trained draft block at this layer (None: the only one saved)
    block_layer: int | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # default: greedy


Decoder = Callable[[str, DecodeConfig], DecodeResult]


@dataclass(frozen=True)
class GenMethod:
    """A parsed generation method: `name[:drafter][:value]`."""

    spec: str
    name: str  # full | static | calm | free | lossless | hf | hf-pld
    # lossless: ngram | shallow | composite | adapter; free: ngram | plain | adapter
    drafter: str | None = None
    value: float | None = None  # threshold (calm, free, shallow drafts) or a token count


def parse_method(spec: str, sampling: SamplingConfig | None = None) -> GenMethod:
    """Check a method name and its arguments without any model (the CLI does it first).

    `full`, `static`, `calm[:T]`, `free[:plain|:adapter][:T]` (no T: FREE's adaptive
    threshold; n-gram drafts verified at its catch-ups unless `plain`, the paper's FREE;
    `adapter`: the exit reads the trained draft block),
    `lossless[:ngram[:N]|:shallow[:T]|:composite[:T]|:adapter[:T]]` (draft and verify; N
    fixes the n-gram drafts per pass, else they are chosen per match length from this
    machine's verify-pass costs; T is the shallow drafter's confidence threshold, calibrated
    when not given; `adapter` drafts through the trained draft block, readouts/draft_block.py,
    at its fixed default threshold unless T), and
    the peers `hf` (transformers' greedy `generate`) and `hf-pld[:N]` (its prompt lookup).
    """
    name, _, arg = spec.partition(":")
    parts = arg.split(":") if arg else []
    drafter = None
    if name == "lossless":
        drafter = parts.pop(0) if parts and parts[0] in DRAFTERS else DEFAULT_DRAFTER
        usage = (
            f"bad method '{spec}': use "
            "lossless[:ngram[:N]|:shallow[:T]|:composite[:T]|:adapter[:T]]"
        )
    elif name == "free":
        drafter = parts.pop(0) if parts and parts[0] in ("plain", "adapter") else "ngram"
        usage = f"bad threshold in method '{spec}': use free[:plain|:adapter][:T]"
    elif name in ("full", "static", "hf"):
        usage = f"bad method '{spec}': `{name}` takes no argument"
    elif name == "calm":
        usage = f"bad threshold in method '{spec}': use {name}[:T]"
    elif name == "hf-pld":
        usage = f"bad method '{spec}': use hf-pld[:N], N tokens to look up"
    else:
        raise EarlyExitError(f"unknown generation method '{spec}': use {', '.join(GEN_METHODS)}")
    if len(parts) > (0 if name in ("full", "static", "hf") else 1):
        raise EarlyExitError(usage)
    try:
        value = float(parts[0]) if parts else None
    except ValueError:
        raise EarlyExitError(usage) from None
    if value is not None and not math.isfinite(value):
        raise EarlyExitError(usage)
    counts = name == "hf-pld" or (name == "lossless" and drafter == "ngram")
    if counts and value is not None and (not value.is_integer() or not 1 <= value <= MAX_DRAFT):
        raise EarlyExitError(f"{usage} (N: 1..{MAX_DRAFT} tokens)")
    if name in ("hf", "hf-pld") and sampling is not None and not sampling.greedy:
        raise EarlyExitError(f"'{spec}' is measured greedy only; drop --temperature")
    return GenMethod(spec, name, drafter, value)


def build_decoder(
    spec: str, engine: LayerEngine, shallow: ShallowExit, config: GenConfig
) -> Decoder:
    """The decoder for a method (`parse_method` lists them)."""
    method = parse_method(spec, config.sampling)
    name, fixed = method.name, method.value
    if name == "lossless":
        return _lossless(method, engine, shallow, config)
    if name == "hf":
        return lambda prompt, cfg: decode_hf(engine, prompt, cfg)
    if name == "hf-pld":
        lookup = int(fixed or 4)
        return lambda prompt, cfg: decode_hf(engine, prompt, cfg, prompt_lookup=lookup)
    if name == "full":
        return lambda prompt, cfg: decode_full(engine, prompt, cfg)
    if name == "static":
        return lambda prompt, cfg: decode_static(engine, shallow, prompt, cfg)
    if name == "calm":  # calm:T fixed; `calm` calibrated on held-out prompts
        level = fixed if fixed is not None else calm_threshold(engine, shallow, config)
        return lambda prompt, cfg: decode_calm(engine, shallow, prompt, cfg, Threshold(level))
    if method.drafter == "adapter":  # FREE's exit through the trained draft block
        shallow = block_exit(engine, config.block_layer)
    # free: one threshold per decoder, kept across prompts: FREE fits it online over the
    # stream of requests (one 48-token answer holds too few disagreements to fit a
    # mixture), warm-started from the held-out calibration pairs `calm` uses
    shared = Threshold(fixed) if fixed is not None else _adaptive(engine, shallow, config)
    if method.drafter == "plain":
        return lambda prompt, cfg: decode_shallow_deep(engine, shallow, prompt, cfg, shared)
    new_ngram = _ngram_factory(engine, config.draft_tokens)
    return lambda prompt, cfg: decode_shallow_deep(
        engine, shallow, prompt, cfg, shared, ngram=new_ngram()
    )


# per engine and layer (weakly held): a draft block is loaded once and its exit shared, so
# FREE's calibration pairs (keyed by the exit) are computed once too
_BLOCK_EXITS: weakref.WeakKeyDictionary[LayerEngine, dict] = weakref.WeakKeyDictionary()


def block_exit(engine: LayerEngine, layer: int | None) -> ShallowExit:
    """The exit through the draft block saved for this model at `layer` (None: the only one
    saved; a one-line error names `heads train-block` when there is none)."""
    exits = _BLOCK_EXITS.setdefault(engine, {})
    if layer not in exits:
        exits[layer] = ShallowExit.of_block(saved_block(engine, layer))
    return exits[layer]


def _ngram_factory(engine: LayerEngine, fixed: int | None) -> Callable[[], NgramDrafter]:
    """Fresh n-gram drafters (one per request: the index is per context); draft lengths per
    match length from this machine's verify-pass costs unless `fixed`."""
    lengths = None if fixed else draft_lengths(measure_pass_costs(engine))
    return lambda: NgramDrafter(max_tokens=fixed or MAX_DRAFT, lengths=lengths)


def _lossless(
    method: GenMethod, engine: LayerEngine, shallow: ShallowExit, config: GenConfig
) -> Decoder:
    kind = method.drafter
    fixed = int(method.value) if kind == "ngram" and method.value else config.draft_tokens
    level = method.value if kind != "ngram" else None
    if kind == "adapter":
        exit_ = block_exit(engine, config.block_layer)
        level = ADAPTER_THRESHOLD if level is None else level
        return lambda prompt, cfg: decode_speculative(
            engine, ShallowDrafter(exit_, threshold=level), prompt, cfg
        )
    if kind != "ngram" and level is None:
        level = calm_threshold(engine, shallow, config)
    new_ngram = _ngram_factory(engine, fixed) if kind != "shallow" else None

    def drafter() -> Drafter:
        if new_ngram is None:
            return ShallowDrafter(shallow, threshold=level)
        if kind == "ngram":
            return new_ngram()
        return CompositeDrafter(new_ngram(), ShallowDrafter(shallow, threshold=level))

    return lambda prompt, cfg: decode_speculative(engine, drafter(), prompt, cfg)


def _adaptive(engine: LayerEngine, shallow: ShallowExit, config: GenConfig) -> Threshold:
    threshold = BetaMixtureThreshold(config.target, config.initial_threshold)
    confs, agreed = calibration_pairs(engine, shallow, config)
    threshold.observe(list(zip(confs.tolist(), agreed.tolist(), strict=True)))
    return threshold


# per shallow exit (weakly held: a discarded exit takes its pairs with it)
_PAIRS: weakref.WeakKeyDictionary[ShallowExit, dict] = weakref.WeakKeyDictionary()


def calibration_pairs(
    engine: LayerEngine, shallow: ShallowExit, config: GenConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, agreed) per token of full decoding of held-out instructions (never
    evaluation items); computed once per shallow exit and setting."""
    from earlyexit.decoding.calibrate import confidence_pairs
    from earlyexit.tasks.generation import self_distill_instructions

    cached = _PAIRS.setdefault(shallow, {})
    key = (config.calibration_prompts, config.max_new_tokens)
    if key not in cached:
        prompts = [
            render_prompt(engine.tokenizer, text)
            for text in self_distill_instructions(config.calibration_prompts)
        ]
        decode = DecodeConfig(max_new_tokens=config.max_new_tokens or 48)
        cached[key] = confidence_pairs(engine, shallow, prompts, decode)
    return cached[key]


def calm_threshold(engine: LayerEngine, shallow: ShallowExit, config: GenConfig) -> float:
    """CALM's threshold: at most `calm_tolerance` disagreement on the calibration pairs."""
    from earlyexit.decoding.calibrate import calibrated_threshold

    confs, agreed = calibration_pairs(engine, shallow, config)
    return calibrated_threshold(confs, agreed, config.calm_tolerance)


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
    # drift in machine speed over the run hits all methods alike
    for prompt in tqdm(prompts, desc=f"{task.name}: decoding", leave=False):
        for spec, decoder in decoders.items():
            runs[spec].append(decoder(prompt, decode_config))

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
                "metric": task.metric,
                "quality": scores[task.metric],
                "scores": scores,
                "full_quality": full_scores[task.metric],
                "agreement": rouge(outputs, [(t,) for t in full_texts])["rougeL"],
                "token_agreement": token_agreement(
                    [r.tokens for r in results], [r.tokens for r in runs["full"]]
                ),
                "shallow_fraction": sum(r.shallow_fraction * len(r.tokens) for r in results)
                / max(1, generated),
                "avg_layers": sum(r.layer_tokens for r in results)
                / max(1, sum(len(r.tokens) - 1 for r in results)),
                "tokens": generated,
                "tokens_per_s": rate,
                "speedup": rate / full_rate,
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
            }
        )
    return records


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
