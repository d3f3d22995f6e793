"""The shallow exit: layer k and a readout there, with the confidence (top-1 minus top-2
probability, or top-1) every early-exit loop exits by. Shared by the batch-1 loops
(shallow_deep.py, speculative.py), the drafters and the scheduler's FREE rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from earlyexit.decoding.sampling import Sampler
from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine
from earlyexit.errors import EarlyExitError
from earlyexit.readouts.draft_block import DraftBlock
from earlyexit.readouts.readout import ExitReadout, top_two


def confidence(logits: torch.Tensor, measure: str = "gap") -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, argmax) per row: top-1 minus top-2 probability, or top-1 probability."""
    top = top_two(logits)
    value = top.values[..., 0] - top.values[..., 1] if measure == "gap" else top.values[..., 0]
    return value, top.indices[..., 0]


@dataclass
class Guess:
    """What the shallow exit says about the next token."""

    confidence: float  # of the untempered readout (the exit criterion)
    top: int  # its argmax: what agreement with the deep layers is judged on
    token: int  # the token to emit: `top` when greedy, else a draw
    probs: torch.Tensor | None = None  # full-vocabulary draft distribution (sampling only)


class ShallowExit:
    """The shallow half of the module: layer k and its readout (full vocabulary, or only
    `vocab` ids: a 49k-row LM head costs as much as several layers, so a shallow exit
    that reads a few thousand likely ids is much cheaper; its argmax is mapped back).

    With a trained draft block (readouts/draft_block.py) the readout reads the block's
    output instead of layer k's: the block attends over the layer-k states of the whole
    context, kept as one more layer of the request's cache, so every input that stands
    must pass through `read` once (loops call it with each input's layer-k state)."""

    def __init__(
        self,
        readout: ExitReadout,
        layer: int,
        vocab: torch.Tensor | None = None,
        measure: str = "gap",
        block: DraftBlock | None = None,
    ) -> None:
        engine = readout.engine
        if not 1 <= layer < engine.num_layers:
            raise EarlyExitError(f"shallow exit layer must lie in 1..{engine.num_layers - 1}")
        if measure not in ("gap", "top1"):
            raise EarlyExitError(f"confidence measure must be gap or top1, not {measure}")
        if block is not None and block.layer != layer:
            raise EarlyExitError(f"the draft block reads layer {block.layer}, not {layer}")
        self.readout, self.layer, self.vocab, self.measure = readout, layer, vocab, measure
        self.block = block
        self._cache: LayerKVCache | None = None  # the request whose cache holds the block's KV

    @classmethod
    def restricted(
        cls, readout: ExitReadout, layer: int, measure: str = "gap", block: DraftBlock | None = None
    ) -> ShallowExit:
        """Read out over the readout's training vocabulary (plus EOS) only."""
        if readout.vocabulary is None:
            raise EarlyExitError(
                "this readout has no saved vocabulary; train it again with `heads train`"
            )
        ids = readout.vocabulary.tolist()
        eos = readout.engine.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return cls(readout, layer, torch.tensor(sorted(ids)), measure, block)

    @classmethod
    def of_block(cls, block: DraftBlock, measure: str = "gap") -> ShallowExit:
        """The exit through a draft block: the model's own norm and head on its output, over
        the vocabulary it was trained on."""
        readout = ExitReadout(block.engine)
        readout.vocabulary = block.vocabulary
        return cls.restricted(readout, block.layer, measure, block)

    def read(self, states: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        """The state [1, H] the readout reads after new inputs' layer-k states [1, n, H]:
        the last one's, or the block's output for it (the block takes them all in)."""
        if self.block is None:
            return states[:, -1]
        if self._cache is not cache:  # a new request: its cache gets the block's layer
            self.block.block.self_attn.layer_idx = cache.add_layer()
            self._cache = cache
        return self.block(states, cache)[:, -1]

    def _token(self, index: int) -> int:
        return index if self.vocab is None else int(self.vocab[index])

    def predict(self, hidden: torch.Tensor) -> tuple[float, int]:
        """(confidence, argmax token) of the readout on one state."""
        guess = self.guess(hidden)
        return guess.confidence, guess.top

    def guess(self, hidden: torch.Tensor, sampler: Sampler | None = None) -> Guess:
        logits = self.readout.logits(hidden.reshape(1, -1), self.layer, self.vocab)[0]
        conf, index = confidence(logits, self.measure)
        top = self._token(int(index))
        if sampler is None or sampler.greedy:
            return Guess(float(conf), top, top)
        probs = sampler.probs(logits)
        token = self._token(sampler.draw(probs))
        if self.vocab is not None:  # zero outside the rows read: q must cover the vocabulary
            vocab_size = self.readout.engine.vocab_size
            probs = torch.zeros(vocab_size).index_copy_(0, self.vocab, probs)
        return Guess(float(conf), top, token, probs)


def next_input(engine: LayerEngine, token: int) -> torch.Tensor:
    """The embedding of one token as a [1, 1, H] input."""
    return engine.embed(torch.tensor([[token]], device=engine.device))
