"""The public runtime API: load a model once, then generate, stream and classify.

    from earlyexit.api import EarlyExit

    ee = EarlyExit.load("smollm2-135m")
    out = ee.generate("Name three colours.", method="lossless", max_new_tokens=24)
    print(out.text, out.finish_reason, out.report.tokens_per_s)

One `EarlyExit` holds one model (a `LayerEngine`), the artifacts built for it on first use
(decoders with their calibrated thresholds, shallow exits, task probes, AdaInfer stoppers,
RAEE databases), one lock and one scheduler. `full`, `lossless` (n-gram drafts) and `free`
requests go through the scheduler (runtime/scheduler.py): concurrent callers (a server's
request threads) are decoded together, continuously batched, up to `max_batch` rows. Every
other piece of model work (other methods' decodes, a decoder's first build,
classification) is a scheduler call: run whole in the loop's thread between two
iterations, holding the lock, so each model computation runs alone and in one thread.

Every request reports what it used (`report.artifacts`): a trained readout with its path,
or "logit lens (untrained)"; a probe fitted on N train prompts or loaded from a path; and
so on. Nothing falls back silently. Bad input raises `EarlyExitError` with one line naming
the fix, before any model work.

The methods and their parsing are those of `earlyexit generate` / `earlyexit eval`
(`earlyexit.runtime.generation`, `earlyexit.runtime.calibration`): this module only wires
them to one long-lived object and reports what happened.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult, ShallowExit
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.readout import ExitReadout
from earlyexit.runtime.calibration import (
    EvalConfig,
    MethodBuilder,
    calibrate,
    method_args,
    needs_calibration,
)
from earlyexit.runtime.generation import (
    ADAPTER_THRESHOLD,
    GenConfig,
    GenMethod,
    ThresholdDecoder,
    block_exit,
    build_decoder,
    calm_threshold,
    parse_method,
    shallow_exit,
    uses_shallow,
)
from earlyexit.runtime.kept import Kept
from earlyexit.runtime.scheduler import (
    FreeRow,
    Job,
    RequestTimeout,
    Scheduler,
    SchedulerStats,
    check_limits,
    check_timeout,
)
from earlyexit.tasks.base import Example, Task

__all__ = [
    "Classification",
    "ClassificationReport",
    "EarlyExit",
    "Generation",
    "GenerationReport",
    "Stream",
    "StreamChunk",
]

DATASET_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")  # earlyexit.tasks.custom.FORMATS
KEPT_DECODERS = 32  # decoders (and shallow exits) kept per object, least recently used go
KEPT_TASKS = 8  # classification tasks' calibrations kept per object


# ------------------------------------------------------------------------- results


@dataclass
class GenerationReport:
    """What one generate request did.

    `avg_layers` is compute, not depth: decoder-layer applications per decode-phase token
    (tokens 2..n; the first token is the prefill's), rejected drafts and catch-ups included.
    `tokens_per_s` covers the whole request (prefill included, tokenisation excluded);
    `decode_tokens_per_s` only tokens 2..n, the part early exit speeds up.
    """

    method: str
    num_layers: int
    shallow_layer: int | None  # the exit layer k of methods with a shallow exit
    avg_layers: float
    shallow_fraction: float  # emitted tokens that exited before the last layer
    exit_layers: list[int]  # per emitted token: the layer that produced it (k or L)
    draft_proposed: int
    draft_accepted: int
    draft_seconds: float  # looking drafts up (n-gram) or running the drafter
    passes: int  # full-depth verify passes (lossless, full, hf-pld)
    catchups: int  # deep passes over stacked shallow tokens (free)
    rollbacks: int
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float  # arrival to the first token: queue wait, prefill (TTFT)
    queue_seconds: float  # waiting for a row in the scheduler's batch (0: not batched)
    batched: bool  # decoded by the scheduler in a running batch (else alone, a scheduler call)
    decode_seconds: float  # tokens 2..n
    setup_seconds: float  # building the decoder on this call (0 once built: kept in memory)
    tokens_per_s: float
    decode_tokens_per_s: float
    threshold: float | None  # the confidence threshold in force (calm, free, shallow drafts)
    # what Learn-then-Test certified for this decoder's threshold (the `risk` knob): risk,
    # delta, n, the setting and whether it was certified (risk.LTTChoice); else None
    ltt: dict | None
    artifacts: dict[str, str]  # what was trained, calibrated or measured, and where from


@dataclass
class Generation:
    text: str  # decoded, special tokens skipped, cut before a stop string
    tokens: list[int]  # every emitted token id (an EOS or a stop string's tokens included)
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    report: GenerationReport


@dataclass
class StreamChunk:
    """Tokens emitted since the previous chunk. `text` is the text they complete: a
    character split over tokens, or text that may begin a stop string, is held back until
    it is settled, so the chunks' texts add up to the final `Generation.text`. The last
    chunk carries the finished `generation` (and possibly no tokens)."""

    text: str
    tokens: list[int]
    exit_layers: list[int]
    generation: Generation | None = None


@dataclass
class ClassificationReport:
    method: str
    task: str
    num_layers: int
    avg_layers: float  # mean exit layer (1..L)
    layers_saved: float  # 1 - avg_layers / L
    seconds: float  # forward passes and exit decisions (tokenisation excluded)
    decision_seconds: float  # readouts, policy, embedding and retrieval
    setup_seconds: float  # calibration on this call (0 when its artifacts were kept)
    shots: int
    readout: str  # probe | general
    policy: dict
    artifacts: dict[str, str]


@dataclass
class Classification:
    labels: list[str]  # per text: its class's label word
    classes: list[int]  # per text: the class index (the task's label-word order)
    exit_layers: list[int]  # per text: the layer it exited at (1..L)
    report: ClassificationReport


# ------------------------------------------------------------------------- generation knobs

# `**knobs` of generate / stream: how the decoder is built (GenConfig, the one config of
# every generation path) and two settings of the decode itself
DECODE_KNOBS = {"max_stack": 16, "stop_at_eos": True}
KNOBS = (*(f.name for f in fields(GenConfig)), *DECODE_KNOBS)


def _knobs(given: Mapping[str, Any], num_layers: int) -> tuple[GenConfig, dict[str, Any]]:
    """The request's GenConfig and decode settings, checked (one line naming the fix)."""
    unknown = sorted(set(given) - set(KNOBS))
    if unknown:
        raise EarlyExitError(f"unknown generate option '{unknown[0]}': use {', '.join(KNOBS)}")
    config = GenConfig(**{k: v for k, v in given.items() if k not in DECODE_KNOBS})
    config.check_layers(num_layers)
    decode = {k: given.get(k, default) for k, default in DECODE_KNOBS.items()}
    stack = decode["max_stack"]
    if not (isinstance(stack, int) and not isinstance(stack, bool) and stack >= 1):
        raise EarlyExitError(f"max_stack must be an integer >= 1, not {stack!r}")
    decode["stop_at_eos"] = bool(decode["stop_at_eos"])
    return config, decode


@dataclass
class _Request:
    """A validated generate / stream request."""

    method: GenMethod
    prompt: str  # rendered (chat template applied when asked)
    decode: DecodeConfig  # on_token set per run
    config: GenConfig  # how its decoder is built

    @property
    def key(self) -> tuple:
        """What its decoder depends on (per-request settings excluded)."""
        return (self.method.spec, self.config)


@dataclass
class _Built:
    """A decoder built for a method and its knobs, kept for the object's lifetime (FREE's
    adaptive threshold learns across requests)."""

    decoder: Callable[[str, DecodeConfig], DecodeResult]
    shallow: ShallowExit | None
    artifacts: dict[str, str]
    threshold: Callable[[], float | None]


def _with_deadline(
    listener: Callable[[int, int], None] | None, began: float, limit: float
) -> Callable[[int, int], None]:
    """`listener`, raising RequestTimeout at the first token past `limit` seconds."""

    def timed(token: int, layer: int) -> None:
        if time.perf_counter() - began > limit:
            raise RequestTimeout(limit)
        if listener is not None:
            listener(token, layer)

    return timed


class _Cancelled(Exception):
    """Raised by a stream's token listener once its consumer has gone: ends the decode."""


class _TextAssembler:
    """Turns emitted tokens into text, incrementally: a character split over tokens is held
    until complete (decoding a window from the last settled token, as text-generation-
    inference does), and text that may begin a stop string is held until it does or not.
    `generate` and `stream` both assemble through this, so their texts are the same."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.longest = max((len(s) for s in stop), default=0)
        self.tokens: list[int] = []
        self.text = ""  # settled text (cut before a stop string once one is seen)
        self.stopped = False  # a stop string was seen
        self._prefix = self._read = 0  # token offsets of the decode window
        self._sent = 0  # characters of `text` handed out

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def push(self, token: int, layer: int = 0) -> None:
        self.tokens.append(token)
        if self.stopped:
            return
        before = self._decode(self.tokens[self._prefix : self._read])
        after = self._decode(self.tokens[self._prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return  # nothing new yet, or a character still incomplete
        start = max(0, len(self.text) - self.longest + 1)
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.tokens)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True

    def release(self, final: bool = False) -> str:
        """Text settled since the last call (all of it when `final`)."""
        end = len(self.text)
        if not final and not self.stopped:
            for stop in self.stop:  # hold back a suffix that may begin a stop string
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if self.text.endswith(stop[:size]):
                        end = min(end, len(self.text) - size)
                        break
        end = max(end, self._sent)
        delta, self._sent = self.text[self._sent : end], end
        return delta


# ------------------------------------------------------------------------- classification


@dataclass
class _TaskState:
    """Per task and setting: demonstrations, candidates and the artifacts built so far."""

    task: Task
    config: EvalConfig
    demos: list[Example]
    candidates: torch.Tensor
    builder: MethodBuilder | None = None  # with the calibration, once run
    readout: Any = None  # the calibrated task readout (probe or general)
    calibrated: str = ""  # what the calibration was, for reports
    policies: dict[str, tuple[Any, Any, dict[str, str]]] = field(default_factory=dict)
    saved: tuple[MethodBuilder, Any, dict[str, str]] | None = None  # a saved RAEE database
    saved_checked: bool = False


# ------------------------------------------------------------------------- the object


class EarlyExit:
    """One model, loaded once: `generate`, `stream` and `classify` with early exit.

    `full` and `lossless` (n-gram) requests from concurrent callers are decoded together by
    the scheduler, up to `max_batch` rows (1: one at a time, first come first served), with
    at most `max_queue` waiting. Other methods hold this object's lock while they run (a
    stream from its first token to its last). Artifacts built on first use (decoders and their
    calibration, shallow exits, task probes, stoppers, RAEE databases) are kept in memory
    on the object; make one object per model and keep it.
    """

    def __init__(
        self,
        engine: LayerEngine,
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout: float | None = None,
    ) -> None:
        check_timeout(request_timeout)
        self.engine = engine
        self.request_timeout = request_timeout
        # torch's CPU threads when the object was made; every request runs with them,
        # from whichever thread calls (OpenMP keeps the count per thread)
        self.threads = torch.get_num_threads()
        self._lock = threading.Lock()
        self.scheduler = Scheduler(engine, self._lock, max_batch, max_queue, threads=self.threads)
        self._general: ExitReadout | None = None
        self._lens: ExitReadout | None = None
        # kept across requests, bounded (clients choose the keys): runtime/kept.py
        self._decoders: Kept[_Built] = Kept(KEPT_DECODERS)
        self._shallow_exits: Kept[tuple[ShallowExit, str]] = Kept(KEPT_DECODERS)
        self._tasks: Kept[_TaskState] = Kept(KEPT_TASKS)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str,
        dtype: str = "auto",
        threads: int | None = None,
        kernels: str = "auto",
        compiled: bool | str = "auto",
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout: float | None = None,
    ) -> EarlyExit:
        """Load `model`: a registry name (`smollm2-135m`, `gemma3-270m`; fetched and
        verified on first use), a local Hugging Face directory, a .gguf file or a hub id.

        `dtype`: `auto` (int4 where the weights are exact 4-bit groups, as the built-in
        smollm2's Q4_1, and int4 was measured faster on this machine; else float32),
        `float32`, `bfloat16`, `int4` or `int8`. `threads`: torch's CPU threads
        (process-wide: torch.set_num_threads). `kernels`: the engine's few-row fp32 matmul
        kernels: `auto` (timed on this machine, cached), `plain` or `skinny`. `compiled`:
        decode steps at batch 1 as compiled graphs (engine/compiled.py): `auto` (where the
        layers have one, int4 Llama layers, and a timed step was faster on this machine;
        the layer step is built once per machine, about 15 s, then loads in
        milliseconds), `on` or `off` (the eager engine, bit-identical to the model's own layers).
        `max_batch`, `max_queue`: the scheduler's running rows and waiting requests;
        `request_timeout`: seconds a generate request may take, waiting included (then
        RequestTimeout; None: no limit).
        """
        from earlyexit.engine.engine import COMPILED_MODES
        from earlyexit.engine.kernels import MODES
        from earlyexit.models.load import load_model, parse_dtype

        parse_dtype(dtype)
        if kernels not in MODES:
            raise EarlyExitError(f"unknown kernels '{kernels}': use {', '.join(MODES)}")
        if compiled not in (True, False, *COMPILED_MODES):
            raise EarlyExitError(
                f"unknown compiled mode {compiled!r}: use {', '.join(COMPILED_MODES)}"
            )
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise EarlyExitError(f"threads must be a positive integer, not {threads!r}")
            torch.set_num_threads(threads)
        check_limits(max_batch, max_queue)
        check_timeout(request_timeout)
        engine = LayerEngine(load_model(model, dtype=dtype, kernels=kernels), kernels=kernels)
        engine.set_compiled(compiled)
        return cls(engine, max_batch, max_queue, request_timeout)

    @classmethod
    def from_engine(
        cls,
        engine: LayerEngine,
        max_batch: int = 8,
        max_queue: int = 64,
        request_timeout: float | None = None,
    ) -> EarlyExit:
        """Wrap an engine already built (it is used as is: kernels, dtype, threads)."""
        return cls(engine, max_batch, max_queue, request_timeout)

    def scheduler_stats(self) -> SchedulerStats:
        """Running rows, waiting requests, decode passes and the mean running batch."""
        return self.scheduler.stats()

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new requests, let running ones end within `timeout` s, stop the loop."""
        self.scheduler.close(timeout)

    def check_room(self, method: str) -> None:
        """Raise QueueFull / ShuttingDown now when a request of `method` would be refused
        (a server checks before it starts a stream's 200 response)."""
        if self._batched(parse_method(method)):
            self.scheduler.check_room()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def num_layers(self) -> int:
        return self.engine.num_layers

    @property
    def name(self) -> str:
        return self.engine.loaded.name

    def __repr__(self) -> str:
        return f"EarlyExit({self.name!r}, {self.num_layers} layers, {self.engine.weights})"

    @property
    def general_readout(self) -> ExitReadout:
        """The saved `default` readout (`earlyexit heads train`) if any, else the logit lens."""
        if self._general is None:
            from earlyexit.readouts.store import default_readout

            self._general = default_readout(self.engine)
        return self._general

    def _base_readout(self, config: EvalConfig) -> ExitReadout:
        """The readout under the task probes and the RAEE traces: the saved general one,
        or with readout='lens' the model's own norm and head (RAEE's paper protocol)."""
        if config.readout != "lens":
            return self.general_readout
        if self._lens is None:
            self._lens = ExitReadout(self.engine)
        return self._lens

    def _general_line(self, config: EvalConfig | None = None) -> str:
        from earlyexit.readouts.store import readout_dir

        if config is not None and config.readout == "lens":
            return "logit lens: the model's own norm and head (readout='lens')"
        if self.general_readout.trained_layers:
            return f"trained readout 'default' ({readout_dir(self.engine)})"
        return "logit lens (untrained; `earlyexit heads train` trains readouts)"

    # ---- generation --------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[Mapping[str, str]],
        *,
        method: str = "lossless",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        **knobs: Any,
    ) -> Generation:
        """Generate a completion of `prompt` (batch 1) with a decoding method.

        Methods: those of `earlyexit generate` (the registry in `earlyexit.methods`):
        `lossless[...]` (draft and verify: the full model's own output), `full`, `static`,
        `calm[:T]`, `free[...]` (lossy early exit), and the peers `hf`, `hf-pld[:N]`,
        `llama.cpp`.
        `temperature` 0 is greedy; `seed` fixes sampling (None: a fresh one). `stop`: strings
        that end the completion (not included in `text`). `chat`: render `prompt` as a user
        turn through the tokenizer's chat template; a list of {"role", "content"} messages
        is always rendered through it. `knobs`: how the decoder is built, the fields of
        `earlyexit.runtime.generation.GenConfig` with its defaults (shallow_layer, measure,
        restrict_vocab, draft_tokens, block_layer, calibration_prompts, calibration_tokens,
        target, initial_threshold, calm_tolerance, risk, delta: the settings of `earlyexit
        generate` and `bench generate`), and the decode's max_stack and stop_at_eos.
        """
        request = self._request(
            prompt, method, max_new_tokens, temperature, top_p, seed, stop, chat, knobs
        )
        return self._execute(request, None, threading.Event())

    def stream(
        self,
        prompt: str | list[Mapping[str, str]],
        *,
        method: str = "lossless",
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        chat: bool = True,
        **knobs: Any,
    ) -> Stream:
        """Like `generate`, but yields `StreamChunk`s as tokens are emitted (see `Stream`).
        Arguments are checked now; decoding starts at the first `next()`."""
        request = self._request(
            prompt, method, max_new_tokens, temperature, top_p, seed, stop, chat, knobs
        )
        return Stream(self, request)

    def _request(
        self,
        prompt: str | list[Mapping[str, str]],
        method: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: str | Sequence[str],
        chat: bool,
        knobs: Mapping[str, Any],
    ) -> _Request:
        if isinstance(prompt, list):
            prompt, chat = self._render_messages(prompt), False
        if not isinstance(prompt, str) or not prompt.strip():
            raise EarlyExitError("the prompt is empty; pass some text to generate from")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise EarlyExitError(f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) and s for s in stops):
            raise EarlyExitError("stop strings must be non-empty strings")
        if seed is None:
            seed = random.getrandbits(62)
        sampling = SamplingConfig(float(temperature), float(top_p), int(seed))
        parsed = parse_method(method, sampling)  # unknown methods fail before any work
        config, settings = _knobs(knobs, self.num_layers)
        text = prompt
        if chat:
            from earlyexit.tasks.generation import render_prompt

            text = render_prompt(self.tokenizer, prompt)
        self._check_context(text, max_new_tokens)
        decode = DecodeConfig(
            max_new_tokens=max_new_tokens,
            stop_strings=stops,
            sampling=sampling,
            **settings,
        )
        return _Request(parsed, text, decode, config)

    def _use_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    @property
    def context_length(self) -> int:
        """Tokens the model attends over: prompt plus completion must fit in it."""
        return int(getattr(self.engine.model.config, "max_position_embeddings", 0) or 2048)

    def _check_context(self, text: str, max_new_tokens: int) -> None:
        length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if length + max_new_tokens > self.context_length:
            raise EarlyExitError(
                f"the prompt is {length} token(s) and max_new_tokens {max_new_tokens}: over the "
                f"model's context of {self.context_length} tokens; shorten the prompt or ask "
                "for fewer tokens"
            )

    def _render_messages(self, messages: list) -> str:
        """Chat messages ({"role", "content"} dicts) through the tokenizer's chat template,
        ready for the assistant's turn."""
        roles = ("system", "user", "assistant", "developer", "tool")
        for message in messages:
            if not (
                isinstance(message, Mapping)
                and message.get("role") in roles
                and isinstance(message.get("content"), str)
            ):
                raise EarlyExitError(
                    "each message must be {'role': one of " + ", ".join(roles) + ", "
                    "'content': a string}"
                )
        if not messages:
            raise EarlyExitError("messages is empty; pass at least one message")
        if not getattr(self.tokenizer, "chat_template", None):
            raise EarlyExitError(
                f"{self.name} has no chat template; send plain text (a completion) instead"
            )
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        return self.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)

    def _shallow(self, config: GenConfig) -> tuple[ShallowExit, str]:
        key = (config.shallow_layer_of(self.num_layers), config.measure, config.restrict_vocab)
        kept = self._shallow_exits.get(key)
        if kept is None:
            kept = self._shallow_exits.put(key, shallow_exit(self.engine, config))
        return kept

    def _has_built(self, request: _Request) -> bool:
        return request.key in self._decoders

    def _built(self, request: _Request) -> _Built:
        """The decoder for the request's method and knobs (built once, then kept)."""
        method, config = request.method, request.config
        key = request.key
        kept = self._decoders.get(key)
        if kept is not None:
            return kept
        artifacts: dict[str, str] = {}
        shallow = None
        if method.drafter == "adapter":  # the exit reads the trained draft block
            shallow = block_exit(self.engine, config.block_layer)
            assert shallow.block is not None
            artifacts["shallow_exit"] = shallow.block.describe()
            given = shallow
        elif uses_shallow(method):
            shallow, line = self._shallow(config)
            artifacts["shallow_exit"] = line
            given = shallow
        else:  # the method never reads it; build_decoder takes one all the same
            given = ShallowExit(ExitReadout(self.engine), config.shallow_layer_of(self.num_layers))
        decoder = build_decoder(method.spec, self.engine, given, config)
        threshold: Callable[[], float | None] = lambda: None  # noqa: E731
        if shallow is not None and method.name != "static":
            if method.value is not None:
                fixed = method.value
                threshold = lambda: fixed  # noqa: E731
            elif method.name == "free":
                assert isinstance(decoder, ThresholdDecoder)
                shared = decoder.threshold
                threshold = lambda: shared.value  # noqa: E731
            elif method.drafter == "adapter":  # lossless:adapter: a fixed default
                threshold = lambda: ADAPTER_THRESHOLD  # noqa: E731
            else:  # calm, shallow drafts: calibrated (the pairs are cached: no new work)
                level = calm_threshold(self.engine, shallow, config)
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
        kernels = self.engine.kernels
        artifacts["kernels"] = (
            f"{kernels.mode}" + (" (cached timings)" if kernels.cached else "")
            if method.name not in ("hf", "hf-pld", "llama.cpp")
            else "llama.cpp's own (on the model's GGUF)"
            if method.name == "llama.cpp"
            else "the model's own forward (transformers' generate)"
        )
        why = getattr(self.engine.model.config, "earlyexit_weights_reason", "")
        artifacts["weights"] = self.engine.weights + (f" ({why})" if why else "")
        built = _Built(decoder, shallow, artifacts, threshold)
        self._decoders.put(key, built)
        return built

    @staticmethod
    def _batched(method: GenMethod) -> bool:
        """Methods the scheduler decodes in a running batch (one token, or a row's n-gram
        drafts, per pass; FREE rows exit per row: runtime/scheduler.py); the rest decode
        alone, as a scheduler call."""
        return (
            method.name == "full"
            or (method.name, method.drafter) == ("lossless", "ngram")
            or (method.name == "free" and method.drafter in ("ngram", "plain"))
        )

    def _execute(
        self,
        request: _Request,
        listener: Callable[[int, int], None] | None,
        cancel: threading.Event,
        may_drive: Callable[[], bool] | None = None,
    ) -> Generation:
        """One decode: a row of the scheduler's batch, or alone as a scheduler call (in the
        loop's thread; waiting for its turn gives up as soon as `cancel` is set). `listener`
        (a stream's) sees each token. Past `request_timeout` it ends with RequestTimeout
        (checked at every token). `may_drive`: Scheduler.run's."""
        began, limit = time.perf_counter(), self.request_timeout
        if limit is not None:
            listener = _with_deadline(listener, began, limit)
        if self._batched(request.method):
            return self._run(request, listener, cancel, began, may_drive)

        def give_up() -> BaseException | None:  # while the call waits for its turn
            if cancel.is_set():
                return _Cancelled()
            if limit is not None and time.perf_counter() - began > limit:
                return RequestTimeout(limit)
            return None

        def alone() -> Generation:  # in the loop's thread, between two iterations
            reason = give_up()
            if reason is not None:
                raise reason
            return self._run(request, listener, cancel, began)

        return self.scheduler.call(alone, give_up, may_drive)

    def _run(
        self,
        request: _Request,
        listener: Callable[[int, int], None] | None,
        cancel: threading.Event,
        called: float,
        may_drive: Callable[[], bool] | None = None,
    ) -> Generation:
        """One decode (a batch row, or inside a scheduler call; the caller called at
        `called`). The text is assembled here."""
        self._use_threads()
        began = time.perf_counter()
        batched = self._batched(request.method)
        if batched and not self._has_built(request):  # the engine's work: the loop's thread
            built = self.scheduler.call(lambda: self._built(request), may_drive=may_drive)
        else:
            built = self._built(request)
        setup = time.perf_counter() - began
        assembler = _TextAssembler(self.tokenizer, request.decode.stop_strings)

        def on_token(token: int, layer: int) -> None:
            if listener is not None:
                listener(token, layer)
            assembler.push(token, layer)

        config = DecodeConfig(**{**vars(request.decode), "on_token": on_token})
        if batched:
            method = request.method
            fixed = request.config.draft_tokens  # lossless:ngram:N fixes N; free's value is T
            if method.name == "lossless" and method.value:
                fixed = int(method.value)
            ids, _ = self.engine.encode([request.prompt])
            free = None
            if method.name == "free":
                assert built.shallow is not None and isinstance(built.decoder, ThresholdDecoder)
                free = FreeRow(built.shallow, built.decoder.threshold)
            drafts = method.drafter == "ngram"
            job = Job(ids, config, drafts, fixed, free=free, cancelled=cancel)
            if self.request_timeout is not None:  # what is left of it, counted from here
                job.timeout = self.request_timeout - (job.submitted - called)
            result = self.scheduler.run(job, may_drive)
        else:
            result = built.decoder(request.prompt, config)
        assembler.release(final=True)
        return self._generation(request, built, result, assembler, setup)

    def _generation(
        self,
        request: _Request,
        built: _Built,
        result: DecodeResult,
        assembler: _TextAssembler,
        setup: float,
    ) -> Generation:
        tokens, n = list(result.tokens), len(result.tokens)
        eos = self.tokenizer.eos_token_id if request.decode.stop_at_eos else None
        ended = assembler.stopped or (eos is not None and n > 0 and tokens[-1] == eos)
        finish = "stop" if ended or n < request.decode.max_new_tokens else "length"
        ids, _ = self.engine.encode([request.prompt])
        if n > 1:
            avg_layers = result.layer_tokens / (n - 1)
        else:
            avg_layers = float(result.exit_layers[0]) if n else 0.0
        report = GenerationReport(
            method=request.method.spec,
            num_layers=self.num_layers,
            shallow_layer=built.shallow.layer if built.shallow is not None else None,
            avg_layers=avg_layers,
            shallow_fraction=result.shallow_fraction,
            exit_layers=list(result.exit_layers),
            draft_proposed=result.drafted,
            draft_accepted=result.accepted,
            draft_seconds=result.draft_seconds,
            passes=result.passes,
            catchups=result.catchups,
            rollbacks=result.rollbacks,
            prompt_tokens=int(ids.shape[1]),
            completion_tokens=n,
            prompt_seconds=result.prefill_seconds,
            queue_seconds=result.queue_seconds,
            batched=self._batched(request.method),
            decode_seconds=result.decode_seconds,
            setup_seconds=setup,
            tokens_per_s=n / max(1e-9, result.seconds),
            decode_tokens_per_s=max(0, n - 1) / max(1e-9, result.decode_seconds),
            threshold=built.threshold(),
            ltt=ltt.to_dict() if (ltt := getattr(built.decoder, "ltt", None)) else None,
            artifacts=dict(built.artifacts),
        )
        return Generation(assembler.text, tokens, finish, report)

    # ---- classification ----------------------------------------------------------------
    def classify(
        self,
        texts: str | Sequence[str],
        *,
        task: str | Path | Task | None = "sst2",
        method: str = "adainfer",
        labels: Mapping[str, str] | str | Path | None = None,
        text_column: str = "text",
        label_column: str = "label",
        shots: int = 4,
        seed: int = 0,
        batch: int = 8,
        calibration: int = 200,
        readout: str = "probe",
        embedder: str = "minilm-l6",
    ) -> Classification:
        """Classify `texts` with early exit; one label per text.

        `task`: a built-in task name (`sst2`, `agnews`, ...), a `Task`, or a labelled
        CSV/TSV/JSONL file with `labels` (each label value -> its word, or a YAML/JSON file
        of that map; `text_column`, `label_column`); or None with `labels` alone (a
        zero-shot task: no training split, so only `full`, or `static` / `confidence` with
        readout="general", run on it). Methods (`earlyexit eval`'s): `full`, `static[:K]`,
        `confidence[:T]`, `adainfer[:tol]`, `adainfer-crf[:tol]`, `adainfer-vocab[:tol]`,
        `raee[:k[:slack]]`, `raee-paper[:k[:slack]]`. Each text is prompted after `shots`
        class-balanced demonstrations from the task's training split. `readout="probe"`
        fits per-layer task probes on `calibration` training prompts at first use (kept in
        memory, as are stoppers and RAEE databases); a RAEE database saved by `earlyexit
        raee build` for this model and task, with the same settings, is loaded instead.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items or not all(isinstance(t, str) for t in items):
            raise EarlyExitError("texts must be a non-empty list of strings")
        name, _ = method_args(method)  # unknown methods fail before any work
        if batch < 1 or shots < 0 or calibration < 10:
            raise EarlyExitError("batch must be >= 1, shots >= 0 and calibration >= 10")
        self._check_embedder(embedder)
        key, task_obj = self._resolve_task(task, labels, text_column, label_column)
        config = EvalConfig(
            shots=shots,
            seed=seed,
            batch=batch,
            calibration=calibration,
            readout=readout,
            embedder=embedder,
        )
        # `full` reads the last layer only: the model's own head, whatever the readout
        needs = name != "full" and needs_calibration([method], config)

        def work() -> tuple:  # the engine's work: in the loop's thread (runtime/scheduler.py)
            self._use_threads()
            began = time.perf_counter()
            state = self._task_state(key, task_obj, config)
            run_readout, policy, artifacts = self._policy(state, method, needs)
            setup = time.perf_counter() - began
            from earlyexit.runtime.classification import run_policy

            prompts = [task_obj.prompt(Example(text, 0), state.demos) for text in items]
            run = run_policy(
                self.engine,
                run_readout,
                prompts,
                state.candidates,
                policy,
                batch,
                items,
                self._base_readout(config),
            )
            return state, policy, artifacts, setup, run

        state, policy, artifacts, setup, run = self.scheduler.call(work)
        avg = sum(run.exit_layers) / len(run.exit_layers)
        report = ClassificationReport(
            method=method,
            task=task_obj.name,
            num_layers=self.num_layers,
            avg_layers=avg,
            layers_saved=1 - avg / self.num_layers,
            seconds=run.seconds,
            decision_seconds=run.decision_seconds,
            setup_seconds=setup,
            shots=len(state.demos),
            readout=readout,
            policy=policy.describe(),
            artifacts=artifacts,
        )
        words = [w.strip() for w in task_obj.label_words]
        return Classification(
            [words[c] for c in run.predictions],
            list(run.predictions),
            list(run.exit_layers),
            report,
        )

    def _check_embedder(self, spec: str) -> None:
        """RAEE's embedder, checked before any work: a registry embedder or backbone:K."""
        from earlyexit.models.registry import REGISTRY

        name, _, arg = spec.partition(":")
        if name == "backbone":
            if not arg or (arg.isdigit() and 1 <= int(arg) <= self.num_layers):
                return
        elif spec in REGISTRY and REGISTRY[spec].kind == "embedder":
            return
        embedders = [n for n, m in REGISTRY.items() if m.kind == "embedder"]
        raise EarlyExitError(
            f"unknown embedder '{spec}': use {', '.join(embedders)} or backbone:K "
            f"(K in 1..{self.num_layers})"
        )

    def _resolve_task(
        self,
        task: str | Path | Task | None,
        labels: Mapping[str, str] | str | Path | None,
        text_column: str,
        label_column: str,
    ) -> tuple[tuple, Task]:
        """(cache key, task): cheap, and every problem is an EarlyExitError."""
        from earlyexit.tasks.builtin import TASKS, get_task
        from earlyexit.tasks.custom import DEFAULT_TEMPLATE, load_custom_task

        if isinstance(task, Task):
            return ("object", id(task)), task
        if task is None:
            if not isinstance(labels, Mapping) or not labels:
                raise EarlyExitError(
                    "task=None needs labels={'label': 'word', ...} (one word per class)"
                )
            words = [w if w.startswith(" ") else " " + w for w in map(str, labels.values())]
            zero_shot = Task(
                name="labels",
                label_words=words,
                template=DEFAULT_TEMPLATE,
                train=lambda: [],
                test=lambda: [],
            )
            return ("labels", tuple(words)), zero_shot
        text = str(task)
        if text in TASKS and not isinstance(task, Path):
            return ("builtin", text), get_task(text)
        if isinstance(task, Path) or text.lower().endswith(DATASET_SUFFIXES) or Path(text).exists():
            if labels is None:
                raise EarlyExitError(
                    f"task file {text} needs labels={{'<label value>': '<word>', ...}} "
                    "(or a YAML/JSON file of that map)"
                )
            path = Path(text).expanduser().resolve()
            loaded = load_custom_task(path, text_column, label_column, labels)
            stamp = path.stat().st_mtime_ns
            label_key = tuple(labels.items()) if isinstance(labels, Mapping) else str(labels)
            return ("file", str(path), stamp, text_column, label_column, label_key), loaded
        return ("builtin", text), get_task(text)  # raises: unknown task, listing the names

    def _task_state(self, key: tuple, task: Task, config: EvalConfig) -> _TaskState:
        full_key = (*key, config.shots, config.seed, config.calibration, config.readout)
        full_key += (config.embedder,)
        state = self._tasks.get(full_key)
        if state is None:
            pool = task.examples("train")
            shots = config.shots if pool else 0  # a task without a train split: zero-shot
            demos = task.demonstrations(shots, config.seed)
            state = _TaskState(task, config, demos, task.label_token_ids(self.tokenizer))
            self._tasks.put(full_key, state)
        return state

    def _calibrated(self, state: _TaskState, method: str) -> MethodBuilder:
        """The task's calibration (probes fitted, traces for stoppers and databases), run on
        first use and kept."""
        if state.builder is None:
            task, config = state.task, state.config
            pool = [ex for ex in task.examples("train") if ex not in state.demos]
            if len(pool) < 10:
                raise EarlyExitError(
                    f"method '{method}' calibrates on labelled training examples and task "
                    f"'{task.name}' has {len(pool)}: pass a labelled file (task='data.csv', "
                    "labels={...}) or a Task with a train split, or use method 'full' (or "
                    "static / confidence with readout='general')"
                )
            base = self._base_readout(config)
            readout, calibration = calibrate(
                self.engine, base, task, state.demos, state.candidates, config
            )
            state.builder = MethodBuilder(self.engine, base, task, config, calibration)
            state.readout = readout
            count = len(calibration.examples)
            if config.readout == "probe":
                state.calibrated = f"task probe fitted on {count} train prompts (in memory)"
            else:
                state.calibrated = f"general readout, traced on {count} train prompts"
        return state.builder

    def _saved_raee(self, state: _TaskState) -> tuple[MethodBuilder, Any, dict[str, str]] | None:
        """The RAEE database `earlyexit raee build` saved for this model and task (and its
        task probe), if its settings match this request's; else None."""
        if state.saved_checked:
            return state.saved
        state.saved_checked = True
        from earlyexit.paths import home
        from earlyexit.readouts.probe import TaskProbe
        from earlyexit.retrieval.database import ExitDatabase

        path = home() / "raee" / self.name / state.task.name
        if not (path / "database.json").exists():
            return None
        database = ExitDatabase.load(path, self.engine.fingerprint)
        config = state.config
        wanted = {
            "task": state.task.name,
            "embedder": config.embedder,
            "readout": config.readout,
            "shots": config.shots,
            "seed": config.seed,
        }
        if any(database.meta.get(k) != v for k, v in wanted.items()):
            return None
        readout: Any = self._base_readout(config)
        lines = {"database": f"RAEE database loaded from {path} ({database.size} examples)"}
        if config.readout == "probe":
            readout = TaskProbe.load(self.general_readout, path / "probe")
            if not torch.equal(readout.candidates, state.candidates):
                return None
            lines["readout"] = f"task probe loaded from {path / 'probe'}"
        else:
            lines["readout"] = self._general_line(config)
        builder = MethodBuilder(
            self.engine, self._base_readout(config), state.task, config, None, database=database
        )
        state.saved = (builder, readout, lines)
        return state.saved

    def _policy(self, state: _TaskState, method: str, needs: bool) -> tuple[Any, Any, dict]:
        """(readout, policy, artifact lines) for a method on a task, built once and kept."""
        if method in state.policies:
            return state.policies[method]
        name, _ = method_args(method)
        general = self._base_readout(state.config)
        artifacts = {"general_readout": self._general_line(state.config)}
        saved = self._saved_raee(state) if name in ("raee", "raee-paper") else None
        if saved is not None:
            builder, readout, lines = saved
            artifacts.update(lines)
        elif needs:
            builder = self._calibrated(state, method)
            readout = state.readout
            artifacts["readout"] = state.calibrated
        else:
            builder = MethodBuilder(self.engine, general, state.task, state.config, None)
            readout = general
            artifacts["readout"] = self._general_line(state.config)
        policy = builder.build(method)
        if name.startswith("adainfer"):
            stopper = "CRF" if name == "adainfer-crf" else "SVM"
            count = len(builder.calibration.examples) if builder.calibration else 0
            artifacts["stopper"] = f"{stopper} stopper fitted on {count} calibration traces"
        if name.startswith("raee") and saved is None:
            artifacts["database"] = (
                f"RAEE database built from {builder.built_database.size} labelled train "
                "examples (in memory)"
            )
        if name.startswith("raee"):
            artifacts["embedder"] = builder.embedder.spec
        state.policies[method] = (readout, policy, artifacts)
        return state.policies[method]


