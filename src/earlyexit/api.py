"""The public runtime API: load a model once, then generate, stream and classify.

    from earlyexit.api import EarlyExit

    ee = EarlyExit.load("smollm2-135m")
    out = ee.generate("Name three colours.", method="lossless", max_new_tokens=24)
    print(out.text, out.finish_reason, out.report.tokens_per_s)

One `EarlyExit` holds one model (a `LayerEngine`), the artifacts built for it on first use
(decoders with their calibrated thresholds, shallow exits, task probes, AdaInfer stoppers,
RAEE databases), one lock and one scheduler. `full`, `lossless` (n-gram drafts), `free`
and `calm` requests go through the scheduler (runtime/scheduler.py): concurrent callers (a
server's request threads) are decoded together, continuously batched, up to `max_batch`
rows. Every
other piece of model work (other methods' decodes, a decoder's first build,
classification) is a scheduler call: run whole in the loop's thread between two
iterations, holding the lock, so each model computation runs alone and in one thread.

Every request reports what it used (`report.artifacts`): a trained readout with its path,
or "logit lens (untrained)"; a probe fitted on N train prompts or loaded from a path; and
so on. Nothing falls back silently. Bad input raises `EarlyExitError` with one line naming
the fix, before any model work.

A facade: the pieces live in runtime/ (requests.py checks a request, decoders.py builds
and describes a method's decoder from generation.py's GenConfig, scheduler.py decodes,
stream.py streams, classifier.py classifies, results.py holds what comes back); this
module keeps them on one long-lived object and assembles each request's report.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.readout import ExitReadout
from earlyexit.runtime.classifier import Classifier
from earlyexit.runtime.decoders import BuiltDecoder, build, decodes_in_batch
from earlyexit.runtime.generation import (
    GenConfig,
    ThresholdDecoder,
    parse_method,
    shallow_exit,
    uses_shallow,
)
from earlyexit.runtime.kept import Kept
from earlyexit.runtime.requests import GenRequest, context_length, make_request, with_deadline
from earlyexit.runtime.results import (
    Classification,
    ClassificationReport,
    Generation,
    GenerationReport,
    StreamChunk,
)
from earlyexit.runtime.scheduler import (
    ExitRow,
    Job,
    RequestTimeout,
    Scheduler,
    SchedulerStats,
    check_limits,
    check_timeout,
)
from earlyexit.runtime.stream import Cancelled, Stream, TextAssembler
from earlyexit.tasks.base import Task

__all__ = [
    "Classification",
    "ClassificationReport",
    "EarlyExit",
    "Generation",
    "GenerationReport",
    "Stream",
    "StreamChunk",
]

KEPT_DECODERS = 32  # decoders (and shallow exits) kept per object, least recently used go


class EarlyExit:
    """One model, loaded once: `generate`, `stream` and `classify` with early exit.

    `full`, `lossless` (n-gram), `free` and `calm` requests from concurrent callers are
    decoded together by the scheduler, up to `max_batch` rows (1: one at a time, first
    come first served), with at most `max_queue` waiting; every other piece of model work
    is a scheduler call, run whole by the loop's one thread. Artifacts built on first use
    (decoders and their calibration, shallow exits, task probes, stoppers, RAEE databases)
    are kept in memory on the object, bounded; make one object per model and keep it.
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
        # kept across requests, bounded (clients choose the keys): runtime/kept.py
        self._decoders: Kept[BuiltDecoder] = Kept(KEPT_DECODERS)
        self._shallow_exits: Kept[tuple[ShallowExit, str]] = Kept(KEPT_DECODERS)
        self._classifier = Classifier(engine)

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
        if decodes_in_batch(parse_method(method)):
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
        return self._classifier.general_readout

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
        request = make_request(
            self.engine, prompt, method, max_new_tokens, temperature, top_p, seed, stop, chat, knobs
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
        request = make_request(
            self.engine, prompt, method, max_new_tokens, temperature, top_p, seed, stop, chat, knobs
        )

        def execute(
            listener: Callable[[int, int], None],
            cancel: threading.Event,
            may_drive: Callable[[], bool],
        ) -> Generation:
            return self._execute(request, listener, cancel, may_drive)

        assembler = TextAssembler(self.tokenizer, request.decode.stop_strings)
        return Stream(execute, self.scheduler.drive_until, assembler)

    def _use_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    @property
    def context_length(self) -> int:
        """Tokens the model attends over: prompt plus completion must fit in it."""
        return context_length(self.engine)

    def _shallow(self, config: GenConfig) -> tuple[ShallowExit, str]:
        key = (config.shallow_layer_of(self.num_layers), config.measure, config.restrict_vocab)
        kept = self._shallow_exits.get(key)
        if kept is None:
            kept = self._shallow_exits.put(key, shallow_exit(self.engine, config))
        return kept

    def _has_built(self, request: GenRequest) -> bool:
        return request.key in self._decoders

    def _built(self, request: GenRequest) -> BuiltDecoder:
        """The decoder for the request's method and config (built once, then kept)."""
        kept = self._decoders.get(request.key)
        if kept is None:
            method, config = request.method, request.config
            shallow = self._shallow(config) if uses_shallow(method) else None
            kept = self._decoders.put(request.key, build(self.engine, method, config, shallow))
        return kept

    def _execute(
        self,
        request: GenRequest,
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
            listener = with_deadline(listener, began, limit)
        if decodes_in_batch(request.method):
            return self._run(request, listener, cancel, began, may_drive)

        def give_up() -> BaseException | None:  # while the call waits for its turn
            if cancel.is_set():
                return Cancelled()
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
        request: GenRequest,
        listener: Callable[[int, int], None] | None,
        cancel: threading.Event,
        called: float,
        may_drive: Callable[[], bool] | None = None,
    ) -> Generation:
        """One decode (a batch row, or inside a scheduler call; the caller called at
        `called`). The text is assembled here."""
        self._use_threads()
        began = time.perf_counter()
        batched = decodes_in_batch(request.method)
        if batched and not self._has_built(request):  # the engine's work: the loop's thread
            built = self.scheduler.call(lambda: self._built(request), may_drive=may_drive)
        else:
            built = self._built(request)
        setup = time.perf_counter() - began
        assembler = TextAssembler(self.tokenizer, request.decode.stop_strings)

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
            exits = None
            if method.name in ("free", "calm"):  # CALM copies exited states, FREE stacks them
                assert built.shallow is not None and isinstance(built.decoder, ThresholdDecoder)
                threshold = built.decoder.threshold
                exits = ExitRow(
                    built.shallow,
                    threshold,
                    copy_state=method.name == "calm",
                    always=request.config.exits == "always",
                )
            drafts = method.drafter == "ngram"
            job = Job(ids, config, drafts, fixed, exit_row=exits, cancelled=cancel)
            if self.request_timeout is not None:  # what is left of it, counted from here
                job.timeout = self.request_timeout - (job.submitted - called)
            result = self.scheduler.run(job, may_drive)
        else:
            result = built.decoder(request.prompt, config)
        assembler.release(final=True)
        return self._generation(request, built, result, assembler, setup)

    def _generation(
        self,
        request: GenRequest,
        built: BuiltDecoder,
        result: DecodeResult,
        assembler: TextAssembler,
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
            batched=decodes_in_batch(request.method),
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
        request = self._classifier.request(
            texts,
            task,
            method,
            labels,
            text_column,
            label_column,
            shots,
            seed,
            batch,
            calibration,
            readout,
            embedder,
        )

        def work() -> Classification:  # the engine's work: in the loop's thread
            self._use_threads()
            return self._classifier.run(request)

        return self.scheduler.call(work)
