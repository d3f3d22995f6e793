"""`earlyexit heads train|train-block|report`."""

from __future__ import annotations

from pathlib import Path

import typer

from earlyexit.cli.app import MODEL_OPT, console, friendly, heads_app, load_engine, parse_list
from earlyexit.errors import EarlyExitError


@heads_app.command("train")
@friendly
def heads_train(
    model: str = MODEL_OPT,
    corpus: str = typer.Option("wikitext-2-valid", help="Training text: a built-in name or .txt."),
    tokens: int = typer.Option(32768, min=256, help="Training tokens (hidden states kept in RAM)."),
    steps: int = typer.Option(
        400, min=0, help="KL distillation steps after the least-squares fit."
    ),
    rank: int | None = typer.Option(None, min=1, help="Low-rank adapters (default: full affine)."),
    layers: str | None = typer.Option(None, help="Comma-separated layers (default: 1..L-1)."),
    heldout_tokens: int = typer.Option(4096, min=128, help="Held-out tokens for the metrics."),
    name: str | None = typer.Option(
        None, help="Saved under this name (default: `default`, or `shallow-K` with --shallow)."
    ),
    shallow: int | None = typer.Option(
        None, min=1, help="Train only the shallow exit at layer K (for generation)."
    ),
    self_distill: int = typer.Option(
        0,
        min=0,
        help="Train on the model's own answers to this many held-out instruction prompts "
        "(SAMSum val, IWSLT tst2016, XSum/SQuAD tails) instead of --corpus.",
    ),
    max_new_tokens: int = typer.Option(48, min=1, help="With --self-distill: answer length."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the report JSON here."),
) -> None:
    """Train per-layer exit readouts by distillation from the final layer, and save them."""
    from earlyexit.readouts.report import render_report
    from earlyexit.readouts.store import readout_dir, save_readout
    from earlyexit.readouts.train import TrainConfig, train_readout
    from earlyexit.reporting import write_json

    layer_list = parse_list(layers, "--layers", int) if layers else None
    engine = load_engine(model)
    if shallow is not None:
        layer_list = [shallow]
        name = name or f"shallow-{shallow}"
    name = name or "default"
    if layer_list and not all(1 <= layer < engine.num_layers for layer in layer_list):
        raise EarlyExitError(f"--layers must lie in 1..{engine.num_layers - 1}")
    config = TrainConfig(
        corpus=corpus,
        tokens=tokens,
        steps=steps,
        rank=rank,
        layers=layer_list,
        heldout_tokens=heldout_tokens,
    )
    chunks = heldout = None
    if self_distill:
        from earlyexit.readouts.self_distill import self_distill_chunks

        chunks, heldout = self_distill_chunks(engine, self_distill, max_new_tokens, config.seq_len)
        config.corpus = config.heldout_corpus = f"self-generated ({self_distill} prompts)"
    result = train_readout(engine, config, chunks, heldout)
    path = save_readout(result.readout, readout_dir(engine, name), result.metadata())
    console.print(f"trained in {result.seconds:.0f} s; saved {path}")
    report = {
        "model": engine.loaded.name,
        "readout": "trained adapters",
        "heldout": {"corpus": config.heldout_corpus, "tokens": config.heldout_tokens},
        "layers": result.metadata()["heldout"],
    }
    console.print(render_report(report)[0])
    if json_path:
        write_json({**report, "train": result.metadata()}, json_path)


@heads_app.command("train-block")
@friendly
def heads_train_block(
    model: str = MODEL_OPT,
    layer: int = typer.Option(..., min=1, help="The exit layer E the block reads."),
    self_distill: int = typer.Option(
        800, min=10, help="Train on the model's own answers to this many held-out prompts."
    ),
    max_new_tokens: int = typer.Option(64, min=1, help="Answer length of that text."),
    rows: int = typer.Option(192, min=1, help="256-token training rows (states kept in RAM)."),
    steps: int = typer.Option(250, min=1, help="Distillation steps (4 rows each)."),
) -> None:
    """Train a draft block on top of layer E (for `lossless:adapter`), and save it."""
    from earlyexit.readouts.draft_block import (
        BlockConfig,
        block_dir,
        save_block,
        train_block_on_text,
    )
    from earlyexit.readouts.self_distill import self_distill_chunks

    engine = load_engine(model)
    if not 1 <= layer < engine.num_layers:
        raise EarlyExitError(f"--layer must lie in 1..{engine.num_layers - 1}")
    chunks, heldout = self_distill_chunks(engine, self_distill, max_new_tokens, 256)
    result = train_block_on_text(
        engine, layer, chunks[:rows], heldout[:32], BlockConfig(steps=steps)
    )
    path = save_block(result, block_dir(engine, layer))
    console.print(
        f"trained in {result.seconds:.0f} s; held-out top-1 agreement with the final layer "
        f"{result.heldout_top1:.1%}; saved {path}"
    )


@heads_app.command("report")
@friendly
def heads_report(
    model: str = MODEL_OPT,
    name: str = typer.Option("default", help="Which saved readout (falls back to the logit lens)."),
    tokens: int = typer.Option(4096, min=256, help="Held-out tokens (WikiText-2 test)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report JSON here."),
) -> None:
    """Per-layer KL and top-1 agreement with the final layer on held-out text, and cost."""
    from earlyexit.readouts.report import readout_report, render_report
    from earlyexit.readouts.store import default_readout
    from earlyexit.reporting import write_json

    engine = load_engine(model)
    report = readout_report(engine, default_readout(engine, name), tokens=tokens)
    for table in render_report(report):
        console.print(table)
    if json_path:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")
