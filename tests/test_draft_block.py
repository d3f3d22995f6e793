"""The trained draft block (readouts/draft_block.py) on real weights: its KV, kept as one more
layer of the request's cache, matches a run of the block over the final context (so absorb
and rollback line up with the model's layers), lossless drafting through it equals greedy
decoding, training lowers its KL, and a saved block loads back to the same outputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from earlyexit.decoding.drafters import CompositeDrafter, NgramDrafter, ShallowDrafter
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
from earlyexit.readouts.draft_block import (
    BlockConfig,
    DraftBlock,
    layer_states,
    load_block,
    save_block,
    train_block,
)
from earlyexit.readouts.readout import ExitReadout
from earlyexit.tasks.generation import render_prompt

PROMPT = (
    "Summarize this dialogue in one sentence.\n\nAnna: Tom, my train is late, I will be at "
    "the station at six, not at five.\nTom: OK Anna, I will wait for you at the station at "
    "six then.\nAnna: Thanks Tom!"
)


def _live_block(engine: LayerEngine, layer: int) -> DraftBlock:
    """An untrained block whose attention and MLP are live (the source layer's own output
    projections back), so its outputs depend on the whole context through its KV."""
    block = DraftBlock(engine, layer)
    source = engine.arch.layers[layer]
    with torch.no_grad():
        block.block.self_attn.o_proj.weight.copy_(source.self_attn.o_proj.weight)
        block.block.mlp.down_proj.weight.copy_(source.mlp.down_proj.weight)
    return block.requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["adapter", "composite", "free"])
def test_block_drafts_lossless_and_block_kv_equals_a_full_context_run(
    engine: LayerEngine, kind: str, teacher_forced: Callable
) -> None:
    # two layers from the top: the block (the next layer's weights) gives nearly the
    # final state, so drafts are often right and often wrong (both paths exercised)
    layer = engine.num_layers - 2
    block = _live_block(engine, layer)
    shallow = ShallowExit(ExitReadout(engine), layer, block=block)
    drafter = ShallowDrafter(shallow, threshold=0.0, max_tokens=4)
    config = DecodeConfig(max_new_tokens=40, stop_at_eos=False)
    prompt = render_prompt(engine.tokenizer, PROMPT)
    if kind == "free":  # lossy: the tokens emitted deep are the full model's after the prefix
        result = decode_shallow_deep(
            engine, shallow, prompt, config, Threshold(0.2), ngram=NgramDrafter()
        )
        assert 0 < result.shallow_fraction < 1 and result.accepted > 0
        full_argmax = teacher_forced(engine, prompt, result.tokens).argmax(-1).tolist()
        deep = [i for i, e in enumerate(result.exit_layers) if e == engine.num_layers]
        assert [result.tokens[i] for i in deep] == [full_argmax[i] for i in deep]
    else:
        if kind == "composite":
            drafter = CompositeDrafter(NgramDrafter(), drafter)
        result = decode_speculative(engine, drafter, prompt, config)
        assert result.tokens == decode_full(engine, prompt, config).tokens
        assert result.rollbacks > 0 and result.accepted > 0
    # the block's layer of the request cache holds one slot per input that stood (prompt +
    # emitted tokens but the last) as layer E does (FREE's deep layers may lag by its
    # stack), equal to a run of the block over their layer-E states
    cache = shallow._cache
    assert cache is not None
    slot = block.block.self_attn.layer_idx
    ids, _ = engine.encode([prompt])
    context = torch.cat([ids[0], torch.tensor(result.tokens[:-1])])[None]
    assert cache.lengths[slot] == cache.lengths[layer - 1] == context.shape[1]
    states, _ = layer_states(engine, context, [layer])
    fresh = engine.new_cache(1, capacity=context.shape[1])
    block.block.self_attn.layer_idx = fresh.add_layer()
    block(states[layer], fresh)
    for got, want in zip(cache.layer_kv(slot), fresh.layer_kv(slot), strict=True):
        # relative to the largest |K|, |V|: decoding ran the rows' layers [0, E) one or a
        # few at a time, the reference all at once, so layer-E states round differently
        # over E layers (measured up to 4.6e-5 on smollm2-135m, 1.0e-6 on gemma3-270m,
        # depending on the kernels chosen); a misaligned slot or position is off by ~1
        assert (got - want).abs().max().item() <= 5e-4 * want.abs().max().item()


@pytest.mark.slow
def test_training_lowers_kl_and_a_saved_block_loads_back(smol: LayerEngine, tmp_path) -> None:
    torch.manual_seed(0)
    text = smol.tokenizer(PROMPT * 3, return_tensors="pt").input_ids[:, :128]
    chunks = torch.cat([text[:, :64], text[:, 64:128]])
    states, final = layer_states(smol, chunks, [12])
    config = BlockConfig(steps=25, batch_rows=2, lr=1e-3, vocab_size=1024, vocab_random=256)
    result = train_block(smol, 12, states[12], final, (states[12][:1], final[:1]), config)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first  # distillation learns (measured: about a third)
    path = save_block(result, tmp_path / "block-12")
    loaded = load_block(smol, path)
    assert loaded.layer == 12 and torch.equal(loaded.vocabulary, result.block.vocabulary)
    with torch.no_grad():
        assert torch.equal(loaded(states[12][:1]), result.block(states[12][:1]))
    with pytest.raises(EarlyExitError, match="no draft block"):
        load_block(smol, tmp_path / "missing")
