"""A trained draft block: one decoder layer on top of layer E, read by the model's own head.

An affine readout at layer E only re-expresses what layer E already knows; what the deeper
layers add comes mostly from attending to the context again. So, as Kangaroo and EAGLE do,
a small block with its own attention runs over the layer-E states of the context and is
distilled to predict the final layer's next token. It is a copy of the model's own
decoder layer right after E (its class, norms and rotary embedding, its weights as the
start) with its output projections zeroed, so that it starts as the identity, followed by
the affine readout map of readouts/readout.py fitted by least squares: training starts from
the affine readout's agreement and can only add what attention brings. When decoding, its
KV is one more layer of the request's cache (decoding/shallow_deep.py, `ShallowExit.read`);
it is trained on layer-E states cached once from in-domain text (the model's own answers,
readouts/self_distill.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from earlyexit.engine.cache import LayerKVCache
from earlyexit.engine.engine import LayerEngine
from earlyexit.engine.masks import attention_mask
from earlyexit.engine.quant import plain_copy
from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_dir, home
from earlyexit.readouts.readout import LayerAdapter
from earlyexit.readouts.train import (
    _log_probs,
    _step_vocabulary,
    collect_hidden,
    fit_ridge,
    teacher_vocabulary,
)


class DraftBlock(nn.Module):
    """Layer-E states -> the final layer's next-token logits, through one decoder layer."""

    def __init__(self, engine: LayerEngine, layer: int) -> None:
        super().__init__()
        if not 1 <= layer < engine.num_layers:
            raise EarlyExitError(f"draft block layer must lie in 1..{engine.num_layers - 1}")
        self.engine_ref = [engine]  # not a submodule: the model's weights are not ours
        self.layer = layer
        self.kind = engine.arch.layer_types[layer]
        self.block = plain_copy(engine.arch.layers[layer]).float()  # int4/int8 -> fp32 Linear
        self.block.self_attn.layer_idx = 0  # the only layer of its own cache
        with torch.no_grad():  # identity at the start: the residual passes through
            self.block.self_attn.o_proj.weight.zero_()
            self.block.mlp.down_proj.weight.zero_()
        self.adapter = LayerAdapter(engine.hidden_size)
        self.block.requires_grad_(True)
        self.vocabulary: torch.Tensor | None = None  # ids read when drafting (+ EOS)
        self.path: Path | None = None  # where it was loaded from (reported)
        self.heldout_top1: float | None = None  # its agreement with the final layer

    def describe(self) -> str:
        """One line for reports: which block, where from, how good."""
        where = f" ({self.path})" if self.path is not None else " (in memory)"
        agree = (
            f", held-out top-1 agreement {self.heldout_top1:.1%}"
            if self.heldout_top1 is not None
            else ""
        )
        return f"layer {self.layer}: draft block{where}{agree}"

    @property
    def engine(self) -> LayerEngine:
        return self.engine_ref[0]

    def forward(self, hidden: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        """The block over new layer-E states [B, n, H]; with `cache`, they take its next slots
        (attending to every earlier slot), else they form whole causal sequences."""
        arch = self.engine.arch
        offset = cache.lengths[self.block.self_attn.layer_idx] if cache is not None else 0
        batch, n = hidden.shape[:2]
        positions = torch.arange(offset, offset + n, device=hidden.device).expand(batch, n)
        hidden = hidden.to(self.adapter.bias.dtype)
        rope = arch.position_embeddings(hidden, positions, self.kind)
        pad = cache.pad if cache is not None else torch.zeros(batch, dtype=torch.long)
        mask = attention_mask(offset, n, pad, False, arch.window_of(self.kind), hidden.device)
        out = self.block(
            hidden,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=cache is not None,
            position_embeddings=rope,
        )
        return self.adapter(out)


@dataclass
class BlockConfig:
    steps: int = 300
    batch_rows: int = 4  # sequences per step
    seq_len: int = 256  # tokens per sequence (chunks are cut to this)
    lr: float = 3e-4
    vocab_top_k: int = 16
    vocab_size: int = 4096
    vocab_random: int = 2048
    seed: int = 0


@dataclass
class BlockTrainResult:
    block: DraftBlock
    config: BlockConfig
    seconds: float
    heldout_top1: float  # agreement with the final layer's argmax on held-out text
    losses: list[float] = field(default_factory=list)

    def metadata(self) -> dict:
        return {
            "layer": self.block.layer,
            "config": asdict(self.config),
            "seconds": round(self.seconds, 1),
            "heldout_top1": self.heldout_top1,
        }


def layer_states(
    engine: LayerEngine, chunks: torch.Tensor, layers: list[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Outputs of `layers` and of the last layer on [n, T] token chunks, as [n, T, H]: the
    readouts' `collect_hidden`, with each chunk kept whole (the block attends along it)."""
    states = collect_hidden(engine, chunks, layers, desc="layer states")
    shape = (*chunks.shape, engine.hidden_size)
    return {k: v.view(shape) for k, v in states.by_layer.items()}, states.final.view(shape)


def train_block(
    engine: LayerEngine,
    layer: int,
    states: torch.Tensor,
    final: torch.Tensor,
    heldout: tuple[torch.Tensor, torch.Tensor],
    config: BlockConfig,
) -> BlockTrainResult:
    """Distil a draft block at `layer`: KL(final layer || block) over the teacher's
    vocabulary plus fresh random ids per step (as the affine readouts are trained)."""
    began = time.perf_counter()
    torch.manual_seed(config.seed)
    block = DraftBlock(engine, layer)
    flat_final = final.reshape(-1, final.shape[-1])
    fit_ridge(block.adapter, states.reshape(-1, states.shape[-1]), flat_final, ridge=1e-2)
    vocab = teacher_vocabulary(engine, flat_final, config.vocab_top_k, config.vocab_size)
    engine.model.requires_grad_(False)
    optimizer = torch.optim.AdamW(block.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, total_steps=max(1, config.steps), pct_start=0.1
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    bar = tqdm(range(config.steps), desc=f"draft block @{layer}", leave=False)
    for _ in bar:
        rows = torch.randint(states.shape[0], (config.batch_rows,), generator=generator)
        step_vocab = _step_vocabulary(vocab, engine.vocab_size, config.vocab_random, generator)
        with torch.no_grad():
            teacher = _log_probs(engine, final[rows], step_vocab)
        student = _log_probs(engine, block(states[rows]), step_vocab)
        loss = (teacher.exp() * (teacher - student)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
    block.requires_grad_(False)
    block.vocabulary = vocab
    top1 = heldout_agreement(block, *heldout)
    return BlockTrainResult(block, config, time.perf_counter() - began, top1, losses)


@torch.no_grad()
def heldout_agreement(
    block: DraftBlock | None,
    states: torch.Tensor,
    final: torch.Tensor,
    engine: LayerEngine | None = None,
) -> float:
    """Top-1 agreement with the final layer (full vocabulary) on held-out [n, T, H] states:
    through the block, or (`block=None`, with `engine`) the plain logit lens."""
    eng = block.engine if block is not None else engine
    assert eng is not None
    hits = total = 0
    for row in range(states.shape[0]):
        out = block(states[row : row + 1])[0] if block is not None else states[row]
        student = eng.logits(out.to(eng.dtype)).argmax(-1)
        teacher = eng.logits(final[row].to(eng.dtype)).argmax(-1)
        hits += int((student == teacher).sum())
        total += teacher.numel()
    return hits / total


def block_dir(engine: LayerEngine, layer: int) -> Path:
    return home() / "draft-blocks" / engine.loaded.name / f"block-{layer}"


def save_block(result: BlockTrainResult, path: Path) -> Path:
    block = result.block
    tensors = {k: v.contiguous() for k, v in block.state_dict().items()}
    assert block.vocabulary is not None
    tensors["vocabulary"] = block.vocabulary
    meta = {**result.metadata(), "fingerprint": block.engine.fingerprint}
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / "block.safetensors"))
        (tmp / "block.json").write_text(json.dumps(meta, indent=2))
    return path


def load_block(engine: LayerEngine, path: Path) -> DraftBlock:
    meta_path = path / "block.json"
    if not meta_path.exists():
        raise EarlyExitError(
            f"no draft block at {path}: train one with `earlyexit heads train-block`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != engine.fingerprint:
        raise EarlyExitError(f"the draft block at {path} was trained for another model")
    tensors = load_file(str(path / "block.safetensors"))
    block = DraftBlock(engine, int(meta["layer"]))
    block.vocabulary = tensors.pop("vocabulary")
    block.load_state_dict(tensors)
    block.requires_grad_(False)
    block.path = path
    block.heldout_top1 = meta.get("heldout_top1")
    return block.to(engine.dtype)


def train_block_on_text(
    engine: LayerEngine,
    layer: int,
    chunks: torch.Tensor,
    heldout_chunks: torch.Tensor,
    config: BlockConfig,
) -> BlockTrainResult:
    """Cache layer-`layer` and final states of [n, T] token chunks once, then distil."""
    began = time.perf_counter()
    states, final = layer_states(engine, chunks[:, : config.seq_len], [layer])
    held, held_final = layer_states(engine, heldout_chunks[:, : config.seq_len], [layer])
    result = train_block(engine, layer, states[layer], final, (held[layer], held_final), config)
    result.seconds = time.perf_counter() - began  # the states' collection included
    return result


def saved_block(engine: LayerEngine, layer: int | None) -> DraftBlock:
    """The draft block saved for this model at `layer`, or (None) the only one saved."""
    if layer is None:
        root = home() / "draft-blocks" / engine.loaded.name
        found = sorted(root.glob("block-*/block.json")) if root.exists() else []
        if len(found) != 1:
            raise EarlyExitError(
                f"{len(found)} draft blocks saved for {engine.loaded.name}: "
                + (
                    "train one with `earlyexit heads train-block`"
                    if not found
                    else "name one with --block-layer"
                )
            )
        return load_block(engine, found[0].parent)
    return load_block(engine, block_dir(engine, layer))
