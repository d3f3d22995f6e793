"""Calibrated exit thresholds from full-depth decoding (CALM-style, token level).

Decode calibration prompts at full depth and read the shallow exit at every step (teacher
forcing on the full model's own output): each token gives (shallow confidence, shallow
prediction == full prediction). The threshold is the smallest confidence above which at
most `tolerance` of tokens disagree. CALM calibrates sequence-level consistency with
Learn-then-Test; this token-level version is the usual simplification, and also gives
FREE's adaptive threshold a sensible start.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.decoding.shallow_deep import DecodeConfig, begin
from earlyexit.decoding.shallow_exit import ShallowExit, next_input
from earlyexit.engine.engine import LayerEngine


@torch.inference_mode()
def confidence_pairs(
    engine: LayerEngine, shallow: ShallowExit, prompts: list[str], config: DecodeConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(confidence, agreed, prompt index) for every generated token of full-depth greedy
    decoding."""
    k, total = shallow.layer, engine.num_layers
    confs: list[float] = []
    agreed: list[bool] = []
    sequence: list[int] = []
    config = replace(config, sampling=SamplingConfig())  # teacher forcing on greedy output
    for index, prompt in enumerate(prompts):
        run = begin(engine, prompt, config, reader=shallow)
        tokens = run.result.tokens
        while not run.stopping.done(tokens):
            hidden = engine.run_layers(next_input(engine, tokens[-1]), run.cache, 0, k)
            conf, guess = shallow.predict(shallow.read(hidden, run.cache))
            hidden = engine.run_layers(hidden, run.cache, k, total)
            tokens.append(int(engine.logits(hidden[:, -1]).argmax(-1)))
            confs.append(conf)
            agreed.append(guess == tokens[-1])
            sequence.append(index)
    return np.array(confs), np.array(agreed, dtype=bool), np.array(sequence, dtype=int)


def calibrated_threshold(confs: np.ndarray, agreed: np.ndarray, tolerance: float) -> float:
    """Smallest threshold whose exits (confidence >= threshold) disagree at most
    `tolerance` of the time; 1.0 (never exit) if none does."""
    order = np.argsort(-confs)
    errors = np.cumsum(~agreed[order])
    counts = np.arange(1, len(order) + 1)
    ok = errors / counts <= tolerance
    if not ok.any():
        return 1.0
    # the largest prefix (lowest threshold) that still meets the tolerance
    last = int(np.nonzero(ok)[0].max())
    return float(confs[order][last])


def sequence_risk_losses(
    confs: np.ndarray, agreed: np.ndarray, sequence: np.ndarray, grid: list[float], prompts: int
) -> np.ndarray:
    """[prompts, len(grid)] 0/1: would an exit at threshold grid[j] change prompt i's
    answer? For FREE this is exact: its exits at tokens whose shallow confidence reaches
    the threshold, and a token that agrees with the deep one leaves everything after it as
    full decoding has it (the deep KV is filled in later), so the answer differs from the
    full model's exactly when some exited token disagreed. The shallow confidence of a
    token depends only on layers below the exit, identical in both runs. A prompt without
    pairs (its answer was one token) cannot change: loss 0."""
    worst = np.full(prompts, -np.inf)  # the most confident disagreement per prompt
    wrong = ~agreed
    np.maximum.at(worst, sequence[wrong], confs[wrong])
    return (worst[:, None] >= np.asarray(grid)[None, :]).astype(float)
