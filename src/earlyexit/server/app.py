"""`earlyexit serve`: an OpenAI-compatible HTTP server over one `EarlyExit` object.

The server adds no decoding logic: every request becomes one `EarlyExit.generate`,
`stream` or `classify` call (protocol.py translates). Scheduling is the API's: `full` and
`lossless` and `free` requests are decoded together by its scheduler (continuous batching,
runtime/scheduler.py), the others take the model's lock in turn; requests wait in worker
threads while the event loop keeps accepting, streaming and answering /health and /metrics.
A full queue answers 429 with Retry-After, a server shutting down 503, a request past
`--request-timeout` 504 (an error event mid-stream).

A client that disconnects mid-stream cancels its decode (the API's `Stream.close`): its
row is freed at the scheduler's next iteration. On shutdown uvicorn stops accepting, lets
in-flight requests finish for up to `graceful_seconds`, then the scheduler cancels them.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from earlyexit.api import EarlyExit, Generation
from earlyexit.errors import EarlyExitError
from earlyexit.methods import SERVED_METHODS
from earlyexit.runtime.scheduler import QueueFull, RequestTimeout, ShuttingDown
from earlyexit.server import protocol
from earlyexit.server.metrics import ServerMetrics

disable_created_metrics()  # no `_created` timestamp series next to every counter


class ModelNotFound(Exception):
    def __init__(self, asked: str, served: str) -> None:
        super().__init__(
            f"model '{asked}' is not served here; this server serves '{served}' (GET /v1/models)"
        )


class _Metered:
    """ASGI middleware: every request's status and latency (to its last body byte, so a
    stream counts until it ends) and the number in flight."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, status, began = scope["path"], 500, time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            known = endpoint if endpoint in _ROUTES else "other"
            self.metrics.requests.labels(known, str(status)).inc()
            self.metrics.latency.labels(known).observe(time.perf_counter() - began)


