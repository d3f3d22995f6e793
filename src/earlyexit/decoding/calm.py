"""CALM-style decoding (Schuster et al., 2022): per-token exit on confidence, with the
skipped layers' keys/values filled by copying the exit state (batch 1;
greedy or sampled).

The baseline FREE improves on: a token that exits at layer k is emitted at once and never
revisited; later tokens attend, in layers k..L, to keys/values computed from its layer-k
state instead of its true deeper states (`LayerEngine.copy_state_kv`). Cheap, but an
approximation that compounds; FREE's catch-up computes those states exactly instead.
"""

from __future__ import annotations

import torch

from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult, Threshold, begin
from earlyexit.decoding.shallow_exit import ShallowExit, next_input
from earlyexit.engine.engine import LayerEngine


@torch.inference_mode()
def decode_calm(
    engine: LayerEngine,
    shallow: ShallowExit,
    prompt: str | torch.Tensor,
    config: DecodeConfig,
    threshold: Threshold,
) -> DecodeResult:
    run = begin(engine, prompt, config, reader=shallow)
    cache, sampler, result = run.cache, run.sampler, run.result
    k, total = shallow.layer, engine.num_layers
    while not run.stopping.done(result.tokens):
        hidden = engine.run_layers(next_input(engine, result.tokens[-1]), cache, 0, k)
        guess = shallow.guess(shallow.read(hidden, cache), sampler)
        if guess.confidence >= threshold.value:
            engine.copy_state_kv(hidden, cache, k, total)
            result.layer_tokens += k
            result.push(guess.token, k)
            continue
        hidden = engine.run_layers(hidden, cache, k, total)
        result.layer_tokens += total
        result.push(sampler.pick(engine.logits(hidden[:, -1])), total)
    return run.finish()
