"""`earlyexit serve`: the OpenAI-compatible server (earlyexit.server) on one model."""

from __future__ import annotations

import typer

from earlyexit.cli.app import (
    COMPILED_OPT,
    DTYPE_OPT,
    MODEL_OPT,
    app,
    console,
    friendly,
    parse_list,
)
from earlyexit.errors import EarlyExitError
from earlyexit.methods import GENERATION, SERVED_METHODS, method_list


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
    max_batch: int = typer.Option(
        8, min=1, help="Rows decoded together (continuous batching); 1: one at a time."
    ),
    max_queue: int = typer.Option(
        64, min=1, help="Requests waiting for a row; beyond it the server answers 429."
    ),
    request_timeout: float | None = typer.Option(
        None,
        min=0.001,
        help="Seconds a generate request may take, queue wait included (504 after; "
        "default: no limit).",
    ),
    methods: str = typer.Option(
        ",".join(SERVED_METHODS), help="Comma-separated method families clients may use."
    ),
    api_key: str | None = typer.Option(
        None, envvar="EARLYEXIT_API_KEY", help="Require 'Authorization: Bearer KEY'."
    ),
    cors: str = typer.Option("", help="Comma-separated origins allowed by CORS ('*': any)."),
) -> None:
    """Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /v1/models), plus /v1/classify, /health and /metrics (Prometheus)."""
    from earlyexit.api import EarlyExit
    from earlyexit.runtime.generation import parse_method
    from earlyexit.server import serve

    parse_method(method)  # a bad method fails before the model loads
    families = parse_list(methods, "--methods")
    for family in families:
        parse_method(family)
    if parse_method(method).name not in families:
        raise EarlyExitError(f"--method {method} is not among --methods {methods}")
    ee = EarlyExit.load(
        model,
        dtype=dtype,
        threads=threads,
        compiled=compiled,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout=request_timeout,
    )
    console.print(f"decode steps: {ee.engine.compiled_choice.summary()}", highlight=False)
    if ee.engine.compiled is not None:  # the first request would otherwise load (or build) it
        ee.engine.greedy(ee.engine.encode(["Hello"])[0], 2)  # here: the scheduler's thread
    ee.scheduler.prepare(families)  # drafts follow batch pass costs: timed once, here
    console.print(
        f"serving {ee.name} ({dtype}, default method {method}, up to {max_batch} rows "
        f"batched) on http://{host}:{port}/v1",
        highlight=False,
    )
    serve(
        ee,
        method,
        host,
        port,
        graceful_seconds=graceful,
        methods=tuple(families),
        api_key=api_key,
        cors=tuple(parse_list(cors, "--cors")) if cors else (),
    )
