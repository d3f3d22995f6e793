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
        # Buffers are allocated on a layer's first write: layers a request never reaches
        # (it exited earlier) cost no memory and no copying when rows are dropped.
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers
        self._shape = (batch, num_kv_heads, capacity, head_dim)
        self._dtype, self._device = dtype, device
        self.pad = pad if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        self.has_padding = bool(self.pad.any())

    def add_layer(self) -> int:
        """One more (empty) layer, e.g. for a draft block above the model's layers; returns
        its index. `truncate` rolls it back with the others."""
        self.keys.append(None)
        self.values.append(None)
        self.lengths.append(0)
        return len(self.lengths) - 1

    @property
    def num_layers(self) -> int:
        return len(self.lengths)

    @property
    def batch(self) -> int:
        return self._shape[0]

    def ensure(self, layer: int, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers, allocated or grown (by doubling) to hold `needed` slots."""
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            batch, heads, capacity, dim = self._shape
            shape = (batch, heads, max(capacity, needed), dim)
            keys = torch.zeros(shape, dtype=self._dtype, device=self._device)
            values = torch.zeros(shape, dtype=self._dtype, device=self._device)
        elif needed > keys.shape[2]:
            new_cap = max(needed, 2 * keys.shape[2])
            grown = []
            for old in (keys, values):
                new = old.new_zeros((old.shape[0], old.shape[1], new_cap, old.shape[3]))
                new[:, :, : self.lengths[layer]] = old[:, :, : self.lengths[layer]]
                grown.append(new)
            keys, values = grown
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

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
        keys, values = self.ensure(layer_idx, end)
        keys[:, :, start:end] = key
        values[:, :, start:end] = value
        self.lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]

    def truncate(self, length: int, layers: range | None = None) -> None:
        """Forget every slot at or after `length` (e.g. rejected draft tokens)."""
        for layer in layers if layers is not None else range(self.num_layers):
            self.lengths[layer] = min(self.lengths[layer], length)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.ensure(layer, self.lengths[layer])
        end = self.lengths[layer]
        return keys[:, :, :end], values[:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only some batch rows (sequences that finished or exited are dropped)."""
        for store in (self.keys, self.values):
            for layer, buffer in enumerate(store):
                if buffer is not None:
                    store[layer] = buffer.index_select(0, rows)
        self.pad = self.pad.index_select(0, rows)
        self.has_padding = bool(self.pad.any())
        self._shape = (int(rows.numel()), *self._shape[1:])

    # transformers' attention layers only call `update`; these keep other callers honest.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]
