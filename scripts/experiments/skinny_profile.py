"""Study script (not part of the library): cost of layers 24-29 and of the LM head over
1-16 rows, F.linear against engine/skinny.py, with a 300-token cache, and the max |logit
difference| between the two paths. The per-row table in BENCHMARKS.md (engine section)
comes from it: `python scripts/experiments/skinny_profile.py`."""
import contextlib, time
import torch
from earlyexit.engine import LayerEngine
from earlyexit.engine.skinny import plain_linear
from earlyexit.models import load_model
torch.set_num_threads(2)
e = LayerEngine(load_model("smollm2-135m"))  # skinny by default
ids = torch.randint(100, 20000, (1, 300), generator=torch.Generator().manual_seed(0))

def ms(fn, n=20):
    fn(); fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1000

with torch.inference_mode():
    cache = e.prefill(ids, capacity=400).cache
    ref = {}
    for mode in ("plain", "skinny"):
        ctx = plain_linear(e.model) if mode == "plain" else contextlib.nullcontext()
        with ctx:
            for n in (1, 2, 4, 8, 16):
                h = torch.randn(1, n, 576, generator=torch.Generator().manual_seed(n))
                def deep():
                    out = e.run_layers(h, cache, 24, 30)
                    cache.truncate(300, range(24, 30))
                    return out
                logits = e.logits(deep()[0])
                diff = "" if mode == "plain" else f"; max |diff| {float((logits - ref[n]).abs().max()):.1e}"
                ref.setdefault(n, logits)
                print(f"{mode} rows {n}: layers 24-29 {ms(deep):.2f} ms, head {ms(lambda: e.logits(h[0])):.2f} ms{diff}")
