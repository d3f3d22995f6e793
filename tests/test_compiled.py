"""Compiled decode steps (engine/compiled.py) against the eager engine on int4 smollm2.

The compiled graphs fuse the norms, rotary embedding and residuals, and attend over the
cache's whole capacity under a mask, so they round differently from the eager steps; the
int4 products' bf16 inputs amplify that. Measured on the Xeon over 23 teacher-forced steps
of these two prompts: at most 0.56 max abs logit difference (logits span about +-38;
`python scripts/experiments/compiled_vs_eager.py bound`) and the same greedy tokens. A mask
off by one (the token not attending to itself) gave 12.9 on the first prompt in a one-off
trial; test_quant.py bounds the eager int4 engine against the fp32 model at 1.5.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError

PROMPTS = ["The capital of France is", "Once upon a time, in a land far far away, there lived a"]
BOUND = 1.5  # logits; see the module docstring


@pytest.fixture
def compiled(smol_int4: LayerEngine) -> Iterator[LayerEngine]:
    smol_int4.set_compiled(True)
    try:
        yield smol_int4
    finally:
        smol_int4.set_compiled(False)


def _step_logits(
    engine: LayerEngine, ids: torch.Tensor, tokens: torch.Tensor, split: int | None = None
) -> torch.Tensor:
    """Logits of one-token steps teacher-forced along `tokens`, through layers [0, split)
    and [split, L) as two calls when `split` is given."""
    layers = engine.num_layers
    spans = [(0, layers)] if split is None else [(0, split), (split, layers)]
    out = []
    with torch.inference_mode():
        state = engine.prefill(ids, capacity=ids.shape[1] + tokens.shape[1])
        for token in tokens[0, :-1]:
            hidden = engine.embed(token.view(1, 1))
            for start, end in spans:
                hidden = engine.run_layers(hidden, state.cache, start, end)
            out.append(engine.logits(hidden))
    return torch.cat(out, dim=1)


@pytest.mark.weights
def test_compiled_steps_match_the_eager_engine(
    smol_int4: LayerEngine, compiled: LayerEngine
) -> None:
    """Whole-depth steps and a shallow-exit split into (0, 20) and (20, 30), as the early-exit
    decoders call them: within the bound of the eager int4 engine, same greedy tokens."""
    for text in PROMPTS:
        ids = smol_int4.tokenizer(text, return_tensors="pt")["input_ids"]
        compiled.set_compiled(False)
        eager_tokens = smol_int4.greedy(ids, 24)
        eager = _step_logits(smol_int4, ids, eager_tokens)
        compiled.set_compiled(True)
        assert torch.equal(compiled.greedy(ids, 24), eager_tokens), text
        whole = _step_logits(compiled, ids, eager_tokens)
        split = _step_logits(compiled, ids, eager_tokens, split=20)
        for logits in (whole, split):
            error = (logits - eager).abs().max()
            assert 0 < error < BOUND, (text, float(error))  # compiled ran, and rounds apart
    assert set(compiled.compiled._spans) == {(0, 30), (0, 20), (20, 30)}


@pytest.mark.weights
def test_verify_passes_equal_one_token_steps(compiled: LayerEngine) -> None:
    """A compiled pass over 4 new tokens (a verify pass) gives each token exactly what four
    compiled one-token steps give it, hidden states and KV, from the same graph; so
    draft-and-verify stays exactly the compiled model's greedy output."""
    from earlyexit.api import EarlyExit
    from earlyexit.tasks.generation import get_generation_task

    ids = compiled.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    tokens = compiled.greedy(ids, 4)
    with torch.inference_mode():
        steps = compiled.prefill(ids)
        one = [
            compiled.run_layers(compiled.embed(t.view(1, 1)), steps.cache, 0, 30) for t in tokens[0]
        ]
        verify = compiled.prefill(ids)
        four = compiled.run_layers(compiled.embed(tokens), verify.cache, 0, 30)
    assert torch.equal(torch.cat(one, dim=1), four)
    assert torch.equal(steps.cache.layer_kv(29)[1], verify.cache.layer_kv(29)[1])
    assert len(compiled.compiled._spans) >= 1  # the compiled path served both
    ee = EarlyExit.from_engine(compiled)
    prompt = get_generation_task("samsum").items(1)[0].instruction
    full = ee.generate(prompt, method="full", max_new_tokens=48)
    out = ee.generate(prompt, method="lossless", max_new_tokens=48)
    assert out.tokens == full.tokens and out.report.draft_accepted > 0


