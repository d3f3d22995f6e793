"""AdaInfer (Fan et al., 2024): stop when a classic classifier on readout statistics says so.

Per layer, the features of that layer's readout: top-1 probability and top-1 minus top-2
gap over the label words, the depth, and optionally the same two statistics over the full
vocabulary (the paper's features; they cost a full LM-head readout per layer). Training
labels come from a calibration split: "stop" at a layer whose prediction equals the final
layer's and stays equal at every deeper layer. Two stoppers:
- `svm`: a linear SVM (scikit-learn) on one layer's features; stop at the first layer it
  calls "stop" (`AdaInferPolicy`, here).
- `crf`: a linear-chain CRF over the layer sequence (`CRFStopPolicy`, here; the CRF model
  itself is in `policies/crf.py`).

Both give each layer an online stop score, and the decision margin on that score is then
calibrated on the same split so that at most `tolerance` of the exits disagree with the
final layer (CALM-style): the raw "stop" labels are noisy where early readouts answer one
class for every input, and uncalibrated stoppers exit far too early.

A fitted stopper of either kind is saved as one JSON file (`save_stopper` / `load_stopper`,
format 2): its kind, feature names, and the policy's fields (the CRF model as base64).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from earlyexit.errors import EarlyExitError
from earlyexit.paths import atomic_file
from earlyexit.policies.base import FEATURES, VOCAB_FEATURES, ExitPolicy, readout_features
from earlyexit.policies.crf import CRFTagger, item_features, train_crf

FORMAT_VERSION = 2


def feature_names(vocab: bool) -> list[str]:
    return [*FEATURES, *(VOCAB_FEATURES if vocab else ())]


def layer_features(
    logits: torch.Tensor, layer: int, num_layers: int, vocab: torch.Tensor | None
) -> torch.Tensor:
    """[rows, F]: label-word features, then full-vocabulary statistics when given."""
    feats = readout_features(logits, layer, num_layers)
    return feats if vocab is None else torch.cat([feats, vocab.float()], dim=-1)


def stopper_features(
    use_vocab: bool,
    logits: torch.Tensor,
    layer: int,
    num_layers: int,
    vocab: torch.Tensor | None,
) -> torch.Tensor:
    """A live reading's features for a stopper trained with (or without) vocab statistics."""
    if use_vocab and vocab is None:
        raise ValueError("this stopper needs full-vocabulary statistics")
    return layer_features(logits, layer, num_layers, vocab if use_vocab else None)


def trace_features(traces: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """[N, L, F] features of every layer from traces [N, L, C] (and vocab stats [N, L, 2])."""
    num_layers = traces.shape[1]
    return torch.stack(
        [
            layer_features(traces[:, i], i + 1, num_layers, None if vocab is None else vocab[:, i])
            for i in range(num_layers)
        ],
        dim=1,
    )


def stop_labels(traces: torch.Tensor) -> torch.Tensor:
    """[N, L] bool: layer l's prediction equals the final one and stays so to the end."""
    preds = traces.argmax(-1)  # [N, L]
    agrees = preds == preds[:, -1:]
    # reverse cumulative AND: agree here and at every deeper layer
    return agrees.flip(1).int().cumprod(1).flip(1).bool()


def first_exits(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Exit layer (1..L) per row from online stop scores [N, L-1]: the first layer whose
    score exceeds `margin`, else the last layer."""
    stops = scores > margin
    first = stops.int().argmax(1) + 1
    return torch.where(stops.any(1), first, torch.full_like(first, scores.shape[1] + 1))


def calibrate_margin(scores: torch.Tensor, traces: torch.Tensor, tolerance: float) -> float:
    """Smallest margin (over the observed scores) whose exits agree with the final layer on
    at least 1 - tolerance of the calibration examples; above every score means "never
    exit early"."""
    final = traces[:, -1].argmax(-1)
    rows = torch.arange(len(traces))
    candidates = torch.unique(scores.flatten())
    lo, hi = 0, len(candidates)  # agreement grows with the margin: binary search
    while lo < hi:
        mid = (lo + hi) // 2
        exits = first_exits(scores, float(candidates[mid]))
        agree = (traces[rows, exits - 1].argmax(-1) == final).float().mean()
        if agree >= 1 - tolerance:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo]) if lo < len(candidates) else float(scores.max())


