"""Shallow-deep decoding on real weights: lossless shallow drafts give exactly greedy
decoding, FREE's catch-up passes leave the deep layers as a full-depth run would, the
Beta-mixture threshold separates agreeing from disagreeing confidences."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from earlyexit.decoding.drafters import NgramDrafter, ShallowDrafter
from earlyexit.decoding.shallow_deep import (
    DecodeConfig,
    Threshold,
    decode_full,
    decode_shallow_deep,
    decode_static,
)
from earlyexit.decoding.shallow_exit import ShallowExit
from earlyexit.decoding.speculative import decode_speculative
from earlyexit.decoding.threshold import (
    BetaMixtureThreshold,
    OfficialFreeThreshold,
    mixture_threshold,
)
from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.readout import ExitReadout

PROMPT = "Summarize: Anna wants to meet Tom at the station at five, but her train is late."


def _shallow(engine: LayerEngine) -> ShallowExit:
    # the plain logit lens two thirds of the way up: often wrong, which is what these
    # tests want (many rollbacks and disagreements)
    return ShallowExit(ExitReadout(engine), (2 * engine.num_layers) // 3)


def test_lossless_shallow_drafts_equal_greedy(engine: LayerEngine) -> None:
    config = DecodeConfig(max_new_tokens=24, stop_at_eos=False)
    reference = decode_full(engine, PROMPT, config)
    ids, _ = engine.encode([PROMPT])
    assert reference.tokens == engine.greedy(ids, 24)[0].tolist()
    # always drafting 4 (stopping at the token limit) and drafting while confident
    eager = ShallowDrafter(_shallow(engine), threshold=0.0, max_tokens=4)
    result = decode_speculative(engine, eager, PROMPT, config)
    assert result.tokens == reference.tokens
    assert result.rollbacks > 0 and result.accepted > 0  # the lens drafts badly, not always
    careful = ShallowDrafter(_shallow(engine), threshold=0.3, max_tokens=16)
    result = decode_speculative(engine, careful, PROMPT, config)
    assert result.tokens == reference.tokens and result.passes > 0


def test_free_catch_up_fills_deep_layers_exactly(
    smol: LayerEngine, teacher_forced: Callable
) -> None:
    config = DecodeConfig(max_new_tokens=24, stop_at_eos=False)
    shallow = _shallow(smol)
    result = decode_shallow_deep(smol, shallow, PROMPT, config, Threshold(0.2))
    assert 0 < result.shallow_fraction < 1
    # every token emitted deep must be what the full model predicts after the emitted
    # prefix: wrong deep KV for the stacked tokens would change those predictions
    logits = teacher_forced(smol, PROMPT, result.tokens)
    full_argmax = logits.argmax(-1).tolist()
    deep = [i for i, layer in enumerate(result.exit_layers) if layer == smol.num_layers]
    assert len(deep) >= 3
    assert [result.tokens[i] for i in deep] == [full_argmax[i] for i in deep]
    assert len(result.pairs) >= result.catchups - 1


COPYING = (
    "Summarize this dialogue in one sentence.\n\nAnna: Tom, my train is late, I will be at "
    "the station at six, not at five.\nTom: OK Anna, I will wait for you at the station at "
    "six then.\nAnna: Thanks Tom!"
)


def test_free_with_ngram_drafts_never_exiting_equals_greedy(engine: LayerEngine) -> None:
    """A threshold no confidence reaches: every token comes from an n-gram verify pass or
    a catch-up, so the output is the full model's and the verify passes' KV is exact."""
    config = DecodeConfig(max_new_tokens=40, stop_at_eos=False)
    reference = decode_full(engine, COPYING, config)
    result = decode_shallow_deep(
        engine, _shallow(engine), COPYING, config, Threshold(2.0), ngram=NgramDrafter()
    )
    assert result.tokens == reference.tokens and result.shallow_fraction == 0
    assert result.accepted > 0 and result.drafted > result.accepted  # kept and rejected


def test_free_with_ngram_drafts_catches_up_the_stack_exactly(
    smol: LayerEngine, teacher_forced: Callable
) -> None:
    config = DecodeConfig(max_new_tokens=40, stop_at_eos=False)
    result = decode_shallow_deep(
        smol, _shallow(smol), COPYING, config, Threshold(0.2), ngram=NgramDrafter()
    )
    assert 0 < result.shallow_fraction < 1 and result.accepted > 0
    # tokens emitted deep (verified drafts, catch-ups) are the full model's prediction after
    # the emitted prefix, shallow tokens included: stacked tokens got their exact deep KV
    logits = teacher_forced(smol, COPYING, result.tokens)
    full_argmax = logits.argmax(-1).tolist()
    deep = [i for i, layer in enumerate(result.exit_layers) if layer == smol.num_layers]
    assert len(deep) >= 10
    assert [result.tokens[i] for i in deep] == [full_argmax[i] for i in deep]


def test_static_reads_out_at_k(smol: LayerEngine) -> None:
    shallow = _shallow(smol)
    config = DecodeConfig(max_new_tokens=6, stop_at_eos=False)
    result = decode_static(smol, shallow, PROMPT, config)
    assert result.exit_layers == [shallow.layer] * 6 and result.shallow_fraction == 1.0
    ids, _ = smol.encode([PROMPT])
    state = smol.prefill(ids, upto=shallow.layer)
    assert result.tokens[0] == int(
        shallow.readout.logits(state.hidden[:, -1], shallow.layer).argmax()
    )
    with pytest.raises(EarlyExitError, match="shallow exit layer"):
        ShallowExit(ExitReadout(smol), smol.num_layers)


def test_stop_strings_and_max_tokens(smol: LayerEngine) -> None:
    config = DecodeConfig(max_new_tokens=40, stop_strings=("station",), stop_at_eos=False)
    result = decode_full(smol, "Repeat: the station, the station, the station", config)
    assert "station" in smol.tokenizer.decode(result.tokens) and len(result.tokens) < 40


def test_beta_mixture_threshold_separates_groups() -> None:
    rng = np.random.default_rng(0)
    agree_conf = rng.beta(8, 2, 300)  # agreeing tokens: confident
    disagree_conf = rng.beta(2, 6, 100)
    conf = np.concatenate([agree_conf, disagree_conf])
    agreed = np.concatenate([np.ones(300, bool), np.zeros(100, bool)])
    loose = mixture_threshold(conf, agreed, target=0.8, fallback=0.5)
    strict = mixture_threshold(conf, agreed, target=0.99, fallback=0.5)
    assert 0.2 < loose < strict < 1.0
    # above the threshold the empirical agreement is at least the target (roughly)
    assert agreed[conf >= strict].mean() >= 0.97
    assert mixture_threshold(conf[:5], agreed[:5], 0.9, fallback=0.42) == 0.42
    online = BetaMixtureThreshold(target=0.9, initial=0.5, refit_every=50)
    online.observe(list(zip(conf.tolist(), agreed.tolist(), strict=True)))
    assert online.value == mixture_threshold(conf, agreed, 0.9, 0.5)
    # never 0 or 1: all-agreeing-at-any-confidence or never-agreeing streams stay in bounds
    eager = BetaMixtureThreshold(target=0.5, initial=0.0, refit_every=1)
    assert eager.value == 0.05
    eager.observe([(c, c > 0.02) for c in np.linspace(0.0, 1.0, 50).tolist()])
    assert 0.05 <= eager.value < 0.2
    stuck = BetaMixtureThreshold(target=0.999, initial=0.9, refit_every=1)
    stuck.observe([(c, i % 2 == 0) for i, c in enumerate(np.linspace(0, 1, 50).tolist())])
    assert stuck.value == 0.95


def test_official_free_threshold_settings() -> None:
    """The paper code's settings: no refit inside a sequence, a refit at each sequence's
    start from all pairs so far, values on the 10-point grid over [0.3, 0.9] (equal
    weights: a rare disagreement counts as much as a common agreement), frozen after
    max_refits sequences."""
    rng = np.random.default_rng(0)
    pairs = [(c, True) for c in rng.beta(8, 2, 300)] + [(c, False) for c in rng.beta(2, 6, 30)]
    official = OfficialFreeThreshold(initial=0.9, max_refits=2)
    official.observe(pairs)
    assert official.value == 0.9  # observed, not yet refit
    official.begin_sequence()
    grid = np.linspace(0.3, 0.9, 10)
    assert official.value in grid and official.value < 0.9 and official.refits == 1
    # by hand: the first grid point from the top where the agree-likelihood ratio clears 0.4
    from scipy.stats import beta

    from earlyexit.decoding.threshold import beta_moments

    conf = np.clip(np.array([c for c, _ in pairs]), 1e-4, 1 - 1e-4)
    good = beta.pdf(grid, *beta_moments(conf[:300]))
    bad = beta.pdf(grid, *beta_moments(conf[300:]))
    assert official.value == grid[10 - int((good / (good + bad) > 0.4).sum())]
    # equal weights: ours, which weighs agreement by its 91% share, goes lower at zeta 0.4
    assert mixture_threshold(conf, np.arange(330) < 300, 0.4, 0.5) <= official.value
    official.begin_sequence()
    frozen = official.value
    official.observe([(c, False) for c in np.linspace(0.5, 1.0, 500).tolist()])
    official.begin_sequence()  # a third sequence: frozen after two refits
    assert official.value == frozen and official.refits == 2


def test_copy_state_kv_equals_the_layers_own_keys_values(engine: LayerEngine) -> None:
    # K/V copied from a state must be what the layer itself computes from that state
    ids, pad = engine.encode([PROMPT])
    layer = engine.num_layers // 2
    ran = engine.prefill(ids, pad, upto=layer)
    copied = engine.prefill(ids, pad, upto=layer)
    engine.run_layers(ran.hidden, ran.cache, layer, layer + 1)
    engine.copy_state_kv(copied.hidden, copied.cache, layer, layer + 1)
    for a, b in zip(ran.cache.layer_kv(layer), copied.cache.layer_kv(layer), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_calm_copies_states_and_differs_from_exact_catch_up(smol: LayerEngine) -> None:
    from earlyexit.decoding.calm import decode_calm

    config = DecodeConfig(max_new_tokens=16, stop_at_eos=False)
    shallow = _shallow(smol)
    never = decode_calm(smol, shallow, PROMPT, config, Threshold(2.0))
    assert never.tokens == decode_full(smol, PROMPT, config).tokens
    some = decode_calm(smol, shallow, PROMPT, config, Threshold(0.2))
    assert 0 < some.shallow_fraction < 1
    assert some.layer_tokens < never.layer_tokens


def test_calibrated_threshold_meets_tolerance(smol: LayerEngine) -> None:
    from earlyexit.decoding.calibrate import calibrated_threshold, confidence_pairs

    config = DecodeConfig(max_new_tokens=12, stop_at_eos=False)
    confs, agreed, sequence = confidence_pairs(smol, _shallow(smol), [PROMPT], config)
    assert len(confs) == 11 and confs.min() >= 0 and confs.max() <= 1
    assert sequence.tolist() == [0] * 11  # one prompt
    for tolerance in (0.0, 0.2, 0.5):
        level = calibrated_threshold(confs, agreed, tolerance)
        exits = confs >= level
        if exits.any():
            assert (~agreed[exits]).mean() <= tolerance
    # by hand: sorted confidences 0.9 (ok), 0.8 (wrong), 0.7 (ok), 0.6 (ok)
    confs = np.array([0.7, 0.9, 0.6, 0.8])
    agreed = np.array([True, True, True, False])
    assert calibrated_threshold(confs, agreed, 0.0) == 0.9
    assert calibrated_threshold(confs, agreed, 0.25) == 0.6


def test_on_token_streams_exactly_the_emitted_tokens(smol: LayerEngine) -> None:
    """Every loop emits through `DecodeResult.push`: a listener sees each token once, in
    order, with its exit layer, including tokens of verified drafts and stacked exits."""
    seen: list[tuple[int, int]] = []
    config = DecodeConfig(
        max_new_tokens=30,
        stop_at_eos=False,
        on_token=lambda token, layer: seen.append((token, layer)),
    )
    runs = {
        "full": lambda: decode_full(smol, COPYING, config),
        "free": lambda: decode_shallow_deep(
            smol, _shallow(smol), COPYING, config, Threshold(0.2), ngram=NgramDrafter()
        ),
        "lossless": lambda: decode_speculative(smol, NgramDrafter(), COPYING, config),
    }
    for name, run in runs.items():
        seen.clear()
        result = run()
        assert seen == list(zip(result.tokens, result.exit_layers, strict=True)), name
        assert len(seen) == 30, name
    assert result.accepted > 0  # the lossless run emitted verified drafts
