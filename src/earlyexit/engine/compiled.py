"""Decode steps over a span of layers, compiled into one graph (opt-in).

At batch 1 the eager engine spends about half of a token's time outside the weight
products: some forty small ops per layer, each a Python call and a kernel launch of a few
microseconds. gpt-fast's answer is to compile the whole decode step; that is what this does,
per span of layers the decoders ask for ((0, L) for full depth, (0, k) and (k, L) around a
shallow exit), with torch.compile (inductor, C++ wrapper): the norms, rotary embedding,
residuals and activation fuse into a few loops, and the int4 products and attention run as
before. Measured on the Xeon (smollm2-135m int4, 64 tokens): 149 tok/s against 97.5 for the
lean eager steps (`bench engine`, path `engine-compiled`).

One graph per span serves 1..MAX_ROWS new tokens (one-token steps, verify passes,
catch-ups): the row count is an unbacked size, so a size of 1 gets no graph of its own, and
attention computes each row as a one-query problem, so a verify pass equals one-token steps
bit for bit and `lossless` stays exactly the compiled model's greedy output.

What it changes, and so why it is opt-in (`LayerEngine.set_compiled`):
- the arithmetic: fused loops round differently from the eager ops, and attention runs over
  the cache's whole capacity with a mask (a static shape) where the eager path slices the
  filled slots. tests/test_compiled.py bounds the difference against the eager engine; it
  is not bit-identical to the model's own layers, and a logit tie can break the other way.
- the start-up: each span compiles once per process, about a minute on 2 cores for 30
  layers (inductor caches the result on disk for later processes).
Only batch 1 without padding and at most MAX_ROWS new tokens after the prompt are
compiled; prefill (layer by layer into an empty cache) and padded batches run the eager
engine. Layers are supported when they have a lean step
(engine/layer_step.py) with stacked int4/int8 products (engine/quant.py): smollm2-135m at
`--dtype int4`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama

from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.layer_step import LlamaLayerStep
from earlyexit.engine.quant import ACT, GROUP, QuantLinear

_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
SILU = (nn.SiLU, SiLUActivation)  # both are F.silu
MAX_ROWS = 8  # verify passes: 1 + drafts (decoding/draft_length.py drafts at most 7)
# inductor's options for these graphs: the C++ wrapper calls the kernels without Python
# between them (1.55x over eager here, against 1.46x with the Python wrapper)
COMPILE_OPTIONS = {"cpp_wrapper": True}


@dataclass(frozen=True)
class _Product:
    """A QuantLinear's product as tensors only (what a compiled graph takes)."""

    out_features: int
    planes: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (packed, scales) per 4-bit plane

    @staticmethod
    def of(module: nn.Module) -> _Product | None:
        if not isinstance(module, QuantLinear):
            return None
        return _Product(module.out_features, tuple(zip(module.packed, module.scales, strict=True)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """QuantLinear.forward's few-row arithmetic: bf16 in, planes summed, cast back.
        Its own forward cannot be traced here: it branches on the row count, which the
        graph leaves unbacked, and stacked members cache the group's last output."""
        flat = x.reshape(-1, x.shape[-1]).to(ACT)
        out = _MM(flat, self.planes[0][0], GROUP, self.planes[0][1])
        for packed, scales in self.planes[1:]:
            out = out + _MM(flat, packed, GROUP, scales)
        return out[:, : self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class _LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: _Product
    o: _Product
    gate_up: _Product
    down: _Product
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @staticmethod
    def of(step: object) -> _LayerWeights | None:
        if not isinstance(step, LlamaLayerStep) or step.qkv is None or step.gate_up is None:
            return None
        norms = (step.input_norm, step.post_norm)
        if any(n.weight.dtype != torch.float32 for n in norms):
            return None
        (qkv, (q_cols, k_cols, _)), (gate_up, (gate_cols, up_cols)) = step.qkv, step.gate_up
        if gate_cols.stop != up_cols.start or up_cols.stop - up_cols.start != gate_cols.stop:
            return None  # gate and up are the two halves of the stacked product
        products = [_Product.of(m) for m in (qkv, step.attn.o_proj, gate_up, step.mlp.down_proj)]
        if any(p is None for p in products) or type(step.mlp.act_fn) not in SILU:
            return None
        head_dim = step.head_dim
        return _LayerWeights(
            step.input_norm.weight,
            step.post_norm.weight,
            float(step.input_norm.variance_epsilon),
            *products,  # type: ignore[arg-type]
            heads=(q_cols.stop - q_cols.start) // head_dim,
            kv_heads=(k_cols.stop - k_cols.start) // head_dim,
            head_dim=head_dim,
            scaling=float(step.attn.scaling),
        )


def _layer(
    w: _LayerWeights,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """LlamaLayerStep's arithmetic for n new tokens [1, n, H], writing their K/V into
    `slots` of the layer's whole buffers. Attention treats the n queries as a batch of n
    one-query problems over the whole capacity, row i under mask[i] (static shapes): each
    row is computed as a one-token step computes it, so a verify pass equals one-token
    steps bit for bit (as engine/rowwise.py makes the eager engine's)."""
    rows = hidden.shape[1]
    normed = functional.rms_norm(hidden, w.input_norm.shape, w.input_norm, w.eps)
    out = w.qkv(normed)
    qk_width = (w.heads + w.kv_heads) * w.head_dim
    heads = out[..., :qk_width].view(1, rows, -1, w.head_dim).transpose(1, 2)
    heads = heads * cos + modeling_llama.rotate_half(heads) * sin
    value = out[..., qk_width:].view(1, rows, -1, w.head_dim).transpose(1, 2)
    keys.index_copy_(2, slots, heads[:, w.heads :])
    values.index_copy_(2, slots, value)
    query = heads[:, : w.heads].transpose(0, 2)  # [n, heads, 1, D]
    attention = functional.scaled_dot_product_attention(
        query,
        keys.expand(rows, -1, -1, -1),
        values.expand(rows, -1, -1, -1),
        attn_mask=mask,
        scale=w.scaling,
        enable_gqa=True,
    )  # [n, heads, 1, D]
    hidden = hidden + w.o(attention.transpose(0, 2).transpose(1, 2).reshape(1, rows, -1))
    normed = functional.rms_norm(hidden, w.post_norm.shape, w.post_norm, w.eps)
    out = w.gate_up(normed)
    gate, up = out.chunk(2, dim=-1)
    return hidden + w.down(functional.silu(gate) * up)


def compilable(steps: list[object]) -> bool:
    """Whether every layer can run compiled (else `set_compiled` would compile nothing)."""
    return all(_LayerWeights.of(step) is not None for step in steps)


class CompiledSpans:
    """Compiled decode steps over spans of an engine's layers, compiled on first use."""

    def __init__(self, steps: list[object], position_embeddings: Callable) -> None:
        """`steps`: every layer's lean step, all compilable (`compilable`)."""
        self.layers = [_LayerWeights.of(step) for step in steps]
        if any(w is None for w in self.layers):
            raise ValueError("every layer must be compilable (see `compilable`)")
        self._rope = position_embeddings  # (hidden, position ids) -> (cos, sin)
        self._spans: dict[tuple[int, int], Callable] = {}

    def accepts(self, hidden: torch.Tensor, cache: LayerKVCache, start: int, end: int) -> bool:
        return (
            hidden.shape[0] == 1
            and 1 <= hidden.shape[1] <= MAX_ROWS
            and cache.lengths[start] > 0  # not a prefill (it runs one layer at a time)
            and not cache.has_padding
        )

    def _span(self, start: int, end: int) -> Callable:
        if (start, end) not in self._spans:
            weights = self.layers[start:end]
            rope = self._rope

            def span(hidden, keys, values, offset):  # noqa: ANN001, ANN202
                rows, capacity = hidden.shape[1], keys[0].shape[2]
                slots = offset + torch.arange(rows, device=hidden.device)
                cos, sin = rope(hidden, slots.unsqueeze(0))
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
                seen = torch.arange(capacity, device=hidden.device) <= slots.unsqueeze(1)
                mask = seen.view(rows, 1, 1, capacity)
                for i, w in enumerate(weights):
                    hidden = _layer(w, hidden, keys[i], values[i], slots, cos, sin, mask)
                return hidden

            self._spans[(start, end)] = torch.compile(span, fullgraph=True, options=COMPILE_OPTIONS)
        return self._spans[(start, end)]

    def run(
        self, hidden: torch.Tensor, cache: LayerKVCache, start: int, end: int
    ) -> torch.Tensor | None:
        """Layers [start, end) over 1..MAX_ROWS new tokens (the caller checked `accepts`
        and that the span's layers hold the same number of slots); None when the layers'
        buffers differ in capacity (one grew by doubling, another was first allocated
        later): the caller runs the span eagerly."""
        offset, rows = cache.lengths[start], hidden.shape[1]
        buffers = [cache.ensure(layer, offset + rows) for layer in range(start, end)]
        keys = [k for k, _ in buffers]
        values = [v for _, v in buffers]
        if len({k.shape[2] for k in keys}) > 1:
            return None
        for buffer in (*keys, *values):  # one graph for every capacity
            torch._dynamo.mark_dynamic(buffer, 2)
        # one graph for every row count, 1 included: a one-token step and a verify pass
        # run the same code (a size-1 dimension would otherwise get its own graph)
        torch._dynamo.decorators.mark_unbacked(hidden, 1)
        offset_t = torch.tensor(offset, device=hidden.device)
        out = self._span(start, end)(hidden, keys, values, offset_t)
        for layer in range(start, end):
            cache.lengths[layer] = offset + rows
        return out
