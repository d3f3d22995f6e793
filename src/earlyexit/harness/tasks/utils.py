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


def squad_docs(dataset):  # noqa: ANN001, ANN201
    """SQuAD v1.1's articles -> one row per question (context, question, answers)."""
    import datasets

    rows = [
        {
            "context": paragraph["context"],
            "question": qa["question"],
            "answers": [answer["text"] for answer in qa["answers"]],
        }
        for article in dataset
        for paragraph in article["paragraphs"]
        for qa in paragraph["qas"]
    ]
    return datasets.Dataset.from_list(rows)


def squad_scores(doc: dict, results: list[str]) -> dict[str, float]:
    """The official SQuAD v1.1 exact match and token F1 (earlyexit's implementation)."""
    from earlyexit.tasks.gen_metrics import squad

    scores = squad([results[0].strip()], [tuple(doc["answers"])])
    return {"exact": scores["em"], "f1": scores["f1"]}
