"""One request through `EarlyExit.generate` (the scheduler at batch 1, the path of the API,
the server, `earlyexit generate` and `bench generate`) against the batch-1 decoder loop
of the same method (runtime/generation.py `build_decoder`), on the same prompts.

smollm2-135m as `EarlyExit.load` gives it (int4 where chosen, compiled steps where timed
faster), SAMSum's first 6 dialogues, 64 tokens, greedy, in the main thread; both paths
warmed up first (decoders built, calibration and pass costs done), then each prompt
decoded by each method on both paths in turn (interleaved). Prints tok/s per path and
their ratio. Run:
python scripts/experiments/api_vs_decoder.py [full,lossless,free]
"""

from __future__ import annotations

import sys
import time

from earlyexit.api import EarlyExit
from earlyexit.decoding.shallow_deep import DecodeConfig
from earlyexit.engine.kernels import cpu_model
from earlyexit.runtime.generation import GenConfig, build_decoder, shallow_exit
from earlyexit.tasks.generation import get_generation_task, render_prompt

TOKENS = 64


def main() -> None:
    methods = sys.argv[1].split(",") if len(sys.argv) > 1 else ["full", "lossless", "free"]
    ee = EarlyExit.load("smollm2-135m")
    engine = ee.engine
    prompts = [
        render_prompt(engine.tokenizer, item.instruction)
        for item in get_generation_task("samsum").items(6)
    ]
    config = GenConfig()
    shallow, _ = shallow_exit(engine, config)
    decoders = {m: build_decoder(m, engine, shallow, config) for m in methods}
    for m in methods:  # warm-up: builds, calibration, pass costs
        decoders[m](prompts[0], DecodeConfig(max_new_tokens=4))
        ee.generate(prompts[0], method=m, max_new_tokens=4, chat=False)
    totals = {m: [0.0, 0.0, 0, 0] for m in methods}
    for prompt in prompts:
        for m in methods:
            began = time.perf_counter()
            alone = decoders[m](prompt, DecodeConfig(max_new_tokens=TOKENS))
            middle = time.perf_counter()
            api = ee.generate(prompt, method=m, max_new_tokens=TOKENS, chat=False)
            end = time.perf_counter()
            row = totals[m]
            row[0] += middle - began
            row[1] += end - middle
            row[2] += len(alone.tokens)
            row[3] += len(api.tokens)
    print(f"{cpu_model()}, compiled steps: {engine.compiled is not None}, {TOKENS} tokens")
    for m, (loop_s, api_s, loop_n, api_n) in totals.items():
        loop_rate, api_rate = loop_n / loop_s, api_n / api_s
        print(
            f"{m:10s} decoder loop {loop_rate:6.1f} tok/s   EarlyExit.generate "
            f"{api_rate:6.1f} tok/s   ratio {api_rate / loop_rate:.2f}"
        )


if __name__ == "__main__":
    main()
