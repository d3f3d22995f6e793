"""Shared fixtures: real pretrained weights, loaded once per test session (fp32).

Hermetic: the run gets a fresh EARLYEXIT_HOME, so nothing a user trained, calibrated or
timed (readouts, RAEE databases, self-distillation text, kernel timings) leaks into a test;
only the model cache is shared with the user's (weights are fetched and verified by sha256).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from earlyexit import paths
from earlyexit.engine import LayerEngine
from earlyexit.models import load_model

torch.manual_seed(0)
_RUN_HOME: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _RUN_HOME
    models = paths.home() / "models"
    models.mkdir(parents=True, exist_ok=True)
    _RUN_HOME = Path(tempfile.mkdtemp(prefix="earlyexit-test-home-"))
    (_RUN_HOME / "models").symlink_to(models.resolve(), target_is_directory=True)
    os.environ["EARLYEXIT_HOME"] = str(_RUN_HOME)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUN_HOME is not None:
        shutil.rmtree(_RUN_HOME, ignore_errors=True)  # unlinks the models link, not its target


# Fixtures that load real weights: a test that uses one (directly or through another fixture)
# is marked `weights` below, so `-m "not weights"` never loads a model. Tests that load
# weights another way (the CLI, a tokenizer) carry the mark themselves.
WEIGHT_FIXTURES = frozenset({"smol", "smol_int4", "gemma", "engine"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if WEIGHT_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.weights)


@pytest.fixture(autouse=True)
def _others_cpu_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timings are cached whatever else the machine runs meanwhile, so that tests of the
    caches do not depend on the machine's load (tests/test_quant.py checks, with a simulated
    load, that a timing taken while others use the CPU is not cached)."""
    from earlyexit.engine import kernels

    monkeypatch.setattr(kernels, "_busy_seconds", lambda: None)


@pytest.fixture(scope="session")
def smol() -> LayerEngine:
    return LayerEngine(load_model("smollm2-135m", dtype="float32"))


@pytest.fixture(scope="session")
def smol_int4() -> LayerEngine:
    return LayerEngine(load_model("smollm2-135m", dtype="int4"))


@pytest.fixture(scope="session")
def gemma() -> LayerEngine:
    return LayerEngine(load_model("gemma3-270m", dtype="float32"))


@pytest.fixture(params=["smol", "gemma"])
def engine(request: pytest.FixtureRequest) -> LayerEngine:
    return request.getfixturevalue(request.param)


def logits_after_each_token(engine: LayerEngine, prompt: str, tokens: list[int]) -> torch.Tensor:
    """The model's own logits (plain forward) for every emitted token, given the prompt and
    the tokens before it: what a decoding loop's choices are checked against."""
    ids, _ = engine.encode([prompt])
    sequence = torch.cat([ids[0], torch.tensor(tokens[:-1], dtype=ids.dtype)])[None]
    with torch.no_grad():
        return engine.model(input_ids=sequence).logits[0, ids.shape[1] - 1 :]


@pytest.fixture
def teacher_forced():  # noqa: ANN201 - the function above, for tests
    return logits_after_each_token
