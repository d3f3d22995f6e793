"""`earlyexit generate`: one answer, batch 1, with early exit."""

from __future__ import annotations

import typer

from earlyexit.cli.app import (
    BLOCK_LAYER_OPT,
    COMPILED_OPT,
    DRAFT_TOKENS_OPT,
    DTYPE_OPT,
    MODEL_OPT,
    RESTRICT_OPT,
    SEED_OPT,
    SHALLOW_OPT,
    TEMPERATURE_OPT,
    TOP_P_OPT,
    app,
    console,
    friendly,
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
    measure: str = typer.Option("gap", help="Shallow confidence: gap (top1 - top2) or top1."),
    restrict: bool = RESTRICT_OPT,
    temperature: float = TEMPERATURE_OPT,
    top_p: float = TOP_P_OPT,
    seed: int = SEED_OPT,
    dtype: str = DTYPE_OPT,
    draft_tokens: int | None = DRAFT_TOKENS_OPT,
    block_layer: int | None = BLOCK_LAYER_OPT,
    compiled: str = COMPILED_OPT,
) -> None:
    """Generate with early exit (batch 1) and say how many tokens exited shallow."""
    from rich.console import Console

    from earlyexit.api import shallow_exit
    from earlyexit.decoding.sampling import SamplingConfig
    from earlyexit.decoding.shallow_deep import DecodeConfig
    from earlyexit.runtime.generation import GenConfig, build_decoder, parse_method
    from earlyexit.tasks.generation import render_prompt

    sampling = SamplingConfig(temperature, top_p, seed)
    parse_method(method, sampling)  # a bad method fails before the model loads
    engine = load_engine(model, dtype, compiled)
    shallow, where = shallow_exit(engine, shallow_layer, measure, restrict)
    # which readout the shallow exit is, on stderr: stdout stays the text and its stats line
    Console(stderr=True, soft_wrap=True).print(f"[dim]shallow exit: {where}[/]", highlight=False)
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
