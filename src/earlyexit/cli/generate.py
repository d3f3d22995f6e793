"""`earlyexit generate`: one answer, batch 1, with early exit."""

from __future__ import annotations

import typer

from earlyexit.cli.app import (
    BLOCK_LAYER_OPT,
    CALIBRATION_PROMPTS_OPT,
    COMPILED_OPT,
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
    app,
    console,
    friendly,
    gen_config,
    load_engine,
)
from earlyexit.methods import GENERATION, method_list


@app.command("generate")
@friendly
def generate_command(
    prompt: str = typer.Argument(..., help="The user message (chat template applied)."),
    model: str = MODEL_OPT,
    method: str = typer.Option("free", help=f"{method_list(GENERATION)}."),
    shallow_layer: int | None = SHALLOW_OPT,
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate at most."),
    measure: str | None = MEASURE_OPT,
    restrict: bool = RESTRICT_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    seed: int = SEED_OPT,
    dtype: str = DTYPE_OPT,
    draft_tokens: int | None = DRAFT_TOKENS_OPT,
    block_layer: int | None = BLOCK_LAYER_OPT,
    calibration_prompts: int | None = CALIBRATION_PROMPTS_OPT,
    target: float | None = TARGET_OPT,
    exits: str | None = EXITS_OPT,
    compiled: str = COMPILED_OPT,
) -> None:
    """Generate with early exit (one request, through EarlyExit.generate: the path of the
    API and the server) and say how many tokens exited shallow."""
    from dataclasses import asdict

    from rich.console import Console

    from earlyexit.api import EarlyExit
    from earlyexit.decoding.sampling import SamplingConfig
    from earlyexit.runtime.generation import parse_method

    parse_method(method, SamplingConfig(temperature, top_p, seed))  # before the model loads
    config = gen_config(
        shallow_layer=shallow_layer,
        measure=measure,
        restrict_vocab=restrict,
        draft_tokens=draft_tokens,
        block_layer=block_layer,
        calibration_prompts=calibration_prompts,
        target=target,
        exits=exits,
    )
    engine = load_engine(model, dtype, compiled)
    ee = EarlyExit.from_engine(engine, max_batch=1)
    out = ee.generate(
        prompt,
        method=method,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        **asdict(config),
    )
    report = out.report
    if "shallow_exit" in report.artifacts:
        # which readout the shallow exit is, on stderr: stdout stays the text and its stats
        Console(stderr=True, soft_wrap=True).print(
            f"[dim]shallow exit: {report.artifacts['shallow_exit']}[/]", highlight=False
        )
    layer = report.shallow_layer or config.shallow_layer_of(engine.num_layers)
    console.print(out.text.strip(), highlight=False)
    console.print(
        f"[dim]{len(out.tokens)} tokens, {report.shallow_fraction:.0%} at layer "
        f"{layer}, {report.tokens_per_s:.1f} tokens/s, {report.rollbacks} rollbacks"
        + (
            f", {report.draft_accepted}/{report.draft_proposed} drafts accepted in "
            f"{report.passes} passes"
            if report.draft_proposed
            else ""
        )
        + "[/]"
    )