@pytest.mark.weights
def test_prefill_and_padded_batches_run_the_eager_engine(
    smol_int4: LayerEngine, compiled: LayerEngine
) -> None:
    """Prefill (short prompts included) and padded batches are not compiled: with compiled
    steps on they are bit-identical to the eager engine's."""
    ids, pad = smol_int4.encode(["Water boils at", "The capital of France is a city that"])
    results = {}
    for enabled in (False, True):
        compiled.set_compiled(enabled)
        with torch.inference_mode():
            short = compiled.prefill(ids[:1, -3:]).hidden  # 3 tokens
            prefill = compiled.prefill(ids[1:]).hidden
            batch = compiled.greedy(ids, 4, pad)
        results[enabled] = (short, prefill, batch)
    for eager, with_compiled in zip(results[False], results[True], strict=True):
        assert torch.equal(eager, with_compiled)


@pytest.mark.weights
def test_layers_of_unequal_capacity_run_eagerly(compiled: LayerEngine) -> None:
    """Layers first written late (e.g. below an exit during prefill, caught up later) can
    hold smaller buffers than layers that grew by doubling: a span over both runs eagerly."""
    ids = compiled.tokenizer("Water boils at", return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.inference_mode():
        state = compiled.prefill(ids, capacity=n + 1)
        cache = state.cache
        step = compiled.embed(ids[:, -1:])
        compiled.run_layers(step, cache, 0, 30)  # every layer full: n + 1 slots
        compiled.run_layers(step, cache, 0, 20)  # layers 0..19 double to 2n + 2
        compiled.run_layers(step, cache, 20, 30)  # 20..29 grow to 2n + 2 as well
        cache.keys[29] = cache.keys[29][:, :, : n + 2].clone()  # as if first written late
        cache.values[29] = cache.values[29][:, :, : n + 2].clone()
        assert compiled.compiled.run(step, cache, 0, 30) is None
        assert compiled.run_layers(step, cache, 0, 30).shape == step.shape  # eager instead
        assert cache.lengths == [n + 3] * 30


@pytest.mark.weights
def test_engines_without_int4_llama_layers_refuse_compiled_steps(
    smol: LayerEngine, gemma: LayerEngine
) -> None:
    """fp32 products are not stacked (no lean int4 step to compile) and gemma3 has no lean
    step: a one-line error naming the fix, and the engine stays eager."""
    for engine in (smol, gemma):
        with pytest.raises(EarlyExitError, match=r"smollm2-135m with --dtype int4\), not"):
            engine.set_compiled(True)
        assert engine.compiled is None


@pytest.mark.weights
def test_serve_compiled_compiles_full_depth_before_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve --compiled` loads the model with compiled steps and compiles the full-depth
    span before it listens, so the first request does not wait for it."""
    from typer.testing import CliRunner

    import earlyexit.server
    from earlyexit.cli import app

    served = []
    monkeypatch.setattr(earlyexit.server, "serve", lambda ee, *args, **kwargs: served.append(ee))
    result = CliRunner().invoke(app, ["serve", "--dtype", "int4", "--compiled"])
    assert result.exit_code == 0, result.output
    (ee,) = served
    assert ee.engine.compiled is not None and (0, 30) in ee.engine.compiled._spans
    refused = CliRunner().invoke(app, ["serve", "--dtype", "float32", "--compiled"])
    assert refused.exit_code == 2 and "smollm2-135m with --dtype int4" in refused.output
