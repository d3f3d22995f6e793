"""Engine benchmark: is layer-by-layer decoding as fast as the model's own `generate`?

Early exit only pays if the engine's full-depth loop costs about what `model.generate` does,
and if a readout is cheap next to a layer. This measures both on CPU: decode tokens/s for
`hf` (model.generate) and `engine` (LayerEngine.greedy) with the same prompts, and the time
of one decoder layer, one full-vocabulary readout and candidate-restricted readouts.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.table import Table

from earlyexit.engine import LayerEngine
from earlyexit.engine.compiled import compilable
from earlyexit.engine.kernels import cpu_model
from earlyexit.models import load_model
from earlyexit.readouts.readout import ExitReadout

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far far away, there lived a young",
    "Water boils at",
    "The best way to learn a new programming language is to",
    "In 1969, the first humans to walk on the Moon were",
    "My favourite recipe for a quick weeknight dinner starts with chopped onions and",
    "Photosynthesis converts",
    "The three primary colours are red,",
]
CANDIDATES = (2, 64)
WARMUP = (
    "one untimed run of each path at new_tokens and at 1 token per (dtype, batch) before timing; "
    "decode seconds = median(time for new_tokens) - median(time for 1 token), i.e. prefill and "
    "the first token are excluded and tokens_per_s counts batch * (new_tokens - 1) tokens"
)


@dataclass
class DecodeRecord:
    # "hf", "engine" (kernels chosen by timing, lean layer steps), "engine-own-layers" (every
    # layer through the model's own forward), "engine-compiled" (decode steps as compiled
    # graphs, engine/compiled.py; batch 1, int4), "engine-plain", "engine-skinny" (fp32 only),
    # "llama.cpp" (the model's GGUF, batch 1, timed interleaved with the others)
    path: str
    dtype: str
    batch: int
    tokens_per_s: float  # decoded tokens per second, summed over the batch
    seconds: float  # decode time of new_tokens - 1 steps (prefill excluded)
    prefill_seconds: float  # median time of a 1-token run (prefill + first token)
    total_seconds: float  # median time of a new_tokens run
    # all but hf: same tokens as hf up to the path's first EOS (hf's min_new_tokens bans
    # EOS, so the two legitimately part there); may also differ in bf16, int4 and llama.cpp
    # (which rounds activations to 8 bits)
    matches_hf: bool | None = None


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _per_call(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of `fn`, after a few untimed calls."""
    for _ in range(min(10, iters)):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _decoders(
    engine: LayerEngine, ids: torch.Tensor, pad: torch.Tensor, llama: str | None
) -> dict[str, Callable]:
    """path -> f(n) decoding exactly n new tokens per row, returning [batch, n] ids.

    The forced-kernel paths only where the kernel choice applies (fp32); llama.cpp on the
    model's GGUF at batch 1 when `llama` (the model) is given."""
    from transformers import GenerationConfig

    mask = (torch.arange(ids.shape[1])[None] >= pad[:, None]).long()
    tok = engine.tokenizer

    def hf(n: int) -> torch.Tensor:
        config = GenerationConfig(
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config
            )
        return out[:, ids.shape[1] :]

    def forced(mode: str) -> Callable[[int], torch.Tensor]:
        def run(n: int) -> torch.Tensor:  # the engine with one kernel for every product
            with engine.kernels_as(mode):
                return engine.greedy(ids, n, pad)

        return run

    def own_layers(n: int) -> torch.Tensor:  # the same engine without the lean steps
        with engine.own_layers():
            return engine.greedy(ids, n, pad)

    def compiled(n: int) -> torch.Tensor:  # decode steps as compiled graphs
        engine.set_compiled("on")
        try:
            return engine.greedy(ids, n, pad)
        finally:
            engine.set_compiled("off")

    paths: dict[str, Callable] = {"hf": hf, "engine": lambda n: engine.greedy(ids, n, pad)}
    if any(step is not None for step in engine.steps):
        paths["engine-own-layers"] = own_layers
    if ids.shape[0] == 1 and compilable(engine.steps):
        paths["engine-compiled"] = compiled
    if engine.weights == "float32":
        paths["engine-plain"] = forced("plain")
        paths["engine-skinny"] = forced("skinny")
    if llama is not None and ids.shape[0] == 1:
        from earlyexit.bench.llamacpp import llama_cpp_decoder

        paths["llama.cpp"] = llama_cpp_decoder(llama, ids, torch.get_num_threads())
    return paths


