"""Is a decode slower in a thread other than the one that loaded the model, or beside one?

The scheduler (runtime/scheduler.py) decodes in its own thread; the model is loaded, timed
and warmed up in the main thread. This decodes the same 64 greedy tokens with `decode_full`
in the main thread, in a new thread at torch's thread count and at one thread, then in the
main thread again, for the compiled int4 steps and for the eager engine, and prints the
decode seconds of each (rounds interleaved). Run: python scripts/experiments/thread_penalty.py

Measured on an AMD EPYC (family 25 model 1, 2 cores, torch 2.13.0 with GNU OpenMP), int4
compiled: main thread 1.0-1.4 s, a new thread 2.9-3.1 s (2 threads) or 2.0 s (1 thread),
main again 1.0-1.2 s; eager int4 2.0 / 3.7 / 3.0 / 2.0 s. OMP_WAIT_POLICY=PASSIVE made every
case ~2.6 s, ACTIVE made the new thread 3.7 s, GOMP_SPINCOUNT=1e7 changed nothing, and
shrinking the main thread to one thread first did not help. The likely cause (not traced in
libgomp here): the main thread's OpenMP workers stay alive, so a second thread's team makes
more OpenMP threads than cores and libgomp falls back to short (throttled) spinning, every
parallel region then waiting on a sleeping worker.

The same holds the other way round, which is what the serving path must avoid: the first
column decodes in the main thread while another thread, which ran one parallel torch op
(an add over 17M elements) at 2 threads, stays alive and idle. On an Intel Xeon (family 6
model 167, 2 cores, at 26c4f92), int4 compiled: beside the idle thread 2.11-2.18 s, main
0.60-0.62 s (3.5x); eager 1.77-1.79 s against 1.05 s. (Torch's thread count is global:
"new thread x1" leaves it at 1, so the first column sets it back first.) So one thread runs
all model work (runtime/scheduler.py: rows and calls); the `bench serve` of BENCHMARKS
before 26c4f92 ran a forward in its clients' thread and measured every decode so.
"""

from __future__ import annotations

import threading

import torch

from earlyexit.api import EarlyExit
from earlyexit.decoding.shallow_deep import DecodeConfig, decode_full

PROMPT = "Summarize: Tom met Ann at the park. They played chess and Tom won twice. " * 6


def decode_seconds(ee: EarlyExit, threads: int | None = None) -> float:
    """Decode seconds of 64 greedy tokens, here or (threads given) in a new thread."""
    config = DecodeConfig(max_new_tokens=64, stop_at_eos=False)
    if threads is None:
        return decode_full(ee.engine, PROMPT, config).decode_seconds
    out: dict[str, float] = {}

    def run() -> None:
        torch.set_num_threads(threads)
        out["s"] = decode_full(ee.engine, PROMPT, config).decode_seconds

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return out["s"]


def decode_seconds_beside_idle(ee: EarlyExit) -> float:
    """Decode seconds here while another thread, which ran one parallel op, lives idle."""
    ran, leave = threading.Event(), threading.Event()

    def park() -> None:
        with torch.inference_mode():
            torch.randn(3000, 5760) + 1  # large enough for a parallel region
        ran.set()
        leave.wait()

    parked = threading.Thread(target=park)
    parked.start()
    ran.wait()
    try:
        return decode_seconds(ee)
    finally:
        leave.set()
        parked.join()


def main() -> None:
    ee = EarlyExit.load("smollm2-135m")
    threads = torch.get_num_threads()
    for compiled in ("on", "off"):
        ee.engine.set_compiled(compiled)
        decode_seconds(ee)  # warm-up
        for _ in range(2):
            torch.set_num_threads(threads)  # "new thread x1" below sets it for every thread
            cells = {
                "main beside an idle thread": decode_seconds_beside_idle(ee),
                "main": decode_seconds(ee),
                f"new thread x{threads}": decode_seconds(ee, threads),
                "new thread x1": decode_seconds(ee, 1),
                "main again": decode_seconds(ee),
            }
            line = ", ".join(f"{k} {v:.2f} s" for k, v in cells.items())
            print(f"{ee.engine.weights} compiled {compiled}: {line}", flush=True)


if __name__ == "__main__":
    main()
