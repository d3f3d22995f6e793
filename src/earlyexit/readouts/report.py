"""Per-layer readout report: held-out KL / top-1 agreement with the final layer, and cost."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from rich.table import Table

from earlyexit.corpora import load_corpus, token_chunks
from earlyexit.engine.engine import LayerEngine
from earlyexit.readouts.readout import ExitReadout
from earlyexit.readouts.train import collect_hidden, evaluate


def readout_report(
    engine: LayerEngine,
    readout: ExitReadout,
    corpus: str = "wikitext-2-test",
    tokens: int = 4096,
    seq_len: int = 256,
    cost_iters: int = 100,
) -> dict[str, Any]:
    from earlyexit.bench.engine_bench import layer_costs

    layers = list(range(1, engine.num_layers))
    chunks = token_chunks(engine.tokenizer, load_corpus(corpus), seq_len, tokens)
    states = collect_hidden(engine, chunks, layers, desc="held-out hidden states")
    metrics = evaluate(engine, readout, states)
    mid = layers[len(layers) // 2]
    return {
        "model": engine.loaded.name,
        "readout": "trained adapters" if readout.trained_layers else "logit lens",
        "trained_layers": readout.trained_layers,
        "heldout": {"corpus": corpus, "tokens": int(chunks.numel())},
        "layers": [asdict(m) for m in metrics],
        "cost": layer_costs(engine, cost_iters, readout=readout, layer=mid),
    }


def render_report(report: dict[str, Any]) -> list[Table]:
    table = Table(
        title=f"{report['model']} readouts ({report['readout']}) on "
        f"{report['heldout']['tokens']} held-out tokens of {report['heldout']['corpus']}"
    )
    for col in ("layer", "KL to final", "top-1 agree", "lens KL", "lens top-1"):
        table.add_column(col, justify="right")
    for m in report["layers"]:
        table.add_row(
            str(m["layer"]),
            f"{m['kl']:.3f}",
            f"{m['top1']:.3f}",
            f"{m['lens_kl']:.3f}",
            f"{m['lens_top1']:.3f}",
        )
    if "cost" not in report:
        return [table]
    cost = report["cost"]
    costs = Table(title=f"readout cost at layer {cost['readout_layer']}, batch 1 (x one layer)")
    for col in (
        "one layer (ms)",
        "full vocabulary",
        *(f"{k} candidates" for k in cost["ms_candidate_readout"]),
    ):
        costs.add_column(col, justify="right")
    cells = [
        f"{cost['ms_per_layer']:.3f}",
        f"{cost['ms_full_readout']:.3f} ({cost['full_readout_over_layer']:.2f}x)",
    ]
    cells += [
        f"{cost['ms_candidate_readout'][k]:.3f} ({cost['candidate_readout_over_layer'][k]:.2f}x)"
        for k in cost["ms_candidate_readout"]
    ]
    costs.add_row(*cells)
    return [table, costs]