def _same_until_eos(engine_ids: torch.Tensor, hf_ids: torch.Tensor, eos: int | None) -> bool:
    for mine, theirs in zip(engine_ids.tolist(), hf_ids.tolist(), strict=True):
        cut = mine.index(eos) if eos in mine else len(mine)
        if mine[:cut] != theirs[:cut]:
            return False
    return True


def _decode_records(
    engine: LayerEngine,
    dtype: str,
    batch: int,
    new_tokens: int,
    repeats: int,
    llama: str | None = None,
) -> list[DecodeRecord]:
    ids, pad = engine.encode(PROMPTS[:batch])
    paths = _decoders(engine, ids, pad, llama)
    outputs = {}
    for path, fn in paths.items():  # warm-up
        fn(1)
        outputs[path] = fn(new_tokens)
        if outputs[path].shape != (batch, new_tokens):
            raise RuntimeError(
                f"{path} decoded {tuple(outputs[path].shape)} tokens, not {batch}x{new_tokens}"
            )
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for path, fn in paths.items():  # interleaved so noise hits both paths alike
            for n in (1, new_tokens):
                times.setdefault((path, n), []).append(_timed(lambda fn=fn, n=n: fn(n))[0])
    records = []
    for path in paths:
        total = statistics.median(times[path, new_tokens])
        prefill = statistics.median(times[path, 1])
        decode = max(total - prefill, 1e-9)
        match = (
            _same_until_eos(outputs[path], outputs["hf"], engine.tokenizer.eos_token_id)
            if path != "hf"
            else None
        )
        records.append(
            DecodeRecord(
                path, dtype, batch, batch * (new_tokens - 1) / decode, decode, prefill, total, match
            )
        )
    return records


