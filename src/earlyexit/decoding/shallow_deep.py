"""Early-exit decoding with a shallow-deep module (batch 1; greedy or sampled).

A token runs the shallow layers [0, k) and is read out there. If the shallow readout is
confident enough the token is emitted at once and its layer-k state is *stacked*; the
next token that goes deep runs layers [k, L) over the stacked states and its own in one
pass (FREE's synchronized parallel decoding), which fills the stacked tokens' deep KV
exactly as a full-depth run would have. No state is copied and nothing is approximated.
With an n-gram drafter, a step whose context has a match instead runs the last token and
the looked-up tokens through [0, k) and, with the stack, through [k, L) in that same
kind of pass, and keeps the drafts the full model agrees with.

The same pass yields the deep prediction for every stacked token: FREE's adaptive
threshold learns from (shallow confidence, shallow == deep) pairs. (Verifying the shallow
tokens and rolling back instead is `lossless` with the shallow drafter:
decoding/speculative.py.)

This loop is batch 1. Many requests at once decode FREE per row in the scheduler's running
batch (runtime/scheduler.py: per-row fill levels let each row's deep layers lag by its own
stack; the deep layers are skipped only when every row exits, and tried while that pays).

Methods: `full` (the reference), `static` (every token at layer k, the prompt too),
`free` (fixed or adaptive threshold).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from earlyexit.decoding.draft_length import MAX_DRAFT
from earlyexit.decoding.drafters import Drafter, NgramDrafter
from earlyexit.decoding.sampling import Sampler, SamplingConfig
from earlyexit.decoding.shallow_exit import Guess, ShallowExit, next_input
from earlyexit.decoding.verify import Draft, verify
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine


@dataclass
class DecodeConfig:
    max_new_tokens: int = 64
    stop_strings: tuple[str, ...] = ()
    stop_at_eos: bool = True
    max_stack: int = 16  # at most this many shallow tokens before a deep pass is forced
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # default: greedy
    # called with (token, exit layer) as each token is emitted: streaming builds on it
    on_token: Callable[[int, int], None] | None = None


@dataclass
class DecodeResult:
    tokens: list[int]
    exit_layers: list[int]  # the layer that produced each emitted token (k or L)
    seconds: float  # wall time of the whole request, prefill included
    layer_tokens: int  # decoder-layer applications spent (token x layer)
    catchups: int = 0
    rollbacks: int = 0
    passes: int = 0  # verify passes of draft-and-verify decoding (decoding/speculative.py)
    drafted: int = 0  # tokens proposed by its drafter
    accepted: int = 0  # of those, kept
    draft_seconds: float = 0.0  # time spent drafting
    pairs: list[tuple[float, bool]] = field(default_factory=list)  # (confidence, agreed)

    num_layers: int = 0  # the model's depth: tokens with a smaller exit layer exited early
    prefill_seconds: float = 0.0  # up to the first token: the same work for every method
    queue_seconds: float = 0.0  # waiting for a row of the scheduler's batch
    listener: Callable[[int, int], None] | None = field(default=None, repr=False)

    def push(self, token: int, layer: int) -> None:
        """Emit one token produced at `layer` (every loop emits through here)."""
        self.tokens.append(token)
        self.exit_layers.append(layer)
        if self.listener is not None:
            self.listener(token, layer)

    @property
    def decode_seconds(self) -> float:
        """Time spent on tokens 2..n, the part early exit can speed up."""
        return self.seconds - self.prefill_seconds

    @property
    def shallow_fraction(self) -> float:
        early = sum(1 for e in self.exit_layers if e < self.num_layers)
        return early / max(1, len(self.exit_layers))


class Threshold:
    """A fixed confidence threshold; subclasses learn it online from catch-up pairs."""

    def __init__(self, value: float) -> None:
        self.value = value

    def observe(self, pairs: list[tuple[float, bool]]) -> None:
        pass

    def begin_sequence(self) -> None:
        """Called before each request's decode (FREE's official threshold refits here)."""


class Stopping:
    def __init__(self, engine: LayerEngine, config: DecodeConfig) -> None:
        self.tokenizer, self.config = engine.tokenizer, config
        self.eos = engine.tokenizer.eos_token_id if config.stop_at_eos else None

    def done(self, tokens: list[int]) -> bool:
        if len(tokens) >= self.config.max_new_tokens:
            return True
        if self.eos is not None and tokens and tokens[-1] == self.eos:
            return True
        if self.config.stop_strings:
            tail = self.tokenizer.decode(tokens[-16:])
            return any(stop in tail for stop in self.config.stop_strings)
        return False


def prompt_ids(engine: LayerEngine, prompt: str | torch.Tensor) -> torch.Tensor:
    if isinstance(prompt, str):
        ids, _ = engine.encode([prompt])
        return ids
    return prompt.reshape(1, -1)


@dataclass
class Begun:
    """A request after its prefill and first token: what every decode loop starts from."""

    ids: torch.Tensor  # the prompt's ids [1, T]
    cache: LayerKVCache
    result: DecodeResult  # holds the first token; prefill_seconds set
    stopping: Stopping
    sampler: Sampler
    began: float  # perf_counter at the start (the request's clock)

    def finish(self) -> DecodeResult:
        self.result.seconds = time.perf_counter() - self.began
        return self.result


def begin(
    engine: LayerEngine,
    prompt: str | torch.Tensor,
    config: DecodeConfig,
    spare_slots: int = 1,
    shallow: ShallowExit | None = None,
    reader: ShallowExit | None = None,
) -> Begun:
    """Prefill the prompt and pick the first token: through every layer and the model's
    head, or (`shallow`, for `static`) through the shallow layers and the shallow exit.
    `spare_slots`: cache slots beyond prompt + max_new_tokens (drafts, stacked tokens).
    `reader`: a shallow exit whose draft block must read the prompt's layer-k states."""
    ids = prompt_ids(engine, prompt)
    sampler = Sampler(config.sampling)
    began = time.perf_counter()
    capacity = ids.shape[1] + config.max_new_tokens + spare_slots
    tap = reader.layer if reader is not None and reader.block is not None else None
    upto = shallow.layer if shallow is not None else tap
    state = engine.prefill(ids, capacity=capacity, upto=upto)
    hidden = state.hidden
    if shallow is None and tap is not None:
        assert reader is not None
        reader.read(hidden, state.cache)
        hidden = engine.run_layers(hidden, state.cache, tap, engine.num_layers)
    if shallow is None:
        first, layer = sampler.pick(engine.logits(hidden[:, -1])), engine.num_layers
    else:
        read = shallow.read(hidden, state.cache)
        first, layer = shallow.guess(read, sampler).token, shallow.layer
    result = DecodeResult([], [], 0.0, 0, num_layers=engine.num_layers)
    result.prefill_seconds = time.perf_counter() - began
    result.listener = config.on_token
    result.push(first, layer)
    return Begun(ids, state.cache, result, Stopping(engine, config), sampler, began)


