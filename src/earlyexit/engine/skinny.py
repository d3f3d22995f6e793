"""A second kernel for the few-row fp32 products of batch-1 decoding on CPU.

`F.linear` on one row goes to MKL's matrix-vector kernel. Computing the same product as
`W @ x^T` with at least two columns takes the matrix-matrix path instead. On an AMD EPYC
that read weights at about twice the bandwidth (full-depth decoding 1.6-1.8x faster); on an
Intel Xeon of the same machine kind it was 1.7x *slower*. So it is never used blindly:
engine/kernels.py times both kernels per weight shape and row count on the machine at
hand, and a module goes skinny only for the row counts where it won. Results agree with
`F.linear` to float rounding, not bit for bit.

Written here because no library offers a per-shape dispatch for this; it swaps the class of
the model's own `nn.Linear` modules (weights untouched), and the skinny kernel only runs
inside the engine's scope (`engine_scope`): the model's own `forward` / `generate`, called
outside the engine, multiply exactly as without earlyexit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn
from torch.nn import functional

MAX_ROWS = 8  # beyond this the matrix-matrix kernel is as good via F.linear
MIN_WEIGHT = 1 << 16  # smaller weights stay in cache: the extra copies would cost more

_IN_ENGINE: ContextVar[bool] = ContextVar("earlyexit_in_engine", default=False)


@contextmanager
def engine_scope() -> Iterator[None]:
    """Within the block, SkinnyLinear modules use the skinny kernel where it was chosen."""
    token = _IN_ENGINE.set(True)
    try:
        yield
    finally:
        _IN_ENGINE.reset(token)


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
    """`nn.Linear` whose products over `skinny_rows` rows go through `skinny_linear`
    inside the engine's scope; every other product is plain `F.linear`."""

    skinny_rows: frozenset[int] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _IN_ENGINE.get() and _few_rows(x, self.weight) in self.skinny_rows:
            return skinny_linear(x, self.weight, self.bias)
        return functional.linear(x, self.weight, self.bias)


def use_skinny_linear(
    model: nn.Module, rows_for: Callable[[torch.Tensor], frozenset[int]] | None = None
) -> int:
    """Make `model`'s linear modules SkinnyLinear where `rows_for(weight)` names row counts
    (default: every few-row count) and plain `nn.Linear` elsewhere; returns how many are
    skinny now."""
    changed = 0
    for module in model.modules():
        if type(module) not in (nn.Linear, SkinnyLinear):
            continue
        rows = rows_for(module.weight) if rows_for else frozenset(range(1, MAX_ROWS + 1))
        if rows:
            module.__class__ = SkinnyLinear
            module.skinny_rows = rows
            changed += 1
        else:
            module.__class__ = nn.Linear
    return changed
