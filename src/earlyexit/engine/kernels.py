"""Which matmul kernel serves each few-row product: chosen by timing on the machine at hand.

Batch-1 decoding multiplies 1-8 rows by every weight; which kernel streams the weights
fastest depends on the CPU and on MKL's dispatch for it. `F.linear` (plain) and
`skinny_linear` (the matrix-matrix kernel, engine/skinny.py) were measured 1.6-1.8x apart
in *opposite* directions on an AMD EPYC and an Intel Xeon of the same machine kind, so no
choice is hard-coded: for every distinct weight shape of the model and every row count
1..MAX_ROWS both kernels are timed, interleaved, in sweeps over all of the model's weights
in module order (so they stream from memory as in decoding, not from cache), and the skinny
kernel is used only where it wins by more than the noise margin. Products over more rows
(prefill) always go to `F.linear`.

The timings are cached under `EARLYEXIT_HOME/kernels/`, keyed by the machine (`machine_key`:
CPU model and ISA flags, ATen's dispatch level, thread count, torch), this procedure's
version, the dtype and the shapes, so one machine measures once (about a second or two).
`machine_key` keys every timing and compiled library earlyexit caches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from earlyexit.engine.skinny import MAX_ROWS, MIN_WEIGHT, skinny_linear
from earlyexit.paths import atomic_file, home

MARGIN = 0.95  # skinny must take at most this fraction of plain's time to be chosen
MODES = ("auto", "plain", "skinny")
PROCEDURE = 2  # part of the cache key: timings from an older procedure are measured again


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (none where there is no such file)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key and key not in fields:
                    fields[key] = value.strip()
                if not line.strip() and fields:
                    break
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name, with its family/model numbers (virtual machines often report
    a bare "Intel(R) Xeon(R) Processor"): what every speed figure is reported next to."""
    fields = _cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_flags() -> tuple[str, ...]:
    """The CPU's instruction-set flags, sorted (/proc/cpuinfo's `flags`, `Features` on ARM;
    the machine's name elsewhere). All of them, not a chosen few: a virtual machine masks
    some (AVX-512, AMX) under the same model name, and inductor compiles with
    -march=native, for every extension the compiler sees."""
    fields = _cpuinfo()
    flags = fields.get("flags") or fields.get("Features") or platform.machine()
    return tuple(sorted(flags.split()))


