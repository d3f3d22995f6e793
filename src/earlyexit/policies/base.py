"""The policy interface and the readout statistics policies decide on."""

from __future__ import annotations

import torch

FEATURES = ("top1", "gap", "depth")


def readout_features(logits: torch.Tensor, layer: int, num_layers: int) -> torch.Tensor:
    """[rows, 3] = (top-1 probability, top-1 minus top-2 probability, layer / L).

    Computed over the candidate (label-word) logits: AdaInfer's "gap" and "top prob"
    features, plus depth so one classifier can serve every layer.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    depth = torch.full_like(top2[:, :1], layer / num_layers)
    return torch.cat([top2[:, :1], top2[:, :1] - top2[:, 1:2], depth], dim=-1)


class ExitPolicy:
    """Decides after a layer which rows stop there. Layers are numbered 1..L.

    `readout_layers` says where a readout is needed at all (None: every layer), so that
    policies which know their exit layer in advance pay for one readout only.
    """

    name = "policy"

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return None

    def should_exit(self, layer: int, logits: torch.Tensor, num_layers: int) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name}
