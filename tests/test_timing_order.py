"""The order timed runs are scheduled in (no timing asserted): every runner in every
position of the interleaved rounds equally often, warmed up untimed before round 0, its own
batches in order, the garbage collector paused during rounds. Fakes only: no weights."""

from __future__ import annotations

import gc
from collections import Counter
from itertools import pairwise

import pytest
import torch

from earlyexit.evaluation.runner import (
    collector_frozen,
    collector_paused,
    round_orders,
    run_interleaved,
)
from earlyexit.policies import FullPolicy
from earlyexit.policies.simple import ConfidencePolicy
from earlyexit.runtime.classification import PolicyRun, PolicyRunner


def square_rows(count: int) -> int:
    return count if count % 2 == 0 else 2 * count


@pytest.mark.parametrize("count", range(1, 9))
def test_round_orders_balance_positions(count: int) -> None:
    for rounds in range(3 * square_rows(count) + 2):
        orders = round_orders(count, rounds)
        assert len(orders) == rounds
        assert all(sorted(order) == list(range(count)) for order in orders)
        held = Counter((runner, place) for order in orders for place, runner in enumerate(order))
        counts = [held[(runner, place)] for runner in range(count) for place in range(count)]
        # as equal as the round count allows: rounds // count or one more
        assert min(counts) == rounds // count
        assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("count", range(2, 9))
def test_round_orders_balance_who_follows_whom(count: int) -> None:
    """Within a round, over one whole design, each runner runs right after each other
    runner equally often (a Williams design): no method always follows the reference."""
    orders = round_orders(count, square_rows(count))
    follows = Counter(pair for order in orders for pair in pairwise(order))
    assert set(follows) == {(a, b) for a in range(count) for b in range(count) if a != b}
    assert len(set(follows.values())) == 1


def test_round_orders_change_every_round() -> None:
    orders = round_orders(4, 8)
    assert all(a != b for a, b in pairwise(orders))
    assert [order[0] for order in orders[:4]] == [0, 1, 2, 3]
    assert round_orders(0, 3) == [[], [], []]


class FakeRunner:
    """A PolicyRunner's scheduling surface: records what ran, when, and gc's state."""

    def __init__(self, name: str, groups: int, log: list) -> None:
        self.name, self.log = name, log
        self.groups = [[i] for i in range(groups)]
        self.timed: list[int] = []

    def warm_up(self, index: int = 0) -> None:
        self.log.append(("warm", self.name, index, gc.isenabled()))

    def run_group(self, index: int) -> None:
        self.log.append(("timed", self.name, index, gc.isenabled()))
        self.timed.append(index)

    def result(self) -> PolicyRun:
        return PolicyRun(self.timed, [], 0.0, 0.0)


def test_run_interleaved_schedule() -> None:
    log: list = []
    names = ["(full reference)", "full", "confidence:0.9", "adainfer", "raee"]
    rounds = 2 * len(names) * 2  # two whole designs (odd count: square and mirror)
    runners = {name: FakeRunner(name, rounds, log) for name in names}
    gc_was = gc.isenabled()
    runs = run_interleaved(runners)  # type: ignore[arg-type]
    assert gc.isenabled() == gc_was
    # warm-up: every runner once, on its first batch, before any timed run
    warm = log[: len(names)]
    assert [(kind, name, index) for kind, name, index, _ in warm] == [
        ("warm", name, 0) for name in names
    ]
    timed = log[len(names) :]
    assert all(kind == "timed" for kind, *_ in timed)
    assert len(timed) == rounds * len(names)
    # each runner's batches once each, in order, and its result from them
    for name in names:
        assert runs[name].predictions == list(range(rounds))
    # round i runs batch i of every runner; every runner in every position equally often
    places = Counter()
    for round_index in range(rounds):
        block = timed[round_index * len(names) : (round_index + 1) * len(names)]
        assert {index for _, _, index, _ in block} == {round_index}
        assert sorted(name for _, name, _, _ in block) == sorted(names)
        places.update((name, place) for place, (_, name, _, _) in enumerate(block))
    assert set(places.values()) == {rounds // len(names)}
    # the reference is not always first, nor `full` always right after it
    firsts = {timed[r * len(names)][1] for r in range(rounds)}
    assert firsts == set(names)
    # the garbage collector is paused in every timed run (and only there)
    if gc_was:
        assert all(enabled for *_, enabled in warm)
        assert not any(enabled for *_, enabled in timed)


def test_run_interleaved_unequal_groups_and_no_warm_up() -> None:
    log: list = []
    runners = {"a": FakeRunner("a", 3, log), "b": FakeRunner("b", 5, log)}
    runs = run_interleaved(runners, warm_up=False)  # type: ignore[arg-type]
    assert all(kind == "timed" for kind, *_ in log)
    assert runs["a"].predictions == [0, 1, 2]
    assert runs["b"].predictions == [0, 1, 2, 3, 4]


def test_collector_paused_restores_state() -> None:
    gc_was = gc.isenabled()
    try:
        gc.enable()
        with pytest.raises(RuntimeError), collector_paused():
            assert not gc.isenabled()
            raise RuntimeError
        assert gc.isenabled()
        gc.disable()
        with collector_paused():
            pass
        assert not gc.isenabled()  # left as found
    finally:
        (gc.enable if gc_was else gc.disable)()


def test_collector_frozen_hides_old_objects_for_the_run_only() -> None:
    """Objects from before the rounds are frozen (each round's collection skips them) and
    back in the collector's sight afterwards, also after an error."""
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), collector_frozen():
        assert gc.get_freeze_count() > 0
        raise RuntimeError
    assert gc.get_freeze_count() == 0


