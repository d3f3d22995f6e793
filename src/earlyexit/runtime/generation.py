"""Generation in the runtime: a method spec (`parse_method`) becomes a decoder
(`build_decoder`), with its calibrated thresholds, drafters and draft-block exits cached
per engine and exit. The API, `earlyexit generate` and `bench generate` all build their
decoders here."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from earlyexit.decoding.calm import decode_calm
from earlyexit.decoding.draft_length import MAX_DRAFT, measure_pass_costs
from earlyexit.decoding.drafters import CompositeDrafter, Drafter, NgramDrafter, ShallowDrafter
from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.decoding.shallow_deep import (
    DecodeConfig,
    DecodeResult,
    Threshold,
    decode_full,
    decode_shallow_deep,
    decode_static,
)
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.decoding.speculative import decode_speculative
from earlyexit.decoding.threshold import BetaMixtureThreshold, OfficialFreeThreshold
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.methods import GEN_METHODS
from earlyexit.readouts.draft_block import saved_block
from earlyexit.risk import CONFIDENCE_GRID, NEVER_EXIT, LTTChoice, check_risk, learn_then_test
from earlyexit.runtime.peers import decode_hf, llama_cpp_peer
from earlyexit.runtime.scheduler import check_exits
from earlyexit.tasks.generation import render_prompt, self_distill_instructions

DRAFTERS = ("ngram", "shallow", "composite", "adapter")
# the draft block's confidence (top-1 minus top-2) above which it keeps drafting
ADAPTER_THRESHOLD = 0.5
DEFAULT_DRAFTER = "ngram"  # measured best on SAMSum/XSum/SQuAD (BENCHMARKS.md)


@dataclass(frozen=True)
class GenConfig:
    """How a generation method's decoder is built: the one config (and the one set of
    defaults) of `EarlyExit.generate`'s knobs, `earlyexit generate` and `bench generate`.
    What varies per request (tokens, sampling, stop strings) is the decode's (DecodeConfig).
    Bad values raise a one-line EarlyExitError when the config is made."""

    shallow_layer: int | None = None  # the shallow exit's layer k; None: 4/5 of the depth
    measure: str = "gap"  # shallow confidence: gap (top1 - top2) or top1
    restrict_vocab: bool = False  # shallow readout over its training vocabulary only
    # n-gram drafts per verify pass; None: chosen per match length from measured pass costs
    draft_tokens: int | None = None
    # `:adapter` methods: the trained draft block at this layer (None: the only one saved)
    block_layer: int | None = None
    # held-out instructions (tasks/generation.py) decoded at full depth that calibrate
    # `calm`, warm-start `free` and certify `--risk`; each costs one decode when a decoder
    # is first built (about 1 s on 2 cores), kept for the object's lifetime
    calibration_prompts: int = 8
    calibration_tokens: int = 48  # tokens decoded per calibration prompt
    target: float = 0.9  # FREE's adaptive threshold: posterior agreement to reach
    initial_threshold: float = 0.9
    calm_tolerance: float = 0.1  # `calm`: token disagreement allowed on calibration prompts
    # Learn-then-Test: `free` / `calm` without a threshold take the lowest one at which at
    # most `risk` of answers differ from the full model's, with probability 1 - `delta` over
    # the calibration prompts (None: FREE's adaptive threshold, CALM's calibrated one)
    risk: float | None = None
    delta: float = 0.1
    # `free` / `calm` in the scheduler: "measured" tries the shallow exit only while that
    # measurably pays (runtime/scheduler.py `exit_pays`: else the step runs full depth,
    # faster and exact); "always" at every step it can, as the papers' loops do
    exits: str = "measured"

    def __post_init__(self) -> None:
        check_risk(self.risk, self.delta)
        check_exits(self.exits)
        if self.measure not in ("gap", "top1"):
            raise EarlyExitError(f"measure must be gap or top1, not '{self.measure}'")
        if self.draft_tokens is not None and not (
            _is_int(self.draft_tokens) and 1 <= self.draft_tokens <= MAX_DRAFT
        ):
            raise EarlyExitError(f"draft_tokens must lie in 1..{MAX_DRAFT}, or None (measured)")
        for name in ("calibration_prompts", "calibration_tokens"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                raise EarlyExitError(f"{name} must be an integer >= 1, not {value!r}")

    def check_layers(self, num_layers: int) -> None:
        """The layer knobs against the model's depth (one line naming the range)."""
        for name in ("shallow_layer", "block_layer"):
            layer = getattr(self, name)
            if layer is not None and not (_is_int(layer) and 1 <= layer < num_layers):
                raise EarlyExitError(f"{name} must be an integer in 1..{num_layers - 1}")

    def shallow_layer_of(self, num_layers: int) -> int:
        """The exit layer k: `shallow_layer`, else 4/5 of the depth (on smollm2-135m exits
        at 24 repay their readout and catch-up, at 20 they do not: BENCHMARKS.md)."""
        return self.shallow_layer or round(0.8 * num_layers)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Decoder = Callable[[str, DecodeConfig], DecodeResult]


