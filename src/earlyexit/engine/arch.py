"""What differs between model families, found on the model itself.

The engine only needs: the embedding, the decoder layers, the rotary embedding (one per
layer type for Gemma3), each layer's attention type (full or sliding window), the final
norm, the LM head and an optional logit soft-cap. Everything else runs inside the model's
own modules.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from earlyexit.errors import EarlyExitError

SUPPORTED = ("llama", "gemma3_text", "gemma3", "mistral", "qwen2", "qwen3")


@dataclass
class Architecture:
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Linear
    rotary: nn.Module
    layer_types: list[str]
    sliding_window: int | None
    logit_softcap: float | None
    num_kv_heads: int
    head_dim: int
    rotary_takes_layer_type: bool

    @classmethod
    def of(cls, model: Any) -> Architecture:
        config = model.config
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise EarlyExitError(
                f"model type '{config.model_type}' is not supported (need a decoder-only model "
                f"with model.layers and rotary embeddings, e.g. {', '.join(SUPPORTED)})"
            )
        num_layers = config.num_hidden_layers
        layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
        if getattr(config, "use_bidirectional_attention", False):
            raise EarlyExitError("bidirectional-attention models are not supported")
        params = inspect.signature(base.rotary_emb.forward).parameters
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            embed=base.embed_tokens,
            layers=base.layers,
            norm=base.norm,
            head=model.lm_head,
            rotary=base.rotary_emb,
            layer_types=layer_types,
            sliding_window=getattr(config, "sliding_window", None),
            logit_softcap=getattr(config, "final_logit_softcapping", None),
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            rotary_takes_layer_type="layer_type" in params,
        )

    def position_embeddings(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary_takes_layer_type:
            return self.rotary(hidden, position_ids, layer_type)
        return self.rotary(hidden, position_ids)

    def window_of(self, layer_type: str) -> int | None:
        return self.sliding_window if layer_type == "sliding_attention" else None
