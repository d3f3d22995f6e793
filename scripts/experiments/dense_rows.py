"""From how many rows is a dense copy of the int4 weights faster than the int4 kernel?

The int4 engine multiplies up to `quant.SMALL_ROWS` rows with torch's int4 kernel (bf16
activations) and more rows with a dense copy of the dequantized weights when that was timed
faster. A running batch of B rows decodes B rows per pass, so where that crossover lies
decides what a batch costs. This times one decode pass over a running batch of B rows
(B = 1, 2, 4, 8, one token each, after a prompt) with every product on the int4 kernel and
with every product on a dense bf16 / fp32 copy, interleaved over rounds (median), at torch's
thread count. Run: python scripts/experiments/dense_rows.py

Measured on an AMD EPYC (family 25 model 1, 2 threads, torch 2.13.0), passes with the head:
int4 46 / 58 / 63 / 95 ms at 1 / 2 / 4 / 8 rows, bf16 46 / 70 / 109 / 191, fp32 80 / 163 /
196 / 207. The engine's own timing of the decoder's products alone (`choose_batch_dense`):
int4 19.0 / 24.6 / 46.5 ms at 2 / 4 / 8 rows, bf16 33.8 / 61.9 / 114, fp32 86.4 / 99.2 / 110:
the kernel wins everywhere here (the fp32 copy streams 540 MB per pass at ~6 GB/s), so a
running batch keeps it. A torch profile of the 4-row pass: the int4 products are 56% of it.
"""

from __future__ import annotations

import statistics
import time

import torch

from earlyexit.engine import LayerEngine, quant
from earlyexit.engine.kernels import cpu_model
from earlyexit.models import load_model

BATCHES = (1, 2, 4, 8)


def main() -> None:
    engine = LayerEngine(load_model("smollm2-135m", dtype="int4"))
    ids, _ = engine.encode(["The quick brown fox jumps over the lazy dog. " * 4])
    single = engine.prefill(ids, capacity=ids.shape[1] + 4).cache
    caches = {}
    for rows in BATCHES:
        caches[rows] = engine.new_row_cache(rows, capacity=ids.shape[1] + 4)
        for _ in range(rows):
            caches[rows].add(single)
    filled = caches[1].fill[:, 0].clone()
    products = quant._products(engine.model)
    modes = {"int4": None, "bf16": "bf16", "fp32": "fp32"}
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for round_ in range(6):  # round 0 warms up (and makes the dense copies)
            for mode, dense in modes.items():
                quant.SMALL_ROWS = 10**9 if dense is None else 0
                for layer in products:
                    layer.batch_dense = None  # only SMALL_ROWS routes the products here
                    if dense is not None and layer.many_rows != dense:
                        layer.many_rows = dense
                for rows in BATCHES:
                    cache = caches[rows]
                    hidden = engine.embed(ids[:, -1:].repeat(rows, 1))
                    start = time.perf_counter()
                    out = engine.run_rows(hidden, cache, 0, engine.num_layers)
                    engine.logits(out.reshape(rows, -1))
                    if round_:
                        times.setdefault((mode, rows), []).append(time.perf_counter() - start)
                    cache.fill[:, :rows] = filled.unsqueeze(1)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("rows  " + "  ".join(f"{m:>14}" for m in modes))
    for rows in BATCHES:
        cells = []
        for mode in modes:
            ms = 1e3 * statistics.median(times[mode, rows])
            cells.append(f"{ms:7.1f} ms {rows / ms * 1e3:4.0f}/s")
        print(f"{rows:4}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
