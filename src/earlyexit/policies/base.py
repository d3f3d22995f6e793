"""The policy interface and the readout statistics policies decide on."""

from __future__ import annotations

import torch

from earlyexit.readouts.readout import top_two

FEATURES = ("top1", "gap", "depth")
VOCAB_FEATURES = ("vocab_top1", "vocab_gap")


def readout_features(logits: torch.Tensor, layer: int, num_layers: int) -> torch.Tensor:
    """[rows, 3] = (top-1 probability, top-1 minus top-2 probability, layer / L).

    Computed over the candidate (label-word) logits: AdaInfer's "gap" and "top prob"
    features, plus depth so one classifier can serve every layer.
    """
    top2 = top_two(logits).values
    depth = torch.full_like(top2[:, :1], layer / num_layers)
    return torch.cat([top2[:, :1], top2[:, :1] - top2[:, 1:2], depth], dim=-1)


def vocab_statistics(logits: torch.Tensor) -> torch.Tensor:
    """[rows, 2] = (top-1 probability, top-1 minus top-2) over the full vocabulary: the
    paper's own AdaInfer features, at the price of a full LM-head readout per layer."""
    top2 = top_two(logits).values
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1]], dim=-1)


class ExitPolicy:
    """Decides after a layer which rows stop there. Layers are numbered 1..L.

    `readout_layers` says where a readout is needed at all (None: every layer), so that
    policies which know their exit layer in advance pay for one readout only. A policy that
    predicts exits before the run (RAEE) returns them from `plan`; the runner then groups
    rows by exit layer. Policies that look back over earlier layers (the CRF) keep per-row
    state between `begin` and the end of a batch; `keep` follows the rows still running.
    """

    name = "policy"
    vocab_features = False  # wants full-vocabulary statistics (costly) with each reading

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return None

    def plan(self, texts: list[str]) -> torch.Tensor | None:
        return None

    def begin(self, rows: int) -> None:
        pass

    def keep(self, rows: torch.Tensor) -> None:
        pass

    def should_exit(
        self,
        layer: int,
        logits: torch.Tensor,
        num_layers: int,
        vocab: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[rows] bool from this layer's candidate logits (and `vocab_statistics` if the
        policy asked for them)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}
