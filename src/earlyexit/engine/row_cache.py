"""A key/value cache for a running batch whose rows join and leave at any step.

`LayerKVCache` shares its slots among the rows of a batch that started together (left
padding). A server's batch does not: a request joins when it arrives and leaves when it
ends, rows hold prompts of different lengths, and a row whose drafts were rejected keeps
fewer tokens than its neighbours. Here every row keeps its own fill level per layer: row r's
tokens are slots 0..fill[l, r]-1 of layer l, so position = slot, and a pass writes each
row's new tokens at that row's own offset (a scatter; the mask hides what lies beyond).

Rows are packed: running rows occupy rows 0..rows-1 of every buffer, so a pass takes
plain leading slices. A leaving row is replaced by the last one (one row's copy, not a
compaction of the batch). Written here because transformers' caches assume one length per
layer for the whole batch (its paged caches are CUDA-only).
"""

from __future__ import annotations

import torch

from earlyexit.engine.cache import LayerKVCache


class RowKVCache:
    """Per-layer K/V buffers [rows held, kv_heads, capacity, head_dim] with per-row fill.
    Buffers hold as many rows as have joined (doubling up to `max_rows`) and as many slots
    as the rows need (doubling): one user's batch allocates, zeroes and slices one row."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        max_rows: int = 8,
        capacity: int = 256,
    ) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.fill = torch.zeros(num_layers, max_rows, dtype=torch.long)
        self.rows = 0  # running rows: rows 0..rows-1 of every buffer
        self._shape = (max_rows, num_kv_heads, capacity, head_dim)
        self._held = 1  # rows every allocated buffer holds (grown by `add`)
        self._dtype, self._device = dtype, device
        self._counts: torch.Tensor | None = None  # real new tokens per row of this pass

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def max_rows(self) -> int:
        return self._shape[0]

    def ensure(self, layer: int, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's buffers, allocated or grown (by doubling) to hold `needed` slots."""
        keys, values = self.keys[layer], self.values[layer]
        _, heads, capacity, dim = self._shape
        rows = self._held
        if keys is None or values is None:
            shape = (rows, heads, max(capacity, needed), dim)
            keys = torch.zeros(shape, dtype=self._dtype, device=self._device)
            values = torch.zeros(shape, dtype=self._dtype, device=self._device)
        elif needed > keys.shape[2]:
            held = int(self.fill[layer].max())
            grown = []
            for old in (keys, values):
                new = old.new_zeros((rows, heads, max(needed, 2 * old.shape[2]), dim))
                new[:, :, :held] = old[:, :, :held]
                grown.append(new)
            keys, values = grown
        self.keys[layer], self.values[layer] = keys, values
        return keys, values

    # ---- rows joining and leaving --------------------------------------------------------
    def add(self, single: LayerKVCache) -> int:
        """A new row holding a batch-1 cache's keys/values (a prefill); returns its row."""
        if self.rows >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        if single.batch != 1 or single.has_padding:
            raise ValueError("a row joins from an unpadded batch-1 cache")
        row = self.rows
        if row >= self._held:
            self._grow_rows(min(self.max_rows, 2 * self._held))
        for layer in range(self.num_layers):
            length = single.lengths[layer] if layer < single.num_layers else 0
            if length:
                keys, values = self.ensure(layer, length)
                src_keys, src_values = single.layer_kv(layer)
                keys[row, :, :length] = src_keys[0]
                values[row, :, :length] = src_values[0]
            self.fill[layer, row] = length
        self.rows += 1
        return row

    def _grow_rows(self, held: int) -> None:
        """Every allocated buffer to `held` rows (the running rows copied)."""
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                if old is not None:
                    new = old.new_zeros((held, *old.shape[1:]))
                    new[: self.rows] = old[: self.rows]
                    store[layer] = new
        self._held = held

    def remove(self, row: int) -> int | None:
        """Drop a row: the last row moves into its place. Returns the moved row's old index
        (None when the removed row was the last), so the caller can renumber it."""
        if not 0 <= row < self.rows:
            raise ValueError(f"no running row {row}")
        last = self.rows - 1
        moved = None
        if row != last:
            for layer in range(self.num_layers):
                length = int(self.fill[layer, last])
                for store in (self.keys, self.values):
                    buffer = store[layer]
                    if buffer is not None and length:
                        buffer[row, :, :length] = buffer[last, :, :length]
                self.fill[layer, row] = length
            moved = last
        self.fill[:, last] = 0
        self.rows = last
        return moved

    def span_fill(self, start: int, end: int) -> torch.Tensor:
        """Each running row's fill in layers [start, end), which must agree across them (a
        pass or a state copy over the span writes every layer at the same slots)."""
        fill = self.fill[start, : self.rows].clone()
        if not bool((self.fill[start:end, : self.rows] == fill).all()):
            raise ValueError(f"layers {start}..{end - 1} hold different tokens for some row")
        return fill

    def set_fill(self, row: int, length: int, layers: range | None = None) -> None:
        """The row keeps `length` slots in these layers (e.g. its accepted drafts)."""
        span = layers if layers is not None else range(self.num_layers)
        self.fill[span.start : span.stop, row] = length

    # ---- a pass ------------------------------------------------------------------------
    def begin_pass(self, counts: torch.Tensor) -> None:
        """The next pass writes counts[r] real tokens for row r (inputs beyond them are
        padding of a ragged pass: written past the row's fill, never kept)."""
        self._counts = counts

    def update(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [rows, heads, n, dim] at each row's fill; return the layer's
        buffers up to the longest row's end (transformers' `Cache.update` contract)."""
        rows, num_new = key.shape[0], key.shape[2]
        fill = self.fill[layer_idx, :rows]
        end = int(fill.max()) + num_new
        keys, values = self.ensure(layer_idx, end)
        slots = fill.unsqueeze(1) + torch.arange(num_new)  # [rows, n]
        index = torch.arange(rows).unsqueeze(1).expand(rows, num_new)
        keys[index, :, slots] = key.transpose(1, 2)  # advanced indices first: [rows, n, h, d]
        values[index, :, slots] = value.transpose(1, 2)
        counts = self._counts if self._counts is not None else torch.full((rows,), num_new)
        self.fill[layer_idx, :rows] = fill + counts[:rows]
        return keys[:rows, :, :end], values[:rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.fill[layer_idx, : self.rows].max()) if self.rows else 0


def row_mask(fill: torch.Tensor, num_new: int, window: int | None) -> torch.Tensor:
    """Boolean mask [rows, 1, n, max(fill) + n] for queries at slots fill[r]..fill[r]+n-1 of
    each row: key slot j is visible to query slot i when j <= i (and i - j < window)."""
    total = int(fill.max()) + num_new
    q = (fill.view(-1, 1) + torch.arange(num_new)).view(-1, 1, num_new, 1)
    k = torch.arange(total).view(1, 1, 1, total)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    return allowed