class _Guarded:
    """ASGI middleware: the API key (Bearer; 401) and the body size limit (413), answered
    as OpenAI JSON errors before the route runs."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and scope.get("method") != "OPTIONS":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {self.api_key}":
                response = _error(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    "authentication_error",
                    "invalid_api_key",
                )
                await response(scope, receive, send)
                return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            response = _error(
                413,
                f"the request body is over {self.max_body_bytes} bytes",
                "invalid_request_error",
                "body_too_large",
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


_ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/classify",
)


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, code), status_code=status)


def _validation_message(err: RequestValidationError) -> str:
    """One line from pydantic's errors: the first problem, where it is."""
    first = err.errors()[0] if err.errors() else {"msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}"
    # the path to the field, without "body" and pydantic's union-member names ("str")
    types = ("str", "int", "float", "bool", "list", "dict")
    where = ".".join(
        str(p) for p in first.get("loc", ()) if p != "body" and p not in types and "[" not in str(p)
    )
    return f"{where}: {first['msg']}" if where else str(first["msg"])


MAX_BODY_BYTES = 4 * 1024 * 1024  # a request body beyond this answers 413


def create_app(
    ee: EarlyExit,
    method: str = "lossless",
    name: str | None = None,
    methods: Sequence[str] = SERVED_METHODS,
    api_key: str | None = None,
    cors: Sequence[str] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The FastAPI app serving `ee` under `name` (default: the model's name), with
    `method` as every request's default (a request's `early_exit.method` overrides it).
    `methods`: the method families clients may ask for; `api_key`: required as a Bearer
    token (401 without it; /health stays open); `cors`: allowed browser origins."""
    from starlette.middleware.cors import CORSMiddleware

    from earlyexit.runtime.generation import parse_method

    allowed = tuple(methods)
    for family in allowed:
        parse_method(family)
    if parse_method(method).name not in allowed:
        raise EarlyExitError(f"the default method {method} is not among --methods {allowed}")
    served = name or ee.name
    metrics = ServerMetrics(ee.num_layers, ee.scheduler_stats)
    app = FastAPI(title="earlyexit", description="OpenAI-compatible early-exit inference")
    app.add_middleware(_Guarded, api_key=api_key, max_body_bytes=max_body_bytes)
    if cors:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(cors), allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(_Metered, metrics=metrics)
    app.state.ee, app.state.metrics = ee, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(err), "invalid_request_error")

    @app.exception_handler(EarlyExitError)
    async def refused(_: Request, err: EarlyExitError) -> JSONResponse:
        return _error(400, str(err), "invalid_request_error")

    @app.exception_handler(QueueFull)
    async def busy(_: Request, err: QueueFull) -> JSONResponse:
        response = _error(429, str(err), "rate_limit_error", "queue_full")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(ShuttingDown)
    async def closing(_: Request, err: ShuttingDown) -> JSONResponse:
        return _error(503, str(err), "server_error", "shutting_down")

    @app.exception_handler(RequestTimeout)
    async def too_long(_: Request, err: RequestTimeout) -> JSONResponse:
        return _error(504, str(err), "server_error", "timeout")

    @app.exception_handler(ModelNotFound)
    async def unknown_model(_: Request, err: ModelNotFound) -> JSONResponse:
        return _error(404, str(err), "invalid_request_error", "model_not_found")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return _error(err.status_code, str(err.detail), kind)

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    def check_model(asked: str | None) -> None:
        if asked is not None and asked != served:
            raise ModelNotFound(asked, served)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": served, "default_method": method}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served, "object": "model", "created": 0, "owned_by": "earlyexit"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def answer(
        prompt: str | list[dict[str, str]],
        req: protocol._Sampling,
        max_tokens: int | None,
        chat: bool,
    ) -> Response:
        check_model(req.model)
        args = req.generate_args(method, max_tokens)
        family = parse_method(args["method"]).name
        if family not in allowed:
            raise EarlyExitError(
                f"method '{family}' is not served here: use one of {', '.join(allowed)}"
            )
        knobs = {k: v for k, v in (req.early_exit or {}).items() if k != "method"}
        rid = protocol.new_id("chatcmpl" if chat else "cmpl")
        ee.check_room(args["method"])  # a 429 / 503 before any response starts
        if not req.stream:
            generation: Generation = await run_in_threadpool(
                lambda: ee.generate(prompt, chat=False, **args)
            )
            metrics.generation(generation.report)
            build = protocol.chat_completion if chat else protocol.completion
            return JSONResponse(build(rid, served, generation, knobs))
        stream = ee.stream(prompt, chat=False, **args)  # bad arguments fail here: a 400
        return StreamingResponse(
            _events(stream, rid, served, chat, req.include_usage, knobs, metrics),
            media_type="text/event-stream",
        )

    @app.post("/v1/completions")
    async def completions(req: protocol.CompletionRequest) -> Response:
        return await answer(req.text(), req, req.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: protocol.ChatRequest) -> Response:
        return await answer(req.message_dicts(), req, req.tokens(), chat=True)

    @app.post("/v1/classify")
    async def classify(req: protocol.ClassifyRequest) -> dict[str, Any]:
        check_model(req.model)
        task = None if req.labels is not None and req.task in (None, "") else req.task
        result = await run_in_threadpool(
            lambda: ee.classify(
                req.texts,
                task=task,
                labels=req.labels,
                method=req.method,
                shots=req.shots,
                seed=req.seed,
                calibration=req.calibration,
                readout=req.readout,
            )
        )
        report = result.report
        return {
            "id": protocol.new_id("cls"),
            "object": "classification",
            "model": served,
            "labels": result.labels,
            "classes": result.classes,
            "exit_layers": result.exit_layers,
            "timings": {
                "seconds": report.seconds,
                "decision_seconds": report.decision_seconds,
                "setup_seconds": report.setup_seconds,
            },
            "early_exit": asdict(report),
        }

    return app


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def _events(
    stream: Any,
    rid: str,
    model: str,
    chat: bool,
    include_usage: bool,
    knobs: dict[str, Any],
    metrics: ServerMetrics,
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them; telemetry on the chunk with the
    finish_reason, usage in its own last chunk when asked, then [DONE]."""
    try:
        if chat:
            yield _sse(protocol.chunk(rid, model, chat, "", first=True))
        generation: Generation | None = None
        try:
            async for piece in iterate_in_threadpool(stream):
                if piece.text:
                    yield _sse(protocol.chunk(rid, model, chat, piece.text))
                if piece.generation is not None:
                    generation = piece.generation
        except Exception as err:  # noqa: BLE001 - the status is sent: the error goes in the stream
            message = str(err) if isinstance(err, EarlyExitError) else f"internal error: {err}"
            yield _sse(protocol.error_body(message))
            yield _sse("[DONE]")
            return
        if generation is None:  # cancelled
            return
        metrics.generation(generation.report)
        last = protocol.chunk(rid, model, chat, None, generation.finish_reason)
        last.update(protocol.telemetry(generation, knobs))
        yield _sse(last)
        if include_usage:
            tail = protocol.chunk(rid, model, chat, None)
            tail["choices"] = []
            tail["usage"] = protocol.usage(generation.report)
            yield _sse(tail)
        yield _sse("[DONE]")
    finally:  # a disconnect cancels this generator: stop the decode, free the model
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(stream.close)


def serve(
    ee: EarlyExit,
    method: str = "lossless",
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_seconds: int = 30,
    log_level: str = "info",
    **options: Any,
) -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM: graceful shutdown: uvicorn
    stops accepting and waits up to `graceful_seconds`, then the scheduler cancels what
    still runs). `options`: create_app's (methods, api_key, cors, max_body_bytes)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(ee, method, **options),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_seconds,
    )
    server = uvicorn.Server(config)
    # The engine's work stays in this thread, which loaded the model: a decode in another
    # thread ran 2-2.6x slower here (scripts/experiments/thread_penalty.py: a second OpenMP
    # team on a 2-core machine). So uvicorn runs in a thread and this one runs the scheduler.
    http = threading.Thread(target=server.run, name="earlyexit-http", daemon=True)
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in handled}
    http.start()
    try:
        ee.scheduler.serve_here(stop=lambda: not http.is_alive())
    finally:
        http.join(timeout=graceful_seconds + 5)
        ee.close(timeout=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    for sig in reversed(server._captured_signals):  # as uvicorn does in the main thread
        signal.raise_signal(sig)
