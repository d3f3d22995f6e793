"""Attention masks for tokens appended to a layer that may hold a different number of slots."""

from __future__ import annotations

import torch


def attention_mask(
    start: int,
    num_new: int,
    pad: torch.Tensor,
    has_padding: bool,
    window: int | None,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean mask [batch, 1, num_new, start + num_new] for queries in slots start..start+n-1.

    Key slot j is visible to query slot i when pad[b] <= j <= i and, for a sliding-window
    layer, i - j < window. Returns None where the model's attention (SDPA) gets it right
    without a mask: one query that sees every slot, or a causal square block.
    """
    total = start + num_new
    window_hit = window is not None and total > window
    if not has_padding and not window_hit and (num_new == 1 or start == 0):
        return None
    q = torch.arange(start, total, device=device).view(1, 1, num_new, 1)
    k = torch.arange(total, device=device).view(1, 1, 1, total)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    if has_padding:
        allowed = allowed & (k >= pad.view(-1, 1, 1, 1))
        # A padding query would see nothing; let it see itself so softmax stays finite.
        allowed = allowed | (k == q)
    return allowed