@dataclass
class ThresholdDecoder:
    """A decoder with the live threshold it exits by: FREE's adaptive one (it learns across
    requests) or a fixed one, so reports can say which threshold a request used."""

    run: Decoder
    threshold: Threshold
    ltt: LTTChoice | None = None  # what Learn-then-Test certified, when --risk set it

    def __call__(self, prompt: str, config: DecodeConfig) -> DecodeResult:
        self.threshold.begin_sequence()
        return self.run(prompt, config)


@dataclass(frozen=True)
class GenMethod:
    """A parsed generation method: `name[:drafter][:value]`."""

    spec: str
    name: str  # full | static | calm | free | lossless | hf | hf-pld | llama.cpp
    # lossless: ngram | shallow | composite | adapter; free: ngram | plain | adapter
    drafter: str | None = None
    value: float | None = None  # threshold (calm, free, shallow drafts) or a token count
    official: bool = False  # free:...:official: FREE's own adaptive-threshold settings


def parse_method(spec: str, sampling: SamplingConfig | None = None) -> GenMethod:
    """Check a method name and its arguments without any model (the CLI does it first).

    `full`, `static`, `calm[:T]`, `free[:plain|:adapter][:T|:official]` (no T: our
    Beta-mixture adaptive threshold, `official`: the paper code's settings; n-gram drafts
    verified at its catch-ups unless `plain`, the paper's FREE; `adapter`: the exit reads
    the trained draft block),
    `lossless[:ngram[:N]|:shallow[:T]|:composite[:T]|:adapter[:T]]` (draft and verify; N
    fixes the n-gram drafts per pass, else they are chosen per match length from this
    machine's verify-pass costs; T is the shallow drafter's confidence threshold, calibrated
    when not given; `adapter` drafts through the trained draft block, readouts/draft_block.py,
    at its fixed default threshold unless T), and
    the peers `hf` (transformers' greedy `generate`), `hf-pld[:N]` (its prompt lookup) and
    `llama.cpp` (on the model's GGUF).
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
        usage = f"bad threshold in method '{spec}': use free[:plain|:adapter][:T|:official]"
        if parts == ["official"]:
            return GenMethod(spec, name, drafter, None, official=True)
    elif name in ("full", "static", "hf", "llama.cpp"):
        usage = f"bad method '{spec}': `{name}` takes no argument"
    elif name == "calm":
        usage = f"bad threshold in method '{spec}': use {name}[:T]"
    elif name == "hf-pld":
        usage = f"bad method '{spec}': use hf-pld[:N], N tokens to look up"
    else:
        raise EarlyExitError(f"unknown generation method '{spec}': use {', '.join(GEN_METHODS)}")
    if len(parts) > (0 if name in ("full", "static", "hf", "llama.cpp") else 1):
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
    if name in ("hf", "hf-pld", "llama.cpp") and sampling is not None and not sampling.greedy:
        raise EarlyExitError(f"'{spec}' is measured greedy only; drop --temperature")
    return GenMethod(spec, name, drafter, value)


def uses_shallow(method: GenMethod) -> bool:
    """Whether the method reads the shallow exit at layer k (`shallow_exit`)."""
    return method.name in ("static", "calm", "free") or (
        method.name == "lossless" and method.drafter in ("shallow", "composite")
    )


def shallow_exit(engine: LayerEngine, config: GenConfig) -> tuple[ShallowExit, str]:
    """The shallow exit the generation methods read, and a line saying which readout it is.

    At `config.shallow_layer_of`, the readout is the self-distilled `shallow-K` one if
    trained (`earlyexit heads train --shallow K --self-distill N`), else the `default`
    trained readout, else the logit lens; the line names which, with its path.
    """
    from earlyexit.readouts.store import META, default_readout, readout_dir

    layer = config.shallow_layer_of(engine.num_layers)
    name = f"shallow-{layer}"
    if not (readout_dir(engine, name) / META).exists():
        name = "default"
    readout = default_readout(engine, name)
    if layer in readout.trained_layers:
        where = f"layer {layer}: trained readout '{name}' ({readout_dir(engine, name)})"
    else:
        where = (
            f"layer {layer}: logit lens (untrained; train one with "
            f"`earlyexit heads train --shallow {layer} --self-distill 800`)"
        )
    if config.restrict_vocab:
        exit_ = ShallowExit.restricted(readout, layer, config.measure)
        return exit_, where + ", restricted vocabulary"
    return ShallowExit(readout, layer, measure=config.measure), where


def build_decoder(
    spec: str, engine: LayerEngine, shallow: ShallowExit, config: GenConfig
) -> Decoder:
    """The decoder for a method (`parse_method` lists them)."""
    method = parse_method(spec)  # sampling is the request's: checked when it is made
    name, fixed = method.name, method.value
    if name == "lossless":
        return _lossless(method, engine, shallow, config)
    if name == "hf":
        return lambda prompt, cfg: decode_hf(engine, prompt, cfg)
    if name == "llama.cpp":
        return llama_cpp_peer(engine)
    if name == "hf-pld":
        lookup = int(fixed or 4)
        return lambda prompt, cfg: decode_hf(engine, prompt, cfg, prompt_lookup=lookup)
    if name == "full":
        return lambda prompt, cfg: decode_full(engine, prompt, cfg)
    if name == "static":
        return lambda prompt, cfg: decode_static(engine, shallow, prompt, cfg)
    if name == "calm":  # calm:T fixed; `calm` calibrated (or certified) on held-out prompts
        ltt = None
        if fixed is None and config.risk is not None:
            ltt = calm_risk_controlled(engine, shallow, config)
            level = ltt.setting
        else:
            level = fixed if fixed is not None else calm_threshold(engine, shallow, config)
        threshold = Threshold(level)
        return ThresholdDecoder(
            lambda prompt, cfg: decode_calm(engine, shallow, prompt, cfg, threshold),
            threshold,
            ltt,
        )
    if method.drafter == "adapter":  # FREE's exit through the trained draft block
        shallow = block_exit(engine, config.block_layer)
    # free: one threshold per decoder, kept across prompts: FREE fits it online over the
    # stream of requests (one 48-token answer holds too few disagreements to fit a
    # mixture), warm-started from the held-out calibration pairs `calm` uses; with --risk,
    # the fixed threshold Learn-then-Test certifies on those prompts
    ltt = None
    if method.official:
        shared: Threshold = OfficialFreeThreshold(config.initial_threshold)
    elif fixed is None and config.risk is not None:
        ltt = risk_controlled_threshold(engine, shallow, config)
        shared = Threshold(ltt.setting)
    else:
        shared = Threshold(fixed) if fixed is not None else _adaptive(engine, shallow, config)
    if method.drafter == "plain":
        return ThresholdDecoder(
            lambda prompt, cfg: decode_shallow_deep(engine, shallow, prompt, cfg, shared),
            shared,
            ltt,
        )
    new_ngram = _ngram_factory(engine, config.draft_tokens)
    return ThresholdDecoder(
        lambda prompt, cfg: decode_shallow_deep(
            engine, shallow, prompt, cfg, shared, ngram=new_ngram()
        ),
        shared,
        ltt,
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
    """Fresh n-gram drafters (one per request: the index is per context); drafts per pass
    from this machine's verify-pass costs and the request's own acceptance, unless `fixed`."""
    costs = None if fixed else measure_pass_costs(engine)
    return lambda: NgramDrafter(max_tokens=fixed or MAX_DRAFT, costs=costs)


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
    pairs = calibration_pairs(engine, shallow, config)
    threshold.observe(list(zip(pairs.confidence.tolist(), pairs.agreed.tolist(), strict=True)))
    return threshold


# per shallow exit (weakly held: a discarded exit takes its pairs with it)
_PAIRS: weakref.WeakKeyDictionary[ShallowExit, dict] = weakref.WeakKeyDictionary()


class CalibrationPairs(NamedTuple):
    """Per generated token of full decoding of the held-out calibration prompts."""

    confidence: np.ndarray  # the shallow exit's confidence
    agreed: np.ndarray  # its argmax equals the full model's token
    sequence: np.ndarray  # which prompt the token belongs to
    prompts: int  # how many prompts were decoded (some may add no pairs)


def calibration_prompts(engine: LayerEngine, config: GenConfig) -> list[str]:
    """The held-out instructions (never evaluation items) in the model's chat template."""
    return [
        render_prompt(engine.tokenizer, text)
        for text in self_distill_instructions(config.calibration_prompts)
    ]


