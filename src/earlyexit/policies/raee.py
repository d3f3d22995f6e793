"""RAEE (Huang et al., 2024): retrieval-augmented early exit, training-free.

The exit layer is predicted *before* the model runs, from the exit information of the k most
similar labelled examples: layers where they were answered correctly, and how surely. So an
input can exit at a layer where its neighbours were right even when the final layer is
wrong, which is how RAEE can beat the full model.

Two scoring rules:
- `paper`: as published. Neighbour j weighs w_j = d_min / d_j; it contributes the layers
  where its gold probability is >= p_min (else its `top_n` best correct layers) with that
  probability times w_j; exit at the layer with the largest sum; no correct layer -> last.
- `reliable` (default): layers at chance on the database are dropped from every
  neighbour's exit information, and each remaining layer's term is scaled by its reliability
  on the database (balanced accuracy above chance, see ExitDatabase.layer_reliability). With
  small models the early readouts answer one class for every input, so they are "correct",
  with high probability, for every database example of that class; the paper rule then
  degenerates into a nearest-neighbour label vote at layer 1. Reliability removes them.

`slack` (either rule; 0 is the paper's argmax) exits at the earliest layer whose score is
within that fraction of the best: summed over many neighbours, the scores of the deep
layers, where nearly every neighbour is right, crowd out earlier layers that are almost as
good.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.policies.base import ExitPolicy
from earlyexit.retrieval.database import ExitDatabase

RULES = ("reliable", "paper")


@dataclass
class RAEEPolicy(ExitPolicy):
    database: ExitDatabase
    embedder: object  # earlyexit.retrieval.embedders.Embedder
    k: int = 12
    rule: str = "reliable"
    p_min: float = 0.9
    top_n: int = 3
    num_classes: int = 2
    slack: float = 0.0
    _reliability: np.ndarray | None = field(default=None, repr=False)
    name = "raee"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise EarlyExitError(f"unknown RAEE rule '{self.rule}': use {' or '.join(RULES)}")
        if not 0 <= self.slack < 1:
            raise EarlyExitError(f"RAEE slack must lie in [0, 1), got {self.slack}")
        if self.k < 1:
            raise EarlyExitError(f"RAEE needs k >= 1 neighbours, got {self.k}")
        if self.rule == "reliable":
            self._reliability = self.database.layer_reliability(self.num_classes)

    def plan(self, texts: list[str]) -> torch.Tensor:
        """Exit layer (1..L) per input text, from its neighbours' exit information."""
        distances, ids = self.database.search(self.embedder.embed(texts), self.k)
        return torch.from_numpy(self.exits_from_neighbours(distances, ids))

    def exits_from_neighbours(self, distances: np.ndarray, ids: np.ndarray) -> np.ndarray:
        num_layers = self.database.num_layers
        probs = self.database.layer_probs[ids]  # [Q, k, L]
        if self._reliability is not None:  # unreliable layers are no exit information
            probs = np.where(self._reliability > 0, probs, 0.0)
        weights = distances.min(1, keepdims=True) / np.maximum(distances, 1e-6)
        weights = np.where(distances.min(1, keepdims=True) <= 1e-6, distances <= 1e-6, weights)
        keep = probs >= self.p_min
        # neighbours with no layer above p_min keep their top_n correct layers instead
        ranks = np.argsort(np.argsort(-probs, axis=-1, kind="stable"), axis=-1, kind="stable")
        fallback = (ranks < self.top_n) & (probs > 0)
        keep = np.where(keep.any(-1, keepdims=True), keep, fallback)
        scores = (weights[..., None] * np.where(keep, probs, 0.0)).sum(1)  # [Q, L]
        if self._reliability is not None:
            scores = scores * self._reliability
        best = scores.max(-1, keepdims=True)
        # the earliest layer scoring within `slack` of the best (slack 0: the argmax)
        exits = (scores >= best * (1 - self.slack)).argmax(-1) + 1
        exits[best[:, 0] <= 0] = num_layers
        return exits.astype(np.int64)

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set()  # a planned policy reads out only at each row's planned layer

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise TypeError("RAEE plans exits before the run; use plan()")

    def describe(self) -> dict:
        return {
            "name": self.name,
            "rule": self.rule,
            "k": self.k,
            "p_min": self.p_min,
            "top_n": self.top_n,
            "slack": self.slack,
            "embedder": self.database.meta.get("embedder"),
            "database_size": self.database.size,
        }
