"""Choices that know the machine: the `auto` rules decide from the timings they cached, the
caches are keyed by what changes the code or its speed, and a failed build falls back.

Each rule is checked on timings written into its cache (int4 slower -> float32, faster ->
int4; skinny within MARGIN -> plain; the fastest many-row product), so an answer that
ignores the timings fails; each cache is checked not to be read under another CPU flag
set, thread count, ATen dispatch level, torch or procedure version. The tiny models here
time in milliseconds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from torch import nn

from earlyexit.engine import LayerEngine, compiled, kernels, quant
from earlyexit.engine.kernels import MARGIN, choose_kernels, machine_key
from earlyexit.engine.quant import (
    AUTO_MARGIN,
    GROUP,
    choose_many_rows,
    choose_weights,
    quantize_model,
)
from earlyexit.engine.skinny import MAX_ROWS, SkinnyLinear, use_skinny_linear
from earlyexit.errors import EarlyExitError

VARIATIONS = ("flags", "threads", "dispatch", "torch", "procedure")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh EARLYEXIT_HOME; returns its timings folder."""
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    return tmp_path / "kernels"


@pytest.fixture(autouse=True)
def _threads_restored() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def vary(what: str, monkeypatch: pytest.MonkeyPatch, procedure: tuple[object, str]) -> None:
    """Change one part of a cache's key: the CPU's flags (a VM masking AVX2 under the same
    model name), the thread count (for real), ATen's dispatch level, torch, or the cache's
    own procedure version (`procedure`: module and constant)."""
    if what == "flags":
        flags = kernels.cpu_flags()
        monkeypatch.setattr(kernels, "cpu_flags", lambda: tuple(f for f in flags if f != "avx2"))
    elif what == "threads":
        torch.set_num_threads(1 if torch.get_num_threads() > 1 else 2)
    elif what == "dispatch":
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    elif what == "torch":
        monkeypatch.setattr(torch, "__version__", "2.99.0+cpu")
    else:
        module, name = procedure
        monkeypatch.setattr(module, name, getattr(module, name) + 1)


