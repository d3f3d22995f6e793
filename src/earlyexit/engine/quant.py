"""Weight-only int4 / int8 linear layers on torch's own CPU int4 kernel: fewer bytes per token.

Batch-1 decoding reads every weight once per token, so tokens/s follows bytes per token.
The built-in models ship as GGUF: smollm2-135m's layers are Q4_1 (blocks of 32 along the
input, w = d*q + m, q in 0..15) and its head Q8_0 (w = d*q, q in -127..127). Both are
exactly groups of 32 with a scale and an offset, which is what
`torch.ops.aten._weight_int4pack_mm_for_cpu` multiplies: per group of 32 it computes
w = (q - 8) * scale + zero. So
- `bits=4` (asymmetric, min/max per group, as Q4_1) takes one 4-bit plane; re-derived from
  the dequantized weights it recovers the GGUF's q exactly (every Q4_1 block holds its
  min at q=0 and its max at q=15);
- `bits=8` (symmetric, amax/127 per group, as Q8_0) takes two 4-bit planes, high and low
  nibble, multiplied by the same kernel and summed: q + 128 = 16*hi + lo, so
  w = (hi-8)*16d + (lo-8)*d + 8d. Written here because torch's int8 kernel
  (`_weight_int8pack_mm`) has one scale per output row, which cannot hold Q8_0's per-group
  scales, and was no faster than two int4 passes on the Xeon we measured.

The only rounding beyond the source model's: scale and zero are bfloat16 (the kernel's fast
dtype; its fp32 and fp16 modes ran 30-45x slower), and each product's input and output are
rounded to bfloat16. Everything else (norms, attention, residual stream, KV) stays fp32.
The kernel is built for few rows: products over more than SMALL_ROWS rows (prefill) run on
a dense dequantized copy when that was timed faster (`choose_many_rows`; bf16 here). A pass
over a running batch of B sequences (`row_batch`, engine.run_rows) multiplies B rows: from
the batch size at which a dense copy was timed faster on this machine (`choose_batch_dense`)
its products take that copy too. One sequence's products of up to SMALL_ROWS rows (verify
passes) always take the kernel, whose rows do not depend on each other: a verify pass is
bit-identical to one-token steps.
tests/test_quant.py checks the weights against the dequantized model and the logits
against the fp32 model's.
"""

from __future__ import annotations

import copy
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from earlyexit.engine.skinny import SkinnyLinear, skinny_linear

GROUP = 32  # Q4_1 and Q8_0 block size; the kernel's group size
TILE = 16  # the CPU packing needs a multiple of 16 output rows
INNER_K_TILES = 2
MODES = ("int4", "int8")
ACT = torch.bfloat16  # the kernel's fast activation and scale dtype (see the docstring)
# projections that read the same input: one product over their stacked rows
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):  # pip install --no-deps
    raise ImportError(f"earlyexit needs torch>=2.6 (its CPU int4 kernel), not {torch.__version__}")
_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
# products over more rows than a verify pass (prefill) may use a dense dequantized weight;
# up to this many rows the int4 kernel always serves, so verify passes stay row-invariant
SMALL_ROWS = 8
DENSE = {"bf16": torch.bfloat16, "fp32": torch.float32}
BATCH_ROWS = (2, 4, 8)  # running-batch sizes at which dense products are timed
_PASS = threading.local()  # `rows`: independent sequences in the pass running in this thread


@contextmanager
def row_batch(rows: int) -> Iterator[None]:
    """Products within the block belong to one pass over `rows` independent sequences (a
    running batch; engine.run_rows), which may take a dense copy (`choose_batch_dense`)."""
    before = getattr(_PASS, "rows", 1)
    _PASS.rows = rows
    try:
        yield
    finally:
        _PASS.rows = before


