"""Built-in tasks over the evaluation data folder (see each folder's SOURCE.txt).

Splits follow LM-BFF where it fixes them (SST-2/CoLA/RTE: dev is the test set; SST-5, TREC:
the official test; MR, SUBJ: a random 2000-example test set). Sets that ship only an
evaluation split (AG News, BoolQ, CommonsenseQA, ARC, PIQA) give up a seeded pool of a few
hundred examples for demonstrations, so no test item is ever shown as a demonstration.
Files are parsed once per path and cached; the loaders return fresh lists.
"""

from __future__ import annotations

import csv
import html
import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from earlyexit.errors import EarlyExitError
from earlyexit.paths import data_file
from earlyexit.tasks.base import LETTERS, Example, Task, lettered, seeded_split, truncate

SEED = 0
MR_SUBJ_TEST = 2000  # LM-BFF's random test size for MR and SUBJ
PASSAGE_CHARS = 800  # BoolQ passages / RTE premises: keep few-shot prompts short
MC_INSTRUCTION = "The following are multiple choice questions (with answers)."
MC_TEMPLATE = "{text}\nAnswer:"


# ---------------------------------------------------------------- readers (cached per path)


def _read_text(path: Path) -> str:
    """UTF-8, else Windows-1252: MR, SUBJ and TREC train are cp1252 (é, ½, and 0x85 '…',
    which Latin-1 would turn into a line break under str.splitlines)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def clean_ptb(text: str) -> str:
    # SST keeps PTB bracket tokens; the model has seen parentheses, not "-lrb-"
    return (
        text.replace("-lrb-", "(").replace("-rrb-", ")").replace("-LRB-", "(").replace("-RRB-", ")")
    )


@cache
def _label_lines(path: Path, num_classes: int) -> tuple[Example, ...]:
    """'<label> <sentence>' lines (SST, MR, SUBJ, TREC)."""
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        head, _, text = line.partition(" ")
        if not head.isdigit() or not text.strip() or int(head) >= num_classes:
            raise EarlyExitError(
                f"{path} line {lineno} is not '<label> <sentence>'; check the file"
            )
        rows.append(Example(clean_ptb(" ".join(text.split())), int(head)))
    return tuple(rows)


@cache
def _jsonl(path: Path) -> tuple[dict[str, Any], ...]:
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise EarlyExitError(
                    f"{path} line {lineno} is not valid JSON ({err.msg})"
                ) from None
    return tuple(rows)


def _field(row: dict[str, Any], key: str, path: Path) -> Any:
    if key not in row:
        raise EarlyExitError(f"{path}: a row has no '{key}' field; check the file")
    return row[key]


def _data(*parts: str) -> Path:
    return data_file(*parts).resolve()


def _disjoint(
    train: Callable[[], list[Example]], test: Callable[[], list[Example]]
) -> Callable[[], list[Example]]:
    """Official train splits repeat a few test texts (SST, TREC, CoLA, MMLU); leave those out
    of the demonstration pool so no test item is ever shown with its label."""

    def load() -> list[Example]:
        seen = {ex.text for ex in test()}
        return [ex for ex in train() if ex.text not in seen]

    return load


def _split(examples: tuple[Example, ...], n_held: int) -> tuple[list[Example], list[Example]]:
    return seeded_split(examples, n_held, SEED)


# ---------------------------------------------------------------- single-sentence tasks


def _sst(folder: str, stem: str, num_classes: int, split: str) -> Callable[[], list[Example]]:
    return lambda: list(_label_lines(_data(folder, f"{stem}.{split}"), num_classes))


def _sst2(test_split: str) -> Task:
    return Task(
        name="sst2" if test_split == "dev" else f"sst2-{test_split}",
        label_words=[" negative", " positive"],
        template="Review: {text}\nSentiment:",
        train=_disjoint(
            _sst("sst2", "stsa.binary", 2, "train"), _sst("sst2", "stsa.binary", 2, test_split)
        ),
        test=_sst("sst2", "stsa.binary", 2, test_split),
    )


def sst5() -> Task:
    return Task(
        name="sst5",
        label_words=[" terrible", " bad", " okay", " good", " great"],
        template="Review: {text}\nSentiment:",
        train=_disjoint(
            _sst("sst5", "stsa.fine", 5, "train"), _sst("sst5", "stsa.fine", 5, "test")
        ),
        test=_sst("sst5", "stsa.fine", 5, "test"),
    )


@cache
def _held_test(folder: str, name: str) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(train, test) for a file without an official split: a seeded 2000-example test set."""
    test, train = _split(_label_lines(_data(folder, name), 2), MR_SUBJ_TEST)
    return tuple(train), tuple(test)


def mr() -> Task:
    return Task(
        name="mr",
        label_words=[" negative", " positive"],
        template="Review: {text}\nSentiment:",
        train=lambda: list(_held_test("mr", "rt-polarity.all")[0]),
        test=lambda: list(_held_test("mr", "rt-polarity.all")[1]),
    )