def exact_groups(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A weight made of 4-bit groups of 32 (as a Q4_1 GGUF dequantizes): step d, min m."""
    gen = torch.Generator().manual_seed(seed)
    blocks = cols // GROUP
    q = torch.randint(0, 16, (rows, blocks, GROUP), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(rows, blocks, 1, generator=gen) * 0.05 + 1e-3).half().float()
    m = (torch.randn(rows, blocks, 1, generator=gen) * 0.3).half().float()
    return (d * q + m).reshape(rows, cols)


def tiny(weight: torch.Tensor) -> nn.Module:
    """A one-layer "model" with `weight` as its only decoder linear (no head)."""
    model = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    model[0].weight.data.copy_(weight)
    model.get_output_embeddings = lambda: None
    model.config = type("Config", (), {})()
    return model


def sweep_where(winner: str):  # noqa: ANN201 - a kernels.Sweep
    """A fake kernel sweep in which `winner` takes half the other's time everywhere."""

    def sweep(kernel: str, weights: list[torch.Tensor], rows: int) -> list[float]:
        return [1e-6 if kernel == winner else 2e-6 for _ in weights]

    return sweep


def no_timing(*args: object) -> list[float]:
    raise AssertionError("timed again: the cached timings were not used")


def only(folder: Path, pattern: str) -> Path:
    (path,) = folder.glob(pattern)
    return path


def test_machine_key_names_every_part() -> None:
    assert machine_key("x-1", "shapes") == machine_key("x-1", "shapes")
    assert machine_key("x-1", "shapes") != machine_key("x-2", "shapes")
    assert set(kernels.machine()) == {"cpu", "flags", "dispatch", "threads", "torch"}


@pytest.mark.parametrize("what", VARIATIONS[:-1])
def test_machine_key_changes_with_the_machine(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = machine_key("x-1", "shapes")
    vary(what, monkeypatch, (None, ""))
    assert machine_key("x-1", "shapes") != before


# ---- engine/kernels.py: plain or skinny per shape and row count -------------------------


def fp32_model() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(256, 512, bias=False))


def test_kernels_decide_by_the_margin_from_cached_timings(home: Path) -> None:
    model = fp32_model()
    choose_kernels(model, sweep=sweep_where("plain"))
    path = only(home, "kernels-*.json")
    saved = json.loads(path.read_text())
    # skinny/plain time by row count: clearly faster, just inside and just outside MARGIN
    ratio = {1: 0.5, 2: MARGIN - 0.01, 3: MARGIN + 0.01, 4: 1.0}
    timings = {
        shape: {str(n): {"plain": 10.0, "skinny": 10.0 * ratio.get(int(n), 2.0)} for n in by_rows}
        for shape, by_rows in saved["timings"].items()
    }
    assert len(timings) == 2 and all(len(t) == MAX_ROWS for t in timings.values())
    path.write_text(json.dumps({**saved, "timings": timings}))
    choice = choose_kernels(model, sweep=no_timing)
    assert choice.cached and choice.skinny_rows == {shape: [1, 2] for shape in timings}


@pytest.mark.parametrize("what", VARIATIONS)
def test_kernel_timings_are_not_read_under_another_key(
    what: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = fp32_model()
    assert choose_kernels(model, sweep=sweep_where("skinny")).uses_skinny
    vary(what, monkeypatch, (kernels, "PROCEDURE"))
    again = choose_kernels(model, sweep=sweep_where("plain"))
    assert not again.cached and not again.uses_skinny
    assert len(list(home.glob("kernels-*.json"))) == 2


# ---- engine/quant.py: --dtype auto (int4 or float32) ---------------------------------


def test_weights_auto_decides_from_cached_timings(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(exact_groups(256, 512, seed=0))
    choose_weights(model)
    path = only(home, "weights-*.json")
    record = json.loads(path.read_text())
    monkeypatch.setattr(quant, "_sweep_seconds", no_timing)
    for ratio, expected in ((2.0, "float32"), (AUTO_MARGIN + 0.05, "float32"), (0.5, "int4")):
        path.write_text(json.dumps({**record, "fp32_ms": 10.0, "int4_ms": 10.0 * ratio}))
        weights, why = choose_weights(model)
        assert weights == expected and f"{10 * ratio:.1f} ms int4 vs 10.0 ms fp32" in why


@pytest.mark.parametrize("what", VARIATIONS)
def test_weights_timings_are_not_read_under_another_key(
    what: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(exact_groups(256, 512, seed=1))
    choose_weights(model)
    path = only(home, "weights-*.json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "int4_ms": 1234.5}))
    assert "1234.5 ms int4" in choose_weights(model)[1]  # read under its own key
    vary(what, monkeypatch, (quant, "WEIGHTS_PROCEDURE"))
    assert "1234.5" not in choose_weights(model)[1]
    assert len(list(home.glob("weights-*.json"))) == 2


def test_weights_auto_times_fp32_on_the_engines_kernel(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp32 side is timed on the kernel an fp32 engine would use here: engine/kernels.py's
    choice (here its cache says skinny wins at every row count), named in the reason; and
    the timing is keyed by it."""
    calls: list[int] = []
    skinny = quant.skinny_linear

    def counted(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return skinny(x, weight)

    monkeypatch.setattr(quant, "skinny_linear", counted)
    model = tiny(exact_groups(256, 512, seed=2))
    assert choose_kernels(model, sweep=sweep_where("skinny")).rows_for(model[0].weight)
    _, why = choose_weights(model)
    assert calls and "fp32 on the skinny kernel (kernels auto)" in why
    calls.clear()
    _, why = choose_weights(model, kernels="plain")
    assert not calls and "fp32 on F.linear (kernels plain)" in why
    assert len(list(home.glob("weights-*.json"))) == 2


def test_weights_auto_sees_through_the_engines_kernel_modules(home: Path) -> None:
    """An engine's model, its linears switched to the skinny kernel (SkinnyLinear), is
    judged by the same weights as before."""
    noisy = tiny(torch.randn(64, 128, generator=torch.Generator().manual_seed(3)))
    exact = tiny(exact_groups(256, 512, seed=4))
    for model in (noisy, exact):
        use_skinny_linear(model)
        assert type(model[0]) is SkinnyLinear
    weights, why = choose_weights(noisy)
    assert weights == "float32" and "not 4-bit groups" in why
    assert "ms int4 vs" in choose_weights(exact)[1]


def test_many_rows_decides_from_cached_timings(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(exact_groups(64, 128, seed=5))
    quantize_model(model, "int4")  # times the many-row products once
    path = only(home, "many-rows-*.json")
    record = json.loads(path.read_text())
    monkeypatch.setattr(quant, "_MM", no_timing)  # the int4 product: no timing of it
    for fastest in ("int4", "bf16", "fp32", "int4"):
        ms = {name: 1.0 if name == fastest else 2.0 for name in ("int4", "bf16", "fp32")}
        path.write_text(json.dumps({**record, "ms": ms}))
        assert choose_many_rows(model) == fastest


# the int4 model's product timings: (cache file prefix, its procedure constant, the choice)
INT4_TIMINGS = {
    "many-rows": ("MANY_ROWS_PROCEDURE", choose_many_rows),
    "batch-dense": ("BATCH_DENSE_PROCEDURE", quant.choose_batch_dense),
}


@pytest.mark.parametrize("cache", INT4_TIMINGS)
@pytest.mark.parametrize("what", VARIATIONS)
def test_int4_product_timings_are_not_read_under_another_key(
    what: str, cache: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    procedure, choose = INT4_TIMINGS[cache]
    model = tiny(exact_groups(64, 128, seed=6))
    quantize_model(model, "int4")
    vary(what, monkeypatch, (quant, procedure))
    choose(model)
    assert len(list(home.glob(f"{cache}-*.json"))) == 2


def test_batch_dense_rule() -> None:
    """A dense copy serves a running batch from the smallest timed size where it beats the
    kernel by AUTO_MARGIN there and at every larger size; the copy that starts first wins."""
    decide = quant.decide_batch_dense

    def ms(int4: list[float], fp32: list[float], bf16: list[float]) -> dict:
        sizes = quant.BATCH_ROWS
        return {
            name: dict(zip(sizes, times, strict=True))
            for name, times in (("int4", int4), ("fp32", fp32), ("bf16", bf16))
        }

    assert decide(ms([10, 20, 40], [30, 30, 30], [50, 50, 50])) == (8, "fp32")
    assert decide(ms([10, 20, 40], [9, 15, 30], [50, 50, 50])) == (2, "fp32")
    assert decide(ms([10, 20, 40], [30, 15, 30], [50, 17, 20])) == (4, "fp32")
    assert decide(ms([10, 20, 40], [30, 30, 30], [50, 17, 20])) == (4, "bf16")
    assert decide(ms([10, 20, 40], [9, 30, 50], [50, 50, 50])) is None  # not at larger sizes
    assert decide(ms([10, 20, 40], [9.5, 19, 38], [50, 50, 50])) is None  # within the margin


def test_batch_dense_decides_from_cached_timings(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny(exact_groups(64, 128, seed=7))
    quantize_model(model, "int4")  # times the running-batch products once
    path = only(home, "batch-dense-*.json")
    record = json.loads(path.read_text())
    monkeypatch.setattr(quant, "_MM", no_timing)  # the int4 product: no timing of it
    int4 = {str(b): 10.0 * b for b in quant.BATCH_ROWS}
    for dense, chosen in ((5.0, (2, "fp32")), (1000.0, None), (35.0, (4, "fp32"))):
        fp32 = {str(b): dense for b in quant.BATCH_ROWS}
        path.write_text(json.dumps({**record, "ms": {"int4": int4, "fp32": fp32, "bf16": {}}}))
        choice = quant.choose_batch_dense(model)
        assert choice.cached and choice.chosen == chosen


# ---- engine/compiled.py: the compiled layer steps ------------------------------------


@pytest.mark.weights
@pytest.mark.parametrize("what", VARIATIONS)
def test_library_key_changes_with_the_machine(
    what: str, smol_int4: LayerEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library (and `auto`'s timing of it, keyed by it) is built per CPU flags, thread
    count, dispatch level, torch and procedure: inductor emits code for all of them."""
    spans = compiled.CompiledSpans(
        smol_int4.steps, smol_int4.arch.rotary, f"{smol_int4.fingerprint}-int4"
    )
    before = spans.key(0)
    vary(what, monkeypatch, (compiled, "PROCEDURE"))
    assert spans.key(0) != before


def no_compiler(within: ExitStack, monkeypatch: pytest.MonkeyPatch) -> str:
    """For real: inductor pointed at a C++ compiler that is not there (a setting that is
    also in the library key, so no library is built for it)."""
    from torch._inductor import config

    within.enter_context(config.patch({"cpp.cxx": ("/nonexistent/c++",)}))
    return "compiled steps failed to build: No working C++ compiler found in "


def compile_error(within: ExitStack, monkeypatch: pytest.MonkeyPatch) -> str:
    """What inductor raises when the compiler rejects its code, after export and lowering
    (monkeypatched into the step that compiles)."""
    from torch._inductor.exc import CppCompileError, InductorError

    def failing(*args: object, **kwargs: object) -> None:
        error = CppCompileError(["g++", "layer.cpp"], "layer.cpp:1:1: error: expected ';'")
        raise InductorError(error, None)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", failing)
    return "compiled steps failed to build: CppCompileError: C++ compile error; "


@pytest.mark.weights
@pytest.mark.parametrize("failure", [no_compiler, compile_error])
def test_a_failed_build_runs_eager(
    failure: Callable[[ExitStack, pytest.MonkeyPatch], str],
    smol_int4: LayerEngine,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build that fails (no C++ compiler; the compiler rejecting inductor's code):
    `auto` runs eager and says why in one line, `on` stops with one line naming the fix.
    No compiler is known at once; a compile error after export and lowering (some
    seconds); `on` is refused at once after either (the failure is kept)."""
    if not compiled.compilable(smol_int4.steps):
        pytest.skip(f"no compiled steps on torch {torch.__version__}")
    monkeypatch.setattr(smol_int4, "_compiled_spans", None)  # nothing loaded before
    try:
        with ExitStack() as within, monkeypatch.context() as patched:
            expected = failure(within, patched)
            choice = smol_int4.set_compiled("auto")
            assert not choice.compiled and smol_int4.compiled is None
            assert choice.reason.startswith(expected), choice.reason
            assert choice.reason.endswith("; running eager") and "\n" not in choice.reason
            assert choice.reason in choice.summary()
            with pytest.raises(EarlyExitError) as refused:
                smol_int4.set_compiled("on")
            message = str(refused.value)
            assert message.startswith(expected), message
            assert message.endswith("; use --compiled off") and "\n" not in message
            assert smol_int4.compiled is None
        assert not list((home.parent / "compiled").glob("*.so"))
        ids, pad = smol_int4.encode(["Water boils at"])
        assert smol_int4.greedy(ids, 3, pad).shape == (1, 3)  # eager decoding goes on
    finally:
        smol_int4.set_compiled("off")


@pytest.mark.weights
def test_a_library_that_does_not_load_runs_eager(
    smol_int4: LayerEngine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library file the runner cannot load (here: not a library at all) is a one-line
    reason to run eager too, not a traceback in the first decode step."""
    if not compiled.compilable(smol_int4.steps):
        pytest.skip(f"no compiled steps on torch {torch.__version__}")
    monkeypatch.setattr(smol_int4, "_compiled_spans", None)  # nothing loaded before
    try:
        path = home.parent / "compiled" / f"{smol_int4._spans().key(0)}.so"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not a shared library")
        choice = smol_int4.set_compiled("auto")
        assert not choice.compiled and smol_int4.compiled is None
        assert choice.reason.startswith("compiled steps failed to load: ")
        assert choice.reason.endswith("; running eager") and "\n" not in choice.reason
    finally:
        smol_int4.set_compiled("off")
