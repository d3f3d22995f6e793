"""Draft-and-verify decoding (batch 1): lossless, for any drafter.

Each step the drafter proposes tokens after the last emitted one; one pass of the full model
over the last token and the drafts (all layers for an n-gram draft; layers [E, L) over the
kept layer-E states for a shallow one) gives the full model's prediction after each of them.
The longest agreeing prefix is kept (greedy), or each draft passes the speculative-sampling
test (sampling); the first disagreement is replaced by the full model's token, and the KV of
everything after it is dropped (`cache.truncate`). The output is the full model's greedy
output up to float rounding: a pass over several rows multiplies in other shapes than a pass
over one row, which can flip a near-tie argmax (BENCHMARKS.md measures how often).
"""

from __future__ import annotations

import torch

from earlyexit.decoding.draft_length import MAX_DRAFT
from earlyexit.decoding.drafters import Drafter
from earlyexit.decoding.shallow_deep import (
    DecodeConfig,
    DecodeResult,
    begin,
    emit,
    timed_propose,
)
from earlyexit.decoding.verify import Draft, verify
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine


def verify_pass(
    engine: LayerEngine, cache: LayerKVCache, last: int, draft: Draft, tap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full model's logits after the last emitted token and each draft (for a shallow
    draft, after each input whose layer-E state it holds: its last draft may have none),
    and, for an n-gram draft with `tap`, the inputs' layer-`tap` states."""
    total, tapped = engine.num_layers, None
    if draft.states is not None:
        hidden = engine.run_layers(draft.states, cache, draft.layer, total)
    else:
        ids = torch.tensor([[last, *draft.tokens]], device=engine.device)
        hidden = engine.embed(ids)
        if tap is not None:  # the same products, in two spans
            hidden = tapped = engine.run_layers(hidden, cache, 0, tap)
        hidden = engine.run_layers(hidden, cache, tap or 0, total)
    return engine.logits(hidden[0]), tapped


@torch.inference_mode()
def decode_speculative(
    engine: LayerEngine, drafter: Drafter, prompt: str | torch.Tensor, config: DecodeConfig
) -> DecodeResult:
    """Lossless draft-and-verify decoding; the result counts passes, drafts and acceptances."""
    reader = drafter.reader  # a draft block must see every input that stands
    tap = reader.layer if reader is not None else None
    run = begin(engine, prompt, config, spare_slots=MAX_DRAFT + 2, reader=reader)
    cache, sampler, result, stopping = run.cache, run.sampler, run.result, run.stopping
    tokens, total = result.tokens, engine.num_layers
    drafter.start(run.ids[0].tolist() + tokens)
    while not stopping.done(tokens):
        base = cache.lengths[total - 1]
        budget = config.max_new_tokens - len(tokens)
        draft = timed_propose(drafter, result, engine, cache, budget, sampler)
        logits, tapped = verify_pass(engine, cache, tokens[-1], draft, tap)
        rows = logits.shape[0]
        result.layer_tokens += rows * total  # a shallow draft ran [0, E) of these rows
        verdict = verify(draft, logits, sampler)
        # keep the KV of the inputs whose successors stood: the last token and accepted drafts
        kept = min(rows, verdict.accepted + 1)
        cache.truncate(base + kept)
        if reader is not None and tapped is not None:  # an n-gram pass's inputs that stood
            reader.read(tapped[:, :kept], cache)
        new = emit(result, verdict.tokens(draft), total, stopping)
        result.passes += 1
        result.drafted += len(draft.tokens)
        result.accepted += verdict.accepted
        result.rollbacks += int(verdict.accepted < len(draft.tokens))
        drafter.accept(new)
    return run.finish()
