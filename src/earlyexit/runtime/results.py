"""What the API returns: a generation (text, tokens, finish reason) with the report of what
it did and used, a stream's chunks, and a classification with its report. Plain
dataclasses: the server turns them into OpenAI's shapes (server/protocol.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationReport:
    """What one generate request did.

    `avg_layers` is compute, not depth: decoder-layer applications per decode-phase token
    (tokens 2..n; the first token is the prefill's), rejected drafts and catch-ups included.
    `tokens_per_s` covers the whole request (prefill included, tokenisation excluded);
    `decode_tokens_per_s` only tokens 2..n, the part early exit speeds up.
    """

    method: str
    num_layers: int
    shallow_layer: int | None  # the exit layer k of methods with a shallow exit
    avg_layers: float
    shallow_fraction: float  # emitted tokens that exited before the last layer
    exit_layers: list[int]  # per emitted token: the layer that produced it (k or L)
    draft_proposed: int
    draft_accepted: int
    draft_seconds: float  # looking drafts up (n-gram) or running the drafter
    passes: int  # full-depth verify passes (lossless, full, hf-pld)
    catchups: int  # deep passes over stacked shallow tokens (free)
    rollbacks: int
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float  # arrival to the first token: queue wait, prefill (TTFT)
    queue_seconds: float  # waiting for a row in the scheduler's batch (0: not batched)
    batched: bool  # decoded by the scheduler in a running batch (else alone, a scheduler call)
    decode_seconds: float  # tokens 2..n
    setup_seconds: float  # building the decoder on this call (0 once built: kept in memory)
    tokens_per_s: float
    decode_tokens_per_s: float
    threshold: float | None  # the confidence threshold in force (calm, free, shallow drafts)
    # what Learn-then-Test certified for this decoder's threshold (the `risk` knob): risk,
    # delta, n, the setting and whether it was certified (risk.LTTChoice); else None
    ltt: dict | None
    artifacts: dict[str, str]  # what was trained, calibrated or measured, and where from


@dataclass
class Generation:
    text: str  # decoded, special tokens skipped, cut before a stop string
    tokens: list[int]  # every emitted token id (an EOS or a stop string's tokens included)
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached
    report: GenerationReport


@dataclass
class StreamChunk:
    """Tokens emitted since the previous chunk. `text` is the text they complete: a
    character split over tokens, or text that may begin a stop string, is held back until
    it is settled, so the chunks' texts add up to the final `Generation.text`. The last
    chunk carries the finished `generation` (and possibly no tokens)."""

    text: str
    tokens: list[int]
    exit_layers: list[int]
    generation: Generation | None = None


@dataclass
class ClassificationReport:
    method: str
    task: str
    num_layers: int
    avg_layers: float  # mean exit layer (1..L)
    layers_saved: float  # 1 - avg_layers / L
    seconds: float  # forward passes and exit decisions (tokenisation excluded)
    decision_seconds: float  # readouts, policy, embedding and retrieval
    setup_seconds: float  # calibration on this call (0 when its artifacts were kept)
    shots: int
    readout: str  # probe | general
    policy: dict
    artifacts: dict[str, str]


@dataclass
class Classification:
    labels: list[str]  # per text: its class's label word
    classes: list[int]  # per text: the class index (the task's label-word order)
    exit_layers: list[int]  # per text: the layer it exited at (1..L)
    report: ClassificationReport
