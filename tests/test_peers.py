"""The llama.cpp peer: stopped and timed as our decoders are (a scripted stand-in for
llama.cpp, so CI needs no native build), a one-line error where it cannot run, and, where
llama-cpp-python is installed, the real thing on smollm2-135m's GGUF."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.decoding.shallow_deep import DecodeConfig
from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.generation import GenConfig, build_decoder
from earlyexit.runtime.peers import decode_llama_cpp

PROMPT = "The capital of France is"


class ScriptedLlama:
    """llama.cpp's `generate` interface, yielding a fixed continuation."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.resets, self.prompts = tokens, 0, []

    def reset(self) -> None:
        self.resets += 1

    def generate(self, prompt: list[int], **kwargs: object) -> Iterator[int]:
        assert kwargs["top_k"] == 1 and kwargs["temp"] == 0.0  # greedy
        self.prompts.append(prompt)
        yield from self.tokens


def test_llama_cpp_peer_stops_and_times_as_our_decoders(smol: LayerEngine) -> None:
    eos = smol.tokenizer.eos_token_id
    llm = ScriptedLlama([11, 12, 13, eos, 14, 15])
    seen: list[tuple[int, int]] = []
    config = DecodeConfig(max_new_tokens=10, on_token=lambda t, layer: seen.append((t, layer)))
    result = decode_llama_cpp(llm, smol, PROMPT, config)
    assert result.tokens == [11, 12, 13, eos]  # EOS kept, as ours keep it
    assert seen == [(t, 30) for t in result.tokens] and result.exit_layers == [30] * 4
    assert llm.prompts == [smol.encode([PROMPT])[0][0].tolist()] and llm.resets == 1
    assert 0 < result.prefill_seconds <= result.seconds and result.layer_tokens == 3 * 30

    capped = decode_llama_cpp(llm, smol, PROMPT, DecodeConfig(max_new_tokens=2))
    assert capped.tokens == [11, 12]
    ignore_eos = DecodeConfig(max_new_tokens=10, stop_at_eos=False)
    assert decode_llama_cpp(llm, smol, PROMPT, ignore_eos).tokens == [11, 12, 13, eos, 14, 15]
    with pytest.raises(EarlyExitError, match="greedy only"):
        decode_llama_cpp(llm, smol, PROMPT, DecodeConfig(sampling=SamplingConfig(0.7)))


def test_llama_cpp_method_without_llama_cpp_is_one_line(
    smol: LayerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as when not installed
    with pytest.raises(EarlyExitError, match="llama.cpp: not installed .*pip install") as err:
        build_decoder("llama.cpp", smol, None, GenConfig())  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_llama_cpp_on_the_same_gguf_continues_like_the_engine(smol: LayerEngine) -> None:
    """Its arithmetic differs (8-bit activations), so only the first, clear-cut tokens of
    a factual prompt are compared."""
    pytest.importorskip("llama_cpp", reason="optional extra `llamacpp` not installed")
    decode = build_decoder("llama.cpp", smol, None, GenConfig())  # type: ignore[arg-type]
    theirs = decode(PROMPT, DecodeConfig(max_new_tokens=8))
    ours = smol.greedy(smol.encode([PROMPT])[0], 8)[0].tolist()
    assert len(theirs.tokens) == 8 and theirs.tokens[:3] == ours[:3]
