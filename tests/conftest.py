"""Shared fixtures: real pretrained weights, loaded once per test session (fp32)."""

from __future__ import annotations

import pytest
import torch

from earlyexit.engine import LayerEngine
from earlyexit.models import load_model

torch.manual_seed(0)


@pytest.fixture(scope="session")
def smol() -> LayerEngine:
    return LayerEngine(load_model("smollm2-135m", dtype="float32"))


@pytest.fixture(scope="session")
def gemma() -> LayerEngine:
    return LayerEngine(load_model("gemma3-270m", dtype="float32"))


@pytest.fixture(params=["smol", "gemma"])
def engine(request: pytest.FixtureRequest) -> LayerEngine:
    return request.getfixturevalue(request.param)