def simulate_exits(
    policy: ExitPolicy, traces: torch.Tensor, vocab: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit layer (1..L) and prediction per example, replaying a policy on recorded traces
    exactly as a live run would call it."""
    num, num_layers, _ = traces.shape
    exits = torch.full((num,), num_layers, dtype=torch.long)
    done = torch.zeros(num, dtype=torch.bool)
    check = policy.readout_layers(num_layers)
    policy.begin(num)
    for layer in range(1, num_layers):
        if check is not None and layer not in check:
            continue
        stats = vocab[:, layer - 1] if policy.vocab_features and vocab is not None else None
        stop = policy.should_exit(layer, traces[:, layer - 1], num_layers, stats) & ~done
        exits[stop] = layer
        done |= stop
    preds = traces[torch.arange(num), exits - 1].argmax(-1)
    return exits, preds


@dataclass
class AdaInferPolicy(ExitPolicy):
    """Linear SVM stopper: stop when w . standardise(features) + b exceeds the margin."""

    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    margin: float = 0.0
    use_vocab: bool = False
    meta: dict = field(default_factory=dict)
    name = "adainfer"
    stopper = "svm"

    @property
    def vocab_features(self) -> bool:  # type: ignore[override]
        return self.use_vocab

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set(range(1, num_layers))

    def decision(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - torch.tensor(self.mean)) / torch.tensor(self.scale)
        return x @ torch.tensor(self.weights) + self.bias

    def online_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[N, L-1] stop scores from trace features [N, L, F]."""
        return self.decision(features[:, :-1])

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        feats = stopper_features(self.use_vocab, logits, layer, num_layers, vocab)
        return self.decision(feats) > self.margin

    def describe(self) -> dict:
        return {"name": self.name, "stopper": self.stopper, "margin": self.margin, **self.meta}

    def save(self, path: Path) -> None:
        save_stopper(self, path)

    @classmethod
    def load(cls, path: Path) -> AdaInferPolicy | CRFStopPolicy:
        """Load a saved stopper (SVM or CRF; the file says which): `load_stopper`."""
        return load_stopper(path)


@dataclass
class CRFStopPolicy(ExitPolicy):
    """CRF stopper: stop when the filtering marginal P(stop | layers so far) exceeds the
    margin. Rows keep their item prefix between layers."""

    model: bytes
    num_layers: int
    margin: float = 0.5
    use_vocab: bool = False
    meta: dict = field(default_factory=dict)
    name = "adainfer"
    stopper = "crf"

    def __post_init__(self) -> None:
        self._tagger = CRFTagger(self.model)
        self._names = feature_names(self.use_vocab)
        self._history: list[list[dict[str, float]]] = []

    @property
    def vocab_features(self) -> bool:  # type: ignore[override]
        return self.use_vocab

    def readout_layers(self, num_layers: int) -> set[int] | None:
        return set(range(1, num_layers))

    def begin(self, rows: int) -> None:
        self._history = [[] for _ in range(rows)]

    def keep(self, rows: torch.Tensor) -> None:
        self._history = [self._history[i] for i in rows.tolist()]

    def should_exit(
        self, layer: int, logits: torch.Tensor, num_layers: int, vocab: torch.Tensor | None = None
    ) -> torch.Tensor:
        feats = stopper_features(self.use_vocab, logits, layer, num_layers, vocab)
        scores = []
        for prefix, row in zip(self._history, feats.tolist(), strict=True):
            prefix.append(item_features(row, self._names, num_layers))
            scores.append(self._tagger.stop_probability(prefix))
        return torch.tensor(scores) > self.margin

    def online_scores(self, features: torch.Tensor) -> torch.Tensor:
        """[N, L-1] filtering stop probabilities from trace features [N, L, F]."""
        num_layers = features.shape[1]
        out = torch.zeros(features.shape[0], num_layers - 1)
        for n, rows in enumerate(features.tolist()):
            items = [item_features(r, self._names, num_layers) for r in rows[:-1]]
            for layer in range(1, num_layers):
                out[n, layer - 1] = self._tagger.stop_probability(items[:layer])
        return out

    def describe(self) -> dict:
        return {"name": self.name, "stopper": self.stopper, "margin": self.margin, **self.meta}

    def save(self, path: Path) -> None:
        save_stopper(self, path)


STOPPERS: dict[str, type[AdaInferPolicy] | type[CRFStopPolicy]] = {
    "svm": AdaInferPolicy,
    "crf": CRFStopPolicy,
}


def save_stopper(policy: AdaInferPolicy | CRFStopPolicy, path: Path) -> None:
    """Write a fitted stopper as one JSON file, atomically."""
    fields = asdict(policy)
    if isinstance(policy, CRFStopPolicy):
        fields["model"] = base64.b64encode(policy.model).decode()
    payload = {
        "format_version": FORMAT_VERSION,
        "stopper": policy.stopper,
        "features": feature_names(policy.use_vocab),
        **fields,
    }
    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def load_stopper(path: Path) -> AdaInferPolicy | CRFStopPolicy:
    """Read a stopper written by `save_stopper` (SVM or CRF; the file says which)."""
    try:
        payload = json.loads(Path(path).read_text())
        if payload.pop("format_version") != FORMAT_VERSION:
            raise EarlyExitError(f"{path} is an old stopper format; train it again")
        stopper = payload.pop("stopper")
        if stopper not in STOPPERS:
            raise EarlyExitError(f"{path} is not an AdaInfer stopper (unknown kind '{stopper}')")
        features = payload.pop("features")
        if features != feature_names(payload.get("use_vocab", False)):
            raise EarlyExitError(f"{path} was trained on other features; train it again")
        if stopper == "crf":
            payload["model"] = base64.b64decode(payload["model"], validate=True)
        return STOPPERS[stopper](**payload)
    except FileNotFoundError:
        raise EarlyExitError(f"no AdaInfer stopper at {path}; train one first") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, binascii.Error) as err:
        raise EarlyExitError(f"{path} is not an AdaInfer stopper ({err})") from None


