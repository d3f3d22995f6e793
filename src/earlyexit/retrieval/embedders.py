"""Text embedders for RAEE's neighbour search: a sentence embedder or the backbone itself.

Both embed the bare input text (not the few-shot prompt, whose demonstrations are the same
for every input and would drown the signal), mean-pool over tokens and L2-normalise, so
L2 distances order neighbours like cosine similarity does.
"""

from __future__ import annotations

import numpy as np
import torch

from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError


def _mean_pool(hidden: torch.Tensor, keep: torch.Tensor) -> np.ndarray:
    keep = keep.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled.float(), dim=-1).numpy()


class SentenceEmbedder:
    """A sentence-transformers style encoder (default all-MiniLM-L6-v2), mean pooled."""

    def __init__(self, name: str = "minilm-l6", batch: int = 32, max_tokens: int = 256) -> None:
        from earlyexit.models.load import load_embedder

        self.name, self.batch, self.max_tokens = name, batch, max_tokens
        self.model, self.tokenizer = load_embedder(name)

    @property
    def spec(self) -> str:
        return self.name

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch):
            enc = self.tokenizer(
                texts[i : i + self.batch],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            )
            hidden = self.model(**enc).last_hidden_state
            out.append(_mean_pool(hidden, enc["attention_mask"]))
        return np.concatenate(out).astype(np.float32)


class BackboneEmbedder:
    """The served model's own first `layer` decoder layers, mean pooled: no second model to
    load, at the price of running those layers once more on the bare text."""

    def __init__(self, engine: LayerEngine, layer: int, batch: int = 16) -> None:
        if not 1 <= layer <= engine.num_layers:
            raise EarlyExitError(f"backbone embedding layer must lie in 1..{engine.num_layers}")
        self.engine, self.layer, self.batch = engine, layer, batch

    @property
    def spec(self) -> str:
        return f"backbone:{self.layer}"

    @torch.inference_mode()
    def embed(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch):
            ids, pad = self.engine.encode(texts[i : i + self.batch])
            cache = self.engine.new_cache(ids.shape[0], capacity=ids.shape[1], pad=pad)
            hidden = self.engine.run_layers(self.engine.embed(ids), cache, 0, self.layer)
            keep = torch.arange(ids.shape[1])[None] >= pad[:, None]
            out.append(_mean_pool(hidden, keep))
        return np.concatenate(out).astype(np.float32)


Embedder = SentenceEmbedder | BackboneEmbedder


def make_embedder(spec: str, engine: LayerEngine) -> Embedder:
    """`minilm-l6` (or another registry embedder) or `backbone:K`."""
    name, _, arg = spec.partition(":")
    if name == "backbone":
        try:
            return BackboneEmbedder(engine, int(arg) if arg else 4)
        except ValueError:
            raise EarlyExitError(f"bad embedder '{spec}': use backbone:K with a layer K") from None
    return SentenceEmbedder(spec)
