"""RAEE's exit database: per labelled example, its embedding and its exit information.

Exit information is, for every layer, the probability the layer's readout gives the gold
label where that layer's prediction *is* the gold label (0 elsewhere). Stored as
safetensors + JSON + a FAISS index, written atomically, with the model's fingerprint so that
a database built for one model (or one readout) is refused for another.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_dir

FORMAT_VERSION = 1
EXACT_LIMIT = 20000  # exact search up to here; HNSW (approximate) above


def exit_information(traces: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N, L]: gold-label probability at each layer whose prediction is the gold label."""
    probs = torch.softmax(traces.float(), dim=-1)
    gold = probs.gather(-1, labels.view(-1, 1, 1).expand(-1, traces.shape[1], 1)).squeeze(-1)
    correct = traces.argmax(-1) == labels.view(-1, 1)
    return torch.where(correct, gold, torch.zeros_like(gold))


@dataclass
class ExitDatabase:
    embeddings: np.ndarray  # [N, D] float32, L2-normalised
    layer_probs: np.ndarray  # [N, L] float32, see exit_information
    labels: np.ndarray  # [N] int64
    meta: dict[str, Any] = field(default_factory=dict)
    _index: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.embeddings.shape[0] != n or self.layer_probs.shape[0] != n:
            raise EarlyExitError("exit database arrays disagree in length; build it again")

    @property
    def size(self) -> int:
        return len(self.labels)

    @property
    def num_layers(self) -> int:
        return self.layer_probs.shape[1]

    @property
    def index(self) -> Any:
        """FAISS index over the embeddings: exact L2 for small sets, HNSW for large ones."""
        if self._index is None:
            import faiss

            dim = self.embeddings.shape[1]
            if self.size <= EXACT_LIMIT:
                self._index = faiss.IndexFlatL2(dim)
            else:
                self._index = faiss.IndexHNSWFlat(dim, 32)
                self._index.hnsw.efSearch = 64
            self._index.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))
        return self._index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances (L2, not squared) and row ids of the k nearest entries per query."""
        k = min(k, self.size)
        squared, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(squared, 0.0)), ids

    def layer_reliability(self, num_classes: int) -> np.ndarray:
        """[L] how far above chance each layer is on the database: balanced accuracy
        rescaled so chance is 0 and perfect is 1 (clipped at 0). A layer that answers one
        class for every input is "correct" for that class's examples, yet worthless."""
        correct = self.layer_probs > 0
        recalls = [correct[self.labels == c].mean(0) for c in np.unique(self.labels)]
        balanced = np.mean(recalls, axis=0)
        chance = 1.0 / num_classes
        return np.clip((balanced - chance) / (1 - chance), 0.0, 1.0)

    def layer_coverage(self) -> tuple[np.ndarray, np.ndarray, float]:
        """([L] fraction of examples each layer answers correctly, [L] mean probability of
        the correct class where it does (nan where no example), fraction of examples no
        layer answers correctly)."""
        correct = self.layer_probs > 0
        means = np.array(
            [
                float(probs[hit].mean()) if hit.any() else float("nan")
                for probs, hit in zip(self.layer_probs.T, correct.T, strict=True)
            ]
        )
        never = float((self.layer_probs.max(1) == 0).mean())
        return correct.mean(0), means, never

    def save(self, path: Path) -> Path:
        import faiss

        meta = {"format_version": FORMAT_VERSION, "size": self.size, **self.meta}
        with atomic_dir(Path(path)) as tmp:
            save_file(
                {
                    "embeddings": self.embeddings,
                    "layer_probs": self.layer_probs,
                    "labels": self.labels,
                },
                str(tmp / "database.safetensors"),
            )
            faiss.write_index(self.index, str(tmp / "index.faiss"))
            (tmp / "database.json").write_text(json.dumps(meta, indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: Path, fingerprint: str | None = None) -> ExitDatabase:
        """Load a saved database; with `fingerprint`, refuse one built for another model."""
        import faiss

        path = Path(path)
        if not (path / "database.json").exists():
            raise EarlyExitError(
                f"no RAEE database at {path}; build one with `earlyexit raee build`"
            )
        try:
            meta = json.loads((path / "database.json").read_text())
            arrays = load_file(str(path / "database.safetensors"))
            index = faiss.read_index(str(path / "index.faiss"))
        except Exception as err:  # json, safetensors and faiss raise several error types
            raise EarlyExitError(
                f"{path} holds a damaged RAEE database ({err}); build it again"
            ) from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise EarlyExitError(
                f"{path} is RAEE database format {meta.get('format_version')}, this version "
                f"reads {FORMAT_VERSION}; build it again"
            )
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise EarlyExitError(
                f"RAEE database at {path} was built for model '{meta.get('model')}'; "
                "build one for this model with `earlyexit raee build`"
            )
        meta.pop("format_version")
        meta.pop("size")
        return cls(
            arrays["embeddings"], arrays["layer_probs"], arrays["labels"], meta, _index=index
        )


def build_database(
    embeddings: np.ndarray, traces: torch.Tensor, labels: list[int], meta: dict[str, Any]
) -> ExitDatabase:
    """From the examples' embeddings, their per-layer readout traces [N, L, C] and gold labels."""
    gold = torch.tensor(labels, dtype=torch.long)
    probs = exit_information(traces, gold)
    return ExitDatabase(
        np.ascontiguousarray(embeddings, dtype=np.float32),
        probs.numpy().astype(np.float32),
        gold.numpy(),
        dict(meta),
    )
