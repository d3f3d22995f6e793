"""`earlyexit serve` (earlyexit.server): a real uvicorn server on localhost, called with the
real `openai` client (and raw HTTP for what the client cannot send), on smollm2-135m."""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from earlyexit.api import EarlyExit
from earlyexit.bench.server_bench import running_server
from earlyexit.engine import LayerEngine

MODEL = "smollm2-135m"
PROMPT = "The three primary colours are"
MESSAGES = [{"role": "user", "content": "Name three colours."}]
TOKENS = 12
BOUND = 1e-3  # fp32 logits in a batch against alone (tests/test_scheduler.py)


@pytest.fixture(scope="module")
def ee(smol: LayerEngine) -> EarlyExit:
    return EarlyExit.from_engine(smol)


@pytest.fixture(scope="module")
def server(ee: EarlyExit) -> Iterator[str]:
    """uvicorn on a free localhost port, in a thread (the same as `bench serve` runs); it
    must start within a minute and stop when the module is done."""
    with running_server(ee, "lossless") as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _post(server: str, path: str, body: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        server + path, data=body.encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _get(server: str, path: str) -> str:
    with urllib.request.urlopen(server + path) as response:
        return response.read().decode()


def test_models_and_health(client: openai.OpenAI, server: str) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert json.loads(_get(server, "/health"))["status"] == "ok"


@pytest.mark.parametrize("method", ["full", "lossless"])
def test_greedy_completion_equals_the_api_and_the_engine(
    client: openai.OpenAI, ee: EarlyExit, smol: LayerEngine, method: str
) -> None:
    """Greedy `full` and `lossless` over HTTP give the API's answer, which is the engine's
    own greedy decoding (the model's output, token for token)."""
    response = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"early_exit": {"method": method}},
    )
    local = ee.generate(PROMPT, method=method, max_new_tokens=TOKENS, chat=False)
    ids, pad = smol.encode([PROMPT])
    greedy = smol.greedy(ids, TOKENS, pad)[0].tolist()
    choice = response.choices[0]
    assert local.tokens == greedy  # no EOS within 12 tokens of this prompt
    assert choice.text == local.text == smol.tokenizer.decode(greedy, skip_special_tokens=True)
    assert choice.finish_reason == "length" and response.object == "text_completion"
    assert response.usage.completion_tokens == TOKENS
    assert response.usage.prompt_tokens == ids.shape[1]
    telemetry = response.model_extra["early_exit"]
    assert telemetry["method"] == method and telemetry["num_layers"] == 30
    assert telemetry["shallow_fraction"] == 0.0
    if method == "full":
        assert telemetry["avg_layers"] == 30 and telemetry["draft_proposed"] == 0
    else:
        assert 0 <= telemetry["draft_accepted"] <= telemetry["draft_proposed"]
        assert telemetry["passes"] >= 1
    timings = response.model_extra["timings"]
    assert timings["prompt_n"] == ids.shape[1] and timings["predicted_n"] == TOKENS - 1
    assert timings["predicted_ms"] > 0 and timings["predicted_per_second"] > 0


def test_stream_equals_non_stream_chat(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": MESSAGES, "max_tokens": TOKENS, "temperature": 0}
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == "length"
    assert finishing[0].model_extra["early_exit"]["method"] == "lossless"
    assert finishing[0].model_extra["timings"]["predicted_n"] == TOKENS - 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage == whole.usage


def test_streamed_completion_ends_with_done(server: str) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=120)
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("content-type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    connection.close()
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2].removeprefix("data: "))
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"
    assert "usage" not in last  # only when stream_options.include_usage asks for it


def test_free_reports_its_exit_and_threshold(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"early_exit": {"method": "free", "shallow_layer": 24}},
    )
    telemetry = response.model_extra["early_exit"]
    assert telemetry["method"] == "free" and telemetry["shallow_layer"] == 24
    assert 0.0 < telemetry["threshold"] < 1.0
    assert telemetry["knobs"] == {"shallow_layer": 24}
    assert 0.0 <= telemetry["shallow_fraction"] <= 1.0
    assert "shallow_exit" in telemetry["artifacts"]


