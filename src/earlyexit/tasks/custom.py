"""A user's own labelled file (CSV, TSV or JSONL) as a task.

Every problem with the file is an EarlyExitError of one line that says where and how to fix
it, since this is the path where users hand us data we have never seen.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

from earlyexit.errors import EarlyExitError
from earlyexit.tasks.base import Example, Task, seeded_split

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DEFAULT_TEMPLATE = "Input: {text}\nLabel:"
MAX_DEMO_POOL = 200


def load_custom_task(
    path: str | Path,
    text_column: str,
    label_column: str,
    label_words: Mapping[str, str] | str | Path,
    template: str | None = None,
    name: str | None = None,
    *,
    demo_pool: int | None = None,
    seed: int = 0,
) -> Task:
    """A task over one file: a seeded pool of `demo_pool` rows (default: a fifth, at most
    200) serves the demonstrations and the remaining rows, in a seeded order, are the test
    set (so its first N are a fair sample).

    `label_words` maps each label value as written in the file to its word (a leading space
    is added if missing), or names a YAML/JSON file holding that map; its order sets the
    class indices. The file is read when examples are first asked for, but checked now, so
    that a bad file fails before any model is loaded.
    """
    file, fmt = dataset_file(path)
    words = _label_map(label_words)
    index = {label: i for i, label in enumerate(words)}
    task_name = name or file.stem
    template = template or DEFAULT_TEMPLATE

    def split() -> tuple[tuple[Example, ...], tuple[Example, ...]]:
        stamp = file.stat().st_mtime_ns  # an edited file is read again
        labels = tuple(index.items())
        return _split(file, stamp, fmt, text_column, label_column, labels, demo_pool, seed)

    task = Task(
        name=task_name,
        label_words=[w if w.startswith(" ") else " " + w for w in words.values()],
        template=template,
        train=lambda: list(split()[0]),
        test=lambda: list(split()[1]),
    )
    split()  # validate eagerly: columns, labels, JSON syntax
    return task


def dataset_file(path: str | Path) -> tuple[Path, str]:
    """A user's dataset file, resolved, and its format (csv, tsv or jsonl)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise EarlyExitError(f"dataset file {file} does not exist; check the path")
    fmt = FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise EarlyExitError(
            f"unsupported dataset file type '{file.suffix or file.name}': "
            f"use {', '.join(FORMATS)} (e.g. convert {file.name} to CSV)"
        )
    return file, fmt


def _label_map(spec: Mapping[str, str] | str | Path) -> dict[str, str]:
    where = "label_words"
    if isinstance(spec, (str, Path)):
        where = f"label map {spec}"
        spec = _read_label_file(Path(spec).expanduser())
    if not isinstance(spec, Mapping) or not spec:
        raise EarlyExitError(f"{where} must map each label to a word, e.g. {{'0': 'negative'}}")
    words: dict[str, str] = {}
    for label, word in spec.items():
        if not isinstance(word, str) or not word.strip():
            raise EarlyExitError(f"label '{label}' needs a non-empty word in label_words")
        words[_label_key(label)] = word
    return words


def _read_label_file(path: Path) -> Any:
    if not path.is_file():
        raise EarlyExitError(f"label map file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise EarlyExitError(f"label map {path} is not valid JSON ({err}); fix it") from None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise EarlyExitError(f"label map {path} is not valid YAML ({first}); fix it") from None
    raise EarlyExitError(f"label map {path} must be a .json, .yaml or .yml file")


def _label_key(value: Any) -> str:
    """Labels compare as text, so 1 in JSONL, '1' in CSV and 1 as a YAML key all match;
    1.0 (a float label) reads as '1', and true (JSON, YAML) as 'True' (as pandas writes it)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@cache
def _split(
    file: Path,
    stamp: int,
    fmt: str,
    text_column: str,
    label_column: str,
    index: tuple[tuple[str, int], ...],
    demo_pool: int | None,
    seed: int,
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    classes = dict(index)
    examples = []
    for where, row in _rows(file, fmt):
        for column in (text_column, label_column):
            if column not in row:
                present = ", ".join(str(c) for c in row) or "none"
                raise EarlyExitError(
                    f"{file}: no column '{column}' ({where}); columns present: {present}"
                )
        label = _label_key(row[label_column])
        if label not in classes:
            raise EarlyExitError(
                f"{file} {where}: label '{label}' is not in the label map "
                f"({', '.join(classes)}); add it to label_words"
            )
        text = row[text_column]
        examples.append(
            Example(
                " ".join(str(text if text is not None else "").split()),
                classes[label],
                row=len(examples),
            )
        )
    if not examples:
        raise EarlyExitError(f"{file} holds no examples; add rows under a header line")
    n_pool = min(MAX_DEMO_POOL, len(examples) // 5) if demo_pool is None else demo_pool
    if not 0 <= n_pool < len(examples):
        raise EarlyExitError(
            f"demo_pool={n_pool} leaves no test examples in {file} ({len(examples)} rows)"
        )
    pool, test = seeded_split(tuple(examples), n_pool, seed)
    # the test side in a seeded order, not file order: `--limit N` is then a fair sample
    # even of a file sorted by label (many public sentiment files are)
    random.Random(seed + 1).shuffle(test)
    return tuple(pool), tuple(test)


def _rows(file: Path, fmt: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location for messages, row) pairs."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise EarlyExitError(f"{file} is not UTF-8 text; re-save it as UTF-8") from None
    if fmt == "jsonl":
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise EarlyExitError(
                    f"{file} line {lineno} is not valid JSON ({err.msg}); fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise EarlyExitError(
                    f"{file} line {lineno} is not a JSON object; write one {{...}} per line"
                )
            yield f"line {lineno}", row
        return
    reader = csv.reader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ",", strict=True)
    try:
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        for fields in reader:
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise EarlyExitError(
                    f"{file} line {reader.line_num} has {len(fields)} fields but the header has "
                    f"{len(header)}; quote fields that contain the delimiter"
                )
            yield f"line {reader.line_num}", dict(zip(header, fields, strict=True))
    except csv.Error as err:
        raise EarlyExitError(
            f"{file} line {reader.line_num} is malformed {fmt.upper()} ({err}); fix its quoting"
        ) from None
