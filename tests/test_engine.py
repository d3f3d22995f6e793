"""Exactness of the layer engine against the model's own forward and generate (real weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from earlyexit.engine import LayerEngine

pytestmark = pytest.mark.weights

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far far away, there lived a young",
]
TOL = 1e-4


def attention_mask_of(ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    return (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()


def model_logits(engine: LayerEngine, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(input_ids=ids, attention_mask=attention_mask_of(ids, pad)).logits


def test_prefill_logits_equal_model_forward(engine: LayerEngine) -> None:
    ids, pad = engine.encode(PROMPTS)
    assert int(pad.max()) > 0, "the batch must exercise left padding"
    expected = model_logits(engine, ids, pad)
    got = engine.logits(engine.prefill(ids, pad).hidden)
    for row in range(len(PROMPTS)):
        start = int(pad[row])
        assert (got[row, start:] - expected[row, start:]).abs().max().item() <= TOL


def reference_generate(
    engine: LayerEngine, ids: torch.Tensor, pad: torch.Tensor, n: int
) -> torch.Tensor:
    config = GenerationConfig(
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=engine.tokenizer.pad_token_id,
        eos_token_id=engine.tokenizer.eos_token_id,
    )
    out = engine.model.generate(
        input_ids=ids, attention_mask=attention_mask_of(ids, pad), generation_config=config
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch2-padded"])
def test_greedy_decoding_equals_generate(smol: LayerEngine, prompts: list[str]) -> None:
    ids, pad = smol.encode(prompts)
    expected = reference_generate(smol, ids, pad, 32)
    got = smol.greedy(ids, 32, pad)
    eos = smol.tokenizer.eos_token_id
    for row in range(len(prompts)):
        want = expected[row].tolist()
        # generate stops a row at EOS and pads after it; compare through the first EOS.
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got[row, :cut].tolist() == want[:cut]
        assert cut >= 8


def test_greedy_decoding_equals_generate_gemma(gemma: LayerEngine) -> None:
    ids, pad = gemma.encode(PROMPTS[1:])
    expected = reference_generate(gemma, ids, pad, 16)
    assert gemma.greedy(ids, 16, pad).tolist() == expected.tolist()


def test_exit_then_catch_up_in_one_pass_matches_full_depth(engine: LayerEngine) -> None:
    """Two tokens stop at layer k; the third token's pass fills their deep layers."""
    ids, pad = engine.encode(PROMPTS)
    k, total = engine.num_layers // 3, engine.num_layers
    new_tokens = engine.tokenizer([" and then the"], add_special_tokens=False, return_tensors="pt")
    steps = new_tokens["input_ids"][0, :3].repeat(len(PROMPTS), 1)

    reference = engine.prefill(ids, pad)
    for step in range(3):
        ref_hidden = engine.run_layers(
            engine.embed(steps[:, step : step + 1]), reference.cache, 0, total
        )

    early = engine.prefill(ids, pad)
    stacked = []
    for step in range(2):  # exit at layer k: only layers 0..k-1 see these tokens
        stacked.append(
            engine.run_layers(engine.embed(steps[:, step : step + 1]), early.cache, 0, k)
        )
    assert early.cache.lengths[k - 1] == early.cache.lengths[k] + 2
    with pytest.raises(ValueError, match="different numbers of tokens"):
        engine.run_layers(stacked[0], early.cache, k - 1, total)
    last = engine.run_layers(engine.embed(steps[:, 2:3]), early.cache, 0, k)
    deep = engine.run_layers(torch.cat(stacked + [last], dim=1), early.cache, k, total)

    assert early.cache.lengths == reference.cache.lengths
    for layer in range(total):
        ref_k, ref_v = reference.cache.layer_kv(layer)
        got_k, got_v = early.cache.layer_kv(layer)
        for row in range(len(PROMPTS)):
            start = int(pad[row])
            assert (ref_k[row, :, start:] - got_k[row, :, start:]).abs().max().item() <= TOL
            assert (ref_v[row, :, start:] - got_v[row, :, start:]).abs().max().item() <= TOL
    diff = (engine.logits(deep[:, -1:]) - engine.logits(ref_hidden)).abs().max().item()
    assert diff <= TOL


@pytest.mark.slow
def test_sliding_window_layers_past_the_window(gemma: LayerEngine) -> None:
    """Gemma3 mixes sliding-window and global layers; check a prompt longer than the window."""
    window = gemma.arch.sliding_window
    assert window is not None and "sliding_attention" in gemma.arch.layer_types
    text = " ".join(f"item {i} is {i * 7 % 13}." for i in range(200))
    ids = gemma.tokenizer(text, return_tensors="pt")["input_ids"][:, : window + 40]
    assert ids.shape[1] > window
    pad = torch.zeros(1, dtype=torch.long)
    # Prefill the first part, then feed the rest in chunks: every chunk straddles the window.
    head = window - 8
    expected = model_logits(gemma, ids, pad)
    state = gemma.prefill(ids[:, :head], pad)
    # the prefill is the model's own forward over the same rows (measured: bit for bit)
    prefix = gemma.logits(state.hidden)
    assert (prefix - model_logits(gemma, ids[:, :head], pad)).abs().max().item() <= TOL
    outputs = [state.hidden]
    for start in range(head, ids.shape[1], 16):
        chunk = ids[:, start : start + 16]
        outputs.append(gemma.run_layers(gemma.embed(chunk), state.cache, 0, gemma.num_layers))
    got = gemma.logits(torch.cat(outputs, dim=1))
    # Against one forward over all rows the error is relative: the model's own forward over
    # 504 rows differs from its forward over 552 by 1.5e-5 of the position's largest |logit|
    # (3.8e-4 at logits up to 30; products over other row counts round differently).
    # Ignoring the window is off by 0.13 of it.
    error = (got - expected).abs().amax(-1) / expected.abs().amax(-1)
    assert error.max().item() <= 1e-4


def test_candidate_readout_equals_full_readout_columns(smol: LayerEngine) -> None:
    ids, pad = smol.encode(PROMPTS[:1])
    hidden = smol.prefill(ids, pad, upto=10).hidden[:, -1:]
    candidates = torch.tensor([5, 100, 4000, 49151])
    full = smol.logits(hidden)
    assert torch.allclose(smol.logits(hidden, candidates), full[..., candidates], atol=1e-5)
    # the head rows are cached per id tensor: other ids, then the first ones again
    wide = torch.arange(0, 49152, 7)  # large enough for the skinny path
    for ids_now in (wide, candidates, wide):
        assert torch.allclose(smol.logits(hidden, ids_now), full[..., ids_now], atol=1e-4)


def test_dropping_rows_keeps_the_rest_decoding_exactly(smol: LayerEngine) -> None:
    """A finished/exited row leaves the batch; the others continue as if decoded alone."""
    ids, pad = smol.encode(PROMPTS)
    state = smol.prefill(ids, pad)
    next_ids = smol.logits(state.hidden[:, -1:]).argmax(-1)
    state.cache.select_rows(torch.tensor([1]))
    out = [next_ids[1:]]
    for _ in range(7):
        hidden = smol.run_layers(smol.embed(out[-1]), state.cache, 0, smol.num_layers)
        out.append(smol.logits(hidden).argmax(-1))
    alone_ids, alone_pad = smol.encode(PROMPTS[1:])
    assert torch.cat(out, dim=1).tolist() == smol.greedy(alone_ids, 8, alone_pad).tolist()
