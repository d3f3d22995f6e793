"""Decode steps compiled ahead of time: one compiled graph per layer step.

At batch 1 the eager engine spends about half of a token's time outside the weight
products: some forty small ops per layer, each a Python call and a kernel launch of a few
microseconds. gpt-fast's answer is to compile the decode step; here a layer's step is
exported (torch.export) and compiled by AOTInductor into a library of C++ code with no
Python between its kernels: the norms, rotary embedding, residuals and activation fuse
into a few loops, the int4 products and attention run as before. Every layer of one shape
shares one library, built once per machine (about 15 s on 2 cores), cached under
EARLYEXIT_HOME/compiled/ keyed by this file, the machine (kernels.machine_key: CPU and its
ISA flags, thread count, torch), transformers, the C++ compiler setting, the model and the
shapes, and loaded once per layer (milliseconds) with that layer's own tensors in place of
the copies it was built with. Where it cannot be built (no C++ compiler, an export or
inductor error) `auto` runs eager and says why, `on` stops with one line
(`CompiledStepsFailed`).

Why per layer and ahead of time: the previous design compiled each span a decoder asks
for ((0, L), and (0, k) / (k, L) around a shallow exit) into one torch.compile graph: 78 s
per span in a fresh inductor cache (`scripts/experiments/compiled_vs_eager.py compile` at
22c61b9), traced again in every process, guards checked on every call, and a fused span
need not round as the same layers split in two. A per-layer step is built once for every
span, and any split of the layers gives exactly what (0, L) gives, so `lossless` with
shallow drafts (verified from layer k) stays exactly `full`; against one AOTInductor
graph for the whole depth it cost a few percent per token (a one-off trial).

One graph serves 1..MAX_ROWS new tokens (one-token steps, verify passes, catch-ups): the
row count is a dynamic size from 1, and attention computes each row as a one-query
problem, so a verify pass equals one-token steps bit for bit.

What it changes against the eager engine (`LayerEngine.set_compiled`: `auto` uses it where
a timed step is faster on the machine at hand):
- the arithmetic: fused loops round differently from the eager ops, and attention runs as
  plain reductions over the buffer's whole capacity with a mask, where the eager path runs
  SDPA over the filled slots. tests/test_compiled.py bounds the difference against the
  eager engine; it is not bit-identical to the model's own layers, and a logit tie can
  break the other way. It is the same whatever the buffer's capacity and the split of
  the layers, so every decoder's output stays exact against compiled `full`.
- the first use on a machine waits for the build.
Only batch 1 without padding and at most MAX_ROWS new tokens after the prompt are
compiled; prefill (layer by layer into an empty cache) and padded batches run the eager
engine. Layers are supported when they have a lean step
(engine/layer_step.py) with stacked int4/int8 products (engine/quant.py): smollm2-135m at
`--dtype int4`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from torch import nn
from torch.nn import functional
from transformers.activations import SiLUActivation
from transformers.models.llama import modeling_llama

from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.kernels import machine_key
from earlyexit.engine.layer_step import LlamaLayerStep
from earlyexit.engine.quant import ACT, GROUP, QuantLinear
from earlyexit.engine.row_cache import RowKVCache
from earlyexit.errors import EarlyExitError
from earlyexit.paths import home

log = logging.getLogger(__name__)
_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
SILU = (nn.SiLU, SiLUActivation)  # both are F.silu
TORCH_TESTED = "2.13."  # the torch whose internals this file relies on
MAX_ROWS = 8  # verify passes: 1 + drafts (decoding/draft_length.py drafts at most 7)
_SOURCE = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # in every library key
# also in every library key, and so in the key of `auto`'s timing of it (engine.py): bump
# when that timing or the build changes outside this file
PROCEDURE = 1


class CompiledStepsFailed(EarlyExitError):
    """Compiled steps could not be built or loaded on this machine (no C++ compiler, an
    export or inductor error, a library that does not load): `on` stops with this one
    line, `auto` runs eager and says why (`reason`)."""

    def __init__(self, what: str, error: BaseException) -> None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = lines[0] if lines else type(error).__name__
        if first.endswith(":") and len(lines) > 1:  # "CppCompileError:" heads its message
            first = f"{first} {lines[1]}"
        self.cause = f"compiled steps failed to {what}: {first}"
        super().__init__(f"{self.cause}; use --compiled off")

    @property
    def reason(self) -> str:
        """`auto`'s choice: eager, and why."""
        return f"{self.cause}; running eager"


