"""llama.cpp that fits the CPU: the build options chosen from the CPU's flags, and the child
process that loads the installed build before the bench does (children that die by SIGILL,
fail, hang or pass stand in for builds, so no native build or weights are needed)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from earlyexit.bench import llamacpp
from earlyexit.bench.llamacpp import Probe, cmake_args, open_llama, probe, unavailable
from earlyexit.engine.kernels import cpu_flags
from earlyexit.errors import EarlyExitError
from earlyexit.paths import home

SIGILL_CHILD = "import os, signal; os.kill(os.getpid(), signal.SIGILL)"
PASSING_CHILD = "import sys; sys.exit(0)"


def flags(text: str) -> list[str]:
    return text.split()


# AMD EPYC Zen 3 (this repo's CI machine): AVX2, FMA, F16C, BMI2, no AVX-512
ZEN3 = flags(
    "fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c bmi1 avx2 "
    "bmi2 sha_ni vaes vpclmulqdq"
)
# Sapphire/Emerald Rapids: AVX-512 with VNNI and BF16, AVX-VNNI, AMX
XEON_AMX = ZEN3 + flags(
    "avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni "
    "amx_tile amx_int8 amx_bf16"
)
SSE4 = flags("fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt")
AMX_OFF = {"GGML_AMX_TILE": "OFF", "GGML_AMX_INT8": "OFF", "GGML_AMX_BF16": "OFF"}


def options(args: str) -> dict[str, str]:
    pairs = [arg.removeprefix("-D").split("=") for arg in args.split()]
    assert all(len(pair) == 2 for pair in pairs), args
    return dict(pairs)


def test_an_avx2_cpu_gets_avx2_and_no_avx512() -> None:
    assert options(cmake_args(ZEN3)) == {
        "GGML_NATIVE": "OFF",
        "GGML_SSE42": "ON",
        "GGML_AVX": "ON",
        "GGML_AVX2": "ON",
        "GGML_FMA": "ON",
        "GGML_F16C": "ON",
        "GGML_BMI2": "ON",
        "GGML_AVX_VNNI": "OFF",
        "GGML_AVX512": "OFF",
        "GGML_AVX512_VBMI": "OFF",
        "GGML_AVX512_VNNI": "OFF",
        "GGML_AVX512_BF16": "OFF",
        **AMX_OFF,
    }


def test_an_avx512_amx_cpu_gets_avx512_vnni_bf16_and_never_amx() -> None:
    chosen = options(cmake_args(XEON_AMX))
    on = {"GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"}
    assert {opt for opt in on if chosen[opt] == "ON"} == on
    assert chosen["GGML_AVX512_VBMI"] == "OFF"  # not in the flags
    assert chosen["GGML_NATIVE"] == "OFF"
    assert {opt: chosen[opt] for opt in AMX_OFF} == AMX_OFF


def test_a_bare_sse4_cpu_turns_off_what_ggml_would_default_on() -> None:
    chosen = options(cmake_args(SSE4))
    assert chosen["GGML_SSE42"] == "ON"
    off = [opt for opt in chosen if opt != "GGML_SSE42"]
    assert off and all(chosen[opt] == "OFF" for opt in off), chosen


def test_avx512_needs_every_extension_its_compiler_switches_name() -> None:
    """GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw: a CPU with only F and CD (Knights
    Landing) must not get it, nor its VNNI on top."""
    partial = [*ZEN3, "avx512f", "avx512cd", "avx512_vnni"]
    chosen = options(cmake_args(partial))
    assert chosen["GGML_AVX512"] == "OFF" and chosen["GGML_AVX512_VNNI"] == "OFF"


def test_arm_keeps_llama_cpps_own_build() -> None:
    assert cmake_args(["fp", "asimd", "sve"], arch="aarch64") == ""


def test_the_install_line_is_this_cpus() -> None:
    args = cmake_args(cpu_flags(), platform.machine())
    assert (
        llamacpp.install_command(python="/opt/my env/bin/python")
        == (f'CMAKE_ARGS="{args}" ' if args else "")
        + "'/opt/my env/bin/python' -m pip install --no-cache-dir llama-cpp-python==0.3.36"
    )
    again = llamacpp.install_command(reinstall=True, python="py")
    assert again.startswith("py -m pip uninstall -y llama-cpp-python && ")


def test_bench_llamacpp_install_prints_the_line() -> None:
    from earlyexit.cli import app

    result = CliRunner().invoke(app, ["bench", "llamacpp-install"])
    assert result.exit_code == 0, result.output
    assert result.output == llamacpp.install_command(reinstall=llamacpp.installed()) + "\n"


def test_a_build_dying_by_sigill_is_one_line(tmp_path: Path) -> None:
    found = probe(tmp_path / "model.gguf", code=SIGILL_CHILD)
    assert found.lasting and found.why is not None and "\n" not in found.why
    assert found.why.startswith(
        "llama.cpp: the installed build dies on this CPU (SIGILL: built for instructions"
    )
    assert "rebuild with: " in found.why and "pip uninstall -y llama-cpp-python" in found.why


def test_a_build_that_decodes_passes(tmp_path: Path) -> None:
    assert probe(tmp_path / "model.gguf", code=PASSING_CHILD) == Probe(None, lasting=True)


def test_a_failing_or_hanging_build_is_one_line_and_probed_again(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    failed = probe(gguf, code="raise SystemExit('cannot read model.gguf')")
    assert failed == Probe(
        "llama.cpp: the installed build fails on model.gguf (exit 1: cannot read model.gguf); "
        "left out",
        lasting=False,
    )
    hung = probe(gguf, code="import time; time.sleep(60)", timeout=0.5)
    assert hung == Probe(
        "llama.cpp: the installed build did not decode 2 tokens of model.gguf within 0.5 s; "
        "left out",
        lasting=False,
    )


@pytest.fixture
def fake_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed `llama_cpp` that must not be imported in-process, with one library."""
    package = tmp_path / "site" / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported in-process')\n")
    (package / "lib" / "libllama.so").write_bytes(b"not really")
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.setattr(llamacpp, "_PROBED", {})
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf


