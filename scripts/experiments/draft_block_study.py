"""How often a shallow exit agrees with the full model, per exit layer E, with and without a
trained draft block (readouts/draft_block.py), and what the block costs to train.

Data: the model's own answers to held-out instruction prompts (the same self-distillation
text as `earlyexit heads train --self-distill 800 --max-new-tokens 64`, cached under
EARLYEXIT_HOME after the first run); the last tenth of the prompts is held out. Per E:
top-1 agreement with the final layer (full vocabulary) on held-out tokens for the logit
lens, the affine readout (ridge fit on the same states) and the draft block.

    .venv/bin/python scripts/experiments/draft_block_study.py --layers 8,12,16,20,24 \
        --train-rows 192 --steps 300 --out runs/draft_block_study.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from earlyexit.engine import LayerEngine
from earlyexit.engine.kernels import cpu_model
from earlyexit.models import load_model
from earlyexit.readouts.draft_block import BlockConfig, heldout_agreement, layer_states, train_block
from earlyexit.readouts.readout import ExitReadout, LayerAdapter
from earlyexit.readouts.self_distill import self_distill_chunks
from earlyexit.readouts.train import fit_ridge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", default="8,12,16,20,24")
    parser.add_argument("--prompts", type=int, default=800)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--train-rows", type=int, default=192, help="256-token training rows")
    parser.add_argument("--heldout-rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("runs/draft_block_study.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [int(x) for x in args.layers.split(",")]
    engine = LayerEngine(load_model(args.model))
    train, held = self_distill_chunks(engine, args.prompts, args.max_new_tokens, 256)
    train, held = train[: args.train_rows], held[: args.heldout_rows]
    began = time.perf_counter()
    train_states, train_final = layer_states(engine, train, layers)
    held_states, held_final = layer_states(engine, held, layers)
    collect_seconds = time.perf_counter() - began
    rows = []
    for layer in layers:
        adapter = LayerAdapter(engine.hidden_size)
        flat = train_states[layer].reshape(-1, engine.hidden_size)
        fit_ridge(adapter, flat, train_final.reshape(-1, engine.hidden_size), 1e-2)
        readout = ExitReadout(engine, {layer: adapter})
        affine = heldout_agreement(
            None,
            torch.stack([readout.translate(h, layer) for h in held_states[layer]]),
            held_final,
            engine,
        )
        lens = heldout_agreement(None, held_states[layer], held_final, engine)
        result = train_block(
            engine,
            layer,
            train_states[layer],
            train_final,
            (held_states[layer], held_final),
            BlockConfig(steps=args.steps),
        )
        row = {
            "layer": layer,
            "lens_top1": round(lens, 4),
            "affine_top1": round(affine, 4),
            "block_top1": round(result.heldout_top1, 4),
            "train_seconds": round(result.seconds, 1),
            "final_kl": round(sum(result.losses[-20:]) / 20, 4),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "model": args.model,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "train_tokens": int(train.numel()),
        "heldout_tokens": int(held.numel()),
        "steps": args.steps,
        "collect_seconds": round(collect_seconds, 1),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
