"""Self-distillation text for the shallow-layer study (BENCHMARKS.md, "Choice of k and of
the readout"): the model's own greedy answers (64 tokens) to 800 held-out instructions, as
256-token rows of prompt + answer; the first 80 prompts' rows are held out.

    python scripts/experiments/self_distill_text.py [--out DIR] [--model NAME]

Writes DIR/sd_held.pt and DIR/sd_train.pt for shallow_layer_study.py (default DIR:
runs/shallow-layer-study in the checkout) and prints their shapes and the seconds taken.
The text is the one `earlyexit heads train --self-distill 800 --max-new-tokens 64` trains
on, and shares its cache under EARLYEXIT_HOME: generated once (minutes on 2 cores), then read.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from earlyexit.engine import LayerEngine
from earlyexit.models import load_model
from earlyexit.readouts.self_distill import cached_self_generated_chunks
from earlyexit.tasks.generation import render_prompt, self_distill_instructions

OUT = Path(__file__).resolve().parents[2] / "runs" / "shallow-layer-study"
PROMPTS, HELD, NEW_TOKENS, SEQ_LEN = 800, 80, 64, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT})")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = LayerEngine(load_model(args.model))
    prompts = [render_prompt(engine.tokenizer, t) for t in self_distill_instructions(PROMPTS)]
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    for name, part in (("held", prompts[:HELD]), ("train", prompts[HELD:])):
        chunks = cached_self_generated_chunks(engine, part, NEW_TOKENS, SEQ_LEN)
        torch.save(chunks, args.out / f"sd_{name}.pt")
        print(name, tuple(chunks.shape), round(time.time() - began, 1), flush=True)


if __name__ == "__main__":
    main()
