"""The linear-chain CRF (python-crfsuite) behind AdaInfer's CRF stopper.

Each layer is one item with the stopper's features (as values, and binned, plus the layer
as an indicator, so the linear potentials can bend); labels are "go"/"stop". Online, at
layer l only layers 1..l are known, so the stop score is the CRF's marginal
P(stop at l | layers 1..l): the tagger run on that prefix, whose last position's marginal
is the forward (filtering) probability.

This module knows the CRF model only: items, training to model bytes, and tagging. The
policy around it and its saved form are in `policies/adainfer.py`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pycrfsuite
import torch

BINS = 10


def item_features(row: list[float], names: list[str], num_layers: int) -> dict[str, float]:
    """One layer's CRF item from its feature row (named by `names`; "depth" is layer / L)."""
    item = {"bias": 1.0}
    for name, value in zip(names, row, strict=True):
        if name == "depth":
            item[f"layer={round(value * num_layers)}"] = 1.0
            continue
        item[name] = value
        item[f"{name}_bin={min(int(value * BINS), BINS - 1)}"] = 1.0
    return item


class CRFTagger:
    """A crfsuite tagger opened from model bytes (crfsuite reads models from files only)."""

    def __init__(self, model: bytes) -> None:
        with tempfile.NamedTemporaryFile(suffix=".crfsuite") as handle:
            handle.write(model)
            handle.flush()
            self.tagger = pycrfsuite.Tagger()
            self.tagger.open(handle.name)  # crfsuite reads the whole model into memory

    def stop_probability(self, prefix: list[dict[str, float]]) -> float:
        """Filtering marginal P(stop at the last item | the items so far)."""
        self.tagger.set(prefix)
        return self.tagger.marginal("stop", len(prefix) - 1)


def train_crf(features: torch.Tensor, labels: torch.Tensor, names: list[str], c: float) -> bytes:
    """Model bytes trained on features [N, L, F] and stop labels [N, L] over layers 1..L-1
    (the last layer always stops, so it is left out)."""
    num_layers = features.shape[1]
    trainer = pycrfsuite.Trainer(verbose=False)
    for rows, tags in zip(features.tolist(), labels.tolist(), strict=True):
        items = [item_features(r, names, num_layers) for r in rows[:-1]]
        trainer.append(items, ["stop" if t else "go" for t in tags[:-1]])
    # L2-regularised L-BFGS; c2 plays the role of 1 / C
    trainer.set_params({"c1": 0.0, "c2": 1.0 / c, "max_iterations": 200})
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "stopper.crfsuite"
        trainer.train(str(model_path))
        return model_path.read_bytes()
