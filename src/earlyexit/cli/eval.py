"""`earlyexit eval`: early-exit classification, every method on the same prompts."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from earlyexit.cli.app import (
    DELTA_OPT,
    DTYPE_OPT,
    MODEL_OPT,
    READOUT_OPT,
    app,
    console,
    friendly,
    load_engine,
    parse_list,
    results_table,
)
from earlyexit.errors import EarlyExitError
from earlyexit.methods import EVAL, method_list

DEFAULT_METHODS = "full,confidence:0.9,adainfer,adainfer-crf,raee,raee-paper"
RAEE_PAPER_METHODS = "full,raee-paper:12"


@app.command("eval")
@friendly
def eval_command(
    model: str = MODEL_OPT,
    task: str = typer.Option("sst2", "--task", "-t", help="Comma-separated built-in task names."),
    method: str | None = typer.Option(
        None,
        "--method",
        help=f"Comma-separated: {method_list(EVAL)}. Default: {DEFAULT_METHODS} "
        f"({RAEE_PAPER_METHODS} with --protocol raee-paper).",
    ),
    protocol: str | None = typer.Option(
        None,
        help="raee-paper: RAEE's published setting: zero-shot prompts, the model's own head "
        "over the label words at every layer (--readout lens), the database over the whole "
        "training split, k = 12 (overrides --shots, --readout and --calibration).",
    ),
    shots: int = typer.Option(4, min=0, help="In-context demonstrations (class-balanced)."),
    limit: int | None = typer.Option(200, min=1, help="Test examples per task."),
    sample: str = typer.Option(
        "seeded",
        help="Which test examples: seeded (a random sample drawn with --seed; files sorted "
        "by label or subject make a first-N prefix unfair) or first (the first N in file "
        "order, as the harness's --limit).",
    ),
    batch: int = typer.Option(8, min=1, help="Batch size (the same for every method)."),
    seed: int = typer.Option(
        0, help="Seed for the test sample, demonstrations and calibration examples."
    ),
    calibration: int = typer.Option(
        200,
        min=10,
        help="Train-split prompts for probes, stoppers and the RAEE database "
        "(--protocol raee-paper: all of them).",
    ),
    readout: str = READOUT_OPT,
    embedder: str = typer.Option("minilm-l6", help="RAEE's embedder: minilm-l6 or backbone:K."),
    data: Path | None = typer.Option(
        None, help="Your own CSV/TSV/JSONL dataset instead of --task (needs --labels)."
    ),
    text_column: str = typer.Option("text", help="With --data: the input text column."),
    label_column: str = typer.Option("label", help="With --data: the label column."),
    labels: str | None = typer.Option(
        None, help="With --data: label=word pairs ('0=negative,1=positive') or a YAML/JSON file."
    ),
    template: str | None = typer.Option(
        None,
        help="With --data: the prompt around each text, e.g. 'Review: {text}\nSentiment:' "
        "(default 'Input: {text}\nLabel:'); '\n' is a newline.",
    ),
    risk: float | None = typer.Option(
        None,
        help="Learn-then-Test: `confidence`, `static-cal` and `adainfer*` without an argument "
        "and `raee*` without a slack take the most aggressive setting whose disagreement with "
        "the full model is at most RISK (with probability 1 - DELTA over the calibration "
        "draw).",
    ),
    delta: float = DELTA_OPT,
    stopper: Path | None = typer.Option(
        None, help="adainfer-saved: a stopper file from `eval --save DIR` on another task."
    ),
    dtype: str = DTYPE_OPT,
    sweep: bool = typer.Option(False, help="Also replay threshold/tolerance/k sweeps."),
    plots: Path | None = typer.Option(None, help="Write one sweep PNG per task into this dir."),
    save: Path | None = typer.Option(
        None, help="Save the fitted probes, stoppers and RAEE databases under DIR/<task>/."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the records JSON here."),
    markdown: Path | None = typer.Option(None, help="Also write a markdown table here."),
) -> None:
    """Early-exit classification: quality, layers saved and wall-clock speedup vs full."""
    from earlyexit.evaluation.runner import evaluate_task
    from earlyexit.evaluation.sweeps import sweep_task
    from earlyexit.reporting import write_json
    from earlyexit.runtime.calibration import EvalConfig, base_readout, check_methods
    from earlyexit.tasks.builtin import get_task

    if data is not None:
        tasks = [_custom_task(data, text_column, label_column, labels, seed, template)]
    else:
        tasks = [get_task(name) for name in parse_list(task, "--task")]
    if protocol not in (None, "raee-paper"):
        raise EarlyExitError(f"unknown protocol '{protocol}': use raee-paper")
    paper = protocol == "raee-paper"
    if paper:  # RAEE's published setting; its database takes the whole training split
        shots, readout = 0, "lens"
        console.print("protocol raee-paper: 0 shots, readout lens, the whole training split")
    default = RAEE_PAPER_METHODS if paper else DEFAULT_METHODS
    methods = parse_list(method or default, "--method")
    config = EvalConfig(
        shots=shots,
        limit=limit,
        seed=seed,
        batch=batch,
        calibration=None if paper else calibration,
        readout=readout,
        embedder=embedder,
        risk=risk,
        delta=delta,
        sample=sample,
        stopper=stopper,
    )
    check_methods(methods, config)
    engine = load_engine(model, dtype)
    general = base_readout(engine, readout)
    records, points = [], []
    for t in tasks:
        evaluation = evaluate_task(engine, general, t, methods, config)
        records += evaluation.records
        if save:
            for path in evaluation.save_artifacts(save):
                console.print(f"saved {path}")
        if sweep or plots:
            task_points = sweep_task(evaluation)
            points += task_points
            if plots:
                from earlyexit.evaluation.plots import plot_sweep

                full_quality = evaluation.records[0]["full_quality"]
                title = f"{engine.loaded.name} {t.name} ({shots}-shot, {readout} readout)"
                png = plot_sweep(task_points, full_quality, title, plots / f"sweep-{t.name}.png")
                console.print(f"wrote {png}")
        if json_path:  # after every task, so a long multi-task run keeps what it finished
            payload = {
                "model": engine.loaded.name,
                "general_readout": "trained adapters" if general.trained_layers else "logit lens",
                "config": {
                    k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()
                },
                "records": records,
                "sweeps": points,
            }
            write_json(payload, json_path)
        console.print(render_records(evaluation.records, f"{engine.loaded.name}: {t.name}"))
    if len(tasks) > 1:
        console.print(render_records(records, f"{engine.loaded.name}: early-exit classification"))
    if json_path:
        console.print(f"wrote {json_path}")
    if markdown:
        from earlyexit.evaluation.markdown import records_markdown
        from earlyexit.paths import atomic_file

        with atomic_file(markdown) as tmp:
            tmp.write_text(records_markdown(records))
        console.print(f"wrote {markdown}")


def _custom_task(  # noqa: ANN202
    data: Path,
    text_column: str,
    label_column: str,
    labels: str | None,
    seed: int,
    template: str | None = None,
):
    from earlyexit.tasks.custom import load_custom_task

    if not labels:
        raise EarlyExitError("--data needs --labels: 'label=word,...' or a YAML/JSON map file")
    label_words: dict[str, str] | str = labels
    if "=" in labels and not Path(labels).exists():
        pairs = [part.split("=", 1) for part in parse_list(labels, "--labels")]
        if any(len(pair) != 2 for pair in pairs):
            raise EarlyExitError(f"--labels must be label=word pairs, got '{labels}'")
        label_words = {key.strip(): word for key, word in pairs}
    if template is not None:
        if "{text}" not in template:
            raise EarlyExitError(
                "--template must contain {text}, e.g. 'Review: {text}\\nSentiment:'"
            )
        template = template.replace("\\n", "\n")  # a typed \n is a newline
    return load_custom_task(data, text_column, label_column, label_words, template, seed=seed)


def render_records(records: list[dict], title: str) -> Table:
    from earlyexit.evaluation.markdown import interval, method_label

    cols = ["task", "method", "n", "quality (95% CI)", "full", "avg exit", "saved"]
    cols += ["speedup (95% CI)", "ideal", "decide"]
    rows = [
        [
            r["task"],
            method_label(r),
            str(r["n"]),
            f"{r['quality']:.3f} ({interval(r['quality_ci'])})",
            f"{r['full_quality']:.3f}",
            f"{r['avg_exit_layer']:.1f}/{r['num_layers']}",
            f"{r['layers_saved']:.0%}",
            f"{r['speedup']:.2f}x ({interval(r['speedup_ci'])})",
            f"{r['ideal_speedup']:.2f}x",
            f"{r['decision_overhead']:.1%}",
        ]
        for r in records
    ]
    return results_table(title, cols, rows)
