"""Early exit for prompted classification in the runtime: per-layer traces and policy runs.

Classification needs one forward pass over the prompt; the exit decision is made on the
last position's readout over the label-word candidates (a tiny fraction of a layer). Rows
that exit leave the batch at once, so a batch gains from every early exit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from earlyexit.engine.engine import LayerEngine
from earlyexit.policies.base import ExitPolicy, vocab_statistics
from earlyexit.readouts.probe import TaskProbe
from earlyexit.readouts.readout import ExitReadout

Readout = ExitReadout | TaskProbe


@dataclass
class PolicyRun:
    predictions: list[int]
    exit_layers: list[int]
    seconds: float  # forward passes + decisions, tokenisation excluded
    decision_seconds: float  # readouts + policy
    # per batch (one interleaved round each), in run order; planning time not included
    round_seconds: list[float] = field(default_factory=list)


def _batches(prompts: list[str], batch: int) -> list[list[str]]:
    return [prompts[i : i + batch] for i in range(0, len(prompts), batch)]


@torch.inference_mode()
def collect_states(engine: LayerEngine, prompts: list[str], batch: int = 8) -> torch.Tensor:
    """The last position's output of every layer for every prompt: [N, L, H] (float32).

    One full-depth pass; any readout's per-layer traces follow from these states without
    running the model again (`readout_traces`)."""
    out = []
    for chunk in tqdm(_batches(prompts, batch), desc="full-depth pass", leave=False):
        ids, pad = engine.encode(chunk)
        cache = engine.new_cache(len(chunk), capacity=ids.shape[1], pad=pad)
        hidden = engine.embed(ids)
        per_layer = []
        for layer in range(engine.num_layers):
            hidden = engine.run_layers(hidden, cache, layer, layer + 1)
            per_layer.append(hidden[:, -1])
        out.append(torch.stack(per_layer, dim=1).float())
    return torch.cat(out)


@torch.inference_mode()
def readout_traces(
    readout: Readout, states: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
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
def vocab_traces(readout: ExitReadout, states: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Full-vocabulary (top-1, gap) at every layer from collected states: [N, L, 2]."""
    dtype = readout.engine.model.dtype
    out = torch.zeros(states.shape[0], states.shape[1], 2)
    for layer in range(states.shape[1]):
        for i in range(0, states.shape[0], chunk):
            hidden = states[i : i + chunk, layer].to(dtype)
            out[i : i + chunk, layer] = vocab_statistics(readout.logits(hidden, layer + 1))
    return out


def _group_by_plan(plan: torch.Tensor, batch: int) -> list[list[int]]:
    """Batches of row indices that share (or nearly share) their planned exit layer, so that
    a batch stops running as soon as its rows are done."""
    order = torch.argsort(plan, stable=True).tolist()
    return [order[i : i + batch] for i in range(0, len(order), batch)]