def emit(result: DecodeResult, tokens: list[int], layer: int, stopping: Stopping) -> list[int]:
    """Append several tokens (a verified draft) one at a time, up to where decoding them
    one by one would have stopped (budget, EOS, stop string); returns those appended."""
    appended = []
    for token in tokens:
        if stopping.done(result.tokens):
            break
        result.push(token, layer)
        appended.append(token)
    return appended


def timed_propose(
    drafter: Drafter,
    result: DecodeResult,
    engine: LayerEngine,
    cache: LayerKVCache,
    budget: int,
    sampler: Sampler,
) -> Draft:
    """The drafter's proposal, its time booked in `result.draft_seconds`."""
    start = time.perf_counter()
    draft = drafter.propose(engine, cache, budget, sampler)
    result.draft_seconds += time.perf_counter() - start
    return draft


@torch.inference_mode()
def decode_full(
    engine: LayerEngine, prompt: str | torch.Tensor, config: DecodeConfig
) -> DecodeResult:
    """Full-depth greedy decoding: the reference for speed and for output identity."""
    run = begin(engine, prompt, config)
    tokens, total = run.result.tokens, engine.num_layers
    while not run.stopping.done(tokens):
        hidden = engine.run_layers(next_input(engine, tokens[-1]), run.cache, 0, total)
        run.result.push(run.sampler.pick(engine.logits(hidden[:, -1])), total)
        run.result.layer_tokens += total
        run.result.passes += 1
    return run.finish()


@torch.inference_mode()
def decode_static(
    engine: LayerEngine, shallow: ShallowExit, prompt: str | torch.Tensor, config: DecodeConfig
) -> DecodeResult:
    """Every token, prompt included, runs layers [0, k) only and is read out at k."""
    run = begin(engine, prompt, config, shallow=shallow)
    tokens, k = run.result.tokens, shallow.layer
    while not run.stopping.done(tokens):
        hidden = engine.run_layers(next_input(engine, tokens[-1]), run.cache, 0, k)
        read = shallow.read(hidden, run.cache)
        run.result.push(shallow.guess(read, run.sampler).token, k)
        run.result.layer_tokens += k
    return run.finish()


