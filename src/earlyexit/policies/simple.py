"""Baselines: the full model, a fixed exit layer, and a confidence threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit.errors import EarlyExitError
from earlyexit.policies.base import ExitPolicy, readout_features


class FullPolicy(ExitPolicy):
    name = "full"

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set()

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.zeros(logits.shape[0], dtype=torch.bool)


@dataclass
class StaticPolicy(ExitPolicy):
    layer: int
    name = "static"

    def readout_layers(self, num_layers: int) -> set[int] | None:
        if not 1 <= self.layer <= num_layers:
            raise EarlyExitError(f"static exit layer must lie in 1..{num_layers}, not {self.layer}")
        return {self.layer}

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.full((logits.shape[0],), layer >= self.layer, dtype=torch.bool)

    def describe(self) -> dict:
        return {"name": self.name, "layer": self.layer}


@dataclass
class ConfidencePolicy(ExitPolicy):
    """Exit at the first layer whose readout is confident enough (CALM-style)."""

    threshold: float
    measure: str = "gap"  # "gap" (top-1 minus top-2 probability) or "top1"
    min_layer: int = 1
    name = "confidence"

    def __post_init__(self) -> None:
        if self.measure not in ("gap", "top1"):
            raise EarlyExitError(f"confidence measure must be gap or top1, not {self.measure}")

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set(range(max(1, self.min_layer), num_layers + 1))

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = readout_features(logits, layer, num_layers)
        column = 0 if self.measure == "top1" else 1
        return features[:, column] >= self.threshold

    def describe(self) -> dict:
        return {"name": self.name, "threshold": self.threshold, "measure": self.measure}
