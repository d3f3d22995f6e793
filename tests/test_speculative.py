"""Draft-and-verify decoding: the n-gram index, the verify rule, and lossless decoding with
every drafter equal to greedy full-depth decoding on real weights (rollbacks exercised)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from earlyexit.decoding.drafters import (
    CompositeDrafter,
    NgramDrafter,
    NgramIndex,
    ShallowDrafter,
)
from earlyexit.decoding.sampling import Sampler, SamplingConfig
from earlyexit.decoding.shallow_deep import DecodeConfig, decode_full
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.decoding.speculative import decode_speculative, verify_pass
from earlyexit.decoding.verify import Draft, verify
from earlyexit.engine import LayerEngine
from earlyexit.readouts.readout import ExitReadout
from earlyexit.tasks.generation import render_prompt

# a dialogue summary: the answer copies names and phrases, so n-gram drafts often stand
PROMPT = (
    "Summarize this dialogue in one sentence.\n\nAnna: Tom, my train is late, I will be at "
    "the station at six, not at five.\nTom: OK Anna, I will wait for you at the station at "
    "six then.\nAnna: Thanks Tom!"
)


def test_ngram_index_longest_and_latest_match_first() -> None:
    index = NgramIndex(max_n=3)
    index.extend([1, 2, 3, 9, 2, 3, 7, 8, 5, 2, 3])
    # suffix (5, 2, 3) never occurred before; (2, 3) last occurred before 7, 8, ...
    assert index.lookup(3)[1] == [7, 8, 5]
    index.extend([7])  # (2, 3, 7) occurred once before: continue after it
    assert index.lookup(2)[1] == [8, 5]
    assert index.lookup(10)[1] == [8, 5, 2, 3, 7]  # runs up to the end of the context
    index.extend([4])  # 4 never occurred: no draft
    assert index.lookup(4)[1] == []
    # built token by token or at once: the same index
    one_by_one = NgramIndex(max_n=3)
    for token in index.tokens:
        one_by_one.extend([token])
    assert one_by_one.last_end == index.last_end


def test_verify_keeps_the_agreeing_prefix_and_the_full_models_next_token() -> None:
    greedy = Sampler()
    logits = torch.nn.functional.one_hot(torch.tensor([5, 6, 7, 8]), 10).float()
    # rows follow: the last token, then drafts 5, 6, 7 -> full model says 5, 6, 7, 8
    assert verify(Draft([5, 6, 7]), logits, greedy).__dict__ == {"accepted": 3, "next_token": 8}
    assert verify(Draft([5, 9, 7]), logits, greedy).__dict__ == {"accepted": 1, "next_token": 6}
    assert verify(Draft([]), logits[:1], greedy).__dict__ == {"accepted": 0, "next_token": 5}
    # a shallow draft's last token has not been through any layer: no row beyond it
    assert verify(Draft([5, 6]), logits[:2], greedy).__dict__ == {
        "accepted": 2,
        "next_token": None,
    }


def test_verify_of_point_drafts_when_sampling() -> None:
    """An n-gram draft is a point guess (q one-hot): kept with probability p[token]."""
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=0))
    impossible = torch.tensor([[0.0, 0.0, 10.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    impossible[0, 1] = -1e9  # p[1] = 0 after the first input
    one_hot = [torch.tensor([0.0, 1.0, 0.0, 0.0])]
    verdict = verify(Draft([1], probs=one_hot), impossible, sampler)
    assert verdict.accepted == 0 and verdict.next_token != 1
    certain = torch.tensor([[-1e9, 10.0, -1e9, -1e9], [0.0, 0.0, 0.0, 10.0]])  # p[1] = 1
    for _ in range(20):
        assert verify(Draft([1], probs=one_hot), certain, sampler).accepted == 1


def test_verify_rolls_the_cache_back_to_a_full_run(smol: LayerEngine) -> None:
    ids, _ = smol.encode([PROMPT])
    truth = smol.greedy(ids, 4)[0].tolist()
    state = smol.prefill(ids, capacity=ids.shape[1] + 8)
    first = truth[0]
    base = state.cache.lengths[-1]
    draft = Draft([truth[1], truth[2] + 1, 7])  # one right, then wrong
    logits, _ = verify_pass(smol, state.cache, first, draft)
    verdict = verify(draft, logits, Sampler())
    assert (verdict.accepted, verdict.next_token) == (1, truth[2])
    state.cache.truncate(base + verdict.accepted + 1)
    reference = smol.prefill(torch.cat([ids, torch.tensor([truth[:2]])], dim=1))
    assert state.cache.lengths == reference.cache.lengths
    for layer in range(smol.num_layers):
        for got, want in zip(
            state.cache.layer_kv(layer), reference.cache.layer_kv(layer), strict=True
        ):
            assert (got - want).abs().max().item() <= 1e-4


def _drafters(engine: LayerEngine) -> dict[str, object]:
    # the plain logit lens two thirds up, drafting at a low threshold: often wrong
    shallow = ShallowExit(ExitReadout(engine), (2 * engine.num_layers) // 3)
    return {
        "ngram": NgramDrafter(max_tokens=4),
        "shallow": ShallowDrafter(shallow, threshold=0.05, max_tokens=4),
        "composite": CompositeDrafter(NgramDrafter(), ShallowDrafter(shallow, threshold=0.05)),
    }


@pytest.mark.parametrize("kind", ["ngram", "shallow", "composite"])
def test_lossless_equals_greedy_with_every_drafter(engine: LayerEngine, kind: str) -> None:
    config = DecodeConfig(max_new_tokens=48, stop_at_eos=False)
    prompt = render_prompt(engine.tokenizer, PROMPT)  # chat template where there is one
    reference = decode_full(engine, prompt, config)
    result = decode_speculative(engine, _drafters(engine)[kind], prompt, config)
    assert result.tokens == reference.tokens
    assert result.drafted > result.accepted > 0  # drafts were kept and rolled back
    assert result.rollbacks > 0 and result.passes < len(result.tokens) - 1


def test_lossless_ngram_sampling_emits_only_what_the_full_model_could(
    smol: LayerEngine, teacher_forced: Callable
) -> None:
    sampling = SamplingConfig(temperature=1.0, top_p=0.3, seed=0)
    config = DecodeConfig(max_new_tokens=32, stop_at_eos=False, sampling=sampling)
    result = decode_speculative(smol, NgramDrafter(), PROMPT, config)
    again = decode_speculative(smol, NgramDrafter(), PROMPT, config)
    assert result.tokens == again.tokens and len(result.tokens) == 32
    assert result.drafted > 0 and result.rollbacks > 0
    logits = teacher_forced(smol, PROMPT, result.tokens)
    nucleus = Sampler(sampling).probs(logits)
    chosen = nucleus[torch.arange(len(result.tokens)), torch.tensor(result.tokens)]
    assert bool((chosen > 0).all())


def test_lossless_stops_where_one_token_decoding_stops(smol: LayerEngine) -> None:
    # a repetitive prompt: accepted drafts run past the stop string
    prompt = "Repeat: the station, the station, the station, the station"
    config = DecodeConfig(max_new_tokens=40, stop_strings=("station",), stop_at_eos=False)
    result = decode_speculative(smol, NgramDrafter(max_tokens=7), prompt, config)
    assert result.tokens == decode_full(smol, prompt, config).tokens
    # the passes produced more tokens than were emitted: some were cut at the stop
    assert result.accepted + result.passes > len(result.tokens) - 1
    short = DecodeConfig(max_new_tokens=5, stop_at_eos=False)
    result = decode_speculative(smol, NgramDrafter(max_tokens=7), prompt, short)
    assert result.tokens == decode_full(smol, prompt, short).tokens and len(result.tokens) == 5
