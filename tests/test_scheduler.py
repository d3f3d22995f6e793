"""Continuous batching (runtime/scheduler.py, engine/row_cache.py) on the real model: rows
join and leave a running batch at any step and each gets the tokens it gets alone.

A row in a batch is multiplied in other shapes than alone, so tokens are compared
tie-aware: where two runs differ, the solo run's top-2 logit gap at the first difference
must be within the bound measured for this computation (a real bug -- a wrong position,
mask or row -- changes logits by whole units, not by rounding).
Bounds: `scripts/experiments/batch_rounding.py` (8 rows, 24 greedy steps): fp32 batch vs
alone max |logit difference| 9.2e-5 for smollm2 and 6.2e-5 for gemma3, int4 0.67 (bf16
activations tie), on the AMD EPYC (Zen 3); BOUND is 10x the fp32 figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from earlyexit.decoding.draft_length import MATCH_PREFIX, RowPassCosts, RowRecord, pass_width
from earlyexit.decoding.shallow_deep import DecodeConfig, Threshold
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.engine import LayerEngine, quant
from earlyexit.readouts.readout import ExitReadout
from earlyexit.runtime.scheduler import (
    ExitRow,
    Job,
    QueueFull,
    RequestTimeout,
    Scheduler,
    exit_pays,
)

BOUND = 1e-3  # fp32 logits, a row in a batch against the row alone (measured 9.2e-5)
# int4 logits, a row of a batch on the dense fp32 copy against the row alone on the kernel
# (bf16 activations): measured 0.46 (AMD EPYC); the int4 batch-rounding bound of bench serve
INT4_DENSE_BOUND = 1.5
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "Summarize: Tom met Ann at the park. They played chess and Tom won twice. Tom met Ann",
    "List three colours:",
    "Once upon a time, in a land far away, there lived a",
]


def _ids(engine: LayerEngine, prompt: str) -> torch.Tensor:
    return engine.encode([prompt])[0]


def _job(engine: LayerEngine, prompt: str, tokens: int, drafts: bool = False) -> Job:
    """A greedy job; with drafts, 3 looked-up tokens per pass (fixed, so that drafting does
    not depend on this machine's pass costs)."""
    config = DecodeConfig(max_new_tokens=tokens, stop_at_eos=False)
    return Job(_ids(engine, prompt), config, drafts, fixed_drafts=3 if drafts else None)


def _same_or_tie(
    engine: LayerEngine,
    teacher_forced: Callable,
    prompt: str,
    alone: list[int],
    together: list[int],
) -> bool:
    """Equal tokens, or equal up to a position where the solo run's top-2 gap is within
    BOUND (a near-tie that rounding may flip; after it the texts may part)."""
    if alone == together:
        return True
    first = next(i for i, (a, b) in enumerate(zip(alone, together, strict=False)) if a != b)
    text = engine.tokenizer.decode(_ids(engine, prompt)[0], skip_special_tokens=False)
    logits = teacher_forced(engine, text, alone)[first]
    top = logits.topk(2).values
    return float(top[0] - top[1]) <= BOUND


def test_row_cache_rows_join_and_leave(smol: LayerEngine) -> None:
    """Rows of different lengths join (the buffers hold 1, 2, then 4 rows as they do: each
    row's keys survive the copies); removing one moves the last row into its place with
    its keys, values and fill."""
    cache = smol.new_row_cache(4, capacity=8)  # grows past its capacity on the way
    singles = [smol.prefill(_ids(smol, p)).cache for p in PROMPTS[:3]]
    held = []
    for row, single in enumerate(singles):
        assert cache.add(single) == row
        held.append(cache.keys[0].shape[0])
    assert held == [1, 2, 4]
    lengths = [s.lengths[0] for s in singles]
    assert cache.fill[:, :3].tolist() == [lengths] * smol.num_layers
    for row in range(3):
        keys, values = singles[row].layer_kv(smol.num_layers - 1)
        assert torch.equal(cache.keys[-1][row, :, : lengths[row]], keys[0])
        assert torch.equal(cache.values[-1][row, :, : lengths[row]], values[0])
    assert cache.remove(0) == 2  # the last row moved into row 0
    assert cache.rows == 2 and cache.fill[0, :3].tolist() == [lengths[2], lengths[1], 0]
    for layer in (0, smol.num_layers - 1):
        keys, _ = singles[2].layer_kv(layer)
        assert torch.equal(cache.keys[layer][0, :, : lengths[2]], keys[0])
    assert cache.remove(1) is None and cache.rows == 1


@pytest.mark.parametrize("weights", ["smol", "gemma", "smol_int4"])
def test_a_ragged_pass_gives_each_row_its_own_logits(
    weights: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over rows of different lengths, one row with three inputs and the others
    one (padding behind them): each row's logits are its batch-1 logits within the bound
    (int4: the batch on its dense fp32 copy, as chosen where that is faster; alone on the
    int4 kernel with bf16 activations)."""
    engine: LayerEngine = request.getfixturevalue(weights)
    bound = BOUND
    if weights == "smol_int4":
        for layer in quant._products(engine.model, head=False):
            monkeypatch.setattr(layer, "batch_dense", (2, "fp32"))
        bound = INT4_DENSE_BOUND
    total = engine.num_layers
    singles, cache, last = [], engine.new_row_cache(4), []
    for prompt in PROMPTS[:4]:
        state = engine.prefill(_ids(engine, prompt))
        singles.append(state.cache)
        cache.add(state.cache)
        last.append(int(engine.logits(state.hidden[:, -1]).argmax()))
    inputs = torch.tensor([[t, t, t] for t in last])
    inputs[1, 1:] = torch.tensor([11, 12])  # row 1: its token and two drafts
    counts = torch.tensor([1, 3, 1, 1])
    hidden = engine.run_rows(engine.embed(inputs), cache, 0, total, counts)
    batched = engine.logits(hidden)
    for row, single in enumerate(singles):
        n = int(counts[row])
        alone = engine.logits(
            engine.run_layers(engine.embed(inputs[row : row + 1, :n]), single, 0, total)
        )[0]
        assert (alone - batched[row, :n]).abs().max() < bound
        assert int(cache.fill[total - 1, row]) == single.lengths[total - 1]


@pytest.mark.parametrize("drafts", [False, True], ids=["full", "lossless"])
def test_requests_joining_and_leaving_get_their_tokens_alone(
    smol: LayerEngine, teacher_forced: Callable, drafts: bool
) -> None:
    """Five requests of different lengths and budgets arrive while others decode (three
    rows at most): each gets the tokens it gets alone, tie-aware."""
    lock = threading.Lock()
    budgets = [24, 10, 30, 6, 16]
    alone = []
    for prompt, budget in zip(PROMPTS, budgets, strict=True):
        solo = Scheduler(smol, lock, max_batch=1)
        alone.append(solo.run(_job(smol, prompt, budget, drafts)).tokens)
        solo.close()
        greedy = smol.greedy(_ids(smol, prompt), budget)[0].tolist()
        assert _same_or_tie(smol, teacher_forced, prompt, greedy, alone[-1])
    scheduler = Scheduler(smol, lock, max_batch=3)
    jobs = []
    for prompt, budget in zip(PROMPTS, budgets, strict=True):
        jobs.append(scheduler.submit(_job(smol, prompt, budget, drafts)))
        time.sleep(0.05)  # later arrivals join a batch that is decoding
    for job in jobs:
        assert job.finished.wait(300) and job.error is None
    stats = scheduler.stats()
    scheduler.close()
    assert stats.running == 0 and stats.mean_batch > 1.5  # they did decode together
    assert (stats.drafted_rows > 0) == drafts and stats.exit_tries == 0
    for prompt, job, solo_tokens, budget in zip(PROMPTS, jobs, alone, budgets, strict=True):
        assert len(job.result.tokens) == budget
        assert _same_or_tie(smol, teacher_forced, prompt, solo_tokens, job.result.tokens)
    if drafts:  # the repeated phrase is looked up and verified
        assert sum(job.result.accepted for job in jobs) > 0


def test_a_cancelled_request_frees_its_row(smol: LayerEngine) -> None:
    scheduler = Scheduler(smol, threading.Lock(), max_batch=2)
    long = scheduler.submit(_job(smol, PROMPTS[0], 2000))
    while not long.result.tokens:
        time.sleep(0.01)
    short = scheduler.submit(_job(smol, PROMPTS[1], 4))
    long.cancel()
    assert short.finished.wait(60) and long.finished.wait(60)
    assert len(long.result.tokens) < 2000 and len(short.result.tokens) == 4
    assert scheduler.stats().running == 0 and scheduler.cache is None  # no KV kept
    scheduler.close()


def test_a_request_past_its_timeout_ends_where_it_is(smol: LayerEngine) -> None:
    """A job still waiting when its timeout passes never runs; a running one stops at the
    next iteration and frees its row; both end with RequestTimeout."""
    lock = threading.Lock()
    scheduler = Scheduler(smol, lock, max_batch=2)
    waiting = _job(smol, PROMPTS[1], 4)
    waiting.timeout = 0.05
    with lock:  # the loop cannot take it off the queue in time
        scheduler.submit(waiting)
        time.sleep(0.2)
    running = _job(smol, PROMPTS[0], 2000)
    running.timeout = 2.0
    for job in (waiting, scheduler.submit(running)):
        assert job.finished.wait(120) and isinstance(job.error, RequestTimeout)
    assert waiting.result.tokens == [] and 0 < len(running.result.tokens) < 2000
    assert scheduler.stats().running == 0 and scheduler.cache is None
    scheduler.close()


def test_a_full_queue_refuses_at_once(smol: LayerEngine) -> None:
    lock = threading.Lock()
    scheduler = Scheduler(smol, lock, max_batch=1, max_queue=1)
    with lock:  # the loop cannot take a job off the queue
        scheduler.submit(_job(smol, PROMPTS[0], 2))
        with pytest.raises(QueueFull, match="max_queue 1"):
            scheduler.submit(_job(smol, PROMPTS[1], 2))
    scheduler.close()


def _costs(per_extra_token: float, rows_cost: float = 0.0) -> RowPassCosts:
    """A pass costs 1 + per_extra_token per input beyond the first, + rows_cost per row."""
    return RowPassCosts(
        {
            b: {n: 1.0 + per_extra_token * (n - 1) + rows_cost * b for n in range(1, 9)}
            for b in (1, 2, 4, 8)
        }
    )


def test_draft_width_follows_pass_costs_and_each_rows_record() -> None:
    """The width maximises expected tokens per second: drafts where extra inputs are
    nearly free and the looked-up tokens likely; none where a pass over more inputs costs
    as much as the tokens it can win, or where a row's own record says it does not copy."""
    good = RowRecord()
    assert pass_width([(good, 3, 7)], _costs(0.02)) > 1  # cheap inputs, a 3-gram match
    assert pass_width([(good, 3, 7)], _costs(1.0)) == 1  # each input costs a whole pass
    assert pass_width([(good, 0, 0)], _costs(0.0)) == 1  # nothing looked up
    poor = RowRecord()
    for _ in range(20):  # drafted 4 after a 3-gram twenty times, never accepted
        poor.record(3, 4, 0)
    assert poor.scale < 0.1 < good.scale
    assert pass_width([(poor, 3, 7)], _costs(0.2)) == 1 < pass_width([(good, 3, 7)], _costs(0.2))
    # eight rows: one row's drafts widen the pass for all; worth it only when cheap
    rows = [(good, 1, 7)] + [(good, 0, 0)] * 7
    assert pass_width(rows, _costs(0.5)) == 1
    assert pass_width(rows, _costs(0.001)) > 1
    # interpolated batch sizes lie between their neighbours
    costs = _costs(0.1, rows_cost=0.5)
    assert costs.at(2, 3) < costs.at(3, 3) < costs.at(4, 3)
    assert MATCH_PREFIX[3][0] > MATCH_PREFIX[1][0]


def _free_job(engine: LayerEngine, prompt: str, tokens: int, threshold: float) -> Job:
    """A greedy FREE row (plain: no drafts) exiting at layer 24 through the logit lens."""
    config = DecodeConfig(max_new_tokens=tokens, stop_at_eos=False)
    free = ExitRow(ShallowExit(ExitReadout(engine), FREE_LAYER), Threshold(threshold))
    return Job(_ids(engine, prompt), config, drafts=False, exit_row=free)


FREE_LAYER = 24
KV_BOUND = 1e-3  # fp32 keys/values, rows of a batch against one prefill (6.0e-5, AMD EPYC)


def test_free_rows_exit_per_row_and_catch_up_exactly(
    smol: LayerEngine, teacher_forced: Callable
) -> None:
    """Three FREE rows, exits tried at every step, and a full row that joins while they hold
    stacked tokens: each FREE token emitted at the top is the full model's next token after
    the row's own text, each emitted at layer 24 the exit's argmax there; after a catch-up a
    row's keys/values in every layer are those of one full-depth run over its text."""
    scheduler = Scheduler(smol, threading.Lock(), max_batch=4, exits="always")
    jobs = [_free_job(smol, prompt, 24, threshold=0.3) for prompt in PROMPTS[:3]]
    scheduler.waiting.extend(jobs)
    late = _job(smol, PROMPTS[3], 12)
    checked, worst = 0, 0.0
    while not all(job.finished.is_set() for job in [*jobs, late]):
        scheduler._iteration()
        stacked = any(
            job.exit_row.stack for job in jobs if job.exit_row and not job.finished.is_set()
        )
        if stacked and late not in scheduler.waiting and not late.finished.is_set():
            scheduler.waiting.append(late)  # joins rows whose deep layers lag
        cache = scheduler.cache
        for job in scheduler.running:
            if job.exit_row is None or job.exit_row.stack or not job.result.catchups:
                continue
            fill = int(cache.fill[0, job.row])
            assert cache.fill[:, job.row].eq(fill).all()  # every layer caught up
            text = torch.cat([job.ids[0], torch.tensor(job.result.tokens[:-1])])[None]
            fresh = smol.prefill(text).cache
            for layer in range(smol.num_layers):
                keys, values = fresh.layer_kv(layer)
                worst = max(
                    worst,
                    float((cache.keys[layer][job.row, :, :fill] - keys[0]).abs().max()),
                    float((cache.values[layer][job.row, :, :fill] - values[0]).abs().max()),
                )
            checked += 1
    assert late.result.exit_layers == [smol.num_layers] * 12
    assert checked > 0 and worst < KV_BOUND
    readout, top, exited, near = ExitReadout(smol), smol.num_layers, 0, 0
    for prompt, job in zip(PROMPTS, jobs, strict=False):
        tokens, layers = job.result.tokens, job.result.exit_layers
        assert len(tokens) == 24 and set(layers) <= {FREE_LAYER, top}
        text = smol.tokenizer.decode(job.ids[0], skip_special_tokens=False)
        deep = teacher_forced(smol, text, tokens)
        sequence = torch.cat([job.ids[0], torch.tensor(tokens[:-1])])[None]
        with torch.inference_mode():
            cache = smol.new_cache(1, sequence.shape[1])
            hidden = smol.run_layers(smol.embed(sequence), cache, 0, FREE_LAYER)[0]
            shallow = readout.logits(hidden[job.ids.shape[1] - 1 :], FREE_LAYER)
        for i, (token, layer) in enumerate(zip(tokens, layers, strict=True)):
            logits = deep[i] if layer == top else shallow[i]
            gap = logits.topk(2).values
            if float(gap[0] - gap[1]) <= BOUND:
                near += 1  # a near-tie: either token is this computation's answer
                continue
            assert token == int(logits.argmax()), (prompt, i, layer)
            exited += layer == FREE_LAYER
        assert job.exit_row is not None and job.result.catchups > 0
        # every exited token taught the threshold, but those still stacked when it ended
        assert len(job.result.pairs) >= layers.count(FREE_LAYER) - len(job.exit_row.stack)
    assert exited >= 6 and near <= 2  # rows did exit, and near-ties are rare
    stats = scheduler.stats()  # counted: exits read, and passes that skipped the deep layers
    assert 0 < stats.exit_skips < stats.exit_tries <= stats.steps and stats.drafted_rows == 0


def _calm_job(engine: LayerEngine, prompt: str, tokens: int, threshold: float) -> Job:
    """A greedy CALM row exiting at layer 24 through the logit lens (state copying)."""
    config = DecodeConfig(max_new_tokens=tokens, stop_at_eos=False)
    shallow = ShallowExit(ExitReadout(engine), FREE_LAYER)
    row = ExitRow(shallow, Threshold(threshold), copy_state=True)
    return Job(_ids(engine, prompt), config, drafts=False, exit_row=row)


CALM_THRESHOLD = 0.3
CONFIDENCE_BOUND = 1e-3  # a probability gap this near the threshold may exit either way


def _calm_alone(
    engine: LayerEngine, prompt: str, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[int], list[int], list[float], list[float]]:
    """`decode_calm` alone: tokens, exit layers, and per token the exit's confidence
    (token 0: none) and the top-2 logit gap of each deep token's logits."""
    from earlyexit.decoding.calm import decode_calm

    shallow = ShallowExit(ExitReadout(engine), FREE_LAYER)
    confidences: list[float] = [float("nan")]
    gaps: list[float] = []
    guess, logits = shallow.guess, engine.logits
    reading = []  # inside the exit's readout (it calls engine.logits too)

    def seen_guess(hidden: torch.Tensor, sampler: object = None) -> object:
        reading.append(True)
        out = guess(hidden, sampler)
        reading.pop()
        confidences.append(out.confidence)
        return out

    def seen_logits(hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        out = logits(hidden, token_ids)
        if not reading:  # the full model's head: the first token or a deep one
            top = out[-1].topk(2).values
            gaps.append(float(top[0] - top[1]))
        return out

    monkeypatch.setattr(shallow, "guess", seen_guess)
    with monkeypatch.context() as patch:
        patch.setattr(engine, "logits", seen_logits)
        config = DecodeConfig(max_new_tokens=tokens, stop_at_eos=False)
        result = decode_calm(
            engine, shallow, _ids(engine, prompt), config, Threshold(CALM_THRESHOLD)
        )
    deep = iter(gaps)
    per_token = [
        next(deep) if layer == engine.num_layers else float("inf") for layer in result.exit_layers
    ]
    return result.tokens, result.exit_layers, confidences, per_token


def test_calm_rows_copy_their_exited_states(
    smol: LayerEngine, teacher_forced: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CALM per row (exits tried at every step). Alone in the scheduler a CALM row decodes
    as `decode_calm` does: the same tokens and exit layers, up to a near-tie (a confidence
    within CONFIDENCE_BOUND of the threshold, or a deep top-2 gap within BOUND). Three CALM
    rows and a full row joining mid-batch: every token a CALM row emits at layer 24 is the
    exit's argmax over the row's own text (layers below 24 are never approximated) with a
    gap at the threshold; an exited token's keys/values in layers 24..29 are what
    `copy_state_kv` computes from its layer-24 state alone; the full row gets its solo
    tokens (the copies stay in their rows)."""
    top = smol.num_layers
    scheduler = Scheduler(smol, threading.Lock(), max_batch=4, exits="always")
    job = _calm_job(smol, PROMPTS[1], 24, CALM_THRESHOLD)
    scheduler.waiting.append(job)
    while not job.finished.is_set():
        scheduler._iteration()
    tokens, layers, confidences, gaps = _calm_alone(smol, PROMPTS[1], 24, monkeypatch)
    assert FREE_LAYER in layers and top in layers[1:]  # this prompt both exits and goes deep
    mine = list(zip(job.result.tokens, job.result.exit_layers, strict=True))
    alone = list(zip(tokens, layers, strict=True))
    if mine != alone:
        i = next(i for i, (a, b) in enumerate(zip(alone, mine, strict=True)) if a != b)
        near = abs(confidences[i] - CALM_THRESHOLD) <= CONFIDENCE_BOUND or gaps[i] <= BOUND
        assert near, (i, alone[i], mine[i], confidences[i], gaps[i])

    scheduler = Scheduler(smol, threading.Lock(), max_batch=4, exits="always")
    jobs = [_calm_job(smol, prompt, 16, CALM_THRESHOLD) for prompt in PROMPTS[:3]]
    scheduler.waiting.extend(jobs)
    late = _job(smol, PROMPTS[3], 12)
    copied, worst, readout = 0, 0.0, ExitReadout(smol)
    while not all(j.finished.is_set() for j in [*jobs, late]):
        emitted = {id(j): len(j.result.tokens) for j in jobs}
        scheduler._iteration()
        if scheduler.steps == 3:
            scheduler.waiting.append(late)  # joins rows that hold copied states
        for j in scheduler.running:
            fresh = j.exit_row is not None and len(j.result.tokens) == emitted[id(j)] + 1
            if not (fresh and j.result.exit_layers[-1] == FREE_LAYER):
                continue
            # the step's input: the row's text but its newest token, whose slot is the last
            text = torch.cat([j.ids[0], torch.tensor(j.result.tokens[:-1])])[None]
            slot = text.shape[1] - 1
            cache = scheduler.cache
            assert int(cache.fill[top - 1, j.row]) == slot + 1
            with torch.inference_mode():
                alone_cache = smol.new_cache(1, text.shape[1])
                smol.run_layers(smol.embed(text[:, :slot]), alone_cache, 0, top)
                state = smol.run_layers(smol.embed(text[:, slot:]), alone_cache, 0, FREE_LAYER)
                smol.copy_state_kv(state, alone_cache, FREE_LAYER, top)
            for layer in range(FREE_LAYER, top):
                keys, values = alone_cache.layer_kv(layer)
                worst = max(
                    worst,
                    float((cache.keys[layer][j.row, :, slot] - keys[0, :, slot]).abs().max()),
                    float((cache.values[layer][j.row, :, slot] - values[0, :, slot]).abs().max()),
                )
            copied += 1
    assert copied >= 3 and worst < KV_BOUND
    exited = 0
    for j in jobs:
        assert len(j.result.tokens) == 16 and set(j.result.exit_layers) <= {FREE_LAYER, top}
        sequence = torch.cat([j.ids[0], torch.tensor(j.result.tokens[:-1])])[None]
        with torch.inference_mode():
            cache = smol.new_cache(1, sequence.shape[1])
            hidden = smol.run_layers(smol.embed(sequence), cache, 0, FREE_LAYER)[0]
            shallow = readout.logits(hidden[j.ids.shape[1] - 1 :], FREE_LAYER).softmax(-1)
        for i, (token, layer) in enumerate(zip(j.result.tokens, j.result.exit_layers, strict=True)):
            if layer != FREE_LAYER:
                continue
            probs = shallow[i].topk(2).values
            assert float(probs[0] - probs[1]) >= CALM_THRESHOLD - CONFIDENCE_BOUND, i
            assert token == int(shallow[i].argmax()), i
            exited += 1
    assert exited >= 3
    solo = _job(smol, PROMPTS[3], 12)
    scheduler.waiting.append(solo)
    while not solo.finished.is_set():
        scheduler._iteration()
    assert late.result.exit_layers == [top] * 12
    assert _same_or_tie(smol, teacher_forced, PROMPTS[3], solo.result.tokens, late.result.tokens)


def test_free_exits_are_tried_only_while_they_pay() -> None:
    """Exits save the deep layers' time only when every row exits, and cost the exit heads
    always: tried at batch 1 with a good exit rate, not with eight rows of the same rate
    (0.6 ** 8 = 1.7%), and measured first when a time is unknown."""
    assert exit_pays([0.6], deep_seconds=0.010, exit_seconds=0.002)
    assert not exit_pays([0.6] * 8, deep_seconds=0.020, exit_seconds=0.004)
    assert not exit_pays([0.1], deep_seconds=0.010, exit_seconds=0.002)
    assert exit_pays([0.6] * 8, deep_seconds=None, exit_seconds=0.004)
    assert exit_pays([0.6], deep_seconds=0.010, exit_seconds=None)


def _job_seen_from(engine: LayerEngine, prompt: str, tokens: int, seen: set[int]) -> Job:
    """A greedy job whose listener records the threads its tokens were decoded in."""
    config = DecodeConfig(
        max_new_tokens=tokens,
        stop_at_eos=False,
        on_token=lambda token, layer: seen.add(threading.get_ident()),
    )
    return Job(_ids(engine, prompt), config, drafts=False)


def test_the_caller_runs_the_loop_and_hands_it_on(smol: LayerEngine) -> None:
    """`run` decodes in the calling thread (the thread that loaded the model is the fast
    one); callers in other threads share the batch and take the loop over in turn; a job
    only submitted is run by a thread of the scheduler's own, which ends when idle."""
    scheduler = Scheduler(smol, threading.Lock(), max_batch=4)
    here: set[int] = set()
    assert len(scheduler.run(_job_seen_from(smol, PROMPTS[0], 6, here)).tokens) == 6
    assert here == {threading.get_ident()}
    seen: list[set[int]] = [set() for _ in range(3)]
    results: dict[int, int] = {}

    def call(i: int, tokens: int) -> None:
        results[i] = len(scheduler.run(_job_seen_from(smol, PROMPTS[i], tokens, seen[i])).tokens)

    callers = [threading.Thread(target=call, args=(i, 4 + 8 * i)) for i in range(3)]
    for thread in callers:
        thread.start()
    for thread in callers:
        thread.join(300)
    assert results == {0: 4, 1: 12, 2: 20}
    # the longest job outlives the others' callers: its own caller ran its last steps
    assert {t.ident for t in callers}.issuperset(set().union(*seen))
    assert callers[2].ident in seen[2]
    alone: set[int] = set()
    job = scheduler.submit(_job_seen_from(smol, PROMPTS[3], 5, alone))
    assert job.finished.wait(120) and len(job.result.tokens) == 5
    assert alone and threading.get_ident() not in alone
    deadline = time.monotonic() + 10
    while scheduler._driver is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler._driver is None  # its thread ended with the work
    scheduler.close()


def test_calls_run_whole_in_the_loops_thread(smol: LayerEngine) -> None:
    """`Scheduler.call`: the work runs in the thread running the loop (the caller's own when
    no one else runs it), its error is raised in the caller, a call from inside the loop's
    work runs at once, and one withdrawn (`give_up`) while it waits never runs."""
    scheduler = Scheduler(smol, threading.Lock(), max_batch=2)
    me = threading.get_ident()
    assert scheduler.call(threading.get_ident) == me
    assert scheduler.call(lambda: scheduler.call(lambda: 7)) == 7  # no deadlock
    with pytest.raises(ZeroDivisionError):
        scheduler.call(lambda: 1 / 0)
    hold, holding = threading.Event(), threading.Event()

    def busy() -> int:
        holding.set()
        hold.wait(30)
        return threading.get_ident()

    driver: list[int] = []
    worker = threading.Thread(target=lambda: driver.append(scheduler.call(busy)))
    worker.start()
    assert holding.wait(30)
    ran, stop = [], threading.Event()
    waiter_error: list[BaseException] = []

    def withdrawn() -> None:
        try:
            scheduler.call(
                lambda: ran.append(1), lambda: QueueFull("gave up") if stop.is_set() else None
            )
        except QueueFull as err:
            waiter_error.append(err)

    waiter = threading.Thread(target=withdrawn)
    waiter.start()
    time.sleep(0.2)
    stop.set()
    waiter.join(30)
    hold.set()
    worker.join(30)
    assert waiter_error and not ran and not scheduler.calls
    assert driver and driver[0] != me  # it ran in the worker, which ran the loop
    scheduler.close()
