"""What differs between model families: declared per family, the rest found on the model.

The engine only needs: the embedding, the decoder layers, the rotary embedding (one per
layer type for Gemma3), each layer's attention type (full or sliding window), the final
norm, the LM head and an optional logit soft-cap. Everything else runs inside the model's
own modules. CALM's state copying (`LayerEngine.copy_state_kv`) also computes keys and
values outside the attention: for that each family names its rotary function (from its
transformers modeling module, pinned with transformers) and the attention's parts.

A model whose `config.model_type` is not one of `FAMILIES` is refused up front, with one
line naming the supported families, rather than failing deep inside the engine.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen3 import modeling_qwen3

from earlyexit.errors import EarlyExitError

# (q, k, cos, sin) -> (q, k) rotated: the family's own `apply_rotary_pos_emb`
RotaryFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class Family:
    """One supported model family: its config model types and the pieces the engine uses
    outside the model's own forward (module attribute names on each decoder layer)."""

    name: str
    model_types: tuple[str, ...]
    apply_rotary: RotaryFn
    key_norm: str | None = None  # per-head RMS norm on the keys (Gemma3, Qwen3)
    attention: str = "self_attn"
    input_norm: str = "input_layernorm"
    key_proj: str = "k_proj"
    value_proj: str = "v_proj"
    fingerprint_weight: str = "mlp.down_proj"  # last layer's tensor in `model_fingerprint`


FAMILIES = (
    Family("llama", ("llama",), modeling_llama.apply_rotary_pos_emb),
    Family(
        "gemma3", ("gemma3_text", "gemma3"), modeling_gemma3.apply_rotary_pos_emb, key_norm="k_norm"
    ),
    Family("mistral", ("mistral",), modeling_mistral.apply_rotary_pos_emb),
    Family("qwen2", ("qwen2",), modeling_qwen2.apply_rotary_pos_emb),
    Family("qwen3", ("qwen3",), modeling_qwen3.apply_rotary_pos_emb, key_norm="k_norm"),
)
FAMILY_OF = {model_type: family for family in FAMILIES for model_type in family.model_types}
SUPPORTED = tuple(FAMILY_OF)


def family_of(config: Any) -> Family:
    """The family of a model config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILY_OF:
        names = ", ".join(family.name for family in FAMILIES)
        raise EarlyExitError(
            f"model type '{model_type}' is not supported: earlyexit runs the decoder-only "
            f"families {names}"
        )
    return FAMILY_OF[model_type]


@dataclass(frozen=True)
class KeyValueParts:
    """The modules of one decoder layer that turn its input into keys and values."""

    input_norm: nn.Module
    key_proj: nn.Module
    value_proj: nn.Module
    key_norm: nn.Module | None


@dataclass
class Architecture:
    family: Family
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
        family = family_of(config)
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
            raise EarlyExitError(
                f"model type '{config.model_type}' loaded as {type(model).__name__}, which has "
                "no model.layers and rotary embeddings: load it as a causal LM (text only)"
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
            family=family,
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

    @property
    def apply_rotary(self) -> RotaryFn:
        """The family's `apply_rotary_pos_emb(q, k, cos, sin)`."""
        return self.family.apply_rotary

    def key_value_parts(self, layer: int) -> KeyValueParts:
        block = self.layers[layer]
        attn = getattr(block, self.family.attention)
        key_norm = self.family.key_norm
        return KeyValueParts(
            input_norm=getattr(block, self.family.input_norm),
            key_proj=getattr(attn, self.family.key_proj),
            value_proj=getattr(attn, self.family.value_proj),
            key_norm=getattr(attn, key_norm) if key_norm else None,
        )

    def fingerprint_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The input embedding and one weight of the last layer: enough to tell models apart."""
        module = self.layers[-1].get_submodule(self.family.fingerprint_weight)
        # quantized layers (engine/quant.py) keep their source rows: the fp32 model's id
        weight = getattr(module, "source_rows", None)
        return self.embed.weight, module.weight if weight is None else weight
