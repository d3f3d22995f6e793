"""A method's decoder as the API keeps it: built once per (method, GenConfig) with the
lines saying what it used (trained exits, calibration, drafts, kernels, weights), and
which methods the scheduler decodes as rows of its running batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.engine.engine import LayerEngine
from earlyexit.readouts.readout import ExitReadout
from earlyexit.runtime.generation import (
    ADAPTER_THRESHOLD,
    GenConfig,
    GenMethod,
    ThresholdDecoder,
    block_exit,
    build_decoder,
    calm_threshold,
    uses_shallow,
)


@dataclass
class BuiltDecoder:
    """A decoder built for a method and its config, kept for the object's lifetime (FREE's
    adaptive threshold learns across requests)."""

    decoder: Callable[[str, DecodeConfig], DecodeResult]
    shallow: ShallowExit | None
    artifacts: dict[str, str]
    threshold: Callable[[], float | None]


def decodes_in_batch(method: GenMethod) -> bool:
    """Methods the scheduler decodes in a running batch (one token, or a row's n-gram
    drafts, per pass; FREE and CALM rows exit per row: runtime/scheduler.py); the rest
    decode alone, as a scheduler call."""
    return (
        method.name in ("full", "calm")
        or (method.name, method.drafter) == ("lossless", "ngram")
        or (method.name == "free" and method.drafter in ("ngram", "plain"))
    )


def build(
    engine: LayerEngine,
    method: GenMethod,
    config: GenConfig,
    shallow_exit: tuple[ShallowExit, str] | None = None,
) -> BuiltDecoder:
    """The decoder for `method` and `config`, and the lines saying what it used. The shallow
    exit (and its line) is the caller's, kept across decoders, for methods that read one
    (`uses_shallow`)."""
    artifacts: dict[str, str] = {}
    shallow = None
    if method.drafter == "adapter":  # the exit reads the trained draft block
        shallow = block_exit(engine, config.block_layer)
        assert shallow.block is not None
        artifacts["shallow_exit"] = shallow.block.describe()
        given = shallow
    elif uses_shallow(method):
        if shallow_exit is None:
            raise ValueError(f"{method.spec} reads a shallow exit: pass one")
        shallow, line = shallow_exit
        artifacts["shallow_exit"] = line
        given = shallow
    else:  # the method never reads it; build_decoder takes one all the same
        given = ShallowExit(ExitReadout(engine), config.shallow_layer_of(engine.num_layers))
    decoder = build_decoder(method.spec, engine, given, config)
    threshold: Callable[[], float | None] = lambda: None  # noqa: E731
    if shallow is not None and method.name != "static":
        if isinstance(decoder, ThresholdDecoder):  # free, calm: the one they exit by,
            live = decoder.threshold  # fixed, calibrated, certified (risk) or learning
            threshold = lambda: live.value  # noqa: E731
        elif method.value is not None:
            fixed = method.value
            threshold = lambda: fixed  # noqa: E731
        elif method.drafter == "adapter":  # lossless:adapter: a fixed default
            threshold = lambda: ADAPTER_THRESHOLD  # noqa: E731
        else:  # shallow drafts: calibrated (the pairs are cached: no new work)
            level = calm_threshold(engine, shallow, config)
            threshold = lambda: level  # noqa: E731
        if method.official:
            artifacts["calibration"] = (
                "none: FREE's official threshold settings, fitted on this object's requests"
            )
        elif method.value is None and (method.name, method.drafter) != (
            "lossless",
            "adapter",
        ):
            how = "warm-starts FREE's adaptive" if method.name == "free" else "sets the"
            artifacts["calibration"] = (
                f"{config.calibration_prompts} held-out instructions decoded at full depth "
                f"(in memory) {how} threshold"
            )
    elif method.value is not None and method.drafter not in (None, "ngram"):
        fixed_level = method.value  # another drafter's confidence threshold
        threshold = lambda: fixed_level  # noqa: E731
    ngram = method.drafter in ("ngram", "composite")
    if method.name == "lossless" and method.drafter not in ("ngram", "shallow", "composite"):
        artifacts["drafts"] = f"'{method.drafter}' drafter (runtime/generation.py)"
    elif ngram or method.name == "hf-pld":
        if method.name == "hf-pld":
            artifacts["drafts"] = f"transformers' prompt lookup, {int(method.value or 4)}"
        elif method.name == "lossless" and method.drafter == "ngram" and method.value:
            artifacts["drafts"] = f"n-gram, {int(method.value)} per pass (fixed)"
        elif config.draft_tokens:
            artifacts["drafts"] = f"n-gram, {config.draft_tokens} per pass (fixed)"
        else:
            artifacts["drafts"] = (
                "n-gram, per-pass count from this machine's measured pass costs at the "
                "running batch size and this request's own acceptance (costs cached "
                "under EARLYEXIT_HOME/kernels)"
            )
    kernels = engine.kernels
    artifacts["kernels"] = (
        f"{kernels.mode}" + (" (cached timings)" if kernels.cached else "")
        if method.name not in ("hf", "hf-pld", "llama.cpp")
        else "llama.cpp's own (on the model's GGUF)"
        if method.name == "llama.cpp"
        else "the model's own forward (transformers' generate)"
    )
    why = getattr(engine.model.config, "earlyexit_weights_reason", "")
    artifacts["weights"] = engine.weights + (f" ({why})" if why else "")
    return BuiltDecoder(decoder, shallow, artifacts, threshold)