@torch.inference_mode()
def layer_costs(
    engine: LayerEngine, iters: int = 200, readout: ExitReadout | None = None, layer: int = 0
) -> dict[str, Any]:
    """ms per decoder layer / readout for one decode step at batch 1, cache length kept fixed.

    With `readout`, the readouts timed are that readout's at `layer` (adapter included);
    otherwise the model's own norm + head.
    """
    readout = readout or ExitReadout(engine)
    ids, pad = engine.encode(PROMPTS[:1])
    state = engine.prefill(ids, pad, capacity=ids.shape[1] + 8)
    length = state.cache.lengths[0]
    hidden = engine.embed(ids[:, -1:])
    cache, layers = state.cache, engine.num_layers

    def one_layer() -> None:
        engine.run_layers(hidden, cache, 0, 1)
        cache.truncate(length, range(0, 1))

    def all_layers() -> None:
        engine.run_layers(hidden, cache, 0, layers)
        cache.truncate(length)

    one = _per_call(one_layer, iters)
    stack = _per_call(all_layers, max(iters // 10, 5)) / layers
    out = state.hidden[:, -1:]
    full = _per_call(lambda: readout.logits(out, layer), iters)
    gen = torch.Generator().manual_seed(0)
    cand = {}
    for k in CANDIDATES:
        token_ids = torch.randperm(engine.vocab_size, generator=gen)[:k].to(engine.device)
        cand[str(k)] = _per_call(lambda t=token_ids: readout.logits(out, layer, t), iters)
    return {
        "readout_layer": layer,
        "ms_per_layer": one * 1e3,
        "ms_per_layer_in_full_stack": stack * 1e3,
        "ms_full_readout": full * 1e3,
        "ms_candidate_readout": {k: v * 1e3 for k, v in cand.items()},
        "full_readout_over_layer": full / one,
        # an isolated layer keeps its weights in cache; in the stack it must stream them
        "full_readout_over_layer_in_stack": full / stack,
        "candidate_readout_over_layer": {k: v / one for k, v in cand.items()},
        "iterations": iters,
    }


def pass_costs(engine: LayerEngine, rounds: int = 5) -> dict[str, float]:
    """ms of one full-depth pass (all layers + the full head) over 1..8 new tokens at
    batch 1: what a verify pass over a draft costs, next to one decoded token."""
    from earlyexit.decoding.draft_length import time_passes

    return {str(n): seconds * 1e3 for n, seconds in time_passes(engine, rounds).items()}


def run_engine_bench(
    model: str = "smollm2-135m",
    new_tokens: int = 32,
    batches: Sequence[int] = (1, 8),
    dtypes: Sequence[str] = ("float32", "bfloat16", "int8", "int4"),
    repeats: int = 3,
    layer_iters: int = 200,
    llama_cpp: bool = True,
) -> dict[str, Any]:
    """Decode throughput of hf vs engine (vs llama.cpp), and per-layer/readout costs, for
    each dtype."""
    if new_tokens < 2 or repeats < 1 or not batches or not dtypes:
        raise ValueError("need new_tokens >= 2, repeats >= 1 and at least one batch and dtype")
    if max(batches) > len(PROMPTS):
        raise ValueError(f"batch must be at most {len(PROMPTS)} (the number of prompts)")
    from earlyexit.bench.llamacpp import unavailable

    llama_note = unavailable(model) if llama_cpp else "llama.cpp: not requested"
    llama = model if llama_note is None else None
    load_before = os.getloadavg()[0]  # other processes on the cores distort every number
    records: list[DecodeRecord] = []
    costs: dict[str, Any] = {}
    kernels: dict[str, Any] = {}
    compiled: dict[str, Any] = {}
    weights: dict[str, Any] = {}  # per dtype asked: what the products multiply by, and why
    for dtype in dtypes:
        engine = LayerEngine(load_model(model, dtype=dtype))
        kernels[dtype] = asdict(engine.kernels)
        # what `--compiled auto` would choose here (the paths below set their own)
        compiled[dtype] = asdict(engine.set_compiled("auto"))
        engine.set_compiled("off")
        weights[dtype] = {
            "weights": engine.weights,
            "why": getattr(engine.model.config, "earlyexit_weights_reason", ""),
        }
        for batch in batches:
            records.extend(_decode_records(engine, dtype, batch, new_tokens, repeats, llama))
        costs[dtype] = layer_costs(engine, layer_iters)
        costs[dtype]["ms_per_pass_by_rows"] = pass_costs(engine, max(layer_iters // 40, 1))
        del engine
    small = min(batches)  # batch 1 when measured
    rate = {(r.path, r.dtype): r.tokens_per_s for r in records if r.batch == small}
    overhead = {d: 1 - rate["engine", d] / rate["hf", d] for d in dtypes}
    return {
        "model": model,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": WARMUP,
        "records": [asdict(r) for r in records],
        "engine_overhead": overhead["float32" if "float32" in overhead else dtypes[0]],
        "engine_overhead_batch": small,
        "engine_overhead_by_dtype": overhead,
        "layer_costs": costs,
        "kernels": kernels,
        "compiled": compiled,
        "weights": weights,
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "llama_cpp": llama_note or "measured on the model's GGUF at batch 1 (Q8_1 activations)",
        "fastest_engine": _fastest(records, small),
    }


def _fastest(records: list[DecodeRecord], batch: int) -> str | None:
    """The dtype whose engine decodes fastest at `batch`."""
    engines = [r for r in records if r.path == "engine" and r.batch == batch]
    return max(engines, key=lambda r: r.tokens_per_s).dtype if engines else None


def render_table(result: dict[str, Any]) -> Table:
    """Decode throughput of both paths side by side, one row per (dtype, batch)."""
    table = Table(
        title=f"{result['model']}: greedy decode of {result['new_tokens']} tokens "
        f"(prefill excluded), {result['threads']} threads, {result['cpu']}"
    )
    cols = ("dtype", "batch", "hf tok/s", "engine tok/s", "engine/hf", "same tokens")
    extra = ("own layers tok/s", "compiled tok/s", "all-plain tok/s", "all-skinny tok/s")
    extra += ("llama.cpp tok/s", "engine/llama.cpp", "compiled/llama.cpp")
    for col in (*cols, *extra):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    rows: dict[tuple[str, int], dict[str, dict]] = {}
    for r in result["records"]:
        rows.setdefault((r["dtype"], r["batch"]), {})[r["path"]] = r
    for (dtype, batch), pair in rows.items():
        hf, eng = pair["hf"]["tokens_per_s"], pair["engine"]["tokens_per_s"]
        # the eager paths are the model's arithmetic; compiled steps round apart (own cell)
        paths = [p for p in pair if p.startswith("engine") and p != "engine-compiled"]
        same = "yes" if all(pair[p]["matches_hf"] for p in paths) else "no"
        compiled = pair.get("engine-compiled")
        compiled_cell = "-"
        if compiled is not None:
            match = "same" if compiled["matches_hf"] else "other"
            compiled_cell = f"{compiled['tokens_per_s']:.1f} ({match} tokens)"

        def rate(path: str, pair: dict = pair) -> str:
            return f"{pair[path]['tokens_per_s']:.1f}" if path in pair else "-"

        llama = pair.get("llama.cpp")

        def versus_llama(path: str, pair: dict = pair, llama: dict | None = llama) -> str:
            if llama is None or path not in pair:
                return "-"
            return f"{pair[path]['tokens_per_s'] / llama['tokens_per_s']:.3f}"

        table.add_row(
            dtype,
            str(batch),
            f"{hf:.1f}",
            f"{eng:.1f}",
            f"{eng / hf:.3f}",
            same,
            rate("engine-own-layers"),
            compiled_cell,
            rate("engine-plain"),
            rate("engine-skinny"),
            rate("llama.cpp"),
            versus_llama("engine"),
            versus_llama("engine-compiled"),
        )
    return table


def render_pass_table(result: dict[str, Any]) -> Table:
    """A full-depth pass over n tokens, in ms and in multiples of a one-token pass."""
    table = Table(title="one full-depth pass (layers + head) over n tokens at batch 1: ms (x n=1)")
    first = next(iter(result["layer_costs"].values()))["ms_per_pass_by_rows"]
    for col in ["dtype", *(f"n={n}" for n in first)]:
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, c in result["layer_costs"].items():
        ms = c["ms_per_pass_by_rows"]
        table.add_row(dtype, *(f"{v:.1f} ({v / ms['1']:.2f}x)" for v in ms.values()))
    return table


def render_cost_table(result: dict[str, Any]) -> Table:
    """Per-token cost of one layer and of each readout at batch 1 (ms, and x one layer)."""
    table = Table(title="one decode step at batch 1: ms (x one layer)")
    first = next(iter(result["layer_costs"].values()))
    cols = ["layer", "layer in stack", "full readout"]
    cols += [f"{k} candidates" for k in first["ms_candidate_readout"]]
    for col in ["dtype", *cols]:
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, c in result["layer_costs"].items():
        layer = c["ms_per_layer"]
        ms = [layer, c["ms_per_layer_in_full_stack"], c["ms_full_readout"]]
        ms += list(c["ms_candidate_readout"].values())
        table.add_row(dtype, *(f"{v:.3f} ({v / layer:.2f}x)" for v in ms))
    return table
