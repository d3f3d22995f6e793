"""The engine's lean layer steps (engine/layer_step.py) compute exactly what the model's
own layers compute: hidden states and KV bit for bit, for prefill, one-token steps and
verify passes, with and without padding, on fp32 and int4 weights."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from earlyexit.engine import LayerEngine
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.layer_step import LlamaLayerStep, layer_steps

PROMPTS = ["Once upon a time, in a land far far away, there lived a young", "Water boils at"]


def _passes(engine: LayerEngine, ids: torch.Tensor, pad: torch.Tensor) -> list[torch.Tensor]:
    """Prefill, a one-token step and a 4-token verify pass; their outputs and every
    layer's KV afterwards."""
    total = engine.num_layers
    state = engine.prefill(ids, pad, capacity=ids.shape[1] + 8)
    one = engine.run_layers(engine.embed(ids[:, -1:]), state.cache, 0, total)
    four = engine.run_layers(engine.embed(ids[:, -4:]), state.cache, 0, total)
    kv = [torch.cat(state.cache.layer_kv(layer)) for layer in range(total)]
    return [state.hidden, one, four, *kv]


@pytest.mark.parametrize("weights", ["smol", "smol_int4"])
@pytest.mark.parametrize("batch", [1, 2])
def test_lean_steps_equal_the_models_own_layers_bit_for_bit(
    request: pytest.FixtureRequest, weights: str, batch: int
) -> None:
    engine: LayerEngine = request.getfixturevalue(weights)
    assert all(step is not None for step in engine.steps)  # every Llama layer has one
    ids, pad = engine.encode(PROMPTS[:batch])
    lean = _passes(engine, ids, pad)
    with engine.own_layers():
        assert all(step is None for step in engine.steps)
        own = _passes(engine, ids, pad)
    assert all(step is not None for step in engine.steps)  # restored
    for mine, theirs in zip(lean, own, strict=True):
        assert torch.equal(mine, theirs)


def test_other_families_run_their_own_layers(gemma: LayerEngine) -> None:
    assert gemma.steps == [None] * gemma.num_layers


def _tiny_llama(**overrides: object) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        **overrides,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_a_layer_with_biases_gets_no_lean_step() -> None:
    """The step mirrors bias-free projections only; a biased Llama runs its own layers."""
    assert all(LlamaLayerStep.supports(layer) for layer in _tiny_llama().model.layers)
    biased = _tiny_llama(attention_bias=True).model.layers
    assert layer_steps(biased) == [None, None]
    assert layer_steps(_tiny_llama(mlp_bias=True).model.layers) == [None, None]


@torch.inference_mode()
def test_a_step_writes_the_layers_own_cache_slot() -> None:
    """Called directly on a random Llama layer, the step returns the layer's output and
    writes keys/values into that layer's cache row, as the model's attention does."""
    model = _tiny_llama()
    layer = model.model.layers[1]
    hidden = torch.randn(1, 3, 64)
    position_ids = torch.arange(3)[None]
    rope = model.model.rotary_emb(hidden, position_ids)
    caches = [LayerKVCache(2, 1, 2, 16, torch.float32, capacity=8) for _ in range(2)]
    mine = LlamaLayerStep(layer)(hidden, None, rope, caches[0])
    theirs = layer(hidden, past_key_values=caches[1], use_cache=True, position_embeddings=rope)
    assert torch.equal(mine, theirs)
    assert caches[0].lengths == caches[1].lengths == [0, 3]
    assert torch.equal(torch.cat(caches[0].layer_kv(1)), torch.cat(caches[1].layer_kv(1)))
