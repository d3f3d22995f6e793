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
from earlyexit.decoding.shallow_deep import DecodeConfig, ShallowExit, begin, next_input
from earlyexit.engine.engine import LayerEngine


@torch.inference_mode()
def confidence_pairs(
    engine: LayerEngine, shallow: ShallowExit, prompts: list[str], config: DecodeConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, agreed) for every generated token of full-depth greedy decoding."""
    k, total = shallow.layer, engine.num_layers
    confs: list[float] = []
    agreed: list[bool] = []
    config = replace(config, sampling=SamplingConfig())  # teacher forcing on greedy output
    for prompt in prompts:
        run = begin(engine, prompt, config, reader=shallow)
        tokens = run.result.tokens
        while not run.stopping.done(tokens):
            hidden = engine.run_layers(next_input(engine, tokens[-1]), run.cache, 0, k)
            conf, guess = shallow.predict(shallow.read(hidden, run.cache))
            hidden = engine.run_layers(hidden, run.cache, k, total)
            tokens.append(int(engine.logits(hidden[:, -1]).argmax(-1)))
            confs.append(conf)
            agreed.append(guess == tokens[-1])
    return np.array(confs), np.array(agreed, dtype=bool)


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