BAD = [
    ("{not json", 400, "malformed JSON"),
    ('{"model": "smollm2-135m", "prompt": "hi", "max_tokens": -3}', 400, "max_tokens"),
    ('{"model": "smollm2-135m", "prompt": "hi", "max_tokens": "many"}', 400, "max_tokens"),
    ('{"model": "smollm2-135m", "prompt": "hi", "max_tokens": 100000}', 400, "context"),
    ('{"model": "gpt-4", "prompt": "hi"}', 404, "not served here"),
    ('{"model": "smollm2-135m", "prompt": 5}', 400, "prompt"),
    ('{"model": "smollm2-135m"}', 400, "prompt: Field required"),
    ('{"model": "smollm2-135m", "prompt": "hi", "n": 2}', 400, "n=1"),
    ('{"model": "smollm2-135m", "prompt": "hi", "temperature": -1}', 400, "temperature"),
    ('{"model": "smollm2-135m", "prompt": "hi", "early_exit": {"method": "zzz"}}', 400, "zzz"),
    (
        '{"model": "smollm2-135m", "prompt": "hi", "early_exit": {"shallow_layer": 99}}',
        400,
        "shallow_layer",
    ),
    ('{"model": "smollm2-135m", "prompt": "hi", "early_exit": {"bogus": 1}}', 400, "bogus"),
    (  # a decoder's calibration runs in the serving loop: bounded for clients
        '{"model": "smollm2-135m", "prompt": "hi", "early_exit": {"calibration_prompts": 900}}',
        400,
        "calibration_prompts may be at most 32",
    ),
    (
        '{"model": "smollm2-135m", "prompt": "hi", "early_exit": {"risk": 2}}',
        400,
        "--risk must lie in (0, 1)",
    ),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD)
def test_bad_input_gets_a_4xx_and_the_server_lives(
    server: str, client: openai.OpenAI, body: str, status: int, words: str
) -> None:
    code, answer = _post(server, "/v1/completions", body)
    assert code == status
    error = answer["error"]
    assert words in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    after = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"early_exit": {"method": "full"}}
    )
    assert after.usage.completion_tokens == 2


def test_bad_chat_input(server: str, client: openai.OpenAI) -> None:
    code, answer = _post(
        server, "/v1/chat/completions", '{"model": "smollm2-135m", "messages": []}'
    )
    assert code == 400 and "messages is empty" in answer["error"]["message"]
    body = '{"model": "smollm2-135m", "messages": [{"role": "wizard", "content": "hi"}]}'
    code, answer = _post(server, "/v1/chat/completions", body)
    assert code == 400 and "role" in answer["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)
    code, answer = _post(server, "/v1/nowhere", "{}")
    assert code == 404 and answer["error"]["type"] == "not_found_error"


def _stream_text(client: openai.OpenAI, prompt: str, tokens: int = 8) -> str:
    chunks = client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"early_exit": {"method": "full", "stop_at_eos": False}},
    )
    return "".join(c.choices[0].text for c in chunks if c.choices)


def _comparable_prefix(
    smol: LayerEngine, teacher_forced: Callable, prompt: str, tokens: list
) -> str:
    """The text of the solo answer up to its first near-tie (top-2 gap within BOUND, which
    a batch's rounding may flip): what an answer under load must begin with."""
    logits = teacher_forced(smol, prompt, tokens)
    top = logits.topk(2, dim=-1).values
    gaps = (top[:, 0] - top[:, 1]).tolist()
    cut = next((i for i, gap in enumerate(gaps) if gap <= BOUND), len(tokens))
    return smol.tokenizer.decode(tokens[:cut], skip_special_tokens=True)


