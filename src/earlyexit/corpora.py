"""Plain-text corpora for training and evaluating exit readouts (read from the data folder)."""

from __future__ import annotations

import re

import torch

from earlyexit.errors import EarlyExitError
from earlyexit.paths import data_file

# WikiText's tokenized release splits words (" @-@ ", " , "); undo it so the model sees
# ordinary text, the distribution its readouts will face.
_DETOKENIZE = [
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" , ", ", "),
    (" . ", ". "),
    (" ; ", "; "),
    (" : ", ": "),
    (" 's", "'s"),
    (" n't", "n't"),
    ("( ", "("),
    (" )", ")"),
    (" ' ", "' "),
    ('" ', '"'),
    (" !", "!"),
    (" ?", "?"),
]
CORPORA = {
    "wikitext-2-valid": ("wikitext-2", "valid.txt"),
    "wikitext-2-test": ("wikitext-2", "test.txt"),
}


def wikitext_detokenize(line: str) -> str:
    for old, new in _DETOKENIZE:
        line = line.replace(old, new)
    return re.sub(r"\s+", " ", line).strip()


def load_corpus(name: str) -> list[str]:
    """Paragraphs of a named corpus, or of a local .txt file given by path."""
    if name in CORPORA:
        path = data_file(*CORPORA[name])
    else:
        from pathlib import Path

        path = Path(name)
        if not path.is_file():
            known = ", ".join(CORPORA)
            raise EarlyExitError(f"unknown corpus '{name}': use one of {known} or a .txt file path")
    paragraphs = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("="):
            continue
        paragraphs.append(wikitext_detokenize(line))
    if not paragraphs:
        raise EarlyExitError(f"corpus {path} holds no text")
    return paragraphs


def token_chunks(
    tokenizer: object, paragraphs: list[str], seq_len: int, max_tokens: int
) -> torch.Tensor:
    """Concatenate paragraphs into one token stream, cut into [n, seq_len] rows."""
    eos = getattr(tokenizer, "eos_token", None) or "\n"
    ids: list[int] = []
    for para in paragraphs:
        ids.extend(tokenizer(para + eos, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if len(ids) >= max_tokens:
            break
    rows = min(len(ids), max_tokens) // seq_len
    if rows == 0:
        raise EarlyExitError(f"corpus too small for one {seq_len}-token chunk")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
