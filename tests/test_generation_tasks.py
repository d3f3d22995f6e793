"""Generation tasks read the shared data; metrics match hand-computed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from earlyexit.errors import EarlyExitError
from earlyexit.tasks.gen_metrics import bleu, rouge, squad, task_scores, token_agreement
from earlyexit.tasks.generation import (
    GENERATION_TASKS,
    get_generation_task,
    render_prompt,
    self_distill_instructions,
)


@pytest.mark.parametrize(
    ("name", "size"), [("samsum", 819), ("xsum", 1000), ("squad", 10570), ("iwslt-en-de", 1138)]
)
def test_generation_tasks_load(name: str, size: int) -> None:
    items = GENERATION_TASKS[name].items()
    assert len(items) == size
    assert all(item.instruction.strip() and item.references for item in items[:50])


def test_self_distill_instructions_avoid_evaluation_items() -> None:
    prompts = self_distill_instructions(40)
    assert len(prompts) == 40
    evaluated = {item.instruction for task in GENERATION_TASKS.values() for item in task.items(100)}
    assert not evaluated & set(prompts)


def test_chat_template_is_used(smol) -> None:  # noqa: ANN001 - the engine fixture
    prompt = render_prompt(smol.tokenizer, "Say hi.")
    assert "Say hi." in prompt and prompt.rstrip().endswith("assistant")
    with pytest.raises(EarlyExitError, match="unknown generation task 'poetry'"):
        get_generation_task("poetry")


def test_metrics_by_hand() -> None:
    assert squad(["The Eiffel tower!"], [("eiffel tower", "Paris")]) == {"em": 1.0, "f1": 1.0}
    half = squad(["red car"], [("red bus",)])
    assert half["em"] == 0 and half["f1"] == pytest.approx(0.5)
    assert rouge(["a cat sat"], [("a cat sat",)])["rougeL"] == pytest.approx(1.0)
    assert bleu(["das ist ein kleiner Test ."], [("das ist ein kleiner Test .",)])["bleu"] == (
        pytest.approx(100.0)
    )
    assert set(task_scores("rougeL", ["x"], [("y",)])) == {"rouge1", "rouge2", "rougeL"}
    assert token_agreement([[1, 2, 3], [4]], [[1, 2, 4], [4, 5]]) == pytest.approx(3 / 5)


def test_generation_sweep_plot(tmp_path: Path) -> None:
    from earlyexit.evaluation.plots import plot_generation_sweep

    records = [
        {"method": m, "speedup": s, "quality": q, "full_quality": 0.3, "metric": "rougeL"}
        for m, s, q in [("full", 1.0, 0.3), ("free:0.5", 1.4, 0.28), ("calm:0.5", 1.5, 0.2)]
    ]
    png = plot_generation_sweep(records, "t", tmp_path / "g.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


# ---- a user's own generation file -----------------------------------------------------


def _qa_file(tmp_path, rows):  # noqa: ANN001, ANN202
    import json

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_generation_file_items_are_a_seeded_sample(tmp_path) -> None:  # noqa: ANN001
    from earlyexit.tasks.generation import load_generation_file

    rows = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(30)]
    rows[5]["a"] = ["answer 5", "five"]  # several references as a JSON list
    path = _qa_file(tmp_path, rows)
    task = load_generation_file(path, "q", "a", "Answer briefly: {prompt}", "exact", 16, seed=1)
    items = task.items()
    assert task.name == "qa" and task.metric == "em" and task.max_new_tokens == 16
    assert sorted(item.row for item in items) == list(range(30))
    assert [item.row for item in items[:10]] != list(range(10))  # not file order
    for item in items:
        assert item.instruction == f"Answer briefly: question {item.row}"
    assert next(i for i in items if i.row == 5).references == ("answer 5", "five")
    again = load_generation_file(path, "q", "a", "Answer briefly: {prompt}", "exact", 16, seed=1)
    assert [i.row for i in again.items(10)] == [i.row for i in task.items(10)]


@pytest.mark.parametrize(
    ("rows", "args", "message"),
    [
        ([{"q": "x", "a": "y"}], ("q", "answer"), "no field 'answer'.*fields present: q, a"),
        ([{"q": " ", "a": "y"}], ("q", "a"), "'q' is empty"),
        ([{"q": "x", "a": []}], ("q", "a"), "'a' needs a non-empty string"),
        ([{"q": "x", "a": "y"}], ("q", "a", "{prompt}", "meteor"), "unknown metric 'meteor'"),
        ([{"q": "x", "a": "y"}], ("q", "a", "Summarize:"), "must contain \\{prompt\\}"),
        ([], ("q", "a"), "holds no rows"),
    ],
)
def test_generation_file_errors(tmp_path, rows, args, message) -> None:  # noqa: ANN001
    from earlyexit.errors import EarlyExitError
    from earlyexit.tasks.generation import load_generation_file

    path = _qa_file(tmp_path, rows)
    with pytest.raises(EarlyExitError, match=message) as info:
        load_generation_file(path, *args)
    assert "\n" not in str(info.value)
