"""`earlyexit bench engine|generate`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from earlyexit.cli.app import (
    BLOCK_LAYER_OPT,
    CALIBRATION_PROMPTS_OPT,
    COMPILED_OPT,
    DELTA_OPT,
    DRAFT_TOKENS_OPT,
    DTYPE_OPT,
    EXITS_OPT,
    MEASURE_OPT,
    MODEL_OPT,
    RESTRICT_OPT,
    SEED_OPT,
    SHALLOW_OPT,
    TARGET_OPT,
    TEMPERATURE_OPT,
    TOP_P_OPT,
    bench_app,
    console,
    friendly,
    gen_config,
    load_engine,
    parse_list,
    results_table,
)
from earlyexit.errors import EarlyExitError
from earlyexit.methods import GENERATION, method_list


@bench_app.command("engine")
@friendly
def bench_engine(
    model: str = MODEL_OPT,
    new_tokens: int = typer.Option(32, min=2, help="Tokens decoded per row."),
    batches: str = typer.Option("1,8", help="Comma-separated batch sizes (at most 8)."),
    dtypes: str = typer.Option(
        "float32,bfloat16,int8,int4", help="Comma-separated dtypes (int4/int8: 4-bit groups)."
    ),
    repeats: int = typer.Option(3, min=1, help="Timed runs per cell (median is reported)."),
    llama_cpp: bool = typer.Option(
        True, help="Time llama.cpp on the model's GGUF at batch 1 when it is installed."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the result JSON here."),
) -> None:
    """Decode tokens/s of the model's own generate vs the engine at each dtype (and
    llama.cpp on the same GGUF), the kernel choice, and layer/readout costs."""
    from earlyexit.bench.engine_bench import (
        render_cost_table,
        render_pass_table,
        render_table,
        run_engine_bench,
    )
    from earlyexit.engine.compiled import CompiledChoice
    from earlyexit.engine.kernels import KernelChoice
    from earlyexit.models.load import parse_dtype
    from earlyexit.reporting import write_json

    dtype_list = parse_list(dtypes, "--dtypes")
    for d in dtype_list:
        parse_dtype(d)
    batch_list = parse_list(batches, "--batches", int)
    try:
        result = run_engine_bench(
            model, new_tokens, batch_list, dtype_list, repeats, llama_cpp=llama_cpp
        )
    except ValueError as err:
        raise EarlyExitError(str(err)) from None
    console.print(render_table(result))
    console.print(result["llama_cpp"], highlight=False)
    console.print(f"fastest engine path at batch 1: {result['fastest_engine']}")
    for dtype, chosen in result["weights"].items():
        if chosen["weights"] != dtype:
            console.print(f"{dtype}: {chosen['weights']} ({chosen['why']})", highlight=False)
    for dtype, choice in result["kernels"].items():
        how = "cached timings" if choice["cached"] else "timed now"
        console.print(f"kernel choice, {dtype} ({choice['mode']}, {how}):")
        console.print(KernelChoice(**choice).summary(), highlight=False)
        steps = CompiledChoice(**result["compiled"][dtype]).summary()
        console.print(f"decode steps, {dtype} (--compiled auto): {steps}", highlight=False)
    console.print(render_cost_table(result))
    console.print(render_pass_table(result))
    console.print(
        f"engine overhead at batch {result['engine_overhead_batch']}: "
        f"{result['engine_overhead']:+.1%} (negative: engine faster)"
    )
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")


@bench_app.command("generate")
@friendly
def bench_generate(
    model: str = MODEL_OPT,
    task: str = typer.Option("samsum", "--task", "-t", help="samsum, xsum, squad, iwslt-en-de."),
    method: str = typer.Option(
        "full,static,free,lossless", help=f"Comma-separated: {method_list(GENERATION)}."
    ),
    shallow_layer: int | None = SHALLOW_OPT,
    limit: int = typer.Option(20, min=1, help="Items (first N; of --data: a seeded sample)."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Default: the task's."),
    target: float | None = TARGET_OPT,
    measure: str | None = MEASURE_OPT,
    restrict: bool = RESTRICT_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    seed: int = SEED_OPT,
    dtype: str = DTYPE_OPT,
    sweep: str | None = typer.Option(
        None, help="Thresholds, e.g. 0.3,0.5,0.7,0.9: adds calm:T and free:T for each."
    ),
    plots: Path | None = typer.Option(None, help="With --sweep: one PNG per task here."),
    draft_tokens: int | None = DRAFT_TOKENS_OPT,
    block_layer: int | None = BLOCK_LAYER_OPT,
    data: Path | None = typer.Option(
        None, help="Your own CSV/TSV/JSONL file instead of --task (a seeded sample of it)."
    ),
    prompt_field: str = typer.Option("prompt", help="With --data: the prompt field."),
    reference_field: str = typer.Option("reference", help="With --data: the reference field."),
    template: str = typer.Option(
        "{prompt}", help="With --data: wraps the prompt field, e.g. 'Summarize: {prompt}'."
    ),
    metric: str = typer.Option("rougeL", help="With --data: rougeL, f1, bleu or exact."),
    risk: float | None = typer.Option(
        None,
        help="Learn-then-Test: `free` and `calm` without a threshold take the lowest one at "
        "which at most RISK of answers differ from the full model's (probability 1 - DELTA "
        "over the calibration prompts; certifying needs enough of them, see "
        "--calibration-prompts).",
    ),
    delta: float = DELTA_OPT,
    calibration_prompts: int | None = CALIBRATION_PROMPTS_OPT,
    exits: str | None = EXITS_OPT,
    compiled: str = COMPILED_OPT,
    json_path: Path | None = typer.Option(None, "--json", help="Write the records JSON here."),
) -> None:
    """Quality, agreement with full, shallow fraction and tokens/s per decoding method."""
    from earlyexit.api import EarlyExit
    from earlyexit.decoding.sampling import SamplingConfig
    from earlyexit.engine.kernels import cpu_model
    from earlyexit.evaluation.generate import bench_generation
    from earlyexit.reporting import write_json
    from earlyexit.runtime.generation import parse_method, shallow_exit
    from earlyexit.tasks.generation import get_generation_task

    if data is not None:
        from earlyexit.tasks.generation import load_generation_file

        tasks = [
            load_generation_file(
                data,
                prompt_field,
                reference_field,
                template.replace("\\n", "\n"),  # a typed \n is a newline
                metric,
                max_new_tokens or 64,
                seed,
            )
        ]
    else:
        tasks = [get_generation_task(name) for name in parse_list(task, "--task")]
    methods = parse_list(method, "--method")
    for level in parse_list(sweep, "--sweep", float) if sweep else []:
        methods += [f"calm:{level}", f"free:{level}"]
    sampling = SamplingConfig(temperature, top_p, seed)
    for spec in methods:
        parse_method(spec, sampling)  # a bad method fails before the model loads
    config = gen_config(  # bad --risk / --delta fail here, before the model loads
        shallow_layer=shallow_layer,
        measure=measure,
        restrict_vocab=restrict,
        target=target,
        draft_tokens=draft_tokens,
        block_layer=block_layer,
        calibration_prompts=calibration_prompts,
        # calibration answers as long as the benchmark's (48 when the task decides)
        calibration_tokens=max_new_tokens,
        risk=risk,
        delta=delta,
        exits=exits,
    )
    engine = load_engine(model, dtype, compiled)
    ee = EarlyExit.from_engine(engine, max_batch=1)  # one request at a time, as timed
    config.check_layers(engine.num_layers)
    _, where = shallow_exit(engine, config)
    console.print(f"shallow exit: {where}", highlight=False)
    records = []
    layer = config.shallow_layer_of(engine.num_layers)
    for t in tasks:
        task_records = bench_generation(ee, t, methods, config, limit, max_new_tokens, sampling)
        records += task_records
        if plots and sweep:
            from earlyexit.evaluation.plots import plot_generation_sweep

            title = f"{engine.loaded.name} {t.name}: shallow exit at layer {layer}"
            png = plot_generation_sweep(task_records, title, plots / f"gen-sweep-{t.name}.png")
            console.print(f"wrote {png}")
    how = "greedy" if sampling.greedy else f"sampled, T={temperature}, top-p={top_p}"
    threads = torch_threads()
    title = (
        f"{engine.loaded.name}: early-exit generation (batch 1, {how}, {threads} threads, "
        f"{'compiled' if engine.compiled else 'eager'} steps, exits {config.exits}, "
        f"{cpu_model()})"
    )
    console.print(generation_table(title, records))
    if json_path:
        write_json(
            {
                "model": engine.loaded.name,
                "cpu": cpu_model(),
                "threads": threads,
                "kernels": engine.kernels.skinny_rows,
                "compiled": asdict(engine.compiled_choice),
                "records": records,
            },
            json_path,
        )
        console.print(f"wrote {json_path}")


def generation_table(title: str, records: list[dict]):  # noqa: ANN201 - a rich Table
    from earlyexit.evaluation.markdown import interval, method_label

    cols = ["task", "method", "n", "quality (95% CI)", "full", "agree", "shallow", "layers"]
    cols += ["tok/s", "speedup (95% CI)", "with prefill", "tok/pass", "accepted", "draft cost"]
    rows = [
        [
            r["task"],
            method_label(r),
            str(r["n"]),
            f"{r['quality']:.3f} ({interval(r['quality_ci'])})",
            f"{r['full_quality']:.3f}",
            f"{r['agreement']:.3f}",
            f"{r['shallow_fraction']:.0%}",
            f"{r['avg_layers']:.1f}",
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup']:.2f}x ({interval(r['speedup_ci'])})",
            f"{r['e2e_speedup']:.2f}x",
            "-" if r["tokens_per_pass"] is None else f"{r['tokens_per_pass']:.2f}",
            "-" if r["draft_acceptance"] is None else f"{r['draft_acceptance']:.0%}",
            "-" if r["draft_cost"] is None else f"{r['draft_cost']:.2f}",
        ]
        for r in records
    ]
    return results_table(title, cols, rows)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@bench_app.command("serve")
@friendly
def bench_serve(
    model: str = MODEL_OPT,
    method: str = typer.Option(
        "full,lossless,free", help=f"Comma-separated methods ({method_list(GENERATION)})."
    ),
    clients: str = typer.Option("1,4,8", help="Comma-separated concurrent streaming clients."),
    max_batch: str = typer.Option(
        "8,1", help="Comma-separated scheduler batch limits, one server each (1: one at a time)."
    ),
    requests: int = typer.Option(16, min=1, help="Requests per cell (batch limit x method)."),
    max_tokens: int = typer.Option(32, min=1, help="max_tokens of every request."),
    task: str = typer.Option("samsum", help="Prompts from this generation task."),
    temperature: float = TEMPERATURE_OPT,
    dtype: str = DTYPE_OPT,
    llama_server: Path | None = typer.Option(
        None,
        "--llama-server",
        help="llama.cpp's llama-server binary: its continuous batching on the same GGUF as "
        "one more cell (README: how to build it for this CPU).",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write the result JSON here."),
) -> None:
    """Load-test `earlyexit serve` on localhost with the openai client: tokens/s, latency,
    time to first token, mean running batch and cross-talk per client count, batch limit
    and method; closed-loop clients, the cells rotating block by block."""
    from earlyexit.bench.server_bench import render_server_table, run_server_bench
    from earlyexit.reporting import write_json
    from earlyexit.runtime.generation import parse_method

    methods = parse_list(method, "--method")
    for m in methods:
        parse_method(m)
    counts = parse_list(clients, "--clients", int)
    limits = parse_list(max_batch, "--max-batch", int)
    if min(counts) < 1 or min(limits) < 1:
        raise EarlyExitError("--clients and --max-batch take positive integers")
    if llama_server is not None and not llama_server.is_file():
        raise EarlyExitError(f"no llama-server binary at {llama_server}")
    if requests < max(counts):
        raise EarlyExitError(f"--requests ({requests}) must be at least the most --clients")
    result = run_server_bench(
        model,
        methods,
        counts,
        requests,
        max_tokens,
        task,
        dtype,
        temperature,
        limits,
        llama_server_binary=llama_server,
    )
    console.print(render_server_table(result))
    if any(m["errors"] or m["mismatches"] for m in result["cells"]):
        console.print("[red]errors or cross-talk: see the JSON's error_messages[/]")
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")


@bench_app.command("llamacpp-install")
@friendly
def bench_llamacpp_install(
    server: str | None = typer.Option(
        None,
        "--server",
        help="Instead: the cmake lines that build llama-server (for `bench serve "
        "--llama-server`) from this llama.cpp checkout.",
    ),
) -> None:
    """Print the pip line that builds llama.cpp (the `bench engine` anchor, the `llama.cpp`
    peer) for this CPU into this environment: `eval "$(earlyexit bench llamacpp-install)"`."""
    from earlyexit.bench.llamacpp import install_command, installed, server_build_command

    if server is not None:
        typer.echo(server_build_command(server, f"{server.rstrip('/')}/build"))
        return
    typer.echo(install_command(reinstall=installed()))  # plain: no wrapping, no markup