def machine() -> dict[str, str | int]:
    """What a timing or a compiled library depends on beyond its own inputs: the CPU (name
    and a digest of its flags), ATen's kernel dispatch level (ATEN_CPU_CAPABILITY can
    lower it), the thread count (inductor also bakes it into its code) and torch."""
    flags = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:16]
    return {
        "cpu": cpu_model(),
        "flags": flags,
        "dispatch": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def machine_key(procedure: str, *parts: object) -> str:
    """The cache key of what `procedure` measured or built from `parts` on this machine:
    `procedure` names the cache and its version ("kernels-2"), bumped when the procedure
    changes; `machine()` is the rest. 20 hex digits."""
    text = repr((procedure, sorted(machine().items()), parts))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


BUSY_SHARE = 0.25  # other processes' CPU, as a share of all cores, above which a timing is
# used for this process's decision but not cached (a choice made under load is not kept)


class OthersCPU:
    """How much CPU other processes used while a timing ran: a timing taken while another
    job competed for the cores can be several times off (int4 products were timed 19x
    slower than alone on a 2-core AMD EPYC with a test suite running beside them), and a
    cached one would decide every later load. Reads the machine's busy time from
    /proc/stat and subtracts this process's own CPU time; where /proc/stat is missing the
    share is unknown (None) and the timing is cached as before."""

    def __enter__(self) -> OthersCPU:
        self.share: float | None = None
        self._start = (_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, wall = self._start
        now = _busy_seconds()
        if busy is None or now is None:
            return
        elapsed = max(time.perf_counter() - wall, 1e-9)
        others = (now - busy) - (time.process_time() - own)
        self.share = max(0.0, others) / (elapsed * (os.cpu_count() or 1))

    @property
    def busy(self) -> bool:
        return self.share is not None and self.share > BUSY_SHARE


def keep_timing(path: Path, record: object, others: OthersCPU, use_cache: bool = True) -> bool:
    """Cache `record` (JSON) at `path`, unless other processes used more than BUSY_SHARE of
    the CPU while it was timed (`others`): then it decides this load only and is measured
    again next time. True when kept."""
    if not use_cache or others.busy:
        return False
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    return True


def _busy_seconds() -> float | None:
    """Seconds all cores spent busy since boot (/proc/stat's first line), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class KernelChoice:
    """Per weight shape ("out x in"): the row counts served by the skinny kernel, and the
    timings (microseconds per product, median over rounds) that chose them."""

    mode: str  # "auto" (measured), "plain" or "skinny" (forced by the caller)
    cpu: str
    torch: str
    threads: int
    dtype: str
    skinny_rows: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    cached: bool = False  # read from EARLYEXIT_HOME rather than measured now

    def rows_for(self, weight: torch.Tensor) -> frozenset[int]:
        return frozenset(self.skinny_rows.get(shape_key(weight), ()))

    @property
    def uses_skinny(self) -> bool:
        return any(self.skinny_rows.values())

    def summary(self) -> str:
        """One line per shape: rows that go skinny, and the time ratio behind it."""
        lines = []
        for shape, by_rows in self.timings.items():
            ratios = ", ".join(
                f"{rows}:{t['skinny'] / t['plain']:.2f}" for rows, t in sorted(by_rows.items())
            )
            chosen = self.skinny_rows.get(shape) or "none"
            lines.append(f"{shape}: skinny rows {chosen} (skinny/plain time by rows {ratios})")
        if not lines:
            lines.append(f"{self.mode}: skinny rows {self.skinny_rows or 'none'} (not measured)")
        return "\n".join(lines)


def shape_key(weight: torch.Tensor) -> str:
    return "x".join(str(d) for d in weight.shape)


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The model's linear weights big enough for the skinny path, in module order."""
    return [
        module.weight.detach()
        for module in model.modules()
        if isinstance(module, nn.Linear) and module.weight.numel() >= MIN_WEIGHT
    ]


def _sweep(kernel: str, weights: list[torch.Tensor], rows: int) -> list[float]:
    """Seconds of one product of `rows` rows with each weight, all weights in model order
    (as a decode step streams them: the model is larger than a cache, one shape's weights
    alone may not be)."""
    fn = functional.linear if kernel == "plain" else skinny_linear
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    seconds = []
    with torch.inference_mode():
        for weight in weights:
            x = inputs[weight.shape[1]]
            start = time.perf_counter()
            fn(x, weight)
            seconds.append(time.perf_counter() - start)
    return seconds


Sweep = Callable[[str, list[torch.Tensor], int], list[float]]


def measure(
    weights: list[torch.Tensor], repeats: int = 3, sweep: Sweep = _sweep
) -> dict[str, dict[str, dict[str, float]]]:
    """Microseconds per product for every shape, row count and kernel: the median over
    `repeats` sweeps of the shape's mean; the kernels alternate sweep by sweep so that
    machine drift hits both alike."""
    keys = [shape_key(w) for w in weights]
    timings: dict[str, dict[str, dict[str, float]]] = {key: {} for key in keys}
    for rows in range(1, MAX_ROWS + 1):
        for kernel in ("plain", "skinny"):  # warm-up
            sweep(kernel, weights, rows)
        per_shape: dict[tuple[str, str], list[float]] = {}
        for _ in range(repeats):
            for kernel in ("plain", "skinny"):
                totals: dict[str, list[float]] = {}
                for key, seconds in zip(keys, sweep(kernel, weights, rows), strict=True):
                    totals.setdefault(key, []).append(seconds)
                for key, values in totals.items():
                    per_shape.setdefault((key, kernel), []).append(sum(values) / len(values))
        for (key, kernel), means in per_shape.items():
            timings[key].setdefault(str(rows), {})[kernel] = statistics.median(means) * 1e6
    return timings


def decide(timings: dict[str, dict[str, dict[str, float]]]) -> dict[str, list[int]]:
    """Row counts per shape where the skinny kernel is clearly faster."""
    return {
        shape: sorted(
            int(rows) for rows, t in by_rows.items() if t["skinny"] <= MARGIN * t["plain"]
        )
        for shape, by_rows in timings.items()
    }


def _cache_key(dtype: str, weights: list[torch.Tensor]) -> str:
    """Timings depend on the machine and on what a sweep streams: every weight's shape."""
    return machine_key(f"kernels-{PROCEDURE}", dtype, [shape_key(w) for w in weights])


def choose_kernels(
    model: nn.Module, mode: str = "auto", use_cache: bool = True, sweep: Sweep = _sweep
) -> KernelChoice:
    """The kernel per (shape, rows) for `model` on this machine.

    `auto` times both kernels (or reads the timings cached for this machine and shapes:
    `machine_key`); `plain` uses F.linear everywhere; `skinny` forces the matrix-matrix
    kernel for every few-row product (for measurements). Only fp32 CPU weights can go
    skinny; any other model gets `plain`. `sweep` times one kernel (tests pass a fake).
    """
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, not {mode!r}")
    weights = linear_weights(model)
    shapes = sorted({shape_key(w) for w in weights})
    weight = weights[0] if weights else torch.empty(0)
    dtype = str(weight.dtype).removeprefix("torch.")
    choice = KernelChoice(mode, cpu_model(), torch.__version__, torch.get_num_threads(), dtype)
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or mode == "plain":
        return choice
    if mode == "skinny":
        choice.skinny_rows = {shape: list(range(1, MAX_ROWS + 1)) for shape in shapes}
        return choice
    path = home() / "kernels" / f"kernels-{_cache_key(dtype, weights)}.json"
    if use_cache and path.exists():
        saved = json.loads(path.read_text())
        choice.timings, choice.cached = saved["timings"], True
        choice.skinny_rows = decide(choice.timings)  # today's margin on the saved timings
        return choice
    with OthersCPU() as others:
        choice.timings = measure(weights, sweep=sweep)
    choice.skinny_rows = decide(choice.timings)
    keep_timing(path, asdict(choice), others, use_cache)
    return choice
