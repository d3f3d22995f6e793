"""The engine benchmark runs end to end and writes the JSON schema the report relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from earlyexit.bench import engine_bench
from earlyexit.bench.engine_bench import (
    render_cost_table,
    render_pass_table,
    render_table,
    run_engine_bench,
)
from earlyexit.reporting import write_json

pytestmark = pytest.mark.weights  # the benchmark loads smollm2-135m


def test_engine_bench_schema_and_json_round_trip(tmp_path: Path) -> None:
    # One thread: with 2 OpenMP threads and another process busy on a core, every op waits
    # on a descheduled thread and this test goes from ~15 s to minutes; the schema is the same.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_engine_bench(
            new_tokens=4,
            batches=(1, 2),
            dtypes=("float32", "int4"),
            repeats=1,
            layer_iters=20,
            llama_cpp=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert result["model"] == "smollm2-135m"
    assert result["threads"] == 1 and result["new_tokens"] == 4 and result["warmup"]
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
    for r in records:
        assert r["path"] == "hf" or r["matches_hf"]  # F.linear or not, the same tokens
        assert r["tokens_per_s"] > 0 and r["seconds"] > 0
    assert result["llama_cpp"] == "llama.cpp: not requested"
    assert result["fastest_engine"] in ("float32", "int4")
    assert isinstance(result["engine_overhead"], float) and result["cpu"]
    choice = result["kernels"]["float32"]
    assert choice["mode"] == "auto" and set(choice["skinny_rows"]) == set(choice["timings"])
    costs = result["layer_costs"]["float32"]
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