class PolicyRunner:
    """One policy over a prompt set, a batch at a time, so that several policies can be
    timed in interleaved rounds (`evaluation.runner.run_interleaved`): on a shared 2-core
    machine the speed drifts by ~10% over minutes, and interleaving batch by batch makes the
    drift hit the full model and every method alike. `warm_up` runs a group untimed.

    Each batch runs layer by layer, dropping rows as the policy exits them. A policy that
    plans exits up front (RAEE, from `texts`, the bare inputs) is asked once for all rows,
    and rows are regrouped into batches by planned exit layer. A policy that wants
    full-vocabulary statistics gets them from `vocab_readout` (default: `readout`).
    """

    def __init__(
        self,
        engine: LayerEngine,
        readout: Readout,
        prompts: list[str],
        candidates: torch.Tensor,
        policy: ExitPolicy,
        batch: int = 8,
        texts: list[str] | None = None,
        vocab_readout: ExitReadout | None = None,
    ) -> None:
        self.engine, self.readout, self.prompts = engine, readout, prompts
        self.candidates, self.policy = candidates, policy
        if policy.vocab_features and vocab_readout is None:
            if not isinstance(readout, ExitReadout):
                raise ValueError("full-vocabulary features need a vocabulary readout")
            vocab_readout = readout
        self.vocab_readout = vocab_readout
        self.check = policy.readout_layers(engine.num_layers)
        self.predictions = [-1] * len(prompts)
        self.exits = [engine.num_layers] * len(prompts)
        self.round_seconds: list[float] = []
        texts = texts if texts is not None else prompts
        # a first plan, untimed: one-off costs (a retrieval index built on its first
        # search, faiss imported) would land on whichever planned policy came first
        policy.plan(texts[:batch])
        began = time.perf_counter()
        self.plan = policy.plan(texts)
        if self.plan is not None:
            self.groups = _group_by_plan(self.plan, batch)
            self.seconds = self.deciding = time.perf_counter() - began
        else:
            self.seconds = self.deciding = 0.0
            self.groups = [
                list(range(i, min(i + batch, len(prompts)))) for i in range(0, len(prompts), batch)
            ]

    def result(self) -> PolicyRun:
        return PolicyRun(
            self.predictions, self.exits, self.seconds, self.deciding, self.round_seconds
        )

    def warm_up(self, index: int = 0) -> None:
        """Run one group untimed and unrecorded (its own code path's first-call costs:
        a stopper's first call, lazy imports, buffers growing to size), before timing."""
        if not self.groups:
            return
        kept = (self.predictions[:], self.exits[:], len(self.round_seconds))
        seconds, deciding = self.seconds, self.deciding
        self.run_group(index)
        self.predictions, self.exits = kept[0], kept[1]
        del self.round_seconds[kept[2] :]
        self.seconds, self.deciding = seconds, deciding

    @torch.inference_mode()
    def run_group(self, index: int) -> None:
        engine, policy, candidates = self.engine, self.policy, self.candidates
        total, plan, group = engine.num_layers, self.plan, self.groups[index]
        ids, pad = engine.encode([self.prompts[i] for i in group])
        began = time.perf_counter()
        cache = engine.new_cache(len(group), capacity=ids.shape[1], pad=pad)
        rows = torch.tensor(group)
        policy.begin(len(group))
        hidden = engine.embed(ids)
        for layer in range(1, total + 1):
            hidden = engine.run_layers(hidden, cache, layer - 1, layer)
            t0 = time.perf_counter()
            if plan is not None:
                stop = plan[rows] <= layer
                if not stop.any():
                    continue
                logits = torch.zeros(len(rows), len(candidates), dtype=hidden.dtype)
                logits[stop] = self.readout.logits(hidden[stop, -1], layer, candidates)
            elif layer == total:
                logits = self.readout.logits(hidden[:, -1], layer, candidates)
                stop = torch.ones(len(rows), dtype=torch.bool)
            elif self.check is not None and layer not in self.check:
                continue
            else:
                logits = self.readout.logits(hidden[:, -1], layer, candidates)
                stats = None
                if policy.vocab_features:
                    stats = vocab_statistics(self.vocab_readout.logits(hidden[:, -1], layer))
                stop = policy.should_exit(layer, logits, total, stats)
            self.deciding += time.perf_counter() - t0
            if not stop.any():
                continue
            for row, pred in zip(
                rows[stop].tolist(), logits[stop].argmax(-1).tolist(), strict=True
            ):
                self.predictions[row] = pred
                self.exits[row] = layer
            if stop.all():
                break
            keep = (~stop).nonzero().squeeze(1)
            rows, hidden = rows[keep], hidden.index_select(0, keep)
            cache.select_rows(keep)
            policy.keep(keep)
        self.round_seconds.append(time.perf_counter() - began)
        self.seconds += self.round_seconds[-1]


def run_policy(
    engine: LayerEngine,
    readout: Readout,
    prompts: list[str],
    candidates: torch.Tensor,
    policy: ExitPolicy,
    batch: int = 8,
    texts: list[str] | None = None,
    vocab_readout: ExitReadout | None = None,
) -> PolicyRun:
    """Run one policy over all prompts (see PolicyRunner)."""
    runner = PolicyRunner(engine, readout, prompts, candidates, policy, batch, texts, vocab_readout)
    for index in range(len(runner.groups)):
        runner.run_group(index)
    return runner.result()
