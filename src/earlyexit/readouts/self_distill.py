"""Self-distillation data for a shallow exit: text the model generates itself.

A readout trained on WikiText learns what the final layer says about encyclopedia prose;
a shallow exit for generation has to predict what the final layer says while *answering
instructions*. So the model answers held-out instruction prompts (greedy, full depth), and
the prompt + answer token streams become the training chunks: the targets are then the
final layer's distributions on exactly the kind of text it will decode.
"""

from __future__ import annotations

import hashlib
import json

import torch
from tqdm.auto import tqdm

from earlyexit.engine.engine import LayerEngine
from earlyexit.paths import atomic_file, home


@torch.inference_mode()
def self_generated_chunks(
    engine: LayerEngine,
    prompts: list[str],
    max_new_tokens: int,
    seq_len: int,
    batch: int = 8,
) -> torch.Tensor:
    """[n, seq_len] token rows cut from prompt + greedy answer (to its EOS) documents."""
    eos = engine.tokenizer.eos_token_id
    stream: list[int] = []
    for start in tqdm(range(0, len(prompts), batch), desc="self-generating", leave=False):
        ids, pad = engine.encode(prompts[start : start + batch])
        answers = engine.greedy(ids, max_new_tokens, pad)
        for row in range(ids.shape[0]):
            answer = answers[row].tolist()
            if eos in answer:
                answer = answer[: answer.index(eos) + 1]
            stream += ids[row, int(pad[row]) :].tolist() + answer
    rows = len(stream) // seq_len
    return torch.tensor(stream[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def cached_self_generated_chunks(
    engine: LayerEngine, prompts: list[str], max_new_tokens: int, seq_len: int
) -> torch.Tensor:
    """`self_generated_chunks`, kept on disk: generating is most of a shallow exit's
    training time (minutes on 2 cores), and the text depends only on these arguments."""
    key = json.dumps([engine.fingerprint, prompts, max_new_tokens, seq_len])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = home() / "self-distill" / engine.loaded.name / f"{digest}.pt"
    if path.exists():
        try:
            return torch.load(path)
        except Exception:  # a damaged cache file is regenerated, not fatal  # noqa: BLE001
            pass
    chunks = self_generated_chunks(engine, prompts, max_new_tokens, seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        torch.save(chunks, tmp)
    return chunks


def self_distill_chunks(
    engine: LayerEngine, instructions: int, max_new_tokens: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) chunks of the model's own answers to `instructions` held-out
    instruction prompts (SAMSum val, IWSLT tst2016, XSum/SQuAD tails), chat template
    applied; a tenth of the prompts is held out for the report. Both cached on disk."""
    from earlyexit.tasks.generation import render_prompt, self_distill_instructions

    prompts = [
        render_prompt(engine.tokenizer, text) for text in self_distill_instructions(instructions)
    ]
    split = max(1, len(prompts) // 10)
    chunks = cached_self_generated_chunks(engine, prompts[split:], max_new_tokens, seq_len)
    heldout = cached_self_generated_chunks(engine, prompts[:split], max_new_tokens, seq_len)
    return chunks, heldout