class FakeCache:
    def select_rows(self, keep: torch.Tensor) -> None:
        pass


class FakeEngine:
    """Just enough of a LayerEngine for PolicyRunner: each layer adds one to the hidden
    state, so the readout's logits depend on the depth reached."""

    num_layers = 4

    def __init__(self) -> None:
        self.encoded: list[list[str]] = []

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.encoded.append(texts)
        ids = torch.tensor([[int(t.split()[-1])] for t in texts])
        return ids, torch.zeros(len(texts), dtype=torch.long)

    def new_cache(self, batch: int, capacity: int, pad: torch.Tensor) -> FakeCache:
        return FakeCache()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids.float().unsqueeze(-1).expand(-1, -1, 2).clone()

    def run_layers(self, hidden: torch.Tensor, cache: FakeCache, start: int, end: int):  # noqa: ANN201
        return hidden + (end - start)


class FakeReadout:
    """Two candidates: the first for odd states, the second for even ones; confident."""

    def logits(self, hidden: torch.Tensor, layer: int, candidates: torch.Tensor) -> torch.Tensor:
        odd = hidden[:, 0] % 2
        return torch.stack([odd * 10, (1 - odd) * 10], dim=1)


class PlannedPolicy(FullPolicy):
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def plan(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.full((len(texts),), 2, dtype=torch.long)


def make_runner(policy, prompts: list[str], batch: int = 2) -> PolicyRunner:  # noqa: ANN001
    return PolicyRunner(
        FakeEngine(),  # type: ignore[arg-type]
        FakeReadout(),  # type: ignore[arg-type]
        prompts,
        torch.tensor([0, 1]),
        policy,
        batch,
        texts=prompts,
    )


@pytest.mark.parametrize("policy", [FullPolicy, lambda: ConfidencePolicy(0.5)])
def test_warm_up_is_untimed_and_unrecorded(policy) -> None:  # noqa: ANN001
    prompts = [f"prompt {i}" for i in range(5)]
    warmed, cold = make_runner(policy(), prompts), make_runner(policy(), prompts)
    warmed.warm_up()
    assert warmed.engine.encoded == [prompts[:2]]  # it ran the first group
    assert warmed.predictions == [-1] * 5
    assert warmed.exits == [4] * 5
    assert warmed.round_seconds == [] and warmed.seconds == 0.0 and warmed.deciding == 0.0
    for runner in (warmed, cold):
        for index in range(len(runner.groups)):
            runner.run_group(index)
    assert warmed.result().predictions == cold.result().predictions
    assert warmed.result().exit_layers == cold.result().exit_layers
    assert len(warmed.round_seconds) == len(warmed.groups) == 3


def test_planned_policy_plans_once_untimed_first() -> None:
    """A planning policy (RAEE) is asked once on the first batch's texts, untimed (a
    retrieval index built on first use, faiss imported), then on all of them, timed."""
    prompts = [f"prompt {i}" for i in range(5)]
    policy = PlannedPolicy()
    runner = make_runner(policy, prompts)
    assert policy.calls == [prompts[:2], prompts]
    runner.warm_up()
    assert runner.exits == [4] * 5
    for index in range(len(runner.groups)):
        runner.run_group(index)
    assert runner.exits == [2] * 5