def test_the_bench_leaves_out_a_dying_build_without_loading_it(
    fake_llama_cpp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes: list[Path] = []
    real = llamacpp.probe

    def counted(gguf: Path, code: str) -> Probe:
        probes.append(gguf)
        return real(gguf, code)

    monkeypatch.setattr(llamacpp, "probe", counted)
    monkeypatch.setattr(llamacpp, "PROBE_CODE", SIGILL_CHILD)
    before = set((home() / "kernels").glob("llamacpp-*.json"))
    why = unavailable(str(fake_llama_cpp))
    assert why is not None and "(SIGILL: built for instructions this CPU lacks)" in why
    assert "\n" not in why
    with pytest.raises(EarlyExitError, match="SIGILL") as err:
        open_llama(str(fake_llama_cpp), threads=1)  # the peers' and bench's way in
    assert str(err.value) == why and probes == [fake_llama_cpp]  # probed once per process

    # On disk too: a new process with a child that would pass still reads the SIGILL...
    assert len(set((home() / "kernels").glob("llamacpp-*.json")) - before) == 1
    monkeypatch.setattr(llamacpp, "_PROBED", {})
    monkeypatch.setattr(llamacpp, "PROBE_CODE", PASSING_CHILD)
    assert unavailable(str(fake_llama_cpp)) == why and probes == [fake_llama_cpp]

    # ...until the library is rebuilt (a new mtime): then the new build is probed and passes.
    library = fake_llama_cpp.parent / "site" / "llama_cpp" / "lib" / "libllama.so"
    stat = library.stat()
    os.utime(library, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert unavailable(str(fake_llama_cpp)) is None and len(probes) == 2
    assert "llama_cpp" not in sys.modules  # never imported in this process


def test_a_transient_failure_is_not_cached(
    fake_llama_cpp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llamacpp, "PROBE_CODE", "raise SystemExit('out of memory')")
    before = set((home() / "kernels").glob("llamacpp-*.json"))
    why = unavailable(str(fake_llama_cpp))
    assert why is not None and "exit 1: out of memory" in why
    assert set((home() / "kernels").glob("llamacpp-*.json")) == before