# ------------------------------------------------------------------------- streaming


class Stream(Iterator[StreamChunk]):
    """The chunks of one streamed generation (from `EarlyExit.stream`).

    A worker thread, started at the first `next()`, submits the decode to the scheduler (a
    batch row, or a call for methods that decode alone) and puts each emitted token on a
    queue. The worker never runs the scheduler's loop itself: the consumer does, inside
    `next()` while the queue is empty (or a server's loop does), so the model computes in
    the consumer's thread, the one that loaded it in a script (a second computing thread
    makes every decode ~3.5x slower: runtime/scheduler.py). So a stream decodes while it
    is read, and a method that decodes alone (a scheduler call) yields its tokens when
    that call ends unless a server's loop runs it. Iterating takes the queued tokens,
    assembles their text and yields them as `StreamChunk`s; the last chunk carries the
    `Generation`. An exception in the decode is raised here, in the consumer.

    Stopping early: `close()` (or leaving a `with` block, or the stream being garbage
    collected) sets a cancel flag: the scheduler frees the row at its next iteration (a
    decode under the lock ends at the next token, its listener raising), and the thread
    ends. `close()` waits for that (one decoding step; a worker still waiting for its turn
    gives up at once; once cancelled, the worker may run the loop to free its row); a
    stream merely dropped does not wait.
    """

    def __init__(self, owner: EarlyExit, request: _Request) -> None:
        self._owner, self._request = owner, request
        self._queue: queue.Queue[tuple] = queue.Queue()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._assembler = _TextAssembler(owner.tokenizer, request.decode.stop_strings)
        self._pending: tuple | None = None
        self._done = False
        self.generation: Generation | None = None  # set once the last chunk is out

    def __iter__(self) -> Stream:
        return self

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        owner, request, out, cancel = self._owner, self._request, self._queue, self._cancel

        def listener(token: int, layer: int) -> None:
            if cancel.is_set():
                raise _Cancelled
            out.put(("token", token, layer))

        def work() -> None:  # holds no reference to the Stream: dropping it cancels
            try:
                # the consumer runs the loop (`__next__`); this thread only once cancelled
                out.put(("done", owner._execute(request, listener, cancel, cancel.is_set)))
            except _Cancelled:
                out.put(("cancelled",))
            except BaseException as err:  # re-raised in the consumer
                out.put(("error", err))

        self._thread = threading.Thread(target=work, name="earlyexit-stream", daemon=True)
        self._thread.start()

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._start()
        if self._pending is None:  # the decode runs here while the queue is empty
            self._owner.scheduler.drive_until(lambda: not self._queue.empty())
        item = self._pending or self._queue.get()
        self._pending = None
        tokens: list[int] = []
        layers: list[int] = []
        while item[0] == "token":
            self._assembler.push(item[1], item[2])
            tokens.append(item[1])
            layers.append(item[2])
            try:  # take every token already queued into this chunk
                item = self._queue.get_nowait()
            except queue.Empty:
                return StreamChunk(self._assembler.release(), tokens, layers)
        if tokens:  # the decode's end came with them: it is the next chunk
            self._pending = item
            return StreamChunk(self._assembler.release(), tokens, layers)
        self._finish()
        if item[0] == "error":
            raise item[1]
        if item[0] == "cancelled":
            raise StopIteration
        # the worker assembled the same tokens through the same code: the same text
        self.generation = item[1]
        return StreamChunk(self._assembler.release(final=True), [], [], item[1])

    def _finish(self) -> None:
        self._done = True
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        """Stop the decode at its next token and wait for the worker thread to end."""
        self._cancel.set()
        self._finish()

    def __del__(self) -> None:
        cancel = getattr(self, "_cancel", None)
        if cancel is not None:
            cancel.set()  # no wait: the worker ends at its next token
