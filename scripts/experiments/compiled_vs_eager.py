"""What compiled steps (engine/compiled.py) cost: how many greedy answers they change
against the eager int4 engine, and how long the layer step takes to build and to load.

    python scripts/experiments/compiled_vs_eager.py answers [N]
    python scripts/experiments/compiled_vs_eager.py compile
    python scripts/experiments/compiled_vs_eager.py load
    python scripts/experiments/compiled_vs_eager.py bound
    python scripts/experiments/compiled_vs_eager.py profile

`answers` decodes SAMSum's first N test dialogues (default 20; 48 tokens) with `full` on
both engines and counts identical answers. `compile` runs `load` in a fresh process with
an empty EARLYEXIT_HOME (cold: the build), then in another (warm: loading the library);
`load` times `set_compiled("on")`, then decode tokens/s compiled and eager (64 tokens,
median of 3 interleaved rounds). `bound`
is tests/test_compiled.py's measurement: the largest logit difference between compiled and
eager one-token steps, teacher-forced along 24 eager greedy tokens of its two prompts.
`profile` splits an eager int4 decode step's time by op (torch.profiler, 20 steps) and,
where llama-cpp-python is installed, times llama.cpp's decode step on the same prompt. Each
prints a JSON line (`compile` builds in a temporary EARLYEXIT_HOME).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def answers(n: int) -> dict:
    from earlyexit.api import EarlyExit
    from earlyexit.tasks.generation import get_generation_task

    ee = EarlyExit.load("smollm2-135m", dtype="int4", compiled="off")
    items = get_generation_task("samsum").items(n)
    runs = {}
    for compiled in (False, True):
        ee.engine.set_compiled("on" if compiled else "off")
        runs[compiled] = [
            ee.generate(it.instruction, method="full", max_new_tokens=48).tokens for it in items
        ]
    first = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        for a, b in zip(runs[False], runs[True], strict=True)
    ]
    return {"dialogues": n, "identical": first.count(None), "first_divergence": first}


def load_cost() -> dict:
    """One process's `set_compiled("on")` (building the layer step when EARLYEXIT_HOME has
    none), then decode tokens/s compiled and eager (64 tokens, median of 3 interleaved)."""
    from earlyexit.engine import LayerEngine
    from earlyexit.models import load_model

    engine = LayerEngine(load_model("smollm2-135m", dtype="int4"))
    ids = engine.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    start = time.perf_counter()
    engine.set_compiled("on")
    result = {"set_compiled_s": time.perf_counter() - start}
    rates: dict[str, list[float]] = {"compiled": [], "eager": []}
    for _ in range(3):
        for mode in ("off", "on"):
            engine.set_compiled(mode)
            start = time.perf_counter()
            engine.greedy(ids, 65)
            long = time.perf_counter() - start
            start = time.perf_counter()
            engine.greedy(ids, 1)
            short = time.perf_counter() - start
            rates["compiled" if mode == "on" else "eager"].append(64 / (long - short))
    return {**result, **{f"{k}_tok_s": sorted(v)[1] for k, v in rates.items()}}


def compile_cost() -> dict:
    """`load_cost` in a fresh process with an empty EARLYEXIT_HOME and inductor cache
    (cold: the build), then in a second fresh process (warm: loading the library)."""
    env = {
        **os.environ,
        "EARLYEXIT_HOME": tempfile.mkdtemp(),
        "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(),
    }
    from earlyexit.paths import home

    models = home() / "models"  # the weights, not fetched again
    if models.is_dir():
        (Path(env["EARLYEXIT_HOME"]) / "models").symlink_to(models.resolve())
    runs = {}
    for run in ("cold", "warm"):
        out = subprocess.run(
            [sys.executable, __file__, "load"], env=env, capture_output=True, text=True, check=True
        ).stdout
        runs[run] = json.loads(out.strip().splitlines()[-1])
    return {f"{run}_{k}": v for run, r in runs.items() for k, v in r.items() if k != "cpu"}


def bound() -> dict:
    """tests/test_compiled.py's measurements: compiled against eager one-token steps,
    teacher-forced along 24 eager greedy tokens of its two prompts (whole depth and split at
    layer 20): the largest logit difference, the argmax flips, the tokens whose eager top-2
    gap is within twice that difference; and the library swap test's two distances."""
    import torch

    from earlyexit.engine import LayerEngine
    from earlyexit.engine.compiled import CompiledSpans
    from earlyexit.models import load_model

    engine = LayerEngine(load_model("smollm2-135m", dtype="int4"))
    prompts = [
        "The capital of France is",
        "Once upon a time, in a land far far away, there lived a",
    ]

    def teacher_forced(ids: torch.Tensor, tokens: torch.Tensor, spans: list) -> torch.Tensor:
        with torch.inference_mode():
            state = engine.prefill(ids, capacity=ids.shape[1] + tokens.shape[1])
            out = []
            for t in tokens[0, :-1]:
                hidden = engine.embed(t.view(1, 1))
                for start, end in spans:
                    hidden = engine.run_layers(hidden, state.cache, start, end)
                out.append(engine.logits(hidden))
        return torch.cat(out, dim=1)[0]

    worst, flips, ties, positions = 0.0, 0, 0, 0
    for text in prompts:
        ids = engine.tokenizer(text, return_tensors="pt")["input_ids"]
        engine.set_compiled("off")
        tokens = engine.greedy(ids, 24)
        eager = teacher_forced(ids, tokens, [(0, 30)])
        top2 = eager.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        engine.set_compiled("on")
        for spans in ([(0, 30)], [(0, 20), (20, 30)]):
            logits = teacher_forced(ids, tokens, spans)
            error = float((logits - eager).abs().max())
            worst = max(worst, error)
            flips += int((logits.argmax(-1) != tokens[0, 1:]).sum())
            ties += int((gap <= 2 * error).sum())
            positions += len(gap)
        engine.set_compiled("off")
    # the swap test: a library built over layer 0, loaded with layer 1's tensors
    built = CompiledSpans(engine.steps[:1], engine.arch.rotary, "swap-bound")
    loaded = CompiledSpans(engine.steps[1:2], engine.arch.rotary, "swap-bound")
    ids = engine.tokenizer(prompts[1], return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.inference_mode():
        state = engine.prefill(ids, capacity=n + 1)
        hidden = engine.embed(ids[:, -1:])

        def holding(layer: int):  # noqa: ANN202 - a cache whose layer 0 is `layer`'s KV
            cache = engine.new_cache(1, capacity=n + 1)
            cache.keys[0], cache.values[0] = (t.clone() for t in state.cache.ensure(layer, n))
            cache.lengths[0] = n
            return cache

        layer0 = built.run(hidden, holding(0), 0, 1)
        layer1 = loaded.run(hidden, holding(1), 0, 1)
        eager1 = engine.run_layers(hidden, state.cache, 1, 2)
    return {
        "max_abs_logit_difference": worst,
        "argmax_flips": flips,
        "tokens_within_twice_the_difference": ties,
        "positions": positions,
        "swap_error": float((layer1 - eager1).abs().max()),
        "swap_apart": float((layer1 - layer0).abs().max()),
    }


def profile() -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from earlyexit.engine import LayerEngine
    from earlyexit.models import load_model

    engine = LayerEngine(load_model("smollm2-135m", dtype="int4"))
    text = "The quick brown fox jumps over the lazy dog. " * 10
    ids = engine.tokenizer(text, return_tensors="pt")
    steps = 20
    with torch.inference_mode():
        state = engine.prefill(ids["input_ids"], capacity=ids["input_ids"].shape[1] + 64)
        token = engine.logits(state.hidden[:, -1:]).argmax(-1)

        def step() -> torch.Tensor:
            hidden = engine.run_layers(engine.embed(token), state.cache, 0, engine.num_layers)
            return engine.logits(hidden).argmax(-1)

        for _ in range(10):
            token = step()
        start = time.perf_counter()
        for _ in range(steps):
            token = step()
        wall = (time.perf_counter() - start) / steps
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                token = step()
    ms = {e.key: e.self_cpu_time_total / 1000 / steps for e in prof.key_averages()}
    products = ms.get("aten::_weight_int4pack_mm_for_cpu", 0.0)
    attention = ms.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0.0)
    result = {
        "ms_per_token_unprofiled": wall * 1000,
        "ms_int4_products": products,
        "ms_attention": attention,
        "ms_all_ops_profiled": sum(ms.values()),
        "threads": torch.get_num_threads(),
    }
    from earlyexit.bench.llamacpp import llama_cpp_decoder, unavailable

    if unavailable("smollm2-135m") is None:  # llama.cpp's whole token, for the same prompt
        decode = llama_cpp_decoder("smollm2-135m", ids["input_ids"], torch.get_num_threads())
        decode(2)
        times: dict[int, list[float]] = {1: [], 33: []}
        for _ in range(3):
            for n in times:
                start = time.perf_counter()
                decode(n)
                times[n].append(time.perf_counter() - start)
        median = {n: sorted(t)[1] for n, t in times.items()}
        result["ms_llama_cpp_per_token"] = (median[33] - median[1]) / 32 * 1000
    return result


def main() -> None:
    from earlyexit.engine.kernels import cpu_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("answers", "compile", "load", "bound", "profile"))
    parser.add_argument("arg", nargs="?", default=None)
    args = parser.parse_args()
    if args.what == "answers":
        result = answers(int(args.arg or 20))
    elif args.what == "compile":
        result = compile_cost()
    elif args.what == "load":
        result = load_cost()
    else:
        result = bound() if args.what == "bound" else profile()
    print(json.dumps({"cpu": cpu_model(), **result}))


if __name__ == "__main__":
    main()
