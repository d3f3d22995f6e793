"""Faster fp32 linear layers for the few-row products of batch-1 decoding on CPU.

`F.linear` on one row goes to MKL's matrix-vector kernel, which on the 2-core machines we
measure on reads weights at about a third of the memory bandwidth that its matrix-matrix
kernel reaches, and 2-8 rows are slower still. Computing the same product as
`W @ x^T` with at least two columns takes the matrix-matrix path: full-depth decoding of
smollm2-135m gets 1.6-1.8x faster, and a FREE catch-up over a few stacked tokens costs
about what one token does (numbers in BENCHMARKS.md, `bench engine`). Results agree with
`F.linear` to float rounding, not bit for bit.

Written here because no library offers a per-shape dispatch for this; it swaps the class of
the model's own `nn.Linear` modules (weights untouched) and only changes how few-row fp32
CPU inputs are multiplied; everything else goes to `F.linear` as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional

MAX_ROWS = 8  # beyond this the matrix-matrix kernel is as good via F.linear
MIN_WEIGHT = 1 << 16  # smaller weights stay in cache: the extra copies would cost more


def _few_rows(x: torch.Tensor, weight: torch.Tensor) -> int:
    """How many rows x has if the skinny path applies to x @ weight^T, else 0."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or not x.numel():
        return 0
    if weight.numel() < MIN_WEIGHT:
        return 0
    rows = x.numel() // x.shape[-1]
    return rows if rows <= MAX_ROWS else 0


def skinny_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear`, through the matrix-matrix kernel when x has few fp32 CPU rows."""
    rows = _few_rows(x, weight)
    if not rows:
        return functional.linear(x, weight, bias)
    # x^T must be a transposed view of row-major rows: MKL takes its fast path only so
    flat = x.reshape(rows, x.shape[-1]).contiguous()
    if rows == 1:  # one column would go back to the matrix-vector kernel
        flat = torch.cat([flat, flat])
    out = torch.mm(weight, flat.T)[:, :rows].T.contiguous()
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], out.shape[-1])


class SkinnyLinear(nn.Linear):
    """`nn.Linear` whose few-row fp32 CPU products go through `skinny_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return skinny_linear(x, self.weight, self.bias)


def use_skinny_linear(model: nn.Module) -> int:
    """Make every plain `nn.Linear` of `model` a SkinnyLinear; returns how many changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
            changed += 1
    return changed


@contextmanager
def plain_linear(model: nn.Module) -> Iterator[None]:
    """Within the block, `model`'s SkinnyLinear modules are plain `nn.Linear` again (for
    side-by-side measurements and checks)."""
    swapped = [m for m in model.modules() if type(m) is SkinnyLinear]
    for module in swapped:
        module.__class__ = nn.Linear
    try:
        yield
    finally:
        for module in swapped:
            module.__class__ = SkinnyLinear
