"""Every method earlyexit runs, with its syntax and a one-line description.

One registry feeds the CLI's `--method` help, the method lists in error messages
(`runtime/generation.py`'s `parse_method`, `runtime/calibration.py`'s `method_args`) and
the README's method paragraphs (`tests/test_methods.py` checks all three). Torch-free:
the CLI imports it to build its help.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    syntax: str  # name[:arguments], optional parts in brackets
    description: str  # one line
    examples: tuple[str, ...]  # specs that parse, covering every form of the syntax

    @property
    def name(self) -> str:
        return self.syntax.split("[")[0]


GENERATION: tuple[Method, ...] = (
    Method("full", "every token through every layer (the reference)", ("full",)),
    Method("static", "every token at the shallow exit", ("static",)),
    Method(
        "calm[:T]",
        "CALM: exit when the shallow confidence reaches T (calibrated when not given), "
        "state copying into the skipped layers' KV",
        ("calm", "calm:0.9"),
    ),
    Method(
        "free[:plain|:adapter][:T|:official]",
        "FREE: confident shallow tokens emitted, their deep KV filled at the next catch-up; "
        "n-gram drafts verified there unless plain; adapter: the exit reads the trained "
        "draft block; no T: our Beta-mixture adaptive threshold; official: the paper code's "
        "threshold settings",
        (
            "free",
            "free:0.5",
            "free:official",
            "free:plain",
            "free:plain:0.5",
            "free:plain:official",
            "free:adapter",
            "free:adapter:0.5",
        ),
    ),
    Method(
        "lossless[:ngram[:N]|:shallow[:T]|:composite[:T]|:adapter[:T]]",
        "draft and verify: the full model's own output (or sampling distribution); n-gram "
        "drafts by default (N per pass, else from this machine's measured pass costs), or "
        "shallow-exit, composite or trained-draft-block drafts above confidence T",
        (
            "lossless",
            "lossless:ngram",
            "lossless:ngram:3",
            "lossless:shallow",
            "lossless:shallow:0.5",
            "lossless:composite",
            "lossless:composite:0.5",
            "lossless:adapter",
            "lossless:adapter:0.5",
        ),
    ),
    Method("hf", "transformers' greedy `generate`, timed like ours", ("hf",)),
    Method(
        "hf-pld[:N]", "transformers' prompt lookup (N tokens looked up)", ("hf-pld", "hf-pld:4")
    ),
    Method(
        "llama.cpp",
        "llama.cpp on the model's GGUF, greedy (optional extra `llamacpp`, see README)",
        ("llama.cpp",),
    ),
)

EVAL: tuple[Method, ...] = (
    Method("full", "every prompt through every layer (the reference)", ("full",)),
    Method(
        "static[:K]",
        "every prompt exits at layer K (default 2/3 of the depth)",
        ("static", "static:20"),
    ),
    Method(
        "static-cal[:tol]",
        "the skeptic's baseline: the shallowest static layer whose calibration readouts "
        "agree with the final layer's on all but tol of the prompts (AdaInfer's tolerance)",
        ("static-cal", "static-cal:0.02"),
    ),
    Method(
        "confidence[:T]",
        "exit at the first layer whose readout confidence reaches T (default 0.9)",
        ("confidence", "confidence:0.8"),
    ),
    Method(
        "adainfer[:tol]",
        "AdaInfer: a linear SVM stopper over per-layer features (tolerance tol)",
        ("adainfer", "adainfer:0.02"),
    ),
    Method(
        "adainfer-crf[:tol]",
        "AdaInfer's features, a CRF stopper over the layer sequence",
        ("adainfer-crf", "adainfer-crf:0.02"),
    ),
    Method(
        "adainfer-saved",
        "AdaInfer with a stopper fitted on another task (--stopper FILE, from eval --save): "
        "the paper's one-stopper-for-all-tasks claim",
        ("adainfer-saved",),
    ),
    Method(
        "adainfer-vocab[:tol]",
        "adainfer plus full-vocabulary top-1/gap features (a full LM-head readout per layer)",
        ("adainfer-vocab", "adainfer-vocab:0.02"),
    ),
    Method(
        "raee[:k[:slack]]",
        "RAEE, reliability-weighted: the exit planned from k retrieved neighbours, the "
        "earliest layer within slack of the best",
        ("raee", "raee:8", "raee:8:0.2"),
    ),
    Method(
        "raee-paper[:k[:slack]]",
        "RAEE's published rule (slack 0: the argmax)",
        ("raee-paper", "raee-paper:8", "raee-paper:8:0.1"),
    ),
)

GEN_METHODS: tuple[str, ...] = tuple(m.syntax for m in GENERATION)
# the families `earlyexit serve` offers unless told otherwise (--methods): the peers run
# outside the scheduler (transformers' generate, llama.cpp) and are for benchmarks
SERVED_METHODS: tuple[str, ...] = ("full", "lossless", "free", "calm", "static")
EVAL_METHODS: tuple[str, ...] = tuple(m.syntax for m in EVAL)


def method_list(methods: tuple[Method, ...]) -> str:
    """'a, b[:X], c' : the syntaxes, for help texts and error messages."""
    return ", ".join(m.syntax for m in methods)
