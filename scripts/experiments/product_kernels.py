"""Which product kernel is fastest for batch-1 decoding on this CPU: every candidate torch
2.13 offers for a few-row product with smollm2-135m's decoder shapes, timed interleaved.

    python scripts/experiments/product_kernels.py [ROUNDS]

Per candidate, the microseconds of one token's decoder products (the 30 layers' stacked
q/k/v, o, gate/up and down shapes, one row), median over ROUNDS (default 7) interleaved
sweeps; each sweep runs the 30 layers' products over distinct weights, so they stream from
memory as in decoding. Candidates:
- `int4-bf16`: torch's `_weight_int4pack_mm_for_cpu` on bf16 activations (the engine's int4);
- `int4-fp32`: the same kernel on fp32 activations (where this torch accepts them);
- `int8-fp32`: `_weight_int8pack_mm` (8-bit weights, per-row scales, fp32 activations);
- `int8-dynamic`: fbgemm's `quantized::linear_dynamic` (8-bit activations and weights,
  per-row scales: *not* the GGUF's groups, so lossy; the int8-activation path torch has);
- `fp32` / `bf16`: dense `F.linear`.
Prints a JSON line with the CPU, ATen's dispatch level and ms per token per candidate.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.nn import functional

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # out x in, stacked as the engine
LAYERS = 30
GROUP = 32


def candidates() -> dict[str, list[Callable[[], torch.Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    made: dict[str, list[Callable[[], torch.Tensor]]] = {}
    for _ in range(LAYERS):
        for out, inp in SHAPES:
            w = torch.randn(out, inp, generator=gen) * 0.05
            x32 = torch.randn(1, inp, generator=gen)
            x16 = x32.bfloat16()
            q = torch.randint(0, 16, (out, inp), dtype=torch.int32, generator=gen)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz16 = torch.rand(inp // GROUP, out, 2, generator=gen).bfloat16()
            sz32 = sz16.float()
            q8 = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=gen)
            s8 = torch.rand(out, generator=gen)
            dyn = torch.ops.quantized.linear_prepack(
                torch.quantize_per_channel(
                    w, s8 / 127, torch.zeros(out, dtype=torch.long), 0, torch.qint8
                ),
                None,
            )
            w16 = w.bfloat16()
            ops = {
                "int4-bf16": lambda x=x16, p=packed, s=sz16: (
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, GROUP, s)
                ),
                "int4-fp32": lambda x=x32, p=packed, s=sz32: (
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, GROUP, s)
                ),
                "int8-fp32": lambda x=x32, q=q8, s=s8: torch.ops.aten._weight_int8pack_mm(x, q, s),
                "int8-dynamic": lambda x=x32, d=dyn: torch.ops.quantized.linear_dynamic(x, d, True),
                "fp32": lambda x=x32, w=w: functional.linear(x, w),
                "bf16": lambda x=x16, w=w16: functional.linear(x, w),
            }
            for name, op in ops.items():
                made.setdefault(name, []).append(op)
    usable = {}
    for name, ops in made.items():
        try:
            with torch.inference_mode():
                ops[0]()
            usable[name] = ops
        except RuntimeError as error:
            print(
                f"{name}: not available here ({str(error).splitlines()[0][:100]})", file=sys.stderr
            )
    return usable


def main() -> None:
    from earlyexit.engine.kernels import cpu_model

    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    ops = candidates()
    times: dict[str, list[float]] = {name: [] for name in ops}
    with torch.inference_mode():
        for sweep in ops.values():  # warm-up
            for op in sweep:
                op()
        for _ in range(rounds):
            for name, sweep in ops.items():
                start = time.perf_counter()
                for op in sweep:
                    op()
                times[name].append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "dispatch": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "rounds": rounds,
                "ms_per_token": {
                    n: round(statistics.median(t) * 1000, 2) for n, t in times.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
