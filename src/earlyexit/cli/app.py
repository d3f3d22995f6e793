"""The `earlyexit` command line: the typer app, its sub-apps and what commands share."""

from __future__ import annotations

import functools
import shutil
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from earlyexit.errors import EarlyExitError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The `earlyexit` command line.")
models_app = typer.Typer(no_args_is_help=True, help="List and fetch built-in models.")
heads_app = typer.Typer(no_args_is_help=True, help="Train and inspect exit readouts.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (print a table, write JSON).")
raee_app = typer.Typer(no_args_is_help=True, help="Build and inspect RAEE exit databases.")
app.add_typer(models_app, name="models")
app.add_typer(heads_app, name="heads")
app.add_typer(bench_app, name="bench")
app.add_typer(raee_app, name="raee")

# Off a terminal rich assumes 80 columns and truncates wide tables; allow 140.
console = Console(width=shutil.get_terminal_size((140, 24)).columns)
F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


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


_KINDS = {int: "integers", float: "numbers"}


def parse_list(text: str, option: str, convert: Callable[[str], T] = str) -> list[T]:  # type: ignore[assignment]
    """A comma-separated option: its non-empty parts, stripped and converted (one line
    naming the option on a part that does not convert)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return [convert(part) for part in parts]
    except ValueError:
        kind = _KINDS.get(convert, "values")  # type: ignore[call-overload]
        raise EarlyExitError(f"{option} must be comma-separated {kind}, got '{text}'") from None


def load_engine(model: str, dtype: str = "auto", compiled: str = "off"):  # noqa: ANN201
    """The engine (a LayerEngine) with its decode steps compiled or not (`--compiled`);
    which one, and why, on stderr (stdout stays the command's output)."""
    from rich.console import Console

    from earlyexit.engine import LayerEngine
    from earlyexit.models import load_model

    with console.status(f"loading {model} ({dtype}) ..."):
        engine = LayerEngine(load_model(model, dtype=dtype))
    if compiled != "off":
        with console.status("choosing compiled or eager decode steps ..."):
            choice = engine.set_compiled(compiled)
        Console(stderr=True, soft_wrap=True).print(
            f"[dim]decode steps: {choice.summary()}[/]", highlight=False
        )
    return engine


def gen_config(**given: Any):  # noqa: ANN201 - a GenConfig (imported when called)
    """The decoder settings a command was given (GenConfig's fields; None: not given, the
    config's default holds), checked now: a bad value fails before the model loads."""
    from earlyexit.runtime.generation import GenConfig

    return GenConfig(**{k: v for k, v in given.items() if v is not None and v is not False})


def results_table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A results table: the first two columns (task, method) left-aligned, numbers right."""
    table = Table(title=title)
    for index, col in enumerate(columns):
        table.add_column(col, justify="left" if index < 2 else "right")
    for row in rows:
        table.add_row(*row)
    return table


# options several commands share
MODEL_OPT = typer.Option(
    "smollm2-135m", "--model", "-m", help="Registry name, local dir or hub id."
)
DTYPE_OPT = typer.Option(
    "auto",
    help="auto (int4 where the weights are exact 4-bit groups and int4 is measured faster "
    "here, else float32), float32, bfloat16, int4 or int8 (4-bit weight groups).",
)
COMPILED_OPT = typer.Option(
    "auto",
    help="Decode steps (batch 1) as compiled graphs: auto (where the layers have one, as "
    "smollm2 at int4, and a timed step was faster here; the layer step is built once per "
    "machine, about 15 s), on, or off (the eager engine, "
    "bit-identical to the model's own layers).",
)
READOUT_OPT = typer.Option(
    "probe",
    help="probe: per-layer task probes fitted on the calibration prompts; general: the saved "
    "readouts (`heads train`) over the label words; lens: the model's own norm and head at "
    "every layer (RAEE's paper).",
)
DELTA_OPT = typer.Option(0.1, help="With --risk: the allowed failure probability.")
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
# decoder settings left unset take GenConfig's defaults (runtime/generation.py), the same
# as EarlyExit.generate's: one config, one set of defaults
CALIBRATION_PROMPTS_OPT = typer.Option(
    None,
    min=1,
    help="Held-out instructions decoded at full depth that calibrate calm, warm-start free "
    "and certify --risk (default 8).",
)
TARGET_OPT = typer.Option(
    None, help="FREE: posterior agreement its adaptive threshold aims at (default 0.9)."
)
MEASURE_OPT = typer.Option(None, help="Shallow confidence: gap (top1 - top2, default) or top1.")
EXITS_OPT = typer.Option(
    None,
    help="free, calm: try the shallow exit at every step (always, as the papers' loops) or "
    "only while it measurably pays (measured, default: else full depth, faster and exact).",
)
DRAFT_TOKENS_OPT = typer.Option(
    None,
    min=1,
    max=7,  # decoding/draft_length.py MAX_DRAFT
    help="n-gram drafts per verify pass (lossless, free); default: chosen per match length "
    "from this machine's measured verify-pass costs.",
)
