"""How far a row's logits in a running batch (engine/row_cache.py) are from the same row
decoded alone: the bound tests/test_scheduler.py compares tokens with.

For each weights kind, prompts of different lengths are prefilled alone and joined into one
running batch; greedy steps run over the batch (ragged: one row gets drafts) and, row by row,
over the same tokens alone. Prints the largest |logit difference| and the smallest top-2
gap at which the argmax differed.

    .venv/bin/python scripts/experiments/batch_rounding.py [--steps 24]
"""

from __future__ import annotations

import argparse

import torch

from earlyexit.engine import LayerEngine
from earlyexit.engine.kernels import cpu_model
from earlyexit.models import load_model

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea and the wind that blows over it at night.",
    "Summarize: Tom met Ann at the park. They played chess and Tom won twice.",
    "List three colours:",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "The best way to learn a language is",
    "Water boils at",
]


def measure(engine: LayerEngine, steps: int) -> tuple[float, int, float]:
    total = engine.num_layers
    singles, batch = [], engine.new_row_cache(len(PROMPTS))
    last = []
    for prompt in PROMPTS:
        ids, _ = engine.encode([prompt])
        state = engine.prefill(ids, capacity=ids.shape[1] + steps + 2)
        singles.append(state.cache)
        batch.add(state.cache)
        last.append(int(engine.logits(state.hidden[:, -1]).argmax()))
    worst, flips, gap_at_flip = 0.0, 0, float("inf")
    with torch.inference_mode():
        for _ in range(steps):
            inputs = torch.tensor(last).unsqueeze(1)
            batched = engine.logits(engine.run_rows(engine.embed(inputs), batch, 0, total))[:, 0]
            for row, cache in enumerate(singles):
                alone = engine.logits(
                    engine.run_layers(engine.embed(inputs[row : row + 1]), cache, 0, total)
                )[0, 0]
                worst = max(worst, float((alone - batched[row]).abs().max()))
                top = alone.topk(2).values
                if int(alone.argmax()) != int(batched[row].argmax()):
                    flips += 1
                    gap_at_flip = min(gap_at_flip, float(top[0] - top[1]))
                last[row] = int(alone.argmax())  # both follow the solo run's tokens
    return worst, flips, gap_at_flip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}, threads {torch.get_num_threads()}, batch {len(PROMPTS)}")
    for model, dtype in (
        ("smollm2-135m", "float32"),
        ("smollm2-135m", "int4"),
        ("gemma3-270m", "float32"),
    ):
        engine = LayerEngine(load_model(model, dtype=dtype))
        engine.set_compiled("off")
        worst, flips, gap = measure(engine, args.steps)
        print(
            f"{model} {dtype}: max |logit diff| {worst:.2e}, argmax flips {flips} "
            f"of {args.steps * len(PROMPTS)} (smallest gap at a flip {gap:.3g})"
        )


if __name__ == "__main__":
    main()
