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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from earlyexit.engine.engine import LayerEngine
from earlyexit.engine.kernels import OthersCPU, keep_timing, machine_key
from earlyexit.paths import home

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
    with OthersCPU() as others:
        costs = time_passes(engine, rounds)
    keep_timing(path, costs, others, use_cache)
    return costs


# ---- drafts in a running batch -------------------------------------------------------------
# A pass over a running batch has one width n for all rows (a ragged pass costs what its
# widest row costs): the width is chosen per step from the measured cost of a pass over
# B rows x n tokens and each row's expected accepted drafts, which follow its own record.
ROW_BATCHES = (1, 2, 4, 8, 16)  # batch sizes whose pass costs are measured
PRIOR_WEIGHT = 4.0  # pseudo-drafts of the table's expectation behind each row's record


@dataclass
class RowRecord:
    """One row's drafts so far: how many it had accepted against how many the table
    (MATCH_PREFIX) expected for the same match lengths and draft lengths. A row whose text
    does not copy (a summary in new words) accepts less than expected and stops drafting."""

    accepted: float = 0.0
    expected: float = 0.0

    @property
    def scale(self) -> float:
        return (self.accepted + PRIOR_WEIGHT) / (self.expected + PRIOR_WEIGHT)

    def record(self, match: int, drafted: int, accepted: int) -> None:
        if drafted and match:
            self.expected += sum(MATCH_PREFIX[min(match, 3)][:drafted])
            self.accepted += accepted

    def gain(self, match: int, available: int) -> float:
        """Expected accepted drafts when `available` looked-up tokens are verified."""
        if not match or not available:
            return 0.0
        prefix = MATCH_PREFIX[min(match, 3)][:available]
        return min(float(available), self.scale * sum(prefix))


@dataclass
class RowPassCosts:
    """Seconds of a full-depth pass (layers + head over the real tokens) over B rows of n
    new tokens, at the batch sizes `sizes` x 1..MAX_DRAFT+1; other B interpolated.

    With `measure`, a batch size is timed when a look-up first needs it (and cached per
    machine): a single user waits for batch 1's passes only, not for those of a batch of 8
    it never runs (16 s of fp32 passes on 2 cores). `measure_all` times every size up
    front (a server, before it takes requests)."""

    seconds: dict[int, dict[int, float]]
    measure: Callable[[int], dict[int, float]] | None = None
    sizes: tuple[int, ...] = ()

    def _bracket(self, rows: int) -> list[int]:
        """The measured sizes a look-up at `rows` rows reads."""
        sizes = sorted(self.sizes or self.seconds)
        if rows in sizes:
            return [rows]
        lower = max((b for b in sizes if b < rows), default=sizes[0])
        upper = min((b for b in sizes if b > rows), default=None)
        return [lower] if upper is None else [lower, upper]

    def measure_all(self) -> None:
        for rows in self.sizes:
            self._ensure([rows])

    def _ensure(self, sizes: list[int]) -> None:
        for rows in sizes:
            if rows not in self.seconds:
                if self.measure is None:
                    raise KeyError(f"no pass costs for batch size {rows}")
                self.seconds[rows] = self.measure(rows)

    def at(self, rows: int, width: int) -> float:
        needed = self._bracket(rows)
        self._ensure(needed)
        if needed == [rows]:
            return self.seconds[rows][width]
        lower, *above = needed
        if not above:  # beyond the largest measured batch: proportional
            return self.seconds[lower][width] * rows / lower
        upper = above[0]
        t = (rows - lower) / (upper - lower)
        return (1 - t) * self.seconds[lower][width] + t * self.seconds[upper][width]


def pass_width(rows: list[tuple[RowRecord, int, int]], costs: RowPassCosts) -> int:
    """The pass width n (1: no drafts) that maximises expected tokens per second over the
    running rows, each given as (record, match length, looked-up tokens available)."""
    count = len(rows)
    best, best_rate = 1, count / costs.at(count, 1)
    widest = max((available for _, _, available in rows), default=0)
    for width in range(2, min(widest, MAX_DRAFT) + 2):
        gained = sum(r.gain(m, min(a, width - 1)) for r, m, a in rows)
        rate = (count + gained) / costs.at(count, width)
        if rate > best_rate:
            best, best_rate = width, rate
    return best


@torch.inference_mode()
def time_row_passes(engine: LayerEngine, batches: tuple[int, ...], rounds: int) -> RowPassCosts:
    """Median seconds of a pass over B rows x n tokens (B in `batches`, n in
    1..MAX_DRAFT+1) after a prompt, each (B, n) interleaved over rounds after a warm-up."""
    ids, _ = engine.encode(["The quick brown fox jumps over the lazy dog. " * 4])
    single = engine.prefill(ids, capacity=ids.shape[1] + MAX_DRAFT + 2).cache
    samples: dict[tuple[int, int], list[float]] = {}
    caches = {}
    for rows in batches:
        cache = engine.new_row_cache(rows, capacity=ids.shape[1] + MAX_DRAFT + 2)
        for _ in range(rows):
            cache.add(single)
        caches[rows] = cache
    filled = caches[batches[0]].fill[:, 0].clone()
    inputs = ids[:, -1:].repeat(max(batches), MAX_DRAFT + 1)
    for round_ in range(rounds + 1):  # round 0 warms up
        for rows in batches:
            cache = caches[rows]
            for width in range(1, MAX_DRAFT + 2):
                hidden = engine.embed(inputs[:rows, :width])
                start = time.perf_counter()
                out = engine.run_rows(hidden, cache, 0, engine.num_layers)
                engine.logits(out.reshape(rows * width, -1))
                if round_:
                    samples.setdefault((rows, width), []).append(time.perf_counter() - start)
                cache.fill[:, :rows] = filled.unsqueeze(1)
    seconds: dict[int, dict[int, float]] = {}
    for (rows, width), values in samples.items():
        seconds.setdefault(rows, {})[width] = statistics.median(values)
    return RowPassCosts(seconds)


def measure_row_pass_costs(
    engine: LayerEngine, max_rows: int, rounds: int = 3, use_cache: bool = True
) -> RowPassCosts:
    """Pass costs of a running batch on this machine for the measured batch sizes up to
    `max_rows` (at least batch 1), each timed when first needed and cached as
    `measure_pass_costs` is."""
    sizes = tuple(b for b in ROW_BATCHES if b <= max(1, max_rows))
    if max_rows not in sizes and max_rows > 1:
        sizes = (*sizes, max_rows)
    path_kind = (engine.weights, engine.kernels.skinny_rows, engine.compiled is not None)
    path_kind += (engine.batch_dense,)  # dense products from a batch size (engine/quant.py)

    def path(rows: int) -> Path:
        key = machine_key("row-passes-2", engine.fingerprint, str(engine.dtype), *path_kind, rows)
        return home() / "kernels" / f"row-passes-{key}.json"

    def measure(rows: int) -> dict[int, float]:
        with OthersCPU() as others:
            seconds = time_row_passes(engine, (rows,), rounds).seconds[rows]
        keep_timing(path(rows), seconds, others, use_cache)
        return seconds

    seconds = {}
    for rows in sizes:
        if use_cache and path(rows).exists():
            seconds[rows] = {int(n): s for n, s in json.loads(path(rows).read_text()).items()}
    return RowPassCosts(seconds, measure, sizes)
