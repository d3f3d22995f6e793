"""The engine benchmark runs end to end and writes the JSON schema the report relies on."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from earlyexit.bench import engine_bench
from earlyexit.bench.engine_bench import (
    PROMPTS,
    render_cost_table,
    render_pass_table,
    render_table,
    run_engine_bench,
)
from earlyexit.engine.kernels import MARGIN, linear_weights, shape_key
from earlyexit.engine.skinny import MAX_ROWS
from earlyexit.reporting import write_json

pytestmark = pytest.mark.weights  # the benchmark loads smollm2-135m


def _spy_on_paths(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Records what each decode path of the benchmark returned for its first run of each
    length, keyed (dtype, batch, path, n), and each dtype's engine (key "engine", dtype)."""
    seen: dict = {}
    real = engine_bench._decoders

    def spied(engine, ids, pad, llama):  # noqa: ANN001, ANN202
        paths = real(engine, ids, pad, llama)
        seen["engine", engine.weights] = engine
        key = (engine.weights, ids.shape[0])

        def wrap(path: str, fn):  # noqa: ANN001, ANN202
            def run(n: int) -> torch.Tensor:
                out = fn(n)
                seen.setdefault((*key, path, n), out.tolist())
                return out

            return run

        return {path: wrap(path, fn) for path, fn in paths.items()}

    monkeypatch.setattr(engine_bench, "_decoders", spied)
    return seen


def _same_until_eos(mine: list[list[int]], hf: list[list[int]], eos: int) -> bool:
    """Row by row, the same tokens up to the row's first EOS (hf's min_new_tokens bans it)."""
    cuts = [row.index(eos) if eos in row else len(row) for row in mine]
    return all(a[:c] == b[:c] for a, b, c in zip(mine, hf, cuts, strict=True))


