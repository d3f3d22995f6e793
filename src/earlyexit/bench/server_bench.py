"""`bench serve`: a bounded load test of `earlyexit serve` on localhost, methods and batch
limits side by side at several client counts.

One server per batch limit (`--max-batch 8,1`: continuous batching, and one request at a
time) runs in this process (uvicorn in a thread) on a free port, all on the same loaded
model, and every model computation of the bench (decoders built, solo answers) runs in
the loops' thread (runtime/scheduler.py: one computing thread); clients are the official
`openai` client in threads of a process of their own (bench/load_clients.py), streaming
chat completions of a generation task's prompts. Per client count and cell (batch limit x
method): `requests` requests sent by `clients` closed-loop clients (each sends its next
request as soon as its previous answer ends, so the server holds `clients` requests at
every moment, as with users at a steady load), in blocks of BLOCK x `clients` requests that
rotate the cells (so machine drift hits them alike). (Rounds of `clients` requests sent at
once, waiting for the round, drained the batch at every round's end: a mean running batch
of 4.3 at 8 clients, where closed-loop clients kept 6.3: BENCHMARKS.md.) Reported per
cell: errors, completion tokens per second of wall time, p50/p95 latency (request sent ->
last chunk) and time to first token, the
scheduler's mean running batch, layers per token, and cross-talk: every greedy answer is
compared with the answer to the same prompt requested alone, before the load; one that
parts from it where the solo run's top-2 logit gap is within the measured batch rounding
bound is counted as a tie, any other difference as a mismatch (`free` and `calm` exit by
the load, and free learns: not compared).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from earlyexit.api import EarlyExit
from earlyexit.bench.load_clients import LLAMA_SERVER, ClientProcess
from earlyexit.engine.kernels import cpu_model
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.generation import parse_method
from earlyexit.runtime.scheduler import Scheduler, serve_here


@dataclass
class MethodLoad:
    method: str
    max_batch: int  # the scheduler's running-row limit (1: one request at a time)
    clients: int
    requests: int
    errors: int
    p50_s: float
    p95_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    completion_tokens: int
    wall_s: float  # summed over this cell's blocks
    tokens_per_s: float  # completion tokens / wall_s
    mean_batch: float  # running rows per decode pass while this cell ran (0: not batched)
    steps: int  # the scheduler's decode passes while this cell ran
    drafted_rows: int  # rows that carried n-gram drafts into those passes
    exit_tries: int  # passes that read FREE rows' shallow exits
    exit_skips: int  # of those, passes where every row exited (deep layers skipped)
    avg_layers: float  # mean over requests of layers per decode-phase token
    compared: int  # answers compared with the same prompt's answer alone
    mismatches: int  # of those, how many differ beyond a near-tie (cross-talk)
    ties: int  # of those, how many part at a near-tie of the solo run (rounding)
    error_messages: list[str] = field(default_factory=list)


@contextmanager
def running_server(
    ee: EarlyExit, method: str, start_seconds: float = 60, **options: Any
) -> Iterator[str]:
    """The server on a free localhost port in a thread (`options`: create_app's); yields
    its base URL, and checks that it stops (within a minute) on the way out."""
    import uvicorn

    from earlyexit.server import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(ee, method, **options)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error")
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


@contextmanager
def llama_server(
    binary: Path, gguf: Path, slots: int, context: int, threads: int, start_seconds: float = 120
) -> Iterator[str]:
    """llama.cpp's server (continuous batching over `slots` parallel slots) on the GGUF, on
    a free localhost port; yields its base URL once /health answers, stops it after."""
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(context * slots),
        "-t",
        str(threads),
        "--no-webui",
        "--cache-ram",  # no prompt cache across slots (requests send cache_prompt: false)
        "0",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_seconds
    try:
        while True:
            if process.poll() is not None:
                tail = process.stderr.read().decode(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"llama-server exited ({process.returncode}): {tail}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not answer /health in {start_seconds} s")
            time.sleep(0.25)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _deterministic(method: str, temperature: float) -> bool:
    if method == LLAMA_SERVER:
        return False
    # free's and calm's exits depend on the load by design (tried only while they pay at
    # this batch size), and free's adaptive threshold learns across requests: their
    # answers are not compared
    return temperature == 0 and parse_method(method).name not in ("free", "calm")


def _tie_prefix(ee: EarlyExit, prompt: str, tokens: list[int], bound: float) -> str:
    """The solo answer's text up to its first near-tie (top-2 logit gap within `bound`,
    which a batch's rounding may flip): what the same answer under load must begin with."""
    from earlyexit.tasks.generation import render_prompt

    engine = ee.engine
    ids, _ = engine.encode([render_prompt(engine.tokenizer, prompt)])
    sequence = torch.cat([ids[0], torch.tensor(tokens[:-1], dtype=ids.dtype)])[None]
    with torch.inference_mode(), ee._lock:
        logits = engine.model(input_ids=sequence).logits[0, ids.shape[1] - 1 :]
    top = logits.float().topk(2, dim=-1).values
    gaps = (top[:, 0] - top[:, 1]).tolist()
    cut = next((i for i, gap in enumerate(gaps) if gap <= bound), len(tokens))
    return engine.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


# requests per client in one block of a cell: a block ends when its last answer does, so the
# batch drains once per block (over about one request's time), not after every request
BLOCK = 4

# logits of a row in a batch against alone (scripts/experiments/batch_rounding.py):
# fp32 9.2e-5, int4 0.67 on the AMD EPYC; answers parting at a solo gap within this are ties
TIE_BOUND = {"float32": 1e-3, "int4": 1.5, "int8": 1.5, "bfloat16": 1.5}


@dataclass
class _Load:
    """What every request of one bench run shares: the model's name, the methods, the
    prompts (one per request of a cell) and the decoding settings."""

    name: str
    methods: Sequence[str]
    prompts: list[str]
    max_tokens: int
    temperature: float

    def round(
        self,
        clients: ClientProcess,
        url: str,
        requests: list[tuple[str, str]],
        concurrency: int | None = None,
    ) -> tuple[float, list[dict[str, Any]]]:
        """(wall s, per request {"answer": load_clients.ask's tuple} or {"error": line}):
        the requests sent by `concurrency` closed-loop clients (None: all at once)."""
        return clients.round(
            url, self.name, requests, self.max_tokens, self.temperature, concurrency
        )

    def ask(self, clients: ClientProcess, url: str, prompt: str, method: str):  # noqa: ANN201 - ask's tuple
        """One request alone; its error raised here."""
        (reply,) = self.round(clients, url, [(prompt, method)])[1]
        if "error" in reply:
            raise EarlyExitError(f"{method} at {url}: {reply['error']}")
        return reply["answer"]


def run_server_bench(
    model: str = "smollm2-135m",
    methods: Sequence[str] = ("full", "lossless", "free"),
    clients: Sequence[int] = (1, 4, 8),
    requests: int = 16,
    max_tokens: int = 32,
    task: str = "samsum",
    dtype: str = "auto",
    temperature: float = 0.0,
    max_batches: Sequence[int] = (8, 1),
    ee: EarlyExit | None = None,
    llama_server_binary: Path | None = None,
) -> dict[str, Any]:
    """Per client count, `requests` streamed requests per (batch limit, method) cell, sent
    by that many closed-loop clients, the cells interleaved block by block, each cell's answers
    compared with the same prompt answered alone; with `llama_server_binary`, llama.cpp's
    server on the model's GGUF (as many slots as the most clients) is one more cell."""
    from earlyexit.tasks.generation import get_generation_task

    clients = sorted(set(clients))
    if not clients or clients[0] < 1 or requests < clients[-1] or max_tokens < 1 or not methods:
        raise ValueError("need clients >= 1, requests >= the most clients, max_tokens >= 1")
    for method in methods:
        parse_method(method)
    base = ee or EarlyExit.load(model, dtype=dtype)
    servers = {
        b: EarlyExit.from_engine(base.engine, max_batch=b, max_queue=4 * requests)
        for b in max_batches
    }
    for server in servers.values():  # as `earlyexit serve` does: no timing under load
        server.scheduler.prepare({parse_method(m).name for m in methods})
    prompts = [item.instruction for item in get_generation_task(task).items(requests)]
    prompts = [prompts[i % len(prompts)] for i in range(requests)]
    load = _Load(base.name, methods, prompts, max_tokens, temperature)
    bound = TIE_BOUND.get(base.engine.weights, 1.5)
    load_before = os.getloadavg()[0]

    # Every torch computation runs in this thread, the loops' (see `_beside_the_loops`):
    # the solo answers the HTTP ones are compared with, and their tie-free prefixes.
    solo = _solo_prefixes(servers, base, load, bound)

    def bench() -> list[MethodLoad]:
        with contextlib.ExitStack() as stack:
            client_process = stack.enter_context(ClientProcess())
            url_of = _open_servers(stack, servers, load, llama_server_binary, clients[-1])
            warm = functools.partial(load.ask, client_process)
            if 0 in url_of:
                warm(url_of[0], load.prompts[0], LLAMA_SERVER)
            alone = _answers_alone(warm, url_of, servers, load, solo)
            keys = [(b, m) for b in servers for m in methods]
            if 0 in url_of:
                keys.append((0, LLAMA_SERVER))  # batch limit 0: llama-server's own slots
            return [
                cell
                for count in clients
                for cell in _blocks(count, keys, client_process, url_of, servers, load, alone)
            ]

    # The clients run in a worker thread; this thread, which loaded the model, runs every
    # server's loop (a decode in another thread is slower: Scheduler.run).
    cells = _beside_the_loops([ee_b.scheduler for ee_b in servers.values()], bench)
    for ee_b in servers.values():
        ee_b.close()
    return {
        "model": base.name,
        "weights": base.engine.weights,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "task": task,
        "clients": clients,
        "max_batches": list(max_batches),
        "requests_per_cell": requests,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "tie_bound": bound,
        "scheduling": "full, lossless and free continuously batched up to max_batch rows "
        "(free rows try their shallow exits while that measurably pays at the running batch "
        "size); llama-server (max batch 0 in the JSON): "
        "its own continuous batching over as many slots as the most clients",
        "llama_server": str(llama_server_binary) if llama_server_binary else None,
        "warmup": "each method's reference answers (or one request per server) before the load",
        "order": f"closed-loop clients; cells (batch limit x method) rotated block by block "
        f"({BLOCK} requests per client per block)",
        "cells": [asdict(cell) for cell in cells],
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
    }


def _open_servers(
    stack: contextlib.ExitStack,
    servers: dict[int, EarlyExit],
    load: _Load,
    llama_server_binary: Path | None,
    slots: int,
) -> dict[int, str]:
    """Each batch limit's server on a free port (kept open by `stack`): its base URL; with
    a llama-server binary, that server (`slots` slots) as limit 0."""
    first = load.methods[0]
    url_of = {b: stack.enter_context(running_server(s, first)) for b, s in servers.items()}
    if llama_server_binary is not None:
        from earlyexit.bench.llamacpp import model_gguf

        gguf = model_gguf(load.name)
        if gguf is None:
            raise EarlyExitError(f"{load.name} has no GGUF for llama-server")
        context = 2048  # per slot: a SAMSum prompt and its answer fit
        threads = torch.get_num_threads()
        server = llama_server(llama_server_binary, gguf, slots, context, threads)
        url_of[0] = stack.enter_context(server)
    return url_of


def _solo_prefixes(
    servers: dict[int, EarlyExit], base: EarlyExit, load: _Load, bound: float
) -> dict[tuple[str, str], str]:
    """Every server's decoder for every method built (a first request builds it: its
    calibration is torch work, kept out of the HTTP handlers' threads), and each
    deterministic method's answer to each prompt from the API, cut at the solo run's first
    near-tie: (method, prompt) -> tie-free prefix."""
    prefixes = {}
    server = servers[next(iter(servers))]
    for method in load.methods:
        for each in servers.values():
            each.generate(load.prompts[0], method=method, max_new_tokens=2)
        if not _deterministic(method, load.temperature):
            continue
        for prompt in dict.fromkeys(load.prompts):
            generation = server.generate(
                prompt, method=method, max_new_tokens=load.max_tokens, temperature=0.0, seed=0
            )
            prefixes[method, prompt] = _tie_prefix(base, prompt, generation.tokens, bound)
    return prefixes


def _answers_alone(
    ask: Callable[[str, str, str], tuple],
    url_of: dict[int, str],
    servers: dict[int, EarlyExit],
    load: _Load,
    solo: dict[tuple[str, str], str],
) -> dict[tuple[str, str], tuple[str, str]]:
    """Each deterministic method's answer to each prompt requested alone over HTTP
    (`ask(url, prompt, method)`), before the load (also every server's warm-up), with its
    tie-free prefix from `solo`: (method, prompt) -> (text, tie-free prefix)."""
    first = next(iter(servers))
    alone: dict[tuple[str, str], tuple[str, str]] = {}
    for method in load.methods:
        for b in servers:  # every server's HTTP path warms up (decoders: _solo_prefixes)
            ask(url_of[b], load.prompts[0], method)
        for prompt in dict.fromkeys(load.prompts):
            if (method, prompt) in solo:
                text = ask(url_of[first], prompt, method)[2]
                alone[method, prompt] = (text, solo[method, prompt])
    return alone


def _blocks(
    count: int,
    keys: list[tuple[int, str]],
    client_process: ClientProcess,
    url_of: dict[int, str],
    servers: dict[int, EarlyExit],
    load: _Load,
    alone: dict[tuple[str, str], tuple[str, str]],
) -> list[MethodLoad]:
    """Every cell (batch limit, method) at `count` clients: blocks of BLOCK x `count`
    requests sent by `count` closed-loop clients, the cells' order rotated from block to
    block so drift hits all alike."""
    results: dict[tuple[int, str], list] = {k: [] for k in keys}
    errors: dict[tuple[int, str], list[str]] = {k: [] for k in keys}
    wall = dict.fromkeys(keys, 0.0)
    counted = {k: collections.Counter() for k in keys}  # scheduler counters
    size = BLOCK * count
    for block, start in enumerate(range(0, len(load.prompts), size)):
        batch = load.prompts[start : start + size]
        order = keys[block % len(keys) :] + keys[: block % len(keys)]
        for b, method in order:
            before = _counters(servers, b)
            requests = [(p, method) for p in batch]
            seconds, replies = load.round(client_process, url_of[b], requests, count)
            for prompt, reply in zip(batch, replies, strict=True):
                if "error" in reply:
                    errors[b, method].append(reply["error"])
                else:
                    results[b, method].append((prompt, *reply["answer"]))
            wall[b, method] += seconds
            counted[b, method].update(_counters(servers, b))
            counted[b, method].subtract(before)
    return [
        _cell(m, b, count, results[b, m], errors[b, m], wall[b, m], counted[b, m], alone)
        for b, m in keys
    ]


def _beside_the_loops(schedulers: list[Scheduler], work: Callable[[], Any]) -> Any:
    """`work()` in a worker thread while this thread runs the schedulers' loops (until it
    returns); its result, or its exception raised here."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = work()
        except BaseException as err:  # noqa: BLE001 - raised in the calling thread
            out["error"] = err

    worker = threading.Thread(target=target, name="earlyexit-bench-load", daemon=True)
    worker.start()
    serve_here(schedulers, stop=lambda: not worker.is_alive())
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


COUNTERS = ("steps", "rows_stepped", "drafted_rows", "exit_tries", "exit_skips")


def _counters(servers: dict[int, EarlyExit], limit: int) -> collections.Counter:
    """The scheduler's counters (since its start) of the server with batch limit `limit`."""
    if limit not in servers:
        return collections.Counter()  # llama-server: not ours to count
    stats = servers[limit].scheduler_stats()
    return collections.Counter({name: getattr(stats, name) for name in COUNTERS})


def _cell(
    method: str,
    max_batch: int,
    clients: int,
    rows: list,
    errors: list[str],
    wall: float,
    counted: collections.Counter,
    alone: dict[tuple[str, str], tuple[str, str]],
) -> MethodLoad:
    latency = sorted(r[1] for r in rows) or [float("nan")]
    ttft = sorted(r[2] for r in rows) or [float("nan")]
    tokens = sum(r[4] for r in rows)
    compared = [r for r in rows if (method, r[0]) in alone]
    differ = [r for r in compared if r[3] != alone[method, r[0]][0]]
    crossed = [r for r in differ if not r[3].startswith(alone[method, r[0]][1])]
    return MethodLoad(
        method=method,
        max_batch=max_batch,
        clients=clients,
        requests=len(rows) + len(errors),
        errors=len(errors),
        p50_s=statistics.median(latency),
        p95_s=_p95(latency),
        ttft_p50_s=statistics.median(ttft),
        ttft_p95_s=_p95(ttft),
        completion_tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall else 0.0,
        mean_batch=counted["rows_stepped"] / counted["steps"] if counted["steps"] else 0.0,
        steps=counted["steps"],
        drafted_rows=counted["drafted_rows"],
        exit_tries=counted["exit_tries"],
        exit_skips=counted["exit_skips"],
        avg_layers=statistics.fmean(r[5] for r in rows) if rows else float("nan"),
        compared=len(compared),
        mismatches=len(crossed),
        ties=len(differ) - len(crossed),
        error_messages=errors[:5],
    )


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def render_server_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=f"{result['model']} ({result['weights']}) behind `earlyexit serve`: streaming "
        f"clients {result['clients']}, {result['requests_per_cell']} requests per cell, "
        f"{result['max_tokens']} tokens, {result['threads']} threads, {result['cpu']}"
    )
    cols = (
        "clients",
        "method",
        "max batch",
        "errors",
        "tok/s",
        "p50 s",
        "p95 s",
        "TTFT p50 s",
        "TTFT p95 s",
        "mean batch",
        "rows drafting",
        "exits skipped/tried",
        "layers/token",
    )
    for col in (*cols, "same as alone"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for m in result["cells"]:
        same = "n/a"
        if m["compared"]:
            same = f"{m['compared'] - m['mismatches'] - m['ties']}/{m['compared']}"
            same += f" (+{m['ties']} ties)" if m["ties"] else ""
        table.add_row(
            str(m["clients"]),
            m["method"],
            str(m["max_batch"]) if m["method"] != "llama-server" else "slots",
            str(m["errors"]),
            f"{m['tokens_per_s']:.1f}",
            f"{m['p50_s']:.2f}",
            f"{m['p95_s']:.2f}",
            f"{m['ttft_p50_s']:.2f}",
            f"{m['ttft_p95_s']:.2f}",
            f"{m['mean_batch']:.2f}",
            f"{m['drafted_rows'] / (m['mean_batch'] * m['steps']):.0%}" if m["steps"] else "n/a",
            f"{m['exit_skips']}/{m['exit_tries']}" if m["steps"] else "n/a",
            f"{m['avg_layers']:.1f}",
            same,
        )
    return table