def subj() -> Task:
    return Task(
        name="subj",
        label_words=[" subjective", " objective"],
        template="Sentence: {text}\nThis sentence is",
        train=lambda: list(_held_test("subj", "subj.all")[0]),
        test=lambda: list(_held_test("subj", "subj.all")[1]),
    )


def _trec(split: str) -> Callable[[], list[Example]]:
    return lambda: list(_label_lines(_data("trec", f"TREC.{split}.all"), 6))


def trec() -> Task:
    # TREC.*.all label ids (SOURCE.txt): 0=DESC 1=ENTY 2=ABBR 3=HUM 4=LOC 5=NUM
    return Task(
        name="trec",
        label_words=[" description", " entity", " abbreviation", " person", " location", " number"],
        template="Question: {text}\nAnswer type:",
        train=_disjoint(_trec("train"), _trec("test")),
        test=_trec("test"),
    )


@cache
def _cola(path: Path) -> tuple[Example, ...]:
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 4 or cols[1] not in ("0", "1"):
            raise EarlyExitError(f"{path} line {lineno} is not CoLA's 4-column TSV; check the file")
        rows.append(Example(" ".join(cols[3].split()), int(cols[1])))
    return tuple(rows)


def cola() -> Task:
    def test() -> list[Example]:
        # GLUE's CoLA dev = in-domain dev followed by out-of-domain dev (1043)
        return list(_cola(_data("cola", "in_domain_dev.tsv"))) + list(
            _cola(_data("cola", "out_of_domain_dev.tsv"))
        )

    return Task(
        name="cola",
        label_words=[" no", " yes"],
        template="Sentence: {text}\nGrammatical:",
        train=_disjoint(lambda: list(_cola(_data("cola", "in_domain_train.tsv"))), test),
        test=test,
        metric="mcc",
    )


def _agnews_clean(text: str) -> str:
    # The char-CNN CSV lost the '&' of entities ("#39;", "quot;"), uses '\' for line breaks,
    # and keeps Reuters ticker/link markup ("&lt;TXN.N&gt;", "&lt;A HREF=...&gt;").
    text = re.sub(r"(?<!&)#(\d+);", r"&#\1;", text)
    text = re.sub(r"(?<![&\w])(quot|amp|lt|gt);", r"&\1;", text)
    text = html.unescape(text).replace("\\", " ")
    text = re.sub(r"<[^>]*>|<[^>]*$", " ", text)
    return " ".join(text.split())


@cache
def _agnews(path: Path) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    examples = []
    for row in rows:
        title = _agnews_clean(row["Title"])
        body = _agnews_clean(row["Description"])
        sep = " " if title.endswith((".", "!", "?")) else ". "
        examples.append(
            Example(truncate(title + sep + body, PASSAGE_CHARS), int(row["Class Index"]) - 1)
        )
    pool, test = _split(tuple(examples), 400)
    return tuple(pool), tuple(test)


def agnews() -> Task:
    # classes.txt: 1-World, 2-Sports, 3-Business, 4-Science/Tech (shifted to 0..3)
    return Task(
        name="agnews",
        label_words=[" World", " Sports", " Business", " Technology"],
        template="Article: {text}\nTopic:",
        train=lambda: list(_agnews(_data("agnews", "test.csv"))[0]),
        test=lambda: list(_agnews(_data("agnews", "test.csv"))[1]),
    )


# ---------------------------------------------------------------- sentence-pair tasks

RTE_LABELS = {"entailment": 0, "not_entailment": 1}


@cache
def _rte(path: Path) -> tuple[Example, ...]:
    rows = []
    for row in _jsonl(path):
        premise = truncate(_field(row, "premise", path), PASSAGE_CHARS)
        hypothesis = " ".join(_field(row, "hypothesis", path).split())
        text = f"{premise}\nQuestion: {hypothesis} True or False?"
        rows.append(Example(text, RTE_LABELS[_field(row, "label", path)]))
    return tuple(rows)


def rte() -> Task:
    test = lambda: list(_rte(_data("rte", "val.jsonl")))  # noqa: E731
    return Task(
        name="rte",
        label_words=[" True", " False"],
        template="{text}\nAnswer:",
        train=_disjoint(lambda: list(_rte(_data("rte", "train.jsonl"))), test),
        test=test,
    )


@cache
def _boolq(path: Path) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    examples = []
    for row in _jsonl(path):
        passage = _field(row, "passage", path).replace("``", '"').replace("''", '"')
        passage = truncate(passage, PASSAGE_CHARS)
        question = " ".join(_field(row, "question", path).split()).rstrip("?")
        answer = str(_field(row, "answer", path))
        if answer not in ("True", "False"):
            raise EarlyExitError(f"{path}: BoolQ answer {answer!r} is not True/False")
        examples.append(Example(f"{passage}\nQuestion: {question}?", int(answer == "True")))
    pool, test = _split(tuple(examples), 400)
    return tuple(pool), tuple(test)