@pytest.mark.slow
def test_engine_bench_schema_and_json_round_trip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher_forced: Callable
) -> None:
    # torch's threads as every other test: the compiled int4 step's library is built once
    # per thread count, and this one is shared with tests/test_compiled.py
    seen = _spy_on_paths(monkeypatch)
    result = run_engine_bench(
        new_tokens=4,
        batches=(1, 2),
        dtypes=("float32", "int4"),
        repeats=1,
        layer_iters=20,
        llama_cpp=False,
    )
    assert result["model"] == "smollm2-135m"
    assert result["threads"] == torch.get_num_threads()
    assert result["new_tokens"] == 4 and result["warmup"]
    records = result["records"]
    fp32 = {
        (path, batch)
        for path in ("hf", "engine", "engine-own-layers", "engine-plain", "engine-skinny")
        for batch in (1, 2)
    }
    int4 = {  # no kernel choice; compiled one-token steps at batch 1
        (path, batch) for path in ("hf", "engine", "engine-own-layers") for batch in (1, 2)
    } | {("engine-compiled", 1)}
    assert {(r["path"], r["batch"]) for r in records if r["dtype"] == "float32"} == fp32
    assert {(r["path"], r["batch"]) for r in records if r["dtype"] == "int4"} == int4
    fp32_engine = seen["engine", "float32"]
    eos = fp32_engine.tokenizer.eos_token_id
    for r in records:
        tokens = seen[r["dtype"], r["batch"], r["path"], 4]
        hf = seen[r["dtype"], r["batch"], "hf", 4]
        assert len(tokens) == r["batch"] and all(len(row) == 4 for row in tokens)
        # matches_hf is this path's own tokens against hf's, not a constant
        assert r["matches_hf"] == (None if r["path"] == "hf" else _same_until_eos(tokens, hf, eos))
        if r["path"] != "engine-compiled":  # the eager paths are the model's arithmetic
            assert r["path"] == "hf" or tokens == hf  # F.linear or not, the same tokens
        # the rate is the batch's decoded tokens (the first excluded) over the decode time
        assert r["seconds"] == pytest.approx(max(r["total_seconds"] - r["prefill_seconds"], 1e-9))
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 3 / r["seconds"])
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0 and r["prefill_seconds"] > 0
    # hf's tokens are the fp32 model's greedy continuation: each is the argmax of the model's
    # own logits after the prompt and the tokens before it (one forward; fp32 rounding only)
    (greedy,) = seen["float32", 1, "hf", 4]
    logits = teacher_forced(fp32_engine, PROMPTS[0], greedy)
    chosen = logits.gather(1, torch.tensor(greedy)[:, None])[:, 0]
    assert torch.all(chosen >= logits.max(-1).values - 1e-3), (greedy, logits.argmax(-1))
    assert result["llama_cpp"] == "llama.cpp: not requested"
    rate = {(r["path"], r["dtype"]): r["tokens_per_s"] for r in records if r["batch"] == 1}
    engines = {dtype: rate["engine", dtype] for dtype in ("float32", "int4")}
    assert result["fastest_engine"] == max(engines, key=engines.get)
    for dtype in ("float32", "int4"):
        overhead = 1 - rate["engine", dtype] / rate["hf", dtype]
        assert result["engine_overhead_by_dtype"][dtype] == pytest.approx(overhead)
        assert result["weights"][dtype]["weights"] == dtype
    assert result["engine_overhead"] == result["engine_overhead_by_dtype"]["float32"]
    assert result["engine_overhead_batch"] == 1 and result["cpu"]
    # the fp32 kernel choice: every weight shape of the model timed at 1..MAX_ROWS rows by
    # both kernels, and skinny chosen exactly where it took at most MARGIN of plain's time
    choice = result["kernels"]["float32"]
    assert choice["mode"] == "auto" and choice["threads"] == torch.get_num_threads()
    shapes = {shape_key(w) for w in linear_weights(fp32_engine.model)}
    assert set(choice["timings"]) == set(choice["skinny_rows"]) == shapes
    for shape, by_rows in choice["timings"].items():
        assert set(by_rows) == {str(n) for n in range(1, MAX_ROWS + 1)}
        assert all(t["plain"] > 0 and t["skinny"] > 0 for t in by_rows.values())
        wins = [int(n) for n, t in by_rows.items() if t["skinny"] <= MARGIN * t["plain"]]
        assert choice["skinny_rows"][shape] == sorted(wins), shape
    assert result["kernels"]["int4"]["skinny_rows"] == {}  # only fp32 weights go skinny
    costs = result["layer_costs"]["float32"]
    layer = costs["ms_per_layer"]
    assert costs["full_readout_over_layer"] == pytest.approx(costs["ms_full_readout"] / layer)
    for k, ms in costs["ms_candidate_readout"].items():
        assert costs["candidate_readout_over_layer"][k] == pytest.approx(ms / layer)
    numbers = [costs["ms_per_layer"], costs["ms_full_readout"], costs["full_readout_over_layer"]]
    numbers += list(costs["ms_candidate_readout"].values())
    numbers += list(costs["candidate_readout_over_layer"].values())
    numbers += list(costs["ms_per_pass_by_rows"].values())
    assert list(costs["ms_per_pass_by_rows"]) == [str(n) for n in range(1, 9)]
    assert numbers and all(n > 0 for n in numbers)
    assert render_pass_table(result).row_count == 2
    assert render_table(result).row_count == 4 and render_cost_table(result).row_count == 2

    path = tmp_path / "bench" / "engine.json"
    write_json(result, path)
    with path.open() as f:
        assert json.load(f) == result
    assert [p.name for p in path.parent.iterdir()] == ["engine.json"]  # no temp file left


@pytest.mark.slow
def test_each_engine_path_is_checked_against_hf_on_its_own_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A path whose tokens diverge is reported as such, whatever the other paths decode."""
    real = engine_bench._decoders

    def with_a_broken_plain_path(engine, ids, pad, llama):  # noqa: ANN001, ANN202
        paths = real(engine, ids, pad, llama)
        plain = paths["engine-plain"]
        paths["engine-plain"] = lambda n: (plain(n) + 1) % engine.vocab_size
        return paths

    monkeypatch.setattr(engine_bench, "_decoders", with_a_broken_plain_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_engine_bench(
            new_tokens=3, batches=(1,), dtypes=("float32",), repeats=1, llama_cpp=False
        )
    finally:
        torch.set_num_threads(threads)
    match = {r["path"]: r["matches_hf"] for r in result["records"]}
    assert match == {
        "hf": None,
        "engine": True,
        "engine-own-layers": True,
        "engine-plain": False,
        "engine-skinny": True,
    }
