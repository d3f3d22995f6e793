"""Early exit for prompted classification: per-layer traces and timed policy runs.

Classification needs one forward pass over the prompt; the exit decision is made on the
last position's readout over the label-word candidates (a tiny fraction of a layer). Rows
that exit leave the batch at once, so a batch gains from every early exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from earlyexit.engine.engine import LayerEngine
from earlyexit.policies.base import ExitPolicy
from earlyexit.readouts.readout import ExitReadout
from earlyexit.readouts.probe import TaskProbe

Readout = ExitReadout | TaskProbe


@dataclass
class PolicyRun:
    predictions: list[int]
    exit_layers: list[int]
    seconds: float  # forward passes + decisions, tokenisation excluded
    decision_seconds: float  # readouts + policy


def _batches(prompts: list[str], batch: int) -> list[list[str]]:
    return [prompts[i : i + batch] for i in range(0, len(prompts), batch)]


@torch.inference_mode()
def collect_states(engine: LayerEngine, prompts: list[str], batch: int = 8) -> torch.Tensor:
    """The last position's output of every layer for every prompt: [N, L, H] (float32).

    One full-depth pass; any readout's per-layer traces follow from these states without
    running the model again (`readout_traces`)."""
    out = []
    for chunk in tqdm(_batches(prompts, batch), desc="collecting states", leave=False):
        ids, pad = engine.encode(chunk)
        cache = engine.new_cache(len(chunk), capacity=ids.shape[1], pad=pad)
        hidden = engine.embed(ids)
        per_layer = []
        for layer in range(engine.num_layers):
            hidden = engine.run_layers(hidden, cache, layer, layer + 1)
            per_layer.append(hidden[:, -1].float())
        out.append(torch.stack(per_layer, dim=1))
    return torch.cat(out)


@torch.inference_mode()
def readout_traces(readout: Readout, states: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Candidate logits at every layer from collected states: [N, L, C] (float32)."""
    dtype = readout.engine.model.dtype
    return torch.stack(
        [
            readout.logits(states[:, i].to(dtype), i + 1, candidates).float()
            for i in range(states.shape[1])
        ],
        dim=1,
    )


def trace_layers(
    engine: LayerEngine,
    readout: Readout,
    prompts: list[str],
    candidates: torch.Tensor,
    batch: int = 8,
) -> torch.Tensor:
    """Candidate logits at every layer for every prompt: [N, L, C] (float32)."""
    return readout_traces(readout, collect_states(engine, prompts, batch), candidates)


@torch.inference_mode()
def run_policy(
    engine: LayerEngine,
    readout: Readout,
    prompts: list[str],
    candidates: torch.Tensor,
    policy: ExitPolicy,
    batch: int = 8,
) -> PolicyRun:
    """Run each batch layer by layer, dropping rows as the policy exits them."""
    total = engine.num_layers
    check = policy.readout_layers(total)
    predictions: list[int] = [-1] * len(prompts)
    exits: list[int] = [total] * len(prompts)
    seconds = deciding = 0.0
    for offset, chunk in zip(range(0, len(prompts), batch), _batches(prompts, batch), strict=True):
        ids, pad = engine.encode(chunk)
        began = time.perf_counter()
        cache = engine.new_cache(len(chunk), capacity=ids.shape[1], pad=pad)
        rows = torch.arange(len(chunk))
        hidden = engine.embed(ids)
        for layer in range(1, total + 1):
            hidden = engine.run_layers(hidden, cache, layer - 1, layer)
            if layer < total and check is not None and layer not in check:
                continue
            t0 = time.perf_counter()
            logits = readout.logits(hidden[:, -1], layer, candidates)
            stop = (
                torch.ones(len(rows), dtype=torch.bool)
                if layer == total
                else policy.should_exit(layer, logits, total)
            )
            deciding += time.perf_counter() - t0
            if not stop.any():
                continue
            for row, pred in zip(
                rows[stop].tolist(), logits[stop].argmax(-1).tolist(), strict=True
            ):
                predictions[offset + row] = pred
                exits[offset + row] = layer
            if stop.all():
                break
            keep = (~stop).nonzero().squeeze(1)
            rows, hidden = rows[keep], hidden.index_select(0, keep)
            cache.select_rows(keep)
        seconds += time.perf_counter() - began
    return PolicyRun(predictions, exits, seconds, deciding)
