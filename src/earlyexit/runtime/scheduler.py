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

`free` rows (FREE's synchronized parallel decoding, per row): when every running row is a
FREE row and no row drafts, a step may first run only the shallow layers [0, k) and read
each row's exit. If every row is confident, that is the step: each row emits its shallow
token and stacks its layer-k state; the deep layers are skipped for the whole batch. If
some row is not, the same step goes on through [k, L) for every row, each row's stacked
states in front of its new one (their deep KV filled in that pass, as FREE does alone), and
every row takes the deep token (computed now, it costs nothing more than the shallow one).
Skipping deep layers only saves time when *all* rows exit at once, and reading the exits
costs a head per row, so the step is tried only while it measurably pays: P(all rows
exit) x (seconds of the deep layers at this batch size) > (seconds of the exit heads),
with each row's own exit rate and both times measured here as the loop runs (`exit_pays`;
rows whose request asked for exits "always", and every row of a Scheduler made with
exits="always", try at every step, as the papers' loops do). At batch 1 this is FREE as
alone where exits pay, and full depth where they do not; under load FREE rows decode as
`lossless` rows do.

`calm` rows (CALM per row) exit the same way, but an exited token is never revisited: its
keys and values in layers [k, L) are computed from its layer-k state in the same step
(`LayerEngine.copy_state_kv_rows`, CALM's state copying), so later tokens attend to them.

`max_batch=1` is one request at a time, first come first served. Work that is not a row
of the batch (methods that decode alone: static, free with a draft block; a
decoder's first build; classification) is a `call`: the loop runs it whole, between two
iterations, in its own thread. One thread computes because two cost far more than the
switch: while a second live thread has run torch's parallel regions, libgomp keeps a second
thread pool and every parallel region of both throttles its spinning: on an Intel Xeon
(2 cores) 64 tokens took 2.1 s beside an idle thread that had once computed, against 0.6 s
(scripts/experiments/thread_penalty.py).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

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
from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult, Stopping, Threshold, emit
from earlyexit.decoding.shallow_exit import Guess, ShallowExit
from earlyexit.decoding.verify import Draft, verify
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine
from earlyexit.engine.row_cache import RowKVCache
from earlyexit.errors import EarlyExitError

PREFILL_CHUNK = 128  # prompt tokens per iteration while other rows decode
ROW_ROOM = 64  # decode slots a new running batch's KV holds at first (then it doubles)
EXIT_PRIOR = (2.0, 4.0)  # a row's exit rate before it has tried: 2 exits in 4 tries
RETRY_EXITS = 32  # steps after which exits that did not pay are tried (and timed) again
TIME_WEIGHT = 0.2  # weight of the newest time in the loop's running averages
# when FREE / CALM rows try their shallow exits: while that measurably pays, or every step
EXIT_MODES = ("measured", "always")
DRAFTING_FAMILIES = frozenset({"lossless", "free"})  # choose drafts by measured pass costs


def exit_pays(rates: list[float], deep_seconds: float | None, exit_seconds: float | None) -> bool:
    """Whether trying the shallow exits this step is worth it: it saves `deep_seconds` only
    when every row exits (chance: the product of the rows' exit rates) and costs
    `exit_seconds` always. An unmeasured time is measured by trying."""
    if deep_seconds is None or exit_seconds is None:
        return True
    return math.prod(rates) * deep_seconds > exit_seconds


@dataclass
class ExitRow:
    """A row that may exit at layer k: FREE (an exited token's layer-k state is stacked and
    its deep layers run later, with the next deep token) or CALM (`copy_state`: its deeper
    keys/values are computed from its layer-k state at once and it is never revisited)."""

    shallow: ShallowExit  # its exit layer k and readout (no draft block)
    threshold: Threshold  # FREE's is shared across requests and keeps learning
    copy_state: bool = False  # CALM's state copying instead of FREE's stack
    always: bool = False  # try the exit at every step it can, paying or not
    stack: list[torch.Tensor] = field(default_factory=list)  # layer-k states [1, H]
    guesses: list[Guess] = field(default_factory=list)  # the tokens emitted for them
    tries: float = EXIT_PRIOR[1]
    exits: float = EXIT_PRIOR[0]

    @property
    def rate(self) -> float:
        return self.exits / self.tries


@dataclass(eq=False)
class Call:
    """Work run whole in the loop's thread (`Scheduler.call`): its value or its error."""

    fn: Callable[[], Any]
    value: Any = None
    error: BaseException | None = None
    started: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class QueueFull(EarlyExitError):
    """The scheduler's queue is full: the server answers 429 with Retry-After."""


class ShuttingDown(EarlyExitError):
    """The scheduler is closing: the server answers 503."""


class RequestTimeout(EarlyExitError):
    """A request ran past its deadline (`--request-timeout`): the server answers 504."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"the request ran past the server's {seconds:g} s request timeout; ask for fewer "
            "tokens or retry when the server is less busy"
        )


def check_limits(max_batch: int, max_queue: int) -> None:
    """One line naming the fix for a bad batch or queue limit."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EarlyExitError(f"{name} must be an integer >= 1, not {value!r}")


def check_exits(mode: object) -> None:
    """One line naming the fix for an exit mode outside EXIT_MODES."""
    if mode not in EXIT_MODES:
        raise EarlyExitError(f"exits must be {' or '.join(EXIT_MODES)}, not {mode!r}")


def check_timeout(seconds: float | None) -> None:
    """One line naming the fix for a bad request timeout (None: no limit)."""
    if seconds is None:
        return
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
        raise EarlyExitError(f"request_timeout must be a number of seconds > 0, not {seconds!r}")


@dataclass(eq=False)  # compared by identity (the running list's remove)
class Job:
    """One request in the scheduler: the prompt's ids, how to decode, and its result."""

    ids: torch.Tensor  # [1, T]
    config: DecodeConfig  # its on_token listener sees each token as it is emitted
    drafts: bool  # lossless: n-gram drafts verified per pass; else one token per pass
    fixed_drafts: int | None = None  # drafts per pass when fixed (lossless:ngram:N)
    exit_row: ExitRow | None = None  # a FREE or CALM row: its shallow exit (and stack)
    result: DecodeResult = field(init=False)
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    timeout: float | None = None  # seconds from submission, then RequestTimeout
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
    """Now (running, queued, prefilling) and since the start (the rest)."""

    running: int
    queued: int
    prefilling: int
    steps: int  # decode passes
    mean_batch: float  # running rows per decode pass
    rows_stepped: int = 0  # rows over all passes
    drafted_rows: int = 0  # rows that carried n-gram drafts into a pass
    exit_tries: int = 0  # passes that read FREE rows' shallow exits
    exit_skips: int = 0  # of those, passes where every row exited (deep layers skipped)


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
        exits: str = "measured",
    ) -> None:
        """`exits`: "measured" tries FREE rows' shallow exits while `exit_pays`; "always"
        at every step they can (the paper's FREE: tests use it to pin the behaviour)."""
        check_limits(max_batch, max_queue)
        check_exits(exits)
        self.exits = exits
        self.engine, self.lock = engine, lock
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.threads = threads
        self.waiting: collections.deque[Job] = collections.deque()
        self.calls: collections.deque[Call] = collections.deque()
        self.admitting: list[Job] = []  # prefills in progress (chunked)
        self.running: list[Job] = []  # running[r] holds row r of the cache
        self.cache: RowKVCache | None = None
        self._costs: RowPassCosts | None = None
        self._wake = threading.Condition()  # an RLock: _finish may run with it held
        self._driver: int | None = None  # ident of the thread running the loop now
        self._callers = 0  # threads in `run` or `serve_here` that may run the loop
        self._closing = False
        self.steps = 0
        self._rows_stepped = 0
        self._drafted_rows = 0
        self._exit_tries = 0
        self._exit_skips = 0
        # running averages by batch size: seconds of the deep layers + head, of the exits
        self._deep_seconds: dict[int, float] = {}
        self._exit_seconds: dict[int, float] = {}
        self._since_try = 0

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
        """Queue a job (refused as `check_room` says). Someone runs the loop: a caller in
        `run` or `serve_here`, else a thread of the scheduler's own."""
        with self._wake:
            self.check_room()
            self.waiting.append(job)
            self._ensure_driver()
            self._wake.notify_all()
        return job

    def run(self, job: Job, may_drive: Callable[[], bool] | None = None) -> DecodeResult:
        """Submit and wait for the result; an error in the job is raised here.

        The caller runs the loop itself while no one else does (for every running job,
        until its own is done, then hands it on): a script's main thread, which loaded the
        model, so that one thread computes (see the module docstring). `may_drive`:
        whether this caller may run the loop now (a stream's worker may not: its consumer
        does, `drive_until`)."""
        with self._calling():
            self.submit(job)
            self._wait(job.finished, may_drive=may_drive)
        if job.error is not None:
            raise job.error
        return job.result

    def call(
        self,
        fn: Callable[[], Any],
        give_up: Callable[[], BaseException | None] | None = None,
        may_drive: Callable[[], bool] | None = None,
    ) -> Any:
        """`fn()` run whole in the loop's thread, between two iterations, holding the
        engine's lock (see the module docstring); its value, or its error raised here. The
        caller runs the loop itself while no one else does, as in `run`. While it waits,
        `give_up()` is polled: an error it returns withdraws a call not yet started and is
        raised. From inside the loop's own work, `fn` runs at once. `may_drive` as in
        `run`."""
        if self._driver == threading.get_ident():
            return fn()
        work = Call(fn)
        with self._calling():
            with self._wake:
                if self._closing:
                    raise ShuttingDown("the server is shutting down; retry on another replica")
                self.calls.append(work)
                self._wake.notify_all()
            self._wait(work.finished, give_up, work, may_drive)
        if work.error is not None:
            raise work.error
        return work.value

    def drive_until(self, done: Callable[[], bool]) -> None:
        """Run the loop in this thread until `done()`, or wait while another thread runs it
        (a stream's consumer: its worker only waits, so the decode runs in the consumer's
        thread, the one that loaded the model in a script, not in a second one)."""
        with self._calling():
            while not done():
                with self._wake:
                    if self._driver is not None or not self._has_work():
                        self._wake.wait(timeout=0.01)
                        continue
                    self._driver = threading.get_ident()
                self._loop(until=done)

    @contextlib.contextmanager
    def _calling(self) -> Iterator[None]:
        """This thread counts as a caller that may run the loop (no thread of the
        scheduler's own starts meanwhile); on the way out work left without one gets one."""
        with self._wake:
            self._callers += 1
        try:
            yield
        finally:
            with self._wake:
                self._callers -= 1
                self._ensure_driver()

    def _wait(
        self,
        finished: threading.Event,
        give_up: Callable[[], BaseException | None] | None = None,
        work: Call | None = None,
        may_drive: Callable[[], bool] | None = None,
    ) -> None:
        """Until `finished`: wait while another thread runs the loop (or while `may_drive`
        says no), else run it here."""

        def others() -> bool:
            return self._driver is not None or (may_drive is not None and not may_drive())

        while True:
            with self._wake:
                while not finished.is_set() and others():
                    self._wake.wait(timeout=0.05)
                    reason = give_up() if give_up is not None else None
                    if reason is not None and work is not None and not work.started:
                        self.calls.remove(work)
                        raise reason
                if finished.is_set():
                    return
                self._driver = threading.get_ident()
            self._loop(until=finished.is_set)

    def prepare(self, families: Iterable[str]) -> None:
        """For a server of these method families: where one drafts (DRAFTING_FAMILIES),
        measure the pass costs its drafts are chosen by at every batch size now (once per
        machine, cached), not in the first step of a loaded server that reaches that size."""
        if not DRAFTING_FAMILIES.intersection(families):
            return
        with self.lock:
            self._costs = measure_row_pass_costs(self.engine, self.max_batch)
            self._costs.measure_all()

    def stats(self) -> SchedulerStats:
        mean = self._rows_stepped / self.steps if self.steps else 0.0
        return SchedulerStats(
            len(self.running),
            len(self.waiting),
            len(self.admitting),
            self.steps,
            mean,
            self._rows_stepped,
            self._drafted_rows,
            self._exit_tries,
            self._exit_skips,
        )

    def close(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let running ones end within `timeout`
        seconds (then cancel them) and stop the loop."""
        with self._wake:
            self._closing = True
            for job in self.waiting:
                job.error = ShuttingDown("the server shut down before this request ran")
                self._finish(job)
            self.waiting.clear()
            for work in self.calls:
                work.error = ShuttingDown("the server shut down before this request ran")
                work.finished.set()
            self.calls.clear()
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        while (self.running or self.admitting) and time.monotonic() < deadline:
            time.sleep(0.01)
        for job in [*self.running, *self.admitting]:
            job.cancel()
        while self._driver is not None and time.monotonic() < deadline + max(1.0, timeout):
            time.sleep(0.01)  # the loop frees cancelled rows at its next iteration

    def serve_here(self, stop: Callable[[], bool]) -> None:
        """Run the loop in the calling thread until `stop()` (checked every 0.1 s while idle
        and after every iteration). A server calls it from the thread that loaded the model
        (see `run`)."""
        serve_here([self], stop)

    # ---- the loop ------------------------------------------------------------------------
    def _has_work(self) -> bool:
        return bool(self.calls or self.waiting or self.admitting or self.running)

    def _ensure_driver(self) -> None:
        """(`_wake` held) Work that no one runs and no caller will: a thread of our own
        runs it, until a caller arrives or the work is done."""
        if self._driver is None and self._callers == 0 and self._has_work():
            thread = threading.Thread(
                target=self._loop,
                kwargs={"until": lambda: self._callers > 0},
                name="earlyexit-scheduler",
                daemon=True,
            )
            self._driver = -1  # the thread's, from now: no second one starts meanwhile
            thread.start()

    def _release(self) -> None:
        """(`_wake` held) The running thread stops running the loop and hands it on."""
        self._driver = None
        self._ensure_driver()
        self._wake.notify_all()

    def _loop(self, until: Callable[[], bool]) -> None:
        """Iterations in this thread (which holds `_driver`) while there is work and not
        `until()`; then `_release`, in the same critical section as the decision."""
        try:
            while True:
                with self._wake:
                    if not self._has_work() or until():
                        self._release()
                        return
                self._one_iteration()
        except BaseException:
            with self._wake:
                self._release()
            raise

    def _one_iteration(self) -> None:
        with self.lock:
            if self.threads is not None and torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
            self._one_call()
            if not (self.waiting or self.admitting or self.running):
                return
            try:
                self._iteration()
            except BaseException as err:  # noqa: BLE001 - every job hears of it
                self._fail_all(err)

    def _one_call(self) -> None:
        """The oldest waiting call, whole (one per iteration: running rows go on between)."""
        with self._wake:
            if not self.calls:
                return
            work = self.calls.popleft()
            work.started = True
        try:
            work.value = work.fn()
        except BaseException as err:  # noqa: BLE001 - raised in its caller
            work.error = err
        with self._wake:
            work.finished.set()
            self._wake.notify_all()

    def _fail_all(self, err: BaseException) -> None:
        for job in [*self.running, *self.admitting]:
            job.error = err
            self._finish(job)
        self.running, self.admitting = [], []
        self.cache = None

    @torch.inference_mode()
    def _iteration(self) -> None:
        self._expire()
        for job in [j for j in self.running if j.cancelled.is_set()]:
            self._retire(job)
        self.admitting = [j for j in self.admitting if not self._dropped(j)]
        self._admit()
        if self.running:
            self._step()

    def _expire(self) -> None:
        """Requests past their timeout end with RequestTimeout, wherever they are."""
        now = time.perf_counter()

        def late(job: Job) -> bool:
            if job.timeout is None or now - job.submitted <= job.timeout:
                return False
            job.error = RequestTimeout(job.timeout)
            job.cancel()
            return True

        with self._wake:
            for job in [j for j in self.waiting if late(j)]:
                self.waiting.remove(job)
                self._finish(job)
        for job in [*self.admitting, *self.running]:
            late(job)  # cancelled: freed below

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
        if job.prefill is None:  # it holds the prompt only: its row continues in the batch
            state = engine.prefill(ids[:, :end], capacity=total)
            job.prefill, hidden = state.cache, state.hidden
        else:
            chunk = engine.embed(ids[:, job.prefilled : end])
            hidden = engine.run_layers(chunk, job.prefill, 0, engine.num_layers)
        job.prefilled = end
        if end < total:
            return False
        job.sampler = Sampler(job.config.sampling)
        job.stopping = Stopping(engine, job.config)
        if job.exit_row is not None:
            if job.exit_row.shallow.block is not None:
                raise EarlyExitError("a FREE or CALM row reads layer k itself (no draft block)")
            job.exit_row.threshold.begin_sequence()
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
            # sized for what the rows hold now, grown by doubling: a client's max_tokens
            # (2000: 0.75 GB of fp32 KV for 8 rows of smollm2) reserves nothing up front
            capacity = total + MAX_DRAFT + 2 + min(job.config.max_new_tokens, ROW_ROOM)
            self.cache = engine.new_row_cache(self.max_batch, capacity)
        job.row = self.cache.add(job.prefill)
        job.prefill = None
        self.running.append(job)
        return True

    def _push(self, job: Job, tokens: list[int], layer: int | None = None) -> bool:
        """Emit tokens to the job (up to where it stops), produced at `layer` (default the
        top); False when its listener raised (a stream whose consumer left): the job is
        cancelled."""
        assert job.stopping is not None
        try:
            new = emit(job.result, tokens, layer or self.engine.num_layers, job.stopping)
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
        began = time.perf_counter()
        looked = job.index.lookup(limit)
        job.result.draft_seconds += time.perf_counter() - began
        return looked

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
        looked = [self._drafts(job) for job in jobs]
        width = self._width(looked)
        drafts = [tokens[: width - 1] for _, tokens in looked]
        inputs = torch.empty(len(jobs), width, dtype=torch.long)
        for row, (job, draft) in enumerate(zip(jobs, drafts, strict=True)):
            last = job.result.tokens[-1]
            inputs[row] = torch.tensor([last, *draft, *[last] * (width - 1 - len(draft))])
        counts = [1 + len(d) for d in drafts]
        base = cache.fill[0, : len(jobs)].clone()
        self.steps += 1
        self._rows_stepped += len(jobs)
        self._drafted_rows += sum(1 for n in counts if n > 1)
        embedded = engine.embed(inputs.to(engine.device))
        layer = self._exit_layer(width)
        if layer is None:  # every layer for every row: one pass (rows stack nothing here)
            states = self._through([embedded[r, :n] for r, n in enumerate(counts)], 0)
            self._finish_step(jobs, looked, drafts, states, base, None)
            return
        self._exit_tries += 1
        shallow = engine.run_rows(embedded, cache, 0, layer)  # one token per row
        began = time.perf_counter()
        guesses = []
        for row, job in enumerate(jobs):
            assert job.exit_row is not None and job.sampler is not None
            guesses.append(job.exit_row.shallow.guess(shallow[row, 0], job.sampler))
        exited = [
            g.confidence >= j.exit_row.threshold.value
            and len(j.exit_row.stack) < j.config.max_stack
            for j, g in zip(jobs, guesses, strict=True)
            if j.exit_row is not None
        ]
        rows = len(jobs)
        self._average(self._exit_seconds, rows, time.perf_counter() - began)
        for job, out in zip(jobs, exited, strict=True):
            assert job.exit_row is not None
            job.exit_row.tries += 1
            job.exit_row.exits += out
            job.result.layer_tokens += layer
        if all(exited):  # the whole batch skips the deep layers this step
            self._exit_skips += 1
            self._copy_states(jobs, shallow, layer)
            done = []
            for row, (job, guess) in enumerate(zip(jobs, guesses, strict=True)):
                assert job.exit_row is not None and job.stopping is not None
                if not job.exit_row.copy_state:
                    job.exit_row.stack.append(shallow[row, :1])
                    job.exit_row.guesses.append(guess)
                if not self._push(job, [guess.token], layer) or job.stopping.done(
                    job.result.tokens
                ):
                    done.append(job)
            for job in done:
                self._retire(job)
            return
        began = time.perf_counter()
        states = self._through([shallow[r, :1] for r in range(rows)], layer)
        self._finish_step(jobs, looked, drafts, states, base, guesses)
        self._average(self._deep_seconds, rows, time.perf_counter() - began)

    def _copy_states(self, jobs: list[Job], shallow: torch.Tensor, layer: int) -> None:
        """CALM rows' exited tokens get keys/values in layers [layer, L) from their layer-k
        state (one pass over the batch; FREE rows' inputs there are padding, not kept)."""
        copying = [bool(j.exit_row and j.exit_row.copy_state) for j in jobs]
        if any(copying):
            counts = torch.tensor(copying, dtype=torch.long)
            assert self.cache is not None
            self.engine.copy_state_kv_rows(
                shallow, self.cache, layer, self.engine.num_layers, counts
            )

    def _exit_layer(self, width: int) -> int | None:
        """The shallow exit layer this step tries, or None (a pass through every layer):
        only when every row is a FREE or CALM row with one exit layer, none drafts, and
        trying measurably pays (or `exits` is "always", for the loop or every row)."""
        frees = [job.exit_row for job in self.running]
        if width > 1 or any(f is None for f in frees):
            return None
        layers = {f.shallow.layer for f in frees if f is not None}
        if len(layers) != 1:
            return None
        rows = len(self.running)
        self._since_try += 1
        pays = exit_pays(
            [f.rate for f in frees if f is not None],
            self._deep_seconds.get(rows),
            self._exit_seconds.get(rows),
        )
        always = self.exits == "always" or all(f.always for f in frees if f is not None)
        if always or pays or self._since_try >= RETRY_EXITS:
            self._since_try = 0
            return layers.pop()
        return None

    @staticmethod
    def _average(times: dict[int, float], rows: int, seconds: float) -> None:
        old = times.get(rows)
        times[rows] = seconds if old is None else (1 - TIME_WEIGHT) * old + TIME_WEIGHT * seconds

    def _through(self, states: list[torch.Tensor], start: int) -> list[torch.Tensor]:
        """Run each row's states [n_r, H] from layer `start` to the top, in ragged passes over
        every row. A FREE row's stacked layer-k states join in front of its own at layer k
        (their deep keys/values are written in that pass); returns each row's top-layer
        states, stacked ones first."""
        engine, cache, jobs = self.engine, self.cache, self.running
        assert cache is not None
        cuts = {start, engine.num_layers}
        cuts |= {j.exit_row.shallow.layer for j in jobs if j.exit_row and j.exit_row.stack}
        bounds = sorted(c for c in cuts if c >= start)
        for low, high in zip(bounds, bounds[1:], strict=False):
            for row, job in enumerate(jobs):
                if (
                    job.exit_row is not None
                    and job.exit_row.stack
                    and job.exit_row.shallow.layer == low
                ):
                    states[row] = torch.cat([*job.exit_row.stack, states[row]])
            width = max(len(s) for s in states)
            padded = states[0].new_zeros(len(states), width, states[0].shape[-1])
            for row, rows_states in enumerate(states):
                padded[row, : len(rows_states)] = rows_states
            counts = torch.tensor([len(s) for s in states])
            out = engine.run_rows(padded, cache, low, high, counts)
            states = [out[row, : len(s)] for row, s in enumerate(states)]
        return states

    def _finish_step(
        self,
        jobs: list[Job],
        looked: list[tuple[int, list[int]]],
        drafts: list[list[int]],
        states: list[torch.Tensor],
        base: torch.Tensor,
        tried: list[Guess] | None,
    ) -> None:
        """After a pass to the top: FREE rows learn from their stacked tokens and, where the
        step tried the exits (`tried`: each row's guess), from this one; each row keeps what
        the full model verifies. A row that could have exited but whose batch went deep
        takes the deep token: it is already computed."""
        cache, total = self.cache, self.engine.num_layers
        assert cache is not None
        logits = self.engine.logits(torch.cat(states))  # only the real inputs' rows of the head
        done, offset = [], 0
        for row, (job, draft) in enumerate(zip(jobs, drafts, strict=True)):
            assert job.sampler is not None and job.stopping is not None
            mine = logits[offset : offset + len(states[row])]
            offset += len(states[row])
            result = job.result
            stacked, exit_layer = 0, total
            if job.exit_row is not None:
                exit_layer = job.exit_row.shallow.layer
                stacked = self._catch_up(job, mine)
            mine = mine[stacked:]
            deep = (total - exit_layer) * stacked  # the stacked tokens' deep layers
            if tried is None:  # the inputs went through every layer here
                result.layer_tokens += deep + total * len(mine)
            else:  # their shallow layers were counted when the exits were tried
                result.layer_tokens += deep + (total - exit_layer) * len(mine)
            result.passes += 1
            if tried is not None:  # this row's exit was read: the threshold learns from it
                guess = tried[row]
                pair = (guess.confidence, guess.top == int(mine[0].argmax()))
                job.exit_row.threshold.observe([pair])  # type: ignore[union-attr]
                result.pairs.append(pair)
            probs = None
            if not job.sampler.greedy and draft:  # a point guess: q one-hot on the draft
                probs = [
                    torch.nn.functional.one_hot(torch.tensor(t), logits.shape[-1]).float()
                    for t in draft
                ]
            verdict = verify(Draft(draft, probs=probs), mine, job.sampler)
            kept = min(len(mine), verdict.accepted + 1)
            cache.set_fill(row, int(base[row]) + kept)
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

    @staticmethod
    def _catch_up(job: Job, logits: torch.Tensor) -> int:
        """A FREE row's stacked tokens have been through the deep layers: the threshold
        learns whether each shallow token was the deep one (FREE's pairs). Returns how
        many there were."""
        free = job.exit_row
        assert free is not None
        stacked = len(free.stack)
        if stacked:
            tops = logits[:stacked].argmax(-1).tolist()
            pairs = [(g.confidence, g.top == tops[i]) for i, g in enumerate(free.guesses)]
            free.threshold.observe(pairs)
            job.result.pairs += pairs
            job.result.catchups += 1
            free.stack.clear()
            free.guesses.clear()
        return stacked

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
        with self._wake:  # callers waiting in `run` look again
            job.finished.set()
            self._wake.notify_all()


def serve_here(schedulers: list[Scheduler], stop: Callable[[], bool]) -> None:
    """Run the loops of `schedulers` (which may share one engine: an iteration holds its
    scheduler's lock) in the calling thread, in turn, until `stop()`: a server, or a bench
    with several servers, calls it from the thread that loaded the model (see
    `Scheduler.run`). Waits for a loop another thread runs to be handed over."""
    me = threading.get_ident()
    for scheduler in schedulers:
        with scheduler._wake:
            scheduler._callers += 1  # a thread of its own hands the loop over
            while scheduler._driver is not None:
                scheduler._wake.wait(timeout=0.1)
            scheduler._driver = me
    first = schedulers[0]
    try:
        while not stop():
            busy = False
            for scheduler in schedulers:
                if scheduler._has_work():
                    scheduler._one_iteration()
                    busy = True
            if not busy:
                with first._wake:  # one scheduler: woken at once; several: polled
                    if not first._has_work():
                        first._wake.wait(timeout=0.1 if len(schedulers) == 1 else 0.005)
    finally:
        for scheduler in schedulers:
            with scheduler._wake:
                scheduler._callers -= 1
                scheduler._release()