def _pack(q: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values [N, K] (int32) in the CPU kernel's packed layout."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), INNER_K_TILES)


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[N, K/32] scale and zero -> the kernel's [K/32, N, 2] tensor."""
    return torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(ACT)


def quantizable(module: nn.Module) -> bool:
    """A bias-free CPU linear layer of whole groups of 32: plain, or one an engine switched
    to the skinny kernel (engine/skinny.py: the same weights, another product)."""
    return (
        type(module) in (nn.Linear, SkinnyLinear)
        and module.bias is None
        and module.in_features % GROUP == 0
        and module.weight.device.type == "cpu"
    )


class QuantLinear(nn.Module):
    """A bias-free linear layer whose weight lives as 4-bit planes with bf16 group scales."""

    def __init__(self, weight: torch.Tensor, bits: int) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        out_features, in_features = weight.shape
        if in_features % GROUP:
            raise ValueError(f"in_features {in_features} is not a multiple of {GROUP}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.padded = -(-out_features // TILE) * TILE
        w = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)
        if bits == 4:  # Q4_1: offset = group min, step = (max - min) / 15
            low, high = w.amin(-1), w.amax(-1)
            step = (high - low) / 15
            safe = torch.where(step > 0, step, torch.ones_like(step))
            q = torch.round((w - low.unsqueeze(-1)) / safe.unsqueeze(-1)).clamp_(0, 15)
            planes = [q]
            parts = [(step, low + 8 * step)]
        else:  # Q8_0: step = amax / 127, q in -127..127, stored as two nibbles of q + 128
            step = w.abs().amax(-1) / 127
            safe = torch.where(step > 0, step, torch.ones_like(step))
            q = torch.round(w / safe.unsqueeze(-1)).clamp_(-127, 127) + 128
            planes = [torch.div(q, 16, rounding_mode="floor"), torch.remainder(q, 16)]
            parts = [(16 * step, 8 * step), (step, torch.zeros_like(step))]
        self._q = [p.reshape(out_features, in_features).to(torch.uint8) for p in planes]
        self._parts = [(scale.to(ACT), zero.to(ACT)) for scale, zero in parts]
        self._pack_all()
        self._weight: torch.Tensor | None = None
        self.many_rows = "int4"  # the product for > SMALL_ROWS rows (choose_many_rows)
        # (from batch size, dense dtype) for passes over a running batch (choose_batch_dense)
        self.batch_dense: tuple[int, str] | None = None
        self._dense_weights: dict[str, torch.Tensor] = {}
        # the source weights' first rows, exactly: model fingerprints stay those of the
        # fp32 model, so readouts and draft blocks trained on it serve this one
        self.source_rows = weight.detach()[:8].float().clone()

    def _pack_all(self) -> None:
        pad = self.padded - self.out_features
        self.packed, self.scales = [], []
        for q, (scale, zero) in zip(self._q, self._parts, strict=True):
            qp = nn.functional.pad(q.int(), (0, 0, 0, pad))
            self.packed.append(_pack(qp))
            scale_p = nn.functional.pad(scale.float(), (0, 0, 0, pad), value=1.0)
            zero_p = nn.functional.pad(zero.float(), (0, 0, 0, pad))
            self.scales.append(_scales_zeros(scale_p, zero_p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step is ~200 of these products of a few microseconds each: few ops here
        flat = x.reshape(-1, self.in_features)
        dense = self._dense_dtype(flat.shape[0])
        if dense is not None:
            return self._dense(flat, dense).to(x.dtype).view(*x.shape[:-1], self.out_features)
        flat = flat.to(ACT)
        out = _MM(flat, self.packed[0], GROUP, self.scales[0])
        if self.bits == 8:
            out.add_(_MM(flat, self.packed[1], GROUP, self.scales[1]))
        if self.padded != self.out_features:
            out = out[:, : self.out_features]
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _dense_dtype(self, rows: int) -> str | None:
        """The dense copy a product over `rows` rows takes, or None (the int4 kernel)."""
        if rows > SMALL_ROWS:
            return None if self.many_rows == "int4" else self.many_rows
        batch = self.batch_dense
        if batch is not None and getattr(_PASS, "rows", 1) >= batch[0]:
            return batch[1]
        return None

    def _dense(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        """A product on the dequantized weight in dtype `name`: the int4 kernel is built for
        few rows (2400 rows: 33 ms against 2 ms for bf16 on the Xeon we measured). The
        weight is made on first use and kept."""
        weight = self._dense_weights.get(name)
        if weight is None:
            weight = self._dense_weights[name] = self.dequantized().to(DENSE[name])
        return nn.functional.linear(flat.to(weight.dtype), weight)

    def planes(self) -> list[torch.Tensor]:
        """Per 4-bit plane, the fp32 weight the kernel multiplies by: (q - 8) * scale + zero
        with the bf16 scales and zeros. The layer's weight is their sum."""
        out = []
        for q, (scale, zero) in zip(self._q, self._parts, strict=True):
            groups = q.float().reshape(self.out_features, -1, GROUP) - 8
            plane = groups * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
            out.append(plane.reshape(self.out_features, self.in_features))
        return out

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in fp32."""
        return torch.stack(self.planes()).sum(0)

    @property
    def weight(self) -> torch.Tensor:
        """fp32 copy for code that needs a plain weight (training, row selection)."""
        if self._weight is None:
            self._weight = self.dequantized()
        return self._weight

    def rows(self, token_ids: torch.Tensor) -> QuantLinear:
        """The same layer over a subset of output rows (a restricted-vocabulary head)."""
        part = copy.copy(self)
        ids = token_ids.cpu()
        part._q = [q.index_select(0, ids) for q in self._q]
        part._parts = [(s.index_select(0, ids), z.index_select(0, ids)) for s, z in self._parts]
        part.out_features = len(ids)
        part.padded = -(-part.out_features // TILE) * TILE
        part._weight, part._dense_weights = None, {}
        part._pack_all()
        return part

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}, group={GROUP}"


class _Stacked(nn.Module):
    """Sibling projections (q/k/v, gate/up) as one product: the first sibling called with an
    input computes all of them; the others, called with that same tensor (as the model's
    attention and MLP do), take their rows from it. An input the group has not seen is
    multiplied anew, so any call order or a lone call stays correct."""

    def __init__(self, members: list[QuantLinear]) -> None:
        super().__init__()
        weight = torch.cat([m.dequantized() for m in members])
        self.linear = QuantLinear.__new__(QuantLinear)
        nn.Module.__init__(self.linear)
        self.linear.__dict__.update(_stacked_state(members, weight))
        self.linear._pack_all()
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def output(self, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if last is None or last[0] is not x:
            last = self._last = (x, self.linear(x))
        return last[1]


def _stacked_state(members: list[QuantLinear], weight: torch.Tensor) -> dict:
    """The stacked layer's fields: the members' 4-bit values, scales and zeros (exactly
    theirs, not re-derived from the stacked weight)."""
    first = members[0]
    out_features = int(weight.shape[0])
    return {
        "in_features": first.in_features,
        "out_features": out_features,
        "bits": first.bits,
        "padded": -(-out_features // TILE) * TILE,
        "_q": [torch.cat([m._q[i] for m in members]) for i in range(len(first._q))],
        "_parts": [
            tuple(torch.cat([m._parts[i][j] for m in members]) for j in range(2))
            for i in range(len(first._parts))
        ],
        "_weight": None,
        "source_rows": weight[:8].clone(),
        "many_rows": "int4",
        "batch_dense": None,
        "_dense_weights": {},
    }


class StackedMember(nn.Module):
    """One sibling of a `_Stacked` group: its rows of the group's product."""

    def __init__(self, group: _Stacked, start: int, member: QuantLinear) -> None:
        super().__init__()
        self.group_ref = [group]  # shared by the siblings, not a submodule of each
        self.start, self.end = start, start + member.out_features
        self.in_features, self.out_features, self.bits = (
            member.in_features,
            member.out_features,
            member.bits,
        )
        self.member = member  # the unstacked layer (weights for plain_copy / training)
        member.packed, member.scales = [], []  # its product is the group's now

    @property
    def weight(self) -> torch.Tensor:
        return self.member.weight

    @property
    def source_rows(self) -> torch.Tensor:
        return self.member.source_rows

    def dequantized(self) -> torch.Tensor:
        return self.member.dequantized()

    def planes(self) -> list[torch.Tensor]:
        return self.member.planes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group_ref[0].output(x)[..., self.start : self.end]


def stack_siblings(model: nn.Module) -> int:
    """Replace sibling QuantLinear projections (SIBLINGS) by one stacked product each;
    returns how many groups were stacked."""
    groups = 0
    for parent in list(model.modules()):
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if not all(type(m) is QuantLinear for m in members):
                continue
            if len({(m.in_features, m.bits) for m in members}) != 1:
                continue
            group = _Stacked(members)
            start = 0
            for name, member in zip(names, members, strict=True):
                setattr(parent, name, StackedMember(group, start, member))
                start += member.out_features
            groups += 1
    return groups


def quantize_model(model: nn.Module, mode: str) -> int:
    """Swap `model`'s decoder linear layers (and head) for QuantLinear, in place.

    `int4`: layers 4-bit, head 8-bit (the mix the GGUF ships); `int8`: all 8-bit.
    Returns how many modules were swapped.
    """
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {', '.join(MODES)}, not {mode!r}")
    head = model.get_output_embeddings()
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not quantizable(child):
                continue
            bits = 8 if (child is head or mode == "int8") else 4
            setattr(parent, name, QuantLinear(child.weight, bits))
            swapped += 1
    stack_siblings(model)
    many = choose_many_rows(model)
    for layer in _products(model):
        layer.many_rows = many
    batch = choose_batch_dense(model).chosen
    for layer in _products(model, head=False):
        layer.batch_dense = batch
    # verify passes bit-identical to one-token steps (rowwise.py: bf16 rounding would
    # turn SDPA's query-count-dependent noise into flipped tokens)
    from earlyexit.engine.rowwise import ROWWISE

    model.config._attn_implementation = ROWWISE
    model.config.earlyexit_weights = mode
    return swapped


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every QuantLinear as an fp32 nn.Linear (to train or edit weights)."""
    out = copy.deepcopy(module)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (QuantLinear, StackedMember)):
                linear = nn.Linear(child.in_features, child.out_features, bias=False)
                with torch.no_grad():
                    linear.weight.copy_(child.dequantized())
                setattr(parent, name, linear)
    return out


# ---- "auto": int4 where it is exact and faster on this machine --------------------------

AUTO_MARGIN = 0.9  # int4 must take at most this fraction of fp32's time to be chosen
# part of the timing caches' keys: bump when what is timed changes (timings of an older
# procedure are measured again). weights 2: fp32 on the engine's kernel choice, not F.linear;
# 3: the least disturbed of 5 interleaved sweeps, not cached when others used the CPU
WEIGHTS_PROCEDURE = 3
MANY_ROWS_PROCEDURE = 1
BATCH_DENSE_PROCEDURE = 1
EXACT = 1e-6  # 4-bit groups rebuild the fp32 weights to this fraction of their largest |w|


def group_error(weight: torch.Tensor) -> float:
    """How far `weight` [N, K] is from 4-bit groups of 32 (min/max affine, as Q4_1), as a
    fraction of its largest |w|: about 1e-7 for a dequantized Q4_1 or Q4_0 tensor, about
    1e-2 for weights that were never 4-bit."""
    w = weight.detach().float().reshape(weight.shape[0], -1, GROUP)
    low = w.amin(-1, keepdim=True)
    step = (w.amax(-1, keepdim=True) - low) / 15
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((w - low) / safe).clamp_(0, 15)
    return float((q * step + low - w).abs().max() / w.abs().max().clamp_min(1e-30))


def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    head = model.get_output_embeddings()
    return [m for m in model.modules() if quantizable(m) and m is not head]


Product = Callable[[torch.Tensor], torch.Tensor]


def _sweep_seconds(products: list[tuple[int, Product]], rounds: int = 5) -> float:
    """Median seconds of one 1-row product with every (in_features, product) in order (a
    decode step's weight stream)."""
    inputs = {k: torch.randn(1, k) for k, _ in products}
    times = []
    with torch.inference_mode():
        for _ in range(rounds + 1):
            start = time.perf_counter()
            for k, product in products:
                product(inputs[k])
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def _fp32_products(
    model: nn.Module, linears: list[nn.Module], kernels: str, use_cache: bool
) -> tuple[list[tuple[int, Product]], list[str], str]:
    """The fp32 engine's 1-row products of `linears`: on the kernel its `kernels` choice
    (engine/kernels.py, timed or cached for this machine) takes per shape. Also the shapes
    that go skinny (part of the timing's key) and a few words on them."""
    from earlyexit.engine.kernels import choose_kernels, shape_key

    choice = choose_kernels(model, kernels, use_cache=use_cache)
    products, skinny = [], []
    for m in linears:
        weight = m.weight.detach()
        if 1 in choice.rows_for(weight):
            skinny.append(shape_key(weight))
            products.append((m.in_features, lambda x, w=weight: skinny_linear(x, w)))
        else:
            products.append((m.in_features, lambda x, w=weight: functional.linear(x, w)))
    if not skinny:
        kernel = "F.linear"
    elif len(skinny) == len(linears):
        kernel = "the skinny kernel"
    else:
        kernel = (
            f"the skinny kernel for {len(skinny)} of {len(linears)} products, F.linear elsewhere"
        )
    return products, sorted(set(skinny)), f"{kernel} (kernels {choice.mode})"


def choose_weights(
    model: nn.Module, use_cache: bool = True, kernels: str = "auto"
) -> tuple[str, str]:
    """("int4" or "float32", why) for an fp32 model: int4 only when its decoder weights are
    exactly 4-bit groups (the GGUF's own Q4_x, so nothing is re-quantized) and the int4
    products were measured faster than the fp32 engine's on this machine: on the kernels
    an engine with `kernels` multiplies fp32 by here (engine/kernels.py). The timings are
    cached per machine (`machine_key`), procedure, shapes and fp32 kernels; the decision
    (AUTO_MARGIN) is made anew from them. An engine's own model (its linears switched to
    the skinny kernel) is judged by the same weights."""
    from earlyexit.engine.kernels import OthersCPU, keep_timing, machine, machine_key
    from earlyexit.paths import home

    linears = _decoder_linears(model)
    if not linears or linears[0].weight.dtype != torch.float32:
        return "float32", "not an fp32 model with quantizable linear layers"
    worst = max(group_error(m.weight) for m in linears)
    if worst > EXACT:
        return "float32", (
            f"weights are not 4-bit groups (off by {worst:.1e} of max |w|): int4 would "
            "re-quantize them; ask for --dtype int4 to do so"
        )
    fp32_products, skinny, kernel = _fp32_products(model, linears, kernels, use_cache)
    shapes = [tuple(m.weight.shape) for m in linears]
    key = machine_key(f"weights-{WEIGHTS_PROCEDURE}", shapes, skinny)
    path = home() / "kernels" / f"weights-{key}.json"
    busy = ""
    if use_cache and path.exists():
        timing = json.loads(path.read_text())
    else:
        quantized = [QuantLinear(m.weight, 4) for m in linears]
        int4_products = [(q.in_features, q) for q in quantized]
        fp32, int4 = [], []
        with OthersCPU() as others:
            for _ in range(5):  # interleaved: drift hits both; the least disturbed counts
                fp32.append(_sweep_seconds(fp32_products))
                int4.append(_sweep_seconds(int4_products))
        here = machine()
        timing = {"cpu": here["cpu"], "threads": here["threads"], "machine": here}
        timing |= {"fp32_kernel": kernel, "fp32_ms": 1e3 * min(fp32)}
        timing["int4_ms"] = 1e3 * min(int4)
        timing["others_cpu_share"] = others.share
        keep_timing(path, timing, others, use_cache)
        if others.busy:
            busy = (
                f"; timed while other processes used {others.share:.0%} of the CPU: "
                "not cached, timed again next time"
            )
    ratio = timing["int4_ms"] / timing["fp32_ms"]
    measured = (
        f"decoder products {timing['int4_ms']:.1f} ms int4 vs {timing['fp32_ms']:.1f} ms fp32 "
        f"on {timing['fp32_kernel']} per token on {timing['cpu']}, {timing['threads']} threads"
        + busy
    )
    if ratio <= AUTO_MARGIN:
        return "int4", f"weights are exact 4-bit groups; {measured}"
    return "float32", f"int4 not faster here: {measured}"


def _products(model: nn.Module, head: bool = True) -> list[QuantLinear]:
    """The QuantLinear layers that multiply: unstacked ones and the stacked groups' (in
    module order; without the output head if not `head`)."""
    found: dict[int, QuantLinear] = {}
    get_head = getattr(model, "get_output_embeddings", None)
    out_head = get_head() if get_head is not None and not head else None
    for module in model.modules():
        if out_head is not None and module is out_head:
            continue
        if isinstance(module, StackedMember):
            linear = module.group_ref[0].linear
            found[id(linear)] = linear
        elif isinstance(module, QuantLinear) and module.packed:
            found[id(module)] = module
    return list(found.values())


def choose_many_rows(model: nn.Module, rows: int = 64, use_cache: bool = True) -> str:
    """The fastest product for many rows (prefill) on this machine: the int4 kernel, or a
    dense bf16 / fp32 copy of the dequantized weight; timed once on the model's largest
    quantized layer at `rows` rows, cached per machine (`machine_key`), procedure and
    shape, and decided anew from the cached times."""
    from earlyexit.engine.kernels import OthersCPU, keep_timing, machine, machine_key
    from earlyexit.paths import home

    layers = [m for m in _products(model) if m.bits == 4] or _products(model)
    if not layers:
        return "int4"
    layer = max(layers, key=lambda m: m.out_features * m.in_features)
    shape = (layer.out_features, layer.in_features, layer.bits)
    key = machine_key(f"many-rows-{MANY_ROWS_PROCEDURE}", shape, rows)
    path = home() / "kernels" / f"many-rows-{key}.json"
    if use_cache and path.exists():
        ms = json.loads(path.read_text())["ms"]
        return min(ms, key=ms.get)
    x = torch.randn(rows, layer.in_features)
    dense = {name: layer.dequantized().to(dtype) for name, dtype in DENSE.items()}
    products = {
        "int4": lambda: _MM(x.to(ACT), layer.packed[0], GROUP, layer.scales[0]),
        **{name: (lambda w=w: nn.functional.linear(x.to(w.dtype), w)) for name, w in dense.items()},
    }
    times: dict[str, list[float]] = {name: [] for name in products}
    with torch.inference_mode(), OthersCPU() as others:
        for _ in range(5):  # interleaved; the first round is a warm-up
            for name, product in products.items():
                start = time.perf_counter()
                product()
                times[name].append(time.perf_counter() - start)
    ms = {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}
    choice = min(ms, key=ms.get)
    here = machine()
    record = {"cpu": here["cpu"], "machine": here, "rows": rows, "ms": ms, "choice": choice}
    keep_timing(path, record, others, use_cache)
    return choice


@dataclass
class BatchDense:
    """Which product a pass over a running batch of B rows takes (`chosen`: from which B on,
    and which dense copy; None: the int4 kernel at every timed B), and the timings (ms per
    pass over the decoder's products, by product and B) that chose it."""

    chosen: tuple[int, str] | None
    ms: dict[str, dict[int, float]]
    cached: bool = False


def decide_batch_dense(ms: dict[str, dict[int, float]]) -> tuple[int, str] | None:
    """The smallest batch size from which a dense copy beats the kernel by AUTO_MARGIN at it
    and at every larger timed size (of the two copies, the one that starts first, then the
    faster there); None where neither does."""
    best: tuple[int, float, str] | None = None
    for name in DENSE:
        sizes = sorted(ms.get(name, {}))
        wins = [b for b in sizes if ms[name][b] <= AUTO_MARGIN * ms["int4"][b]]
        start = next((b for b in sizes if all(s in wins for s in sizes if s >= b)), None)
        if start is not None and (best is None or (start, ms[name][start]) < best[:2]):
            best = (start, ms[name][start], name)
    return None if best is None else (best[0], best[2])


def choose_batch_dense(model: nn.Module, use_cache: bool = True) -> BatchDense:
    """Time one pass over the decoder's quantized products at each of BATCH_ROWS rows on
    the int4 kernel and on dense bf16 / fp32 copies (in module order, so the weights stream
    from memory as in decoding; interleaved; the least disturbed of 3 rounds), cached per
    machine (`machine_key`), procedure and shapes; decided anew from the timings."""
    from earlyexit.engine.kernels import OthersCPU, keep_timing, machine, machine_key
    from earlyexit.paths import home

    layers = _products(model, head=False)
    if not layers:
        return BatchDense(None, {})
    shapes = [(m.out_features, m.in_features, m.bits) for m in layers]
    key = machine_key(f"batch-dense-{BATCH_DENSE_PROCEDURE}", shapes, BATCH_ROWS)
    path = home() / "kernels" / f"batch-dense-{key}.json"
    if use_cache and path.exists():
        saved = json.loads(path.read_text())["ms"]
        ms = {name: {int(b): t for b, t in v.items()} for name, v in saved.items()}
        return BatchDense(decide_batch_dense(ms), ms, cached=True)
    dense = {name: [m.dequantized().to(dtype) for m in layers] for name, dtype in DENSE.items()}
    passes: dict[str, Callable[[dict[int, torch.Tensor]], None]] = {
        "int4": lambda xs: [m(xs[m.in_features]) for m in layers],
        **{
            name: (
                lambda xs, ws=ws: [nn.functional.linear(xs[w.shape[1]].to(w.dtype), w) for w in ws]
            )
            for name, ws in dense.items()
        },
    }
    times: dict[str, dict[int, list[float]]] = {
        name: {b: [] for b in BATCH_ROWS} for name in passes
    }
    with torch.inference_mode(), OthersCPU() as others:
        for round_ in range(4):  # round 0 warms up; the least disturbed of 3
            for rows in BATCH_ROWS:
                xs = {k: torch.randn(rows, k) for k in {m.in_features for m in layers}}
                for name, run in passes.items():
                    start = time.perf_counter()
                    run(xs)
                    if round_:
                        times[name][rows].append(time.perf_counter() - start)
    ms = {name: {b: 1e3 * min(t) for b, t in by.items()} for name, by in times.items()}
    chosen = decide_batch_dense(ms)
    here = machine()
    record = {"cpu": here["cpu"], "machine": here, "ms": ms, "chosen": chosen}
    keep_timing(path, record, others, use_cache)
    return BatchDense(chosen, ms)


def batch_dense_of(model: nn.Module) -> tuple[int, str] | None:
    """The running-batch product choice the model's decoder layers carry (None: kernel)."""
    layers = _products(model, head=False)
    return layers[0].batch_dense if layers else None
