"""Choosing the next token: greedy, or sampling with temperature and nucleus (top-p).

`lossless` decoding with sampling uses the speculative-sampling rule (Leviathan et al.,
2023; Chen et al., 2023): a token drafted from the shallow distribution q is kept with
probability min(1, p/q) under the deep distribution p, and on rejection the token is
drawn from max(0, p - q) renormalised. The emitted tokens are then distributed exactly as
sampling from the full model. Written here because transformers keeps this rule inside
its `generate` loop, not as a function one can call on two distributions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit.errors import EarlyExitError


@dataclass
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EarlyExitError("temperature must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise EarlyExitError("top_p must lie in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Token choice for one decode; owns its random generator, so runs are reproducible."""

    def __init__(self, config: SamplingConfig | None = None) -> None:
        self.config = config or SamplingConfig()
        self.generator = torch.Generator().manual_seed(self.config.seed)

    @property
    def greedy(self) -> bool:
        return self.config.greedy

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution tokens are drawn from: tempered, nucleus-truncated, renormalised
        (a one-hot on the argmax when greedy)."""
        logits = logits.float()
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        probs = torch.softmax(logits / self.config.temperature, dim=-1)
        if self.config.top_p < 1:
            ordered, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (the top token always)
            drop = ordered.cumsum(-1) - ordered >= self.config.top_p
            ordered = ordered.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, ordered)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def draw(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs.reshape(-1), 1, generator=self.generator))

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from one row of logits."""
        logits = logits.reshape(-1)
        if self.greedy:
            return int(logits.argmax())
        return self.draw(self.probs(logits))

    def accept(self, p: torch.Tensor, q: torch.Tensor, token: int) -> bool:
        """Keep a token drafted from q with probability min(1, p[token] / q[token])."""
        ratio = float(p[token]) / max(float(q[token]), 1e-30)
        if ratio >= 1:
            return True
        return float(torch.rand((), generator=self.generator)) < ratio

    def resample(self, p: torch.Tensor, q: torch.Tensor) -> int:
        """The replacement for a rejected draft: a draw from max(0, p - q), renormalised."""
        residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any draw from p will do
            residual = p
        return self.draw(residual / residual.sum())
