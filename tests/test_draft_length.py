"""Draft lengths follow the machine's verify-pass costs; the costs are measured once per
machine and model and then read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from earlyexit.decoding.draft_length import (
    MAX_DRAFT,
    draft_lengths,
    measure_pass_costs,
    measure_row_pass_costs,
)
from earlyexit.decoding.drafters import NgramDrafter
from earlyexit.decoding.sampling import Sampler
from earlyexit.engine import LayerEngine


def test_draft_lengths_follow_the_cost_of_extra_rows() -> None:
    rows = range(1, MAX_DRAFT + 2)
    # extra rows free (bandwidth-bound, as measured on an AMD EPYC): draft as much as allowed
    assert draft_lengths({n: 1.0 for n in rows}) == {1: MAX_DRAFT, 2: MAX_DRAFT, 3: MAX_DRAFT}
    # every row costs a full token: no draft can pay
    assert draft_lengths({n: float(n) for n in rows}) == {1: 0, 2: 0, 3: 0}
    # measured on an Intel Xeon (fp32, 2 threads): 3 rows cheap, 4+ dear
    xeon = dict(zip(rows, (1.0, 1.16, 1.23, 1.67, 1.89, 2.0, 2.19, 2.3), strict=True))
    lengths = draft_lengths(xeon)
    assert lengths[1] <= lengths[2] <= lengths[3] and lengths[1] == 2 and lengths[3] > 2


def test_ngram_drafter_drafts_the_length_chosen_for_its_match() -> None:
    drafter = NgramDrafter(max_tokens=MAX_DRAFT, lengths={1: 0, 2: 1, 3: 3})
    drafter.start([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])  # 3-gram match: 3 drafts
    assert drafter.propose(None, None, 100, Sampler()).tokens == [4, 5, 6]  # type: ignore[arg-type]
    drafter.accept([9])  # (2, 3, 9) unseen; (3, 9) unseen; (9,) seen before 1: no draft
    assert drafter.propose(None, None, 100, Sampler()).tokens == []  # type: ignore[arg-type]
    drafter.accept([7, 8])  # (9, 7, 8) unseen, (7, 8) seen: 1 draft
    assert drafter.propose(None, None, 100, Sampler()).tokens == [9]  # type: ignore[arg-type]


def test_a_request_that_does_not_copy_stops_drafting() -> None:
    """With measured costs, the count drafted follows the request's own record: a 3-gram
    match and rows at 0.2 of a pass each draft; after drafts that never stand, none (the
    held-out summaries where drafting ran at 0.85x of `full`)."""
    costs = {n: 1.0 + 0.2 * (n - 1) for n in range(1, MAX_DRAFT + 2)}
    drafter = NgramDrafter(max_tokens=MAX_DRAFT, costs=costs)
    drafter.start([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3])
    assert len(drafter.propose(None, None, 100, Sampler()).tokens) >= 1  # type: ignore[arg-type]
    drafted = 0
    while drafter.propose(None, None, 100, Sampler()).tokens:  # type: ignore[arg-type]
        drafted += 1
        drafter.accept([100 + drafted])  # the model says something new: no draft stands
        drafter.index.extend([1, 2, 3])  # and the 3-gram matches again
        assert drafted < 20, "still drafting after 20 rejected passes"
    assert drafted >= 3 and drafter.record.scale < 0.3


def test_pass_costs_are_measured_once_then_read_back(
    smol: LayerEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    costs = measure_pass_costs(smol, rounds=1)
    assert sorted(costs) == list(range(1, MAX_DRAFT + 2)) and all(c > 0 for c in costs.values())
    assert len(list((tmp_path / "kernels").glob("passes-*.json"))) == 1
    assert measure_pass_costs(smol, rounds=1) == costs  # the cached timings, not new ones


def test_pass_costs_are_kept_per_weights_and_compiled_steps(
    smol: LayerEngine, smol_int4: LayerEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 weights share the fp32 model's fingerprint, and compiled passes scale otherwise
    than eager ones: each path is timed for itself, never read from another's record."""
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    measure_pass_costs(smol, rounds=1)
    measure_pass_costs(smol_int4, rounds=1)
    smol_int4.set_compiled("on")
    try:
        measure_pass_costs(smol_int4, rounds=1)
    finally:
        smol_int4.set_compiled("off")
    assert len(list((tmp_path / "kernels").glob("passes-*.json"))) == 3


def test_row_pass_costs_are_timed_per_batch_size_when_first_needed(
    smol_int4: LayerEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single user's first lossless request times batch 1's passes only; a look-up
    between measured sizes times the two around it; each size is cached for itself and
    read back; a server times every size before it serves (`measure_all`)."""
    monkeypatch.setenv("EARLYEXIT_HOME", str(tmp_path))
    costs = measure_row_pass_costs(smol_int4, 8, rounds=1)
    assert costs.sizes == (1, 2, 4, 8) and costs.seconds == {}
    assert costs.at(1, 3) > 0 and sorted(costs.seconds) == [1]
    assert len(list((tmp_path / "kernels").glob("row-passes-*.json"))) == 1
    between = costs.at(3, 2)
    assert sorted(costs.seconds) == [1, 2, 4]
    assert min(costs.at(2, 2), costs.at(4, 2)) <= between <= max(costs.at(2, 2), costs.at(4, 2))
    again = measure_row_pass_costs(smol_int4, 8, rounds=1)
    assert again.seconds == costs.seconds  # the cached timings, not new ones
    again.measure_all()
    assert sorted(again.seconds) == [1, 2, 4, 8]
    assert len(list((tmp_path / "kernels").glob("row-passes-*.json"))) == 4