def boolq() -> Task:
    return Task(
        name="boolq",
        label_words=[" no", " yes"],
        template="{text}\nAnswer:",
        train=lambda: list(_boolq(_data("boolq", "dev.jsonl"))[0]),
        test=lambda: list(_boolq(_data("boolq", "dev.jsonl"))[1]),
    )


# ---------------------------------------------------------------- multiple choice (by letter)


def _mc_task(
    name: str, n_choices: int, train: Callable[[], list[Example]], test: Callable[[], list[Example]]
) -> Task:
    return Task(
        name=name,
        label_words=[f" {c}" for c in LETTERS[:n_choices]],
        template=MC_TEMPLATE,
        instruction=MC_INSTRUCTION,
        train=train,
        test=test,
    )


@cache
def _mmlu(folder: Path) -> tuple[Example, ...]:
    rows = []
    for path in sorted(folder.glob("*.csv")):
        with path.open(encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh):
                choices = [row[f"choice{i}"] for i in range(4)]
                rows.append(Example(lettered(row["question"], choices), int(row["answer"])))
    if not rows:
        raise EarlyExitError(f"no MMLU CSVs in {folder}; check EARLYEXIT_DATA")
    return tuple(rows)


def mmlu() -> Task:
    # dev/ holds the standard 5 few-shot exemplars per subject (285); test/ 14042 questions
    test = lambda: list(_mmlu(_data("mmlu", "test")))  # noqa: E731
    return _mc_task(
        "mmlu",
        4,
        train=_disjoint(lambda: list(_mmlu(_data("mmlu", "dev"))), test),
        test=test,
    )


@cache
def _commonsenseqa(path: Path) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    examples = []
    for row in _jsonl(path):
        # options are '\nA. ..\nE. ..'; one item has A/B inside its question, and 12 items
        # carry the question's '?' at the end of option E: parse the two fields together.
        full = _field(row, "question", path) + _field(row, "options", path)
        question, *opts = re.split(r"\n(?=[A-E]\. )", full)
        choices = [opt[3:].strip() for opt in opts]
        if [opt[0] for opt in opts] != list(LETTERS[:5]):
            raise EarlyExitError(f"{path}: a CommonsenseQA item does not list options A-E")
        if choices[-1].endswith("?") and not question.rstrip().endswith("?"):
            choices[-1] = choices[-1][:-1].rstrip()
            question = question.rstrip() + "?"
        label = LETTERS.index(_field(row, "answer", path)[0])
        examples.append(Example(lettered(question, choices), label))
    pool, test = _split(tuple(examples), 200)
    return tuple(pool), tuple(test)


def commonsenseqa() -> Task:
    data = lambda: _commonsenseqa(_data("commonsenseqa", "validation.jsonl"))  # noqa: E731
    return _mc_task("commonsenseqa", 5, train=lambda: list(data()[0]), test=lambda: list(data()[1]))


@cache
def _gauntlet(
    paths: tuple[Path, ...], n_pool: int
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """MosaicML gauntlet JSONL {query: 'Question: ...', choices, gold}; split off a pool."""
    examples = []
    for path in paths:
        for row in _jsonl(path):
            query = _field(row, "query", path).strip()
            query = query.removeprefix("Question:").strip()
            choices = _field(row, "choices", path)
            examples.append(Example(lettered(query, choices), int(_field(row, "gold", path))))
    pool, test = _split(tuple(examples), n_pool)
    return tuple(pool), tuple(test)


def _arc(name: str, files: tuple[str, ...]) -> Task:
    data = lambda: _gauntlet(tuple(_data("arc", f) for f in files), 200)  # noqa: E731
    return _mc_task(name, 4, train=lambda: list(data()[0]), test=lambda: list(data()[1]))


def piqa() -> Task:
    data = lambda: _gauntlet((_data("piqa", "piqa_validation.jsonl"),), 200)  # noqa: E731
    return _mc_task("piqa", 2, train=lambda: list(data()[0]), test=lambda: list(data()[1]))


# ---------------------------------------------------------------- registry

TASKS: dict[str, Callable[[], Task]] = {
    "sst2": lambda: _sst2("dev"),
    "sst2-test": lambda: _sst2("test"),
    "sst5": sst5,
    "mr": mr,
    "subj": subj,
    "trec": trec,
    "cola": cola,
    "agnews": agnews,
    "rte": rte,
    "boolq": boolq,
    "mmlu": mmlu,
    "commonsenseqa": commonsenseqa,
    "arc": lambda: _arc("arc", ("arc_easy.jsonl", "arc_challenge.jsonl")),
    "arc-easy": lambda: _arc("arc-easy", ("arc_easy.jsonl",)),
    "arc-challenge": lambda: _arc("arc-challenge", ("arc_challenge.jsonl",)),
    "piqa": piqa,
}


def get_task(name: str) -> Task:
    """A built-in task by name (data is read only when its examples are asked for)."""
    if name not in TASKS:
        raise EarlyExitError(f"unknown task '{name}': use one of {', '.join(TASKS)}")
    return TASKS[name]()
