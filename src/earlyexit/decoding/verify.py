"""Judging drafted tokens against the full model: the rule shared by lossless
draft-and-verify decoding (decoding/speculative.py) and FREE's n-gram drafts
(decoding/shallow_deep.py).

Greedy: the longest prefix of drafts equal to the full model's argmax after each is kept,
and the full model's token replaces the first wrong draft (or follows the last right one).
Sampling: each draft passes the speculative-sampling test against its draft distribution
(decoding/sampling.py), so the output follows the full model's distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit.decoding.sampling import Sampler


@dataclass
class Draft:
    """Proposed tokens after the last emitted one.

    `states`, for a shallow draft: the layer-`layer` outputs of the last emitted token and of
    the drafts the drafter read out after (every draft when it stopped on low confidence, all
    but the last when it hit its token limit); their layers [0, layer) are in the cache, and
    the verify pass runs only the layers above. An n-gram draft has no states: verify runs
    every layer.
    `probs`: the draft distribution of each token when sampling (None: a point guess).
    """

    tokens: list[int]
    layer: int = 0
    states: torch.Tensor | None = None
    probs: list[torch.Tensor] | None = None


@dataclass
class Verdict:
    accepted: int  # drafts kept
    next_token: int | None  # the full model's token after them (None: none computed)

    def tokens(self, draft: Draft) -> list[int]:
        """What to emit: the kept drafts, then the full model's next token if computed."""
        kept = draft.tokens[: self.accepted]
        return kept if self.next_token is None else [*kept, self.next_token]


def verify(draft: Draft, logits: torch.Tensor, sampler: Sampler) -> Verdict:
    """Judge `draft` against the full model's logits after each verified input (row i
    follows the i-th input: the last emitted token, then the drafts)."""
    rows = logits.shape[0]
    for i, token in enumerate(draft.tokens[:rows]):
        if sampler.greedy:
            top = int(logits[i].argmax())
            if token != top:
                return Verdict(i, top)
            continue
        assert draft.probs is not None
        p = sampler.probs(logits[i])
        if not sampler.accept(p, draft.probs[i], token):
            return Verdict(i, sampler.resample(p, draft.probs[i]))
    accepted = min(len(draft.tokens), rows)
    if accepted < rows:  # every draft stood and the pass reaches one token further
        return Verdict(accepted, sampler.pick(logits[accepted]))
    return Verdict(accepted, None)
