"""Run a causal LM one span of layers at a time, with a per-layer KV cache.

The engine calls the model's own embedding, decoder layers, rotary embedding, norm and head;
what it adds is the bookkeeping transformers' forward does not allow: stopping after any
layer, reading out there, and later running the remaining layers for those tokens together
with newer ones, with correct positions and masks in every case.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TypeVar

import torch

from earlyexit.engine.arch import Architecture
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.compiled import (
    TORCH_TESTED,
    CompiledChoice,
    CompiledSpans,
    CompiledStepsFailed,
    compilable,
    torch_supported,
)
from earlyexit.engine.kernels import (
    KernelChoice,
    OthersCPU,
    choose_kernels,
    cpu_model,
    keep_timing,
)
from earlyexit.engine.layer_step import LayerFn, layer_steps
from earlyexit.engine.masks import attention_mask
from earlyexit.engine.quant import QuantLinear, batch_dense_of, row_batch
from earlyexit.engine.row_cache import RowKVCache, row_mask
from earlyexit.engine.skinny import engine_scope, skinny_linear, use_skinny_linear
from earlyexit.errors import EarlyExitError
from earlyexit.models.load import LoadedModel
from earlyexit.paths import home


@dataclass
class Prefill:
    cache: LayerKVCache
    hidden: torch.Tensor  # final-layer hidden states (before the final norm) [B, T, H]
    layer_hidden: list[torch.Tensor] | None  # output of every layer when requested


def model_fingerprint(model: torch.nn.Module, arch: Architecture | None = None) -> str:
    """A short id of the weights, so artifacts trained on one model are refused by another.

    It ignores dtype and load path: a readout trained in fp32 serves the bf16 model too.
    """
    config = model.config
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
    digest = hashlib.sha256(repr([getattr(config, key, None) for key in keys]).encode())
    for tensor in (arch or Architecture.of(model)).fingerprint_tensors():
        digest.update(tensor[:8].detach().to(torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]


F = TypeVar("F", bound=Callable)
COMPILED_MODES = ("auto", "on", "off")
# `set_compiled("auto")`'s timing: one-token full-depth steps after this prompt, eager and
# compiled in turn, median over rounds of a few steps each (about a second in all)
TIMING_PROMPT = "The quick brown fox jumps over the lazy dog"
TIMING_ROUNDS, TIMING_STEPS = 5, 8


def _in_engine_scope(method: F) -> F:
    """Run the method with the engine's chosen matmul kernels (engine/kernels.py)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with engine_scope():
            return method(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class LayerEngine:
    """Layer-by-layer execution of a Hugging Face decoder-only model."""

    def __init__(self, loaded: LoadedModel, kernels: str = "auto") -> None:
        """`kernels`: how few-row products are multiplied inside the engine (`auto`: the
        faster of F.linear and the skinny kernel per weight shape and row count, timed once
        per machine; `plain`; `skinny`). The model's own forward/generate are unaffected."""
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.arch = Architecture.of(self.model)
        self.num_layers = len(self.arch.layers)
        self.hidden_size = int(self.model.config.hidden_size)
        self.vocab_size = int(self.arch.head.out_features)
        self.fingerprint = model_fingerprint(self.model, self.arch)
        # LM-head rows of the last restricted vocabulary read (shallow exits reuse one)
        self._head_rows: tuple[torch.Tensor, torch.Tensor | QuantLinear] | None = None
        self.set_kernels(kernels)
        # per layer, a lean step with the layer's own arithmetic where one exists
        # (engine/layer_step.py), else None: the model's own forward
        self.steps: list[LayerFn | None] = layer_steps(self.arch.layers)
        # one-token steps compiled per span of layers (engine/compiled.py), when enabled
        self.compiled: CompiledSpans | None = None
        self._compiled_spans: CompiledSpans | None = None  # kept when switched off
        self.compiled_choice = CompiledChoice("off", False, reason="off")

    def set_compiled(self, mode: bool | str) -> CompiledChoice:
        """Whether steps of 1..8 new tokens at batch 1 run as compiled graphs
        (engine/compiled.py): not bit-identical to the eager engine (bounded in tests); the
        compiled layer step is built once per machine (about 15 s on 2 cores) and loaded
        in milliseconds by later processes.

        `auto`: compiled where the layers have a compiled step and a full-depth step timed
        both ways was faster (timed once per machine, torch, thread count and model, then
        cached); `on` (or True): compiled, a one-line error where unsupported; `off` (or
        False): eager."""
        mode = {True: "on", False: "off"}.get(mode, mode)  # type: ignore[call-overload]
        if mode not in COMPILED_MODES:
            raise EarlyExitError(f"unknown compiled mode {mode!r}: use {', '.join(COMPILED_MODES)}")
        supported = compilable(self.steps)
        if mode == "on" and not supported:
            if not torch_supported():
                raise EarlyExitError(
                    f"compiled steps need torch {TORCH_TESTED}x, not {torch.__version__}: "
                    "use --compiled off"
                )
            raise EarlyExitError(
                "compiled steps run Llama layers with int4/int8 products (smollm2-135m with "
                f"--dtype int4), not {self.loaded.name} at {self.weights}"
            )
        try:
            if mode == "off":
                choice = CompiledChoice("off", False, reason="off")
            elif not supported:
                why = f"no compiled step for {self.weights}"
                if not torch_supported():
                    why = f"no compiled steps on torch {torch.__version__}"
                choice = CompiledChoice("auto", False, reason=why)
            elif mode == "on":
                choice = CompiledChoice("on", True, reason="on")
            else:
                choice = self._time_compiled()
            self.compiled = self._spans() if choice.compiled else None
            if self.compiled is not None:
                self.compiled.load()  # now, not in the first decode step
        except CompiledStepsFailed as failed:  # no C++ compiler, an export or inductor error
            self.compiled = None
            if mode == "on":
                raise  # one line, naming --compiled off
            choice = CompiledChoice("auto", False, reason=failed.reason)
        self.compiled_choice = choice
        return choice

    def _spans(self) -> CompiledSpans:
        """The compiled steps, made once (kept when switched off: loaded layers stay)."""
        if self._compiled_spans is None:
            self._compiled_spans = CompiledSpans(
                self.steps, self.arch.rotary, f"{self.fingerprint}-{self.weights}"
            )
        return self._compiled_spans

    def _time_compiled(self) -> CompiledChoice:
        """`auto`'s measurement: a full-depth one-token step, eager and compiled, in
        interleaved rounds on one prompt (cached under EARLYEXIT_HOME/compiled/)."""
        spans, layers, threads = self._spans(), self.num_layers, torch.get_num_threads()
        path = home() / "compiled" / f"choice-{spans.key(0)}-{threads}.json"
        if path.exists():  # decided again from the saved timings
            saved = json.loads(path.read_text())
            saved = {k: v for k, v in saved.items() if k in CompiledChoice.__dataclass_fields__}
            faster = saved["compiled_ms"] < saved["eager_ms"]
            return CompiledChoice(**{**saved, "compiled": faster, "cached": True})
        ids = self.tokenizer(TIMING_PROMPT, return_tensors="pt")["input_ids"].to(self.device)
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode(), OthersCPU() as others:
            state = self.prefill(ids, capacity=ids.shape[1] + 1)
            step, filled = self.embed(ids[:, -1:]), list(state.cache.lengths)
            for rounds in range(TIMING_ROUNDS + 1):  # round 0 warms up (loads or builds)
                for compiled in (False, True):
                    self.compiled = spans if compiled else None
                    start = time.perf_counter()
                    for _ in range(TIMING_STEPS):
                        self.run_layers(step, state.cache, 0, layers)
                        state.cache.lengths[:] = filled  # the same slot again
                    if rounds:
                        times[compiled].append((time.perf_counter() - start) / TIMING_STEPS)
        eager, compiled = (1e3 * statistics.median(times[c]) for c in (False, True))
        choice = CompiledChoice(
            "auto", compiled < eager, eager, compiled, cpu_model(), threads, library=spans.key(0)
        )
        keep_timing(path, asdict(choice), others)
        return choice

    @contextmanager
    def own_layers(self) -> Iterator[None]:
        """Within the block every layer runs the model's own forward (side-by-side timing
        of the lean steps, which give bit-identical results)."""
        steps, compiled = self.steps, self.compiled
        self.steps, self.compiled = [None] * self.num_layers, None
        try:
            yield
        finally:
            self.steps, self.compiled = steps, compiled

    def set_kernels(self, kernels: str | KernelChoice) -> KernelChoice:
        """Choose (a mode) or reapply (a choice) the few-row matmul kernels."""
        if isinstance(kernels, KernelChoice):
            choice = kernels
        else:
            choice = choose_kernels(self.model, kernels)
        use_skinny_linear(self.model, choice.rows_for)
        self.kernels = choice
        return choice

    @contextmanager
    def kernels_as(self, mode: str) -> Iterator[KernelChoice]:
        """Within the block the engine uses `mode`'s kernels (side-by-side measurements)."""
        chosen = self.kernels
        try:
            yield self.set_kernels(mode)
        finally:
            self.set_kernels(chosen)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of hidden states and KV (fp32 for the int4/int8 weight paths)."""
        return self.arch.embed.weight.dtype

    @property
    def weights(self) -> str:
        """What the products multiply by: float32, bfloat16, int4 or int8."""
        name = getattr(self.model.config, "earlyexit_weights", "")
        return name or str(self.dtype).removeprefix("torch.")

    @property
    def batch_dense(self) -> tuple[int, str] | None:
        """Int4 weights: from which running-batch size on, and on which dense copy, a pass
        over a running batch multiplies (engine/quant.py, timed per machine); else None."""
        return batch_dense_of(self.model)

    @property
    def device(self) -> torch.device:
        return self.arch.embed.weight.device

    # ---- building blocks -------------------------------------------------------------
    def new_cache(
        self, batch: int, capacity: int = 256, pad: torch.Tensor | None = None
    ) -> LayerKVCache:
        return LayerKVCache(
            self.num_layers,
            batch,
            self.arch.num_kv_heads,
            self.arch.head_dim,
            dtype=self.dtype,
            device=self.device,
            capacity=capacity,
            pad=pad,
        )

    def new_row_cache(self, max_rows: int, capacity: int = 256) -> RowKVCache:
        """A cache for a running batch whose rows join and leave (engine/row_cache.py)."""
        return RowKVCache(
            self.num_layers,
            self.arch.num_kv_heads,
            self.arch.head_dim,
            dtype=self.dtype,
            device=self.device,
            max_rows=max_rows,
            capacity=capacity,
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.arch.embed(input_ids)

    @_in_engine_scope
    @torch.inference_mode()
    def run_layers(
        self, hidden: torch.Tensor, cache: LayerKVCache, start: int, end: int
    ) -> torch.Tensor:
        """Run layers [start, end) over `hidden` [B, n, H]: the next n slots of those layers.

        Every layer in the span must hold the same number of slots; the new tokens take the
        slots right after them (their positions follow from that and the row's padding).
        """
        if not 0 <= start <= end <= self.num_layers:
            raise ValueError(f"bad layer span [{start}, {end}) for {self.num_layers} layers")
        if start == end:
            return hidden
        offset = cache.lengths[start]
        if any(cache.lengths[layer] != offset for layer in range(start, end)):
            raise ValueError(
                f"layers {start}..{end - 1} hold different numbers of tokens "
                f"({cache.lengths[start:end]}); catch up the shorter layers first"
            )
        if self.compiled is not None and self.compiled.accepts(hidden, cache, start, end):
            return self.compiled.run(hidden, cache, start, end)
        position_ids = self._positions(cache, offset, hidden.shape[1], hidden.device)
        num_new = hidden.shape[1]
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        masks: dict[str, torch.Tensor | None] = {}
        for layer in range(start, end):
            kind = self.arch.layer_types[layer]
            if kind not in rope:
                rope[kind] = self.arch.position_embeddings(hidden, position_ids, kind)
                masks[kind] = attention_mask(
                    offset,
                    num_new,
                    cache.pad,
                    cache.has_padding,
                    self.arch.window_of(kind),
                    hidden.device,
                )
            step = self.steps[layer]
            if step is not None:
                hidden = step(hidden, masks[kind], rope[kind], cache)
                continue
            hidden = self.arch.layers[layer](
                hidden,
                attention_mask=masks[kind],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=rope[kind],
            )
        return hidden

    @_in_engine_scope
    @torch.inference_mode()
    def run_rows(
        self,
        hidden: torch.Tensor,
        cache: RowKVCache,
        start: int,
        end: int,
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run layers [start, end) over `hidden` [rows, n, H] of a running batch whose rows
        hold different numbers of tokens (engine/row_cache.py): row r's inputs take the
        slots after its own fill; `counts[r]` of them are real (default: all n), the rest
        padding of a ragged pass whose outputs the caller ignores.

        Each layer is the same function `run_layers` calls; one row at a time this is the
        batch-1 computation up to the rounding of products over more rows."""
        rows, num_new = hidden.shape[:2]
        if rows != cache.rows:
            raise ValueError(f"{rows} input rows for a batch of {cache.rows}")
        if start == end:
            return hidden
        fill = cache.span_fill(start, end)
        cache.begin_pass(counts if counts is not None else torch.full((rows,), num_new))
        compiled = self.compiled
        if compiled is not None and compiled.accepts_row(hidden, int(fill[0])):
            return compiled.run_row(hidden, cache, start, end)
        with row_batch(rows):  # int4 products may take a dense copy from a batch size on
            return self._run_rows(hidden, cache, start, end, fill)

    def _run_rows(
        self, hidden: torch.Tensor, cache: RowKVCache, start: int, end: int, fill: torch.Tensor
    ) -> torch.Tensor:
        num_new = hidden.shape[1]
        positions = (fill.unsqueeze(1) + torch.arange(num_new)).to(hidden.device)
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        masks: dict[str, torch.Tensor] = {}
        for layer in range(start, end):
            kind = self.arch.layer_types[layer]
            if kind not in rope:
                rope[kind] = self.arch.position_embeddings(hidden, positions, kind)
                masks[kind] = row_mask(fill, num_new, self.arch.window_of(kind)).to(hidden.device)
            step = self.steps[layer]
            if step is not None:
                hidden = step(hidden, masks[kind], rope[kind], cache)
                continue
            hidden = self.arch.layers[layer](
                hidden,
                attention_mask=masks[kind],
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=rope[kind],
            )
        return hidden

    @staticmethod
    def _positions(
        cache: LayerKVCache, offset: int, num_new: int, device: torch.device
    ) -> torch.Tensor:
        slots = torch.arange(offset, offset + num_new, device=device)
        return (slots.unsqueeze(0) - cache.pad.unsqueeze(1)).clamp_min(0)

    @_in_engine_scope
    @torch.inference_mode()
    def copy_state_kv(
        self, hidden: torch.Tensor, cache: LayerKVCache, start: int, end: int
    ) -> None:
        """Give tokens that exited after layer `start` keys/values in layers [start, end)
        computed from their exit state, without running those layers (CALM's state
        copying: later tokens can attend to them, approximately).

        Uses each layer's own input norm, K/V projections, key norm (Gemma3, Qwen3) and the
        family's own rotary function (engine/arch.py); only the attention and MLP are skipped.
        """
        offset = cache.lengths[start]
        if any(cache.lengths[layer] != offset for layer in range(start, end)):
            raise ValueError("layers to fill must hold the same number of tokens")
        position_ids = self._positions(cache, offset, hidden.shape[1], hidden.device)
        self._copy_kv(hidden, cache, start, end, position_ids)

    def copy_state_kv_rows(
        self,
        hidden: torch.Tensor,
        cache: RowKVCache,
        start: int,
        end: int,
        counts: torch.Tensor,
    ) -> None:
        """`copy_state_kv` for a running batch (engine/row_cache.py): row r's first
        `counts[r]` states of `hidden` [rows, n, H] get keys/values in layers [start, end)
        at its own fill; the rest are padding, written past the row's fill and not kept."""
        rows, num_new = hidden.shape[:2]
        if rows != cache.rows:
            raise ValueError(f"{rows} input rows for a batch of {cache.rows}")
        fill = cache.span_fill(start, end)
        positions = (fill.unsqueeze(1) + torch.arange(num_new)).to(hidden.device)
        cache.begin_pass(counts)
        self._copy_kv(hidden, cache, start, end, positions)

    def _copy_kv(
        self,
        hidden: torch.Tensor,
        cache: LayerKVCache | RowKVCache,
        start: int,
        end: int,
        position_ids: torch.Tensor,
    ) -> None:
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in range(start, end):
            kind = self.arch.layer_types[layer]
            if kind not in rope:
                rope[kind] = self.arch.position_embeddings(hidden, position_ids, kind)
            parts = self.arch.key_value_parts(layer)
            normed = parts.input_norm(hidden)
            shape = (*hidden.shape[:-1], -1, self.arch.head_dim)
            keys = parts.key_proj(normed).view(shape).transpose(1, 2)
            values = parts.value_proj(normed).view(shape).transpose(1, 2)
            if parts.key_norm is not None:
                keys = parts.key_norm(keys)
            cos, sin = rope[kind]
            _, keys = self.arch.apply_rotary(keys, keys, cos, sin)
            cache.update(keys, values, layer)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.arch.norm(hidden)

    def head_logits(
        self, normed: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """LM head on normalised states; with `token_ids`, only those vocabulary rows."""
        if token_ids is None:
            with engine_scope():
                logits = self.arch.head(normed)
        else:
            weight = self._restricted_head(token_ids)
            if isinstance(weight, QuantLinear):  # the same int4 kernel as the full head
                logits = weight(normed)
            # a restricted head's shape is not timed: skinny only where it is forced
            elif self.kernels.mode == "skinny":
                logits = skinny_linear(normed, weight)
            else:
                logits = torch.nn.functional.linear(normed, weight)
        if self.arch.logit_softcap is not None:
            cap = self.arch.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _restricted_head(self, token_ids: torch.Tensor) -> torch.Tensor | QuantLinear:
        """The head's rows for `token_ids`, kept while the same id tensor comes back (a
        shallow exit reads the same few thousand rows every token: no copy each time).
        Training gets plain fp32 rows (gradients flow through them); a quantized head in
        inference gives a quantized head over those rows."""
        head = self.arch.head
        if not torch.is_inference_mode_enabled():  # training: no inference tensors kept
            return head.weight.index_select(0, token_ids)
        if self._head_rows is None or self._head_rows[0] is not token_ids:
            rows = (
                head.rows(token_ids)
                if isinstance(head, QuantLinear)
                else head.weight.index_select(0, token_ids)
            )
            self._head_rows = (token_ids, rows)
        return self._head_rows[1]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own readout: final norm + LM head (+ soft-cap) on any layer's output."""
        return self.head_logits(self.final_norm(hidden), token_ids)

    # ---- common requests -------------------------------------------------------------
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded token ids and per-row pad counts."""
        batch = self.tokenizer(texts, return_tensors="pt", padding=True)
        ids = batch["input_ids"].to(self.device)
        pad = (batch["attention_mask"] == 0).sum(dim=1).to(self.device)
        return ids, pad

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        pad: torch.Tensor | None = None,
        capacity: int | None = None,
        upto: int | None = None,
        keep_layers: bool = False,
    ) -> Prefill:
        """Run the prompt through layers [0, upto) (default: all) and fill the cache."""
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise EarlyExitError("prefill needs a non-empty [batch, tokens] id tensor")
        batch, length = input_ids.shape
        cache = self.new_cache(batch, capacity or max(256, 2 * length), pad)
        hidden = self.embed(input_ids)
        upto = self.num_layers if upto is None else upto
        outputs: list[torch.Tensor] | None = [] if keep_layers else None
        for layer in range(upto):
            hidden = self.run_layers(hidden, cache, layer, layer + 1)
            if outputs is not None:
                outputs.append(hidden)
        return Prefill(cache=cache, hidden=hidden, layer_hidden=outputs)

    @torch.inference_mode()
    def greedy(
        self, input_ids: torch.Tensor, max_new_tokens: int, pad: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-depth greedy decoding: the reference every early-exit loop is checked against."""
        state = self.prefill(input_ids, pad, capacity=input_ids.shape[1] + max_new_tokens)
        next_ids = self.logits(state.hidden[:, -1:]).argmax(-1)
        out = [next_ids]
        for _ in range(max_new_tokens - 1):
            hidden = self.run_layers(self.embed(next_ids), state.cache, 0, self.num_layers)
            next_ids = self.logits(hidden).argmax(-1)
            out.append(next_ids)
        return torch.cat(out, dim=1)
