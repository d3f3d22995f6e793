"""`earlyexit serve`: the OpenAI-compatible server (earlyexit.server) on one model."""

from __future__ import annotations

import typer

from earlyexit.cli.app import COMPILED_OPT, DTYPE_OPT, MODEL_OPT, app, console, friendly
from earlyexit.methods import GENERATION, method_list


@app.command("serve")
@friendly
def serve_command(
    model: str = MODEL_OPT,
    method: str = typer.Option(
        "lossless",
        help=f"Default method ({method_list(GENERATION)}); a request's "
        "`early_exit.method` overrides it.",
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    dtype: str = DTYPE_OPT,
    threads: int | None = typer.Option(None, min=1, help="torch CPU threads (default: torch's)."),
    graceful: int = typer.Option(
        30, min=0, help="Seconds in-flight requests get to finish on shutdown."
    ),
    compiled: str = COMPILED_OPT,
) -> None:
    """Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/models), plus /v1/classify, /health and /metrics (Prometheus)."""
    from earlyexit.api import EarlyExit
    from earlyexit.runtime.generation import parse_method
    from earlyexit.server import serve

    parse_method(method)  # a bad method fails before the model loads
    ee = EarlyExit.load(model, dtype=dtype, threads=threads, compiled=compiled)
    console.print(f"decode steps: {ee.engine.compiled_choice.summary()}", highlight=False)
    if ee.engine.compiled is not None:  # the first request would otherwise load (or build) it
        ee.generate("Hello", method="full", max_new_tokens=2)
    console.print(
        f"serving {ee.name} ({dtype}, default method {method}) on http://{host}:{port}/v1",
        highlight=False,
    )
    serve(ee, method, host, port, graceful_seconds=graceful)
