"""The few-row matmul path agrees with F.linear, runs only inside the engine's scope and only
for the row counts chosen for it, and decoding with it matches plain layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from earlyexit.engine import LayerEngine, skinny
from earlyexit.engine.skinny import (
    MAX_ROWS,
    SkinnyLinear,
    engine_scope,
    skinny_linear,
    use_skinny_linear,
)


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 3, 64), (2, 4, 64), (MAX_ROWS + 1, 64), (5, 64)])
def test_skinny_linear_equals_f_linear(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    weight, bias = torch.randn(1100, 64, generator=g), torch.randn(1100, generator=g)
    want = nn.functional.linear(x, weight, bias)
    got = skinny_linear(x, weight, bias)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a non-contiguous input (a transposed view) gives the same product
    xt = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(skinny_linear(xt, weight), nn.functional.linear(x, weight))


def test_skinny_kernel_only_in_engine_scope_and_for_chosen_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 2, bias=False))
    # rows 2 only, for the first layer; the second gets none and stays plain nn.Linear
    assert (
        use_skinny_linear(model, lambda w: frozenset({2}) if w.shape[0] == 300 else frozenset())
        == 1
    )
    assert type(model[0]) is SkinnyLinear and type(model[2]) is nn.Linear
    calls: list[int] = []

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        calls.append(x.numel() // x.shape[-1])
        return nn.functional.linear(x, weight, bias)

    monkeypatch.setattr(skinny, "skinny_linear", counting)
    x = torch.randn(2, 256)
    want = nn.functional.linear(
        torch.relu(nn.functional.linear(x, *model[0].parameters())), model[2].weight
    )
    torch.testing.assert_close(model(x), want)
    assert calls == []  # outside the engine: the model multiplies as without earlyexit
    with engine_scope():
        model(x)
        model(x[:1])  # 1 row: not chosen
    assert calls == [2]
    assert use_skinny_linear(model, lambda w: frozenset()) == 0  # nothing chosen: all plain
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    bf16 = torch.randn(2, 300, dtype=torch.bfloat16)  # not fp32: plain F.linear
    assert skinny_linear(bf16, model[2].weight.bfloat16()).dtype == torch.bfloat16


def test_decoding_with_skinny_layers_matches_plain_layers(
    smol: LayerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, pad = smol.encode(["Write one sentence about the sea."])
    chosen = smol.kernels
    calls: list[int] = []
    real = skinny.skinny_linear

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
        calls.append(1)
        return real(x, weight, bias)

    with smol.kernels_as("skinny"):
        monkeypatch.setattr(skinny, "skinny_linear", counting)
        smol.run_layers(smol.embed(ids[:, :1]), smol.new_cache(1), 0, 1)
        monkeypatch.undo()
    assert calls  # inside the engine a forced choice is used
    assert smol.kernels is chosen  # and the engine's own choice is back afterwards
    with smol.kernels_as("skinny") as choice:
        assert choice.uses_skinny and type(smol.model.model.layers[0].mlp.up_proj) is SkinnyLinear
        skinny_ids = smol.greedy(ids, 24, pad)
        step = smol.prefill(ids, pad, capacity=ids.shape[1] + 4)
        logits = smol.logits(
            smol.run_layers(smol.embed(skinny_ids[:, :3]), step.cache, 0, smol.num_layers)
        )
    with smol.kernels_as("plain") as choice:
        assert not choice.uses_skinny and type(smol.model.model.layers[0].mlp.up_proj) is nn.Linear
        plain = smol.greedy(ids, 24, pad)
        again = smol.prefill(ids, pad, capacity=ids.shape[1] + 4)
        ref = smol.logits(
            smol.run_layers(smol.embed(skinny_ids[:, :3]), again.cache, 0, smol.num_layers)
        )
    assert skinny_ids.tolist() == plain.tolist()
    # measured 2e-5 over 30 layers (logits up to ~25); a wrong product is off by whole units
    assert (logits - ref).abs().max().item() <= 1e-3
