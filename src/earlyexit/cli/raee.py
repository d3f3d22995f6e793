"""`earlyexit raee build|inspect`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from earlyexit.cli.app import MODEL_OPT, READOUT_OPT, console, friendly, load_engine, raee_app


@raee_app.command("build")
@friendly
def raee_build(
    model: str = MODEL_OPT,
    task: str = typer.Option(
        "sst2", "--task", "-t", help="Built-in task whose train split to use."
    ),
    examples: int = typer.Option(200, min=10, help="Labelled train-split examples to store."),
    shots: int = typer.Option(4, min=0, help="Demonstrations in the prompts (as in eval)."),
    seed: int = typer.Option(0, help="Seed for demonstrations and the examples drawn."),
    readout: str = READOUT_OPT,
    embedder: str = typer.Option("minilm-l6", help="minilm-l6 or backbone:K."),
    out: Path | None = typer.Option(None, help="Directory (default: under EARLYEXIT_HOME)."),
) -> None:
    """Build a RAEE exit database (and its task probe) from a labelled split; atomic write."""
    from earlyexit.paths import home
    from earlyexit.runtime.calibration import EvalConfig, MethodBuilder, base_readout, calibrate
    from earlyexit.tasks.builtin import get_task

    task_obj = get_task(task)
    config = EvalConfig(
        shots=shots, seed=seed, calibration=examples, readout=readout, embedder=embedder
    )
    engine = load_engine(model)
    general = base_readout(engine, readout)
    demos = task_obj.demonstrations(shots, seed)
    candidates = task_obj.label_token_ids(engine.tokenizer)
    exit_readout, cal = calibrate(engine, general, task_obj, demos, candidates, config)
    database = MethodBuilder(engine, general, task_obj, config, cal).database()
    path = out or home() / "raee" / engine.loaded.name / task_obj.name
    database.save(path)
    if readout == "probe":
        exit_readout.save(path / "probe")
    console.print(f"saved {database.size} examples to {path}")


@raee_app.command("inspect")
@friendly
def raee_inspect(
    path: Path = typer.Argument(..., help="A database directory from `raee build`."),
) -> None:
    """What a RAEE database holds: its provenance and, per layer, coverage and reliability."""
    from earlyexit.retrieval.database import ExitDatabase

    database = ExitDatabase.load(path)
    for key, value in database.meta.items():
        if key != "fingerprint":
            console.print(f"{key}: {value}")
    console.print(f"examples: {database.size}, layers: {database.num_layers}")
    reliability = database.layer_reliability(int(database.labels.max()) + 1)
    coverage, mean_correct, never = database.layer_coverage()
    table = Table("layer", "correct here", "mean prob (correct)", "reliability")
    for layer in range(database.num_layers):
        table.add_row(
            str(layer + 1),
            f"{coverage[layer]:.2f}",
            f"{mean_correct[layer]:.2f}",
            f"{reliability[layer]:.2f}",
        )
    console.print(table)
    console.print(f"examples no layer answers correctly: {never:.1%}")
