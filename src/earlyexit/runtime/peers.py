"""The peers a user would try first, timed like our decoders: transformers' own `generate`
(greedy) and its prompt lookup (`prompt_lookup_num_tokens`), and llama.cpp on the model's
GGUF (optional extra `llamacpp`), batch 1.

The transformers peers run the model's own forward, outside the engine's scope, so they
multiply exactly as they would without earlyexit loaded. Their first token's time comes
from a streamer (called with the prompt, then with each new token), so their decode-phase
rate is measured as ours.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from earlyexit.decoding.shallow_deep import DecodeConfig, DecodeResult, Stopping, prompt_ids
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError


class _FirstTokenClock(BaseStreamer):
    """Notes when `generate` hands over its first new token, and passes each new token on
    to `on_token` (streaming) as `generate` produces it."""

    def __init__(self, on_token: Callable[[int, int], None] | None, layers: int) -> None:
        self.calls = 0
        self.first_token_at: float | None = None
        self.on_token, self.layers = on_token, layers

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 1:  # the first call carries the prompt
            return
        if self.calls == 2:
            self.first_token_at = time.perf_counter()
        if self.on_token is not None:
            for token in value.reshape(-1).tolist():
                self.on_token(int(token), self.layers)

    def end(self) -> None:
        pass


def decode_hf(
    engine: LayerEngine,
    prompt: str | torch.Tensor,
    config: DecodeConfig,
    prompt_lookup: int | None = None,
) -> DecodeResult:
    """`model.generate`, greedy; with `prompt_lookup`, transformers' prompt-lookup decoding."""
    if not config.sampling.greedy:
        raise EarlyExitError("the hf peers are measured greedy only; drop --temperature")
    ids = prompt_ids(engine, prompt)
    tok = engine.tokenizer
    generation = GenerationConfig(
        max_new_tokens=config.max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id if config.stop_at_eos else None,
        prompt_lookup_num_tokens=prompt_lookup,
    )
    clock = _FirstTokenClock(config.on_token, engine.num_layers)
    began = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            generation_config=generation,
            streamer=clock,
        )
    seconds = time.perf_counter() - began
    tokens = out[0, ids.shape[1] :].tolist()
    total = engine.num_layers
    first = clock.first_token_at if clock.first_token_at is not None else began + seconds
    return DecodeResult(
        tokens,
        [total] * len(tokens),
        seconds,
        total * max(0, len(tokens) - 1),
        num_layers=total,
        prefill_seconds=first - began,
    )


def llama_cpp_peer(
    engine: LayerEngine,
) -> Callable[[str | torch.Tensor, DecodeConfig], DecodeResult]:
    """A decoder running llama.cpp, greedy, on the GGUF the engine's model was made from
    (loaded once, with torch's thread count); a one-line error when it cannot run."""
    from earlyexit.bench.llamacpp import model_gguf, open_llama

    loaded = engine.loaded
    model = loaded.name if model_gguf(loaded.name) is not None else loaded.source
    llm = open_llama(model, torch.get_num_threads())
    return lambda prompt, config: decode_llama_cpp(llm, engine, prompt, config)


def decode_llama_cpp(
    llm: object, engine: LayerEngine, prompt: str | torch.Tensor, config: DecodeConfig
) -> DecodeResult:
    """llama.cpp's greedy continuation of the engine's prompt ids, stopped as ours are (EOS
    kept, max_new_tokens, stop strings), the first token timed as ours."""
    from earlyexit.bench.llamacpp import greedy_tokens

    if not config.sampling.greedy:
        raise EarlyExitError("llama.cpp is measured greedy only; drop --temperature")
    ids = prompt_ids(engine, prompt)[0].tolist()
    total = engine.num_layers
    stopping = Stopping(engine, config)
    result = DecodeResult([], [], 0.0, 0, num_layers=total, listener=config.on_token)
    began = time.perf_counter()
    for token in greedy_tokens(llm, ids):
        if not result.tokens:
            result.prefill_seconds = time.perf_counter() - began
        result.push(token, total)
        if stopping.done(result.tokens):
            break
    result.seconds = time.perf_counter() - began
    result.layer_tokens = total * max(0, len(result.tokens) - 1)
    return result
