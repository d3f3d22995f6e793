"""Continuous batching: one loop owns the engine and decodes every running request together.

Requests enter a bounded queue. Each iteration of the loop (vLLM's and llama-server's
scheme, in plain functions as gpt-fast writes its decode loop):
1. retires cancelled requests (their row is free for this very step);
2. admits waiting requests while the batch has room: a prompt is prefilled alone, at most
   `prefill_chunk` tokens per iteration while other rows are decoding, so a long prompt
   does not stall running streams for its whole length; its first token is emitted and its
   keys/values join the running batch (engine/row_cache.py);
3. runs one pass over every running row: the row's last token and, for `lossless`, its
   n-gram drafts; the pass width is chosen from the measured cost of a pass over this many
   rows and what each row's own record says it will accept (decoding/draft_length.py), so
   at a load or on a text where drafting does not pay, no row drafts;
4. hands each request its tokens (a row keeps the drafts the full model agrees with) and
   retires finished ones at once.

`max_batch=1` is one request at a time, first come first served. The loop holds the
engine's lock for one iteration at a time, so methods that decode alone (free, calm,
static: their deep layers are deferred per token) take turns with whole iterations.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from earlyexit.decoding.draft_length import (
    MAX_DRAFT,
    RowPassCosts,
    RowRecord,
    measure_row_pass_costs,
    pass_width,
)
from earlyexit.decoding.drafters import NgramIndex
from earlyexit.decoding.sampling import Sampler
from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult, Stopping, emit
from earlyexit.decoding.verify import Draft, verify
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine
from earlyexit.engine.row_cache import RowKVCache
from earlyexit.errors import EarlyExitError

PREFILL_CHUNK = 128  # prompt tokens per iteration while other rows decode


class QueueFull(EarlyExitError):
    """The scheduler's queue is full: the server answers 429 with Retry-After."""


class ShuttingDown(EarlyExitError):
    """The scheduler is closing: the server answers 503."""


def check_limits(max_batch: int, max_queue: int) -> None:
    """One line naming the fix for a bad batch or queue limit."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EarlyExitError(f"{name} must be an integer >= 1, not {value!r}")


@dataclass(eq=False)  # compared by identity (the running list's remove)
class Job:
    """One request in the scheduler: the prompt's ids, how to decode, and its result."""

    ids: torch.Tensor  # [1, T]
    config: DecodeConfig  # its on_token listener sees each token as it is emitted
    drafts: bool  # lossless: n-gram drafts verified per pass; else one token per pass
    fixed_drafts: int | None = None  # drafts per pass when fixed (lossless:ngram:N)
    result: DecodeResult = field(init=False)
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    # decoding state, set by the scheduler
    row: int = -1
    sampler: Sampler | None = None
    stopping: Stopping | None = None
    index: NgramIndex | None = None
    record: RowRecord = field(default_factory=RowRecord)
    prefill: LayerKVCache | None = None
    prefilled: int = 0

    def __post_init__(self) -> None:
        self.result = DecodeResult([], [], 0.0, 0)
        self.result.listener = self.config.on_token

    def cancel(self) -> None:
        """Stop at the next iteration (the row is freed there)."""
        self.cancelled.set()


@dataclass
class SchedulerStats:
    running: int
    queued: int
    prefilling: int
    steps: int
    mean_batch: float  # running rows per decode pass, since the start


