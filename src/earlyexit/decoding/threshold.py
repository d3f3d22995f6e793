"""FREE's adaptive exit threshold, fitted online with a two-component Beta mixture: ours
(`BetaMixtureThreshold`) and the paper's settings (`OfficialFreeThreshold`).

Every catch-up pass tells, for each token that exited shallow, its shallow confidence and
whether the deep layers agreed. Confidences of agreeing and of disagreeing tokens are each
modelled by a Beta distribution (fitted by the method of moments: the labels are observed,
so no EM is needed), weighted by how often each happens. The threshold is the smallest
confidence whose posterior probability of agreement reaches `target`. Written here because
no maintained library fits a labelled Beta mixture this small in the decode loop; scipy
supplies the densities.
"""

from __future__ import annotations

import numpy as np

from earlyexit.decoding.shallow_deep import Threshold

GRID = np.linspace(0.0, 1.0, 201)


def beta_moments(values: np.ndarray) -> tuple[float, float]:
    """Beta(a, b) with the sample's mean and variance (variance floored, so that a tight
    cluster gives a sharp but finite density)."""
    values = np.clip(values, 1e-3, 1 - 1e-3)
    mean = float(values.mean())
    var = max(float(values.var()), 1e-4)
    common = max(mean * (1 - mean) / var - 1, 1e-2)
    return mean * common, (1 - mean) * common


def mixture_threshold(
    confidences: np.ndarray, agreed: np.ndarray, target: float, fallback: float
) -> float:
    """Smallest grid confidence with P(agree | confidence) >= target (and every larger
    one too); `fallback` when one of the two groups is still too small to fit."""
    from scipy.stats import beta

    if agreed.sum() < 4 or (~agreed).sum() < 4:
        return fallback
    a1, b1 = beta_moments(confidences[agreed])
    a0, b0 = beta_moments(confidences[~agreed])
    prior = agreed.mean()
    grid = np.clip(GRID, 1e-3, 1 - 1e-3)
    good = prior * beta.pdf(grid, a1, b1)
    bad = (1 - prior) * beta.pdf(grid, a0, b0)
    posterior = good / np.maximum(good + bad, 1e-300)
    ok = posterior >= target
    # the threshold must leave every confidence above it on the good side
    above = np.flip(np.cumprod(np.flip(ok)))
    index = int(np.argmax(above)) if above.any() else len(GRID) - 1
    return float(GRID[index]) if above.any() else 1.0


class BetaMixtureThreshold(Threshold):
    """Starts at `initial`; refits after every `refit_every` new pairs, from a sliding
    window of the most recent `window` pairs (the distribution drifts with the text).
    The value stays within `bounds`: at 0 every token would exit unchecked until the stack
    fills, at 1 none would exit and the mixture would stop seeing shallow exits."""

    def __init__(
        self,
        target: float = 0.9,
        initial: float = 0.9,
        refit_every: int = 8,
        window: int = 512,
        bounds: tuple[float, float] = (0.05, 0.95),
    ) -> None:
        super().__init__(min(max(initial, bounds[0]), bounds[1]))
        self.target, self.refit_every, self.window = target, refit_every, window
        self.bounds = bounds
        self.confidences: list[float] = []
        self.agreed: list[bool] = []
        self._pending = 0

    def observe(self, pairs: list[tuple[float, bool]]) -> None:
        for conf, agreed in pairs:
            self.confidences.append(conf)
            self.agreed.append(agreed)
        del self.confidences[: -self.window], self.agreed[: -self.window]
        self._pending += len(pairs)
        if self._pending >= self.refit_every:
            self._pending = 0
            value = mixture_threshold(
                np.array(self.confidences), np.array(self.agreed), self.target, self.value
            )
            self.value = min(max(value, self.bounds[0]), self.bounds[1])


class OfficialFreeThreshold(Threshold):
    """The settings of FREE's official code, for side-by-side runs with ours: refit at the
    start of every sequence on all pairs seen so far, for the first `max_refits` sequences,
    then frozen; each labelled group's Beta fitted by moments; the two likelihoods compared
    with equal weights (the prior share of agreement ignored); the threshold read off a
    10-point grid on [0.3, 0.9] as the point where the "agree" likelihood ratio clears zeta
    = 0.4 (the grid is assumed monotone: counted from the top). Its range is the grid's, so
    it can neither reach 0 nor 1."""

    GRID = np.linspace(0.3, 0.9, 10)

    def __init__(self, initial: float = 0.9, zeta: float = 0.4, max_refits: int = 300) -> None:
        super().__init__(initial)
        self.zeta, self.max_refits = zeta, max_refits
        self.confidences: list[float] = []
        self.agreed: list[bool] = []
        self.refits = 0

    def observe(self, pairs: list[tuple[float, bool]]) -> None:
        for conf, agreed in pairs:
            self.confidences.append(conf)
            self.agreed.append(agreed)

    def begin_sequence(self) -> None:
        from scipy.stats import beta

        agreed = np.array(self.agreed, dtype=bool)
        if self.refits >= self.max_refits or agreed.sum() < 2 or (~agreed).sum() < 2:
            return
        self.refits += 1
        confidences = np.clip(np.array(self.confidences), 1e-4, 1 - 1e-4)
        params = [beta_moments(confidences[group]) for group in (~agreed, agreed)]
        means = [a / (a + b) for a, b in params]
        good, bad = (params[1], params[0]) if means[1] >= means[0] else (params[0], params[1])
        ratio = beta.pdf(self.GRID, *good) / np.maximum(
            beta.pdf(self.GRID, *good) + beta.pdf(self.GRID, *bad), 1e-300
        )
        count = int((ratio > self.zeta).sum())
        self.value = float(self.GRID[min(max(len(self.GRID) - count, 0), len(self.GRID) - 1)])
