"""The `earlyexit` command line (typer): `app` with every command group registered."""

from earlyexit.cli import bench, eval, generate, heads, lmeval, models, raee, serve  # noqa: F401
from earlyexit.cli.app import app

__all__ = ["app"]
