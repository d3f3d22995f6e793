"""OpenAI's request and response shapes, and the translation to and from `earlyexit.api`.

Only translation lives here (as in vLLM's `entrypoints/openai`): requests become
`EarlyExit.generate` / `stream` arguments, `Generation`s become OpenAI objects with two
extra top-level objects, `timings` (llama.cpp's names) and `early_exit`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from earlyexit.errors import EarlyExitError
from earlyexit.runtime.results import Generation, GenerationReport

MAX_TOKENS_DEFAULT = 16  # OpenAI's default for completions
# a decoder's first build decodes calibration_prompts x calibration_tokens at full depth in
# the serving loop (every other request waits): a client may ask for at most this much
MAX_CALIBRATION = {"calibration_prompts": 32, "calibration_tokens": 128}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI-compatible servers
    do (clients send vendor extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # earlyexit's own: {"method": "free", ...knobs of EarlyExit.generate}; sent by the
    # openai client through `extra_body={"early_exit": {...}}`
    early_exit: dict[str, Any] | None = None

    def generate_args(self, default_method: str, max_tokens: int | None) -> dict[str, Any]:
        """Keyword arguments of `EarlyExit.generate` (the prompt aside)."""
        if self.n != 1:
            raise EarlyExitError(f"n={self.n}: this server returns one choice per request (n=1)")
        options = dict(self.early_exit or {})
        method = options.pop("method", default_method)
        if not isinstance(method, str):
            raise EarlyExitError("early_exit.method must be a string such as 'free' or 'full'")
        for name, most in MAX_CALIBRATION.items():
            value = options.get(name)
            if isinstance(value, int | float) and value > most:
                raise EarlyExitError(f"early_exit.{name} may be at most {most} on this server")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {
            "method": method,
            "max_new_tokens": max_tokens if max_tokens is not None else MAX_TOKENS_DEFAULT,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": stops,
            **options,
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    def text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise EarlyExitError("prompt: send one prompt per request (a string)")
            return self.prompt[0]
        return self.prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


class ClassifyRequest(BaseModel):
    """`POST /v1/classify`: texts with a task (built-in name) or a label map (zero-shot)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    texts: list[str] | str
    task: str | None = "sst2"
    labels: dict[str, str] | None = None
    method: str = "adainfer"
    shots: int = Field(default=4, ge=0)
    seed: int = 0
    calibration: int = Field(default=200, ge=10)
    readout: Literal["probe", "general"] = "probe"


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(report: GenerationReport) -> dict[str, int]:
    return {
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": report.completion_tokens,
        "total_tokens": report.prompt_tokens + report.completion_tokens,
    }


def timings(report: GenerationReport) -> dict[str, float | int]:
    """llama.cpp's timing names. The prompt pass also yields the first token, so `prompt_ms`
    covers prefill and token 1, and `predicted_*` the decode phase (tokens 2..n), the part
    early exit speeds up."""
    predicted = max(report.completion_tokens - 1, 0)
    return {
        "prompt_n": report.prompt_tokens,
        "prompt_ms": report.prompt_seconds * 1e3,
        "predicted_n": predicted,
        "predicted_ms": report.decode_seconds * 1e3,
        "predicted_per_second": report.decode_tokens_per_s,
    }


def early_exit(report: GenerationReport, knobs: dict[str, Any]) -> dict[str, Any]:
    return {
        "method": report.method,
        "num_layers": report.num_layers,
        "shallow_layer": report.shallow_layer,
        "avg_layers": report.avg_layers,
        "shallow_fraction": report.shallow_fraction,
        "draft_proposed": report.draft_proposed,
        "draft_accepted": report.draft_accepted,
        "passes": report.passes,
        "catchups": report.catchups,
        "rollbacks": report.rollbacks,
        "threshold": report.threshold,
        "knobs": knobs,
        "artifacts": report.artifacts,
    }


def telemetry(generation: Generation, knobs: dict[str, Any]) -> dict[str, Any]:
    return {
        "timings": timings(generation.report),
        "early_exit": early_exit(generation.report, knobs),
    }


def _response(
    obj: str, choice: dict[str, Any], rid: str, model: str, generation: Generation, knobs: dict
) -> dict[str, Any]:
    choice = {"index": 0, **choice, "finish_reason": generation.finish_reason, "logprobs": None}
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(generation.report),
        **telemetry(generation, knobs),
    }


def completion(
    rid: str, model: str, generation: Generation, knobs: dict[str, Any]
) -> dict[str, Any]:
    return _response("text_completion", {"text": generation.text}, rid, model, generation, knobs)


def chat_completion(
    rid: str, model: str, generation: Generation, knobs: dict[str, Any]
) -> dict[str, Any]:
    message = {"message": {"role": "assistant", "content": generation.text}}
    return _response("chat.completion", message, rid, model, generation, knobs)


def chunk(
    rid: str,
    model: str,
    chat: bool,
    text: str | None,
    finish_reason: str | None = None,
    first: bool = False,
) -> dict[str, Any]:
    """One streamed chunk: `chat.completion.chunk` (delta) or `text_completion` (text)."""
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta}
    else:
        choice = {"index": 0, "text": text or ""}
    choice["finish_reason"] = finish_reason
    choice["logprobs"] = None
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
