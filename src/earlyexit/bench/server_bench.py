"""`bench serve`: a bounded load test of `earlyexit serve` on localhost, methods side by side.

The server runs in this process (uvicorn in a thread) on a free port; clients are the
official `openai` client in threads, streaming chat completions of a generation task's
prompts. Per method: `requests` requests, `clients` at a time, in rounds that alternate the
methods (so machine drift hits them alike). Reported per method: errors, p50/p95 latency
(request sent -> last chunk) and time to first token, completion tokens per second of wall
time, layers per token, and cross-talk: every greedy answer is compared with the answer
to the same prompt requested alone, before the load (methods whose adaptive threshold
learns across requests, `free` without `:T`, legitimately differ and are not compared).
"""

from __future__ import annotations

import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.table import Table

from earlyexit.api import EarlyExit
from earlyexit.engine.kernels import cpu_model
from earlyexit.runtime.generation import parse_method


@dataclass
class MethodLoad:
    method: str
    requests: int
    errors: int
    p50_s: float
    p95_s: float
    ttft_p50_s: float
    completion_tokens: int
    wall_s: float  # summed over this method's rounds
    tokens_per_s: float  # completion tokens / wall_s
    avg_layers: float  # mean over requests of layers per decode-phase token
    compared: int  # answers compared with the same prompt's answer alone
    mismatches: int  # of those, how many differ (cross-talk)
    error_messages: list[str] = field(default_factory=list)


@contextmanager
def running_server(ee: EarlyExit, method: str, start_seconds: float = 60) -> Iterator[str]:
    """The server on a free localhost port in a thread; yields its base URL, and checks that
    it stops (within a minute) on the way out."""
    import uvicorn

    from earlyexit.server import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(create_app(ee, method), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_seconds
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    if thread.is_alive():
        raise RuntimeError("the server did not stop")


def _deterministic(method: str, temperature: float) -> bool:
    parsed = parse_method(method)
    return temperature == 0 and not (parsed.name == "free" and parsed.value is None)


def _one(client: Any, model: str, prompt: str, method: str, tokens: int, temperature: float):  # noqa: ANN202
    """(latency s, time to first token s, text, completion tokens, avg layers) of one
    streamed chat completion."""
    began = time.perf_counter()
    first = None
    pieces, usage, telemetry = [], None, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=temperature,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"early_exit": {"method": method}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            telemetry = chunk.model_extra.get("early_exit")
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return (
        end - began,
        (first or end) - began,
        "".join(pieces),
        usage.completion_tokens if usage else 0,
        telemetry["avg_layers"] if telemetry else float("nan"),
    )


def run_server_bench(
    model: str = "smollm2-135m",
    methods: Sequence[str] = ("full", "lossless", "free"),
    clients: int = 8,
    requests: int = 48,
    max_tokens: int = 32,
    task: str = "samsum",
    dtype: str = "auto",
    temperature: float = 0.0,
    ee: EarlyExit | None = None,
) -> dict[str, Any]:
    import openai

    from earlyexit.tasks.generation import get_generation_task

    if clients < 1 or requests < clients or max_tokens < 1 or not methods:
        raise ValueError("need clients >= 1, requests >= clients, max_tokens >= 1, a method")
    for method in methods:
        parse_method(method)
    ee = ee or EarlyExit.load(model, dtype=dtype)
    prompts = [item.instruction for item in get_generation_task(task).items(requests)]
    prompts = [prompts[i % len(prompts)] for i in range(requests)]
    load_before = os.getloadavg()[0]
    with running_server(ee, methods[0]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        alone: dict[tuple[str, str], str] = {}
        for method in methods:  # reference answers, one request at a time (also warms up)
            if _deterministic(method, temperature):
                for prompt in dict.fromkeys(prompts):
                    alone[method, prompt] = _one(
                        client, ee.name, prompt, method, max_tokens, temperature
                    )[2]
            else:
                _one(client, ee.name, prompts[0], method, max_tokens, temperature)
        results: dict[str, list] = {m: [] for m in methods}
        errors: dict[str, list[str]] = {m: [] for m in methods}
        wall = dict.fromkeys(methods, 0.0)
        with ThreadPoolExecutor(clients) as pool:
            for start in range(0, requests, clients):  # one round: every method in turn
                batch = prompts[start : start + clients]
                for method in methods:
                    began = time.perf_counter()
                    futures = [
                        (p, pool.submit(_one, client, ee.name, p, method, max_tokens, temperature))
                        for p in batch
                    ]
                    for prompt, future in futures:
                        try:
                            results[method].append((prompt, *future.result()))
                        except Exception as err:  # noqa: BLE001 - counted and reported
                            errors[method].append(f"{type(err).__name__}: {err}"[:200])
                    wall[method] += time.perf_counter() - began
    loads = []
    for method in methods:
        rows = results[method]
        latency = sorted(r[1] for r in rows) or [float("nan")]
        ttft = sorted(r[2] for r in rows) or [float("nan")]
        tokens = sum(r[4] for r in rows)
        compared = [r for r in rows if (method, r[0]) in alone]
        loads.append(
            MethodLoad(
                method=method,
                requests=len(rows) + len(errors[method]),
                errors=len(errors[method]),
                p50_s=statistics.median(latency),
                p95_s=latency[min(len(latency) - 1, round(0.95 * (len(latency) - 1)))],
                ttft_p50_s=statistics.median(ttft),
                completion_tokens=tokens,
                wall_s=wall[method],
                tokens_per_s=tokens / wall[method] if wall[method] else 0.0,
                avg_layers=statistics.fmean(r[5] for r in rows) if rows else float("nan"),
                compared=len(compared),
                mismatches=sum(r[3] != alone[method, r[0]] for r in compared),
                error_messages=errors[method][:5],
            )
        )
    return {
        "model": ee.name,
        "weights": ee.engine.weights,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "task": task,
        "clients": clients,
        "requests_per_method": requests,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "scheduling": "one request decodes at a time (the API's lock); others queue",
        "warmup": "each method's reference answers (or one request) before the load",
        "methods": [asdict(load) for load in loads],
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }


def render_server_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"{result['model']} ({result['weights']}) behind `earlyexit serve`: "
        f"{result['clients']} streaming clients, {result['requests_per_method']} requests per "
        f"method, {result['max_tokens']} tokens, {result['threads']} threads, {result['cpu']}"
    )
    cols = ("method", "errors", "p50 s", "p95 s", "TTFT p50 s", "tok/s", "layers/token")
    for col in (*cols, "same as alone"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in result["methods"]:
        same = f"{m['compared'] - m['mismatches']}/{m['compared']}" if m["compared"] else "n/a"
        table.add_row(
            m["method"],
            str(m["errors"]),
            f"{m['p50_s']:.2f}",
            f"{m['p95_s']:.2f}",
            f"{m['ttft_p50_s']:.2f}",
            f"{m['tokens_per_s']:.1f}",
            f"{m['avg_layers']:.1f}",
            same,
        )
    return table
