"""Drafters: cheap guesses of the next few tokens, which the full model then verifies in one
pass (decoding/speculative.py).

- `NgramDrafter` (prompt lookup): the tokens that followed the most recent earlier
  occurrence of the context's last 3-, 2- or 1-gram (longest first). Free to compute and
  often right where the answer copies from the prompt (summaries, extractive QA).
- `ShallowDrafter`: the shallow exit drafts token by token through layers [0, E) and its
  readout, and stops as soon as its confidence falls below a threshold (Kangaroo's dynamic
  draft length). Its layer-[0, E) states and KV are kept, so the verify pass runs only
  layers [E, L) over them.
  With a trained draft block (readouts/draft_block.py), the exit reads the block's output
  instead of layer E's: the block attends over the layer-E states of the whole context, so
  it keeps its own KV as one more layer of the request's cache (rolled back with the rest)
  and must see every verified input's layer-E state (`reader`).
- `CompositeDrafter`: the n-gram drafter when the context has a match, else the shallow one.

Written here because transformers keeps prompt lookup inside `generate` (a rescan of the
whole context per step, no draft probabilities): this index is O(1) per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from earlyexit.decoding.draft_length import RowPassCosts, RowRecord, pass_width
from earlyexit.decoding.sampling import Sampler
from earlyexit.decoding.shallow_exit import ShallowExit, next_input
from earlyexit.decoding.verify import Draft
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine


class NgramIndex:
    """For every 1..`max_n`-gram of a growing token list, where it last ended with at least
    one token after it; O(max_n) per appended token, O(max_n) per lookup."""

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n
        self.tokens: list[int] = []
        self.last_end: dict[tuple[int, ...], int] = {}

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens) - 1  # grams ending here now have a token after them
            for n in range(1, self.max_n + 1):
                if end - n + 1 >= 0:
                    self.last_end[tuple(self.tokens[end - n + 1 : end + 1])] = end
            self.tokens.append(token)

    def lookup(self, count: int) -> tuple[int, list[int]]:
        """(n, up to `count` tokens that followed the latest earlier occurrence of the
        longest suffix n-gram that occurred before); (0, []) when none did."""
        size = len(self.tokens)
        for n in range(min(self.max_n, size), 0, -1):
            end = self.last_end.get(tuple(self.tokens[size - n :]))
            if end is not None:
                return n, self.tokens[end + 1 : end + 1 + count]
        return 0, []


@dataclass
class NgramDrafter:
    """Prompt lookup over prompt + output. The number drafted per pass: with `costs` (the
    machine's measured batch-1 pass costs, decoding/draft_length.py) the count that
    maximises expected tokens per second given the match length and this request's own
    acceptance so far (a text that does not copy stops drafting); else `lengths` per match
    length; else `max_tokens`."""

    max_tokens: int = 4
    max_n: int = 3
    lengths: dict[int, int] | None = None
    costs: dict[int, float] | None = None
    name: str = "ngram"
    index: NgramIndex = field(init=False)
    record: RowRecord = field(init=False)
    _proposed: tuple[int, list[int]] | None = field(init=False, default=None)

    reader = None  # reads no layer's states

    def start(self, prompt: list[int]) -> None:
        self.index = NgramIndex(self.max_n)
        self.index.extend(prompt)
        self.record = RowRecord()
        self._proposed = None

    def accept(self, tokens: list[int]) -> None:
        """Tokens emitted (verified) since the last call."""
        if self._proposed is not None:  # how many of the last drafts stood
            match, drafted = self._proposed
            kept = 0
            while kept < min(len(drafted), len(tokens)) and drafted[kept] == tokens[kept]:
                kept += 1
            self.record.record(match, len(drafted), kept)
            self._proposed = None
        self.index.extend(tokens)

    def propose(
        self, engine: LayerEngine, cache: LayerKVCache, budget: int, sampler: Sampler
    ) -> Draft:
        match, tokens = self.index.lookup(min(self.max_tokens, budget))
        if self.costs is not None:
            row = [(self.record, match, len(tokens))]
            tokens = tokens[: pass_width(row, RowPassCosts({1: self.costs})) - 1]
        elif self.lengths is not None:
            tokens = tokens[: self.lengths.get(match, 0)]
        self._proposed = (match, tokens) if tokens else None
        probs = None
        if not sampler.greedy:  # a point guess: q is one-hot on the drafted token
            probs = [_one_hot(t, engine.vocab_size) for t in tokens]
        return Draft(tokens, probs=probs)


def _one_hot(token: int, size: int) -> torch.Tensor:
    q = torch.zeros(size)
    q[token] = 1.0
    return q


@dataclass
class ShallowDrafter:
    """The shallow exit drafting autoregressively until its confidence drops below
    `threshold` (or `max_tokens` drafts); through its draft block if it has one."""

    shallow: ShallowExit
    threshold: float = 0.3
    max_tokens: int = 8
    name: str = "shallow"
    last: int = field(init=False, default=-1)

    @property
    def reader(self) -> ShallowExit | None:
        """The exit that must read every verified input's layer-k state (a block's)."""
        return self.shallow if self.shallow.block is not None else None

    def start(self, prompt: list[int]) -> None:
        self.last = prompt[-1]

    def accept(self, tokens: list[int]) -> None:
        if tokens:
            self.last = tokens[-1]

    def propose(
        self, engine: LayerEngine, cache: LayerKVCache, budget: int, sampler: Sampler
    ) -> Draft:
        """Runs layers [0, E) over the last emitted token and each draft it reads out after
        (all of them when it stops on low confidence; all but the last at its token limit)."""
        k = self.shallow.layer
        token, states, tokens, probs = self.last, [], [], []
        while len(tokens) < min(self.max_tokens, budget):
            hidden = engine.run_layers(next_input(engine, token), cache, 0, k)
            states.append(hidden)
            guess = self.shallow.guess(self.shallow.read(hidden, cache), sampler)
            if guess.confidence < self.threshold:
                break
            tokens.append(guess.token)
            if guess.probs is not None:
                probs.append(guess.probs)
            token = guess.token
        return Draft(
            tokens,
            layer=k,
            states=torch.cat(states, dim=1),
            probs=probs if not sampler.greedy else None,
        )


@dataclass
class CompositeDrafter:
    """N-gram drafts when the context has a match, else shallow drafts."""

    ngram: NgramDrafter
    shallow: ShallowDrafter
    name: str = "composite"

    @property
    def reader(self) -> ShallowExit | None:
        return self.shallow.reader

    def start(self, prompt: list[int]) -> None:
        self.ngram.start(prompt)
        self.shallow.start(prompt)

    def accept(self, tokens: list[int]) -> None:
        self.ngram.accept(tokens)
        self.shallow.accept(tokens)

    def propose(
        self, engine: LayerEngine, cache: LayerKVCache, budget: int, sampler: Sampler
    ) -> Draft:
        draft = self.ngram.propose(engine, cache, budget, sampler)
        if draft.tokens:
            return draft
        return self.shallow.propose(engine, cache, budget, sampler)


Drafter = NgramDrafter | ShallowDrafter | CompositeDrafter
