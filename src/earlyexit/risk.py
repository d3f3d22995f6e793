"""Guarantees and error bars: Learn-then-Test risk control and bootstrap intervals.

**Learn-then-Test** (Angelopoulos, Bates, Candès, Jordan and Lei, 2021; the procedure CALM
calibrates with). An exit knob is a grid of settings ordered from safest to most aggressive
(a confidence threshold from high to low, a static layer from deep to shallow). Each
calibration example gives a loss in [0, 1] per setting: 1 when the early answer disagrees
with the full model's (a class; a whole generated answer), or a graded share.
For each setting j the null hypothesis "its risk exceeds eps" gets a valid p-value from the
calibration mean; fixed-sequence testing walks the grid in order and stops at the first
p-value above delta. Every setting passed has risk <= eps, simultaneously, with probability
at least 1 - delta over the draw of the calibration set, so the last one passed is used.
When none passes, the safe setting (full depth, risk 0) is used and the result says so.

p-values: for 0/1 losses the exact binomial tail P(Bin(n, eps) <= n * mean); for losses in
between, Hoeffding-Bentkus (the smaller of the Hoeffding and Bentkus bounds).

Written here because no well-kept library implements LTT's fixed-sequence calibration; the
tails come from scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from earlyexit.errors import EarlyExitError

BOOTSTRAP_ROUNDS = 1000
LEVEL = 0.95
# confidence (top-1 minus top-2) thresholds, safest first, and one no readout reaches
CONFIDENCE_GRID = [round(0.99 - 0.01 * i, 2) for i in range(99)]
NEVER_EXIT = 1.01


def check_risk(risk: float | None, delta: float) -> None:
    """The one-line errors for `--risk` / `--delta` outside (0, 1), before any model work."""
    if risk is not None and not 0 < risk < 1:
        raise EarlyExitError(f"--risk must lie in (0, 1), not {risk}")
    if not 0 < delta < 1:
        raise EarlyExitError(f"--delta must lie in (0, 1), not {delta}")


def binomial_p_value(losses: np.ndarray, eps: float) -> float:
    """p-value of "risk > eps" for 0/1 losses: P(Bin(n, eps) <= number of losses)."""
    n = len(losses)
    return float(stats.binom.cdf(int(round(float(np.sum(losses)))), n, eps))


def hoeffding_bentkus_p_value(losses: np.ndarray, eps: float) -> float:
    """p-value of "risk > eps" for losses in [0, 1] (Bates et al., 2021, Prop. 3)."""
    n = len(losses)
    mean = float(np.mean(losses))
    if mean >= eps:
        return 1.0
    a = min(mean, eps)
    kl = a * math.log(a / eps) if a > 0 else 0.0
    kl += (1 - a) * math.log((1 - a) / (1 - eps))
    hoeffding = math.exp(-n * kl)
    bentkus = math.e * float(stats.binom.cdf(math.ceil(n * mean), n, eps))
    return min(hoeffding, bentkus, 1.0)


def p_value(losses: np.ndarray, eps: float) -> float:
    """The exact binomial tail where losses are 0/1, else Hoeffding-Bentkus."""
    losses = np.asarray(losses, dtype=float)
    if np.all((losses == 0) | (losses == 1)):
        return binomial_p_value(losses, eps)
    return hoeffding_bentkus_p_value(losses, eps)


@dataclass
class LTTChoice:
    """What Learn-then-Test chose on one calibration set."""

    risk: float  # eps: the risk bound asked for
    delta: float  # the bound holds with probability at least 1 - delta
    n: int  # calibration examples
    setting: float  # the chosen knob value (the safe one when nothing was certified)
    certified: bool  # False: no aggressive setting passed; `setting` is the safe one
    calibration_risk: float  # mean loss of the chosen setting on the calibration set
    p_value: float | None  # of the chosen setting (None for the safe fallback)
    tested: int  # settings tested before the sequence stopped

    def to_dict(self) -> dict:
        return asdict(self)


def learn_then_test(
    settings: Sequence[float],
    losses: np.ndarray,
    risk: float,
    delta: float,
    safe: float,
) -> LTTChoice:
    """Fixed-sequence LTT over `settings` (safest first), `losses` [n, len(settings)] in
    [0, 1]; `safe` is the setting used when none is certified (full depth)."""
    losses = np.asarray(losses, dtype=float)
    if losses.ndim != 2 or losses.shape[1] != len(settings) or not len(losses):
        raise ValueError(f"losses must be [examples, {len(settings)}], not {losses.shape}")
    return fixed_sequence(settings, lambda j: losses[:, j], risk, delta, safe)


def fixed_sequence(
    settings: Sequence[float],
    column: Callable[[int], np.ndarray],
    risk: float,
    delta: float,
    safe: float,
) -> LTTChoice:
    """Learn-then-Test with the losses of setting j computed only when the walk reaches it
    (`column(j)`: one loss per calibration example), for knobs whose losses cost real runs
    (CALM). A column may stop early on a setting that fails whatever the rest holds, with
    zeros for the examples it skipped: its p-value is then the best case, already above
    delta, so the walk stops there as it would have."""
    if not 0 < risk < 1 or not 0 < delta < 1:
        raise ValueError(f"risk and delta must lie in (0, 1), not {risk} and {delta}")
    chosen: tuple[int, float, float] | None = None
    tested, n = 0, 0
    for j in range(len(settings)):
        tested += 1
        losses = np.asarray(column(j), dtype=float)
        n = len(losses)
        value = p_value(losses, risk)
        if value > delta:
            break
        chosen = (j, value, float(losses.mean()))
    if chosen is None:
        return LTTChoice(risk, delta, n, safe, False, 0.0, None, tested)
    j, value, mean = chosen
    return LTTChoice(risk, delta, n, float(settings[j]), True, mean, value, tested)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> list[float]:
    """95% percentile interval of `statistic` over examples resampled with replacement."""
    data = np.asarray(values)
    if not len(data):
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(rounds, len(data)))
    return _percentile_interval([statistic(data[p]) for p in picks])


def _percentile_interval(draws: Sequence[float]) -> list[float]:
    tail = (1 - LEVEL) / 2
    return [float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))]


def speedup_ci(
    full_seconds: Sequence[float],
    method_seconds: Sequence[float],
    method_fixed: float = 0.0,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> list[float]:
    """95% interval of sum(full) / (sum(method) + fixed) over timed units (interleaved
    rounds, prompts) resampled with replacement: the speedup's uncertainty from which units
    were timed and how the machine drifted. Paired when both sides have the same units (the
    same batches in each round: drift cancels); otherwise (RAEE regroups rows by planned
    exit) each side is resampled on its own."""
    full, mine = np.asarray(full_seconds, float), np.asarray(method_seconds, float)
    if not len(full) or not len(mine):
        return [math.nan, math.nan]
    if len(full) == len(mine):
        pairs = np.stack([full, mine], axis=1)
        return bootstrap_ci(
            pairs, lambda p: p[:, 0].sum() / (p[:, 1].sum() + method_fixed), rounds, seed
        )
    rng = np.random.default_rng(seed)
    draws = [
        full[rng.integers(0, len(full), len(full))].sum()
        / (mine[rng.integers(0, len(mine), len(mine))].sum() + method_fixed)
        for _ in range(rounds)
    ]
    return _percentile_interval(draws)
