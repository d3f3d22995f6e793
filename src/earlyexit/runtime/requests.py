"""A generate / stream request, checked before any model work: the prompt (rendered
through the chat template), the method, the decode settings and the decoder's config
(`GenConfig`, from the call's `**knobs`). Every problem is one EarlyExitError line."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from earlyexit.decoding.sampling import SamplingConfig
from earlyexit.decoding.shallow_deep import DecodeConfig
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.runtime.generation import GenConfig, GenMethod, parse_method
from earlyexit.runtime.scheduler import RequestTimeout

# `**knobs` of generate / stream: how the decoder is built (GenConfig, the one config of
# every generation path) and two settings of the decode itself
DECODE_KNOBS = {"max_stack": 16, "stop_at_eos": True}
KNOBS = (*(f.name for f in fields(GenConfig)), *DECODE_KNOBS)
ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass
class GenRequest:
    """A checked generate / stream request."""

    method: GenMethod
    prompt: str  # rendered (chat template applied when asked)
    decode: DecodeConfig  # on_token set per run
    config: GenConfig  # how its decoder is built

    @property
    def key(self) -> tuple:
        """What its decoder depends on (per-request settings excluded)."""
        return (self.method.spec, self.config)


def check_knobs(given: Mapping[str, Any], num_layers: int) -> tuple[GenConfig, dict[str, Any]]:
    """The request's GenConfig and decode settings, checked (one line naming the fix)."""
    unknown = sorted(set(given) - set(KNOBS))
    if unknown:
        raise EarlyExitError(f"unknown generate option '{unknown[0]}': use {', '.join(KNOBS)}")
    config = GenConfig(**{k: v for k, v in given.items() if k not in DECODE_KNOBS})
    config.check_layers(num_layers)
    decode = {k: given.get(k, default) for k, default in DECODE_KNOBS.items()}
    stack = decode["max_stack"]
    if not (isinstance(stack, int) and not isinstance(stack, bool) and stack >= 1):
        raise EarlyExitError(f"max_stack must be an integer >= 1, not {stack!r}")
    decode["stop_at_eos"] = bool(decode["stop_at_eos"])
    return config, decode


def context_length(engine: LayerEngine) -> int:
    """Tokens the model attends over: prompt plus completion must fit in it."""
    return int(getattr(engine.model.config, "max_position_embeddings", 0) or 2048)


def make_request(
    engine: LayerEngine,
    prompt: str | list[Mapping[str, str]],
    method: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    stop: str | Sequence[str],
    chat: bool,
    knobs: Mapping[str, Any],
) -> GenRequest:
    """`EarlyExit.generate`'s arguments checked and the prompt rendered (see there)."""
    if isinstance(prompt, list):
        prompt, chat = render_messages(engine, prompt), False
    if not isinstance(prompt, str) or not prompt.strip():
        raise EarlyExitError("the prompt is empty; pass some text to generate from")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise EarlyExitError(f"max_new_tokens must be an integer >= 1, not {max_new_tokens!r}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) and s for s in stops):
        raise EarlyExitError("stop strings must be non-empty strings")
    if seed is None:
        seed = random.getrandbits(62)
    sampling = SamplingConfig(float(temperature), float(top_p), int(seed))
    parsed = parse_method(method, sampling)  # unknown methods fail before any work
    config, settings = check_knobs(knobs, engine.num_layers)
    text = prompt
    if chat:
        from earlyexit.tasks.generation import render_prompt

        text = render_prompt(engine.tokenizer, prompt)
    _check_context(engine, text, max_new_tokens)
    decode = DecodeConfig(
        max_new_tokens=max_new_tokens, stop_strings=stops, sampling=sampling, **settings
    )
    return GenRequest(parsed, text, decode, config)


def _check_context(engine: LayerEngine, text: str, max_new_tokens: int) -> None:
    length = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    limit = context_length(engine)
    if length + max_new_tokens > limit:
        raise EarlyExitError(
            f"the prompt is {length} token(s) and max_new_tokens {max_new_tokens}: over the "
            f"model's context of {limit} tokens; shorten the prompt or ask for fewer tokens"
        )


def render_messages(engine: LayerEngine, messages: list) -> str:
    """Chat messages ({"role", "content"} dicts) through the tokenizer's chat template,
    ready for the assistant's turn."""
    for message in messages:
        if not (
            isinstance(message, Mapping)
            and message.get("role") in ROLES
            and isinstance(message.get("content"), str)
        ):
            raise EarlyExitError(
                "each message must be {'role': one of " + ", ".join(ROLES) + ", "
                "'content': a string}"
            )
    if not messages:
        raise EarlyExitError("messages is empty; pass at least one message")
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise EarlyExitError(
            f"{engine.loaded.name} has no chat template; send plain text (a completion) instead"
        )
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)


def with_deadline(
    listener: Callable[[int, int], None] | None, began: float, limit: float
) -> Callable[[int, int], None]:
    """`listener`, raising RequestTimeout at the first token past `limit` seconds."""

    def timed(token: int, layer: int) -> None:
        if time.perf_counter() - began > limit:
            raise RequestTimeout(limit)
        if listener is not None:
            listener(token, layer)

    return timed
