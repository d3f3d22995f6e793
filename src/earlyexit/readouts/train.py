"""Train per-layer exit adapters: closed-form least squares, then KL distillation.

Hidden states of every layer are collected once on a text corpus and reused by every step.
Stage 1 fits each layer's affine map to the final layer's (RMS-normalised) hidden state by
ridge regression, in closed form, in seconds. Stage 2 tunes all maps jointly by KL
divergence to the final layer's next-token distribution, which is what a readout is judged on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from earlyexit.corpora import load_corpus, token_chunks
from earlyexit.engine.engine import LayerEngine
from earlyexit.readouts.readout import ExitReadout, LayerAdapter, unit_rms


@dataclass
class TrainConfig:
    corpus: str = "wikitext-2-valid"
    tokens: int = 32768
    seq_len: int = 256
    steps: int = 300
    batch_tokens: int = 512
    lr: float = 1e-3
    ridge: float = 1e-2
    vocab_top_k: int = 16  # distillation vocabulary: union of the teacher's top-k ids ...
    vocab_size: int = 4096  # ... capped at this many (see `teacher_vocabulary`)
    vocab_random: int = 2048  # plus this many random other ids, fresh every step
    rank: int | None = None  # None: full affine map per layer
    layers: list[int] | None = None  # default: 1..L-1
    seed: int = 0
    heldout_corpus: str = "wikitext-2-test"
    heldout_tokens: int = 4096


@dataclass
class LayerMetrics:
    layer: int
    kl: float  # KL(final || readout), nats per token
    top1: float  # agreement of the readout's argmax with the final layer's argmax
    lens_kl: float  # the same for the plain logit lens, for reference
    lens_top1: float


@dataclass
class TrainResult:
    readout: ExitReadout
    config: TrainConfig
    metrics: list[LayerMetrics] = field(default_factory=list)
    seconds: float = 0.0
    vocabulary: list[int] = field(default_factory=list)  # the teacher's ids, by id
    head_products: str = "fp32"  # or "bf16 autocast" where that was timed faster

    def metadata(self) -> dict:
        return {
            "config": asdict(self.config),
            "seconds": round(self.seconds, 1),
            "head_products": self.head_products,
            "heldout": [asdict(m) for m in self.metrics],
            "vocabulary": self.vocabulary,
        }


@dataclass
class HiddenStates:
    """Outputs of layers 1..L on a token stream, [tokens, H] each, plus the final layer."""

    by_layer: dict[int, torch.Tensor]
    final: torch.Tensor


@torch.inference_mode()
def collect_hidden(
    engine: LayerEngine,
    chunks: torch.Tensor,
    layers: list[int],
    batch_rows: int = 4,
    desc: str = "collecting hidden states",
) -> HiddenStates:
    by_layer: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    final: list[torch.Tensor] = []
    for start in tqdm(range(0, chunks.shape[0], batch_rows), desc=desc, leave=False):
        rows = chunks[start : start + batch_rows].to(engine.device)
        state = engine.prefill(rows, keep_layers=True)
        assert state.layer_hidden is not None
        for layer in layers:
            by_layer[layer].append(
                state.layer_hidden[layer - 1].reshape(-1, engine.hidden_size).float()
            )
        final.append(state.hidden.reshape(-1, engine.hidden_size).float())
    return HiddenStates({k: torch.cat(v) for k, v in by_layer.items()}, torch.cat(final))


def fit_ridge(
    adapter: LayerAdapter, inputs: torch.Tensor, targets: torch.Tensor, ridge: float
) -> None:
    """Least-squares fit of a full affine adapter: normalised layer state -> normalised final."""
    x = unit_rms(inputs.double())
    y = unit_rms(targets.double())
    x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    gram = x1.T @ x1
    gram += ridge * x.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype) / gram.shape[0]
    solution = torch.linalg.solve(gram, x1.T @ y)  # [H+1, H]
    with torch.no_grad():
        adapter.weight.copy_(solution[:-1].T.float())
        adapter.bias.copy_(solution[-1].float())


_BF16_FASTER: dict[tuple[int, int], bool] = {}  # (hidden size, threads) -> timed here


def bf16_head_is_faster(hidden_size: int, rows: int = 256, vocab: int = 6144) -> bool:
    """Whether the head's products (forward and backward, as a distillation step runs them)
    are faster under bf16 autocast than in fp32 on this CPU, timed once per process: bf16
    is several times faster where the CPU multiplies bf16 natively (AVX512-BF16, AMX) and
    several times slower where it does not (the products are emulated, e.g. on an AMD EPYC
    Zen 3), so neither is hard-coded."""
    key = (hidden_size, torch.get_num_threads())
    if key not in _BF16_FASTER:
        with torch.inference_mode(False), torch.enable_grad():  # callers may be in no_grad
            _BF16_FASTER[key] = _time_bf16_head(hidden_size, rows, vocab)
    return _BF16_FASTER[key]


def _time_bf16_head(hidden_size: int, rows: int, vocab: int) -> bool:
    """Seconds of the head's forward and backward, bf16 autocast against fp32: True when bf16
    is faster (median of 3 interleaved rounds after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden_size, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(4):  # round 0 warms up
        for bf16 in (False, True):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = torch.nn.functional.linear(x, w)
            torch.log_softmax(logits.float(), dim=-1).sum().backward()
            if round_:
                times[bf16].append(time.perf_counter() - start)
    return statistics.median(times[True]) < statistics.median(times[False])


def _log_probs(
    engine: LayerEngine, hidden: torch.Tensor, vocab: torch.Tensor | None = None
) -> torch.Tensor:
    bf16 = hidden.device.type == "cpu" and bf16_head_is_faster(hidden.shape[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = engine.head_logits(engine.final_norm(hidden), vocab)
    return torch.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def teacher_vocabulary(
    engine: LayerEngine, final: torch.Tensor, top_k: int, max_size: int, batch: int = 1024
) -> torch.Tensor:
    """Token ids that carry the final layer's probability mass on this corpus.

    A full-vocabulary softmax per layer per step costs more than everything else in
    training; the teacher's mass sits on a few thousand ids, so distillation runs on the
    union of its per-token top-k (most frequent first, capped at `max_size`), plus fresh
    random ids every step (see `distill`).
    """
    counts = torch.zeros(engine.vocab_size, dtype=torch.long)
    for start in range(0, final.shape[0], batch):
        top = _log_probs(engine, final[start : start + batch]).topk(top_k, dim=-1).indices
        counts += torch.bincount(top.flatten().cpu(), minlength=engine.vocab_size)
    seen = int((counts > 0).sum())
    return counts.argsort(descending=True)[: min(seen, max_size)].sort().values


def _step_vocabulary(
    core: torch.Tensor, vocab_size: int, extra: int, generator: torch.Generator
) -> torch.Tensor:
    """The core ids plus `extra` random others, so that a readout is also penalised for
    putting mass on ids outside the core set (a fixed subset would leave them unchecked)."""
    if extra <= 0:
        return core
    outside = torch.ones(vocab_size, dtype=torch.bool)
    outside[core] = False
    others = outside.nonzero().squeeze(1)
    pick = others[torch.randperm(others.numel(), generator=generator)[:extra]]
    return torch.cat([core, pick])


def distill(
    engine: LayerEngine,
    adapters: dict[int, LayerAdapter],
    states: HiddenStates,
    config: TrainConfig,
) -> torch.Tensor:
    """Tune all adapters jointly: minimise KL(final-layer distribution || readout).

    Returns the teacher vocabulary (the ids that carry the final layer's mass on this
    corpus): a shallow exit can read out over those only (decoding/shallow_deep.py)."""
    vocab = teacher_vocabulary(engine, states.final, config.vocab_top_k, config.vocab_size)
    if config.steps <= 0:
        return vocab
    params = [p for adapter in adapters.values() for p in adapter.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
    generator = torch.Generator().manual_seed(config.seed)
    num_tokens = states.final.shape[0]
    engine.model.requires_grad_(False)
    bar = tqdm(range(config.steps), desc="distilling readouts", leave=False)
    for _ in bar:
        idx = torch.randint(num_tokens, (config.batch_tokens,), generator=generator)
        step_vocab = _step_vocabulary(vocab, engine.vocab_size, config.vocab_random, generator)
        with torch.no_grad():
            teacher = _log_probs(engine, states.final[idx], step_vocab)
            teacher_p = teacher.exp()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for layer, adapter in adapters.items():
            student = _log_probs(engine, adapter(states.by_layer[layer][idx]), step_vocab)
            loss = (teacher_p * (teacher - student)).sum(-1).mean()
            loss.backward()
            total += loss.item()
        optimizer.step()
        schedule.step()
        bar.set_postfix(kl=f"{total / max(1, len(adapters)):.3f}")
    return vocab


@torch.no_grad()
def evaluate(
    engine: LayerEngine, readout: ExitReadout, states: HiddenStates, batch: int = 512
) -> list[LayerMetrics]:
    """Held-out KL to the final layer and top-1 agreement, for the readout and the plain lens."""
    sums: dict[int, list[float]] = {layer: [0.0, 0.0, 0.0, 0.0] for layer in states.by_layer}
    n = states.final.shape[0]
    for start in range(0, n, batch):
        teacher = _log_probs(engine, states.final[start : start + batch])
        top = teacher.argmax(-1)
        for layer, hidden in states.by_layer.items():
            h = hidden[start : start + batch]
            for slot, translated in ((0, readout.translate(h, layer)), (2, h)):
                student = _log_probs(engine, translated)
                kl = (teacher.exp() * (teacher - student)).sum(-1)
                sums[layer][slot] += kl.sum().item()
                sums[layer][slot + 1] += (student.argmax(-1) == top).sum().item()
    return [
        LayerMetrics(layer, s[0] / n, s[1] / n, s[2] / n, s[3] / n)
        for layer, s in sorted(sums.items())
    ]


def train_readout(
    engine: LayerEngine,
    config: TrainConfig,
    chunks: torch.Tensor | None = None,
    heldout_chunks: torch.Tensor | None = None,
) -> TrainResult:
    """Collect hidden states, fit (ridge), distill (KL), evaluate on held-out text.

    `chunks` / `heldout_chunks` ([n, seq_len] token ids) replace the named corpora, e.g.
    with text the model generated itself (readouts/self_distill.py)."""
    began = time.perf_counter()
    torch.manual_seed(config.seed)
    layers = config.layers or list(range(1, engine.num_layers))
    if chunks is None:
        chunks = token_chunks(
            engine.tokenizer, load_corpus(config.corpus), config.seq_len, config.tokens
        )
    states = collect_hidden(engine, chunks, layers)
    adapters = {layer: LayerAdapter(engine.hidden_size, config.rank) for layer in layers}
    for layer, adapter in tqdm(adapters.items(), desc="least-squares fit", leave=False):
        if config.rank is None:
            fit_ridge(adapter, states.by_layer[layer], states.final, config.ridge)
    vocabulary = distill(engine, adapters, states, config)
    del states
    readout = ExitReadout(engine, adapters)
    if heldout_chunks is None:
        heldout_chunks = token_chunks(
            engine.tokenizer,
            load_corpus(config.heldout_corpus),
            config.seq_len,
            config.heldout_tokens,
        )
    heldout = collect_hidden(engine, heldout_chunks, layers, desc="held-out hidden states")
    metrics = evaluate(engine, readout, heldout)
    readout.vocabulary = vocabulary
    products = "bf16 autocast" if bf16_head_is_faster(engine.hidden_size) else "fp32"
    seconds = time.perf_counter() - began
    return TrainResult(readout, config, metrics, seconds, vocabulary.tolist(), products)