class Scheduler:
    """The loop that owns `engine` while it runs (see the module docstring)."""

    def __init__(
        self,
        engine: LayerEngine,
        lock: threading.Lock,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        threads: int | None = None,
    ) -> None:
        check_limits(max_batch, max_queue)
        self.engine, self.lock = engine, lock
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.threads = threads
        self.waiting: collections.deque[Job] = collections.deque()
        self.admitting: list[Job] = []  # prefills in progress (chunked)
        self.running: list[Job] = []  # running[r] holds row r of the cache
        self.cache: RowKVCache | None = None
        self._costs: RowPassCosts | None = None
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self.steps = 0
        self._rows_stepped = 0

    # ---- the caller's side ---------------------------------------------------------------
    def check_room(self) -> None:
        """QueueFull when `max_queue` requests wait already; ShuttingDown once closed."""
        if self._closing:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(
                f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue}); "
                "retry later"
            )

    def submit(self, job: Job) -> Job:
        """Queue a job (refused as `check_room` says)."""
        with self._wake:
            self.check_room()
            self.waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="earlyexit-scheduler", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        return job

    def run(self, job: Job) -> DecodeResult:
        """Submit and wait for the result; an error in the job is raised here."""
        self.submit(job)
        job.finished.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def prepare(self) -> None:
        """Measure the pass costs lossless drafts are chosen by now (once per machine,
        cached), not in the first lossless step of a loaded server."""
        with self.lock:
            self._costs = measure_row_pass_costs(self.engine, self.max_batch)

    def stats(self) -> SchedulerStats:
        mean = self._rows_stepped / self.steps if self.steps else 0.0
        return SchedulerStats(
            len(self.running), len(self.waiting), len(self.admitting), self.steps, mean
        )

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let running ones end within `timeout`
        seconds (then cancel them) and stop the loop."""
        with self._wake:
            self._closing = True
            for job in self.waiting:
                job.error = ShuttingDown("the server shut down before this request ran")
                job.finished.set()
            self.waiting.clear()
            self._wake.notify()
        deadline = time.monotonic() + timeout
        while (self.running or self.admitting) and time.monotonic() < deadline:
            time.sleep(0.01)
        for job in [*self.running, *self.admitting]:
            job.cancel()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, timeout))

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.admitting or self.running):
                    if self._closing:
                        return
                    self._wake.wait()
            with self.lock:
                if self.threads is not None and torch.get_num_threads() != self.threads:
                    torch.set_num_threads(self.threads)
                try:
                    self._iteration()
                except BaseException as err:  # noqa: BLE001 - every job hears of it
                    self._fail_all(err)

    def _fail_all(self, err: BaseException) -> None:
        for job in [*self.running, *self.admitting]:
            job.error = err
            self._finish(job)
        self.running, self.admitting = [], []
        self.cache = None

    @torch.inference_mode()
    def _iteration(self) -> None:
        for job in [j for j in self.running if j.cancelled.is_set()]:
            self._retire(job)
        self.admitting = [j for j in self.admitting if not self._dropped(j)]
        self._admit()
        if self.running:
            self._step()

    def _dropped(self, job: Job) -> bool:
        if job.cancelled.is_set():
            self._finish(job)
            return True
        return False

    def _admit(self) -> None:
        with self._wake:
            while self.waiting and len(self.running) + len(self.admitting) < self.max_batch:
                job = self.waiting.popleft()
                if job.cancelled.is_set():
                    self._finish(job)
                    continue
                job.result.queue_seconds = time.perf_counter() - job.submitted
                self.admitting.append(job)
        if not self.admitting:
            return
        job = self.admitting[0]  # one prompt at a time, in arrival order
        budget = self.prefill_chunk if self.running else None
        if self._prefill(job, budget):
            self.admitting.pop(0)

    def _prefill(self, job: Job, budget: int | None) -> bool:
        """Prefill (part of) the job's prompt; when it is complete emit the first token and
        join the batch (or finish). True when the job left the admitting list."""
        engine, ids = self.engine, job.ids
        total = ids.shape[1]
        end = total if budget is None else min(total, job.prefilled + budget)
        capacity = total + job.config.max_new_tokens + MAX_DRAFT + 2
        if job.prefill is None:
            state = engine.prefill(ids[:, :end], capacity=capacity)
            job.prefill, hidden = state.cache, state.hidden
        else:
            chunk = engine.embed(ids[:, job.prefilled : end])
            hidden = engine.run_layers(chunk, job.prefill, 0, engine.num_layers)
        job.prefilled = end
        if end < total:
            return False
        job.sampler = Sampler(job.config.sampling)
        job.stopping = Stopping(engine, job.config)
        job.result.num_layers = engine.num_layers
        first = job.sampler.pick(engine.logits(hidden[:, -1]))
        job.result.prefill_seconds = time.perf_counter() - job.submitted
        if not self._push(job, [first]) or job.stopping.done(job.result.tokens):
            job.prefill = None
            self._finish(job)
            return True
        if job.drafts:
            job.index = NgramIndex()
            job.index.extend(ids[0].tolist() + job.result.tokens)
        if self.cache is None or self.cache.max_rows < self.max_batch:
            self.cache = engine.new_row_cache(self.max_batch, capacity)
        job.row = self.cache.add(job.prefill)
        job.prefill = None
        self.running.append(job)
        return True

    def _push(self, job: Job, tokens: list[int]) -> bool:
        """Emit tokens to the job (up to where it stops); False when its listener raised
        (a stream whose consumer left): the job is cancelled."""
        assert job.stopping is not None
        try:
            new = emit(job.result, tokens, self.engine.num_layers, job.stopping)
        except BaseException as err:  # noqa: BLE001 - the listener's, e.g. a closed stream
            job.error = err
            job.cancel()
            return False
        if job.index is not None:
            job.index.extend(new)
        return True

    def _drafts(self, job: Job) -> tuple[int, list[int]]:
        """(match length, looked-up tokens) for the job's next pass."""
        if job.index is None:
            return 0, []
        budget = job.config.max_new_tokens - len(job.result.tokens)
        limit = min(MAX_DRAFT, budget, job.fixed_drafts or MAX_DRAFT)
        return job.index.lookup(limit)

    def _width(self, looked: list[tuple[int, list[int]]]) -> int:
        rows = len(self.running)
        fixed = [j.fixed_drafts for j in self.running if j.fixed_drafts]
        widest = max((len(t) for _, t in looked), default=0)
        if not widest:
            return 1
        if fixed and len(fixed) == rows:  # every row asked for a fixed count
            return 1 + min(widest, max(fixed))
        if self._costs is None:
            self._costs = measure_row_pass_costs(self.engine, self.max_batch)
        given = [(j.record, m, len(t)) for j, (m, t) in zip(self.running, looked, strict=True)]
        return pass_width(given, self._costs)

    def _step(self) -> None:
        engine, cache, jobs = self.engine, self.cache, self.running
        assert cache is not None
        total = engine.num_layers
        looked = [self._drafts(job) for job in jobs]
        width = self._width(looked)
        drafts = [tokens[: width - 1] for _, tokens in looked]
        inputs = torch.empty(len(jobs), width, dtype=torch.long)
        for row, (job, draft) in enumerate(zip(jobs, drafts, strict=True)):
            last = job.result.tokens[-1]
            inputs[row] = torch.tensor([last, *draft, *[last] * (width - 1 - len(draft))])
        counts = torch.tensor([1 + len(d) for d in drafts])
        base = cache.fill[0, : len(jobs)].clone()
        hidden = engine.run_rows(engine.embed(inputs.to(engine.device)), cache, 0, total, counts)
        real = torch.arange(width).unsqueeze(0) < counts.unsqueeze(1)  # [rows, width]
        logits = engine.logits(hidden[real])  # only the real inputs' rows of the head
        self.steps += 1
        self._rows_stepped += len(jobs)
        done = []
        for row, (job, draft) in enumerate(zip(jobs, drafts, strict=True)):
            assert job.sampler is not None and job.stopping is not None
            mine = logits[int(counts[:row].sum()) : int(counts[: row + 1].sum())]
            probs = None
            if not job.sampler.greedy and draft:  # a point guess: q one-hot on the draft
                probs = [
                    torch.nn.functional.one_hot(torch.tensor(t), logits.shape[-1]).float()
                    for t in draft
                ]
            verdict = verify(Draft(draft, probs=probs), mine, job.sampler)
            kept = min(int(counts[row]), verdict.accepted + 1)
            cache.set_fill(row, int(base[row]) + kept)
            result = job.result
            result.layer_tokens += int(counts[row]) * total
            result.passes += 1
            result.drafted += len(draft)
            result.accepted += verdict.accepted
            result.rollbacks += int(verdict.accepted < len(draft))
            job.record.record(looked[row][0], len(draft), verdict.accepted)
            if not self._push(job, verdict.tokens(Draft(draft))) or job.stopping.done(
                result.tokens
            ):
                done.append(job)
        for job in done:
            self._retire(job)

    def _retire(self, job: Job) -> None:
        """Free the job's row (the last row moves into it) and finish the job."""
        assert self.cache is not None
        moved = self.cache.remove(job.row)
        self.running.remove(job)
        if not self.running:  # an idle server holds no KV memory
            self.cache = None
        if moved is not None:
            mover = next(j for j in self.running if j.row == moved)
            mover.row = job.row
            self.running.remove(mover)
            self.running.insert(job.row, mover)
        self._finish(job)

    def _finish(self, job: Job) -> None:
        job.result.seconds = time.perf_counter() - job.submitted
        job.finished.set()