@dataclass(frozen=True)
class _Product:
    """A QuantLinear's product as tensors only (what a compiled graph takes)."""

    out_features: int
    planes: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (packed, scales) per 4-bit plane

    @staticmethod
    def of(module: nn.Module) -> _Product | None:
        if not isinstance(module, QuantLinear):
            return None
        return _Product(module.out_features, tuple(zip(module.packed, module.scales, strict=True)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """QuantLinear.forward's few-row arithmetic: bf16 in, planes summed, cast back.
        Its own forward cannot be traced here: it branches on the row count, which the
        graph leaves unbacked, and stacked members cache the group's last output."""
        flat = x.reshape(-1, x.shape[-1]).to(ACT)
        out = _MM(flat, self.planes[0][0], GROUP, self.planes[0][1])
        for packed, scales in self.planes[1:]:
            out = out + _MM(flat, packed, GROUP, scales)
        return out[:, : self.out_features].to(x.dtype).view(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class _LayerWeights:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    qkv: _Product
    o: _Product
    gate_up: _Product
    down: _Product
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float

    @staticmethod
    def of(step: object) -> _LayerWeights | None:
        if not isinstance(step, LlamaLayerStep) or step.qkv is None or step.gate_up is None:
            return None
        norms = (step.input_norm, step.post_norm)
        if any(n.weight.dtype != torch.float32 for n in norms):
            return None
        (qkv, (q_cols, k_cols, _)), (gate_up, (gate_cols, up_cols)) = step.qkv, step.gate_up
        if gate_cols.stop != up_cols.start or up_cols.stop - up_cols.start != gate_cols.stop:
            return None  # gate and up are the two halves of the stacked product
        products = [_Product.of(m) for m in (qkv, step.attn.o_proj, gate_up, step.mlp.down_proj)]
        if any(p is None for p in products) or type(step.mlp.act_fn) not in SILU:
            return None
        head_dim = step.head_dim
        return _LayerWeights(
            step.input_norm.weight,
            step.post_norm.weight,
            float(step.input_norm.variance_epsilon),
            *products,  # type: ignore[arg-type]
            heads=(q_cols.stop - q_cols.start) // head_dim,
            kv_heads=(k_cols.stop - k_cols.start) // head_dim,
            head_dim=head_dim,
            scaling=float(step.attn.scaling),
        )

    PRODUCTS = ("qkv", "o", "gate_up", "down")

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every weight tensor by a stable name (the compiled span's buffers)."""
        out = {"input_norm": self.input_norm, "post_norm": self.post_norm}
        for name in self.PRODUCTS:
            for j, (packed, scales) in enumerate(getattr(self, name).planes):
                out[f"{name}_packed{j}"], out[f"{name}_scales{j}"] = packed, scales
        return out

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> _LayerWeights:
        """The same layer over other tensors of the same names (`tensors`)."""
        products = {
            name: _Product(
                getattr(self, name).out_features,
                tuple(
                    (tensors[f"{name}_packed{j}"], tensors[f"{name}_scales{j}"])
                    for j in range(len(getattr(self, name).planes))
                ),
            )
            for name in self.PRODUCTS
        }
        return replace(
            self, input_norm=tensors["input_norm"], post_norm=tensors["post_norm"], **products
        )


def _layer(
    w: _LayerWeights,
    hidden: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """LlamaLayerStep's arithmetic for n new tokens [1, n, H], writing their K/V into
    `slots` of the layer's whole buffers. Attention is written out as reductions (not
    SDPA) over the buffer's whole capacity, row i under mask[i] [n, capacity]: each row is
    computed as a one-token step computes it, so a verify pass equals one-token steps bit
    for bit (as engine/rowwise.py makes the eager engine's); and the masked slots add
    exact zeros to sums that inductor accumulates in the same order whatever the capacity,
    so a buffer's size does not change the result. (SDPA's CPU kernel did, in a one-off
    trial: 60 against 68 slots moved a logit by 0.25 and broke a tie, so `lossless`, whose
    buffers hold room for drafts, gave other tokens than `full`.)"""
    rows = hidden.shape[1]
    normed = functional.rms_norm(hidden, w.input_norm.shape, w.input_norm, w.eps)
    out = w.qkv(normed)
    qk_width = (w.heads + w.kv_heads) * w.head_dim
    heads = out[..., :qk_width].view(1, rows, -1, w.head_dim).transpose(1, 2)
    heads = heads * cos + modeling_llama.rotate_half(heads) * sin
    value = out[..., qk_width:].view(1, rows, -1, w.head_dim).transpose(1, 2)
    keys.index_copy_(2, slots, heads[:, w.heads :])
    values.index_copy_(2, slots, value)
    group = w.heads // w.kv_heads
    query = heads[0, : w.heads].unflatten(0, (w.kv_heads, group)).unsqueeze(3)  # [kv,g,n,1,D]
    scores = (query * keys[0][:, None, None]).sum(-1) * w.scaling  # [kv, g, n, capacity]
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    mixed = (weights.unsqueeze(-1) * values[0][:, None, None]).sum(-2)  # [kv, g, n, D]
    attention = (mixed / weights.sum(-1, keepdim=True)).flatten(0, 1)  # [heads, n, D]
    hidden = hidden + w.o(attention.transpose(0, 1).flatten(1).unsqueeze(0))
    normed = functional.rms_norm(hidden, w.post_norm.shape, w.post_norm, w.eps)
    out = w.gate_up(normed)
    gate, up = out.chunk(2, dim=-1)
    return hidden + w.down(functional.silu(gate) * up)


def compilable(steps: list[object]) -> bool:
    """Whether every layer can run compiled (else `set_compiled` would compile nothing),
    on the torch these steps were built and tested with."""
    return torch_supported() and all(_LayerWeights.of(step) is not None for step in steps)


def torch_supported() -> bool:
    """The runner (torch._C._aoti) and export's dynamic row count from 1 are torch
    internals: other versions run the eager engine."""
    return torch.__version__.startswith(TORCH_TESTED)


class _CompiledLayer(nn.Module):
    """One layer's step as a module whose weights are named buffers: what torch.export
    traces and AOTInductor compiles. Every layer of one shape shares one library: it is
    loaded once per layer, with that layer's tensors as its constants."""

    def __init__(self, weights: _LayerWeights, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary  # the model's own rotary embedding (its inv_freq a buffer)
        self.weights = weights
        for name, tensor in weights.tensors().items():
            self.register_buffer(name, tensor)

    def constants(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def forward(
        self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: torch.Tensor
    ) -> torch.Tensor:
        rows, capacity = hidden.shape[1], keys.shape[2]
        slots = offset + torch.arange(rows, device=hidden.device)
        cos, sin = self.rotary(hidden, slots.unsqueeze(0))
        mask = torch.arange(capacity, device=hidden.device) <= slots.unsqueeze(1)  # [n, cap]
        # the buffers, not the dataclass's own references: export lifts what the module
        # holds as named constants, and those are what a loaded library replaces
        w = self.weights.with_tensors({n: getattr(self, n) for n in self.weights.tensors()})
        return _layer(w, hidden, keys, values, slots, cos.unsqueeze(1), sin.unsqueeze(1), mask)


def _compiler() -> tuple[object, ...]:
    """The C++ compiler inductor builds with and its -march setting (native by default)."""
    from torch._inductor import config

    cxx = config.cpp.cxx
    return (*(cxx if isinstance(cxx, (list, tuple)) else (cxx,)), config.cpp.march)


def _library_key(layer: _CompiledLayer, model_id: str) -> str:
    """What a library's code depends on: this file, the machine (inductor emits code for
    the CPU's flags, -march=native, and bakes the thread count in), torch, transformers,
    the compiler, the model and the layer's shapes."""
    shapes = sorted((n, tuple(t.shape), str(t.dtype)) for n, t in layer.constants().items())
    w = layer.weights
    return machine_key(
        f"compiled-{PROCEDURE}",
        _SOURCE,
        transformers.__version__,  # the rotary embedding and rotate_half are its
        _compiler(),
        MAX_ROWS,
        model_id,
        (w.eps, w.heads, w.kv_heads, w.head_dim, w.scaling),
        shapes,
    )


def _build_library(layer: _CompiledLayer, example: tuple, path: Path) -> None:
    """torch.export the layer's step (rows 1..MAX_ROWS and capacity dynamic), compile it
    with AOTInductor, and keep the package's shared library: moved into place only when
    complete. (Loading the .pt2 package unpacks the archive anew on every load, once per
    layer, which in a one-off trial took longer than all the rest of set_compiled; the
    library itself loads at once: `scripts/experiments/compiled_vs_eager.py compile`.)"""
    rows = torch.export.Dim("rows", min=1, max=MAX_ROWS)
    capacity = torch.export.Dim("capacity", min=2)
    dynamic = {"hidden": {1: rows}, "keys": {2: capacity}, "values": {2: capacity}, "offset": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building.", dir=path.parent))
    try:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # no C++ compiler: known at once, not after export and lowering
            with warnings.catch_warnings():
                # torch 2.13's own pytree deprecation, raised inside export: not the user's
                warnings.simplefilter("ignore", FutureWarning)
                program = torch.export.export(layer, example, dynamic_shapes=dynamic, strict=False)
                package = torch._inductor.aoti_compile_and_package(
                    program, package_path=str(scratch / "layer.pt2")
                )
        except Exception as error:  # export's and inductor's errors have no common base
            raise CompiledStepsFailed("build", error) from error
        with zipfile.ZipFile(package) as archive:
            (library,) = [n for n in archive.namelist() if n.endswith(".so")]
            with archive.open(library) as source, open(scratch / path.name, "wb") as target:
                shutil.copyfileobj(source, target)
        os.replace(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class CompiledChoice:
    """Whether compiled steps run on this machine: a full-depth one-token step timed both
    ways (milliseconds, median over interleaved rounds), or the reason none was timed."""

    mode: str  # "auto" (measured), "on" or "off" (the caller's)
    compiled: bool
    eager_ms: float | None = None
    compiled_ms: float | None = None
    cpu: str = ""
    threads: int = 0
    cached: bool = False  # read from EARLYEXIT_HOME rather than measured now
    reason: str = ""
    library: str = ""  # the timed layer step's library key (EARLYEXIT_HOME/compiled/)

    def summary(self) -> str:
        if self.eager_ms is None or self.compiled_ms is None:
            return f"{'compiled' if self.compiled else 'eager'} steps ({self.reason or self.mode})"
        timed = f"{self.compiled_ms:.2f} ms compiled against {self.eager_ms:.2f} ms eager"
        where = "cached timing" if self.cached else "timed now"
        return f"{'compiled' if self.compiled else 'eager'} steps ({timed}, {where})"


class CompiledSpans:
    """Compiled decode steps over any span of an engine's layers: one compiled step per
    layer, from one library per layer shape (built once per machine, cached under
    EARLYEXIT_HOME/compiled/), loaded for every layer by `load` (or on a layer's first
    use). A span runs its layers' steps in turn, so any split of the layers ((0, k) then
    (k, L) around a shallow exit, or a verify pass from layer k) gives exactly what (0, L)
    gives."""

    def __init__(self, steps: list[object], rotary: nn.Module, model_id: str) -> None:
        """`steps`: every layer's lean step, all compilable (`compilable`); `rotary`: the
        model's rotary embedding; `model_id`: the weights' identity (fingerprint, dtype)."""
        weights = [_LayerWeights.of(step) for step in steps]
        if any(w is None for w in weights):
            raise ValueError("every layer must be compilable (see `compilable`)")
        self.layers = [_CompiledLayer(w, rotary) for w in weights]  # type: ignore[arg-type]
        self._model_id = model_id
        self._runners: dict[int, Callable] = {}
        self.built: list[str] = []  # library keys this process built (not just loaded)
        # why a library could not be built or loaded: no step retries it (each try can
        # take as long as a build), and no span runs compiled any more
        self.failed: CompiledStepsFailed | None = None

    @property
    def loaded(self) -> set[int]:
        """The layers whose compiled step this process has loaded."""
        return set(self._runners)

    def key(self, layer: int) -> str:
        """The library key of a layer's step (machine, torch, this code, model, shapes)."""
        return _library_key(self.layers[layer], self._model_id)

    def accepts(self, hidden: torch.Tensor, cache: LayerKVCache, start: int, end: int) -> bool:
        return (
            self.failed is None
            and hidden.shape[0] == 1
            and 1 <= hidden.shape[1] <= MAX_ROWS
            and cache.lengths[start] > 0  # not a prefill (it runs one layer at a time)
            and not cache.has_padding
        )

    def accepts_row(self, hidden: torch.Tensor, filled: int) -> bool:
        """A running batch of one row (engine/row_cache.py) past its prefill."""
        return (
            self.failed is None
            and hidden.shape[0] == 1
            and 1 <= hidden.shape[1] <= MAX_ROWS
            and filled > 0
        )

    def load(self) -> None:
        """Load every layer's compiled step now (building the library first where this
        machine has none), so that no decode step waits for it. Raises
        CompiledStepsFailed where that cannot be done."""
        for layer in range(len(self.layers)):
            if layer not in self._runners:
                self._load(layer)

    def _load(self, layer: int) -> Callable:
        """The layer's compiled step, from its library (built first when missing); the
        first failure is kept and raised again."""
        if self.failed is not None:
            raise self.failed
        try:
            return self._load_library(layer)
        except CompiledStepsFailed as failed:
            self.failed = failed
            raise

    def _load_library(self, layer: int) -> Callable:
        module = self.layers[layer]
        key = self.key(layer)
        path = home() / "compiled" / f"{key}.so"
        if not path.exists():
            # a warning: with no logging set up, Python prints it on stderr, so a user
            # sees why this takes a while
            log.warning("building the compiled layer step for this machine (once) ...")
            w = module.weights
            # two rows: an example of one would specialize the row count to 1
            hidden = w.input_norm.new_zeros(1, 2, w.input_norm.shape[0])
            kv = w.input_norm.new_zeros(1, w.kv_heads, 16, w.head_dim)  # fp32, as the cache
            _build_library(module, (hidden, kv, kv.clone(), torch.tensor(0)), path)
            self.built.append(key)
        # AOTInductor's runner on the library (torch._C._aoti: what its package loader
        # wraps; torch is pinned). The layer's own tensors replace the copies the library
        # was built with, used in place (user-managed: no second copy); what inductor
        # added itself (the int4 group size as a tensor) stays the library's.
        try:
            runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(path), 1)
        except RuntimeError as error:  # a library this process cannot load
            raise CompiledStepsFailed("load", error) from error
        ours = module.constants()
        names = runner.get_constant_names_to_original_fqns()
        mine = {name: ours[fqn] for name, fqn in names.items() if fqn in ours}
        runner.update_constant_buffer(mine, False, False, True)
        self._runners[layer] = runner.run
        return self._runners[layer]

    def run(self, hidden: torch.Tensor, cache: LayerKVCache, start: int, end: int) -> torch.Tensor:
        """Layers [start, end) over 1..MAX_ROWS new tokens (the caller checked `accepts`
        and that the span's layers hold the same number of slots)."""
        offset, rows = cache.lengths[start], hidden.shape[1]
        offset_t = torch.tensor(offset, device=hidden.device)
        for layer in range(start, end):
            keys, values = cache.ensure(layer, offset + rows)
            run = self._runners.get(layer) or self._load(layer)
            (hidden,) = run([hidden, keys, values, offset_t])
            cache.lengths[layer] = offset + rows
        return hidden

    def run_row(
        self, hidden: torch.Tensor, cache: RowKVCache, start: int, end: int
    ) -> torch.Tensor:
        """The same steps for the one row of a running batch of one (engine/row_cache.py):
        its buffers' first row is laid out as a batch-1 cache's buffer."""
        offset, rows = int(cache.fill[start, 0]), hidden.shape[1]
        offset_t = torch.tensor(offset, device=hidden.device)
        for layer in range(start, end):
            keys, values = cache.ensure(layer, offset + rows)
            if keys.shape[0] > 1:  # buffers that held more rows: the first one's view
                keys, values = keys[:1], values[:1]
            run = self._runners.get(layer) or self._load(layer)
            (hidden,) = run([hidden, keys, values, offset_t])
        cache.fill[start:end, 0] = offset + rows  # one write for the span, not one per layer
        return hidden
