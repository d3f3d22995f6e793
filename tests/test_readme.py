"""README.md's "Python API" section runs as written: its ```python blocks, in order, in one
namespace (later blocks use earlier blocks' variables)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_blocks() -> list[str]:
    text = README.read_text()
    start = text.index("\n## Python API\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    return re.findall(r"^```python\n(.*?)^```$", section, flags=re.M | re.S)


def test_the_python_api_section_imports_only_the_api() -> None:
    blocks = python_api_blocks()
    assert len(blocks) >= 4
    imports = [
        line.strip()
        for block in blocks
        for line in block.splitlines()
        if re.match(r"\s*(from|import)\s", line)
    ]
    assert imports and all(
        re.match(r"(from earlyexit(\.api)? import|import earlyexit(\.api)?$)", line)
        for line in imports
    ), imports


@pytest.mark.weights  # the snippets load smollm2-135m
@pytest.mark.slow
def test_the_python_api_section_runs_as_written() -> None:
    namespace: dict = {"__name__": "readme"}
    printed = io.StringIO()
    for index, block in enumerate(python_api_blocks()):
        code = compile(block, f"README.md python block {index + 1}", "exec")
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)  # noqa: S102 - the README's own snippets
    out = namespace["out"]
    assert out.report.method == "free" and out.report.completion_tokens >= 1
    assert "logit lens (untrained" in out.report.artifacts["shallow_exit"]  # hermetic home
    assert namespace["chunk"].generation is not None
    result = namespace["result"]
    # the README's two reviews: clearly positive, then clearly negative (a classifier that
    # gives every text one label fails). Both answers hold with wide margins: the gaps
    # between the two label scores were 5.5 and 7.2 logits for AdaInfer's task probe (exits
    # at layers 22 and 21) and 0.95 and 2.3 for the zero-shot label map, measured on an AMD
    # EPYC, where `--dtype auto` took float32 (int4, taken where it times faster, was not
    # measured)
    assert namespace["reviews"] == [
        "a gripping, beautifully acted film",
        "flat, dull and far too long",
    ]
    assert result.labels == ["positive", "negative"] == namespace["zero_shot"].labels
    assert "task probe fitted on 40 train prompts" in result.report.artifacts["readout"]
    assert printed.getvalue().strip()


def server_section() -> tuple[str, str]:
    """README's "Server" section: its `earlyexit serve` command and its client block."""
    text = README.read_text()
    start = text.index("\n## Server\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end >= 0 else len(text)]
    (command,) = re.findall(r"^```bash\n(.*?)^```$", section, flags=re.M | re.S)
    (client,) = re.findall(r"^```python\n(.*?)^```$", section, flags=re.M | re.S)
    return command.strip(), client


@pytest.mark.weights  # the server loads smollm2-135m
@pytest.mark.slow
def test_the_server_section_runs_as_written() -> None:
    """`earlyexit serve` as the README starts it (on a free port instead of 8000), and the
    README's client code against it."""
    import shlex
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    command, client = server_section()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    argv = shlex.split(command.replace("8000", port))
    assert argv[:2] == ["earlyexit", "serve"]
    executable = Path(sys.executable).with_name("earlyexit")
    server = subprocess.Popen(
        [str(executable), *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        namespace: dict = {"__name__": "readme"}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(
                compile(client.replace("8000", port), "README.md server client", "exec"), namespace
            )  # noqa: S102
        reply = namespace["reply"]
        assert reply.choices[0].message.content
        assert reply.model_extra["early_exit"]["method"] == "free"
        assert printed.getvalue().count("\n") >= 2
    finally:
        server.terminate()  # SIGTERM: uvicorn's graceful shutdown, then it re-raises SIGTERM
        output, _ = server.communicate(timeout=60)
    assert "Finished server process" in output, output
