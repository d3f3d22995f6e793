"""Exit readouts on real weights: training beats the logit lens, save/load round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from earlyexit.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.report import readout_report, render_report
from earlyexit.readouts.store import META, load_readout, save_readout
from earlyexit.readouts.train import TrainConfig, TrainResult, train_readout

pytestmark = pytest.mark.weights

LAYERS = [8, 20, 27]


# Training takes ~30 s on 2 cores: the tests that use it are marked slow.
@pytest.fixture(scope="module")
def trained(smol: LayerEngine) -> TrainResult:
    config = TrainConfig(
        tokens=2048, seq_len=128, steps=15, batch_tokens=256, layers=LAYERS, heldout_tokens=1024
    )
    return train_readout(smol, config)


@pytest.mark.slow
def test_trained_readout_beats_logit_lens_on_heldout_text(trained: TrainResult) -> None:
    assert [m.layer for m in trained.metrics] == LAYERS
    for m in trained.metrics:
        # the lens is far off before the last layers; a fitted adapter must close most of it
        assert m.kl < 0.5 * m.lens_kl, m
        assert m.top1 > m.lens_top1, m
    kls = [m.kl for m in trained.metrics]
    assert kls == sorted(kls, reverse=True), "deeper layers should be closer to the final one"


@pytest.mark.slow
def test_distillation_lowers_kl_below_least_squares(smol: LayerEngine) -> None:
    base = dict(tokens=2048, seq_len=128, batch_tokens=256, layers=[20], heldout_tokens=1024)
    fitted = train_readout(smol, TrainConfig(steps=0, **base)).metrics[0]
    tuned = train_readout(smol, TrainConfig(steps=100, **base)).metrics[0]
    assert tuned.kl < fitted.kl


@pytest.mark.slow
def test_save_load_round_trip(smol: LayerEngine, trained: TrainResult, tmp_path: Path) -> None:
    path = save_readout(trained.readout, tmp_path / "ro", trained.metadata())
    meta = json.loads((path / META).read_text())
    assert meta["model"] == "smollm2-135m" and meta["layers"] == LAYERS
    assert meta["heldout"][0]["layer"] == LAYERS[0] and meta["config"]["steps"] == 15
    loaded = load_readout(smol, path)
    hidden = torch.randn(2, 3, smol.hidden_size)
    for layer in LAYERS:
        expected = trained.readout.logits(hidden, layer)
        assert torch.equal(loaded.logits(hidden, layer), expected)
    ids = torch.tensor([11, 7, 300])
    assert torch.allclose(loaded.logits(hidden, 20, ids), loaded.logits(hidden, 20)[..., ids])
    # the teacher vocabulary travels with the readout (a shallow exit may read only it)
    assert loaded.vocabulary is not None and torch.equal(
        loaded.vocabulary, trained.readout.vocabulary
    )
    from earlyexit.decoding.shallow_exit import ShallowExit

    shallow = ShallowExit.restricted(loaded, LAYERS[0])
    assert smol.tokenizer.eos_token_id in shallow.vocab.tolist()
    conf, token = shallow.predict(hidden[0, :1])
    assert token in shallow.vocab.tolist() and 0 <= conf <= 1


def test_readout_for_another_model_is_refused(
    gemma: LayerEngine, trained: TrainResult, tmp_path: Path
) -> None:
    path = save_readout(trained.readout, tmp_path / "ro", trained.metadata())
    with pytest.raises(EarlyExitError, match="trained for model 'smollm2-135m'"):
        load_readout(gemma, path)


def test_corrupt_or_missing_readout(smol: LayerEngine, tmp_path: Path) -> None:
    with pytest.raises(EarlyExitError, match="heads train"):
        load_readout(smol, tmp_path / "absent")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / META).write_text("{oops")
    with pytest.raises(EarlyExitError, match="corrupt"):
        load_readout(smol, tmp_path / "bad")


@pytest.mark.slow
def test_report_has_every_layer_and_costs(smol: LayerEngine, trained: TrainResult) -> None:
    report = readout_report(smol, trained.readout, tokens=128, seq_len=128, cost_iters=2)
    assert [m["layer"] for m in report["layers"]] == list(range(1, smol.num_layers))
    by_layer = {m["layer"]: m for m in report["layers"]}
    assert by_layer[20]["kl"] < by_layer[20]["lens_kl"]  # trained layer
    assert by_layer[21]["kl"] == by_layer[21]["lens_kl"]  # untrained layer: plain lens
    cost = report["cost"]
    assert cost["readout_layer"] in by_layer and cost["ms_per_layer"] > 0
    assert set(cost["ms_candidate_readout"]) == {"2", "64"}
    assert len(render_report(report)) == 2


@pytest.mark.slow
def test_cli_train_then_report(smol: LayerEngine, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from earlyexit.cli import app
    from earlyexit.readouts.store import readout_dir

    name = "cli-test"
    out = tmp_path / "train.json"
    args = ["heads", "train", "--tokens", "512", "--steps", "2", "--layers", "20"]
    args += ["--heldout-tokens", "256", "--name", name, "--json", str(out)]
    try:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(out.read_text())["layers"][0]["layer"] == 20
        assert (readout_dir(smol, name) / META).exists()
        report = tmp_path / "report.json"
        args = ["heads", "report", "--name", name, "--tokens", "256", "--json", str(report)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(report.read_text())["trained_layers"] == [20]
    finally:
        import shutil

        shutil.rmtree(readout_dir(smol, name), ignore_errors=True)


def test_self_generated_text_is_cached(
    smol: LayerEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from earlyexit.readouts import self_distill

    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    prompts = ["Say hello.", "Name a colour."]
    first = self_distill.cached_self_generated_chunks(smol, prompts, 6, 8)
    assert first.shape[1] == 8 and first.shape[0] >= 1
    files = list((tmp_path / "self-distill").rglob("*.pt"))
    assert len(files) == 1 and not list(files[0].parent.glob(".*"))

    def regenerate(*args: object) -> torch.Tensor:
        raise AssertionError("the cached text should have been reused")

    monkeypatch.setattr(self_distill, "self_generated_chunks", regenerate)
    assert torch.equal(self_distill.cached_self_generated_chunks(smol, prompts, 6, 8), first)
    files[0].write_bytes(b"damaged")  # a damaged cache file is regenerated
    monkeypatch.undo()
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    assert torch.equal(self_distill.cached_self_generated_chunks(smol, prompts, 6, 8), first)


def test_head_products_follow_the_timed_choice(
    smol: LayerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Distillation multiplies the head in bf16 only where that was timed faster on this CPU
    (emulated bf16 is several times slower on CPUs without it): fp32 gives the exact fp32
    log-probabilities, bf16 the same within bf16 rounding."""
    from earlyexit.readouts import train

    hidden = torch.randn(4, smol.hidden_size, generator=torch.Generator().manual_seed(0))
    vocab = torch.arange(0, 2048)
    key = (smol.hidden_size, torch.get_num_threads())
    assert isinstance(train.bf16_head_is_faster(smol.hidden_size), bool)
    assert key in train._BF16_FASTER  # timed once per process
    exact = torch.log_softmax(smol.head_logits(smol.final_norm(hidden), vocab), dim=-1)
    monkeypatch.setitem(train._BF16_FASTER, key, False)
    assert torch.equal(train._log_probs(smol, hidden, vocab), exact)
    monkeypatch.setitem(train._BF16_FASTER, key, True)
    rounded = train._log_probs(smol, hidden, vocab)
    assert 0 < (rounded - exact).abs().max() < 0.5
