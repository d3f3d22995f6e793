"""Prompted classification on a causal LM: examples, tasks, few-shot prompts, label tokens.

A task is scored by reading the next-token logits at the end of the prompt and comparing one
token per class (the first token of each label word). That keeps every task, multiple choice
included, a single forward pass with a fixed candidate set, which is what an exit readout
restricted to candidate tokens needs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from earlyexit.errors import EarlyExitError

LETTERS = "ABCDEFGHIJ"
SPLITS = ("train", "test")
SAMPLES = ("seeded", "first")  # how `test_sample` draws: seeded random, or file order


@dataclass(frozen=True)
class Example:
    """One input and its class index. `choices` is set only for per-choice multiple choice
    (each choice scored as a continuation); letter-scored tasks render the choices into `text`.
    """

    text: str
    label: int
    choices: tuple[str, ...] | None = None
    row: int | None = None  # the test file's data row (0-based), for the records


@dataclass
class Task:
    """A classification task: how to render examples and which word names each class.

    `train` and `test` are loaders, called on use, so that listing or building tasks never
    reads data. `train` is the demonstration pool; `test` is what gets scored.
    """

    name: str
    label_words: list[str]
    template: str
    train: Callable[[], list[Example]]
    test: Callable[[], list[Example]]
    instruction: str = ""
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise EarlyExitError(
                f"task '{self.name}': template {self.template!r} has no {{text}} slot; add one"
            )
        if len(self.label_words) < 2:
            raise EarlyExitError(f"task '{self.name}' needs at least two label words")
        if len(set(self.label_words)) != len(self.label_words):
            raise EarlyExitError(
                f"task '{self.name}' has repeated label words {self.label_words}; make them unique"
            )
        if any(not word.strip() for word in self.label_words):
            raise EarlyExitError(
                f"task '{self.name}' has an empty label word; give every class one"
            )

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def examples(self, split: str = "test", limit: int | None = None) -> list[Example]:
        """The first `limit` examples of a split (file order, or the seeded order of a split
        made here), so that a run on a prefix is reproducible."""
        if split not in SPLITS:
            raise EarlyExitError(
                f"unknown split '{split}' for task '{self.name}': use train or test"
            )
        rows = self.train() if split == "train" else self.test()
        return rows if limit is None else rows[:limit]

    def test_sample(
        self, limit: int | None = None, seed: int = 0, how: str = "seeded"
    ) -> list[Example]:
        """`limit` test examples, each with its row in the test file. `seeded`: a random
        sample drawn with `seed`, in drawn order (so any prefix is a fair sample too; many
        files are sorted by label or subject, and a first-N prefix is then one class or one
        subject); `first`: the first `limit` rows in file order (what the harness's `--limit`
        takes)."""
        if how not in SAMPLES:
            raise EarlyExitError(f"unknown sample '{how}': use {' or '.join(SAMPLES)}")
        rows = [
            ex if ex.row is not None else replace(ex, row=index)
            for index, ex in enumerate(self.test())
        ]
        if how == "first":
            rows.sort(key=lambda ex: ex.row)
        else:
            random.Random(seed).shuffle(rows)
        return rows if limit is None else rows[:limit]

    def render(self, example: Example) -> str:
        # replace, not str.format: example text (and user templates) may hold braces
        return self.template.replace("{text}", example.text)

    def prompt(self, example: Example, demos: Sequence[Example] = ()) -> str:
        """Instruction, then each demonstration followed by its label word and a blank line,
        then the query without its label: the prompt ends where the label word would start."""
        parts = [self.instruction.rstrip("\n") + "\n\n"] if self.instruction else []
        for demo in demos:
            parts.append(self.render(demo) + self.label_words[demo.label] + "\n\n")
        parts.append(self.render(example))
        return "".join(parts)

    def demonstrations(self, k: int, seed: int = 0, shuffle: bool = False) -> list[Example]:
        """k training examples, class-balanced: round-robin over the classes in a seeded order,
        each class's examples drawn in a seeded order.

        The round-robin order is kept by default: small models copy the most recent labels,
        and a shuffle that ends on a run of one class skews them (smollm2-135m, SST-2, 4
        demos, first 100 dev: 0.71 and 0.62 shuffled vs 0.78-0.84 interleaved over seeds
        0-3). `shuffle=True` shuffles the chosen examples with the seed."""
        if k <= 0:
            return []
        pool = self.train()
        if k > len(pool):
            raise EarlyExitError(
                f"task '{self.name}' has {len(pool)} training examples; ask for at most that many "
                f"demonstrations (got k={k})"
            )
        rng = random.Random(seed)
        by_class: dict[int, list[Example]] = {}
        for ex in pool:
            by_class.setdefault(ex.label, []).append(ex)
        order = sorted(by_class)
        rng.shuffle(order)
        for label in order:
            rng.shuffle(by_class[label])
        chosen: list[Example] = []
        depth = 0
        while len(chosen) < k:
            for label in order:
                if depth < len(by_class[label]) and len(chosen) < k:
                    chosen.append(by_class[label][depth])
            depth += 1
        if shuffle:
            rng.shuffle(chosen)
        return chosen

    def label_token_ids(self, tokenizer: Any) -> torch.Tensor:
        """One token id per class: each label word's first token. Scoring reads a single
        next-token distribution, so the first tokens must tell the classes apart."""
        firsts: list[int] = []
        for word in self.label_words:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if not ids:
                raise EarlyExitError(
                    f"task '{self.name}': label word {word!r} tokenizes to nothing"
                )
            firsts.append(int(ids[0]))
        if len(set(firsts)) != len(firsts):
            seen: dict[int, str] = {}
            clash: list[str] = []
            for word, tok in zip(self.label_words, firsts, strict=True):
                if tok in seen:
                    clash += [w for w in (seen[tok], word) if w not in clash]
                seen.setdefault(tok, word)
            words = ", ".join(repr(w) for w in clash)
            raise EarlyExitError(
                f"task '{self.name}': label words {words} start with the same token; "
                "choose single-token label words"
            )
        return torch.tensor(firsts, dtype=torch.long)

    def score(self, predictions: Sequence[int], labels: Sequence[int]) -> float:
        """This task's metric over predicted and gold class indices."""
        from earlyexit.tasks.metrics import compute_metric

        return compute_metric(self.metric, predictions, labels)