def test_concurrent_streams_do_not_cross_talk(
    client: openai.OpenAI, ee: EarlyExit, smol: LayerEngine, teacher_forced: Callable
) -> None:
    """Four streaming clients at once, decoded together in one running batch: each gets
    the answer it gets alone (tie-aware: see tests/test_scheduler.py)."""
    prompts = [
        "The capital of France is",
        "Water boils at",
        "Once upon a time, there was a",
        "The best way to learn is",
    ]
    alone = {
        p: ee.generate(p, method="full", max_new_tokens=8, chat=False, stop_at_eos=False)
        for p in prompts
    }
    steps = ee.scheduler_stats().steps
    with ThreadPoolExecutor(4) as pool:
        together = dict(
            zip(prompts, pool.map(lambda p: _stream_text(client, p), prompts), strict=True)
        )
    stats = ee.scheduler_stats()
    assert stats.steps - steps < 4 * 7  # fewer passes than one request at a time takes
    for prompt in prompts:
        start = _comparable_prefix(smol, teacher_forced, prompt, alone[prompt].tokens)
        assert together[prompt].startswith(start), (prompt, together[prompt], alone[prompt].text)


def _rows_freed(ee: EarlyExit, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = ee.scheduler_stats()
        if stats.running == stats.queued == stats.prefilling == 0:
            return True
        time.sleep(0.05)
    return False


def _abandon(server: str, body: dict) -> None:
    """Start a streamed completion, read its first event, and hang up."""
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=120)
    connection.request(
        "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # decoding has begun
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


LONG = {
    "model": MODEL,
    "prompt": PROMPT,
    "max_tokens": 2000,
    "stream": True,
    "early_exit": {"method": "full", "stop_at_eos": False},
}


def test_a_disconnected_stream_frees_its_row(server: str, ee: EarlyExit) -> None:
    """A client that goes away after the first chunk: its decode (2000 tokens, minutes at
    full depth) is cancelled and its row freed within seconds."""
    _abandon(server, LONG)
    assert _rows_freed(ee), f"the abandoned decode still holds a row: {ee.scheduler_stats()}"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_sixteen_clients_with_bad_requests_and_disconnects(
    server: str, client: openai.OpenAI, ee: EarlyExit
) -> None:
    """16 streaming clients at once (8 rows decode, 8 wait), with malformed requests and
    abandoned streams among them: every good stream gets its tokens, the bad ones a 400,
    and afterwards no row is running or leaked, /metrics says so, and memory is back."""
    _stream_text(client, PROMPT, 4)  # warm: buffers of this size exist once
    before = _rss_mb()
    with ThreadPoolExecutor(24) as pool:
        good = [pool.submit(_stream_text, client, f"{PROMPT} number {i}", 8) for i in range(16)]
        bad = [pool.submit(_post, server, "/v1/completions", body) for body, _, _ in BAD[:4]]
        gone = [pool.submit(_abandon, server, LONG) for _ in range(4)]
        texts = [f.result(timeout=600) for f in good]
        answers = [f.result(timeout=600) for f in bad]
        for f in gone:
            f.result(timeout=600)
    assert all(texts) and all(400 <= code < 500 for code, _ in answers)
    assert _rows_freed(ee), ee.scheduler_stats()
    metrics = _get(server, "/metrics")
    assert "earlyexit_running_rows 0.0" in metrics and "earlyexit_queue_depth 0.0" in metrics
    assert ee.scheduler.cache is None  # an idle scheduler keeps no KV
    assert _rss_mb() - before < 200, (before, _rss_mb())
    assert _stream_text(client, PROMPT, 2)  # and it still answers


def test_a_full_queue_answers_429_and_a_wrong_key_401(smol: LayerEngine) -> None:
    small = EarlyExit.from_engine(smol, max_batch=1, max_queue=1)
    with running_server(small, "full", api_key="sesame", methods=("full",)) as url:
        keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert json.loads(_get(url, "/health"))["status"] == "ok"  # open without a key
        assert keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices
        with pytest.raises(openai.BadRequestError, match="not served here"):
            keyed.completions.create(
                model=MODEL,
                prompt=PROMPT,
                max_tokens=2,
                extra_body={"early_exit": {"method": "free"}},
            )
        pool = ThreadPoolExecutor(1)
        with small._lock:  # the scheduler's loop cannot start a job
            waiting = pool.submit(
                keyed.completions.create, model=MODEL, prompt=PROMPT, max_tokens=2
            )
            while small.scheduler_stats().queued == 0:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as refused:
                keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
            assert refused.value.response.headers["retry-after"] == "1"
        assert waiting.result(timeout=120).usage.completion_tokens == 2
        pool.shutdown()
    small.close()


def test_a_request_past_its_timeout_gets_504_or_an_error_event(smol: LayerEngine) -> None:
    """--request-timeout: a long completion answers 504, a long stream ends with an error
    event and [DONE]; their rows are freed and the server answers the next request."""
    timed = EarlyExit.from_engine(smol, request_timeout=2.0)
    with running_server(timed, "full") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError, match="request timeout") as failed:
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4000)
        assert failed.value.status_code == 504
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4000, "stream": True}
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=120)
        connection.request(
            "POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"}
        )
        events = [e for e in connection.getresponse().read().decode().split("\n\n") if e]
        connection.close()
        assert events[-1] == "data: [DONE]"  # after the tokens that came in time
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert "request timeout" in error["message"]
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices
        assert timed.scheduler_stats().running == 0
    timed.close()


