"""The shallow-layer study (BENCHMARKS.md, "Choice of k and of the readout"): which exit
layer k and which readout for generation on smollm2-135m.

Trains affine readouts at k = 8, 12, 16, 20, 24 on the self-distillation text (least
squares, then 300 KL steps) and an "exit block" at k = 12, 20 (the affine map plus a gated,
zero-initialised copy of the last layer's norm and MLP; 400 steps). Then, teacher-forced on
the model's own answers to the first 40 held-out instructions, per readout: top-1 agreement
with the final layer (`agree`), the largest share of tokens that can exit at precision 0.9 /
0.95 (`f@p90`, `f@p95`), and the share (`f@T`) and precision (`p@T`) of tokens whose
confidence gap is at least T.

    python scripts/experiments/self_distill_text.py     # the text, into DIR first
    python scripts/experiments/shallow_layer_study.py [--out DIR]    # ~12 min on 2 cores

Reads DIR/sd_train.pt, prints one JSON row per readout and writes DIR/ksel.json and the
trained weights DIR/ksel_weights.pt (default DIR: runs/shallow-layer-study in the checkout).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from earlyexit.engine import LayerEngine
from earlyexit.models import load_model
from earlyexit.readouts.readout import LayerAdapter
from earlyexit.readouts.train import HiddenStates, TrainConfig, collect_hidden, distill, fit_ridge
from earlyexit.tasks.generation import render_prompt, self_distill_instructions

OUT = Path(__file__).resolve().parents[2] / "runs" / "shallow-layer-study"
AFFINE_LAYERS = [8, 12, 16, 20, 24]
BLOCK_LAYERS = [12, 20]


class Block(nn.Module):
    """Affine readout + a gated, zero-initialised copy of a layer's norm and MLP."""

    def __init__(self, affine: nn.Module, layer: nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.affine = copy.deepcopy(affine)
        self.norm = copy.deepcopy(layer.post_attention_layernorm)
        self.mlp = copy.deepcopy(layer.mlp)
        self.gate = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.affine(h)
        return y + self.gate * self.mlp(self.norm(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"folder with sd_train.pt, for results ({OUT})"
    )
    args = parser.parse_args()
    if not (args.out / "sd_train.pt").exists():
        sys.exit(
            f"no {args.out / 'sd_train.pt'}: run "
            f"scripts/experiments/self_distill_text.py --out {args.out} first"
        )
    torch.set_num_threads(2)
    torch.manual_seed(0)
    e = LayerEngine(load_model("smollm2-135m"))
    num_layers = e.num_layers
    chunks = torch.load(args.out / "sd_train.pt")
    print("chunks", chunks.shape, flush=True)
    states = collect_hidden(e, chunks, AFFINE_LAYERS)
    cfg = TrainConfig(steps=300, layers=AFFINE_LAYERS)
    aff = {k: LayerAdapter(e.hidden_size) for k in AFFINE_LAYERS}
    for k, a in aff.items():
        fit_ridge(a, states.by_layer[k], states.final, cfg.ridge)
    t = time.time()
    vocab = distill(e, aff, states, cfg)
    print("affine distill", time.time() - t, flush=True)

    last = e.arch.layers[num_layers - 1]
    blocks = {k: Block(aff[k], last, e.hidden_size).requires_grad_(True) for k in BLOCK_LAYERS}
    bcfg = TrainConfig(steps=400, layers=BLOCK_LAYERS, lr=3e-4)
    t = time.time()
    block_states = HiddenStates({k: states.by_layer[k] for k in BLOCK_LAYERS}, states.final)
    distill(e, blocks, block_states, bcfg)
    print("block distill", time.time() - t, flush=True)
    del states, block_states

    # held-out: answers of the first 40 held-out prompts, teacher forced
    ps = [render_prompt(e.tokenizer, x) for x in self_distill_instructions(800)[:40]]
    eos = e.tokenizer.eos_token_id
    ids_all = []
    for i in range(0, 40, 8):
        ids, pad = e.encode(ps[i : i + 8])
        ans = e.greedy(ids, 48, pad)
        for r in range(ids.shape[0]):
            a = ans[r].tolist()
            if eos in a:
                a = a[: a.index(eos) + 1]
            ids_all.append((ids[r, int(pad[r]) :].tolist(), a))
    restricted = torch.tensor(sorted(set(vocab.tolist()) | {eos}))
    variants = {f"affine@{k}": (k, aff[k]) for k in AFFINE_LAYERS}
    variants |= {f"block@{k}": (k, blocks[k]) for k in BLOCK_LAYERS}
    res: dict[str, tuple[list, list]] = {v: ([], []) for v in variants}
    with torch.inference_mode():
        for p, a in ids_all:
            seq = torch.tensor([p + a])
            st = e.prefill(seq, keep_layers=True)
            sl = slice(len(p) - 1, len(p) + len(a) - 1)
            target = e.logits(st.hidden[0, sl]).argmax(-1)
            for v, (k, ad) in variants.items():
                h = st.layer_hidden[k - 1][0, sl]
                lg = e.logits(ad(h), restricted).float().softmax(-1)
                top = lg.topk(2, -1)
                res[v][0].append(top.values[:, 0] - top.values[:, 1])
                res[v][1].append(restricted[top.indices[:, 0]] == target)
    out = {}
    for v, (gaps, hits) in res.items():
        c = torch.cat(gaps)
        g = torch.cat(hits).float()
        k = variants[v][0]
        order = c.argsort(descending=True)
        prec = g[order].cumsum(0) / torch.arange(1, len(g) + 1)
        f90 = float((prec >= 0.9).nonzero().max() + 1) / len(g) if (prec >= 0.9).any() else 0.0
        f95 = float((prec >= 0.95).nonzero().max() + 1) / len(g) if (prec >= 0.95).any() else 0.0
        row = {"agree": float(g.mean()), "f@p90": f90, "f@p95": f95}
        for th in (0.3, 0.5, 0.7, 0.9):
            m = c >= th
            row[f"f@{th}"] = float(m.float().mean())
            row[f"p@{th}"] = float(g[m].mean()) if m.any() else 1.0
        # the study's rough cost model (in layer units), unchanged
        row["pred_speedup@p90"] = 38 / (38.6 - (num_layers - k) * f90)
        out[v] = row
        print(v, json.dumps({a: round(b, 3) for a, b in row.items()}), flush=True)
    print("tokens", len(g))
    (args.out / "ksel.json").write_text(json.dumps(out, indent=1))
    torch.save(
        {
            "aff": {k: a.state_dict() for k, a in aff.items()},
            "blocks": {k: b.state_dict() for k, b in blocks.items()},
            "vocab": vocab,
        },
        args.out / "ksel_weights.pt",
    )
    print("wrote", args.out / "ksel.json", flush=True)


if __name__ == "__main__":
    main()
