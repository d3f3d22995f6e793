"""Attention whose result for a query does not depend on how many queries share the call.

Draft-and-verify decoding (`lossless`) is only exact if a verify pass over n tokens gives
each token the logits a one-token step would. SDPA does not: its CPU kernel blocks the
work by query count, so a row of a 4-query call differs from the same query alone by
about 3e-7. In fp32 that is noise. With the int4 weights (engine/quant.py) every product's
input is rounded to bf16, and a 3e-7 difference can flip a rounding, grow to 1e-2 and flip
a near-tie token: lossless on int4 agreed with full on only 90% of SAMSum's tokens. The
int4 kernel, the norms, rotary and the residual stream are row-invariant (measured bit for
bit), so computing a short verify pass's attention one query at a time, exactly as a
decode step does (keys up to the query, the mask a decode step would build), makes the
whole pass bit-identical to one-token steps.

Registered with transformers' `AttentionInterface` under ROWWISE; the quantized models
use it (`quant.quantize_model`). Calls with more than MAX_ROWS (prefill) go straight to
SDPA: prefill is shared by every method, so its arithmetic need not match. One-query calls
go to SDPA too, without their mask where they see every key, as each row of a verify pass
does.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ROWWISE = "earlyexit_rowwise"
MAX_ROWS = 8  # verify passes: 1 + drafts (decoding/draft_length.py drafts at most 7)


def rowwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """SDPA, one query at a time for 2..MAX_ROWS queries ([B, H, n, D]; keys [B, KV, T, D]
    end with the n new ones)."""
    rows, total = query.shape[2], key.shape[2]
    if rows > MAX_ROWS:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if rows == 1:
        mask = _unless_all_visible(attention_mask)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    outputs = []
    for i in range(rows):
        seen = total - (rows - 1 - i)  # keys up to and including query i
        mask = None
        if attention_mask is not None:
            mask = _unless_all_visible(attention_mask[..., i : i + 1, :seen])
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, i : i + 1],
            key[:, :, :seen],
            value[:, :, :seen],
            mask,
            **kwargs,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=1), None


def _unless_all_visible(mask: torch.Tensor | None) -> torch.Tensor | None:
    """None where the query sees every key: SDPA with an all-true mask takes another kernel
    path than SDPA without one, and on some CPUs (an AMD EPYC Zen 4, AVX-512) the two differ
    by about 6e-8, enough to flip a bf16 rounding. So a query is always computed the same
    way, whether its pass (a running batch's row mask, a verify pass, a decode step) built
    a mask or not."""
    if mask is not None and bool(mask.all()):
        return None
    return mask


AttentionInterface.register(ROWWISE, rowwise_attention)
# the model's own forward / generate builds its masks by attention name: SDPA's masks
# (without this, transformers passes the 2-D padding mask through unchanged)
AttentionMaskInterface.register(ROWWISE, sdpa_mask)
