"""The `earlyexit` command line (typer): `app` with every command group registered."""

from earlyexit.cli import bench, eval, generate, heads, models, raee  # noqa: F401 - registers
from earlyexit.cli.app import app

__all__ = ["app"]
