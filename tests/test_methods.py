"""The method registry (earlyexit/methods.py) agrees with the README, the CLI help and the
parsers: every method listed is documented, offered and parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from earlyexit.cli import app
from earlyexit.errors import EarlyExitError
from earlyexit.methods import EVAL, GENERATION, Method
from earlyexit.runtime.calibration import method_args
from earlyexit.runtime.generation import parse_method

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = {"T", "N", "K", "tol", "k", "slack"}  # numbers; any other word is literal


def _paragraph(start: str) -> str:
    text = README.read_text()
    begin = text.index(start)
    return " ".join(text[begin : text.index("\n\n", begin)].split())


def _syntax_regex(syntax: str) -> re.Pattern[str]:
    """`name[:a[:X]|:b]` -> a regex: brackets optional, X a number, other words literal."""
    pattern = ""
    for token in re.findall(r"[\w.-]+|[\[\]|:]", syntax):
        if token == "[":
            pattern += "(?:"
        elif token == "]":
            pattern += ")?"
        elif token in ("|", ":"):
            pattern += token
        elif token in PLACEHOLDERS:
            pattern += r"[0-9.]+"
        else:
            pattern += re.escape(token)
    return re.compile(pattern)


@pytest.mark.parametrize(
    ("methods", "start"),
    [(GENERATION, "Generation methods:"), (EVAL, "`eval` methods:")],
)
def test_readme_lists_the_registry(methods: tuple[Method, ...], start: str) -> None:
    paragraph = _paragraph(start)
    for method in methods:
        assert f"`{method.syntax}`" in paragraph, method.syntax
    # and nothing else: every method syntax written there is in the registry
    written = {s for s in re.findall(r"`([^`]+)`", paragraph) if "[" in s}
    assert written <= {m.syntax for m in methods}


@pytest.mark.parametrize(
    ("command", "methods"),
    [(["generate"], GENERATION), (["bench", "generate"], GENERATION), (["eval"], EVAL)],
)
def test_cli_help_lists_the_registry(command: list[str], methods: tuple[Method, ...]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    for method in methods:
        assert method.syntax in result.output, (command, method.syntax)


@pytest.mark.parametrize("method", GENERATION, ids=lambda m: m.syntax)
def test_generation_examples_parse(method: Method) -> None:
    assert method.examples
    for example in method.examples:
        assert _syntax_regex(method.syntax).fullmatch(example), example
        assert parse_method(example).name == method.name


@pytest.mark.parametrize("method", EVAL, ids=lambda m: m.syntax)
def test_eval_examples_parse(method: Method) -> None:
    assert method.examples
    for example in method.examples:
        assert _syntax_regex(method.syntax).fullmatch(example), example
        assert method_args(example)[0] == method.name


def test_errors_list_the_registry() -> None:
    with pytest.raises(EarlyExitError) as gen_error:
        parse_method("fastest")
    assert all(m.syntax in str(gen_error.value) for m in GENERATION)
    with pytest.raises(EarlyExitError) as eval_error:
        method_args("magic")
    assert all(m.syntax in str(eval_error.value) for m in EVAL)
