"""Per-layer readouts: the logit lens, optionally after a trained per-layer adapter.

An intermediate residual stream is not in the basis the final norm and LM head expect
(the "logit lens" is nearly useless before the last few layers of small models). A small
affine map per layer, fitted to predict the final layer's hidden state and tuned by
distillation, fixes most of that while reusing the model's own norm and head, so a
readout costs one [H x H] matmul plus the head (or only a few head rows).
"""

from __future__ import annotations

import torch
from torch import nn

from earlyexit.engine.engine import LayerEngine


def unit_rms(x: torch.Tensor) -> torch.Tensor:
    """x scaled to unit root-mean-square over the last dimension (no learned weight): how
    readouts and probes normalise the states they read."""
    return nn.functional.rms_norm(x, (x.shape[-1],), eps=1e-6)


def top_two(logits: torch.Tensor) -> torch.return_types.topk:
    """The two largest probabilities per row and their indices: every exit confidence
    (top-1 probability, top-1 minus top-2 gap) is read from these."""
    return torch.softmax(logits.float(), dim=-1).topk(2, dim=-1)


class LayerAdapter(nn.Module):
    """h -> A(h / rms(h)) + b, an affine translator into the final layer's space.

    Inputs are RMS-normalised first: the residual stream's scale grows with depth and the
    final norm discards scale anyway, so the map only has to learn a direction.
    With `rank`, A = I + U V^T (low rank); otherwise A is a full matrix.
    """

    def __init__(self, hidden_size: int, rank: int | None = None) -> None:
        super().__init__()
        self.rank = rank
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        if rank is None:
            self.weight = nn.Parameter(torch.eye(hidden_size))
        else:
            self.down = nn.Parameter(torch.zeros(rank, hidden_size))
            self.up = nn.Parameter(torch.zeros(hidden_size, rank))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = unit_rms(hidden)
        if self.rank is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return x + (x @ self.down.T) @ self.up.T + self.bias


class ExitReadout(nn.Module):
    """Logits at any layer: adapter (if trained for that layer) -> final norm -> LM head.

    Layers are numbered 1..L by how many decoder layers have run; layer L is the model's
    own output and never gets an adapter.
    """

    def __init__(
        self, engine: LayerEngine, adapters: dict[int, LayerAdapter] | None = None
    ) -> None:
        super().__init__()
        self.engine = engine
        self.adapters = nn.ModuleDict({str(k): v for k, v in (adapters or {}).items()})
        # the ids that carried the final layer's mass on the training text, if known
        self.vocabulary: torch.Tensor | None = None

    @property
    def trained_layers(self) -> list[int]:
        return sorted(int(k) for k in self.adapters)

    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        if str(layer) not in self.adapters:
            return hidden
        adapter = self.adapters[str(layer)]
        return adapter(hidden.to(adapter.bias.dtype)).to(hidden.dtype)

    def logits(
        self, hidden: torch.Tensor, layer: int, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-token logits from the output of `layer`; only `token_ids` columns if given."""
        return self.engine.logits(self.translate(hidden, layer), token_ids)
