"""Tasks on the real evaluation data: splits, demonstrations, prompts, label tokens, custom files.

No model forward passes: only the smollm2-135m tokenizer is loaded.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from earlyexit.errors import EarlyExitError
from earlyexit.models.load import resolve_source
from earlyexit.tasks import TASKS, Example, Task, compute_metric, get_task, load_custom_task
from earlyexit.tasks.base import seeded_split

# (train, test) sizes; the seeded splits are part of the contract (reported numbers depend on them)
SIZES = {
    "sst2": (6920, 872),
    "sst2-test": (6917, 1821),
    "sst5": (8541, 2210),
    "mr": (8662, 2000),
    "subj": (8000, 2000),
    "trec": (5442, 500),
    "cola": (8533, 1043),
    "agnews": (400, 7200),
    "rte": (2490, 277),
    "boolq": (400, 2870),
    "mmlu": (280, 14042),
    "commonsenseqa": (200, 1021),
    "arc": (200, 3348),
    "arc-easy": (200, 2176),
    "arc-challenge": (200, 972),
    "piqa": (200, 1638),
}


@pytest.fixture(scope="module")
def tokenizer():
    _, directory, _ = resolve_source("smollm2-135m")
    return AutoTokenizer.from_pretrained(directory)


def test_every_task_has_a_size() -> None:
    assert set(SIZES) == set(TASKS)


@pytest.mark.parametrize("name", list(TASKS))
def test_builtin_task_loads(name: str) -> None:
    task = get_task(name)
    assert task.name == name
    train, test = task.train(), task.test()
    assert (len(train), len(test)) == SIZES[name]
    for ex in train + test:
        assert 0 <= ex.label < task.num_classes
        assert ex.text.strip()
        assert ex.choices is None  # every built-in task is scored by one label token
    # every class occurs in the test set, so accuracy is not trivially one-sided
    assert set(Counter(ex.label for ex in test)) == set(range(task.num_classes))
    assert all(word.startswith(" ") for word in task.label_words)
    # train and test never share a text (no demonstration leaks into the test set)
    assert not {ex.text for ex in train} & {ex.text for ex in test}


@pytest.mark.parametrize("name", list(TASKS))
def test_demonstrations_are_balanced_and_seeded(name: str) -> None:
    task = get_task(name)
    k = 2 * task.num_classes
    demos = task.demonstrations(k, seed=3)
    assert len(demos) == k
    assert Counter(ex.label for ex in demos) == {c: 2 for c in range(task.num_classes)}
    assert demos == task.demonstrations(k, seed=3)
    assert demos != task.demonstrations(k, seed=4)
    train = set(task.train())
    assert all(ex in train for ex in demos)
    # interleaved: no label repeats until every class has appeared once
    assert len({ex.label for ex in demos[: task.num_classes]}) == task.num_classes
    shuffled = task.demonstrations(k, seed=3, shuffle=True)
    assert sorted(shuffled, key=str) == sorted(demos, key=str) and shuffled != demos
    odd = task.demonstrations(task.num_classes + 1, seed=0)
    counts = Counter(ex.label for ex in odd)
    assert len(odd) == task.num_classes + 1 and max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize("name", list(TASKS))
def test_prompt_ends_at_the_label_slot(name: str) -> None:
    task = get_task(name)
    query = task.test()[0]
    demos = task.demonstrations(4, seed=0)
    prompt = task.prompt(query, demos)
    assert prompt.endswith(task.render(query))
    assert not prompt.endswith(task.label_words[query.label])
    assert prompt.rstrip() == prompt  # the label word (with its leading space) comes next
    for demo in demos:
        assert task.render(demo) + task.label_words[demo.label] + "\n\n" in prompt
    if task.instruction:
        assert prompt.startswith(task.instruction + "\n\n")
    assert task.prompt(query) == (task.instruction + "\n\n" if task.instruction else "") + (
        task.render(query)
    )


@pytest.mark.parametrize("name", list(TASKS))
@pytest.mark.weights  # the tokenizer comes from the model cache
def test_label_tokens_are_distinct(name: str, tokenizer) -> None:
    task = get_task(name)
    ids = task.label_token_ids(tokenizer)
    assert ids.shape == (task.num_classes,)
    assert len(set(ids.tolist())) == task.num_classes
    for word, tok in zip(task.label_words, ids.tolist(), strict=True):
        assert tokenizer(word, add_special_tokens=False)["input_ids"] == [tok]  # single tokens


def test_sst2_prompt_format() -> None:
    task = get_task("sst2")
    demo = Example("a gem .", 1)
    query = Example("one long string of cliches .", 0)
    assert task.prompt(query, [demo]) == (
        "Review: a gem .\nSentiment: positive\n\nReview: one long string of cliches .\nSentiment:"
    )
    assert task.test()[0] == query


@pytest.mark.parametrize("name", ["mr", "subj"])
def test_seeded_test_split_is_deterministic_and_disjoint(name: str) -> None:
    train, test = get_task(name).train(), get_task(name).test()
    assert test == get_task(name).test()
    assert not {ex.text for ex in train} & {ex.text for ex in test}
    # the source files are sorted by label; the seeded split must not be
    assert 0.4 < sum(ex.label for ex in test[:200]) / 200 < 0.6
    assert 0.45 < sum(ex.label for ex in test) / len(test) < 0.55


def test_seeded_split_helper() -> None:
    rows = tuple(Example(f"s{i}", i % 2) for i in range(50))
    held, rest = seeded_split(rows, 10, seed=7)
    assert (held, rest) == seeded_split(rows, 10, seed=7)
    assert held != seeded_split(rows, 10, seed=8)[0]
    assert len(held) == 10 and len(rest) == 40
    assert [int(ex.text[1:]) for ex in rest] == sorted(int(ex.text[1:]) for ex in rest)
    # a text duplicated across the two sides stays on the held side only
    for seed in range(20):
        held2, rest2 = seeded_split(rows + (Example("s0", 1),), 10, seed=seed)
        assert not {ex.text for ex in held2} & {ex.text for ex in rest2}
        assert len(held2) + len(rest2) == (50 if "s0" in {ex.text for ex in held2} else 51)


def test_parsing_details() -> None:
    # cp1252 files: 0x85 is an ellipsis, not a line break; SST's -lrb- is a parenthesis
    assert any("…" in ex.text for ex in get_task("mr").train() + get_task("mr").test())
    assert not any("-lrb-" in ex.text for ex in get_task("sst2").test())
    ag = get_task("agnews").test() + get_task("agnews").train()
    assert not any(s in ex.text for ex in ag for s in ("#39;", "quot;", "&lt;", "\\", "<"))
    boolq = get_task("boolq").test()
    assert max(len(ex.text) for ex in boolq) < 1000
    csqa = get_task("commonsenseqa").test() + get_task("commonsenseqa").train()
    assert all(ex.text.count("\n") == 5 for ex in csqa)  # question + A..E
    first = get_task("mmlu").test()[0]
    # abstract_algebra test item 1 (SOURCE.txt: answer B -> 1); dev item 1 is "Find all c in Z_3"
    assert first.label == 1 and first.text.startswith("Question: Find the degree for the given")
    assert get_task("mmlu").train()[0].text.startswith("Question: Find all c in Z_3")
    arc = get_task("arc-easy").test()[0]
    assert arc.text.startswith("Question: ") and not arc.text.startswith("Question: Question:")


@pytest.mark.weights
def test_label_token_clash_is_refused(tokenizer) -> None:
    task = Task(
        name="clash",
        label_words=[" unbelievable", " unbelievably", " fine"],
        template="{text}:",
        train=list,
        test=list,
    )
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in task.label_words[:2]]
    assert ids[0][0] == ids[1][0] and ids[0] != ids[1]  # premise: shared first token
    with pytest.raises(EarlyExitError, match="'clash'.*unbelievable.*unbelievably.*single-token"):
        task.label_token_ids(tokenizer)


def test_unknown_task_lists_the_names() -> None:
    with pytest.raises(EarlyExitError, match="unknown task 'sst3'.*sst2.*piqa"):
        get_task("sst3")


def test_bad_task_definitions() -> None:
    with pytest.raises(EarlyExitError, match="no \\{text\\} slot"):
        Task("t", [" a", " b"], "Review:", train=list, test=list)
    with pytest.raises(EarlyExitError, match="repeated label words"):
        Task("t", [" a", " a"], "{text}", train=list, test=list)
    task = get_task("sst2")
    with pytest.raises(EarlyExitError, match="unknown split 'dev'"):
        task.examples("dev")
    with pytest.raises(EarlyExitError, match="at most"):
        get_task("mmlu").demonstrations(1000)
    assert task.examples("test", limit=5) == task.test()[:5]
    assert task.demonstrations(0) == []


def test_test_sample_is_seeded_or_file_order() -> None:
    """`seeded` draws a fair random sample (a label-sorted file's first rows are one class),
    reproducible per seed, each example with its file row; `first` is the file's prefix."""
    rows = [Example(f"text {i}", int(i >= 50)) for i in range(100)]  # sorted by label
    task = Task("sorted", [" a", " b"], "{text}", train=list, test=lambda: rows)
    first = task.test_sample(20, how="first")
    assert [ex.row for ex in first] == list(range(20)) and {ex.label for ex in first} == {0}
    drawn = task.test_sample(20, seed=0)
    assert {ex.label for ex in drawn} == {0, 1} and len({ex.row for ex in drawn}) == 20
    assert all(rows[ex.row].text == ex.text for ex in drawn)
    assert task.test_sample(20, seed=0) == drawn != task.test_sample(20, seed=1)
    assert task.test_sample(10, seed=0) == drawn[:10]  # a prefix of the draw
    sst2 = get_task("sst2")
    sample = sst2.test_sample(50, seed=3)
    assert all(sst2.test()[ex.row].text == ex.text for ex in sample)
    assert [ex.text for ex in sst2.test_sample(5, how="first")] == [
        ex.text for ex in sst2.test()[:5]
    ]
    with pytest.raises(EarlyExitError, match="unknown sample 'last'"):
        task.test_sample(5, how="last")


def test_metrics() -> None:
    assert compute_metric("accuracy", [0, 1, 1, 0], [0, 1, 0, 0]) == 0.75
    assert compute_metric("mcc", [0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert compute_metric("mcc", [1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert compute_metric("mcc", [0, 1, 1, 0], [0, 1, 0, 1]) == pytest.approx(0.0)
    assert compute_metric("macro_f1", [0, 0, 1], [0, 1, 1]) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert get_task("cola").metric == "mcc"
    with pytest.raises(EarlyExitError, match="unknown metric"):
        compute_metric("bleu", [0], [0])


def test_metrics_match_the_hand_formulas() -> None:
    """The sklearn-backed metrics give the values of the former hand-written ones."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sklearn shape or zero-division warnings either
        # multi-class MCC (Gorodkin): c=4, n=6, all counts 2 -> (24 - 12) / sqrt(24 * 24)
        assert compute_metric("mcc", [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 2, 0]) == pytest.approx(0.5)
        # a constant prediction, or one class on both sides: 0
        assert compute_metric("mcc", [2, 2, 2], [0, 1, 2]) == 0.0
        assert compute_metric("mcc", [1, 1, 1], [1, 1, 1]) == 0.0
        # macro F1 averages over the classes in the labels: class 2, predicted only, is left out
        assert compute_metric("macro_f1", [0, 1, 2, 2], [0, 1, 1, 1]) == pytest.approx(0.75)
        # a labelled class never predicted counts 0
        assert compute_metric("macro_f1", [0, 0, 0], [0, 1, 2]) == pytest.approx(0.5 / 3)
        assert compute_metric("accuracy", [3, 3], [3, 3]) == 1.0
    for name in ("accuracy", "mcc", "macro_f1"):
        with pytest.raises(EarlyExitError, match="as many predictions as labels") as caught:
            compute_metric(name, [0, 1], [0])
        assert "\n" not in str(caught.value)
        with pytest.raises(EarlyExitError, match="got 0 and 0"):
            compute_metric(name, [], [])


# ---------------------------------------------------------------- custom datasets

ROWS = [
    (f"review number {i} {'great' if i % 2 else 'awful'}", "pos" if i % 2 else "neg")
    for i in range(20)
]
WORDS = {"neg": "negative", "pos": " positive"}


def _write_csv(path: Path, sep: str = ",") -> Path:
    lines = [f"id{sep}review{sep}sentiment"]
    lines += [f"{i}{sep}{text}{sep}{label}" for i, (text, label) in enumerate(ROWS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"review": t, "sentiment": lab}) + "\n" for t, lab in ROWS),
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
@pytest.mark.weights
def test_custom_round_trip(tmp_path: Path, fmt: str, tokenizer) -> None:
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "reviews.jsonl")
    else:
        path = _write_csv(tmp_path / f"reviews.{fmt}", "\t" if fmt == "tsv" else ",")
    task = load_custom_task(path, "review", "sentiment", WORDS, template="Text: {text}\nMood:")
    assert task.name == "reviews"
    assert task.label_words == [" negative", " positive"]
    train, test = task.train(), task.test()
    assert (len(train), len(test)) == (4, 16)
    seen = {(ex.text, ex.label) for ex in train + test}
    assert seen == {(t, int(lab == "pos")) for t, lab in ROWS}
    assert not {ex.text for ex in train} & {ex.text for ex in test}
    assert train == load_custom_task(path, "review", "sentiment", WORDS).train()  # seeded
    demos = task.demonstrations(4, seed=0)
    assert len(demos) == 4 and {ex.label for ex in demos} == {ex.label for ex in train}
    assert task.prompt(test[0], demos).endswith(f"Text: {test[0].text}\nMood:")
    assert task.label_token_ids(tokenizer).shape == (2,)


def test_custom_label_map_files_and_options(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "".join(json.dumps({"t": f"x{i}", "y": i % 3}) + "\n" for i in range(30)), encoding="utf-8"
    )
    yaml_map = tmp_path / "labels.yaml"
    yaml_map.write_text("0: bad\n1: okay\n2: good\n", encoding="utf-8")
    json_map = tmp_path / "labels.json"
    json_map.write_text('{"0": "bad", "1": "okay", "2": "good"}', encoding="utf-8")
    for spec in (str(yaml_map), str(json_map), json_map):
        task = load_custom_task(path, "t", "y", spec, name="three", demo_pool=6, seed=1)
        assert task.name == "three" and task.label_words == [" bad", " okay", " good"]
        assert len(task.train()) == 6 and len(task.test()) == 24
        assert task.template == "Input: {text}\nLabel:"
    assert [ex.label for ex in task.test()] == [int(ex.text[1:]) % 3 for ex in task.test()]


def test_custom_csv_with_quoted_fields(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_text('text,label\n"hello, world",a\n"two\nlines",b\n"x",a\n', encoding="utf-8")
    task = load_custom_task(path, "text", "label", {"a": "yes", "b": "no"}, demo_pool=0)
    texts = {ex.row: ex.text for ex in task.test()}
    assert texts == {0: "hello, world", 1: "two lines", 2: "x"}


def test_custom_test_order_is_a_fair_seeded_sample(tmp_path: Path) -> None:
    """A file sorted by label: the first 20 test rows hold both classes (file order would
    give one), the order is the seed's, and every example knows its data row."""
    path = tmp_path / "sorted.jsonl"
    rows = [{"t": f"neg {i}", "y": 0} for i in range(100)] + [
        {"t": f"pos {i}", "y": 1} for i in range(100)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    words = {"0": "negative", "1": "positive"}
    task = load_custom_task(path, "t", "y", words, demo_pool=20, seed=3)
    first = task.examples("test", 20)
    assert 5 <= sum(ex.label for ex in first) <= 15
    assert all(rows[ex.row]["t"] == ex.text for ex in task.test())
    again = load_custom_task(path, "t", "y", words, demo_pool=20, seed=3).examples("test", 20)
    other = load_custom_task(path, "t", "y", words, demo_pool=20, seed=4).examples("test", 20)
    assert again == first and other != first


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.csv", None, "does not exist"),
        ("data.xlsx", "x", "unsupported dataset file type '.xlsx'.*\\.csv"),
        ("bad.jsonl", '{"review": "ok", "sentiment": "pos"}\n{"review": oops}\n', "line 2.*JSON"),
        ("list.jsonl", '["review", "pos"]\n', "line 1 is not a JSON object"),
        ("cols.csv", "text,label\nfine,pos\n", "no column 'review'.*columns present: text, label"),
        (
            "unk.csv",
            "review,sentiment\nfine,pos\nmeh,neutral\n",
            "line 3: label 'neutral' is not in the label map",
        ),
        ("empty.csv", "", "holds no examples"),
        ("header.csv", "review,sentiment\n", "holds no examples"),
        ("empty.jsonl", "\n\n", "holds no examples"),
        ("ragged.csv", "review,sentiment\nfine,pos,extra\n", "line 2 has 3 fields"),
        ("quote.csv", 'review,sentiment\n"bad "quote" here",pos\n', "malformed CSV"),
    ],
)
def test_custom_errors(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(EarlyExitError, match=message) as info:
        load_custom_task(path, "review", "sentiment", WORDS)
    assert "\n" not in str(info.value)


def test_custom_label_map_errors(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv")
    with pytest.raises(EarlyExitError, match="label map file .* does not exist"):
        load_custom_task(path, "review", "sentiment", str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("neg: [unclosed\n", encoding="utf-8")
    with pytest.raises(EarlyExitError, match="not valid YAML"):
        load_custom_task(path, "review", "sentiment", str(bad))
    listed = tmp_path / "list.json"
    listed.write_text('["negative", "positive"]', encoding="utf-8")
    with pytest.raises(EarlyExitError, match="must map each label to a word"):
        load_custom_task(path, "review", "sentiment", str(listed))
    with pytest.raises(EarlyExitError, match="repeated label words"):
        load_custom_task(path, "review", "sentiment", {"neg": "bad", "pos": " bad"})
    with pytest.raises(EarlyExitError, match="no \\{text\\} slot"):
        load_custom_task(path, "review", "sentiment", WORDS, template="Review:")
    with pytest.raises(EarlyExitError, match="leaves no test examples"):
        load_custom_task(path, "review", "sentiment", WORDS, demo_pool=20)
