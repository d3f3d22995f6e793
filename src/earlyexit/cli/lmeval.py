"""`earlyexit lm-eval`: lm-evaluation-harness tasks with an early-exit method."""

from __future__ import annotations

from pathlib import Path

import typer

from earlyexit.cli.app import DTYPE_OPT, MODEL_OPT, app, console, friendly, parse_list
from earlyexit.errors import EarlyExitError
from earlyexit.methods import GENERATION, method_list


@app.command("lm-eval")
@friendly
def lm_eval_command(
    tasks: str = typer.Option(
        ...,
        help="Comma-separated harness tasks: the local ee_sst2, ee_boolq, ee_arc_easy, "
        "ee_piqa, ee_mmlu, ee_samsum, ee_squad, or any task the harness can load.",
    ),
    model: str = MODEL_OPT,
    method: str = typer.Option("full", help=f"Generation method ({method_list(GENERATION)})."),
    limit: int | None = typer.Option(None, min=1, help="First N documents of each task."),
    output: Path | None = typer.Option(None, help="Write the harness's results JSON here."),
    dtype: str = DTYPE_OPT,
    batch_size: int = typer.Option(8, min=1, help="Loglikelihood batch size."),
    num_fewshot: int | None = typer.Option(None, min=0, help="Few-shot examples per prompt."),
    apply_chat_template: bool = typer.Option(False, help="Render prompts as chat turns."),
    score_layer: int | None = typer.Option(
        None,
        min=1,
        help="Score loglikelihoods at this layer instead of the last (changes "
        "every score: it measures the layer-K model).",
    ),
    score_exit: str | None = typer.Option(
        None,
        help="Score each loglikelihood at the layer `confidence:T` picks for its context "
        "(first layer whose top-1 minus top-2 gap >= T; changes every score).",
    ),
) -> None:
    """Run harness tasks with earlyexit as the model; print the harness's table."""
    try:
        from lm_eval.utils import make_table
    except ImportError:
        raise EarlyExitError(
            "lm-eval is not installed; install it with: pip install 'earlyexit[harness]'"
        ) from None
    from earlyexit.harness.run import run_harness
    from earlyexit.runtime.generation import parse_method

    parse_method(method)
    results = run_harness(
        model,
        method,
        parse_list(tasks, "--tasks"),
        limit,
        output,
        dtype,
        batch_size,
        num_fewshot,
        apply_chat_template,
        score_layer,
        score_exit=score_exit,
    )
    console.print(make_table(results), highlight=False)
    exits = results["earlyexit"]["score_exit"]
    if exits:
        console.print(
            f"scored at the {score_exit} exit: mean layer {exits['mean_layer']:.1f} of "
            f"{exits['requests']} requests",
            highlight=False,
        )
    summary = results["earlyexit"]["generation"]
    if summary:
        console.print(
            f"{method}: {summary['decode_tokens_per_s']:.1f} decode tok/s, "
            f"{summary['avg_layers']:.1f} of {summary['num_layers']} layers per token, "
            f"{summary['shallow_fraction']:.0%} exited shallow ({summary['requests']} requests)",
            highlight=False,
        )
    if output:
        console.print(f"wrote {output}")
