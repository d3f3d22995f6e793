"""llama.cpp on the same GGUF and prompts: the CPU speed anchor of `bench engine`, and the
`llama.cpp` peer of `bench generate` (runtime/peers.py).

Optional: `llama-cpp-python` is built from source (see README, "llama.cpp anchor"). When it
is missing, or the model has no GGUF, the bench says so in one line and goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from earlyexit.errors import EarlyExitError

INSTALL = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON '
    '-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" '
    "pip install llama-cpp-python==0.3.36"
)


def model_gguf(model: str) -> Path | None:
    """The GGUF llama.cpp runs for `model`: a registry model's source file, or the user's."""
    from earlyexit.models.fetch import gguf_file
    from earlyexit.models.registry import REGISTRY

    if model in REGISTRY and REGISTRY[model].gguf_parts:
        return gguf_file(REGISTRY[model])
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if found else None


def unavailable(model: str) -> str | None:
    """Why llama.cpp cannot be measured here, or None when it can."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return f"llama.cpp: not installed (optional; build it with: {INSTALL})"
    if model_gguf(model) is None:
        return f"llama.cpp: {model} has no GGUF file to run"
    return None


def open_llama(model: str, threads: int) -> Any:
    """llama.cpp's `Llama` on the model's GGUF, or a one-line error saying why not."""
    why = unavailable(model)
    if why is not None:
        raise EarlyExitError(why)
    from llama_cpp import Llama

    return Llama(
        model_path=str(model_gguf(model)),
        n_ctx=0,  # the model's own context length, as the engine allows
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def greedy_tokens(llm: Any, prompt: list[int]) -> Iterator[int]:
    """llama.cpp's greedy continuation of `prompt` token by token (its KV reset first)."""
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        yield int(token)


def llama_cpp_decoder(
    model: str, prompt_ids: torch.Tensor, threads: int
) -> Callable[[int], torch.Tensor]:
    """f(n): greedy-decode exactly n tokens after `prompt_ids` [1, T] with llama.cpp (the
    same token ids as the engine's, the KV cache reset every call), returning [1, n] ids."""
    if prompt_ids.shape[0] != 1:
        raise ValueError("llama.cpp is measured at batch 1")
    llm = open_llama(model, threads)
    prompt = prompt_ids[0].tolist()

    def run(n: int) -> torch.Tensor:
        out: list[int] = []
        for token in greedy_tokens(llm, prompt):
            out.append(token)
            if len(out) == n:
                break
        return torch.tensor([out])

    return run
