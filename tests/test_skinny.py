"""The few-row matmul path agrees with F.linear, and decoding with it matches plain layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from earlyexit.engine import LayerEngine
from earlyexit.engine.skinny import (
    MAX_ROWS,
    SkinnyLinear,
    plain_linear,
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


def test_swap_is_undone_in_a_block_and_skips_other_dtypes() -> None:
    model = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 2, bias=False))
    assert use_skinny_linear(model) == 2
    assert all(type(m) is SkinnyLinear for m in (model[0], model[2]))
    x = torch.randn(1, 256)
    hidden = torch.relu(nn.functional.linear(x, model[0].weight, model[0].bias))
    torch.testing.assert_close(model(x), nn.functional.linear(hidden, model[2].weight))
    bf16 = torch.randn(2, 300, dtype=torch.bfloat16)  # not fp32: plain F.linear
    assert skinny_linear(bf16, model[2].weight.bfloat16()).dtype == torch.bfloat16
    with plain_linear(model):
        assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    assert all(type(m) is SkinnyLinear for m in (model[0], model[2]))


def test_decoding_with_skinny_layers_matches_plain_layers(smol: LayerEngine) -> None:
    ids, pad = smol.encode(["Write one sentence about the sea."])
    with torch.inference_mode():
        skinny = smol.greedy(ids, 24, pad)
        step = smol.prefill(ids, pad, capacity=ids.shape[1] + 4)
        hidden = smol.run_layers(smol.embed(skinny[:, :3]), step.cache, 0, smol.num_layers)
        logits = smol.logits(hidden)
        with plain_linear(smol.model):
            plain = smol.greedy(ids, 24, pad)
            again = smol.prefill(ids, pad, capacity=ids.shape[1] + 4)
            ref = smol.logits(
                smol.run_layers(smol.embed(skinny[:, :3]), again.cache, 0, smol.num_layers)
            )
    assert skinny.tolist() == plain.tolist()
    assert (logits - ref).abs().max().item() <= 1e-3
