"""Kernel choice by measurement: the faster kernel wins per shape and row count, the timings
are cached per machine, and only fp32 CPU weights can go skinny."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from earlyexit.engine.kernels import MAX_ROWS, KernelChoice, choose_kernels, decide, measure


def fake_sweep(kernel: str, weights: list[torch.Tensor], rows: int) -> list[float]:
    """Skinny is twice as fast on 64x512 weights at even row counts; plain wins elsewhere."""
    out = []
    for w in weights:
        fast = kernel == "skinny" and w.shape[0] == 64 and rows % 2 == 0
        out.append(1e-6 if fast else (2e-6 if kernel == "skinny" else 1.5e-6))
    return out


def test_measure_and_decide_pick_the_faster_kernel() -> None:
    weights = [torch.zeros(64, 512), torch.zeros(128, 512), torch.zeros(64, 512)]
    timings = measure(weights, repeats=2, sweep=fake_sweep)
    assert set(timings) == {"64x512", "128x512"}
    assert timings["64x512"]["2"] == pytest.approx({"plain": 1.5, "skinny": 1.0})
    assert decide(timings) == {"64x512": [2, 4, 6, 8], "128x512": []}
    # within the noise margin plain stays
    close = {"64x512": {"1": {"plain": 1.0, "skinny": 0.97}}}
    assert decide(close) == {"64x512": []}


def model_of(dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 512), nn.Linear(4, 4)).to(dtype)


def test_choice_is_timed_once_then_read_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    sweeps: list[int] = []

    def counted(kernel: str, weights: list[torch.Tensor], rows: int) -> list[float]:
        sweeps.append(rows)
        return [1e-6 if kernel == "skinny" and w.shape[0] == 256 else 2e-6 for w in weights]

    model = model_of(torch.float32)
    first = choose_kernels(model, sweep=counted)
    assert not first.cached and sweeps
    # the 4x4 layer is too small for the skinny path and is not timed
    assert first.skinny_rows == {"256x512": list(range(1, MAX_ROWS + 1)), "512x256": []}
    assert first.rows_for(model[0].weight) == frozenset(range(1, MAX_ROWS + 1))
    assert first.rows_for(model[1].weight) == frozenset()
    assert "skinny rows none" in first.summary()
    saved = list((tmp_path / "kernels").iterdir())
    assert len(saved) == 1 and not saved[0].name.startswith(".")
    sweeps.clear()
    again = choose_kernels(model, sweep=counted)
    assert again.cached and not sweeps and again.skinny_rows == first.skinny_rows
    assert KernelChoice(**{**again.__dict__}).summary() == again.summary()


def test_forced_modes_and_other_dtypes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    assert choose_kernels(model_of(torch.float32), "plain").skinny_rows == {}
    forced = choose_kernels(model_of(torch.float32), "skinny")
    assert forced.skinny_rows["512x256"] == list(range(1, MAX_ROWS + 1))
    bf16 = choose_kernels(model_of(torch.bfloat16))
    assert bf16.dtype == "bfloat16" and not bf16.uses_skinny and not bf16.timings
    assert not (tmp_path / "kernels").exists()  # nothing was timed, nothing cached
    with pytest.raises(ValueError, match="auto, plain, skinny"):
        choose_kernels(model_of(torch.float32), "fast")
