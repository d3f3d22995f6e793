"""Sampling: nucleus truncation, the speculative-sampling rule (its output follows the
target distribution), and lossless sampled decoding on real weights."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from earlyexit.decoding.drafters import ShallowDrafter
from earlyexit.decoding.sampling import Sampler, SamplingConfig
from earlyexit.decoding.shallow_deep import (
    DecodeConfig,
    Threshold,
    decode_full,
    decode_shallow_deep,
)
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.decoding.speculative import decode_speculative
from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.readout import ExitReadout

PROMPT = "Summarize: Anna wants to meet Tom at the station at five, but her train is late."


def test_top_p_keeps_the_smallest_nucleus() -> None:
    sampler = Sampler(SamplingConfig(temperature=1.0, top_p=0.7))
    probs = sampler.probs(torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1])))
    # 0.5 < 0.7, 0.5 + 0.25 >= 0.7: the first two ids, renormalised
    assert torch.allclose(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))
    greedy = Sampler().probs(torch.tensor([0.1, 3.0, 0.2]))
    assert greedy.tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(EarlyExitError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(EarlyExitError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def test_speculative_rule_samples_the_target_distribution() -> None:
    p = torch.tensor([0.05, 0.4, 0.3, 0.0, 0.25])  # target (deep)
    q = torch.tensor([0.3, 0.1, 0.3, 0.2, 0.1])  # draft (shallow), even mass where p has none
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=3))
    counts = torch.zeros(5)
    draws = 40_000
    for _ in range(draws):
        token = sampler.draw(q)
        if not sampler.accept(p, q, token):
            token = sampler.resample(p, q)
        counts[token] += 1
    assert torch.allclose(counts / draws, p, atol=0.01)
    assert counts[3] == 0  # a token the target cannot emit never gets through


@pytest.mark.slow
def test_sampled_decoding_is_seeded(smol: LayerEngine) -> None:
    shallow = ShallowExit(ExitReadout(smol), 20)
    config = DecodeConfig(
        max_new_tokens=12, stop_at_eos=False, sampling=SamplingConfig(1.0, 0.9, seed=1)
    )
    first = decode_shallow_deep(smol, shallow, PROMPT, config, Threshold(0.2))
    again = decode_shallow_deep(smol, shallow, PROMPT, config, Threshold(0.2))
    assert first.tokens == again.tokens
    assert decode_full(smol, PROMPT, config).tokens == decode_full(smol, PROMPT, config).tokens
    greedy = decode_full(smol, PROMPT, DecodeConfig(max_new_tokens=12, stop_at_eos=False))
    assert decode_full(smol, PROMPT, config).tokens != greedy.tokens


def test_lossless_sampling_emits_only_what_the_full_model_could(
    smol: LayerEngine, teacher_forced: Callable
) -> None:
    # with a tight nucleus the full model can emit only a few ids after each prefix; a
    # draft outside them has p = 0 and must be rejected, however confident the shallow exit
    top_p = 0.3
    sampling = SamplingConfig(temperature=1.0, top_p=top_p, seed=0)
    config = DecodeConfig(max_new_tokens=24, stop_at_eos=False, sampling=sampling)
    shallow = ShallowExit(ExitReadout(smol), 20)  # the plain lens: drafts badly
    drafter = ShallowDrafter(shallow, threshold=0.0, max_tokens=4)
    result = decode_speculative(smol, drafter, PROMPT, config)
    assert result.rollbacks > 0 and len(result.tokens) == 24
    logits = teacher_forced(smol, PROMPT, result.tokens)
    nucleus = Sampler(sampling).probs(logits)
    chosen = nucleus[torch.arange(len(result.tokens)), torch.tensor(result.tokens)]
    assert bool((chosen > 0).all())