def _calibration_decode(config: GenConfig) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=config.calibration_tokens)


def calibration_pairs(
    engine: LayerEngine, shallow: ShallowExit, config: GenConfig
) -> CalibrationPairs:
    """The pairs of the held-out calibration prompts; computed once per shallow exit and
    setting."""
    from earlyexit.decoding.calibrate import confidence_pairs

    cached = _PAIRS.setdefault(shallow, {})
    key = (config.calibration_prompts, config.calibration_tokens)
    if key not in cached:
        prompts = calibration_prompts(engine, config)
        decode = _calibration_decode(config)
        confs, agreed, sequence = confidence_pairs(engine, shallow, prompts, decode)
        cached[key] = CalibrationPairs(confs, agreed, sequence, len(prompts))
    return cached[key]


def calm_threshold(engine: LayerEngine, shallow: ShallowExit, config: GenConfig) -> float:
    """CALM's threshold: at most `calm_tolerance` disagreement on the calibration pairs."""
    from earlyexit.decoding.calibrate import calibrated_threshold

    pairs = calibration_pairs(engine, shallow, config)
    return calibrated_threshold(pairs.confidence, pairs.agreed, config.calm_tolerance)


def risk_controlled_threshold(
    engine: LayerEngine, shallow: ShallowExit, config: GenConfig
) -> LTTChoice:
    """FREE's threshold by Learn-then-Test (risk.py): the lowest on CONFIDENCE_GRID at which at
    most `config.risk` of answers differ from the full model's, with probability at least
    1 - `config.delta`, certified on the held-out calibration prompts (sequence level)."""
    from earlyexit.decoding.calibrate import sequence_risk_losses

    if config.risk is None:
        raise ValueError("risk_controlled_threshold needs config.risk")
    pairs = calibration_pairs(engine, shallow, config)
    losses = sequence_risk_losses(
        pairs.confidence, pairs.agreed, pairs.sequence, CONFIDENCE_GRID, pairs.prompts
    )
    return learn_then_test(CONFIDENCE_GRID, losses, config.risk, config.delta, safe=NEVER_EXIT)