def fit_adainfer(
    traces: torch.Tensor,
    c: float = 1.0,
    tolerance: float | None = 0.01,
    stopper: str = "svm",
    vocab: torch.Tensor | None = None,
) -> AdaInferPolicy | CRFStopPolicy:
    """Train a stopper from calibration traces [N, L, C] (candidate logits per layer) and,
    for full-vocabulary features, their vocab statistics [N, L, 2].

    With `tolerance`, the decision margin is then set on the same traces so that at most
    that fraction of exits disagree with the final layer; None keeps the stopper's own
    boundary (SVM margin 0, CRF stop probability 0.5).
    """
    features = trace_features(traces, vocab)
    labels = stop_labels(traces)
    meta = {
        "calibration_examples": len(traces),
        "stop_rate": float(labels[:, :-1].float().mean()),
    }
    if labels[:, :-1].all() or not labels[:, :-1].any():
        # Every layer already agrees with the final one on every calibration prompt (say,
        # the model answers one class throughout), or none ever does: a constant stopper,
        # exiting at the first layer or never, is exactly what the labels ask for.
        constant = 1.0 if labels[:, :-1].all() else -1.0
        width = features.shape[-1]
        return AdaInferPolicy(
            mean=[0.0] * width,
            scale=[1.0] * width,
            weights=[0.0] * width,
            bias=constant,
            use_vocab=vocab is not None,
            meta={**meta, "constant": True},
        )
    policy: AdaInferPolicy | CRFStopPolicy
    if stopper == "crf":
        use_vocab = vocab is not None
        model = train_crf(features, labels, feature_names(use_vocab), c=c)
        policy = CRFStopPolicy(model, features.shape[1], use_vocab=use_vocab, meta=dict(meta))
    elif stopper == "svm":
        from sklearn.svm import LinearSVC

        x = features[:, :-1].reshape(-1, features.shape[-1]).numpy().astype(np.float64)
        mean, scale = x.mean(0), x.std(0) + 1e-8
        svm = LinearSVC(C=c, class_weight="balanced", max_iter=20000)
        svm.fit((x - mean) / scale, labels[:, :-1].reshape(-1).numpy())
        policy = AdaInferPolicy(
            mean=mean.tolist(),
            scale=scale.tolist(),
            weights=svm.coef_[0].tolist(),
            bias=float(svm.intercept_[0]),
            use_vocab=vocab is not None,
            meta=meta,
        )
    else:
        raise EarlyExitError(f"unknown AdaInfer stopper '{stopper}': use svm or crf")
    if tolerance is not None:
        policy.margin = calibrate_margin(policy.online_scores(features), traces, tolerance)
        policy.meta["tolerance"] = tolerance
    return policy
