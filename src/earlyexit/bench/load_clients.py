"""The clients of `bench serve`, in a process of their own, as a load test's clients are.

Their Python (the `openai` client parsing every streamed chunk, a thread per client) then
shares the machine's cores with the server as remote clients' would not, but never its
GIL, and the server's process holds only what `earlyexit serve` holds (llama-server, the
peer, runs in a process of its own too). This module imports no torch:
`python -m earlyexit.bench.load_clients` reads one JSON line per round on stdin (the
server's URL, the model, [prompt, method] per request, max_tokens, temperature, clients),
sends the round's requests by `clients` clients in a closed loop (each client sends its
next request as soon as its previous answer has ended, as users at a steady load do),
streaming, and writes one JSON line back: the round's wall time and per request its answer
or its error.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

LLAMA_SERVER = "llama-server"  # the cell name of llama.cpp's own server (no early_exit)


def ask(client: Any, model: str, prompt: str, method: str, tokens: int, temperature: float):  # noqa: ANN201 - Answer's tuple
    """(latency s, time to first token s, text, completion tokens, avg layers) of one
    streamed chat completion."""
    began = time.perf_counter()
    first = None
    pieces, usage, telemetry = [], None, None
    # llama-server would reuse a slot's KV for a prompt it has seen (the bench repeats its
    # prompts across cells), which earlyexit does not do: every prompt is prefilled
    body = {"cache_prompt": False} if method == LLAMA_SERVER else {"early_exit": {"method": method}}
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=tokens,
        temperature=temperature,
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=body,
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


def _round(clients: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The round's requests by `spec["clients"]` closed-loop clients (default: all at
    once); the wall time from the first sent to the last answered."""
    import openai

    url = spec["url"]
    if url not in clients:
        clients[url] = openai.OpenAI(
            base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=900
        )
    client, requests = clients[url], spec["requests"]

    def one(request: list[str]) -> dict[str, Any]:
        prompt, method = request
        try:
            return {
                "answer": ask(
                    client, spec["model"], prompt, method, spec["max_tokens"], spec["temperature"]
                )
            }
        except Exception as err:  # noqa: BLE001 - counted and reported by the bench
            return {"error": f"{type(err).__name__}: {err}"[:200]}

    began = time.perf_counter()
    # a pool of `clients` threads: each takes the next request when its answer has ended
    with ThreadPoolExecutor(spec.get("clients") or len(requests)) as pool:
        answers = list(pool.map(one, requests))
    return {"wall_s": time.perf_counter() - began, "answers": answers}


def serve_rounds(source: IO[str], sink: IO[str]) -> None:
    """One round per JSON line of `source`, its result as one JSON line on `sink`."""
    clients: dict[str, Any] = {}
    for line in source:
        sink.write(json.dumps(_round(clients, json.loads(line))) + "\n")
        sink.flush()


class ClientProcess:
    """The parent's handle on the clients' process: `round` sends a round and waits."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "earlyexit.bench.load_clients"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def round(
        self,
        url: str,
        model: str,
        requests: list[tuple[str, str]],
        max_tokens: int,
        temperature: float,
        clients: int | None = None,
    ) -> tuple[float, list[dict[str, Any]]]:
        """(wall s, per request {"answer": ask's tuple} or {"error": line}); the requests
        sent by `clients` closed-loop clients (None: all at once)."""
        process = self._process
        assert process.stdin is not None and process.stdout is not None
        spec = {
            "url": url,
            "model": model,
            "requests": [list(r) for r in requests],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "clients": clients or len(requests),
        }
        process.stdin.write(json.dumps(spec) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's client process exited ({process.wait()})")
        result = json.loads(line)
        return result["wall_s"], result["answers"]

    def close(self) -> None:
        process = self._process
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()

    def __enter__(self) -> ClientProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    serve_rounds(sys.stdin, sys.stdout)