@torch.inference_mode()
def decode_shallow_deep(
    engine: LayerEngine,
    shallow: ShallowExit,
    prompt: str | torch.Tensor,
    config: DecodeConfig,
    threshold: Threshold,
    ngram: NgramDrafter | None = None,
) -> DecodeResult:
    """FREE's synchronized parallel decoding (lossy: shallow tokens are never revised).

    With `ngram`, a step whose context has an n-gram match verifies the looked-up tokens
    instead of exiting: layers [0, k) run over the last token and the drafts, then layers
    [k, L) over the stacked states and theirs in one pass (the catch-up), and the agreeing
    drafts plus the full model's next token are emitted (decoding/verify.py)."""
    run = begin(engine, prompt, config, config.max_stack + MAX_DRAFT + 2, reader=shallow)
    cache, sampler, result = run.cache, run.sampler, run.result
    k, total = shallow.layer, engine.num_layers
    if ngram is not None:
        ngram.start(run.ids[0].tolist())
    fed = 0  # emitted tokens the n-gram index has seen
    stack: list[torch.Tensor] = []  # layer-k states of inputs whose next token exited shallow
    drafts: list[Guess] = []  # the shallow guesses emitted for them

    def catch_up(current: torch.Tensor, guess: Guess) -> int:
        """Run layers [k, L) over the stacked states and the current input's; returns the
        deep token after the current input."""
        states = [*stack, current]
        hidden = engine.run_layers(torch.cat(states, dim=1), cache, k, total)
        result.layer_tokens += (total - k) * len(states)
        result.catchups += 1
        logits = engine.logits(hidden[0])
        tops = logits.argmax(-1).tolist()
        # the threshold learns whether the shallow argmax matched the deep one
        pairs = [(d.confidence, d.top == tops[i]) for i, d in enumerate(drafts)]
        pairs.append((guess.confidence, guess.top == tops[-1]))  # below the threshold
        result.pairs += pairs
        threshold.observe(pairs)
        stack.clear()
        drafts.clear()
        return tops[-1] if sampler.greedy else sampler.pick(logits[-1])

    def verify_ngram(draft: Draft) -> list[int]:
        """One pass over the stack and the n-gram draft; returns the tokens to emit."""
        inputs = torch.tensor([[result.tokens[-1], *draft.tokens]], device=engine.device)
        rows = inputs.shape[1]
        deep_len = cache.lengths[total - 1]
        fresh = engine.run_layers(engine.embed(inputs), cache, 0, k)
        hidden = engine.run_layers(torch.cat([*stack, fresh], dim=1), cache, k, total)
        result.layer_tokens += k * rows + (total - k) * (len(stack) + rows)
        result.catchups += 1
        logits = engine.logits(hidden[0])
        tops = logits[: len(stack)].argmax(-1).tolist()
        pairs = [(d.confidence, d.top == tops[i]) for i, d in enumerate(drafts)]
        result.pairs += pairs
        threshold.observe(pairs)
        verdict = verify(draft, logits[len(stack) :], sampler)
        assert verdict.next_token is not None  # an n-gram pass reaches past its drafts
        cache.truncate(deep_len + len(stack) + 1 + verdict.accepted)
        if shallow.block is not None:  # the inputs that stood pass through the block
            shallow.read(fresh[:, : 1 + verdict.accepted], cache)
        stack.clear()
        drafts.clear()
        result.drafted += len(draft.tokens)
        result.accepted += verdict.accepted
        return verdict.tokens(draft)

    while not run.stopping.done(result.tokens):
        if ngram is not None:
            ngram.accept(result.tokens[fed:])
            fed = len(result.tokens)
            budget = config.max_new_tokens - len(result.tokens)
            draft = timed_propose(ngram, result, engine, cache, budget, sampler)
            if draft.tokens:
                emit(result, verify_ngram(draft), total, run.stopping)
                continue
        hidden = engine.run_layers(next_input(engine, result.tokens[-1]), cache, 0, k)
        result.layer_tokens += k
        guess = shallow.guess(shallow.read(hidden, cache), sampler)
        if guess.confidence >= threshold.value and len(stack) < config.max_stack:
            stack.append(hidden)
            drafts.append(guess)
            result.push(guess.token, k)
        else:
            result.push(catch_up(hidden, guess), total)
    return run.finish()
