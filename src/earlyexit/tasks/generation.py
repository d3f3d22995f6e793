"""Generation tasks over the evaluation data folder: summarization, QA, translation.

Each item is an instruction for a chat model plus its references; prompts go through the
tokenizer's chat template when it has one (SmolLM2-Instruct), else a plain "Instruction /
Answer" layout (base models). Scored by the task's main metric (tasks/gen_metrics.py).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from earlyexit.errors import EarlyExitError
from earlyexit.paths import data_file
from earlyexit.tasks.base import truncate

DOCUMENT_CHARS = 1500  # keep prompts short enough for a small model and a 2-core machine


@dataclass(frozen=True)
class GenerationItem:
    instruction: str
    references: tuple[str, ...]
    row: int | None = None  # a user file's data row (0-based), for the records


@dataclass
class GenerationTask:
    name: str
    load: Callable[[], list[GenerationItem]]
    metric: str  # rougeL | f1 | bleu
    max_new_tokens: int = 64

    def items(self, limit: int | None = None) -> list[GenerationItem]:
        rows = self.load()
        return rows if limit is None else rows[:limit]


def render_prompt(tokenizer: Any, instruction: str) -> str:
    """The instruction as a chat turn (when the tokenizer has a template), ready to answer."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
    return f"{instruction}\n\nAnswer:"


def _samsum() -> list[GenerationItem]:
    path = data_file("samsum", "test.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "dialogue" not in rows[0]:
        raise EarlyExitError(f"{path} is not the SAMSum CSV (id,summary,dialogue)")
    return [
        GenerationItem(
            "Summarize this dialogue in one sentence.\n\n"
            + row["dialogue"].replace("\r\n", "\n").strip(),
            (row["summary"].strip(),),
        )
        for row in rows
    ]


def _xsum() -> list[GenerationItem]:
    path = data_file("xsum", "test_1000.jsonl")
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            items.append(
                GenerationItem(
                    "Summarize this article in one sentence.\n\n"
                    + truncate(row["document"], DOCUMENT_CHARS),
                    (row["summary"].strip(),),
                )
            )
    return items


def _squad() -> list[GenerationItem]:
    path = data_file("squad_v1.1", "dev-v1.1.json")
    items = []
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                items.append(
                    GenerationItem(
                        "Answer the question with a short phrase copied from the text.\n\n"
                        f"Text: {truncate(paragraph['context'], DOCUMENT_CHARS)}\n\n"
                        f"Question: {qa['question'].strip()}",
                        answers,
                    )
                )
    return items


def _iwslt() -> list[GenerationItem]:
    source = data_file("iwslt2017_en_de", "IWSLT17.TED.tst2017.en").read_text(encoding="utf-8")
    target = data_file("iwslt2017_en_de", "IWSLT17.TED.tst2017.de").read_text(encoding="utf-8")
    en, de = source.strip().split("\n"), target.strip().split("\n")
    if len(en) != len(de):
        raise EarlyExitError("IWSLT17 tst2017 en/de files differ in length; check the data")
    return [
        GenerationItem(f"Translate this sentence into German.\n\n{s.strip()}", (t.strip(),))
        for s, t in zip(en, de, strict=True)
    ]


GENERATION_TASKS: dict[str, GenerationTask] = {
    "samsum": GenerationTask("samsum", _samsum, "rougeL", 48),
    "xsum": GenerationTask("xsum", _xsum, "rougeL", 48),
    "squad": GenerationTask("squad", _squad, "f1", 16),
    "iwslt-en-de": GenerationTask("iwslt-en-de", _iwslt, "bleu", 64),
}


METRICS = ("rougeL", "f1", "bleu", "exact")


def load_generation_file(
    path: str | Path,
    prompt_field: str,
    reference_field: str,
    template: str = "{prompt}",
    metric: str = "rougeL",
    max_new_tokens: int = 64,
    seed: int = 0,
) -> GenerationTask:
    """A user's CSV/TSV/JSONL file as a generation task. `template` wraps the prompt field
    (then the chat template, as for built-in tasks); several references may be given as a
    JSON list in the reference field. Items come in a seeded random order, so any prefix
    (`--limit N`) is a fair sample of the file; each item keeps its data row."""
    import random

    from earlyexit.tasks.custom import _rows, dataset_file

    if metric not in METRICS:
        raise EarlyExitError(f"unknown metric '{metric}': use {', '.join(METRICS)}")
    if "{prompt}" not in template:
        raise EarlyExitError("the template must contain {prompt}, e.g. 'Summarize: {prompt}'")
    file, fmt = dataset_file(path)
    items = []
    for index, (where, row) in enumerate(_rows(file, fmt)):
        for field_name in (prompt_field, reference_field):
            if field_name not in row:
                present = ", ".join(str(c) for c in row) or "none"
                raise EarlyExitError(
                    f"{file}: no field '{field_name}' ({where}); fields present: {present}"
                )
        prompt, reference = row[prompt_field], row[reference_field]
        refs = reference if isinstance(reference, list) else [reference]
        if not isinstance(prompt, str) or not prompt.strip():
            raise EarlyExitError(f"{file} {where}: '{prompt_field}' is empty; fill or drop it")
        if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
            raise EarlyExitError(
                f"{file} {where}: '{reference_field}' needs a non-empty string (or a list of them)"
            )
        instruction = template.replace("{prompt}", prompt.strip())
        items.append(GenerationItem(instruction, tuple(r.strip() for r in refs), index))
    if not items:
        raise EarlyExitError(f"{file} holds no rows; add rows under a header line")
    random.Random(seed).shuffle(items)
    internal = "em" if metric == "exact" else metric
    return GenerationTask(file.stem, lambda: list(items), internal, max_new_tokens)


def get_generation_task(name: str) -> GenerationTask:
    if name not in GENERATION_TASKS:
        raise EarlyExitError(f"unknown generation task '{name}': use {', '.join(GENERATION_TASKS)}")
    return GENERATION_TASKS[name]


def _iwslt_progress() -> list[GenerationItem]:
    source = data_file("iwslt2017_en_de", "IWSLT17.TED.tst2016.en").read_text(encoding="utf-8")
    return [
        GenerationItem(f"Translate this sentence into German.\n\n{s.strip()}", ())
        for s in source.strip().split("\n")
    ]


def _samsum_val() -> list[GenerationItem]:
    path = data_file("samsum", "val.csv")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        GenerationItem(
            "Summarize this dialogue in one sentence.\n\n"
            + row["dialogue"].replace("\r\n", "\n").strip(),
            (),
        )
        for row in rows
    ]


def self_distill_instructions(count: int) -> list[str]:
    """Instructions never used for evaluation: SAMSum val, IWSLT tst2016, and the *last*
    items of XSum and SQuAD (evaluation takes the first N), interleaved."""
    pools = [
        _samsum_val(),
        _iwslt_progress(),
        _xsum()[-200:],
        _squad()[-400:],
    ]
    out: list[str] = []
    index = 0
    while len(out) < count and any(index < len(pool) for pool in pools):
        out += [pool[index].instruction for pool in pools if index < len(pool)]
        index += 1
    return out[:count]
