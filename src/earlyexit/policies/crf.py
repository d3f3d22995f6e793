"""AdaInfer's CRF stopper: a linear-chain CRF (python-crfsuite) over the layer sequence.

Each layer is one item with AdaInfer's features (as values, and binned, plus the layer as
an indicator, so the linear potentials can bend); labels are "go"/"stop" as for the SVM.
Online, at layer l only layers 1..l are known, so the stop score is the CRF's marginal
P(stop at l | layers 1..l): the tagger run on that prefix, whose last position's marginal
is the forward (filtering) probability. Rows keep their feature prefix between layers.
"""

from __future__ import annotations

import base64
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from earlyexit.policies.adainfer import feature_names, stopper_features
from earlyexit.policies.base import ExitPolicy

BINS = 10


def item_features(row: list[float], names: list[str], num_layers: int) -> dict[str, float]:
    item = {"bias": 1.0}
    for name, value in zip(names, row, strict=True):
        if name == "depth":
            item[f"layer={round(value * num_layers)}"] = 1.0
            continue
        item[name] = value
        item[f"{name}_bin={min(int(value * BINS), BINS - 1)}"] = 1.0
    return item


class _Tagger:
    """A crfsuite tagger opened from model bytes (crfsuite reads models from files only)."""

    def __init__(self, model: bytes) -> None:
        import pycrfsuite

        with tempfile.NamedTemporaryFile(suffix=".crfsuite") as handle:
            handle.write(model)
            handle.flush()
            self.tagger = pycrfsuite.Tagger()
            self.tagger.open(handle.name)  # crfsuite reads the whole model into memory

    def stop_probability(self, prefix: list[dict[str, float]]) -> float:
        self.tagger.set(prefix)
        return self.tagger.marginal("stop", len(prefix) - 1)


@dataclass
class CRFStopPolicy(ExitPolicy):
    model: bytes
    num_layers: int
    margin: float = 0.5
    use_vocab: bool = False
    meta: dict = field(default_factory=dict)
    name = "adainfer"

    def __post_init__(self) -> None:
        self._tagger = _Tagger(self.model)
        self._names = feature_names(self.use_vocab)
        self._history: list[list[dict[str, float]]] = []

    @property
    def vocab_features(self) -> bool:  # type: ignore[override]
        return self.use_vocab

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set(range(1, num_layers))

    def begin(self, rows: int) -> None:
        self._history = [[] for _ in range(rows)]

    def keep(self, rows: torch.Tensor) -> None:
        self._history = [self._history[i] for i in rows.tolist()]

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        feats = stopper_features(self.use_vocab, logits, layer, num_layers, vocab)
        scores = []
        for prefix, row in zip(self._history, feats.tolist(), strict=True):
            prefix.append(item_features(row, self._names, num_layers))
            scores.append(self._tagger.stop_probability(prefix))
        return torch.tensor(scores) > self.margin

    def online_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[N, L-1] filtering stop probabilities from trace features [N, L, F]."""
        num_layers = features.shape[1]
        out = torch.zeros(features.shape[0], num_layers - 1)
        for n, rows in enumerate(features.tolist()):
            items = [item_features(r, self._names, num_layers) for r in rows[:-1]]
            for layer in range(1, num_layers):
                out[n, layer - 1] = self._tagger.stop_probability(items[:layer])
        return out

    def describe(self) -> dict:
        return {"name": self.name, "stopper": "crf", "margin": self.margin, **self.meta}

    def save(self, path: Path) -> None:
        import json

        from earlyexit.paths import atomic_file

        payload = {
            "format_version": 2,
            "stopper": "crf",
            "features": self._names,
            "model": base64.b64encode(self.model).decode(),
            "num_layers": self.num_layers,
            "margin": self.margin,
            "use_vocab": self.use_vocab,
            "meta": self.meta,
        }
        with atomic_file(Path(path)) as tmp:
            tmp.write_text(json.dumps(payload, indent=2))

    @classmethod
    def from_payload(cls, payload: dict) -> CRFStopPolicy:
        payload["model"] = base64.b64decode(payload["model"])
        return cls(**payload)


def fit_crf(
    features: torch.Tensor, labels: torch.Tensor, c: float, use_vocab: bool, meta: dict
) -> CRFStopPolicy:
    """Train on sequences of layers 1..L-1 (the last layer always stops)."""
    import pycrfsuite

    names = feature_names(use_vocab)
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
        model = model_path.read_bytes()
    return CRFStopPolicy(model, num_layers, use_vocab=use_vocab, meta=dict(meta))
