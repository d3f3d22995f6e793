"""Document preparation and metrics the ee_* task configs reference (`!function utils.x`).

The configs read the evaluation files in EARLYEXIT_DATA with the harness's own loaders
(datasets' text / json / csv builders); these functions only reshape rows into the fields
the prompts use, and score SAMSum with ROUGE-L (the harness has no ROUGE metric built in).
"""

from __future__ import annotations


def sst2_docs(dataset):  # noqa: ANN001, ANN201 - a datasets.Dataset
    """stsa.binary lines are "<label> <sentence>"; the sentence cleaned as `earlyexit eval`
    cleans it (whitespace, PTB bracket tokens), so both score the same prompts."""
    from earlyexit.tasks.builtin import clean_ptb

    def split(row: dict) -> dict:
        label, _, sentence = row["text"].partition(" ")
        return {"label": int(label), "sentence": clean_ptb(" ".join(sentence.split()))}

    return dataset.map(split, remove_columns=dataset.column_names)


def boolq_docs(dataset):  # noqa: ANN001, ANN201
    def label(row: dict) -> dict:
        return {
            "label": int(str(row["answer"]) == "True"),
            "question": " ".join(row["question"].split()).rstrip("?"),
        }

    return dataset.map(label)


def gauntlet_docs(dataset):  # noqa: ANN001, ANN201
    """MosaicML gauntlet rows {query: "Question: ...", choices, gold}."""

    def question(row: dict) -> dict:
        return {"question": row["query"].strip().removeprefix("Question:").strip()}

    return dataset.map(question)


def samsum_rouge(doc: dict, results: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return {"rougeL": scorer.score(doc["summary"], results[0].strip())["rougeL"].fmeasure}
