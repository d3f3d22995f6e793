"""A key/value cache in which every layer keeps its own fill level.

transformers' caches assume that all layers hold the same tokens. Early exit breaks that: a
token that stopped at layer k has keys/values in layers 0..k only, until a later pass fills
layers k+1..L for it (FREE's synchronized parallel decoding) or until it is rolled back
(self-speculative verification). The buffers are preallocated and grown by doubling, as in
gpt-fast, so decoding writes in place instead of concatenating every step.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """Per-layer K/V buffers of shape [batch, kv_heads, capacity, head_dim].

    Slots are shared by all rows of the batch; `pad[b]` leading slots of row b are left
    padding and never attended to. `lengths[l]` is how many slots layer l holds.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 256,
        pad: torch.Tensor | None = None,
    ) -> None:
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers
        self.pad = pad if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        self.has_padding = bool(self.pad.any())

    @property
    def num_layers(self) -> int:
        return len(self.lengths)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def _grow(self, layer: int, needed: int) -> None:
        new_cap = max(needed, 2 * self.keys[layer].shape[2])
        for store in (self.keys, self.values):
            old = store[layer]
            grown = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
            grown[:, :, : self.lengths[layer]] = old[:, :, : self.lengths[layer]]
            store[layer] = grown

    def update(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new keys/values to one layer and return everything that layer holds.

        Same contract as transformers' `Cache.update`, which the model's attention calls.
        """
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, end)
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def truncate(self, length: int, layers: range | None = None) -> None:
        """Forget every slot at or after `length` (e.g. rejected draft tokens)."""
        for layer in layers if layers is not None else range(self.num_layers):
            self.lengths[layer] = min(self.lengths[layer], length)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.lengths[layer]
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only some batch rows (sequences that finished or exited are dropped)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.pad = self.pad.index_select(0, rows)
        self.has_padding = bool(self.pad.any())

    # transformers' attention layers only call `update`; these keep other callers honest.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]
