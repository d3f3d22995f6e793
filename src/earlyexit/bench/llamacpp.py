"""llama.cpp on the same GGUF and prompts: the CPU speed anchor of `bench engine`, and the
`llama.cpp` peer of `bench generate` (runtime/peers.py).

Optional: `llama-cpp-python` is built from source for the CPU at hand (`cmake_args`; README,
"llama.cpp anchor"). It runs in-process, so a build with instructions this CPU lacks would
take the bench or server down with SIGILL: before first use it is loaded in a child process
(`probe`), and only a build that decodes there is used. When it is missing, dies, or the
model has no GGUF, the bench says so in one line and goes on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from earlyexit.engine.kernels import cpu_flags
from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_file, home

VERSION = "0.3.36"  # the `llamacpp` extra's pin
PROBE_VERSION = 1  # part of the probe cache key: bumped when PROBE_CODE changes
LIB_SUFFIXES = frozenset({".so", ".dylib", ".dll"})  # llama_cpp's native libraries
PROBE_TIMEOUT = 120.0  # seconds for the child to load the GGUF and decode 2 tokens
# The child: load the GGUF with a tiny context, prefill a few tokens, decode two.
PROBE_CODE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=16, n_threads=1, verbose=False)
prompt = llm.tokenize(b"The capital of France is", add_bos=True)
for n, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0), 1):
    if n == 2:
        break
"""

# GGML's x86 options in llama-cpp-python 0.3.36 (vendor/llama.cpp/ggml/CMakeLists.txt), each
# with the /proc/cpuinfo flags its compiler switches need (GGML_AVX512 adds -mavx512f, cd,
# vl, dq and bw). With GGML_NATIVE=OFF the first six default ON, so every option is set.
_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
GGML_X86: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_AVX512", _AVX512),
    ("GGML_AVX512_VBMI", (*_AVX512, "avx512vbmi")),
    ("GGML_AVX512_VNNI", (*_AVX512, "avx512_vnni")),
    ("GGML_AVX512_BF16", (*_AVX512, "avx512_bf16")),
)
# Always off: -march=native turns AMX on where a Xeon reports it, and such builds have died
# there with an illegal instruction.
GGML_AMX = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cmake_args(flags: Iterable[str], arch: str = "x86_64") -> str:
    """CMAKE_ARGS for a llama.cpp build that runs on a CPU with these /proc/cpuinfo flags:
    not -march=native (see GGML_AMX), each x86 extension on exactly where the CPU has it.
    Elsewhere (ARM) llama.cpp's own native build: no x86 options to choose."""
    if arch.lower() not in ("x86_64", "amd64", "i686", "i386"):
        return ""
    have = set(flags)
    args = ["-DGGML_NATIVE=OFF"]
    args += [f"-D{opt}={'ON' if have.issuperset(need) else 'OFF'}" for opt, need in GGML_X86]
    return " ".join(args + [f"-D{opt}=OFF" for opt in GGML_AMX])


def install_command(reinstall: bool = False, python: str | None = None) -> str:
    """The shell line that builds llama-cpp-python for this CPU into this Python's
    environment. --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so it would hand back
    a wheel built for another CPU; a rebuild first uninstalls (same version: no rebuild)."""
    args = cmake_args(cpu_flags(), platform.machine())
    pip = f"{shlex.quote(python or sys.executable)} -m pip"
    line = f"{pip} install --no-cache-dir llama-cpp-python=={VERSION}"
    if args:
        line = f'CMAKE_ARGS="{args}" {line}'
    return f"{pip} uninstall -y llama-cpp-python && {line}" if reinstall else line


def server_build_command(source: str = "llama.cpp", build: str = "llama.cpp/build") -> str:
    """The shell lines that build llama.cpp's `llama-server` (continuous batching over
    parallel slots; `bench serve --llama-server`) for this CPU from a llama.cpp checkout."""
    args = cmake_args(cpu_flags(), platform.machine())
    configure = f"cmake -S {source} -B {build} -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF"
    configure += f" {args}" if args else ""
    return f"{configure} && cmake --build {build} --target llama-server -j"


def model_gguf(model: str) -> Path | None:
    """The GGUF llama.cpp runs for `model`: a registry model's source file, or the user's."""
    from earlyexit.models.fetch import gguf_file
    from earlyexit.models.registry import REGISTRY

    if model in REGISTRY and REGISTRY[model].gguf_parts:
        return gguf_file(REGISTRY[model])
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if found else None


@dataclass
class Probe:
    """What loading the installed build in a child process showed: `why` it cannot be used
    (None: it decoded), and whether that lasts as long as the build and CPU do (a pass or
    SIGILL; a timeout or another failure is probed again in the next process)."""

    why: str | None
    lasting: bool


