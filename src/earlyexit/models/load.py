"""Load a causal LM (registry name, local directory or hub id) with its tokenizer."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from earlyexit.errors import EarlyExitError
from earlyexit.models import fetch as fetching
from earlyexit.models.registry import REGISTRY, get_spec

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    name: str
    model: Any  # a transformers *ForCausalLM
    tokenizer: Any
    source: str  # the directory or hub id it was loaded from

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)


QUANTIZED = ("int4", "int8")  # fp32 model, linear weights in 4-bit groups (engine/quant.py)
AUTO = "auto"  # int4 where exact and measured faster on this machine, else float32


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The dtype the model is loaded in (int4/int8 load fp32, then quantize the weights)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in QUANTIZED or dtype == AUTO:
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise EarlyExitError(
            f"unknown dtype '{dtype}': use auto, float32, bfloat16, int8 or int4"
        ) from None


def resolve_source(name_or_path: str) -> tuple[str, str, str | None]:
    """Return (display name, source for from_pretrained, gguf file name or None)."""
    if name_or_path in REGISTRY:
        spec = get_spec(name_or_path)
        if spec.kind != "causal-lm":
            raise EarlyExitError(f"{name_or_path} is an embedder, not a causal LM")
        return spec.name, str(fetching.fetch(spec)), None
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return path.stem, str(path.parent), path.name
        if not path.is_dir() or not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
            if ggufs:
                return path.name, str(path), ggufs[0].name
            raise EarlyExitError(
                f"{path} is not a Hugging Face model directory (no config.json or .gguf file)"
            )
        return path.name, str(path), None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.endswith(".gguf"):
        raise EarlyExitError(f"model path {path} does not exist; check the path")
    if HUB_ID.match(name_or_path):
        return name_or_path.split("/")[-1], name_or_path, None
    get_spec(name_or_path)  # raises the "unknown model" error listing the choices
    raise AssertionError("unreachable")


def load_model(
    name_or_path: str, dtype: str | torch.dtype = "float32", kernels: str = "auto"
) -> LoadedModel:
    """`dtype`: float32, bfloat16, int4 / int8 (fp32 model, 4-bit-group weights), or auto
    (int4 where the weights are exact 4-bit groups and int4 was measured faster here than
    fp32 on the kernels `kernels` -- the engine's fp32 kernel choice -- would use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    name, source, gguf_file = resolve_source(name_or_path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": "sdpa"}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "check the path" if Path(source).exists() else "check the id and network access"
        raise EarlyExitError(f"could not load model '{name_or_path}': {first} ({hint})") from None
    model.eval()
    model.requires_grad_(False)
    if dtype == AUTO:
        from earlyexit.engine.quant import choose_weights

        weights, why = choose_weights(model, kernels=kernels)
    else:
        weights, why = str(dtype).removeprefix("torch."), "asked for"
    if weights in QUANTIZED:
        from earlyexit.engine.quant import quantize_model

        quantize_model(model, weights)
    model.config.earlyexit_weights = weights  # what the engine multiplies by, and why
    model.config.earlyexit_weights_reason = why
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, source=source)


def load_embedder(name: str = "minilm-l6") -> tuple[Any, Any]:
    """The sentence embedder (model, tokenizer); mean pooling is done by its user."""
    from transformers import AutoModel, AutoTokenizer

    spec = get_spec(name)
    if spec.kind != "embedder":
        raise EarlyExitError(f"{name} is a causal LM, not a sentence embedder")
    source = fetching.fetch(spec)
    model = AutoModel.from_pretrained(str(source)).eval()
    return model, AutoTokenizer.from_pretrained(str(source))