def test_classify_endpoint(server: str, ee: EarlyExit) -> None:
    body = {
        "texts": ["a gripping, beautifully acted film", "flat, dull and far too long"],
        "task": None,
        "labels": {"0": "negative", "1": "positive"},
        "method": "full",
    }
    code, answer = _post(server, "/v1/classify", json.dumps(body))
    assert code == 200, answer
    local = ee.classify(body["texts"], task=None, labels=body["labels"], method="full")
    assert answer["labels"] == local.labels and set(local.labels) <= {"negative", "positive"}
    assert answer["exit_layers"] == [30, 30] and answer["early_exit"]["avg_layers"] == 30
    body["method"] = "nonsense"
    code, answer = _post(server, "/v1/classify", json.dumps(body))
    assert code == 400 and "nonsense" in answer["error"]["message"]


def test_metrics_count_requests_tokens_and_layers(server: str, client: openai.OpenAI) -> None:
    client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, extra_body={"early_exit": {"method": "full"}}
    )
    text = _get(server, "/metrics")
    lines = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert lines['earlyexit_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert lines['earlyexit_tokens_total{kind="completion",method="full"}'] >= 3
    assert lines['earlyexit_layers_per_token_count{method="full"}'] >= 1
    assert lines['earlyexit_layers_per_token_bucket{le="29.0",method="full"}'] == 0  # all 30
    assert "earlyexit_request_seconds_bucket" in text


@pytest.mark.slow
def test_bench_serve_reports_every_cell_without_cross_talk(
    ee: EarlyExit, monkeypatch: pytest.MonkeyPatch
) -> None:
    from earlyexit.bench.server_bench import render_server_table, run_server_bench
    from earlyexit.runtime.scheduler import Scheduler

    prepared: list[int] = []  # pass costs timed before the load, as `earlyexit serve` does
    real_prepare = Scheduler.prepare

    def prepare(self: Scheduler, families: set[str]) -> None:
        prepared.append(self.max_batch)
        real_prepare(self, families)

    monkeypatch.setattr(Scheduler, "prepare", prepare)
    result = run_server_bench(
        methods=("full", "lossless", "free"),
        clients=(2,),
        requests=2,
        max_tokens=4,
        max_batches=(2, 1),
        ee=ee,
    )
    cells = {(c["max_batch"], c["method"]): c for c in result["cells"]}
    assert list(cells) == [(b, m) for b in (2, 1) for m in ("full", "lossless", "free")]
    for (batch, method), cell in cells.items():
        assert cell["requests"] == 2 and cell["errors"] == 0, cell["error_messages"]
        assert cell["completion_tokens"] == 8 and cell["p95_s"] >= cell["p50_s"] > 0
        # greedy full / lossless answers are compared with their answers alone; free's
        # threshold learns across requests, so its answers are not
        assert cell["compared"] == (0 if method == "free" else 2) and cell["mismatches"] == 0
        assert 1 <= cell["mean_batch"] <= batch  # batched: rows per pass within the limit
        assert cell["steps"] >= 1 and cell["exit_skips"] <= cell["exit_tries"] <= cell["steps"]
        if method == "full":  # what drafts and exits each cell tried is counted
            assert cell["drafted_rows"] == cell["exit_tries"] == 0
    assert cells[1, "full"]["mean_batch"] == 1 and cells[2, "full"]["avg_layers"] == 30
    assert render_server_table(result).row_count == 6
    assert sorted(prepared) == [1, 2]  # every server, before its first request


def test_bench_clients_run_in_a_process_of_their_own(server: str, ee: EarlyExit) -> None:
    """`bench serve`'s clients (bench/load_clients.py) stream from another process, one
    that imports no torch, so they take no CPU or GIL from the decode loop: a round's
    answers are the server's greedy answers, a refused request comes back as its error
    line while the round's other requests are answered, and one closed-loop client sends
    its requests one after another."""
    import subprocess
    import sys

    from earlyexit.bench.load_clients import ClientProcess

    probe = "import sys, earlyexit.bench.load_clients; print('torch' in sys.modules)"
    assert subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split() == ["False"]
    prompt = MESSAGES[0]["content"]
    with ClientProcess() as clients:
        wall, replies = clients.round(
            server, MODEL, [(prompt, "full"), (prompt, "no-such-method")], TOKENS, 0.0
        )
        pid = clients._process.pid
        # one closed-loop client: each request is sent when the one before it has ended
        looped, answers = clients.round(server, MODEL, [(prompt, "full")] * 3, TOKENS, 0.0, 1)
    assert looped >= sum(a["answer"][0] for a in answers)
    assert pid != os.getpid() and wall > 0
    latency, ttft, text, tokens, layers = replies[0]["answer"]
    assert latency >= ttft > 0 and tokens == TOKENS and layers == ee.num_layers
    expected = ee.generate(MESSAGES, method="full", max_new_tokens=TOKENS, temperature=0)
    assert text == expected.text
    assert "BadRequestError" in replies[1]["error"] and "no-such-method" in replies[1]["error"]


def test_one_thread_computes_while_a_server_runs(smol: LayerEngine) -> None:
    """Under `earlyexit serve` (the loop in the thread that loaded the model) every model
    computation runs in that thread: batched rows, a method that decodes alone (`static`),
    its decoder's first build, and classification, each asked by HTTP request threads. A
    second live thread running torch's parallel regions slows every decode ~3.5x (libgomp:
    scripts/experiments/thread_penalty.py)."""
    import threading

    from earlyexit.bench.server_bench import _beside_the_loops

    served = EarlyExit.from_engine(smol, max_batch=4)
    seen: set[int] = set()
    for name in ("run_layers", "run_rows", "prefill"):
        real = getattr(smol, name)

        def recording(*args: object, _real: Callable = real, **kwargs: object) -> object:
            seen.add(threading.get_ident())
            return _real(*args, **kwargs)

        setattr(smol, name, recording)
    try:

        def requests() -> tuple[list, int]:
            with running_server(served, "full", methods=("full", "static")) as url:
                client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

                def ask(method: str) -> str:
                    chunks = client.chat.completions.create(
                        model=MODEL,
                        messages=MESSAGES,
                        max_tokens=6,
                        temperature=0,
                        stream=True,
                        extra_body={"early_exit": {"method": method}},
                    )
                    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

                with ThreadPoolExecutor(3) as pool:
                    texts = list(pool.map(ask, ["full", "static", "full"]))
                body = {
                    "texts": ["a fine film"],
                    "task": None,
                    "method": "full",
                    "labels": {"0": "negative", "1": "positive"},
                }
                code, _ = _post(url, "/v1/classify", json.dumps(body))
            return texts, code

        texts, code = _beside_the_loops([served.scheduler], requests)
    finally:
        for name in ("run_layers", "run_rows", "prefill"):
            delattr(smol, name)
        served.close()
    assert all(texts) and code == 200
    assert seen == {threading.get_ident()}