def seeded_split(
    examples: Sequence[Example], n_held: int, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Draw `n_held` examples at random (returned in that random order, so any prefix is a
    fair sample) and return them with the rest (in file order). Rest-side examples whose text
    also occurs in the held side are dropped, so a duplicated line cannot be both a
    demonstration and a test item."""
    n_held = max(0, min(n_held, len(examples)))
    perm = list(range(len(examples)))
    random.Random(seed).shuffle(perm)
    held_idx = perm[:n_held]
    held = [examples[i] for i in held_idx]
    taken = set(held_idx)
    held_texts = {ex.text for ex in held}
    rest = [ex for i, ex in enumerate(examples) if i not in taken and ex.text not in held_texts]
    return held, rest


def truncate(text: str, max_chars: int) -> str:
    """Cut long passages at a word boundary: a small model's few-shot prompt must stay short."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:") + " ..."


def lettered(question: str, choices: Sequence[str]) -> str:
    """A question followed by 'A. ...' lines, for tasks answered by the choice's letter."""
    if len(choices) > len(LETTERS):
        raise EarlyExitError(f"at most {len(LETTERS)} choices are supported, got {len(choices)}")
    lines = [f"Question: {question.strip()}"]
    lines += [f"{LETTERS[i]}. {' '.join(c.split())}" for i, c in enumerate(choices)]
    return "\n".join(lines)
