"""What `--compiled` (engine/compiled.py) costs: how many greedy answers it changes against
the eager int4 engine, and how long its full-depth span takes to compile cold.

    python scripts/experiments/compiled_vs_eager.py answers [N]
    python scripts/experiments/compiled_vs_eager.py compile [cpp|python]

`answers` decodes SAMSum's first N test dialogues (default 20; 48 tokens) with `full` on
both engines and counts identical answers. `compile` times the first compiled decode in a
fresh inductor cache (its C++ or Python wrapper), then decode tokens/s (64 tokens). Both
print a JSON line and write no files.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def answers(n: int) -> dict:
    from earlyexit.api import EarlyExit
    from earlyexit.tasks.generation import get_generation_task

    ee = EarlyExit.load("smollm2-135m", dtype="int4")
    items = get_generation_task("samsum").items(n)
    runs = {}
    for compiled in (False, True):
        ee.engine.set_compiled(compiled)
        runs[compiled] = [
            ee.generate(it.instruction, method="full", max_new_tokens=48).tokens for it in items
        ]
    first = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        for a, b in zip(runs[False], runs[True], strict=True)
    ]
    return {"dialogues": n, "identical": first.count(None), "first_divergence": first}


def compile_cost(wrapper: str) -> dict:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # cold: nothing cached
    import earlyexit.engine.compiled as compiled_module
    from earlyexit.engine import LayerEngine
    from earlyexit.models import load_model

    compiled_module.COMPILE_OPTIONS = {"cpp_wrapper": wrapper == "cpp"}
    engine = LayerEngine(load_model("smollm2-135m", dtype="int4"))
    ids = engine.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    engine.set_compiled(True)
    start = time.perf_counter()
    engine.greedy(ids, 2)  # one compiled one-token step: the (0, 30) span compiles
    cold = time.perf_counter() - start
    start = time.perf_counter()
    engine.greedy(ids, 65)
    long = time.perf_counter() - start
    start = time.perf_counter()
    engine.greedy(ids, 1)
    short = time.perf_counter() - start
    return {"wrapper": wrapper, "cold_compile_s": cold, "decode_tok_s": 64 / (long - short)}


def main() -> None:
    from earlyexit.engine.kernels import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("answers", "compile"))
    parser.add_argument("arg", nargs="?", default=None)
    args = parser.parse_args()
    if args.what == "answers":
        result = answers(int(args.arg or 20))
    else:
        result = compile_cost(args.arg or "cpp")
    print(json.dumps({"cpu": cpu_model(), **result}))


if __name__ == "__main__":
    main()
