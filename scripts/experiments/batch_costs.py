"""What a running batch costs, for the arithmetic of bench serve's targets (BENCHMARKS.md).

Prints, on smollm2-135m as `EarlyExit.load` gives it (int4 where chosen, compiled steps
where timed faster): a prefill of 300 prompt tokens, one eager `run_rows` pass over 1 / 2 /
4 / 8 rows one token each (keys of 300 slots), and the scheduler's seconds per token for one
request alone (64 tokens after a 300-token prompt). Medians of 5 after a warm-up, in the
main thread (runtime/scheduler.py: one computing thread). Run:
python scripts/experiments/batch_costs.py
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import torch

from earlyexit.api import EarlyExit
from earlyexit.decoding.shallow_deep import DecodeConfig
from earlyexit.engine.kernels import cpu_model
from earlyexit.runtime.scheduler import Job, Scheduler

PROMPT_TOKENS = 300


def median_ms(fn: Callable[[], object], rounds: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def main() -> None:
    ee = EarlyExit.load("smollm2-135m")
    engine = ee.engine
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {engine.weights}")
    ids = torch.randint(100, 20000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ms = median_ms(lambda: engine.prefill(ids, capacity=PROMPT_TOKENS))
        print(f"prefill {PROMPT_TOKENS} tokens: {ms:.1f} ms")
        for rows in (1, 2, 4, 8):
            cache = engine.new_row_cache(8, 2 * PROMPT_TOKENS)
            for _ in range(rows):
                cache.add(engine.prefill(ids, capacity=PROMPT_TOKENS).cache)
            hidden = engine.embed(torch.randint(100, 2000, (rows, 1)))

            def step(cache=cache, rows=rows, hidden=hidden) -> None:
                for row in range(rows):
                    cache.set_fill(row, PROMPT_TOKENS)
                engine.run_rows(hidden, cache, 0, engine.num_layers)

            print(f"run_rows over {rows} rows x 1 token: {median_ms(step):.1f} ms")
    scheduler = Scheduler(engine, threading.Lock(), max_batch=8)
    per_token = []
    for _ in range(3):
        config = DecodeConfig(max_new_tokens=64, stop_at_eos=False)
        began = time.perf_counter()
        result = scheduler.run(Job(ids, config, drafts=False))
        decode = time.perf_counter() - began - result.prefill_seconds
        per_token.append(1e3 * decode / (len(result.tokens) - 1))
    print(f"scheduler, one request: {statistics.median(per_token[1:]):.1f} ms per token")


if __name__ == "__main__":
    main()
