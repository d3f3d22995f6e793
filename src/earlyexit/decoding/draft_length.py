"""How many n-gram drafts to verify per pass: the number that maximises expected tokens per
unit of time on the machine at hand.

A verify pass over n rows costs c(n) one-token passes, and c is machine-specific: on an
Intel Xeon (fp32, 2 threads) 3 rows cost 1.23x one row but 5 rows 1.89x; on the AMD EPYC
the engine was first tuned on, 2-5 rows cost about one. So c is *measured* once per machine
and model (`measure_pass_costs`, cached like the kernel choice), and for a look-up that
matched an m-gram the draft length g maximises (1 + sum_{j<=g} P_m(j)) / c(g + 1), where
P_m(j) is the chance that the first j looked-up tokens all match the model's own output.

P_m comes from scripts/experiments/ngram_draft_study.py (smollm2-135m greedy outputs, 16
prompts each of SAMSum, XSum and SQuAD, 1,963 positions). The mean of the three tasks is
used: they differ by up to 0.25 at single entries (SQuAD copies more), which moves the
chosen lengths by about one token.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from earlyexit.engine.engine import LayerEngine
from earlyexit.engine.kernels import machine_key
from earlyexit.paths import atomic_file, home

MAX_DRAFT = 7  # verify passes over at most 8 rows (the row counts whose cost is measured)

# P(first j looked-up tokens all match), j = 1..8, by match length (mean of three tasks)
MATCH_PREFIX = {
    1: (0.299, 0.159, 0.105, 0.085, 0.054, 0.037, 0.027, 0.019),
    2: (0.623, 0.412, 0.284, 0.193, 0.141, 0.125, 0.104, 0.077),
    3: (0.795, 0.663, 0.566, 0.499, 0.445, 0.398, 0.358, 0.324),
}


def draft_lengths(costs: dict[int, float], max_draft: int = MAX_DRAFT) -> dict[int, int]:
    """Draft length per match length (1..3) for pass costs `costs[n]` (n rows, any unit)."""
    lengths = {}
    for match, prefix in MATCH_PREFIX.items():
        best, best_rate = 0, 1.0 / costs[1]
        for g in range(1, max_draft + 1):
            if g + 1 not in costs:
                break
            rate = (1 + sum(prefix[:g])) / costs[g + 1]
            if rate > best_rate:
                best, best_rate = g, rate
        lengths[match] = best
    return lengths


@torch.inference_mode()
def time_passes(engine: LayerEngine, rounds: int) -> dict[int, float]:
    """Median seconds of a full-depth pass (layers + full head) over 1..MAX_DRAFT+1 new
    tokens at batch 1, row counts interleaved over `rounds` rounds after a warm-up."""
    ids, _ = engine.encode(["The quick brown fox jumps over the lazy dog. " * 4])
    state = engine.prefill(ids, capacity=ids.shape[1] + MAX_DRAFT + 2)
    length = state.cache.lengths[0]
    rows = ids[:, -1:].repeat(1, MAX_DRAFT + 1)
    samples: dict[int, list[float]] = {n: [] for n in range(1, MAX_DRAFT + 2)}
    for round_ in range(rounds + 1):  # round 0 warms up
        for n in samples:  # row counts interleaved: drift hits all alike
            hidden = engine.embed(rows[:, :n])
            start = time.perf_counter()
            engine.logits(engine.run_layers(hidden, state.cache, 0, engine.num_layers))
            if round_:
                samples[n].append(time.perf_counter() - start)
            state.cache.truncate(length)
    return {n: statistics.median(v) for n, v in samples.items()}


def measure_pass_costs(engine: LayerEngine, rounds: int = 5, use_cache: bool = True) -> dict:
    """Seconds of a full-depth pass over 1..MAX_DRAFT+1 rows at batch 1 on this machine
    (cached per machine -- CPU, its flags, torch, threads -- model, weights, kernel choice and
    compiled steps: an int4 engine shares the fp32 model's fingerprint, and compiled passes
    scale otherwise)."""
    path_kind = (engine.weights, engine.kernels.skinny_rows, engine.compiled is not None)
    key = machine_key("passes-2", engine.fingerprint, str(engine.dtype), *path_kind)
    path = home() / "kernels" / f"passes-{key}.json"
    if use_cache and path.exists():
        return {int(n): s for n, s in json.loads(path.read_text()).items()}
    costs = time_passes(engine, rounds)
    if use_cache:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(costs))
    return costs