def probe(
    gguf: Path, code: str = PROBE_CODE, timeout: float = PROBE_TIMEOUT, python: str | None = None
) -> Probe:
    """Run `code` (argv[1]: the GGUF) in a child Python; its death or failure as one line."""
    try:
        done = subprocess.run(
            [python or sys.executable, "-c", code, str(gguf)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        why = f"did not decode 2 tokens of {gguf.name} within {timeout:g} s; left out"
        return Probe(f"llama.cpp: the installed build {why}", lasting=False)
    if done.returncode == 0:
        return Probe(None, lasting=True)
    if done.returncode < 0:
        number = -done.returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGILL:
            why = f"dies on this CPU ({name}: built for instructions this CPU lacks)"
        else:
            why = f"dies loading {gguf.name} ({name})"
        return Probe(
            f"llama.cpp: the installed build {why}; rebuild with: {install_command(True)}",
            lasting=number == signal.SIGILL,
        )
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "no message"
    why = f"fails on {gguf.name} (exit {done.returncode}: {last}); left out"
    return Probe(f"llama.cpp: the installed build {why}", lasting=False)


def _library_files(package: Path) -> list[tuple[str, int, int]]:
    """llama_cpp's native libraries (path, mtime, size): what a rebuild changes."""
    libs = [f for f in sorted(package.rglob("*")) if f.is_file() and LIB_SUFFIXES & set(f.suffixes)]
    return [(str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in libs]


_PROBED: dict[str, Probe] = {}  # this process's probes, by cache key


def checked_probe(package: Path, gguf: Path) -> Probe:
    """`probe`, once per process and, where its result lasts, once per build, CPU and GGUF
    (cached under EARLYEXIT_HOME/kernels/, keyed by the libraries' paths and mtimes)."""
    stat = gguf.stat()
    text = repr(
        (
            f"llamacpp-probe-{PROBE_VERSION}",
            _library_files(package),
            cpu_flags(),
            (str(gguf.resolve()), stat.st_mtime_ns, stat.st_size),
        )
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    if key in _PROBED:
        return _PROBED[key]
    path = home() / "kernels" / f"llamacpp-{key}.json"
    if path.exists():
        found = Probe(**json.loads(path.read_text()))
    else:
        found = probe(gguf, PROBE_CODE)
        if found.lasting:
            with atomic_file(path) as tmp:
                tmp.write_text(json.dumps(asdict(found)))
    _PROBED[key] = found
    return found


def _package() -> Path | None:
    """llama_cpp's folder, found without importing it (loading its libraries can die)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed() -> bool:
    """Whether llama-cpp-python is in this environment (a reinstall must uninstall it)."""
    return _package() is not None


def unavailable(model: str) -> str | None:
    """Why llama.cpp cannot be measured here, or None when it can: installed, the model has
    a GGUF, and the build loads and decodes it in a child process (`checked_probe`)."""
    package = _package()
    if package is None:
        return f"llama.cpp: not installed (optional; build it with: {install_command()})"
    gguf = model_gguf(model)
    if gguf is None:
        return f"llama.cpp: {model} has no GGUF file to run"
    return checked_probe(package, gguf).why


def open_llama(model: str, threads: int) -> Any:
    """llama.cpp's `Llama` on the model's GGUF, or a one-line error saying why not."""
    why = unavailable(model)
    if why is not None:
        raise EarlyExitError(why)
    from llama_cpp import Llama

    return Llama(
        model_path=str(model_gguf(model)),
        n_ctx=0,  # the model's own context length, as the engine allows
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def greedy_tokens(llm: Any, prompt: list[int]) -> Iterator[int]:
    """llama.cpp's greedy continuation of `prompt` token by token (its KV reset first)."""
    llm.reset()
    for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        yield int(token)


def llama_cpp_decoder(
    model: str, prompt_ids: torch.Tensor, threads: int
) -> Callable[[int], torch.Tensor]:
    """f(n): greedy-decode exactly n tokens after `prompt_ids` [1, T] with llama.cpp (the
    same token ids as the engine's, the KV cache reset every call), returning [1, n] ids."""
    if prompt_ids.shape[0] != 1:
        raise ValueError("llama.cpp is measured at batch 1")
    llm = open_llama(model, threads)
    prompt = prompt_ids[0].tolist()

    def run(n: int) -> torch.Tensor:
        out: list[int] = []
        for token in greedy_tokens(llm, prompt):
            out.append(token)
            if len(out) == n:
                break
        return torch.tensor([out])

    return run
