"""earlyexit as an lm-evaluation-harness model (`lm_eval.api.model.LM`, registered as
"earlyexit"): any harness task, scored by the harness, run through an early-exit method.

- `generate_until`: `EarlyExit.generate` with the request's stop strings and token budget,
  through the chosen generation method (full, free, lossless, calm, ...); greedy unless the
  task asks to sample.
- `loglikelihood` / `loglikelihood_rolling`: the engine's prefill over context +
  continuation, read out at the last layer (the full model: the default), or
  - with `score_layer=K`, at layer K through the model's own norm and head (the saved
    readout's adapter if one is trained);
  - with `score_exit=confidence:T`, at the layer `earlyexit eval`'s `confidence:T` method
    picks for the context: the first whose readout at the context's last position has a
    top-1 minus top-2 probability gap >= T (the last layer if none).
  Scoring at an exit layer changes every score: it measures what the layer-K model knows,
  not the full model; `exit_layers` records the layer each request was scored at.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from earlyexit.api import EarlyExit
from earlyexit.errors import EarlyExitError


def _flag(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


@register_model("earlyexit")
class EarlyExitLM(LM):
    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        method: str = "full",
        dtype: str = "auto",
        batch_size: int | str = 8,
        score_layer: int | str | None = None,
        score_exit: str | None = None,
        max_length: int | str | None = None,
        ee: EarlyExit | None = None,
        **knobs: Any,
    ) -> None:
        """`pretrained`: what `EarlyExit.load` takes; `method`: the generation method of
        `generate_until`; `knobs`: EarlyExit.generate knobs (shallow_layer, ...)."""
        super().__init__()
        from earlyexit.runtime.generation import parse_method

        parse_method(method)
        self.ee = ee or EarlyExit.load(pretrained, dtype=dtype)
        self.engine = self.ee.engine
        self.method, self.knobs = method, knobs
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        self.score_layer = int(score_layer) if score_layer not in (None, "", "None") else None
        layers = self.engine.num_layers
        if self.score_layer is not None and not 1 <= self.score_layer <= layers:
            raise EarlyExitError(f"score_layer must lie in 1..{layers}")
        self.exit_policy = _exit_policy(score_exit) if score_exit else None
        if self.exit_policy is not None and self.score_layer is not None:
            raise EarlyExitError("give score_layer or score_exit, not both")
        self.exit_layers: list[int] = []  # per scored request, with score_exit
        self.max_length = int(max_length or self.ee.context_length)
        self._readout = None
        self.generation_reports: list = []  # every generate_until request's report

    # ---- what the harness asks of a model ---------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.tokenizer.name_or_path).replace("/", "__")

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.engine.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation as the harness's HF model splits them:
        trailing spaces of the context move to the continuation, and the continuation is
        what the whole text's tokens add after the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if not ctx:  # empty context: condition on the end-of-text token
            ctx = [self.engine.tokenizer.eos_token_id]
            whole = ctx + whole
        return ctx, whole[len(ctx) :]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._pair(*req.args) for req in requests]
        return self._score(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Each text's total log-likelihood, in windows of max_length tokens (each window
        conditioned on the tokens before it, up to max_length - 1 of them)."""
        out = []
        eos = self.engine.tokenizer.eos_token_id
        for req in tqdm(requests, disable=disable_tqdm, desc="rolling loglikelihood"):
            tokens = [eos, *self._encode(req.args[0])]
            pairs = []
            step = self.max_length - 1
            for start in range(1, len(tokens), step):
                context_from = max(0, start + step - self.max_length)
                pairs.append((tokens[context_from:start], tokens[start : start + step]))
            out.append(sum(score for score, _ in self._score(pairs, True)))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc=f"generate ({self.method})"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sample = _flag(kwargs.get("do_sample", False))
            temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0))
            generation = self.ee.generate(
                context,
                method=self.method,
                max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                temperature=temperature if sample else 0.0,
                top_p=float(kwargs.get("top_p", 1.0)),
                seed=0,
                stop=[u for u in until if u],
                chat=False,
                **self.knobs,
            )
            out.append(generation.text)
            self.generation_reports.append(generation.report)
            self.cache_hook.add_partial("generate_until", req.args, generation.text)
        return out

    def generation_summary(self) -> dict[str, float | int] | None:
        """Early exit over every generate_until request so far: decode-phase tokens/s,
        layers per token and the share of tokens that exited shallow (token-weighted)."""
        reports = self.generation_reports
        if not reports:
            return None
        tokens = sum(max(r.completion_tokens - 1, 0) for r in reports)
        seconds = sum(r.decode_seconds for r in reports)
        weights = [max(r.completion_tokens - 1, 0) for r in reports]
        total = sum(weights) or 1
        return {
            "requests": len(reports),
            "completion_tokens": sum(r.completion_tokens for r in reports),
            "decode_tokens_per_s": tokens / seconds if seconds else 0.0,
            "avg_layers": sum(w * r.avg_layers for w, r in zip(weights, reports, strict=True))
            / total,
            "shallow_fraction": sum(
                w * r.shallow_fraction for w, r in zip(weights, reports, strict=True)
            )
            / total,
            "num_layers": self.engine.num_layers,
        }

    # ---- scoring ---------------------------------------------------------------------
    def _score(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether it is the greedy
        continuation) per (context, continuation) pair, in left-padded batches."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        pad_id = self.engine.tokenizer.pad_token_id or 0
        for batch in tqdm(batches, disable=disable_tqdm, desc="loglikelihood"):
            rows = []
            for i in batch:
                ctx, cont = pairs[i]
                ids = (ctx + cont)[-(self.max_length + 1) :][:-1]  # the inputs predicting cont
                rows.append((ids, cont))
            width = max(len(ids) for ids, _ in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            pad = torch.zeros(len(rows), dtype=torch.long)
            for r, (ids, _) in enumerate(rows):
                input_ids[r, width - len(ids) :] = torch.tensor(ids)
                pad[r] = width - len(ids)
            last = torch.tensor([width - len(cont) - 1 for _, cont in rows])
            logprobs = self._log_probs(input_ids, pad, last)
            for r, i in enumerate(batch):
                cont = rows[r][1]
                tail = logprobs[r, width - len(cont) :]
                target = torch.tensor(cont)
                score = float(tail.gather(-1, target[:, None]).sum())
                results[i] = (score, bool((tail.argmax(-1) == target).all()))
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _log_probs(
        self, input_ids: torch.Tensor, pad: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        """Log-probabilities at every position; `last`: each row's last context position
        (where score_exit decides)."""
        engine = self.engine
        if self.exit_policy is not None:
            return self._log_probs_at_exit(input_ids, pad, last)
        if self.score_layer is None or self.score_layer == engine.num_layers:
            hidden = engine.prefill(input_ids, pad).hidden
            logits = engine.logits(hidden)
        else:
            state = engine.prefill(input_ids, pad, upto=self.score_layer)
            logits = self._layer_readout().logits(state.hidden, self.score_layer)
        return torch.log_softmax(logits.float(), dim=-1)

    def _log_probs_at_exit(
        self, input_ids: torch.Tensor, pad: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        engine, readout = self.engine, self._layer_readout()
        layers = engine.num_layers
        state = engine.prefill(input_ids, pad, keep_layers=True)
        assert state.layer_hidden is not None
        rows = torch.arange(input_ids.shape[0])
        exit_at = torch.full((len(rows),), layers)
        for layer in range(1, layers):
            waiting = exit_at == layers
            if not waiting.any():
                break
            states = state.layer_hidden[layer - 1][rows, last].unsqueeze(1)
            logits = readout.logits(states, layer)[:, 0]
            stop = self.exit_policy.should_exit(layer, logits, layers)
            exit_at[waiting & stop] = layer
        out = []
        for r, layer in enumerate(exit_at.tolist()):
            hidden = state.layer_hidden[layer - 1][r : r + 1]
            logits = engine.logits(hidden) if layer == layers else readout.logits(hidden, layer)
            out.append(torch.log_softmax(logits.float(), dim=-1))
        self.exit_layers.extend(exit_at.tolist())
        return torch.cat(out)

    def _layer_readout(self) -> Any:
        if self._readout is None:
            self._readout = self.ee.general_readout
        return self._readout


def _exit_policy(spec: str) -> Any:
    """`confidence:T` as `earlyexit eval` builds it (top-1 minus top-2 gap >= T)."""
    from earlyexit.policies.simple import ConfidencePolicy

    name, _, value = spec.partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = -1.0
    if name != "confidence" or not 0.0 < threshold <= 1.0:
        raise EarlyExitError(f"score_exit must be confidence:T with T in (0, 1], not '{spec}'")
    return ConfidencePolicy(threshold)