# CALM's Learn-then-Test grid: coarser than FREE's (CONFIDENCE_GRID), since every point
# costs a real decode of every calibration prompt
CALM_GRID = [round(0.95 - 0.05 * i, 2) for i in range(19)]


def calm_risk_controlled(engine: LayerEngine, shallow: ShallowExit, config: GenConfig) -> LTTChoice:
    """CALM's threshold by Learn-then-Test at sequence level: the lowest on CALM_GRID at which
    at most `config.risk` of the calibration prompts' answers differ from the full model's,
    with probability at least 1 - `config.delta`. Unlike FREE's, CALM's risk cannot be read
    off teacher-forced pairs: an exit copies its state into the deeper layers' KV, which
    changes the later tokens even when the exited token agreed. So each threshold the walk
    reaches decodes every prompt for real, and a threshold stops decoding once it fails
    whatever the remaining prompts hold (risk.fixed_sequence)."""
    from earlyexit.risk import fixed_sequence, p_value

    if config.risk is None:
        raise ValueError("calm_risk_controlled needs config.risk")
    risk, delta = config.risk, config.delta
    prompts = calibration_prompts(engine, config)
    decode = _calibration_decode(config)
    full = [decode_full(engine, prompt, decode).tokens for prompt in prompts]

    def column(j: int) -> np.ndarray:
        losses = np.zeros(len(prompts))
        for i, prompt in enumerate(prompts):
            tokens = decode_calm(engine, shallow, prompt, decode, Threshold(CALM_GRID[j])).tokens
            losses[i] = float(tokens != full[i])
            if p_value(losses, risk) > delta:  # fails even if every other answer agrees
                break
        return losses

    return fixed_sequence(CALM_GRID, column, risk, delta, safe=NEVER_EXIT)
